//! Progress of a running pipeline, for people watching it (feature
//! `progress`, on by default).
//!
//! [`Progress::new`] picks what fits the output:
//!
//! - **a terminal** (stdout and stderr both): a live [indicatif] bar on
//!   stderr, with a total when the source knows how many items it has
//!   ([`Source::size_hint`](crate::Source::size_hint)) and a spinner with
//!   the rate otherwise, and below it one detail line per pipeline: each
//!   stage's queue, items in its workers, utilisation, and the bottleneck;
//!   when the pipeline ends, both give way to a last plain line (ended by a
//!   newline, so what the program prints next starts a line of its own);
//! - **anything else** (piped, redirected, CI): a plain line on stderr every
//!   few seconds and a last one at the end, the same numbers as text.
//!
//! ```
//! use bergtalzug::prelude::*;
//! use bergtalzug::progress::Progress;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = PipelineConfig::new("squares", vec![StageConfig::new("square", ExecutionType::Async)])
//!     .stats_interval(std::time::Duration::ZERO);
//! let progress = Progress::new();
//! let pipeline = Pipeline::builder(config)?
//!     .source(sources::iter(0..1_000u64))              // 1,000 known: a bar with a total
//!     .async_stage("square", |item: WorkItem<u64>| async move { Ok(item.map(|n| n * n)) })
//!     .on_complete({
//!         let progress = progress.clone();
//!         move |r| if !r.success { progress.println(format!("{} failed", r.job_id)) }
//!     })
//!     .build()?;
//! let shown = progress.watch(&pipeline);                // until the pipeline ends
//! pipeline.run().await?;
//! shown.await?;                                         // the last line is drawn
//! # Ok(()) }
//! ```
//!
//! Logs printed while a bar is shown would tear it: print through
//! [`Progress::println`], or give your logger [`Progress::writer`] (with
//! `tracing-subscriber`: `.with_writer(move || progress.writer())`).

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::PipelineStats;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::Pipeline;

/// How often the bar is redrawn.
const BAR_REFRESH: Duration = Duration::from_millis(100);

/// How often a plain line is printed by default.
pub const LINE_INTERVAL: Duration = Duration::from_secs(2);

/// Shows the progress of pipelines: a bar in a terminal, plain lines
/// elsewhere. A cheap, cloneable handle; see the [module docs](self).
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

