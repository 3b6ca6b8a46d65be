//! Process stages: a handler in worker OS processes, so that a crash, an
//! abort, a runaway item or a leak takes down one process, never the
//! pipeline.
//!
//! # The one call
//!
//! A Process stage starts its workers by running the program again (its own
//! executable, `/proc/self/exe`): there is no second binary. A worker must
//! reach the stage's handler before it does anything else, so put this
//! first in `main`:
//!
//! ```no_run
//! # #[allow(clippy::needless_doctest_main)]
//! fn main() {
//!     bergtalzug_actors::process::init(); // `bergtalzug::process::init()`
//!     // ... parse arguments, read files, build and run the pipeline ...
//! }
//! ```
//!
//! In the parent, [`init`] returns at once. In a worker it never returns: it
//! serves the stage until the parent closes the connection. Without it, a
//! worker runs `main` from the top until the builder's `process_stage` call
//! for its stage, which then serves the stage instead of returning; that is
//! enough only when everything `main` does before building the pipeline is
//! harmless to repeat in every worker (no output, no input, no side
//! effects), so call [`init`].
//!
//! Test binaries: a test harness runs tests, not `main`. Give a Process
//! stage's tests their own file with `harness = false` and a `main` that
//! calls [`init`] first (as `tests/process.rs` does here), or name a worker
//! command with [`ProcessOptions::args`] / [`ProcessOptions::program`] that
//! reaches [`init`].
//!
//! # Resources and batches
//!
//! A stage bound with `process_stage_using` builds a resource (a
//! connection, a model) once in each worker process, before the process
//! says it is ready (so within [`ProcessOptions::start_timeout`]), and
//! hands it to the handler with each item; it never leaves the process and
//! is dropped when the process ends normally (at the end of the run, or
//! when it is recycled). A stage bound with `process_batch_stage` sends a
//! whole batch as one frame and gets its outcomes back as one. See
//! `docs/shapes.md`.
//!
//! # What crosses
//!
//! The whole item: its job id, its data and its custom metadata, as
//! [postcard](https://docs.rs/postcard) bytes in length-prefixed frames over
//! a Unix socket passed as the worker's standard input, which the worker
//! then replaces with `/dev/null` (a handler reading stdin reads nothing).
//! Stage times stay in the parent. The worker's stdout and stderr are the
//! parent's; with [`ProcessOptions::capture_output`] they are read line by
//! line into `tracing` instead.
//!
//! # Failures
//!
//! | what happens in the worker | the item | the worker process |
//! |---|---|---|
//! | the handler returns an error | `Failed` (retried per policy) | goes on |
//! | the handler panics | `Panicked`; the message is also printed on stderr | goes on (the panic is caught) |
//! | abort, segfault, `exit`, killed from outside | `ProcessDied`, with the exit status or signal | replaced |
//! | runs past the stage's `timeout` | `TimedOut` | killed (SIGKILL), replaced |
//! | sends a frame above the limit, or one that does not decode | `ProcessDied` ("corrupt reply") | killed, replaced |
//! | its per-worker resource cannot be built (`process_stage_using`) | the item its worker was about to run: `Panicked`, with the stage and the constructor's error | exits; replaced |
//! | exits, or never says hello (does not reach its handler and build its resource) within [`ProcessOptions::start_timeout`] | none: it had none | killed; another is tried; three in a row fail the pipeline ([`PipelineError::WorkersCannotStart`](crate::error::PipelineError::WorkersCannotStart)) |
//!
//! Only the item the worker was running fails. A process that is replaced
//! counts as a worker replaced after a panic does in the other models: the
//! stage replaces the worker that held it (`WorkerRestarted`, counted
//! against the stage's `restart_budget`) and the items sent after the
//! failed one go back to the stage's queue. A stage keeps at most
//! `workers` worker processes, started when first needed and kept between
//! batches; [`ProcessOptions::recycle_after`] replaces each after that many
//! items.
//!
//! # Lifetime
//!
//! Each worker leads a process group of its own, and is ended with it (with
//! whatever its handler started). Workers never outlive the pipeline: the
//! stage ends them and waits until they are reaped before it stops (so
//! before `run()` returns), and they are killed when the pipeline is
//! aborted. A worker whose parent dies, even by SIGKILL, ends its group:
//! on the closed socket when it is idle, and within 100 ms in any case,
//! when it sees it has a new parent process.
//!
//! Being in a group of its own, a worker does not get the terminal's
//! signals (Ctrl-C goes to the parent only, which decides; see
//! `Pipeline::stop_on_ctrl_c` in `bergtalzug`). It shows in `ps` as the
//! program's `argv[0]` with its pipeline and stage, e.g.
//! `myapp (bergtalzug worker etl/compute)`, named (`comm`) after the
//! program.
//!
//! # Environment
//!
//! Workers inherit the parent's environment, plus the variables the stage
//! set with [`ProcessOptions::env`] and bergtalzug's own `BERGTALZUG_*`
//! variables. With [`ProcessOptions::clean_env`] they get only
//! [`INHERITED_ENV`] from the parent's, those named with
//! [`ProcessOptions::inherit_env`] and those set: nothing else
//! (credentials, tokens) is passed on. The working directory is the
//! parent's.

