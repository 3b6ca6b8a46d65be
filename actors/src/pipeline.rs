//! The [`Pipeline`] handle: start, watch, feed, stop. It drives one
//! pipeline's actors: starts the root (which spawns the rest) and talks to
//! it, and reads what the actors publish in `shared` (stats, events, the
//! outcome) without asking them.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorRef};
use tokio::sync::Mutex as AsyncMutex;

use crate::config::{PipelineConfig, RateLimit};
use crate::error::PipelineError;
use crate::event::{ActorEvent, EventFilter, EventStream, forward_to_actor};
use crate::item::{WorkItem, WorkItemResult};
use crate::root::{PipelineActor, PipelineArgs, PipelineMsg, PipelineParts};
use crate::shared::Shared;
use crate::source_actor::SourceMsg;
use crate::stats::PipelineStats;

/// A built pipeline: a cheap, cloneable handle; every method takes `&self`.
///
/// `T` is the input type: what [`Pipeline::inject`] takes. A pipeline runs
/// once: it starts on [`Pipeline::start`] (or the first [`Pipeline::run`])
/// and ends when its input is exhausted and every item has its outcome, or
/// when it is stopped or aborted.
///
/// ```
/// use bergtalzug::prelude::*;
///
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = PipelineConfig::new("double", vec![StageConfig::new("double", ExecutionType::Async)])
///     .stats_interval(std::time::Duration::ZERO);
/// let pipeline = Pipeline::builder(config)?
///     .source(sources::iter(1..=100u64))
///     .async_stage("double", |item: WorkItem<u64>| async move { Ok(item.map(|n| n * 2)) })
///     .build()?;
/// let results = pipeline.run().await?;
/// assert_eq!(results.len(), 100);
/// assert!(results.iter().all(|r| r.success));
/// # Ok(()) }
/// ```
pub struct Pipeline<T> {
    inner: Arc<Inner<T>>,
}

/// What every handle of one pipeline shares. A pipeline runs once.
struct Inner<T> {
    shared: Arc<Shared>,
    /// What the builder assembled, until the start takes it.
    parts: Mutex<Option<PipelineParts<T>>>,
    /// Held while starting, so that only one caller starts the actors.
    starting: AsyncMutex<()>,
    /// Set (under `starting`) once a start began: a stop or abort that
    /// finds no root yet waits for that start instead of being lost.
    start_begun: AtomicBool,
    root: OnceLock<ActorRef<PipelineMsg<T>>>,
    /// The source actor, set by the root as it starts: `inject` goes to it
    /// straight, one hop fewer than through the root.
    source: Arc<OnceLock<ActorRef<SourceMsg<T>>>>,
    /// Fed only by `inject` (no source): with no handle left, nothing could
    /// feed or stop it, so dropping the last handle stops it.
    injected: bool,
    /// Set at the start of a pipeline fed only by `inject` and not embedded
    /// (`spawn_linked`, whose caller keeps the root's `ActorRef` and drives
    /// it through that): what `Drop` does, a graceful stop.
    stop_on_drop: OnceLock<Box<dyn Fn() + Send + Sync>>,
    _input: PhantomData<fn(T)>,
}

impl<T> Drop for Inner<T> {
    /// The last handle of a running pipeline fed only by `inject` is gone:
    /// nothing can inject into it or stop it any more, so it stops as
    /// [`Pipeline::stop`] would. What it admitted finishes and gets its
    /// callbacks; its actors end instead of idling for the rest of the
    /// program. A pipeline with a source runs on until the source ends.
    fn drop(&mut self) {
        if let Some(stop) = self.stop_on_drop.get()
            && !self.shared.completion.is_done()
        {
            stop();
        }
    }
}

/// A graceful stop: the input is marked closing at once (an `inject` after
/// it, on any task, is refused even before the root has closed the source),
/// then the root is told.
fn ask_to_stop<T: Send + 'static>(shared: &Shared, root: &ActorRef<PipelineMsg<T>>) {
    let _ = shared.closing.send_replace(true);
    let _ = root.cast(PipelineMsg::Stop);
}

