//! One watched pipeline: the samples of its stats, and the failures,
//! stalls, restarts and source errors its events reported.
//!
//! - **Owns**: a type-erased handle of the pipeline ([`Watched`]), its last
//!   [`PipelineStats`], a bounded history of [`Sample`]s and bounded lists
//!   of what went wrong; while someone watches, a task reading a lossy
//!   `EventFilter::failures()` subscription into those lists.
//! - **Called by**: the dashboard's sampler (`sample`, once per
//!   `sample_every`; `watch_events` when viewers come and go) and the API
//!   (`view`, `stop`, `abort`).
//! - **Invariant**: everything it keeps is bounded (`history` samples,
//!   [`LIST_LEN`] entries per list), and nothing it does waits for a viewer:
//!   the pipeline's events reach it through a lossy stream, which drops its
//!   oldest events rather than hold the pipeline back.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use serde::Serialize;

use crate::{
    EventFilter, EventStream, ExecutionType, Pipeline, PipelineConfig, PipelineError,
    PipelineEvent, PipelineStats,
};

/// How many entries each list (failures, stalls, restarts, source errors) keeps.
pub(crate) const LIST_LEN: usize = 50;

/// The longest text (an error chain, a job id) an entry keeps, in bytes.
pub(crate) const MAX_TEXT: usize = 2048;

/// At most [`MAX_TEXT`] bytes of `text`, cut at a character boundary.
fn clip(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// What the dashboard needs of a pipeline, whatever its input type: the
/// public methods of [`Pipeline`], behind one object-safe trait.
pub(crate) trait Watched: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn config(&self) -> &PipelineConfig;
    fn is_finished(&self) -> bool;
    fn stats(&self) -> BoxFuture<'_, Result<PipelineStats, PipelineError>>;
    /// A lossy subscription to what went wrong.
    fn failures(&self) -> EventStream;
    fn stop(&self) -> BoxFuture<'_, Result<(), PipelineError>>;
    fn abort(&self) -> BoxFuture<'_, Result<(), PipelineError>>;
}

impl<T: Send + 'static> Watched for Pipeline<T> {
    fn name(&self) -> &str {
        Pipeline::name(self)
    }

    fn config(&self) -> &PipelineConfig {
        Pipeline::config(self)
    }

    fn is_finished(&self) -> bool {
        Pipeline::is_finished(self)
    }

    fn stats(&self) -> BoxFuture<'_, Result<PipelineStats, PipelineError>> {
        Box::pin(Pipeline::stats(self))
    }

    fn failures(&self) -> EventStream {
        // Lossy (the default): a dashboard never holds a pipeline back.
        self.subscribe_filtered(EventFilter::failures())
    }

    fn stop(&self) -> BoxFuture<'_, Result<(), PipelineError>> {
        Box::pin(Pipeline::stop(self))
    }

    fn abort(&self) -> BoxFuture<'_, Result<(), PipelineError>> {
        Box::pin(Pipeline::abort(self))
    }
}

/// Where a pipeline is in its run, as the page shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Phase {
    /// Not started yet.
    Waiting,
    Running,
    /// Every item has its outcome: the stats are final.
    Finished,
}

/// One point of the charts: rates between two samples, depths and
/// latencies at the second.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    /// Seconds since the pipeline started.
    t: f64,
    /// Items finished per second (either way).
    completed_per_s: f64,
    /// Items failed per second.
    failed_per_s: f64,
    /// Per stage: items its handler finished per second.
    stage_per_s: Vec<f64>,
    /// Per stage: items in its queue.
    queued: Vec<usize>,
    /// End-to-end latency percentiles since the start, in seconds.
    p50: Option<f64>,
    p90: Option<f64>,
    p99: Option<f64>,
}

/// Counters of the previous sample, for rates.
#[derive(Debug, Clone)]
struct Counters {
    t: f64,
    completed: u64,
    failed: u64,
    stage_done: Vec<u64>,
}