pub(crate) mod child;
pub(crate) mod entry;
pub(crate) mod frame;
pub(crate) mod spawn;
pub(crate) mod wire;

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::Duration;

use child::{Call, Init};
use entry::{Entry, ExecutableId};

/// Variables a worker process started with [`ProcessOptions::clean_env`]
/// inherits from its parent's environment, when set: what a program needs
/// to start and to format text, nothing secret.
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_NUMERIC",
    "LC_TIME",
    "LC_MESSAGES",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "RUST_LOG",
];

/// The default largest frame, either way: 64 MiB.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

/// Set in a worker: the pipeline's name.
pub(crate) const ENV_PIPELINE: &str = "BERGTALZUG_WORKER_PIPELINE";
/// Set in a worker: the stage's name.
pub(crate) const ENV_STAGE: &str = "BERGTALZUG_WORKER_STAGE";
/// Set in a worker: the parent's executable ([`ExecutableId`]).
pub(crate) const ENV_EXE: &str = "BERGTALZUG_WORKER_EXE";
/// Set in a worker when the parent could place the handler ([`Entry`]).
pub(crate) const ENV_ENTRY: &str = "BERGTALZUG_WORKER_ENTRY";
/// Set in a worker started as the parent's own executable: the parent's pid.
pub(crate) const ENV_PARENT: &str = "BERGTALZUG_WORKER_PARENT";
/// Set in a worker: the frame limit.
pub(crate) const ENV_MAX_FRAME: &str = "BERGTALZUG_WORKER_MAX_FRAME";

/// Serves a Process stage if this process was started as one of its
/// workers; returns at once otherwise. Call it first in `main`.
///
/// See the [module docs](self) for why and for test binaries.
pub fn init() {
    let Some(env) = WorkerEnv::read() else {
        return;
    };
    if let Some(entry) = env.entry_here() {
        entry.serve(); // returns only if the handler is not where it should be
    }
    // Started by another executable, or the handler could not be placed:
    // `main` goes on to the builder's `process_stage`, which serves it.
}

/// True in a worker process of a Process stage.
pub fn is_worker() -> bool {
    std::env::var_os(ENV_STAGE).is_some()
}

/// Serves `handler` (with the resource `init` builds) if this process is
/// a worker of stage `stage` of pipeline `pipeline` bound to this very
/// handler; returns otherwise. Called by the builder's Process methods.
pub(crate) fn serve_if_worker<R, F: Call<R>>(
    pipeline: &str,
    stage: &str,
    init: Init<R>,
    handler: F,
) {
    let Some(env) = WorkerEnv::read() else {
        return;
    };
    if env.pipeline != pipeline || env.stage != stage {
        return;
    }
    // In the parent's own executable, the handler must be the one sent too
    // (two pipelines of the same name may bind other handlers).
    if let Some(sent) = env.entry_here()
        && sent != Entry::unchecked(init, handler)
    {
        return;
    }
    child::serve(init, handler)
}

/// What a worker process was told in its environment.
struct WorkerEnv {
    pipeline: String,
    stage: String,
    exe: Option<ExecutableId>,
    entry: Option<Entry>,
}

impl WorkerEnv {
    fn read() -> Option<WorkerEnv> {
        let stage = std::env::var(ENV_STAGE).ok()?;
        let var = |name| std::env::var(name).ok();
        Some(WorkerEnv {
            pipeline: var(ENV_PIPELINE).unwrap_or_default(),
            stage,
            exe: var(ENV_EXE).and_then(|v| ExecutableId::from_env(&v)),
            entry: var(ENV_ENTRY).and_then(|v| Entry::from_env(&v)),
        })
    }

