//! The parent's side of a worker process: starting it with a clean
//! environment, reading its logs into `tracing`, and ending it.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::entry::{Entry, executable_id};
use super::frame::{self, FrameBuf, PROTOCOL_VERSION, Reply};
use super::{
    ENV_ENTRY, ENV_EXE, ENV_MAX_FRAME, ENV_PARENT, ENV_PIPELINE, ENV_STAGE, INHERITED_ENV,
    ProcessOptions,
};
use crate::event::WorkerId;

/// The longest line of a worker's output logged as one event; longer lines
/// are logged in pieces.
const MAX_LOG_LINE: usize = 16 * 1024;
/// How long a killed or closed worker gets to be reaped before we stop
/// waiting for its exit status.
const REAP_WAIT: Duration = Duration::from_secs(2);

/// How a stage starts its workers; built once per stage.
#[derive(Debug)]
pub(crate) struct ChildSpec {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    pub(crate) pipeline: Arc<str>,
    pub(crate) stage: Arc<str>,
    pub(crate) max_frame: usize,
    start_timeout: Duration,
    pub(crate) recycle_after: Option<u64>,
}

impl ChildSpec {
    pub(crate) fn new(
        pipeline: Arc<str>,
        stage: Arc<str>,
        options: &ProcessOptions,
        entry: Option<Entry>,
    ) -> ChildSpec {
        let mut env: Vec<(OsString, OsString)> = INHERITED_ENV
            .iter()
            .map(OsString::from)
            .chain(options.inherit_env.iter().cloned())
            .filter_map(|key| std::env::var_os(&key).map(|value| (key, value)))
            .collect();
        env.extend(options.env.iter().cloned());
        env.push((ENV_PIPELINE.into(), (*pipeline).into()));
        env.push((ENV_STAGE.into(), (*stage).into()));
        env.push((ENV_MAX_FRAME.into(), options.max_frame.to_string().into()));
        if let Some(exe) = executable_id() {
            env.push((ENV_EXE.into(), exe.to_env().into()));
            if let Some(entry) = entry {
                env.push((ENV_ENTRY.into(), entry.to_env().into()));
            }
        }
        let program = match &options.program {
            Some(program) => program.clone(),
            None => {
                env.push((ENV_PARENT.into(), std::process::id().to_string().into()));
                PathBuf::from("/proc/self/exe")
            }
        };
        ChildSpec {
            program,
            args: options.args.clone(),
            env,
            pipeline,
            stage,
            max_frame: options.max_frame,
            start_timeout: options.start_timeout,
            recycle_after: options.recycle_after,
        }
    }

    /// Starts a worker process for `worker` and waits for its hello.
    pub(crate) async fn spawn(&self, worker: WorkerId) -> Result<ChildProc, String> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| format!("cannot make a socket for a worker process: {e}"))?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let spawned = command.spawn();
        // Our copy of the child's end must be closed, or its death would
        // never read as end-of-file here.
        drop(command);
        let mut child = spawned.map_err(|e| {
            format!(
                "cannot start a worker process ({}): {e}",
                self.program.display()
            )
        })?;
        let pid = child.id().unwrap_or(0);
        for (stream, name) in [
            (child.stdout.take().map(boxed), "stdout"),
            (child.stderr.take().map(boxed), "stderr"),
        ] {
            if let Some(stream) = stream {
                tokio::spawn(forward_lines(
                    stream,
                    self.pipeline.clone(),
                    self.stage.clone(),
                    worker,
                    pid,
                    name,
                ));
            }
        }
        ours.set_nonblocking(true)
            .map_err(|e| format!("worker socket: {e}"))?;
        let socket = UnixStream::from_std(ours).map_err(|e| format!("worker socket: {e}"))?;
        let mut proc = ChildProc {
            child,
            pid,
            socket,
            buf: FrameBuf::new(self.max_frame),
            served: 0,
        };
        match tokio::time::timeout(self.start_timeout, proc.hello()).await {
            Ok(Ok(())) => Ok(proc),
            Ok(Err(e)) => {
                let status = proc.end().await;
                Err(format!(
                    "worker process {pid} {status} before it started serving: {e}; \
                     does `main` call bergtalzug::process::init() first \
                     (see bergtalzug::process)?"
                ))
            }
            Err(_) => {
                let status = proc.end().await;
                Err(format!(
                    "worker process {pid} did not start serving within {:?} and was \
                     killed ({status}); does `main` call bergtalzug::process::init() first?",
                    self.start_timeout
                ))
            }
        }
    }
}

fn boxed(stream: impl AsyncRead + Send + Unpin + 'static) -> Box<dyn AsyncRead + Send + Unpin> {
    Box::new(stream)
}