impl Counters {
    fn of(stats: &PipelineStats) -> Counters {
        Counters {
            t: stats.elapsed.as_secs_f64(),
            completed: stats.completed_items,
            failed: stats.failed_items,
            stage_done: stats
                .stages
                .iter()
                .map(|s| s.processed + s.failed)
                .collect(),
        }
    }
}

/// A failed item (what a dead letter holds, less its input).
#[derive(Debug, Clone, Serialize)]
struct Failure {
    /// Unix time in milliseconds when the dashboard heard of it.
    at_ms: u64,
    job_id: String,
    stage: String,
    kind: String,
    error: String,
    attempts: u32,
}

#[derive(Debug, Clone, Serialize)]
struct Stall {
    at_ms: u64,
    job_id: String,
    stage: String,
    worker: String,
    /// How long the worker had held it when it was reported, in seconds.
    age_reported: f64,
    /// That plus the time since (until the run ended), in seconds: the
    /// item's age now, if it is still held (the events do not say when a
    /// stalled item goes on).
    age_now: f64,
    #[serde(skip)]
    noticed: Instant,
}

#[derive(Debug, Clone, Serialize)]
struct Restart {
    at_ms: u64,
    stage: String,
    worker: String,
    replacement: String,
    reason: String,
}

#[derive(Debug, Clone, Serialize)]
struct SourceError {
    at_ms: u64,
    message: String,
}

struct State {
    phase: Phase,
    stats: Option<PipelineStats>,
    /// When the run was seen finished (stall ages stop there).
    finished_at: Option<Instant>,
    previous: Option<Counters>,
    history: VecDeque<Sample>,
    history_len: usize,
    /// Samples taken so far; a viewer asks for those after the one it has.
    samples_taken: u64,
    failures: VecDeque<Failure>,
    failures_heard: u64,
    stalls: VecDeque<Stall>,
    restarts: VecDeque<Restart>,
    source_errors: VecDeque<SourceError>,
    /// Events the subscriptions lost (lossy: they fell behind).
    events_dropped: u64,
    /// The task reading the subscription, while someone watches.
    reader: Option<tokio::task::JoinHandle<()>>,
}

/// One watched pipeline; see the [module docs](self).
pub(crate) struct Board {
    pub(crate) id: usize,
    pipeline: Arc<dyn Watched>,
    state: Mutex<State>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn push_bounded<T>(list: &mut VecDeque<T>, entry: T) {
    if list.len() == LIST_LEN {
        list.pop_front();
    }
    list.push_back(entry);
}

fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64())
}

