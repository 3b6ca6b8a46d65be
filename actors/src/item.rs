//! Work items, their identity and metadata, and the result each one ends with.
//!
//! A [`WorkItem`] carries the user's `data`, a [`JobId`] and
//! [`WorkItemMetadata`]: when it was created, when it was queued, started and
//! completed in each stage (stamped by the pipeline when tracking is on), and
//! free-form `custom` metadata of the user's. Every item admitted ends in
//! exactly one [`WorkItemResult`].
//!
//! ```
//! use bergtalzug_actors::item::{JobId, WorkItem};
//!
//! let item = WorkItem::with_job_id("file-17", "https://example.com/17".to_string());
//! assert_eq!(item.job_id(), &JobId::from("file-17"));
//! let item = item.map(|url| url.len());     // same id and metadata, new data type
//! assert_eq!(item.data, 22);
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An item's identity: a random uuid v4 by default, or any string.
///
/// Cheap to clone (a `u128` or a shared pointer). A string that spells a
/// uuid is the same id as that uuid.
///
/// The pipeline makes ids of its own, which no id a user chooses can
/// equal: a split's child is its parent's id and its index
/// ([`derived_id`](crate::shape::derived_id), shown `<parent>/<index>`),
/// and a batch of a batch stage is its stage's name and number (shown
/// `batch:<stage>:<n>`). They print as those strings but are never equal
/// to a string id spelled the same, so a user id such as `"file-3/17"`
/// lives beside the child 17 of `file-3` without being taken for it. Read
/// back from text (serde, `From<&str>`), such an id is a plain string id.
///
/// ```
/// use bergtalzug_actors::item::JobId;
/// use bergtalzug_actors::shape::derived_id;
///
/// let child = derived_id(&JobId::from("file-3"), 17);
/// assert_eq!(child.to_string(), "file-3/17");
/// assert_ne!(child, JobId::from("file-3/17"), "a user's id is another id");
/// assert_eq!(child.derived_from(), Some((&JobId::from("file-3"), 17)));
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(Repr);

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Repr {
    /// A uuid as its two halves, big-endian (`Uuid::as_u64_pair`: the
    /// order is the uuid's). Aligned words, where the `Uuid`'s 16 bytes sat
    /// after the tag unaligned: every clone was an unaligned copy that the
    /// load after it had to wait for (`perf annotate` of the source's admit).
    Uuid([u64; 2]),
    Name(Arc<str>),
    /// A split's child: its parent's id and its index.
    Derived(Arc<(JobId, u64)>),
    /// A batch: its stage's name and its number there.
    Batch(Arc<(Arc<str>, u64)>),
}

impl JobId {
    /// What a spent attempt holds once its id went to its outcome (the nil
    /// uuid, which `random` never makes).
    pub(crate) const SPENT: JobId = JobId(Repr::Uuid([0, 0]));

    /// A new random (v4) id.
    pub fn random() -> Self {
        JobId::from(Uuid::new_v4())
    }

    /// The id as a uuid, when it is one.
    pub fn as_uuid(&self) -> Option<Uuid> {
        match &self.0 {
            Repr::Uuid([high, low]) => Some(Uuid::from_u64_pair(*high, *low)),
            Repr::Name(_) | Repr::Derived(_) | Repr::Batch(_) => None,
        }
    }

    /// The parent's id and this child's index, when a split made this id
    /// ([`derived_id`](crate::shape::derived_id)).
    pub fn derived_from(&self) -> Option<(&JobId, u64)> {
        match &self.0 {
            Repr::Derived(d) => Some((&d.0, d.1)),
            Repr::Uuid(_) | Repr::Name(_) | Repr::Batch(_) => None,
        }
    }

    /// The id of the `index`th child of `parent`.
    pub(crate) fn derived(parent: &JobId, index: u64) -> JobId {
        JobId(Repr::Derived(Arc::new((parent.clone(), index))))
    }

    /// The id of the `n`th batch a batcher of stage `stage` made.
    pub(crate) fn batch(stage: &Arc<str>, n: u64) -> JobId {
        JobId(Repr::Batch(Arc::new((stage.clone(), n))))
    }
}

impl From<Uuid> for JobId {
    fn from(u: Uuid) -> Self {
        let (high, low) = u.as_u64_pair();
        JobId(Repr::Uuid([high, low]))
    }
}

impl From<&str> for JobId {
    fn from(s: &str) -> Self {
        match s.len() {
            32 | 36 | 38 | 45 => match Uuid::try_parse(s) {
                Ok(u) => JobId::from(u),
                Err(_) => JobId(Repr::Name(s.into())),
            },
            _ => JobId(Repr::Name(s.into())),
        }
    }
}

