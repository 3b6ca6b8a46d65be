//! The child's side: serve one stage's handler over the socket on standard
//! input until the parent closes it.
//!
//! Runs on the main thread of the worker process, blocking. A stage with a
//! per-worker resource builds it first, once, before the child says hello
//! (a constructor that fails or panics is told to the parent instead, and
//! the child exits); the resource is dropped when the parent closes the
//! socket (the end of the run, a recycled process). Each job (an item, or a
//! whole batch for a batch stage) is read, handed to the handler, and
//! answered before the next is read, so the parent knows which job a dead
//! child held: the first unanswered one. A panic in the handler is caught
//! and answered as `Panicked` (the panic message also reaches the parent's
//! stderr, or its log); the child goes on. A process built with
//! `panic = "abort"` dies instead, and the parent reports `ProcessDied`.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::frame::{self, BatchJob, FrameBuf, ItemReply, Job, PROTOCOL_VERSION, Reply};
use super::{ENV_MAX_FRAME, ENV_PARENT};
use crate::contain::panic_message;
use crate::item::{Permanent, WorkItem};
use crate::shape::Batch;

/// A Process stage's per-worker resource constructor.
pub(crate) type Init<R> = fn() -> anyhow::Result<R>;

/// The constructor of a stage without a resource.
pub(crate) fn no_resource() -> anyhow::Result<()> {
    Ok(())
}

/// A Process stage's handler as its worker process calls it, given the
/// process's resource `R` (`()` for a stage without one). Implemented only
/// for the four `fn` pointer types a builder binds (an item or a batch,
/// with or without a resource): [`super::entry`] relies on a `Call` being
/// one `fn` pointer, which it finds again by its address.
pub(crate) trait Call<R>: Copy + Send + Sync + 'static {
    /// The data of one job, as it crosses.
    type Job: DeserializeOwned + Send + 'static;
    /// What the reply to a job carries when the handler returned.
    type Done: Serialize + Send + 'static;
    /// Runs the handler on one job and says what became of it.
    fn call(self, resource: &mut R, job: Job<Self::Job>) -> Reply<Self::Done>;
    /// Its address.
    fn address(self) -> usize;
}

/// `fn(item) -> item`: [`process_stage`](crate::PipelineBuilder::process_stage).
impl<I, O> Call<()> for fn(WorkItem<I>) -> anyhow::Result<WorkItem<O>>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
{
    type Job = I;
    type Done = O;
    fn call(self, _: &mut (), job: Job<I>) -> Reply<O> {
        run_item(job, self)
    }
    fn address(self) -> usize {
        self as usize
    }
}

/// `fn(&mut resource, item) -> item`:
/// [`process_stage_using`](crate::PipelineBuilder::process_stage_using).
impl<R, I, O> Call<R> for fn(&mut R, WorkItem<I>) -> anyhow::Result<WorkItem<O>>
where
    R: 'static,
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
{
    type Job = I;
    type Done = O;
    fn call(self, resource: &mut R, job: Job<I>) -> Reply<O> {
        run_item(job, |item| self(resource, item))
    }
    fn address(self) -> usize {
        self as usize
    }
}

/// `fn(batch) -> outcomes`:
/// [`process_batch_stage`](crate::PipelineBuilder::process_batch_stage).
impl<I, O> Call<()> for fn(Batch<I>) -> anyhow::Result<Vec<anyhow::Result<O>>>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
{
    type Job = BatchJob<I>;
    type Done = Vec<ItemReply<O>>;
    fn call(self, _: &mut (), job: Job<BatchJob<I>>) -> Reply<Vec<ItemReply<O>>> {
        run_batch(job, self)
    }
    fn address(self) -> usize {
        self as usize
    }
}

/// `fn(&mut resource, batch) -> outcomes`:
/// [`process_batch_stage_using`](crate::PipelineBuilder::process_batch_stage_using).
impl<R, I, O> Call<R> for fn(&mut R, Batch<I>) -> anyhow::Result<Vec<anyhow::Result<O>>>
where
    R: 'static,
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
{
    type Job = BatchJob<I>;
    type Done = Vec<ItemReply<O>>;
    fn call(self, resource: &mut R, job: Job<BatchJob<I>>) -> Reply<Vec<ItemReply<O>>> {
        run_batch(job, |batch| self(resource, batch))
    }
    fn address(self) -> usize {
        self as usize
    }
}