impl<T> Clone for Pipeline<T> {
    fn clone(&self) -> Self {
        Pipeline {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Send + 'static> std::fmt::Debug for Pipeline<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("name", &self.name())
            .field("running", &self.is_running())
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl<T: Send + 'static> Pipeline<T> {
    /// A pipeline of validated, bound parts; nothing runs until `start`.
    /// Only the builder makes one.
    pub(crate) fn new(parts: PipelineParts<T>) -> Self {
        let injected = parts.source.source.is_none();
        Pipeline {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared::new(parts.config.clone())),
                parts: Mutex::new(Some(parts)),
                starting: AsyncMutex::new(()),
                start_begun: AtomicBool::new(false),
                root: OnceLock::new(),
                source: Arc::new(OnceLock::new()),
                injected,
                stop_on_drop: OnceLock::new(),
                _input: PhantomData,
            }),
        }
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &PipelineConfig {
        &self.inner.shared.config
    }

    /// Starts the pipeline if needed and waits until every item has its
    /// outcome. Returns the results (all of them, in the order they finished,
    /// when `retain_results` is on; none when it is off). Only the first
    /// caller gets the results; later calls return
    /// [`PipelineError::ResultsTaken`].
    ///
    /// When the pipeline fails after it started (its source panicked or
    /// gave up, a stage went over its restart budget), `run` returns the
    /// error and keeps the results of the items that did complete: take
    /// them with [`Pipeline::run_outcome`], then or instead.
    pub async fn run(&self) -> Result<Vec<WorkItemResult>, PipelineError> {
        self.start().await?;
        self.finished().await;
        self.shared().completion.take(self.name())
    }

    /// Like [`Pipeline::run`], but a failure does not throw the results
    /// away: returns every result kept together with the error, if any.
    ///
    /// ```
    /// # use bergtalzug::prelude::*;
    /// # async fn demo(pipeline: Pipeline<u64>) {
    /// let outcome = pipeline.run_outcome().await;
    /// if let Some(error) = &outcome.error {
    ///     eprintln!("{error}; {} items finished before it", outcome.results.len());
    /// }
    /// # }
    /// ```
    pub async fn run_outcome(&self) -> RunOutcome {
        if let Err(error) = self.start().await {
            return RunOutcome::from_error(error);
        }
        self.finished().await;
        let (results, error) = self.shared().completion.take_all(self.name());
        RunOutcome { results, error }
    }

    /// Starts the pipeline and returns once it is running. Calling it again
    /// does nothing.
    pub async fn start(&self) -> Result<(), PipelineError> {
        self.start_root(None).await.map(drop)
    }

    /// Starts the pipeline with its root actor linked under `supervisor`, and
    /// returns the root. The supervisor gets an `ActorTerminated` with the
    /// reason [`FINISHED`](crate::embed::FINISHED) when the pipeline finishes,
    /// and an `ActorFailed` if it fails. If the pipeline already runs, its
    /// root is returned as it is.
    pub async fn spawn_linked(
        &self,
        supervisor: ActorCell,
    ) -> Result<ActorRef<PipelineMsg<T>>, PipelineError> {
        self.start_root(Some(supervisor)).await
    }

