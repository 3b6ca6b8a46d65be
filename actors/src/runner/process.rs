//! `Process`: each worker runs its batches in a worker OS process of its
//! own (see [`crate::process`] for the child's side and the user's view).
//!
//! A stage keeps at most `workers` worker processes: a worker takes an idle
//! one from the stage's pool for each batch (starting one if there is
//! none) and gives it back after. Items are taken from the worker's hand
//! as they are sent, and up to [`MAX_WRITE_AHEAD`] small ones are written
//! ahead while replies are read, so small items do not pay a round trip of
//! latency each, while the rest of the batch stays in the hand, where an
//! idle worker may take it (only those written ahead wait behind a slow
//! one). Items that take [`ONE_AT_A_TIME`] or longer go one at a time,
//! and nothing waits behind them. The child answers in order, so the first
//! unanswered item is the one it is running: if the child dies, runs past
//! the stage's timeout, or sends something that is not a reply, that item
//! fails, the child is killed and reaped, and the rest of the batch goes to
//! a new child. A failed write does not blame anyone by itself: the replies
//! the child sent before it died are read first, and if it had answered
//! every item it was sent whole, no item fails (up to
//! [`MAX_INNOCENT_BREAKS`] times a batch). Nothing a child sends is trusted: frames are bounded
//! ([`crate::process::frame::FrameBuf`]) and decoding errors are values.
//!
//! An "item" here is one job for the child: a stage's item, or, for a
//! batch stage, a whole batch ([`crate::process::wire`] says how each
//! crosses). A child whose per-worker resource cannot be built fails the
//! worker as a death does, blaming the item it was about to get.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::attempt::{Attempt, Ran};
use super::report::{Reporter, Sending};
use super::{FLUSH_AFTER, RunCtx, StageRunner};
use crate::error::PipelineError;
use crate::item::{ItemErrorKind, WorkItem, WorkItemMetadata};
use crate::outcome::Outcome;
use crate::ports::FailPipeline;
use crate::process::frame::{self, Reply};
use crate::process::spawn::{ChildProc, ChildSpec, Unstarted};
use crate::process::wire::{self, Wire};

/// How many times in a batch a child may break holding no item before the
/// next item is blamed anyway (so that children that die at once cannot
/// make a batch loop).
const MAX_INNOCENT_BREAKS: u32 = 3;

/// Items that take at least this long (by the recent pace) go to a worker
/// process one at a time: a round trip costs little beside them.
const ONE_AT_A_TIME: Duration = Duration::from_millis(1);
/// The most items a worker process is sent at once (the one it runs and
/// those written ahead, which wait behind it): enough to hide the round
/// trip of small items; the rest of the batch stays in the worker's hand,
/// where an idle worker of the stage may take it.
const MAX_WRITE_AHEAD: usize = 4;
/// Worker processes of a stage that fail to start this many times in a row
/// (none starting in between) fail the pipeline: one failure may be a
/// passing shortage (of memory, of processes), three in a row are a program
/// that cannot serve the stage (most often: `main` does not call
/// `process::init()` first).
const START_FAILURES: u32 = 3;
/// The pause before starting another worker process after one failed to.
const START_RETRY_DELAY: Duration = Duration::from_millis(50);
/// How long an exchange with a worker process runs before the process's
/// exit is watched as well as its socket (each look is a system call).
const WATCH_EXIT_AFTER: Duration = Duration::from_millis(10);
/// How long the stage waits, when it stops, for its worker processes to be
/// reaped (an idle one exits as soon as its socket closes).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// Runs a Process stage's batches in worker processes; `W` says how its
/// items cross ([`crate::process::wire`]).
pub(crate) struct ProcessRunner<I, O, W> {
    spec: ChildSpec,
    /// Worker processes between batches.
    idle: Mutex<Vec<ChildProc>>,
    /// Recent time from one reply to the next, in nanoseconds (0 = not
    /// known yet): sets how many items are written ahead.
    pace_ns: AtomicU64,
    /// Fails the pipeline (when worker processes cannot start).
    fail: Arc<dyn FailPipeline>,
    /// Worker processes that failed to start since one last started.
    start_failures: AtomicU32,
    /// Set once worker processes could not be started: why. Items then
    /// fail at once, without another try.
    cannot_start: OnceLock<String>,
    _types: PhantomData<fn(I, W) -> O>,
}