enum Inner {
    Bar {
        multi: MultiProgress,
        /// Where lines go: stderr, below the bars' last line.
        out: Mutex<Box<dyn Write + Send>>,
    },
    Lines {
        out: Mutex<Box<dyn Write + Send>>,
        every: Duration,
    },
    Hidden,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match &*self.inner {
            Inner::Bar { .. } => "bar",
            Inner::Lines { .. } => "lines",
            Inner::Hidden => "hidden",
        };
        f.debug_struct("Progress").field("mode", &mode).finish()
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    /// A bar on stderr if stdout and stderr are terminals; otherwise plain
    /// lines on stderr every [`LINE_INTERVAL`].
    pub fn new() -> Self {
        if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            Progress::bar()
        } else {
            Progress::lines(std::io::stderr(), LINE_INTERVAL)
        }
    }

    /// A bar on stderr, whatever stderr is (indicatif still hides it when
    /// stderr is not a terminal).
    pub fn bar() -> Self {
        Progress::bar_to(ProgressDrawTarget::stderr(), Box::new(std::io::stderr()))
    }

    fn bar_to(target: ProgressDrawTarget, out: Box<dyn Write + Send>) -> Self {
        Progress {
            inner: Arc::new(Inner::Bar {
                multi: MultiProgress::with_draw_target(target),
                out: Mutex::new(out),
            }),
        }
    }

    /// A plain line to `out` every `every`, and a last one at the end.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let progress = bergtalzug::progress::Progress::lines(std::io::stdout(), Duration::from_secs(5));
    /// assert!(!progress.is_bar());
    /// ```
    pub fn lines(out: impl Write + Send + 'static, every: Duration) -> Self {
        Progress {
            inner: Arc::new(Inner::Lines {
                out: Mutex::new(Box::new(out)),
                every: every.max(Duration::from_millis(10)),
            }),
        }
    }

    /// Shows nothing.
    pub fn hidden() -> Self {
        Progress {
            inner: Arc::new(Inner::Hidden),
        }
    }

    /// True when it draws a bar.
    pub fn is_bar(&self) -> bool {
        matches!(&*self.inner, Inner::Bar { .. })
    }

    /// Shows `pipeline`'s progress until it has finished, from a task on the
    /// current tokio runtime; the task ends after the last line is drawn.
    /// Call it before or after `start`; several pipelines can be watched at
    /// once (one bar each). If the pipeline never starts, the task waits
    /// until it is aborted.
    pub fn watch<T: Send + 'static>(&self, pipeline: &Pipeline<T>) -> tokio::task::JoinHandle<()> {
        let (me, pipeline) = (self.clone(), pipeline.clone());
        tokio::spawn(async move {
            match &*me.inner {
                Inner::Bar { multi, .. } => {
                    watch_bar(multi, &pipeline).await;
                    // The bars are cleared; the last line ends with a
                    // newline, so what is printed next starts a line.
                    let last = match pipeline.stats().await {
                        Ok(stats) => format!("{} (finished)", summary_line(&stats)),
                        Err(_) => format!("{} finished", pipeline.name()),
                    };
                    me.println(last);
                }
                Inner::Lines { every, .. } => me.watch_lines(&pipeline, *every).await,
                Inner::Hidden => pipeline.finished().await,
            }
        })
    }

    async fn watch_lines<T: Send + 'static>(&self, pipeline: &Pipeline<T>, every: Duration) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    if let Ok(stats) = pipeline.stats().await {
                        self.println(summary_line(&stats));
                    }
                }
                _ = pipeline.finished() => break,
            }
        }
        if let Ok(stats) = pipeline.stats().await {
            self.println(format!("{} (finished)", summary_line(&stats)));
        }
    }

    /// Prints a line: above the bars, or as a plain line. It always ends
    /// with a newline, so text printed after it (or after a pipeline's bar
    /// finished) starts on a line of its own.
    pub fn println(&self, line: impl AsRef<str>) {
        let line = line.as_ref();
        match &*self.inner {
            Inner::Bar { multi, out } => {
                // The bars are taken off, the line written after the last
                // one, and the bars drawn again below it.
                multi.suspend(|| {
                    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                });
            }
            Inner::Lines { out, .. } => {
                let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            Inner::Hidden => eprintln!("{line}"),
        }
    }

    /// A writer to stderr that hides the bar while it writes, for loggers.
    pub fn writer(&self) -> ProgressWriter {
        ProgressWriter {
            progress: self.clone(),
        }
    }
}

/// Writes to stderr without tearing the bar; see [`Progress::writer`].
#[derive(Debug, Clone)]
pub struct ProgressWriter {
    progress: Progress,
}

impl Write for ProgressWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &*self.progress.inner {
            Inner::Bar { multi, .. } => multi.suspend(|| std::io::stderr().write_all(buf))?,
            _ => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

async fn watch_bar<T: Send + 'static>(multi: &MultiProgress, pipeline: &Pipeline<T>) {
    let bar = multi.add(ProgressBar::new_spinner());
    let detail = multi.add(ProgressBar::new_spinner());
    detail.set_style(ProgressStyle::with_template("  {wide_msg}").expect("a valid template"));
    bar.set_prefix(pipeline.name().to_string());
    // Whether the bar's style is the one with a total; none set yet.
    let mut with_total: Option<bool> = None;
    let mut ticks = tokio::time::interval(BAR_REFRESH);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let finished = tokio::select! {
            _ = ticks.tick() => false,
            _ = pipeline.finished() => true,
        };
        if let Ok(stats) = pipeline.stats().await {
            let total = stats.expected_items.map(|n| n.max(stats.admitted_items));
            if with_total != Some(total.is_some()) {
                bar.set_style(bar_style(total.is_some()));
                with_total = Some(total.is_some());
            }
            if let Some(total) = total {
                bar.set_length(total);
            }
            bar.set_position(stats.completed_items);
            bar.set_message(rate_text(&stats));
            detail.set_message(stage_line(&stats));
            bar.tick();
        }
        if finished {
            break;
        }
    }
    // Taken off the screen: the last line is printed as a plain line, which
    // ends with a newline whatever the terminal does at its right margin.
    bar.finish_and_clear();
    detail.finish_and_clear();
    multi.remove(&bar);
    multi.remove(&detail);
}

