//! The parent's side of a worker process: starting it in a process group
//! of its own (with the parent's environment and output, or a clean
//! environment and its output read into `tracing`), and ending it with
//! that group.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

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

/// Why a worker process is not there to serve.
#[derive(Debug)]
pub(crate) enum Unstarted {
    /// It could not be started, or did not reach its handler (or say
    /// hello) in time: no item is to blame.
    Failed(String),
    /// It reached its handler, but the stage's per-worker resource could
    /// not be built there: the message names the stage and gives the
    /// constructor's error.
    NoResource(String),
}

/// How a stage starts its workers; built once per stage.
#[derive(Debug)]
pub(crate) struct ChildSpec {
    program: PathBuf,
    /// The workers' `argv[0]`, when they run this executable.
    arg0: Option<OsString>,
    args: Vec<OsString>,
    /// Start from an empty environment (else the parent's).
    clean_env: bool,
    env: Vec<(OsString, OsString)>,
    /// Read the workers' output into `tracing` (else it is the parent's).
    capture_output: bool,
    pub(crate) pipeline: Arc<str>,
    pub(crate) stage: Arc<str>,
    pub(crate) max_frame: usize,
    start_timeout: Duration,
    pub(crate) recycle_after: Option<u64>,
    /// Reaps the workers that were let go or dropped.
    reaper: Arc<Reaper>,
}

impl ChildSpec {
    pub(crate) fn new(
        pipeline: Arc<str>,
        stage: Arc<str>,
        options: &ProcessOptions,
        entry: Option<Entry>,
    ) -> ChildSpec {
        let mut env: Vec<(OsString, OsString)> = if options.clean_env {
            INHERITED_ENV
                .iter()
                .map(OsString::from)
                .chain(options.inherit_env.iter().cloned())
                .filter_map(|key| std::env::var_os(&key).map(|value| (key, value)))
                .collect()
        } else {
            Vec::new()
        };
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
        let (program, arg0) = match &options.program {
            Some(program) => (program.clone(), None),
            None => {
                env.push((ENV_PARENT.into(), std::process::id().to_string().into()));
                let arg0 = worker_arg0(&pipeline, &stage);
                (PathBuf::from("/proc/self/exe"), Some(arg0))
            }
        };
        ChildSpec {
            program,
            arg0,
            args: options.args.clone(),
            clean_env: options.clean_env,
            env,
            capture_output: options.capture_output,
            pipeline,
            stage,
            max_frame: options.max_frame,
            start_timeout: options.start_timeout,
            recycle_after: options.recycle_after,
            reaper: Arc::default(),
        }
    }

    /// Waits (up to `within`) until every worker process let go or dropped
    /// so far has exited and been reaped, with whatever it started.
    pub(crate) async fn reap_all(&self, within: Duration) {
        self.reaper.wait_all(within).await;
    }

    /// Starts a worker process for `worker` and waits for its hello (its
    /// resource, if the stage has one, is built before it).
    pub(crate) async fn spawn(&self, worker: WorkerId) -> Result<ChildProc, Unstarted> {
        self.start(worker)
            .await
            .map_err(Unstarted::Failed)?
            .greeted(self)
            .await
    }

    /// Starts a worker process for `worker`.
    async fn start(&self, worker: WorkerId) -> Result<ChildProc, String> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| format!("cannot make a socket for a worker process: {e}"))?;
        let mut command = Command::new(&self.program);
        if let Some(arg0) = &self.arg0 {
            command.arg0(arg0);
        }
        if self.clean_env {
            command.env_clear();
        } else {
            // A worker that runs a pipeline of its own passes on only what
            // its own stage sets.
            for key in [
                ENV_PIPELINE,
                ENV_STAGE,
                ENV_EXE,
                ENV_ENTRY,
                ENV_PARENT,
                ENV_MAX_FRAME,
            ] {
                command.env_remove(key);
            }
        }
        let output = || {
            if self.capture_output {
                Stdio::piped()
            } else {
                Stdio::inherit()
            }
        };
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(output())
            .stderr(output())
            // Its own process group: the terminal's signals (Ctrl-C) are
            // not sent to it, and it is ended with whatever it started.
            .process_group(0)
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
        let mut proc = ChildProc {
            child: Some(child),
            pid,
            socket: None,
            buf: FrameBuf::new(self.max_frame),
            served: 0,
            reaper: self.reaper.clone(),
        };
        // From here, a `proc` dropped (this future cancelled) kills and
        // reaps the child.
        ours.set_nonblocking(true)
            .map_err(|e| format!("worker socket: {e}"))?;
        let socket = UnixStream::from_std(ours).map_err(|e| format!("worker socket: {e}"))?;
        proc.socket = Some(socket);
        Ok(proc)
    }
}