impl<I, O, W> ProcessRunner<I, O, W> {
    pub(crate) fn new(spec: ChildSpec, fail: Arc<dyn FailPipeline>) -> Self {
        ProcessRunner {
            spec,
            idle: Mutex::new(Vec::new()),
            pace_ns: AtomicU64::new(0),
            fail,
            start_failures: AtomicU32::new(0),
            cannot_start: OnceLock::new(),
            _types: PhantomData,
        }
    }
}

/// An item of the batch on its way through a child.
struct Pending<I, A> {
    attempt: Attempt<I>,
    /// When the child started on it (when it became the first unanswered).
    started: Option<Instant>,
    /// Its frame, or why it cannot be sent.
    frame: Result<Vec<u8>, String>,
    /// What is kept of it meanwhile ([`Wire::Aside`]).
    aside: A,
}

/// Why a child cannot go on: the item it holds fails with this.
struct Broken {
    kind: ItemErrorKind,
    /// What happened; the child's fate is added.
    what: String,
    /// Kill at once (else wait a moment for it to die by itself).
    kill: bool,
    /// It broke holding no item: it had answered every item it was sent
    /// whole (it died between items, or while one was still being sent).
    innocent: bool,
}

impl Broken {
    fn died(what: impl Into<String>, innocent: bool) -> Broken {
        Broken {
            kind: ItemErrorKind::ProcessDied,
            what: what.into(),
            kill: false,
            innocent,
        }
    }

    fn corrupt(what: impl std::fmt::Display) -> Broken {
        Broken {
            kind: ItemErrorKind::ProcessDied,
            what: format!("sent a corrupt reply ({what})"),
            kill: true,
            innocent: false,
        }
    }
}

/// A reply, decoded and checked, before its item is taken off the batch.
enum Answer<D> {
    Done(WorkItemParts<D>),
    Failed { message: String, permanent: bool },
    Panicked(String),
}

struct WorkItemParts<D> {
    data: D,
    custom: std::collections::BTreeMap<String, serde_json::Value>,
}