impl From<String> for JobId {
    fn from(s: String) -> Self {
        JobId::from(s.as_str())
    }
}

impl From<&String> for JobId {
    fn from(s: &String) -> Self {
        JobId::from(s.as_str())
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Uuid([high, low]) => fmt::Display::fmt(&Uuid::from_u64_pair(*high, *low), f),
            Repr::Name(n) => f.write_str(n),
            Repr::Derived(d) => write!(f, "{}/{}", d.0, d.1),
            Repr::Batch(b) => write!(f, "batch:{}:{}", b.0, b.1),
        }
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

impl Serialize for JobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(JobId::from(s.as_ref()))
    }
}

/// The names of a pipeline's stages, shared by every item's metadata: a
/// thin pointer, one word in every retained result.
pub(crate) type StageNames = Arc<NameList>;

/// The stage names behind [`StageNames`].
#[derive(Debug)]
pub(crate) struct NameList(Box<[Arc<str>]>);

impl std::ops::Deref for NameList {
    type Target = [Arc<str>];

    fn deref(&self) -> &[Arc<str>] {
        &self.0
    }
}

impl FromIterator<Arc<str>> for NameList {
    fn from_iter<It: IntoIterator<Item = Arc<str>>>(iter: It) -> Self {
        NameList(iter.into_iter().collect())
    }
}

/// When an item entered, started and left one stage, as
/// [`WorkItemMetadata::stages`] and [`WorkItemMetadata::stage`] give them.
///
/// A view made when asked for: what every retained result keeps per stage
/// is 28 bytes of nanoseconds after the item's `created`. When the attempt
/// now running began is the attempt's, not the item's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageTimes {
    stage: u16,
    attempts: u32,
    queued: Instant,
    started: Option<Instant>,
    completed: Option<Instant>,
    handler: Duration,
}

impl StageTimes {
    /// The stage's position in the pipeline, from 0.
    pub fn stage_index(&self) -> usize {
        self.stage as usize
    }

    /// How many times the stage ran its handler on the item: more than 1
    /// when it was retried.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// When the item entered the stage's queue.
    pub fn queued(&self) -> Instant {
        self.queued
    }

    /// When a worker first started the handler on it.
    pub fn started(&self) -> Option<Instant> {
        self.started
    }

    /// When the handler returned (or failed).
    pub fn completed(&self) -> Option<Instant> {
        self.completed
    }

    /// Time spent waiting in the stage's queue.
    pub fn queue_wait(&self) -> Option<Duration> {
        Some(self.started?.saturating_duration_since(self.queued))
    }

    /// Time spent in the stage from the first attempt's start to the last
    /// one's end: the handler's time plus, after a failed attempt, the retry
    /// backoff and the wait in the queue again ([`retry_wait`](Self::retry_wait)).
    pub fn duration(&self) -> Option<Duration> {
        Some(self.completed?.saturating_duration_since(self.started?))
    }

    /// How long the handler ran on the item, summed over its attempts
    /// (waits between them excluded); `None` until an attempt ended. An
    /// attempt given up at the stage's timeout counts as the timeout.
    pub fn handler_duration(&self) -> Option<Duration> {
        self.completed.map(|_| self.handler)
    }

    /// The time between attempts: retry backoff and the wait in the queue
    /// again. Zero when the first attempt was the last.
    pub fn retry_wait(&self) -> Option<Duration> {
        Some(self.duration()?.saturating_sub(self.handler))
    }
}

/// A stage's times as every retained result keeps them: nanoseconds after
/// the item's `created`, in 48 bits each (78 hours; later saturates), 28
/// bytes in all (four `Instant`s and a `Duration` took 88).
#[derive(Clone, Copy)]
pub(crate) struct Stamps {
    /// When it was queued.
    queued: U48,
    /// 0 for none, else 1 + when the first attempt began.
    started: U48,
    /// 0 for none, else 1 + when the last attempt ended.
    completed: U48,
    /// The handler's time, summed over the attempts that ended.
    handler: U48,
    /// Handler runs on the item in this stage, saturating.
    attempts: u16,
    /// The stage's position in the pipeline.
    pub(crate) stage: u16,
}

/// How many stages' times an item holds without an allocation of their
/// own (more spill to the heap, as a `Vec` would).
pub(crate) const INLINE_STAGES: usize = 4;

/// An item's stage times, in order: inline up to [`INLINE_STAGES`].
pub(crate) type StageStamps = smallvec::SmallVec<[Stamps; INLINE_STAGES]>;

/// An unsigned 48-bit number in three `u16`s (alignment 2, so four of them
/// and two `u16`s pack into 28 bytes).
#[derive(Clone, Copy, Default)]
struct U48([u16; 3]);

impl U48 {
    const MAX: u64 = (1 << 48) - 1;