    /// Starts the actors (under `supervisor` if given) and returns the root;
    /// on later calls, returns the root already started.
    async fn start_root(
        &self,
        supervisor: Option<ActorCell>,
    ) -> Result<ActorRef<PipelineMsg<T>>, PipelineError> {
        let inner = &*self.inner;
        let _starting = inner.starting.lock().await;
        if let Some(root) = inner.root.get() {
            return Ok(root.clone());
        }
        inner.start_begun.store(true, Ordering::Release);
        let parts = inner
            .parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| PipelineError::NotRunning(self.name().to_string()))?;
        let args = PipelineArgs::new(inner.shared.clone(), parts, inner.source.clone());
        let embedded = supervisor.is_some();
        let spawned = match supervisor {
            Some(supervisor) => {
                Actor::spawn_linked(None, PipelineActor::new(), args, supervisor).await
            }
            None => Actor::spawn(None, PipelineActor::new(), args).await,
        };
        let (root, _) = spawned.map_err(|e| {
            let error = PipelineError::Start {
                pipeline: self.name().to_string(),
                message: e.to_string(),
            };
            inner.shared.events.close();
            inner.shared.completion.fail(error.clone());
            error
        })?;
        if inner.injected && !embedded {
            let (root, shared) = (root.clone(), inner.shared.clone());
            let _ = inner.stop_on_drop.set(Box::new(move || {
                tracing::info!(target: "bergtalzug::pipeline",
                    pipeline = %shared.config.pipeline_name,
                    "the last handle of a pipeline fed by `inject` was dropped: stopping it (what it admitted finishes)"
                );
                ask_to_stop(&shared, &root);
            }));
        }
        let _ = inner.root.set(root.clone());
        Ok(root)
    }

    /// The input is closing (a stop or abort through this handle): marked
    /// here at once, so that an `inject` after it on any task is refused
    /// even before the root has closed the source.
    fn closing(&self) {
        let _ = self.shared().closing.send_replace(true);
    }

    fn root(&self) -> Result<ActorRef<PipelineMsg<T>>, PipelineError> {
        self.inner
            .root
            .get()
            .cloned()
            .ok_or_else(|| PipelineError::NotRunning(self.name().to_string()))
    }

    /// The root; if a start is under way, once it is done (so that a stop
    /// or abort sent while `start` is starting takes effect once the
    /// pipeline is up).
    async fn root_once_started(&self) -> Result<ActorRef<PipelineMsg<T>>, PipelineError> {
        let inner = &*self.inner;
        if inner.root.get().is_none() && inner.start_begun.load(Ordering::Acquire) {
            drop(inner.starting.lock().await);
            if inner.root.get().is_none() {
                // That start failed: say why.
                return Err(self
                    .shared()
                    .completion
                    .take_all(self.name())
                    .1
                    .unwrap_or_else(|| PipelineError::NotRunning(self.name().to_string())));
            }
        }
        self.root()
    }

    /// True between `start` and the end of the pipeline.
    pub fn is_running(&self) -> bool {
        self.root().is_ok() && !self.shared().completion.is_done()
    }

    /// True once every item has its outcome (or the pipeline failed).
    pub fn is_finished(&self) -> bool {
        self.shared().completion.is_done()
    }

    /// Waits until the pipeline has finished (every item has its outcome,
    /// or it failed), without taking the results: for a task that watches
    /// a pipeline another task runs. Returns at once if it has finished;
    /// waits forever for a pipeline never started.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only waits.
    pub async fn finished(&self) {
        self.shared().completion.wait().await;
    }

    /// A statistics snapshot; after the end, the final statistics.
    ///
    /// # Errors
    ///
    /// [`PipelineError::NotRunning`] before the pipeline started.
    pub async fn stats(&self) -> Result<PipelineStats, PipelineError> {
        if let Some(stats) = self.shared().completion.stats() {
            return Ok(stats);
        }
        self.root()?;
        Ok(self.shared().stats())
    }

    /// Subscribes to the pipeline's events, from now until it finishes.
    /// Subscribe before `start` to see every event.
    ///
    /// Lossy: the pipeline never waits for this stream. When its buffer
    /// (4,096 events) is full its oldest events are dropped, counted in
    /// [`EventStream::dropped`], so a stream kept and never read cannot
    /// hold the pipeline back. For every terminal event, at the cost of
    /// waiting for the reader, see [`Pipeline::subscribe_lossless`]. See
    /// [`crate::event`] for the delivery policy.
    #[track_caller]
    pub fn subscribe(&self) -> EventStream {
        self.shared().events.subscribe(EventFilter::all())
    }

    /// Subscribes to every event, losslessly: the pipeline waits for this
    /// stream when its buffer is full rather than drop a terminal or
    /// control event (lifecycle events are still dropped), so a reader
    /// that stops reading holds the pipeline back. That wait is logged as
    /// a warning naming the line that subscribed, after a second, and is
    /// sent to the other subscribers as `PipelineEvent::SubscriberStalled`;
    /// `abort` and `stop_within`'s deadline never wait for it. Same as
    /// `subscribe_filtered(EventFilter::all().lossless())`.
    #[track_caller]
    pub fn subscribe_lossless(&self) -> EventStream {
        self.shared()
            .events
            .subscribe(EventFilter::all().lossless())
    }

    /// Subscribes to the events `filter` matches; the others are never
    /// queued for this subscriber. Lossy unless the filter is
    /// [`EventFilter::lossless`] (see [`Pipeline::subscribe`]).
    ///
    /// ```
    /// # use bergtalzug::prelude::*;
    /// # fn demo(pipeline: &Pipeline<u64>) {
    /// let failures = pipeline.subscribe_filtered(EventFilter::failures());
    /// # }
    /// ```
    #[track_caller]
    pub fn subscribe_filtered(&self, filter: EventFilter) -> EventStream {
        self.shared().events.subscribe(filter)
    }

    /// Delivers the events `filter` matches to `actor`, as its own messages
    /// (`M: From<ActorEvent>`), until the pipeline finishes or the actor
    /// stops. Bounded in memory; lossy unless the filter is
    /// [`EventFilter::lossless`] (an actor that falls behind then holds the
    /// pipeline back): see [`forward_to_actor`].
    #[track_caller]
    pub fn subscribe_actor<M>(
        &self,
        actor: ActorRef<M>,
        filter: EventFilter,
    ) -> tokio::task::JoinHandle<()>
    where
        M: ractor::Message + From<ActorEvent>,
    {
        forward_to_actor(self.shared().events.subscribe(filter), actor)
    }

    /// Adds items to a running pipeline. Waits until the pipeline has room
    /// for all of them (backpressure); fails with
    /// [`PipelineError::InputClosed`] (none was admitted) once its source
    /// is exhausted or it is stopping. If the input closes while the items
    /// are being admitted, the first ones (in the order given) may already
    /// be in: the error is then [`PipelineError::PartlyAdmitted`], saying
    /// how many; those get their outcomes as usual and the rest were not
    /// admitted.
    ///
    /// # Errors
    ///
    /// [`PipelineError::NotRunning`] before the pipeline started;
    /// [`PipelineError::InputClosed`] and [`PipelineError::PartlyAdmitted`]
    /// as above.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future (a caller's timeout, a `select!` that took
    /// another branch) withdraws what it had not admitted yet: those items
    /// are dropped, never admitted, and the pipeline does not wait for
    /// room for them. The items admitted before it was dropped (in the
    /// order given, the first ones) stay in and get their outcomes as any
    /// other; [`PipelineEvent::ItemQueued`](crate::event::PipelineEvent::ItemQueued)
    /// events and the completion callbacks tell which. So a caller that
    /// times out and injects the same items again runs the admitted ones
    /// twice, unless they keep their job ids: with tracking on, an id
    /// still in the pipeline is refused as a duplicate
    /// ([`ItemErrorKind::DuplicateJobId`](crate::item::ItemErrorKind::DuplicateJobId)).
    pub async fn inject(&self, items: Vec<WorkItem<T>>) -> Result<(), PipelineError> {
        self.root()?;
        let source = self
            .inner
            .source
            .get()
            .expect("a started root has its source");
        let closed = || PipelineError::InputClosed(self.name().to_string());
        // A stop asked for through this handle (`closing` is set before the
        // root hears of it) comes before an injection that follows it.
        if self.is_finished() || *self.shared().closing.borrow() {
            return Err(closed());
        }
        match source
            .call(|reply| SourceMsg::Inject(items, reply), None)
            .await
        {
            Ok(ractor::rpc::CallResult::Success(result)) => result,
            _ => Err(closed()),
        }
    }

    /// Changes a stage's rate limit while the pipeline runs (`None`
    /// removes it), as Broadway's `update_rate_limiting`. In force at once
    /// when this returns: the new limiter starts with nothing saved (its
    /// first unit comes one period after the change), so a change lets no
    /// burst through by itself. Items a worker already holds still run.
    /// [`Pipeline::config`] keeps showing the limit it started with.
    ///
    /// ```
    /// # use bergtalzug::prelude::*;
    /// use bergtalzug::config::RateLimit;
    /// # async fn demo(pipeline: Pipeline<u64>) -> Result<(), PipelineError> {
    /// // The API said 429: slow down to 10 requests a second.
    /// pipeline.set_rate_limit("fetch", Some(RateLimit::per_second(10))).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`PipelineError::InvalidChange`] naming the stage and field (no such
    /// stage, a limit that validation refuses);
    /// [`PipelineError::NotRunning`] before the start or after the end.
    pub async fn set_rate_limit(
        &self,
        stage: &str,
        limit: Option<RateLimit>,
    ) -> Result<(), PipelineError> {
        let stage = stage.to_string();
        self.change(|reply| PipelineMsg::SetRateLimit {
            stage,
            limit,
            reply,
        })
        .await
    }

    /// Changes how many workers a stage has while the pipeline runs. It
    /// grows at once; when it shrinks, idle workers stop at once and busy
    /// ones finish the items they hold first (nothing is lost or run
    /// twice). [`StageStats::workers`](crate::stats::StageStats::workers)
    /// follows; [`Pipeline::config`] keeps the count it started with. The
    /// stage's room (`queue_size + workers`) follows the count, and so does
    /// the pipeline's window (what the source admits: the sum of the
    /// stages' rooms), so added workers get items and memory stays bounded
    /// by the counts in force.
    ///
    /// # Errors
    ///
    /// [`PipelineError::InvalidChange`] naming the stage and field (no
    /// such stage; 0 or more than [`MAX_WORKERS`](crate::config::MAX_WORKERS));
    /// [`PipelineError::NotRunning`] before the start or after the end.
    pub async fn set_workers(&self, stage: &str, workers: usize) -> Result<(), PipelineError> {
        let stage = stage.to_string();
        self.change(|reply| PipelineMsg::SetWorkers {
            stage,
            workers,
            reply,
        })
        .await
    }

    /// Asks the root for a change and waits for its answer.
    async fn change(
        &self,
        msg: impl FnOnce(ractor::RpcReplyPort<Result<(), PipelineError>>) -> PipelineMsg<T>,
    ) -> Result<(), PipelineError> {
        let root = self.root()?;
        let not_running = || PipelineError::NotRunning(self.name().to_string());
        if self.is_finished() {
            return Err(not_running());
        }
        match root.call(msg, None).await {
            Ok(ractor::rpc::CallResult::Success(result)) => result,
            _ => Err(not_running()),
        }
    }

    /// Graceful stop: takes no more input, lets every item in the pipeline
    /// reach its outcome, and returns when they have. `run` then returns the
    /// results.
    ///
    /// Called while [`Pipeline::start`] (or `run`) is still starting the
    /// pipeline, in another task, it waits for the start and then stops the
    /// pipeline once it is up (the source may have admitted a first batch
    /// by then; those items finish). Called before any start, it returns
    /// [`PipelineError::NotRunning`]. The same holds for `stop_within` and
    /// `abort`.
    ///
    /// # Errors
    ///
    /// [`PipelineError::NotRunning`] if it never started (or its start
    /// failed: then that error).
    ///
    /// # Cancel safety
    ///
    /// The stop is requested when the future is first polled; dropping it
    /// afterwards only stops the waiting.
    pub async fn stop(&self) -> Result<(), PipelineError> {
        let root = self.root_once_started().await?;
        ask_to_stop(self.shared(), &root);
        self.finished().await;
        Ok(())
    }

    /// Graceful stop with a deadline: like [`Pipeline::stop`], but what has
    /// not finished when `deadline` has passed is aborted (ends
    /// `Cancelled`). Returns once every item has its outcome.
    ///
    /// # Errors
    ///
    /// As [`Pipeline::stop`].
    ///
    /// # Cancel safety
    ///
    /// The stop is requested when the future is first polled; the abort at
    /// the deadline only if the future is still polled then.
    pub async fn stop_within(&self, deadline: Duration) -> Result<(), PipelineError> {
        let root = self.root_once_started().await?;
        ask_to_stop(self.shared(), &root);
        if tokio::time::timeout(deadline, self.finished())
            .await
            .is_err()
        {
            tracing::info!(target: "bergtalzug::pipeline", pipeline = %self.name(), "not drained within {deadline:?}: aborting the rest");
            self.shared().stop_waiting();
            let _ = root.cast(PipelineMsg::Abort);
            self.finished().await;
        }
        Ok(())
    }

    /// Stops now: takes no more input and ends every item in the pipeline
    /// as cancelled (`ItemErrorKind::Cancelled`); returns once each has its
    /// outcome. Handlers already running on threads finish in the
    /// background; their results are discarded.
    ///
    /// # Errors
    ///
    /// As [`Pipeline::stop`].
    ///
    /// # Cancel safety
    ///
    /// The abort is requested when the future is first polled; dropping it
    /// afterwards only stops the waiting.
    pub async fn abort(&self) -> Result<(), PipelineError> {
        let root = self.root_once_started().await?;
        self.closing();
        self.shared().stop_waiting();
        let _ = root.cast(PipelineMsg::Abort);
        self.finished().await;
        Ok(())
    }

    /// The usual Ctrl-C behaviour of a command-line program, in one call:
    /// the first Ctrl-C (SIGINT) stops the pipeline gracefully, as
    /// [`Pipeline::stop`] does, and says so on stderr; the second aborts it
    /// ([`Pipeline::abort`]: what is left ends `Cancelled`); a third, or one
    /// before the pipeline started or after it finished, exits the program
    /// with status 130, as Ctrl-C does without a handler. `run` returns the
    /// results as after `stop` or `abort`.
    ///
    /// Call it in a tokio runtime (it spawns a task), before `run` or
    /// `start`. It handles SIGINT for the whole program from then on (tokio
    /// cannot give the default back). Process stages' worker processes do
    /// not get the terminal's Ctrl-C at all (each runs in a process group of
    /// its own): the parent decides.
    ///
    /// ```no_run
    /// # use bergtalzug::prelude::*;
    /// # async fn f(pipeline: Pipeline<u64>) -> Result<(), PipelineError> {
    /// pipeline.stop_on_ctrl_c();
    /// let results = pipeline.run().await?; // Ctrl-C: stops, then returns
    /// # Ok(()) }
    /// ```
    pub fn stop_on_ctrl_c(&self) {
        let pipeline = self.clone();
        tokio::spawn(async move {
            let mut presses = 0u32;
            while tokio::signal::ctrl_c().await.is_ok() {
                presses += 1;
                let name = pipeline.name().to_string();
                let running = pipeline.is_running() && !pipeline.is_finished();
                if !running || presses > 2 {
                    std::process::exit(130);
                }
                let handle = pipeline.clone();
                if presses == 1 {
                    eprintln!(
                        "\n{name}: stopping: the items in the pipeline run to their end \
                         (Ctrl-C again to abort)"
                    );
                    tokio::spawn(async move { handle.stop().await });
                } else {
                    eprintln!(
                        "\n{name}: aborting: the items left end cancelled \
                         (Ctrl-C again to exit at once)"
                    );
                    tokio::spawn(async move { handle.abort().await });
                }
            }
        });
    }
}