/// How serving ended without an error.
enum Ended {
    /// The parent closed the socket.
    Closed,
    /// The resource could not be built; the parent was told.
    NoResource,
}

/// Builds the stage's resource with `init`, then serves `handler` with it,
/// and exits the process when the parent goes away (the resource dropped
/// first).
pub(crate) fn serve<R, F: Call<R>>(init: Init<R>, handler: F) -> ! {
    match serve_until_closed(init, handler) {
        Ok(Ended::Closed) => std::process::exit(0),
        Ok(Ended::NoResource) => std::process::exit(1),
        Err(e) => {
            eprintln!("bergtalzug worker {}: {e}", std::process::id());
            std::process::exit(101)
        }
    }
}

fn serve_until_closed<R, F: Call<R>>(init: Init<R>, handler: F) -> Result<Ended, String> {
    die_with_parent()?;
    name_process();
    let limit: usize = std::env::var(ENV_MAX_FRAME)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(super::DEFAULT_MAX_FRAME);
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("cannot take the parent's socket: {e}"))?;
    let mut socket = UnixStream::from(fd);
    // The handler gets an empty standard input, not our frames.
    let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    nix::unistd::dup2_stdin(&null).map_err(|e| format!("cannot replace stdin: {e}"))?;
    let mut out = Vec::new();
    // The resource lives in this frame: dropped when serving ends, before
    // the process exits (`exit` runs no destructor).
    let mut resource = match build(init) {
        Ok(resource) => resource,
        Err(message) => {
            let refused = Reply::<()>::NoResource { message };
            frame::encode_into(&refused, &mut out, limit)?;
            socket
                .write_all(&out)
                .map_err(|e| format!("telling the parent: {e}"))?;
            return Ok(Ended::NoResource);
        }
    };
    let hello = Reply::<()>::Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
    };
    frame::encode_into(&hello, &mut out, limit)?;
    socket.write_all(&out).map_err(|e| format!("hello: {e}"))?;
    let mut buf = FrameBuf::new(limit);
    loop {
        let range = loop {
            match buf.next_frame() {
                Ok(Some(range)) => break range,
                Ok(None) => {}
                Err(e) => return Err(format!("from the parent: {e}")),
            }
            match socket.read(buf.spare()) {
                Ok(0) => return Ok(Ended::Closed), // The parent is done with us.
                Ok(n) => buf.filled(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading from the parent: {e}")),
            }
        };
        let job: Job<F::Job> = frame::decode(buf.get(range))?;
        let reply = handler.call(&mut resource, job);
        out.clear();
        if let Err(e) = frame::encode_into(&reply, &mut out, limit) {
            // The result cannot cross: fail the job rather than the child.
            out.clear();
            let failed = Reply::<F::Done>::Failed {
                message: format!("the handler's result cannot be sent back: {e}"),
                permanent: true,
            };
            frame::encode_into(&failed, &mut out, limit)?;
        }
        socket
            .write_all(&out)
            .map_err(|e| format!("writing to the parent: {e}"))?;
    }
}

/// Runs the resource's constructor; its error chain (or its panic) if it
/// fails.
fn build<R>(init: Init<R>) -> Result<R, String> {
    match std::panic::catch_unwind(init) {
        Ok(Ok(resource)) => Ok(resource),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(payload) => Err(format!("it panicked: {}", panic_message(&*payload))),
    }
}

/// The item a job carries, or why it cannot be had.
fn item_of<I>(job: Job<I>) -> Result<WorkItem<I>, String> {
    let custom = frame::custom_from_wire(&job.custom)?;
    let mut item = WorkItem::with_job_id(job.job_id, job.data);
    item.metadata_mut().custom = custom;
    item.metadata_mut().attempts = job.attempts;
    Ok(item)
}

/// Runs an item's handler (under `catch_unwind`) on one job.
fn run_item<I, O>(
    job: Job<I>,
    handler: impl FnOnce(WorkItem<I>) -> anyhow::Result<WorkItem<O>>,
) -> Reply<O> {
    let item = match item_of(job) {
        Ok(item) => item,
        Err(message) => {
            return Reply::Failed {
                message,
                permanent: true,
            };
        }
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(item))) {
        Ok(Ok(out)) => match frame::custom_to_wire(&out.metadata().custom) {
            Ok(custom) => Reply::Done {
                custom,
                data: out.data,
            },
            Err(message) => Reply::Failed {
                message,
                permanent: true,
            },
        },
        Ok(Err(e)) => failed(&e),
        Err(payload) => Reply::Panicked {
            message: panic_message(&*payload),
        },
    }
}