/// `argv[0]` of a worker running this executable, so that `ps` shows what
/// it is: "myapp (bergtalzug worker etl/compute)".
fn worker_arg0(pipeline: &str, stage: &str) -> OsString {
    let mut arg0 = std::env::args_os()
        .next()
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.file_name().map(Into::into))
        })
        .unwrap_or_else(|| "bergtalzug".into());
    arg0.push(format!(" (bergtalzug worker {pipeline}/{stage})"));
    arg0
}

/// Kills a worker's process group: the worker and whatever it started
/// (unless that left the group). A group lives while any member does, so
/// its id is not reused meanwhile.
pub(crate) fn kill_group(pid: u32) {
    // Never 0 (our own group) or a negative number (every process).
    let Ok(pgid) = i32::try_from(pid) else {
        return;
    };
    if pgid > 1 {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// Worker processes on their way out: each is reaped by a task of its own
/// (killed with its group if it lingers, its group ended after it exits),
/// and the stage waits for them all before it stops.
#[derive(Debug, Default)]
struct Reaper {
    tasks: Mutex<JoinSet<()>>,
}

impl Reaper {
    /// Reaps `child` (process `pid`), killing its group after `grace` if it
    /// has not exited by then.
    fn reap(&self, mut child: Child, pid: u32, grace: Duration) {
        if tokio::runtime::Handle::try_current().is_err() {
            // No runtime left to wait on: kill it (and its group) now.
            kill_group(pid);
            let _ = child.start_kill();
            return;
        }
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                kill_group(pid);
                let _ = child.start_kill();
                let _ = tokio::time::timeout(REAP_WAIT, child.wait()).await;
            }
            // Whatever it started and left running.
            kill_group(pid);
        });
    }

    async fn wait_all(&self, within: Duration) {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let all = async { while tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(within, all).await;
    }
}

fn boxed(stream: impl AsyncRead + Send + Unpin + 'static) -> Box<dyn AsyncRead + Send + Unpin> {
    Box::new(stream)
}

/// A running worker process and our end of its socket. Dropped while its
/// child runs (its batch cancelled by an abort), it kills the child's
/// process group and has the child reaped.
pub(crate) struct ChildProc {
    /// `None` once it was reaped or handed to the reaper.
    child: Option<Child>,
    pub(crate) pid: u32,
    /// `None` only while it is being started.
    socket: Option<UnixStream>,
    pub(crate) buf: FrameBuf,
    /// Items it has answered.
    pub(crate) served: u64,
    reaper: Arc<Reaper>,
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            kill_group(self.pid);
            self.reaper.reap(child, self.pid, Duration::ZERO);
        }
    }
}

impl ChildProc {
    /// Our end of its socket, its frame buffer, its count of answered
    /// items and its process (for `exchange`, which uses them at once).
    pub(crate) fn parts(&mut self) -> (&mut UnixStream, &mut FrameBuf, &mut u64, &mut Child) {
        (
            self.socket
                .as_mut()
                .expect("a started worker has its socket"),
            &mut self.buf,
            &mut self.served,
            self.child.as_mut().expect("a worker not yet reaped"),
        )
    }

    /// Waits (up to the stage's `start_timeout`) for the hello of a child
    /// just started: the child, ready to serve.
    async fn greeted(mut self, spec: &ChildSpec) -> Result<ChildProc, Unstarted> {
        let pid = self.pid;
        match tokio::time::timeout(spec.start_timeout, self.hello()).await {
            Ok(Ok(())) => Ok(self),
            Ok(Err(Unstarted::NoResource(message))) => {
                let status = self.end().await;
                Err(Unstarted::NoResource(format!(
                    "stage `{}`: its per-worker resource could not be built: {message} \
                     (in worker process {pid}, which then {status})",
                    spec.stage
                )))
            }
            Ok(Err(Unstarted::Failed(e))) => {
                let status = self.end().await;
                Err(Unstarted::Failed(format!(
                    "worker process {pid} {status} before it started serving: {e}; \
                     does `main` call bergtalzug::process::init() first \
                     (see bergtalzug::process)?"
                )))
            }
            Err(_) => {
                let status = self.end().await;
                Err(Unstarted::Failed(format!(
                    "worker process {pid} did not start serving within {:?} and was \
                     killed ({status}); does `main` call bergtalzug::process::init() first? \
                     (The time includes building the stage's per-worker resource, if it \
                     has one.)",
                    spec.start_timeout
                )))
            }
        }
    }