impl<I, O, W> StageRunner<I, O> for ProcessRunner<I, O, W>
where
    I: Send + 'static,
    O: Send + 'static,
    W: Wire<I, O>,
{
    async fn run(&self, ctx: &Arc<RunCtx<I, O>>) -> Result<(), String> {
        // Items are taken from the hand as they are written, at most
        // `MAX_WRITE_AHEAD` at once, so the rest stay within the stage's
        // reach.
        let mut pending: VecDeque<Pending<I, W::Aside>> = VecDeque::new();
        self.top_up(ctx, &mut pending);
        if pending.is_empty() {
            return Ok(());
        }
        let mut reporter = Sending(Reporter::new(ctx, pending.len(), Instant::now()));
        let ctx: &RunCtx<I, O> = ctx;
        let mut child = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut innocent_breaks = 0;
        loop {
            self.top_up(ctx, &mut pending);
            let Some(front) = pending.front() else {
                break;
            };
            if let Err(e) = &front.frame {
                let message = format!("the item cannot be sent to a worker process: {e}");
                let Pending { mut attempt, .. } = pending.pop_front().expect("a front");
                let now = Instant::now();
                let outcome = attempt.end(ctx, Ran::Unsendable(message), now);
                reporter.push(outcome, now, now);
                continue;
            }
            if let Some(why) = self.cannot_start.get() {
                // The stage cannot start worker processes: no more tries.
                let message = format!("the stage cannot start its worker processes: {why}");
                let front = pending.pop_front().expect("a front");
                let now = Instant::now();
                let outcome = front
                    .with_input::<O, W>()
                    .end(ctx, Ran::NoWorkers(message), now);
                reporter.push(outcome, now, now);
                continue;
            }
            let mut proc = match child.take() {
                Some(proc) if !self.used_up(&proc) => proc,
                other => {
                    if let Some(old) = other {
                        old.retire();
                    }
                    match self.spec.spawn(ctx.worker).await {
                        Ok(proc) => {
                            self.start_failures.store(0, Ordering::Relaxed);
                            proc
                        }
                        Err(Unstarted::Failed(message)) => {
                            // No item is to blame: it never reached a handler.
                            self.start_failed(ctx, message).await;
                            continue;
                        }
                        Err(Unstarted::NoResource(message)) => {
                            // It reached its handler, whose resource could
                            // not be built: the worker fails as after a
                            // panic, with the item it was about to run.
                            self.start_failures.store(0, Ordering::Relaxed);
                            tracing::warn!(target: "bergtalzug::process", pipeline = %self.spec.pipeline, stage = %ctx.stage,
                                worker = %ctx.worker, "{message}");
                            let now = Instant::now();
                            return self.lose_worker(
                                ctx,
                                pending,
                                reporter,
                                ItemErrorKind::Panicked,
                                message,
                                now,
                            );
                        }
                    }
                }
            };
            let quota = self
                .spec
                .recycle_after
                .map_or(usize::MAX, |n| n.saturating_sub(proc.served) as usize);
            match self
                .exchange(ctx, &mut proc, &mut pending, quota, &mut reporter)
                .await
            {
                Ok(()) if proc.buf.is_empty() => child = Some(proc),
                Ok(()) => {
                    let pid = proc.pid;
                    let how = proc.kill().await;
                    tracing::warn!(target: "bergtalzug::process", pipeline = %self.spec.pipeline, stage = %ctx.stage,
                        worker = %ctx.worker, pid,
                        "worker process sent bytes nobody asked for and {how}");
                }
                Err(broken) if broken.innocent && innocent_breaks < MAX_INNOCENT_BREAKS => {
                    // No item to blame: replace the child and send again.
                    innocent_breaks += 1;
                    let pid = proc.pid;
                    let how = proc.end().await;
                    tracing::warn!(target: "bergtalzug::process", pipeline = %self.spec.pipeline, stage = %ctx.stage,
                        worker = %ctx.worker, pid,
                        "worker process {pid} {} between items; it {how}", broken.what);
                }
                Err(broken) => {
                    let pid = proc.pid;
                    let how = if broken.kill {
                        proc.kill().await
                    } else {
                        proc.end().await
                    };
                    let message = format!("worker process {pid} {}; it {how}", broken.what);
                    tracing::warn!(target: "bergtalzug::process", pipeline = %self.spec.pipeline, stage = %ctx.stage,
                        worker = %ctx.worker, pid, "{message}");
                    let now = Instant::now();
                    return self.lose_worker(ctx, pending, reporter, broken.kind, message, now);
                }
            }
        }
        reporter.finish(Instant::now());
        if let Some(proc) = child {
            if self.used_up(&proc) {
                proc.retire();
            } else {
                self.idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(proc);
            }
        }
        Ok(())
    }

    async fn shutdown(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for proc in idle {
            proc.retire();
        }
        self.spec.reap_all(SHUTDOWN_WAIT).await;
    }
}