    #[inline]
    fn new(n: u64) -> Self {
        let n = n.min(Self::MAX);
        U48([n as u16, (n >> 16) as u16, (n >> 32) as u16])
    }

    #[inline]
    fn get(self) -> u64 {
        let [a, b, c] = self.0;
        u64::from(a) | (u64::from(b) << 16) | (u64::from(c) << 32)
    }
}

/// When an attempt began, as its stage's times count it
/// ([`Stamps::attempt_begins`]): nanoseconds after `created`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttemptStart(u64);

/// Shown as what they are: durations after the item's `created` (the
/// `Instant`s are [`StageTimes`]'s, which needs `created` to make them).
impl fmt::Debug for Stamps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let some = |n: U48| (n.get() != 0).then(|| Duration::from_nanos(n.get() - 1));
        f.debug_struct("Stamps (after created)")
            .field("stage", &self.stage)
            .field("attempts", &self.attempts)
            .field("queued", &Duration::from_nanos(self.queued.get()))
            .field("started", &some(self.started))
            .field("completed", &some(self.completed))
            .field("handler", &Duration::from_nanos(self.handler.get()))
            .finish()
    }
}

impl Stamps {
    /// The times of stage `stage` for an item queued there `at` (both in
    /// nanoseconds after the item's `created`; see [`since`]).
    #[inline]
    pub(crate) fn queued_at(stage: u16, at: u64) -> Self {
        Stamps {
            queued: U48::new(at),
            started: U48::default(),
            completed: U48::default(),
            handler: U48::default(),
            attempts: 0,
            stage,
        }
    }

    /// An attempt starts `at`: the stage's start, if it is the first (or
    /// none was stamped yet). The attempt keeps what this returns for
    /// [`attempt_ends`](Self::attempt_ends).
    #[inline]
    pub(crate) fn attempt_begins(&mut self, at: u64, first: bool) -> AttemptStart {
        if first || self.started.get() == 0 {
            self.started = U48::new(at.saturating_add(1));
        }
        AttemptStart(at)
    }

    /// The attempt that `began` (if it was stamped) ended `at`: its time is
    /// added to the handler's.
    #[inline]
    pub(crate) fn attempt_ends(&mut self, began: Option<AttemptStart>, at: u64) {
        self.completed = U48::new(at.saturating_add(1));
        if let Some(AttemptStart(began)) = began {
            let ns = at.saturating_sub(began);
            self.handler = U48::new(self.handler.get().saturating_add(ns));
        }
    }

    /// Counts the attempts made in the stage (saturating at 65,535).
    #[inline]
    pub(crate) fn set_attempts(&mut self, attempts: u32) {
        self.attempts = u16::try_from(attempts).unwrap_or(u16::MAX);
    }

    /// Nanoseconds spent waiting in the stage's queue (no `Instant`
    /// arithmetic: stats read this for every result).
    #[inline]
    pub(crate) fn queue_wait_ns(&self) -> Option<u64> {
        let started = self.started.get().checked_sub(1)?;
        Some(started.saturating_sub(self.queued.get()))
    }

    /// How many nanoseconds the handler ran, once an attempt ended.
    #[inline]
    pub(crate) fn handler_ns(&self) -> Option<u64> {
        (self.completed.get() != 0).then(|| self.handler.get())
    }

    /// The public view, for an item created at `created`.
    fn view(&self, created: Instant) -> StageTimes {
        let at = |ns: u64| created + Duration::from_nanos(ns);
        let some = |n: U48| n.get().checked_sub(1).map(at);
        StageTimes {
            stage: self.stage,
            attempts: u32::from(self.attempts),
            queued: at(self.queued.get()),
            started: some(self.started),
            completed: some(self.completed),
            handler: Duration::from_nanos(self.handler.get()),
        }
    }
}

/// Nanoseconds from `base` (an item's `created`, in [`epoch_ns`]) to
/// `now`: what [`Stamps`] are counted in. A time before it reads as 0.
#[inline]
pub(crate) fn since(base: u64, now: Instant) -> u64 {
    epoch_ns(now).saturating_sub(base)
}

/// `t` as nanoseconds after the process's clock epoch (a day before the
/// clock was first read, so that another clock's earlier readings, such as
/// tokio's paused one, are after it too).
///
/// The conversion (an `Instant` subtraction, about 55 instructions) is
/// remembered for the thread's last reading: with tracking on a worker
/// converts each reading twice, as the end of one item and the start of
/// the next, and the last stage stamps a whole batch of results with one
/// reading (9 conversions per item of a 4-stage pipeline, 4 of them
/// different).
#[inline]
pub(crate) fn epoch_ns(t: Instant) -> u64 {
    thread_local! {
        static LAST: std::cell::Cell<Option<(Instant, u64)>> = const { std::cell::Cell::new(None) };
    }
    LAST.with(|last| match last.get() {
        Some((at, ns)) if at == t => ns,
        _ => {
            let ns = nanos(t.saturating_duration_since(epoch()));
            last.set(Some((t, ns)));
            ns
        }
    })
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(Duration::from_secs(86_400)).unwrap_or(now)
    })
}

