//! Helpers shared by the benchmarks.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

/// Quick mode (`BENCH_QUICK=1` or `--quick`): checks that a benchmark runs,
/// not its timings. `cargo bench` passes `--bench`; other arguments are ignored.
pub fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
        || std::env::args().any(|a| a == "--quick")
}

/// CPU time (user + system) of the whole process so far, from
/// `/proc/self/stat`, in clock ticks of 10 ms (Linux's `USER_HZ`).
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses: state is
    // field 3, utime field 14, stime field 15.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// A field of `/proc/self/status` in KiB, e.g. `VmHWM` (peak RSS).
pub fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The median of the values, in any order.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// How a target reads in a bench's verdict line.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}