impl<I, O, W> ProcessRunner<I, O, W>
where
    I: Send + 'static,
    O: Send + 'static,
    W: Wire<I, O>,
{
    /// The worker lost its worker process (`message` says how) with the
    /// front item of `pending`: that item fails with `kind`, and the worker
    /// gives up as a worker actor does when its handler panics, so that
    /// the stage replaces it (counted against its restart budget,
    /// announced as `WorkerRestarted`) and the rest of the batch goes back
    /// to the stage's queue (the items written ahead first, then those
    /// still in the worker's hand, in the order they were given).
    fn lose_worker(
        &self,
        ctx: &RunCtx<I, O>,
        mut pending: VecDeque<Pending<I, W::Aside>>,
        mut reporter: Sending<I, O>,
        kind: ItemErrorKind,
        message: String,
        now: Instant,
    ) -> Result<(), String> {
        let front = pending.pop_front().expect("a front");
        let started = front.started.unwrap_or(now);
        // Recorded, not pushed: a push may send a report on its own, and
        // one holding the worker's last item without `failing` would let
        // the stage count it idle before the give-up arrives.
        reporter.record(
            front.fail::<O, W>(ctx, kind, message.clone(), now),
            started,
            now,
        );
        let mut returned = self.hand_back(ctx, &mut pending, &mut reporter);
        returned.extend(ctx.hand.take_all());
        reporter.give_up(returned, message.clone(), Instant::now());
        Err(message)
    }

    /// How many items to have sent at once: one at a time until the pace
    /// is known and while items take [`ONE_AT_A_TIME`] or longer, else
    /// [`MAX_WRITE_AHEAD`].
    fn window(&self) -> usize {
        match self.pace_ns.load(Ordering::Relaxed) {
            0 => 1,
            pace if pace >= ONE_AT_A_TIME.as_nanos() as u64 => 1,
            _ => MAX_WRITE_AHEAD,
        }
    }

    /// Counts the time an item took, from the previous reply to its own.
    fn note_pace(&self, took: Duration) {
        let took = (took.as_nanos() as u64).max(1);
        let pace = match self.pace_ns.load(Ordering::Relaxed) {
            0 => took,
            old => (old * 4 + took) / 5,
        };
        self.pace_ns.store(pace.max(1), Ordering::Relaxed);
    }

    /// Takes items from the worker's hand until the window is full,
    /// beginning their attempts and encoding their frames.
    fn top_up(&self, ctx: &RunCtx<I, O>, pending: &mut VecDeque<Pending<I, W::Aside>>) {
        let window = self.window();
        let limit = self.spec.max_frame;
        while pending.len() < window {
            let Some(mut item) = ctx.hand.next() else {
                return;
            };
            let attempt = Attempt::begin(ctx, &mut item, Instant::now());
            let aside = W::aside(&item);
            let frame = frame::custom_to_wire(&item.head.metadata.custom).and_then(|custom| {
                // The data's `Serialize` is user code: a panic in it
                // fails this item only.
                crate::contain::call(|| W::encode(&item, &custom, limit))
                    .unwrap_or_else(|panic| Err(format!("serializing its data panicked: {panic}")))
            });
            // Sent as bytes; its `Drop` is user code too.
            crate::contain::drop_logged(item, || "an item sent to a worker process".into());
            pending.push_back(Pending {
                attempt,
                started: None,
                frame,
                aside,
            });
        }
    }

    /// A worker process failed to start (`message` says how): counts it,
    /// and fails the pipeline once [`START_FAILURES`] in a row did.
    async fn start_failed(&self, ctx: &RunCtx<I, O>, message: String) {
        tracing::warn!(target: "bergtalzug::process", pipeline = %self.spec.pipeline, stage = %ctx.stage,
            worker = %ctx.worker, "{message}");
        let failures = self.start_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < START_FAILURES {
            tokio::time::sleep(START_RETRY_DELAY).await;
            return;
        }
        if self.cannot_start.set(message.clone()).is_ok() {
            self.fail.fail(PipelineError::WorkersCannotStart {
                pipeline: self.spec.pipeline.to_string(),
                stage: self.spec.stage.to_string(),
                failures,
                message,
            });
        }
    }

    /// The items of `pending` as they were before this batch, for the
    /// stage to give to another worker; an item that cannot be had again
    /// (its data did not encode, or does not decode) fails here as it would
    /// have in the batch.
    fn hand_back(
        &self,
        ctx: &RunCtx<I, O>,
        pending: &mut VecDeque<Pending<I, W::Aside>>,
        reporter: &mut Reporter<I, O>,
    ) -> Vec<WorkItem<I>> {
        let mut returned = Vec::with_capacity(pending.len());
        for p in pending.drain(..) {
            match p.unstarted::<O, W>() {
                Ok(item) => returned.push(item),
                Err(lost) => {
                    let (mut attempt, message) = *lost;
                    let now = Instant::now();
                    let outcome = attempt.end(ctx, Ran::Unsendable(message), now);
                    // Sent with the give-up (see `lose_worker`).
                    reporter.record(outcome, now, now);
                }
            }
        }
        returned
    }

    /// Whether a child has served its `recycle_after` items.
    fn used_up(&self, proc: &ChildProc) -> bool {
        self.spec.recycle_after.is_some_and(|n| proc.served >= n)
    }

    /// Sends the front run of sendable items (at most `quota`) to `proc`
    /// and settles each as its reply comes; stops early when the child
    /// breaks, leaving the item it held at the front of `pending`.
    async fn exchange(
        &self,
        ctx: &RunCtx<I, O>,
        proc: &mut ChildProc,
        pending: &mut VecDeque<Pending<I, W::Aside>>,
        quota: usize,
        reporter: &mut Reporter<I, O>,
    ) -> Result<(), Broken> {
        let quota = quota.max(1);
        let mut n = pending
            .iter()
            .take(quota)
            .take_while(|p| p.frame.is_ok())
            .count();
        let (mut answered, mut written, mut offset) = (0, 0, 0);
        let mut front_started = Instant::now();
        self.start(ctx, &mut pending[0], reporter, front_started);
        let (socket, buf, served, process) = proc.parts();
        let (mut rd, mut wr) = socket.split();
        let mut flush_at = std::pin::pin!(tokio::time::sleep(FLUSH_AFTER));
        // The socket alone would not tell of a death: a process the handler
        // started (a fork) may hold it open after the worker died. Its exit
        // is watched after a moment, so that the quick exchanges of most
        // batches cost no `waitpid` call.
        let watch = async {
            tokio::time::sleep(WATCH_EXIT_AFTER).await;
            process.wait().await
        };
        let mut watch = std::pin::pin!(watch);
        // Set when the process has exited: what it wrote before is read
        // without waiting.
        let mut exited = false;
        // Set when a write fails: the child is gone or stopped reading, but
        // replies it sent before may still be waiting to be read.
        let mut cannot_write = None;
        while answered < n {
            if let Some(e) = &cannot_write
                && answered == written
            {
                let what = format!("stopped reading ({e})");
                return Err(Broken::died(what, true));
            }
            let deadline = ctx
                .timeout
                .map(|t| tokio::time::Instant::from_std(front_started + t));
            // Finished items are reported within `FLUSH_AFTER` even while
            // the child is slow with the next one (the timer is reset only
            // when a report went, about once a `FLUSH_AFTER`).
            let unsent = reporter.flush_due();
            if let Some(due) = unsent {
                let due = tokio::time::Instant::from_std(due);
                if flush_at.deadline() != due {
                    flush_at.as_mut().reset(due);
                }
            }
            tokio::select! {
                biased;
                read = read_or_drain(&mut rd, buf.spare(), exited) => {
                    match read {
                        // Replies sent before the end were read first: the
                        // child held the first unanswered item, if it was
                        // sent whole.
                        Ok(0) => {
                            let innocent = answered == written;
                            return Err(Broken::died("died while running the item", innocent));
                        }
                        Ok(k) => buf.filled(k),
                        Err(e) => {
                            let what = format!("broke its socket ({e})");
                            return Err(Broken::died(what, answered == written));
                        }
                    }
                    while answered < n {
                        let range = match buf.next_frame() {
                            Ok(Some(range)) => range,
                            Ok(None) => break,
                            Err(e) => return Err(Broken::corrupt(e)),
                        };
                        if answered == written {
                            return Err(Broken::corrupt("a reply before its item was sent"));
                        }
                        let answer = decode_answer::<W::Done>(buf.get(range))?;
                        let front = pending.pop_front().expect("a sent item");
                        answered += 1;
                        *served += 1;
                        let now = Instant::now();
                        self.note_pace(now.saturating_duration_since(front_started));
                        settle::<I, O, W>(ctx, reporter, front, answer, front_started, now);
                        front_started = now;
                        // Keep the window full: items taken now join this
                        // exchange while they can be sent.
                        self.top_up(ctx, pending);
                        while n < quota
                            && n - answered < pending.len()
                            && pending[n - answered].frame.is_ok()
                        {
                            n += 1;
                        }
                        if answered < n {
                            self.start(ctx, &mut pending[0], reporter, now);
                        }
                    }
                }
                wrote = wr.write(sendable(pending, written - answered, offset)),
                    if written < n && cannot_write.is_none() =>
                {
                    match wrote {
                        Ok(0) => cannot_write = Some("a write of 0 bytes".to_string()),
                        Ok(k) => {
                            offset += k;
                            if offset == sendable(pending, written - answered, 0).len() {
                                (written, offset) = (written + 1, 0);
                            }
                        }
                        Err(e) => cannot_write = Some(e.to_string()),
                    }
                }
                () = &mut flush_at, if unsent.is_some() => reporter.flush_done(),
                _ = &mut watch, if !exited => exited = true,
                () = sleep_until(deadline) => {
                    let timeout = ctx.timeout.unwrap_or_default();
                    return Err(Broken {
                        kind: ItemErrorKind::TimedOut,
                        what: format!("ran past the stage's timeout of {timeout:?}"),
                        kill: true,
                        innocent: false,
                    });
                }
            }
        }
        Ok(())
    }

    /// The child starts on `pending` now: stamp it and tell subscribers.
    fn start(
        &self,
        ctx: &RunCtx<I, O>,
        pending: &mut Pending<I, W::Aside>,
        reporter: &mut Reporter<I, O>,
        now: Instant,
    ) {
        pending.started = Some(now);
        // Stamped when the child starts on it, not when the batch came; a
        // retry keeps its first attempt's start (as `Attempt::begin` does).
        if ctx.tracking
            && let Some(times) = pending.attempt.stages.last_mut()
        {
            pending.attempt.began = Some(times.attempt_begins(
                crate::item::since(pending.attempt.created, now),
                pending.attempt.attempts == 1,
            ));
        }
        reporter.started(&pending.attempt.job_id);
    }
}

