//! Items per second through the 4 x 4 pipeline of `benches/throughput.rs`
//! when every item carries a 4 KiB payload: does bergtalzug stay as close to
//! the hand-written pipelines when items own memory?
//!
//! The item is `common::Payload`, a `Box<[u8; 4096]>`: the source (or the
//! hand-written feeder) allocates it zeroed and writes the item's index in
//! its first 8 bytes; every stage's handler reads that `u64`, adds 1 and
//! writes it back (a cheap touch of the payload, as a handler bumping a
//! counter in a record); the last stage counts it and drops the item. An
//! item moves as its 8-byte pointer and nothing copies the 4 KiB (the
//! handlers take and return it by value; `WorkItem::map` moves it).
//!
//! Same shape, timing and fairness as `benches/throughput.rs`: 4 stages x 4
//! workers, queue 100, at most about 104 items per stage in every variant
//! (so about 1.7 MiB of payloads in flight), every variant a task on a
//! tokio runtime with 2 worker threads, each hand-written pipeline ending
//! in its last stage (`common::Tally`, which also checks the sum of the
//! values, so a lost or twice-counted item fails the run). Variants:
//!
//! - `async-channel mpmc`: one bounded `async-channel` of 100 per stage,
//!   one item at a time (`common::mpmc_of`).
//! - `tokio batched`: shared `mpsc` receivers, `recv_many` / `reserve_many`
//!   up to 16, channels of 40 (the fastest fair hand-written version).
//! - `bergtalzug tracking on` / `off`: `sources::iter((0..N).map(Payload::new))`
//!   through four `Async` stages, `retain_results(false)`, outcomes counted
//!   by `on_complete`; all N must succeed.
//!
//! Targets (issue 14, "4 KiB payloads: the same ratios hold"): tracking off
//! at least 1.0x the batched pipeline, tracking on at least 0.7x, and
//! tracking on's CPU per item at most 1.5x the batched pipeline's.
//!
//! Each variant runs 5 times, interleaved, after one warm-up run; the table
//! shows the median and the best items/s, the median's ratio to mpmc and to
//! the batched pipeline, and the median process CPU time per item (from
//! `/proc/self/stat`, 10 ms ticks). Quick mode (`BENCH_QUICK=1` or
//! `--quick`): 20,000 items, one repetition, for CI. `BENCH_ONLY=<text>`
//! and `BENCH_ITEMS=<n>` narrow a run as in `benches/throughput.rs`.
//!
//! ```text
//! cargo bench --bench payload
//! BENCH_QUICK=1 cargo bench --bench payload
//! ```

mod common;
use common::{Chain, PAYLOAD_BYTES, Payload, Reference, print_chain_targets};

const FULL_ITEMS: u64 = 1_000_000;
const FULL_REPS: usize = 5;
const QUICK_ITEMS: u64 = 20_000;
const WARMUP_ITEMS: u64 = 20_000;

const VARIANTS: [Chain; 4] = [
    Chain::Mpmc,
    Chain::Batched,
    Chain::Tracking(true),
    Chain::Tracking(false),
];

fn main() {
    // `cargo bench` passes `--bench`; other unknown arguments are ignored too.
    let quick = common::quick();
    let (items, reps) = if quick {
        (QUICK_ITEMS, 1)
    } else {
        (FULL_ITEMS, FULL_REPS)
    };
    let items = common::items_override().unwrap_or(items);
    let variants = common::selected(&VARIANTS, Chain::name);
    let warmup = WARMUP_ITEMS.min(items);
    let load = common::load_average();
    let runtime = common::runtime();

    println!(
        "payload: {} stages x {} async workers, queue {}, {items} {}, {reps} rep(s), \
         2 tokio worker threads{}",
        common::CHAIN_STAGES,
        common::CHAIN_WORKERS,
        common::CHAIN_QUEUE,
        <Payload as common::Item>::NAME,
        if quick { " (quick)" } else { "" }
    );
    println!(
        "size_of: Payload {} B (owns {PAYLOAD_BYTES} B on the heap), bergtalzug::WorkItem<Payload> {} B",
        std::mem::size_of::<Payload>(),
        std::mem::size_of::<bergtalzug::WorkItem<Payload>>(),
    );
    let rounds = common::interleaved(
        &runtime,
        &variants,
        Chain::name,
        (warmup, items, reps),
        |variant, n| variant.run::<Payload>(n),
    );

    println!();
    rounds.print_table(&[
        Reference {
            header: "/mpmc",
            of: vec![Chain::Mpmc],
        },
        Reference {
            header: "/batched",
            of: vec![Chain::Batched],
        },
    ]);
    println!(
        "(ratios of medians: /mpmc = vs async-channel mpmc; /batched = vs tokio batched; \
         - = not run; CPU ns/item = median process CPU time per item, both threads, 10 ms ticks)"
    );
    if !quick {
        print_chain_targets(&rounds);
    }
    common::print_load(&load);
    println!(
        "peak RSS (VmHWM): {}",
        common::status_kib("VmHWM").map_or_else(|| "unavailable".into(), |kib| format!("{kib} kB"))
    );
}