/// The `Instant` `ns` nanoseconds after the epoch.
fn from_epoch(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

/// `d` in nanoseconds, saturating (in `u64`: cheaper than `as_nanos`'s `u128`).
#[inline]
fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

/// What the pipeline knows about an item besides its data.
///
/// Stage times are stamped by the pipeline when `enable_tracking` is on; a
/// handler sees `created` and `custom`, and its changes to `custom` travel
/// on with the item.
// In this order (`repr(C)`): what every stage reads and writes of every
// item (with its job id before it in the `Head`: 64 bytes) comes first, so
// that a stage on the other core touches one or two cache lines of the
// head an upstream stage wrote, not the four or five it spans; the stage
// times and names are only touched with tracking on.
#[derive(Clone)]
#[repr(C)]
pub struct WorkItemMetadata {
    /// When it was created, in nanoseconds after the epoch ([`epoch_ns`]).
    created: u64,
    /// Attempts made in the stage the item is in (or ended in).
    pub(crate) attempts: u32,
    /// The item's place in the input order of the stage it is in (set as
    /// the stage receives it), modulo 2^32 (the stage holds fewer items
    /// than that): what ordered output and key lanes go by.
    pub(crate) seq: u32,
    /// Free-form metadata of the user's; travels with the item from stage to stage.
    pub custom: BTreeMap<String, serde_json::Value>,
    /// Set when the item is admitted with tracking on.
    pub(crate) names: Option<StageNames>,
    /// When it reached its outcome, in nanoseconds after the epoch.
    finished: Option<std::num::NonZeroU64>,
    /// Held in the metadata for up to [`INLINE_STAGES`] stages: no
    /// allocation per item for the stage times of a short pipeline.
    pub(crate) stages: StageStamps,
}

impl fmt::Debug for WorkItemMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkItemMetadata")
            .field("created", &self.created())
            .field("stages", &self.stages)
            .field("finished", &self.finished())
            .field("attempts", &self.attempts)
            .field("custom", &self.custom)
            .finish()
    }
}

impl Default for WorkItemMetadata {
    fn default() -> Self {
        WorkItemMetadata::created_at(epoch_ns(crate::clock::now()))
    }
}

impl WorkItemMetadata {
    /// The metadata of an item created at `created` ([`epoch_ns`]).
    fn created_at(created: u64) -> Self {
        WorkItemMetadata {
            created,
            names: None,
            stages: StageStamps::new(),
            finished: None,
            attempts: 0,
            seq: 0,
            custom: BTreeMap::new(),
        }
    }
}

impl WorkItemMetadata {
    /// When the item was created.
    pub fn created(&self) -> Instant {
        from_epoch(self.created)
    }

    /// When the item was created, as the stage times count ([`since`]).
    #[inline]
    pub(crate) fn created_ns(&self) -> u64 {
        self.created
    }

    #[inline]
    pub(crate) fn set_created_ns(&mut self, created: u64) {
        self.created = created;
    }

    /// How many times the current stage has run its handler on the item,
    /// this run included: 1 on a first attempt, 2 on the first retry. In a
    /// result, the attempts of the stage the item ended in.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// When the item reached its outcome (the seed's `completed` key).
    pub fn finished(&self) -> Option<Instant> {
        self.finished.map(|ns| from_epoch(ns.get()))
    }

    /// Stamps the outcome's time (`None`: none, as with tracking off).
    #[inline]
    pub(crate) fn set_finished(&mut self, at: Option<Instant>) {
        // The epoch is a day before the clock was first read: never 0.
        self.finished = at.and_then(|t| std::num::NonZeroU64::new(epoch_ns(t).max(1)));
    }

    /// The name and times of every stage the item entered, in order.
    pub fn stages(&self) -> impl Iterator<Item = (&str, StageTimes)> {
        let created = self.created();
        self.stages.iter().filter_map(move |t| {
            let name = self.names.as_ref()?.get(t.stage as usize)?;
            Some((&**name, t.view(created)))
        })
    }

    /// The times of the stage called `stage`, if the item entered it.
    pub fn stage(&self, stage: &str) -> Option<StageTimes> {
        let index = self.names.as_ref()?.iter().position(|n| &**n == stage)?;
        let times = self.stages.iter().find(|t| t.stage as usize == index)?;
        Some(times.view(self.created()))
    }