/// Runs a batch handler (under `catch_unwind`) on one job: one outcome per
/// item, in order, or the whole batch's failure.
fn run_batch<I, O>(
    job: Job<BatchJob<I>>,
    handler: impl FnOnce(Batch<I>) -> anyhow::Result<Vec<anyhow::Result<O>>>,
) -> Reply<Vec<ItemReply<O>>> {
    let BatchJob { key, items } = job.data;
    let items = match items
        .into_iter()
        .map(item_of)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(items) => items,
        Err(message) => {
            return Reply::Failed {
                message,
                permanent: true,
            };
        }
    };
    let n = items.len();
    let batch = Batch { items, key };
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        handler(batch).map(|outcomes| {
            // The errors' `Display` is user code: under the same guard.
            let outcomes: Vec<ItemReply<O>> = outcomes
                .into_iter()
                .map(|outcome| match outcome {
                    Ok(out) => ItemReply::Done(out),
                    Err(e) => {
                        let (message, permanent) = error_parts(&e);
                        ItemReply::Failed { message, permanent }
                    }
                })
                .collect();
            outcomes
        })
    }));
    match ran {
        Ok(Ok(outcomes)) if outcomes.len() == n => Reply::Done {
            custom: String::new(),
            data: outcomes,
        },
        Ok(Ok(outcomes)) => Reply::Failed {
            message: format!(
                "the batch handler returned {} outcomes for {n} items",
                outcomes.len()
            ),
            permanent: false,
        },
        Ok(Err(e)) => failed(&e),
        Err(payload) => Reply::Panicked {
            message: panic_message(&*payload),
        },
    }
}

/// The reply for a handler's error.
fn failed<O>(e: &anyhow::Error) -> Reply<O> {
    let (message, permanent) = error_parts(e);
    Reply::Failed { message, permanent }
}

/// A handler's error as it crosses: its chain, and whether it is
/// [`Permanent`].
fn error_parts(e: &anyhow::Error) -> (String, bool) {
    (format!("{e:#}"), Permanent::is(e))
}

/// How often a worker checks that its parent is still there.
const PARENT_CHECK: Duration = Duration::from_millis(100);

/// Exits if the parent is gone, and starts a thread that ends this process
/// and its process group (whatever the handler started) as soon as the
/// parent goes: when it dies, even by SIGKILL, this process is handed to
/// another parent. (Not the parent-death signal: on Linux it fires when the
/// *thread* that started us ends, and tokio retires idle threads.)
fn die_with_parent() -> Result<(), String> {
    let parent = nix::unistd::getppid();
    let expected = std::env::var(ENV_PARENT)
        .ok()
        .and_then(|p| p.parse::<i32>().ok());
    if expected.is_some_and(|expected| parent.as_raw() != expected) {
        return Err("the parent is gone".to_string());
    }
    std::thread::Builder::new()
        .name("bergtalzug-parent-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(PARENT_CHECK);
                if nix::unistd::getppid() != parent {
                    end_group();
                }
            }
        })
        .map_err(|e| format!("cannot watch the parent: {e}"))?;
    Ok(())
}

/// Kills this process, with its process group if it leads one (the
/// parent starts each worker as the leader of a group of its own).
fn end_group() -> ! {
    use nix::sys::signal::{Signal, kill, killpg};
    let me = nix::unistd::getpid();
    if nix::unistd::getpgrp() == me {
        let _ = killpg(me, Signal::SIGKILL);
    }
    let _ = kill(me, Signal::SIGKILL);
    std::process::abort()
}

/// Names this process after its program (`ps`, `pgrep`), not after
/// `/proc/self/exe` it was started as.
fn name_process() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let name = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.as_bytes().to_vec()));
        if let Some(mut name) = name {
            name.truncate(15); // the kernel keeps 15 bytes
            if let Ok(name) = std::ffi::CString::new(name) {
                let _ = nix::sys::prctl::set_name(&name);
            }
        }
    }
}