impl Board {
    pub(crate) fn new(id: usize, pipeline: Arc<dyn Watched>, history_len: usize) -> Arc<Board> {
        Arc::new(Board {
            id,
            pipeline,
            state: Mutex::new(State {
                phase: Phase::Waiting,
                stats: None,
                finished_at: None,
                previous: None,
                history: VecDeque::with_capacity(history_len.min(1024)),
                history_len: history_len.max(2),
                samples_taken: 0,
                failures: VecDeque::new(),
                failures_heard: 0,
                stalls: VecDeque::new(),
                restarts: VecDeque::new(),
                source_errors: VecDeque::new(),
                events_dropped: 0,
                reader: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn name(&self) -> &str {
        self.pipeline.name()
    }

    pub(crate) fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// Takes a sample of the pipeline's stats, unless its final stats are
    /// already in. Costs one `stats()` call.
    pub(crate) async fn sample(&self) {
        if self.phase() == Phase::Finished {
            return;
        }
        // Asked first: when it says finished, the stats after it are final.
        let finished = self.pipeline.is_finished();
        let Ok(stats) = self.pipeline.stats().await else {
            return; // not started yet
        };
        self.record_stats(stats, finished);
    }

    fn record_stats(&self, stats: PipelineStats, finished: bool) {
        let mut state = self.lock();
        if state.phase == Phase::Finished {
            return;
        }
        let now = Counters::of(&stats);
        let sample = match &state.previous {
            Some(before) if now.t > before.t => {
                let span = now.t - before.t;
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / span;
                Some(Sample {
                    t: now.t,
                    completed_per_s: rate(now.completed, before.completed),
                    failed_per_s: rate(now.failed, before.failed),
                    stage_per_s: now
                        .stage_done
                        .iter()
                        .zip(&before.stage_done)
                        .map(|(&a, &b)| rate(a, b))
                        .collect(),
                    queued: stats.stages.iter().map(|s| s.queued).collect(),
                    p50: secs(stats.p50_duration),
                    p90: secs(stats.p90_duration),
                    p99: secs(stats.p99_duration),
                })
            }
            Some(_) => None,
            // The first: rates since the start.
            None => (now.t > 0.0).then(|| Sample {
                t: now.t,
                completed_per_s: now.completed as f64 / now.t,
                failed_per_s: now.failed as f64 / now.t,
                stage_per_s: now.stage_done.iter().map(|&a| a as f64 / now.t).collect(),
                queued: stats.stages.iter().map(|s| s.queued).collect(),
                p50: secs(stats.p50_duration),
                p90: secs(stats.p90_duration),
                p99: secs(stats.p99_duration),
            }),
        };
        if let Some(sample) = sample {
            if state.history.len() == state.history_len {
                state.history.pop_front();
            }
            state.history.push_back(sample);
            state.samples_taken += 1;
            state.previous = Some(now);
        }
        state.phase = if finished {
            Phase::Finished
        } else {
            Phase::Running
        };
        if finished {
            // The reader, if any, reads on to `PipelineFinished`, which ends
            // its stream: the last failures are not lost.
            state.finished_at = Some(Instant::now());
        }
        state.stats = Some(stats);
    }

    /// Subscribes to the pipeline's failures (`on`) or drops the
    /// subscription. A subscription costs the pipeline a copy of each
    /// finished item's result, so it is held only while someone watches.
    pub(crate) fn watch_events(self: &Arc<Self>, on: bool) {
        let mut state = self.lock();
        match (on, state.reader.is_some()) {
            (true, false) if state.phase != Phase::Finished => {
                let events = self.pipeline.failures();
                let board = Arc::downgrade(self);
                state.reader = Some(tokio::spawn(async move {
                    let mut events = events;
                    while let Some(event) = events.recv().await {
                        let Some(board) = board.upgrade() else { break };
                        board.record_event(event, events.dropped());
                    }
                }));
            }
            (false, true) if state.phase != Phase::Finished => {
                if let Some(reader) = state.reader.take() {
                    reader.abort();
                }
            }
            _ => {}
        }
    }

    fn record_event(&self, event: PipelineEvent, dropped: u64) {
        let mut state = self.lock();
        state.events_dropped = state.events_dropped.max(dropped);
        let at_ms = now_ms();
        match event {
            PipelineEvent::ItemFinished(result) => {
                let Some(error) = &result.error else { return };
                let job_id = clip(result.job_id.to_string());
                state.stalls.retain(|s| s.job_id != job_id);
                state.failures_heard += 1;
                push_bounded(
                    &mut state.failures,
                    Failure {
                        at_ms,
                        job_id,
                        stage: error.stage.clone(),
                        kind: error.kind.to_string(),
                        error: clip(error.message.clone()),
                        attempts: error.attempts,
                    },
                );
            }
            PipelineEvent::ItemStalled {
                job_id,
                stage,
                worker,
                age,
            } => push_bounded(
                &mut state.stalls,
                Stall {
                    at_ms,
                    job_id: clip(job_id.to_string()),
                    stage: stage.to_string(),
                    worker: worker.to_string(),
                    age_reported: age.as_secs_f64(),
                    age_now: age.as_secs_f64(),
                    noticed: Instant::now(),
                },
            ),
            PipelineEvent::WorkerRestarted {
                stage,
                worker,
                replacement,
                reason,
            } => push_bounded(
                &mut state.restarts,
                Restart {
                    at_ms,
                    stage: stage.to_string(),
                    worker: worker.to_string(),
                    replacement: replacement.to_string(),
                    reason: clip(reason),
                },
            ),
            PipelineEvent::SourceError { message } => push_bounded(
                &mut state.source_errors,
                SourceError {
                    at_ms,
                    message: clip(message),
                },
            ),
            _ => {}
        }
    }

    /// The pipeline as the page and `/api/stats` show it; with the samples
    /// taken after the `after`-th (all kept ones for `None`, none for
    /// `Some(u64::MAX)`).
    pub(crate) fn view(&self, after: Option<u64>, controls: bool) -> serde_json::Value {
        let mut state = self.lock();
        let until = state.finished_at.unwrap_or_else(Instant::now);
        for stall in &mut state.stalls {
            stall.age_now =
                stall.age_reported + until.saturating_duration_since(stall.noticed).as_secs_f64();
        }
        let kept = state.history.len() as u64;
        let first_kept = state.samples_taken - kept;
        let skip = match after {
            None => 0,
            Some(n) => n.saturating_sub(first_kept).min(kept),
        };
        let history: Vec<&Sample> = state.history.iter().skip(skip as usize).collect();
        let config = self.pipeline.config();
        let stats = state.stats.as_ref();
        let (progress, eta) = match stats {
            Some(s) => progress_and_eta(s, state.phase),
            None => (None, None),
        };
        let stages: Vec<StageInfo<'_>> = config
            .stages
            .iter()
            .map(|s| StageInfo {
                name: &s.name,
                model: s.execution_type,
                workers: s.workers,
                queue_size: s.queue_size,
            })
            .collect();
        serde_json::json!({
            "id": self.id,
            "name": self.pipeline.name(),
            "phase": state.phase,
            "controls": controls && state.phase != Phase::Finished,
            "stages": stages,
            "stats": stats,
            "progress": progress,
            "eta_seconds": eta,
            "samples_taken": state.samples_taken,
            "history": history,
            "watching_events": state.reader.as_ref().is_some_and(|r| !r.is_finished()),
            "events_dropped": state.events_dropped,
            "failures_heard": state.failures_heard,
            "failures": state.failures,
            "stalls": state.stalls,
            "restarts": state.restarts,
            "source_errors": state.source_errors,
        })
    }

    /// Samples taken so far.
    pub(crate) fn samples_taken(&self) -> u64 {
        self.lock().samples_taken
    }

    pub(crate) async fn stop(&self) -> Result<(), PipelineError> {
        self.pipeline.stop().await
    }

    pub(crate) async fn abort(&self) -> Result<(), PipelineError> {
        self.pipeline.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_clipped_at_a_character_boundary() {
        assert_eq!(clip("short".into()), "short");
        let long = "é".repeat(MAX_TEXT); // 2 bytes each
        let clipped = clip(long);
        assert!(clipped.len() <= MAX_TEXT + '…'.len_utf8());
        assert!(clipped.ends_with('…'));
    }
}

#[derive(Serialize)]
struct StageInfo<'a> {
    name: &'a str,
    model: ExecutionType,
    workers: usize,
    queue_size: usize,
}

/// The share of the expected items finished, and the seconds left at the
/// recent rate, when the source said how many items it has.
fn progress_and_eta(stats: &PipelineStats, phase: Phase) -> (Option<f64>, Option<f64>) {
    let Some(expected) = stats.expected_items.filter(|&n| n > 0) else {
        return (None, None);
    };
    let done = stats.completed_items.min(expected);
    let progress = done as f64 / expected as f64;
    let eta = match phase {
        Phase::Finished => Some(0.0),
        _ if stats.recent_items_per_second > 0.0 => {
            Some((expected - done) as f64 / stats.recent_items_per_second)
        }
        _ => None,
    };
    (Some(progress), eta)
}