    /// Reads the child's first frame: it must be a hello of our version,
    /// or say that its resource could not be built.
    async fn hello(&mut self) -> Result<(), Unstarted> {
        let (socket, buf, _, child) = self.parts();
        let failed = |e: String| Err(Unstarted::Failed(e));
        loop {
            match buf.next_frame() {
                Ok(Some(range)) => {
                    return match frame::decode::<Reply<()>>(buf.get(range)) {
                        Ok(Reply::Hello { version, .. }) if version == PROTOCOL_VERSION => Ok(()),
                        Ok(Reply::Hello { version, .. }) => failed(format!(
                            "it speaks protocol version {version}, not {PROTOCOL_VERSION}"
                        )),
                        Ok(Reply::NoResource { message }) => Err(Unstarted::NoResource(message)),
                        Ok(_) => failed("its first frame was not a hello".to_string()),
                        Err(e) => failed(format!("its first frame was corrupt: {e}")),
                    };
                }
                Ok(None) => {}
                Err(e) => return failed(format!("its first frame was corrupt: {e}")),
            }
            tokio::select! {
                biased;
                read = socket.read(buf.spare()) => match read {
                    Ok(0) => return failed("it closed its socket".to_string()),
                    Ok(n) => buf.filled(n),
                    Err(e) => return failed(format!("reading its socket: {e}")),
                },
                // Exited, while something it started may hold its socket.
                _ = child.wait() => {
                    if let Ok(n) = socket.try_read(buf.spare())
                        && n > 0
                    {
                        buf.filled(n);
                        continue;
                    }
                    return failed("it exited".to_string());
                }
            }
        }
    }

    /// Kills the child (if it still runs) with its process group and says
    /// how it ended, e.g. "was killed by signal 6 (SIGABRT)". (Cancelled,
    /// or if the child outlives SIGKILL, `drop` ends and reaps it.)
    pub(crate) async fn end(mut self) -> String {
        let pid = self.pid;
        let Some(child) = self.child.as_mut() else {
            return "was already reaped".to_string();
        };
        // Already dead (it closed the socket by dying)? Give it a moment
        // to be reaped before killing, so that its own status is reported.
        let status = match tokio::time::timeout(Duration::from_millis(50), child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                kill_group(pid);
                let _ = child.start_kill();
                match tokio::time::timeout(REAP_WAIT, child.wait()).await {
                    Ok(status) => status,
                    Err(_) => return "did not exit after SIGKILL".to_string(),
                }
            }
        };
        self.child = None;
        // What it started and left running.
        kill_group(pid);
        match status {
            Ok(status) => describe(status),
            Err(e) => format!("ended with an unknown status ({e})"),
        }
    }

    /// Kills the child at once, with its process group, and says how it
    /// ended.
    pub(crate) async fn kill(mut self) -> String {
        let pid = self.pid;
        let Some(child) = self.child.as_mut() else {
            return "was already reaped".to_string();
        };
        kill_group(pid);
        let _ = child.start_kill();
        let how = match tokio::time::timeout(REAP_WAIT, child.wait()).await {
            Ok(Ok(status)) => describe(status),
            Ok(Err(e)) => format!("ended with an unknown status ({e})"),
            Err(_) => return "did not exit after SIGKILL".to_string(),
        };
        self.child = None;
        kill_group(pid);
        how
    }

    /// Lets an idle child go: closes its socket, so that it exits, and
    /// reaps it in the background (killing its group if it lingers).
    pub(crate) fn retire(mut self) {
        if let Some(child) = self.child.take() {
            self.reaper.reap(child, self.pid, REAP_WAIT);
        }
        // Dropping `self` closes the socket: the child sees the end.
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
