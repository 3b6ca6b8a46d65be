//! Ports: the narrow references the actors hold of one another, as traits
//! over the contract's data, with no actor imported here. Each is
//! implemented beside the receiving actor's message enum, so a reader can
//! follow any send to its receiver:
//!
//! | port | held by | implemented for (file) |
//! |---|---|---|
//! | [`Upstream`] | each stage | the source actor (`source_actor.rs`), the stage before (`stage/mod.rs`) |
//! | [`Outlet`] | the source actor, each stage but the last | the next stage (`stage/mod.rs`) |
//! | [`Reports`] | a stage's workers and runners | the stage (`stage/mod.rs`) |
//! | [`FailPipeline`] | each stage, a Process runner | the root (`root.rs`) |
//! | [`StallCheck`] | the monitor | each stage (`stage/mod.rs`) |
//! | [`StageControl`] | the root | each stage (`stage/mod.rs`) |
//! | [`Releases`] | the tracker | the source actor (`source_actor.rs`) |
//! | [`ReportFiled`] | the tracker | the root (`root.rs`) |
//!
//! Every port's method only sends: it never waits, and a receiver that has
//! stopped is ignored (the pipeline is then shutting down).

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorCell;

use crate::error::PipelineError;
use crate::item::{JobId, WorkItem};
use crate::outcome::WorkerReport;
use crate::source::Ack;

/// Asks the actor before this one for more items. Held by each stage.
pub(crate) trait Upstream: Send + Sync + 'static {
    /// Room for `n` more items.
    fn demand(&self, n: usize);
}

/// Where the items a stage finished (or the source admitted) go: the next
/// stage.
pub(crate) trait Outlet<T>: Send + Sync + 'static {
    /// Sends a batch; the receiver asked for at least this many.
    fn send(&self, items: Vec<WorkItem<T>>);
}

/// Where a worker's reports go: its stage.
pub(crate) trait Reports<I, O>: Send + Sync + 'static {
    /// Sends a report; a stage that is gone hands back the reports it did
    /// not take, this one among them, for their items to be dropped where
    /// their `Drop` is contained.
    fn report(&self, report: WorkerReport<I, O>) -> Result<(), Vec<WorkerReport<I, O>>>;
}

/// Fails the whole pipeline: the root aborts it, accounts for every item
/// and ends with the error.
pub(crate) trait FailPipeline: Send + Sync + 'static {
    fn fail(&self, error: PipelineError);
}

/// Asks a stage to report the items its workers have held `threshold` or
/// longer. Held by the monitor.
pub(crate) trait StallCheck: Send + Sync + 'static {
    fn check_stalls(&self, threshold: Duration);
}

/// What the root needs of a stage, whatever its types.
pub(crate) trait StageControl: Send + Sync + 'static {
    /// Where the stage asks for items; sent first.
    fn connect(&self, upstream: Arc<dyn Upstream>);
    /// Cancel everything held and everything that arrives.
    fn abort(&self);
    fn cell(&self) -> ActorCell;
    /// The stage's actors besides its supervisor, which the root
    /// supervises too: a splitter after it, a batcher in front of it.
    fn companions(&self) -> Vec<ActorCell> {
        Vec::new()
    }
    /// A port that sends demand to this stage (for the stage before it).
    fn demand_port(&self) -> Arc<dyn Upstream>;
    /// A port that asks this stage for its stalled items.
    fn stall_port(&self) -> Arc<dyn StallCheck>;
    /// A new rate limit (validated; `None`: none); `reply` once in force.
    fn set_rate_limit(
        &self,
        limit: Option<crate::config::RateLimit>,
        reply: ractor::RpcReplyPort<Result<(), PipelineError>>,
    );
    /// A new worker count (validated); `reply` once the stage took it.
    fn resize(&self, workers: usize, reply: ractor::RpcReplyPort<Result<(), PipelineError>>);
}

/// Tells the source that admitted items finished: how many, their job ids
/// (tracking on) and, when the source wants them, their acknowledgements.
/// Held by the tracker.
pub(crate) trait Releases: Send + Sync + 'static {
    fn released(&self, n: usize, ids: Vec<JobId>, acks: Vec<Ack>);
}

/// Tells the root that the tracker filed its report (every admitted item
/// has its outcome). Held by the tracker.
pub(crate) trait ReportFiled: Send + Sync + 'static {
    fn filed(&self);
}