/// A running worker process and our end of its socket.
pub(crate) struct ChildProc {
    child: Child,
    pub(crate) pid: u32,
    pub(crate) socket: UnixStream,
    pub(crate) buf: FrameBuf,
    /// Items it has answered.
    pub(crate) served: u64,
}

impl ChildProc {
    /// Reads the child's first frame: it must be a hello of our version.
    async fn hello(&mut self) -> Result<(), String> {
        loop {
            match self.buf.next_frame() {
                Ok(Some(range)) => {
                    return match frame::decode::<Reply<()>>(self.buf.get(range)) {
                        Ok(Reply::Hello { version, .. }) if version == PROTOCOL_VERSION => Ok(()),
                        Ok(Reply::Hello { version, .. }) => Err(format!(
                            "it speaks protocol version {version}, not {PROTOCOL_VERSION}"
                        )),
                        Ok(_) => Err("its first frame was not a hello".to_string()),
                        Err(e) => Err(format!("its first frame was corrupt: {e}")),
                    };
                }
                Ok(None) => {}
                Err(e) => return Err(format!("its first frame was corrupt: {e}")),
            }
            match self.socket.read(self.buf.spare()).await {
                Ok(0) => return Err("it closed its socket".to_string()),
                Ok(n) => self.buf.filled(n),
                Err(e) => return Err(format!("reading its socket: {e}")),
            }
        }
    }

    /// Kills the child (if it still runs) and says how it ended, e.g.
    /// "was killed by signal 6 (SIGABRT)".
    pub(crate) async fn end(mut self) -> String {
        // Already dead (it closed the socket by dying)? Give it a moment
        // to be reaped before killing, so that its own status is reported.
        let status = match tokio::time::timeout(Duration::from_millis(50), self.child.wait()).await
        {
            Ok(status) => status,
            Err(_) => {
                let _ = self.child.start_kill();
                match tokio::time::timeout(REAP_WAIT, self.child.wait()).await {
                    Ok(status) => status,
                    Err(_) => return "did not exit after SIGKILL".to_string(),
                }
            }
        };
        match status {
            Ok(status) => describe(status),
            Err(e) => format!("ended with an unknown status ({e})"),
        }
    }

    /// Kills the child at once and says how it ended.
    pub(crate) async fn kill(mut self) -> String {
        let _ = self.child.start_kill();
        match tokio::time::timeout(REAP_WAIT, self.child.wait()).await {
            Ok(Ok(status)) => describe(status),
            Ok(Err(e)) => format!("ended with an unknown status ({e})"),
            Err(_) => "did not exit after SIGKILL".to_string(),
        }
    }

    /// Lets an idle child go: closes its socket, so that it exits, and
    /// reaps it in the background (killing it if it lingers).
    pub(crate) fn retire(self) {
        let ChildProc {
            mut child, socket, ..
        } = self;
        drop(socket);
        tokio::spawn(async move {
            if tokio::time::timeout(REAP_WAIT, child.wait()).await.is_err() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        });
    }
}

/// "exited with status 3", "was killed by signal 11 (SIGSEGV), core dumped".
fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(signal) => {
            let name = nix::sys::signal::Signal::try_from(signal)
                .map(|s| s.as_str())
                .unwrap_or("unknown");
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            format!("was killed by signal {signal} ({name}){core}")
        }
        None => format!("ended ({status})"),
    }
}

/// Logs a worker's output line by line until it closes.
async fn forward_lines(
    stream: Box<dyn AsyncRead + Send + Unpin>,
    pipeline: Arc<str>,
    stage: Arc<str>,
    worker: WorkerId,
    pid: u32,
    name: &'static str,
) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        // (bytes consumed, log the line now, end of output)
        let (consumed, emit, eof) = match reader.fill_buf().await {
            Ok([]) | Err(_) => (0, !line.is_empty(), true),
            Ok(buf) => {
                let room = MAX_LOG_LINE - line.len();
                match buf.iter().take(room + 1).position(|b| *b == b'\n') {
                    Some(i) => {
                        line.extend_from_slice(&buf[..i]);
                        (i + 1, true, false)
                    }
                    None => {
                        let n = buf.len().min(room);
                        line.extend_from_slice(&buf[..n]);
                        (n, line.len() >= MAX_LOG_LINE, false)
                    }
                }
            }
        };
        reader.consume(consumed);
        if emit {
            let text = String::from_utf8_lossy(&line);
            let text = text.strip_suffix('\r').unwrap_or(&text);
            if name == "stderr" {
                tracing::warn!(target: "bergtalzug::process", pipeline = %pipeline,
                    stage = %stage, worker = %worker, pid, stream = name, "{text}");
            } else {
                tracing::info!(target: "bergtalzug::process", pipeline = %pipeline,
                    stage = %stage, worker = %worker, pid, stream = name, "{text}");
            }
            line.clear();
        }
        if eof {
            return;
        }
    }
}