    /// How long the stage's handler took for this item, summed over its
    /// attempts: retry backoff and the wait in the queue between attempts
    /// are not counted (see [`StageTimes::retry_wait`]; first start to last
    /// end is [`StageTimes::duration`]). The seed's `get_stage_duration`.
    pub fn stage_duration(&self, stage: &str) -> Option<Duration> {
        self.stage(stage)?.handler_duration()
    }

    /// How long the item waited in the stage's queue before a worker took it.
    pub fn queue_wait(&self, stage: &str) -> Option<Duration> {
        self.stage(stage)?.queue_wait()
    }

    /// Created to finished.
    pub fn total_duration(&self) -> Option<Duration> {
        self.total_ns().map(Duration::from_nanos)
    }

    /// [`total_duration`](Self::total_duration) in nanoseconds.
    #[inline]
    pub(crate) fn total_ns(&self) -> Option<u64> {
        let finished = self.finished?.get();
        Some(finished.saturating_sub(self.created))
    }
}

/// A unit of work: an id, the user's data and metadata.
///
/// The id and metadata sit behind one pointer, allocated once when the item
/// is made and kept through every stage (also by [`map`](Self::map)): an
/// item moves from queue to worker to the next stage as the size of its data
/// plus one word, whatever its metadata holds.
#[derive(Clone)]
pub struct WorkItem<T> {
    /// The user's data; each stage's handler may change its type.
    pub data: T,
    pub(crate) head: Box<Head>,
}

/// An item's id and metadata: what travels with its data. The job id
/// first (`repr(C)`): see [`WorkItemMetadata`]'s order.
#[derive(Debug, Clone)]
#[repr(C)]
pub(crate) struct Head {
    pub(crate) job_id: JobId,
    pub(crate) metadata: WorkItemMetadata,
}

impl<T: fmt::Debug> fmt::Debug for WorkItem<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkItem")
            .field("job_id", &self.head.job_id)
            .field("data", &self.data)
            .field("metadata", &self.head.metadata)
            .finish()
    }
}

impl<T> WorkItem<T> {
    /// A new item with a random (uuid v4) job id.
    pub fn new(data: T) -> Self {
        WorkItem::with_job_id(JobId::random(), data)
    }

    /// New items, one for each element of `data`, each with a random
    /// (uuid v4) job id, all created at one reading of the clock: for a
    /// source making many items at once, which costs one clock reading
    /// rather than one per item (`bergtalzug::sources::iter` does this).
    ///
    /// ```
    /// use bergtalzug_actors::item::WorkItem;
    ///
    /// let items = WorkItem::many(1..=3u32);
    /// assert_eq!(items.iter().map(|i| i.data).collect::<Vec<_>>(), [1, 2, 3]);
    /// assert_ne!(items[0].job_id(), items[1].job_id());
    /// assert_eq!(items[0].metadata().created(), items[2].metadata().created());
    /// ```
    pub fn many(data: impl IntoIterator<Item = T>) -> Vec<Self> {
        let created = epoch_ns(crate::clock::now());
        data.into_iter()
            .map(|data| {
                WorkItem::from_parts(JobId::random(), data, WorkItemMetadata::created_at(created))
            })
            .collect()
    }

    /// A new item with the given job id.
    pub fn with_job_id(job_id: impl Into<JobId>, data: T) -> Self {
        WorkItem::from_parts(job_id.into(), data, WorkItemMetadata::default())
    }

    /// An item of these parts (the inverse of [`into_parts`](Self::into_parts)).
    pub(crate) fn from_parts(job_id: JobId, data: T, metadata: WorkItemMetadata) -> Self {
        WorkItem {
            data,
            head: Box::new(Head { job_id, metadata }),
        }
    }

    /// The item's identity; it stays the same through every stage.
    pub fn job_id(&self) -> &JobId {
        &self.head.job_id
    }

    /// The item's metadata.
    pub fn metadata(&self) -> &WorkItemMetadata {
        &self.head.metadata
    }

    /// The item's metadata, to change `custom`.
    pub fn metadata_mut(&mut self) -> &mut WorkItemMetadata {
        &mut self.head.metadata
    }

    /// The same item (id and metadata) with new data.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> WorkItem<U> {
        WorkItem {
            data: f(self.data),
            head: self.head,
        }
    }

    /// Splits the item into its id, data and metadata.
    pub fn into_parts(self) -> (JobId, T, WorkItemMetadata) {
        let Head { job_id, metadata } = *self.head;
        (job_id, self.data, metadata)
    }
}