fn bar_style(total: bool) -> ProgressStyle {
    let template = if total {
        "{spinner:.green} {prefix:.bold} [{elapsed_precise}] [{wide_bar:.cyan/blue}] {pos}/{len} ({percent}%, eta {eta}) {msg}"
    } else {
        "{spinner:.green} {prefix:.bold} [{elapsed_precise}] {pos} items {msg}"
    };
    ProgressStyle::with_template(template)
        .expect("a valid template")
        .progress_chars("=> ")
}

/// The rate and the failures: `812 items/s, 3 failed`.
fn rate_text(stats: &PipelineStats) -> String {
    let mut text = format!("{:.0} items/s", stats.recent_items_per_second);
    if stats.failed_items > 0 {
        text.push_str(&format!(", {} failed", stats.failed_items));
    }
    if stats.stalled_items > 0 {
        text.push_str(&format!(", {} stalled", stats.stalled_items));
    }
    text
}

/// One line with every stage: its queue, items in its workers out of its
/// workers, and utilisation; then the bottleneck.
///
/// ```text
/// fetch q100 w10/10 98% | parse q0 w1/5 12% | store q0 w0/10 3% | bottleneck fetch
/// ```
pub fn stage_line(stats: &PipelineStats) -> String {
    let mut parts: Vec<String> = stats
        .stages
        .iter()
        .map(|s| {
            format!(
                "{} q{} w{}/{} {:.0}%",
                s.name,
                s.queued,
                s.in_flight,
                s.workers,
                s.utilisation * 100.0
            )
        })
        .collect();
    if let Some(b) = &stats.bottleneck {
        parts.push(format!("bottleneck {b}"));
    }
    parts.join(" | ")
}

/// The plain line: name, done (of the total when known), rate, failures,
/// then [`stage_line`].
///
/// ```text
/// my_pipeline: 1234/2000 (61.7%) 812 items/s, 3 failed | fetch q100 w10/10 98% | ...
/// ```
pub fn summary_line(stats: &PipelineStats) -> String {
    let done = match stats.expected_items {
        Some(total) if total > 0 => format!(
            "{}/{} ({:.1}%)",
            stats.completed_items,
            total,
            stats.completed_items as f64 * 100.0 / total as f64
        ),
        _ => format!("{} done", stats.completed_items),
    };
    format!(
        "{}: {done} {} | {}",
        stats.pipeline_name,
        rate_text(stats),
        stage_line(stats)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    /// A terminal that records what is written to it, sharing its record
    /// with the line writer, as stderr and a bar drawn on it do.
    #[derive(Clone, Default, Debug)]
    struct Screen(Arc<Mutex<String>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            80
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Write for Screen {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(buf));
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_finished_bar_ends_its_line() {
        let screen = Screen::default();
        let target = ProgressDrawTarget::term_like(Box::new(screen.clone()));
        let progress = Progress::bar_to(target, Box::new(screen.clone()));
        let config = PipelineConfig::new(
            "barred",
            vec![StageConfig::new("wait", ExecutionType::Async).workers(2)],
        )
        .stats_interval(Duration::ZERO);
        let pipeline = Pipeline::builder(config)
            .unwrap()
            .source(crate::sources::iter(0..20u64))
            .async_stage("wait", |i: WorkItem<u64>| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(i)
            })
            .build()
            .unwrap();
        let shown = progress.watch(&pipeline);
        tokio::time::timeout(Duration::from_secs(10), pipeline.run())
            .await
            .expect("the pipeline hung")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), shown)
            .await
            .expect("the bar hung")
            .unwrap();
        let text = screen.0.lock().unwrap().clone();
        assert!(text.contains("barred"), "the bar was drawn: {text:?}");
        // What the program prints next starts on a line of its own.
        assert!(text.ends_with('\n'), "{text:?}");
        // The bars draw no newlines here (a real terminal wraps at the
        // margin); the last line is the summary, ended.
        let last = &text[text.rfind("barred: ").expect(&text)..];
        assert!(
            last.starts_with("barred: 20/20 (100.0%)") && last.ends_with(" (finished)\n"),
            "{last:?}"
        );
    }
}
