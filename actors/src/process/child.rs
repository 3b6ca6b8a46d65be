//! The child's side: serve one stage's handler over the socket on standard
//! input until the parent closes it.
//!
//! Runs on the main thread of the worker process, blocking. Each job is
//! read, handed to the handler, and answered before the next is read, so
//! the parent knows which item a dead child held: the first unanswered one.
//! A panic in the handler is caught and answered as `Panicked` (the panic
//! message also reaches the parent's stderr, or its log); the child goes
//! on. A process built with `panic = "abort"` dies instead, and the parent
//! reports `ProcessDied`.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::entry::Handler;
use super::frame::{self, FrameBuf, Job, PROTOCOL_VERSION, Reply};
use super::{ENV_MAX_FRAME, ENV_PARENT};
use crate::contain::panic_message;
use crate::item::{Permanent, WorkItem};

/// Serves `handler` and exits the process when the parent goes away.
pub(crate) fn serve<I, O>(handler: Handler<I, O>) -> !
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
{
    match serve_until_closed(handler) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("bergtalzug worker {}: {e}", std::process::id());
            std::process::exit(101)
        }
    }
}

fn serve_until_closed<I, O>(handler: Handler<I, O>) -> Result<(), String>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
{
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
    let hello = Reply::<O>::Hello {
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
                Ok(0) => return Ok(()), // The parent is done with us.
                Ok(n) => buf.filled(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading from the parent: {e}")),
            }
        };
        let job: Job<I> = frame::decode(buf.get(range))?;
        let reply = run_one(handler, job);
        out.clear();
        if let Err(e) = frame::encode_into(&reply, &mut out, limit) {
            // The result cannot cross: fail the item rather than the child.
            out.clear();
            let failed = Reply::<O>::Failed {
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

/// Runs the handler on one job and says what became of it.
fn run_one<I, O>(handler: Handler<I, O>, job: Job<I>) -> Reply<O> {
    let custom = match frame::custom_from_wire(&job.custom) {
        Ok(custom) => custom,
        Err(message) => {
            return Reply::Failed {
                message,
                permanent: true,
            };
        }
    };
    let mut item = WorkItem::with_job_id(job.job_id, job.data);
    item.metadata_mut().custom = custom;
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
        Ok(Err(e)) => Reply::Failed {
            message: format!("{e:#}"),
            permanent: Permanent::is(&e),
        },
        Err(payload) => Reply::Panicked {
            message: panic_message(&*payload),
        },
    }
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