    /// The entry, if the parent sent one and this is its executable.
    fn entry_here(&self) -> Option<Entry> {
        let entry = self.entry?;
        (self.exe.is_some() && self.exe == entry::executable_id()).then_some(entry)
    }
}

/// How a Process stage starts and keeps its worker processes.
///
/// ```
/// use std::time::Duration;
/// use bergtalzug_actors::process::ProcessOptions;
///
/// let options = ProcessOptions::new()
///     .recycle_after(10_000)               // a fresh process every 10,000 items
///     .env("OMP_NUM_THREADS", "1")          // set in the workers
///     .clean_env()                          // not the parent's environment,
///     .inherit_env("DATABASE_URL")          // but for this variable
///     .start_timeout(Duration::from_secs(5));
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProcessOptions {
    pub(crate) program: Option<PathBuf>,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) inherit_env: Vec<OsString>,
    pub(crate) recycle_after: Option<u64>,
    pub(crate) max_frame: usize,
    pub(crate) start_timeout: Duration,
    pub(crate) clean_env: bool,
    pub(crate) capture_output: bool,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions {
            program: None,
            args: Vec::new(),
            env: Vec::new(),
            inherit_env: Vec::new(),
            recycle_after: None,
            max_frame: DEFAULT_MAX_FRAME,
            start_timeout: Duration::from_secs(10),
            clean_env: false,
            capture_output: false,
        }
    }
}

impl ProcessOptions {
    /// The defaults: this executable with no arguments, the parent's
    /// environment, output to the parent's stdout and stderr, no recycling,
    /// frames up to [`DEFAULT_MAX_FRAME`], 10 s to start.
    pub fn new() -> Self {
        ProcessOptions::default()
    }

    /// Runs `program` as the worker instead of this executable. It must
    /// call [`init`] first in `main` or build the same pipeline (the same
    /// pipeline and stage names) so that the stage's `process_stage` call
    /// serves it. Not given the parent's pid: it may be a wrapper.
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = Some(program.into());
        self
    }

    /// Arguments for the worker command (none by default). For a libtest
    /// test binary, e.g. `["worker", "--exact", "--nocapture"]` with a
    /// `#[test] fn worker() { bergtalzug::process::init() }`.
    pub fn args<A: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = A>) -> Self {
        self.args = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self
    }

    /// Sets a variable in the workers' environment.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Passes a variable of the parent's environment on to the workers
    /// (they inherit it anyway unless [`clean_env`](Self::clean_env) is set).
    pub fn inherit_env(mut self, key: impl AsRef<OsStr>) -> Self {
        self.inherit_env.push(key.as_ref().to_owned());
        self
    }

    /// Replaces each worker process after it has handled `items` items
    /// (for handlers that leak); never by default. At least 1. For a batch
    /// stage it counts batches: a batch is one job for the process.
    pub fn recycle_after(mut self, items: u64) -> Self {
        self.recycle_after = Some(items.max(1));
        self
    }

    /// The largest frame either way, in bytes: an item or result above it
    /// fails; a worker that sends a larger one is killed.
    pub fn max_frame_bytes(mut self, bytes: usize) -> Self {
        self.max_frame = bytes.clamp(64, u32::MAX as usize);
        self
    }

    /// How long a new worker may take to reach its handler (default 10 s),
    /// building the stage's per-worker resource included
    /// (`process_stage_using`).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Starts the workers with a clean environment instead of the parent's:
    /// only [`INHERITED_ENV`], the variables named with
    /// [`inherit_env`](Self::inherit_env) and those set with
    /// [`env`](Self::env) (plus bergtalzug's own `BERGTALZUG_*`). For
    /// handlers that must not see the parent's credentials or tokens.
    pub fn clean_env(mut self) -> Self {
        self.clean_env = true;
        self
    }

    /// Reads the workers' stdout and stderr line by line into `tracing`
    /// (target `bergtalzug::process`, fields `pipeline`, `stage`, `worker`,
    /// `pid`, `stream`; stdout at INFO, stderr at WARN) instead of letting
    /// them write to the parent's stdout and stderr. Without a tracing
    /// subscriber, that output is then lost.
    pub fn capture_output(mut self) -> Self {
        self.capture_output = true;
        self
    }
}