/// How a run ended: every result kept and, if the pipeline failed, why.
///
/// Returned by `Pipeline::run_outcome`: unlike `run`, a failure does not
/// throw away the results of the items that did complete.
///
/// ```
/// # use bergtalzug::RunOutcome;
/// # fn report(outcome: RunOutcome) {
/// let ok = outcome.results.iter().filter(|r| r.success).count();
/// match &outcome.error {
///     None => println!("{ok} items done"),
///     Some(e) => eprintln!("failed after {ok} items: {e}"),
/// }
/// # }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct RunOutcome {
    /// The results kept (`retain_results` and `enable_tracking` on), in
    /// the order the items finished; empty for a later caller.
    pub results: Vec<WorkItemResult>,
    /// Why the pipeline failed; `None` if it ran to its end.
    pub error: Option<PipelineError>,
}

impl RunOutcome {
    /// No results, and `error`: a run that could not start.
    pub fn from_error(error: PipelineError) -> Self {
        RunOutcome {
            results: Vec::new(),
            error: Some(error),
        }
    }

    /// The results, or the error if there is one (what `run` returns).
    pub fn into_result(self) -> Result<Vec<WorkItemResult>, PipelineError> {
        match self.error {
            None => Ok(self.results),
            Some(error) => Err(error),
        }
    }
}