/// Marks a handler's error as not worth retrying: the item fails at once,
/// whatever the stage's [`RetryPolicy`](crate::config::RetryPolicy).
///
/// ```
/// use bergtalzug_actors::item::{Permanent, WorkItem};
///
/// fn parse(item: WorkItem<String>) -> anyhow::Result<WorkItem<u64>> {
///     let n = item.data.parse::<u64>().map_err(|e| Permanent(e.into()))?;
///     Ok(item.map(|_| n))
/// }
/// let err = parse(WorkItem::new("x".to_string())).unwrap_err();
/// assert!(Permanent::is(&err));
/// ```
#[derive(Debug)]
pub struct Permanent(pub anyhow::Error);

impl Permanent {
    /// Whether `error` (or any error in its chain) was marked permanent.
    pub fn is(error: &anyhow::Error) -> bool {
        error.chain().any(|e| e.is::<Permanent>())
    }
}

impl fmt::Display for Permanent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The alternate form keeps the wrapped error's whole chain.
        if f.alternate() {
            write!(f, "{:#}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl std::error::Error for Permanent {}

/// Why an item failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ItemErrorKind {
    /// The handler returned an error.
    Failed,
    /// The handler panicked; its worker was replaced.
    Panicked,
    /// The handler ran past the stage's timeout.
    TimedOut,
    /// The pipeline was aborted before the item finished.
    Cancelled,
    /// Another item with the same job id was still in the pipeline; this one
    /// was not admitted.
    DuplicateJobId,
    /// The worker running the item died without reporting it. (Items the
    /// worker had been given and had not started run on another worker.)
    WorkerLost,
    /// The worker process running the item died (abort, segfault, killed);
    /// the message gives the exit status or signal. Also when it sent a
    /// corrupt reply (and was killed) or never started serving. Process
    /// stages only.
    ProcessDied,
}

impl fmt::Display for ItemErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ItemErrorKind::Failed => "failed",
            ItemErrorKind::Panicked => "panicked",
            ItemErrorKind::TimedOut => "timed out",
            ItemErrorKind::Cancelled => "cancelled",
            ItemErrorKind::DuplicateJobId => "duplicate job id",
            ItemErrorKind::WorkerLost => "worker lost",
            ItemErrorKind::ProcessDied => "process died",
        })
    }
}

/// How and where an item failed.
///
/// Shown as a sentence: `failed in stage `parse` after 3 attempts: <the
/// error chain>`, or `refused by the source: job id 7 is already in the
/// pipeline; not admitted` for a duplicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub struct ItemError {
    /// The stage the item failed in (`source` when it was never admitted).
    pub stage: String,
    /// What went wrong.
    pub kind: ItemErrorKind,
    /// The handler's error chain (`{:#}`) or the panic message.
    pub message: String,
    /// How many times the stage ran its handler on the item.
    pub attempts: u32,
}

impl fmt::Display for ItemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (stage, message) = (&self.stage, &self.message);
        if self.kind == ItemErrorKind::DuplicateJobId {
            return match stage.as_str() {
                "source" => write!(f, "refused by the source: {message}"),
                _ => write!(f, "refused by stage `{stage}`: {message}"),
            };
        }
        write!(f, "{} in stage `{stage}`", self.kind)?;
        match self.attempts {
            0 => {}
            1 => f.write_str(" after 1 attempt")?,
            n => write!(f, " after {n} attempts")?,
        }
        write!(f, ": {message}")
    }
}

impl ItemError {
    /// An error of `kind` in `stage`.
    pub fn new(stage: impl Into<String>, kind: ItemErrorKind, message: impl Into<String>) -> Self {
        ItemError {
            stage: stage.into(),
            kind,
            message: message.into(),
            attempts: 1,
        }
    }
}

/// The outcome of one item: completed, failed or cancelled.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkItemResult {
    /// The item's id.
    pub job_id: JobId,
    /// True when the item went through every stage.
    pub success: bool,
    /// Why it did not, when it did not (boxed: most results have none,
    /// and every retained result pays for this field).
    pub error: Option<Box<ItemError>>,
    /// Its metadata: times per stage, custom metadata.
    pub metadata: WorkItemMetadata,
}

impl WorkItemResult {
    /// The result of an item that went through every stage; its data is
    /// dropped here, and a panic in its `Drop` is contained (the item
    /// completed all the same).
    ///
    /// The finish time is written in the head where it is, which is then
    /// moved once, into the result (taking the metadata out of the box
    /// first was two copies of it per item).
    #[inline]
    pub(crate) fn completed<T>(item: WorkItem<T>, now: Option<Instant>) -> Self {
        let WorkItem { data, mut head } = item;
        crate::contain::drop_logged(data, || format!("the output of item {}", head.job_id));
        head.metadata.set_finished(now);
        let Head { job_id, metadata } = *head;
        WorkItemResult {
            job_id,
            success: true,
            error: None,
            metadata,
        }
    }

