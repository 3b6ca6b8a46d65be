//! The [`Pipeline`] handle: start, watch, feed, stop.

use std::marker::PhantomData;
use std::sync::Arc;

use bergtalzug_actors::config::PipelineConfig;
use bergtalzug_actors::error::PipelineError;
use bergtalzug_actors::event::{ActorEvent, EventFilter, EventStream, forward_to_actor};
use bergtalzug_actors::item::{WorkItem, WorkItemResult};
use bergtalzug_actors::stats::PipelineStats;
use bergtalzug_actors::{PipelineMsg, PipelineRuntime, RunOutcome};
use ractor::{ActorCell, ActorRef};

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
    runtime: Arc<PipelineRuntime<T>>,
    _input: PhantomData<fn(T)>,
}

impl<T> Clone for Pipeline<T> {
    fn clone(&self) -> Self {
        Pipeline {
            runtime: self.runtime.clone(),
            _input: PhantomData,
        }
    }
}

impl<T: Send + 'static> std::fmt::Debug for Pipeline<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("name", &self.runtime.name())
            .field("running", &self.runtime.is_running())
            .field("finished", &self.runtime.is_finished())
            .finish()
    }
}

impl<T: Send + 'static> Pipeline<T> {
    pub(crate) fn new(runtime: PipelineRuntime<T>) -> Self {
        Pipeline {
            runtime: Arc::new(runtime),
            _input: PhantomData,
        }
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        self.runtime.name()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &PipelineConfig {
        self.runtime.config()
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
        self.runtime.wait().await
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
        self.runtime.wait_outcome().await
    }

    /// Starts the pipeline and returns once it is running. Calling it again
    /// does nothing.
    pub async fn start(&self) -> Result<(), PipelineError> {
        self.runtime.start(None).await.map(drop)
    }

    /// Starts the pipeline with its root actor linked under `supervisor`, and
    /// returns the root. The supervisor gets an `ActorTerminated` with the
    /// reason [`bergtalzug_actors::FINISHED`] when the pipeline finishes,
    /// and an `ActorFailed` if it fails. If the pipeline already runs, its
    /// root is returned as it is.
    pub async fn spawn_linked(
        &self,
        supervisor: ActorCell,
    ) -> Result<ActorRef<PipelineMsg<T>>, PipelineError> {
        self.runtime.start(Some(supervisor)).await
    }

    /// True between `start` and the end of the pipeline.
    pub fn is_running(&self) -> bool {
        self.runtime.is_running()
    }

    /// True once every item has its outcome (or the pipeline failed).
    pub fn is_finished(&self) -> bool {
        self.runtime.is_finished()
    }

    /// Waits until the pipeline has finished, without taking the results.
    #[cfg(feature = "progress")]
    pub(crate) async fn wait_finished(&self) {
        self.runtime.finished().await
    }

    /// A statistics snapshot; after the end, the final statistics.
    pub async fn stats(&self) -> Result<PipelineStats, PipelineError> {
        self.runtime.stats().await
    }

    /// Subscribes to the pipeline's events, from now until it finishes.
    /// Subscribe before `start` to see every event.
    ///
    /// Lossy: the pipeline never waits for this stream. When its buffer
    /// (4,096 events) is full its oldest events are dropped, counted in
    /// [`EventStream::dropped`], so a stream kept and never read cannot
    /// hold the pipeline back. For every terminal event, at the cost of
    /// waiting for the reader, see [`Pipeline::subscribe_lossless`]. See
    /// [`bergtalzug_actors::event`] for the delivery policy.
    #[track_caller]
    pub fn subscribe(&self) -> EventStream {
        self.runtime.subscribe(EventFilter::all())
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
        self.runtime.subscribe(EventFilter::all().lossless())
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
        self.runtime.subscribe(filter)
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
        forward_to_actor(self.runtime.subscribe(filter), actor)
    }

    /// Adds items to a running pipeline. Waits until the pipeline has room
    /// for all of them (backpressure); fails with
    /// [`PipelineError::InputClosed`] (none was admitted) once its source
    /// is exhausted or it is stopping. If the input closes while the items
    /// are being admitted, the first ones (in the order given) may already
    /// be in: the error is then [`PipelineError::PartlyAdmitted`], saying
    /// how many; those get their outcomes as usual and the rest were not
    /// admitted.
    pub async fn inject(&self, items: Vec<WorkItem<T>>) -> Result<(), PipelineError> {
        self.runtime.inject(items).await
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
    pub async fn stop(&self) -> Result<(), PipelineError> {
        self.runtime.stop().await
    }

    /// Graceful stop with a deadline: like [`Pipeline::stop`], but what has
    /// not finished when `deadline` has passed is aborted (ends
    /// `Cancelled`). Returns once every item has its outcome.
    pub async fn stop_within(&self, deadline: std::time::Duration) -> Result<(), PipelineError> {
        self.runtime.stop_within(deadline).await
    }

    /// Stops now: takes no more input and ends every item in the pipeline
    /// as cancelled (`ItemErrorKind::Cancelled`); returns once each has its
    /// outcome. Handlers already running on threads finish in the
    /// background; their results are discarded.
    pub async fn abort(&self) -> Result<(), PipelineError> {
        self.runtime.abort().await
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