/// The unsent rest of the frame of `pending[index]` (empty when there is
/// none: `select!` builds this even when the branch is disabled).
fn sendable<I, A>(pending: &VecDeque<Pending<I, A>>, index: usize, offset: usize) -> &[u8] {
    match pending.get(index).map(|p| &p.frame) {
        Some(Ok(frame)) => frame.get(offset..).unwrap_or(&[]),
        _ => &[],
    }
}

/// Reads the socket; once the process has exited, only what is there
/// already, taking "nothing more" for its end.
async fn read_or_drain(
    rd: &mut tokio::net::unix::ReadHalf<'_>,
    buf: &mut [u8],
    exited: bool,
) -> std::io::Result<usize> {
    if !exited {
        return rd.read(buf).await;
    }
    match rd.try_read(buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
        other => other,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Decodes a reply to an item, refusing anything else.
fn decode_answer<D: DeserializeOwned>(payload: &[u8]) -> Result<Answer<D>, Broken> {
    // The output's `Deserialize` is user code: a panic in it fails the item
    // as a reply that cannot be read.
    let reply = crate::contain::call(|| frame::decode::<Reply<D>>(payload))
        .map_err(|panic| Broken::corrupt(format!("reading it panicked: {panic}")))?;
    match reply.map_err(Broken::corrupt)? {
        Reply::Done { custom, data } => Ok(Answer::Done(WorkItemParts {
            data,
            custom: frame::custom_from_wire(&custom).map_err(Broken::corrupt)?,
        })),
        Reply::Failed { message, permanent } => Ok(Answer::Failed { message, permanent }),
        Reply::Panicked { message } => Ok(Answer::Panicked(message)),
        Reply::Hello { .. } => Err(Broken::corrupt("a second hello")),
        Reply::NoResource { .. } => Err(Broken::corrupt("a start-up failure while serving")),
    }
}

/// Records what the child's handler did with an item, as the other models do.
fn settle<I, O, W>(
    ctx: &RunCtx<I, O>,
    reporter: &mut Reporter<I, O>,
    front: Pending<I, W::Aside>,
    answer: Answer<W::Done>,
    started: Instant,
    now: Instant,
) where
    I: Send + 'static,
    O: Send + 'static,
    W: Wire<I, O>,
{
    let (mut attempt, ran) = match answer {
        Answer::Done(parts) => {
            let Pending {
                attempt,
                started: began,
                frame,
                aside,
            } = front;
            match W::output(parts.data, aside) {
                Ok(data) => {
                    let mut item = WorkItem::with_job_id(attempt.job_id.clone(), data);
                    item.head.metadata.custom = parts.custom;
                    (attempt, Ran::Returned(Ok(item)))
                }
                Err((message, aside)) => {
                    // A reply that does not fit its item (a batch's count
                    // of outcomes): the attempt failed.
                    let front = Pending {
                        attempt,
                        started: began,
                        frame,
                        aside,
                    };
                    let error = anyhow::Error::msg(message);
                    (front.with_input::<O, W>(), Ran::Returned(Err(error)))
                }
            }
        }
        Answer::Failed { message, permanent } => {
            let error = wire::error(message, permanent);
            (front.with_input::<O, W>(), Ran::Returned(Err(error)))
        }
        Answer::Panicked(message) => {
            // Caught in the child, which goes on: the item fails as a panic
            // (retried like one), but this worker is not replaced.
            let outcome = front
                .with_input::<O, W>()
                .end(ctx, Ran::Panicked(message), now);
            reporter.push(outcome, started, now);
            return;
        }
    };
    // Never a panic here, so the rest of the batch is never handed back.
    let _ = reporter.settle(&mut attempt, ran, started, now, &mut std::iter::empty());
}

impl<I: Send + 'static, A> Pending<I, A> {
    /// The item's data again, decoded from the frame it was to be sent in.
    fn input<O, W: Wire<I, O, Aside = A>>(&self) -> Result<I, String> {
        match &self.frame {
            Ok(frame) => match frame.get(4..).map(|payload| W::input(payload, &self.aside)) {
                Some(Ok(data)) => Ok(data),
                Some(Err(e)) => Err(format!("the item cannot be decoded again: {e}")),
                None => Err("the item's frame is short".to_string()),
            },
            Err(e) => Err(format!("the item cannot be sent to a worker process: {e}")),
        }
    }

    /// The item as it was before this attempt began, its data decoded from
    /// the frame it was to be sent in; else its attempt and why not.
    fn unstarted<O, W: Wire<I, O, Aside = A>>(
        self,
    ) -> Result<WorkItem<I>, Box<(Attempt<I>, String)>> {
        let data = self.input::<O, W>();
        let mut attempt = self.attempt;
        let data = match data.map_err(|e| (attempt.kept.take(), e)) {
            Ok(data) => data,
            Err((Some(kept), _)) => kept,
            Err((None, message)) => return Err(Box::new((attempt, message))),
        };
        let mut metadata = WorkItemMetadata::default();
        metadata.set_created_ns(attempt.created);
        metadata.names = attempt.names;
        metadata.stages = attempt.stages;
        metadata.attempts = attempt.attempts - 1;
        metadata.custom = attempt.custom.unwrap_or_default();
        Ok(WorkItem::from_parts(attempt.job_id, data, metadata))
    }

    /// The attempt, holding its input again (decoded from the frame sent),
    /// for a retry or a dead letter: nothing is copied while attempts
    /// succeed, and the input type need not be `Clone`.
    fn with_input<O, W: Wire<I, O, Aside = A>>(self) -> Attempt<I> {
        let input = self.input::<O, W>().ok();
        let mut attempt = self.attempt;
        if input.is_some() {
            attempt.kept = input;
        }
        attempt
    }

    /// The item failed here with `kind` (retried if the policy allows).
    fn fail<O, W: Wire<I, O, Aside = A>>(
        self,
        ctx: &RunCtx<I, O>,
        kind: ItemErrorKind,
        message: String,
        now: Instant,
    ) -> Outcome<I, O> {
        self.with_input::<O, W>()
            .end(ctx, Ran::Lost { kind, message }, now)
    }
}