    pub(crate) fn failed(job_id: JobId, mut metadata: WorkItemMetadata, error: ItemError) -> Self {
        if metadata.finished.is_none() {
            metadata.set_finished(Some(crate::clock::now()));
        }
        WorkItemResult {
            job_id,
            success: false,
            error: Some(Box::new(error)),
            metadata,
        }
    }

    /// Created to finished, when tracking was on.
    pub fn total_duration(&self) -> Option<Duration> {
        self.metadata.total_duration()
    }

    /// True when the item was cancelled by an abort.
    pub fn is_cancelled(&self) -> bool {
        matches!(&self.error, Some(e) if e.kind == ItemErrorKind::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_conversion_to_epoch_nanoseconds_is_the_same_as_a_new_one() {
        let t1 = Instant::now();
        let t2 = t1 + Duration::from_nanos(1_234_567);
        let first = epoch_ns(t1);
        // Remembered, then displaced, then converted again.
        assert_eq!(epoch_ns(t1), first);
        assert_eq!(epoch_ns(t2) - first, 1_234_567);
        assert_eq!(epoch_ns(t1), first);
        assert_eq!(epoch_ns(t2), first + 1_234_567);
        // Another thread remembers its own.
        let other = std::thread::spawn(move || (epoch_ns(t2), epoch_ns(t1)))
            .join()
            .unwrap();
        assert_eq!(other, (first + 1_234_567, first));
    }

    #[test]
    fn job_ids_are_canonical() {
        let u = Uuid::new_v4();
        assert_eq!(JobId::from(u.to_string()), JobId::from(u));
        assert_eq!(JobId::from("file-17").to_string(), "file-17");
        assert_ne!(JobId::random(), JobId::random());
        let json = serde_json::to_string(&JobId::from("a")).unwrap();
        assert_eq!(json, "\"a\"");
        assert_eq!(
            serde_json::from_str::<JobId>(&json).unwrap(),
            JobId::from("a")
        );
    }

    #[test]
    fn item_errors_read_as_sentences() {
        let mut e = ItemError::new("parse", ItemErrorKind::Failed, "bad json");
        assert_eq!(
            e.to_string(),
            "failed in stage `parse` after 1 attempt: bad json"
        );
        e.attempts = 3;
        e.kind = ItemErrorKind::TimedOut;
        assert_eq!(
            e.to_string(),
            "timed out in stage `parse` after 3 attempts: bad json"
        );
        e.attempts = 0;
        e.kind = ItemErrorKind::Cancelled;
        assert_eq!(e.to_string(), "cancelled in stage `parse`: bad json");
        let dup = ItemError::new(
            "source",
            ItemErrorKind::DuplicateJobId,
            "job id 7 is already in the pipeline; not admitted",
        );
        assert_eq!(
            dup.to_string(),
            "refused by the source: job id 7 is already in the pipeline; not admitted"
        );
    }

    #[test]
    fn map_keeps_identity_and_metadata() {
        let mut item = WorkItem::with_job_id("x", 1);
        item.metadata_mut().custom.insert("k".into(), 2.into());
        let mapped = item.map(|d| d.to_string());
        assert_eq!(mapped.job_id(), &JobId::from("x"));
        assert_eq!(mapped.metadata().custom["k"], 2);
        assert_eq!(mapped.data, "1");
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// An item moves from queue to worker to stage several times per
    /// stage: its id and metadata stay behind one pointer, so a move of a
    /// word-sized item is two words, not a `memcpy` of the metadata.
    /// What a stage's times read back as, for an item created at `created`.
    fn view(times: &Stamps, created: u64) -> StageTimes {
        times.view(from_epoch(created))
    }

    #[test]
    fn stage_times_are_kept_in_28_bytes_and_read_back_exactly() {
        assert_eq!(std::mem::size_of::<Stamps>(), 28);
        assert_eq!(std::mem::align_of::<Stamps>(), 2);
        let created = epoch_ns(Instant::now());
        let at = |ns: u64| from_epoch(created + ns);
        // Queued 2 us after it was created.
        let mut times = Stamps::queued_at(2, 2_000);
        let v = view(&times, created);
        assert_eq!(
            (v.queued(), v.started(), v.completed()),
            (at(2_000), None, None)
        );
        assert_eq!(v.handler_duration(), None);
        let began = times.attempt_begins(3_500, false);
        times.attempt_ends(Some(began), 10_500);
        // A retry: the stage's start stays the first attempt's.
        let began = times.attempt_begins(3_003_500, false);
        times.attempt_ends(Some(began), 3_008_500);
        times.set_attempts(2);
        let v = view(&times, created);
        assert_eq!(v.stage_index(), 2);
        assert_eq!(v.attempts(), 2);
        assert_eq!(v.started(), Some(at(3_500)));
        assert_eq!(v.completed(), Some(at(3_008_500)));
        assert_eq!(v.queue_wait(), Some(Duration::from_nanos(1_500)));
        assert_eq!(times.queue_wait_ns(), Some(1_500));
        assert_eq!(v.handler_duration(), Some(Duration::from_micros(12)));
        assert_eq!(times.handler_ns(), Some(12_000));
        assert_eq!(v.duration(), Some(Duration::from_micros(3_005)));
        assert_eq!(v.retry_wait(), Some(Duration::from_micros(3_005 - 12)));
        // A time before the item's creation (another clock) reads as its
        // creation, not as none.
        times.attempt_begins(since(created, at(0) - Duration::from_millis(1)), true);
        assert_eq!(view(&times, created).started(), Some(at(0)));
        // Past 48 bits (78 hours) a time saturates rather than wraps.
        let mut late = Stamps::queued_at(0, u64::MAX);
        late.attempt_ends(Some(AttemptStart(0)), 1 << 50);
        assert_eq!(late.handler_ns(), Some(U48::MAX));
        assert_eq!(view(&late, created).queued(), at(U48::MAX));
        late.set_attempts(1 << 20);
        assert_eq!(view(&late, created).attempts(), u32::from(u16::MAX));
    }

    /// A retained result of a pipeline of up to four stages is this struct
    /// alone, its stage times inline: within the 256 bytes of issue 14.
    #[test]
    fn a_retained_result_of_four_stages_is_one_struct_of_at_most_216_bytes() {
        assert!(
            std::mem::size_of::<WorkItemResult>() <= 216,
            "{} bytes",
            std::mem::size_of::<WorkItemResult>()
        );
        let mut m = WorkItemMetadata::default();
        // Four, not `INLINE_STAGES`: the room the bench's pipeline needs.
        for stage in 0..4 {
            m.stages.push(Stamps::queued_at(stage, 1));
        }
        assert!(!m.stages.spilled(), "four stages' times need no allocation");
    }

    #[test]
    fn created_and_finished_read_back_to_the_nanosecond() {
        let mut m = WorkItemMetadata::default();
        let t = Instant::now();
        m.created = epoch_ns(t);
        assert_eq!(m.created(), t);
        assert_eq!(m.finished(), None);
        assert_eq!(m.total_duration(), None);
        m.set_finished(Some(t + Duration::from_nanos(1_234_567)));
        assert_eq!(m.finished(), Some(t + Duration::from_nanos(1_234_567)));
        assert_eq!(m.total_duration(), Some(Duration::from_nanos(1_234_567)));
    }

    #[test]
    fn a_uuid_id_is_three_aligned_words_and_orders_and_prints_as_its_uuid() {
        assert_eq!(std::mem::size_of::<JobId>(), 24);
        let low = Uuid::from_u128(0x00ff_0000_0000_0000_0000_0000_0000_0001);
        let high = Uuid::from_u128(0x0100_0000_0000_0000_0000_0000_0000_0000);
        assert!(
            JobId::from(low) < JobId::from(high),
            "ordered by the uuid's bytes"
        );
        for u in [low, high, Uuid::new_v4()] {
            let id = JobId::from(u);
            assert_eq!(id.as_uuid(), Some(u));
            assert_eq!(id.to_string(), u.to_string());
            assert_eq!(JobId::from(u.to_string().as_str()), id);
        }
    }

    /// What every stage reads and writes of every item's head (its job
    /// id, creation time, attempts, place in order, and whether it has
    /// custom metadata) is its first 64 bytes; the stage times after it.
    #[test]
    fn what_every_stage_touches_of_a_head_is_its_first_64_bytes() {
        use std::mem::{offset_of, size_of};
        let meta = offset_of!(Head, metadata);
        assert_eq!(offset_of!(Head, job_id), 0);
        assert_eq!(meta, size_of::<JobId>());
        for (field, end) in [
            ("created", offset_of!(WorkItemMetadata, created) + 8),
            ("attempts", offset_of!(WorkItemMetadata, attempts) + 4),
            ("seq", offset_of!(WorkItemMetadata, seq) + 4),
            (
                "custom",
                offset_of!(WorkItemMetadata, custom)
                    + size_of::<BTreeMap<String, serde_json::Value>>(),
            ),
        ] {
            assert!(meta + end <= 64, "{field} ends at byte {}", meta + end);
        }
        assert!(offset_of!(WorkItemMetadata, stages) + meta >= 64);
    }

    #[test]
    fn a_word_sized_item_is_two_words_to_move() {
        assert_eq!(std::mem::size_of::<WorkItem<u64>>(), 16);
        assert_eq!(std::mem::size_of::<Option<WorkItem<u64>>>(), 16);
    }
}
