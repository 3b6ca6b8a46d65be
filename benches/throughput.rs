//! Items per second through a 4-stage pipeline with 4 async workers per stage,
//! bounded queues of 100 and a trivial handler (`n + 1` on a `u64`): how
//! much bergtalzug costs over the same pipeline written by hand with tokio.
//!
//! Timed, per run, from before the pipeline is built until every item came
//! out of the last stage and was counted, on a tokio multi-thread runtime
//! with 2 worker threads. Fair to the baselines: every variant runs as a
//! task on the runtime's workers, and a hand-written pipeline ends in its
//! last stage, whose workers count what they finish (`common::Tally`), as
//! bergtalzug's last stage hands its results to its tracker on the runtime;
//! none ends in a collector awaited on the thread in `block_on`, which made
//! every item (or batch) cross to a third thread and flattered bergtalzug.
//! Every stage holds at most about 104 items (bergtalzug's
//! `queue_size + workers`) in every variant:
//!
//! - `async-channel mpmc`: by hand, the plainest way: one bounded
//!   multi-consumer channel (capacity 100) per stage, each worker receives,
//!   handles and sends one item at a time.
//! - `tokio shared rx`: by hand, one item at a time; each stage's 4 worker
//!   tasks share one bounded `mpsc` receiver (capacity 100) behind a
//!   `tokio::sync::Mutex`.
//! - `tokio rr channels`: by hand, one item at a time; each worker owns a
//!   bounded `mpsc` channel (capacity 25, so 100 per stage) and every sender
//!   deals its items round-robin.
//! - `tokio batched`: by hand, as `shared rx`, but a worker takes what is
//!   ready (up to 16) under one lock and reserves room for all of it
//!   downstream at once (`recv_many` / `reserve_many`); channels of 40, so
//!   40 queued + 4 x 16 in hand = 104 per stage. bergtalzug batches its
//!   transport too; this is the fastest fair hand-written version found.
//! - `bergtalzug tracking on` / `off`: `sources::iter(0..N)` through four
//!   `Async` stages (`workers(4).queue_size(100)`), `retain_results(false)`,
//!   outcomes counted by an `on_complete` callback; all N must succeed.
//!
//! Each variant runs 5 times, interleaved, after one warm-up run; the
//! table shows the median and the best, and the median's ratio to the
//! fastest per-item baseline and to the batched one. Quick mode
//! (`BENCH_QUICK=1` or `--quick`): 20,000 items, one repetition, for CI.
//!
//! Two environment variables narrow a run, for instruction counts under
//! callgrind (`benches/callgrind.sh`); unset, the bench runs as above:
//!
//! - `BENCH_ONLY=<text>`: only the variants whose name (as printed, e.g.
//!   `bergtalzug tracking on`, `tokio batched`) contains `<text>`. They still
//!   get their one warm-up run, and no other.
//! - `BENCH_ITEMS=<n>`: `n` items per timed run instead of the mode's
//!   1,000,000 or 20,000 (the warm-up stays at most 20,000).
//!
//! The last line, `items run per variant: ...`, counts the warm-up too.
//! Before it: issue 14's targets against the batched baseline, and the
//! load average before and after the runs.
//!
//! The pipelines, the rounds and the table live in `benches/common/mod.rs`
//! (`Chain`, `interleaved`, `Rounds::print_table`), shared with
//! `benches/payload.rs`, which runs the same shape with 4 KiB items.
//!
//! ```text
//! cargo bench --bench throughput
//! BENCH_QUICK=1 cargo bench --bench throughput
//! BENCH_QUICK=1 BENCH_ONLY="tracking on" cargo bench --bench throughput
//! benches/callgrind.sh    # instruction counts per variant, 3 runs each
//! ```

mod common;
use common::{Chain, Reference, print_chain_targets};

const FULL_ITEMS: u64 = 1_000_000;
const FULL_REPS: usize = 5;
const QUICK_ITEMS: u64 = 20_000;
const WARMUP_ITEMS: u64 = 20_000;

fn main() {
    // `cargo bench` passes `--bench`; other unknown arguments are ignored too.
    let quick = common::quick();
    let (items, reps) = if quick {
        (QUICK_ITEMS, 1)
    } else {
        (FULL_ITEMS, FULL_REPS)
    };
    let items = common::items_override().unwrap_or(items);
    let variants = common::selected(&Chain::ALL, Chain::name);
    let warmup = WARMUP_ITEMS.min(items);
    let load = common::load_average();
    let runtime = common::runtime();

    println!(
        "throughput: {} stages x {} async workers, queue {}, {items} {}, {reps} rep(s), \
         2 tokio worker threads{}",
        common::CHAIN_STAGES,
        common::CHAIN_WORKERS,
        common::CHAIN_QUEUE,
        <u64 as common::Item>::NAME,
        if quick { " (quick)" } else { "" }
    );
    let rounds = common::interleaved(
        &runtime,
        &variants,
        Chain::name,
        (warmup, items, reps),
        |variant, n| variant.run::<u64>(n),
    );

    println!();
    rounds.print_table(&[
        Reference {
            header: "/per-item",
            of: vec![Chain::Mpmc, Chain::SharedRx, Chain::RoundRobin],
        },
        Reference {
            header: "/batched",
            of: vec![Chain::Batched],
        },
    ]);
    println!(
        "(ratios of medians: /per-item = vs the fastest of mpmc, shared rx and rr channels; \
         /batched = vs tokio batched; - = not run; \
         CPU ns/item = median process CPU time per item, both threads, 10 ms ticks)"
    );
    if !quick {
        print_chain_targets(&rounds);
    }
    common::print_load(&load);
    println!(
        "peak RSS (VmHWM): {}",
        common::status_kib("VmHWM").map_or_else(|| "unavailable".into(), |kib| format!("{kib} kB"))
    );
    println!(
        "items run per variant: {} ({warmup} warm-up + {reps} x {items})",
        warmup + reps as u64 * items
    );
}
