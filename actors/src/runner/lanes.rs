//! The threads of a Thread or Cpu stage: its own, one per batch out.
//!
//! A batch runs on a thread the stage owns: an idle one if there is one,
//! else a new one, which goes back to the idle list when the batch is done.
//! A stage has at most `workers` batches out, so it keeps at most `workers`
//! threads, idle or busy, besides the threads it gave up. Each thread has
//! the runtime it was started from entered, as tokio's blocking threads do,
//! so handlers may use `Handle::current()`.
//!
//! A thread is given up when the worker stops waiting for its batch: an
//! attempt ran past the stage's timeout, or the worker was killed (abort).
//! Its attempt cannot be stopped, so the thread is left to finish it and is
//! then let go, never reused; until then it counts as *stuck*
//! (`StageStats::stuck_threads`) and the stage runs its next batches on
//! other threads. Every thread is detached: nothing waits for it, so a
//! handler that never returns costs its thread (its stack and whatever the
//! handler holds) for as long as the process lives, and never keeps the
//! program from exiting.
//!
//! Under tokio's paused clock (tests), the runtime moves time on whenever
//! it has nothing to do, unless a `spawn_blocking` task runs: a worker
//! waiting for its thread would see its timers fire at once. So while time
//! is paused, a waiting worker also holds a `spawn_blocking` task that
//! ends with the batch or when the worker stops waiting ([`Inhibit`]),
//! never later.
//!
//! Why not tokio's blocking pool or a rayon pool: in tokio's pool (512
//! threads, shared with the whole program) stuck attempts add up until
//! neither the stage nor anything else in the program gets a thread, and
//! the runtime waits for them when it shuts down, so the program never
//! exits; in a rayon pool of `workers` threads, batches queue behind the
//! stuck ones and never start.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// A batch, run on a stage thread; it reports its items itself, and says
/// through [`Ending`] when its handler calls are over.
pub(crate) type Batch = Box<dyn FnOnce(&Ending) -> Result<(), String> + Send>;

/// Told by a batch when it has run its last handler call and only reports
/// are left: a worker that stops waiting after that (the pipeline ends on
/// the last report) leaves a thread that is finishing, not stuck.
pub(crate) struct Ending(Arc<AtomicBool>);

impl Ending {
    /// No more user code runs in this batch.
    pub(crate) fn now(&self) {
        self.0.store(true, Ordering::Release);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The threads of one stage.
pub(crate) struct Lanes {
    stage: String,
    /// Thread names are `{prefix}-{n}`.
    prefix: String,
    idle: Mutex<Vec<Lane>>,
    /// Threads started so far.
    started: AtomicUsize,
    /// Threads given up and still running (the stage's gauge).
    stuck: Arc<AtomicUsize>,
}

/// A thread of the stage, waiting for jobs.
struct Lane {
    jobs: mpsc::Sender<Job>,
}

impl Lanes {
    /// The threads of stage `stage`, named `{prefix}-{n}`; `stuck` counts
    /// those given up and still running.
    pub(crate) fn new(stage: &str, prefix: String, stuck: Arc<AtomicUsize>) -> Self {
        Lanes {
            stage: stage.to_string(),
            prefix,
            idle: Mutex::new(Vec::new()),
            started: AtomicUsize::new(0),
            stuck,
        }
    }

    /// Runs `batch` on one of the stage's threads and waits for its end. If
    /// this future is dropped before (the worker gave up the batch at the
    /// timeout, or was killed), the thread is given up.
    pub(crate) async fn run(&self, batch: Batch) -> Result<(), String> {
        let inhibit = Inhibit::if_paused();
        let ended = Arc::new(AtomicBool::new(false));
        let mut held = Held {
            lanes: self,
            lane: Some(self.take()?),
            ended: ended.clone(),
            _inhibit: inhibit.clone(),
        };
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let result = batch(&Ending(ended.clone()));
            // Before the send: a worker stopped after the batch's last
            // report and before this wakes it has no stuck thread.
            ended.store(true, Ordering::Release);
            let _ = done.send(result);
            // After the send, which wakes the worker.
            drop(inhibit);
        });
        let lane = held.lane.as_ref().expect("held until the batch ends");
        if let Err(unsent) = lane.jobs.send(job) {
            held.lane = None; // it is gone: nothing to give up
            crate::contain::drop_logged(unsent, || "a batch its thread was gone for".into());
            return Err(format!("a thread of stage `{}` ended", self.stage));
        }
        let result = result.await;
        if let Some(lane) = held.lane.take() {
            self.give_back(lane);
        }
        result.unwrap_or_else(|_| {
            Err(format!(
                "a thread of stage `{}` ended without reporting",
                self.stage
            ))
        })
    }

    fn take(&self) -> Result<Lane, String> {
        if let Some(lane) = self.lock().pop() {
            return Ok(lane);
        }
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let (jobs, inbox) = mpsc::channel::<Job>();
        // Handlers may use the runtime (`Handle::current().block_on(..)`),
        // as on tokio's blocking threads; entering it waits for nothing.
        let runtime = tokio::runtime::Handle::try_current().ok();
        std::thread::Builder::new()
            .name(format!("{}-{n}", self.prefix))
            .spawn(move || {
                let _entered = runtime.as_ref().map(tokio::runtime::Handle::enter);
                while let Ok(job) = inbox.recv() {
                    // Jobs contain their own panics; this guards a thread
                    // that nobody joins.
                    if let Err(payload) =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
                    {
                        crate::contain::drop_payload(payload);
                    }
                }
            })
            .map_err(|e| format!("cannot start a thread for stage `{}`: {e}", self.stage))?;
        Ok(Lane { jobs })
    }

    fn give_back(&self, lane: Lane) {
        self.lock().push(lane);
    }

    /// Leaves `lane` to finish its batch, counted as stuck until then; it
    /// ends after.
    fn give_up(&self, lane: Lane) {
        let stuck = self.stuck.fetch_add(1, Ordering::Relaxed) + 1;
        let count = self.stuck.clone();
        // Runs once the batch is over; then the channel is closed, and the
        // thread ends.
        let leave: Job = Box::new(move || {
            count.fetch_sub(1, Ordering::Relaxed);
        });
        if let Err(mpsc::SendError(leave)) = lane.jobs.send(leave) {
            leave(); // the thread is gone already
        }
        tracing::debug!(target: "bergtalzug::stage",
            stage = %self.stage,
            "a thread was given up while it runs an attempt; {stuck} thread(s) of the stage are stuck so"
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Lane>> {
        // Nothing that can panic runs under the lock.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A thread running a batch for a worker that waits for it; given up if
/// the worker stops waiting.
struct Held<'a> {
    lanes: &'a Lanes,
    lane: Option<Lane>,
    /// The batch has ended (the thread is about to take its next job).
    ended: Arc<AtomicBool>,
    _inhibit: Option<Inhibit>,
}

/// Keeps tokio's paused clock from moving on by itself while a worker
/// waits for its thread: a `spawn_blocking` task (which tokio counts) that
/// ends once either side (the batch, the waiting worker) lets go of its
/// handle.
#[derive(Clone)]
struct Inhibit(mpsc::Sender<()>);

impl Inhibit {
    /// One, if tokio's clock is paused.
    fn if_paused() -> Option<Inhibit> {
        if !clock_paused() {
            return None;
        }
        let (tx, rx) = mpsc::channel::<()>();
        // Ends at the first `()`, sent when a handle is dropped; nobody
        // waits for it.
        drop(tokio::task::spawn_blocking(move || rx.recv()));
        Some(Inhibit(tx))
    }
}

impl Drop for Inhibit {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// Whether tokio's clock is paused (tests only): it stands still while the
/// real clock moves. Without tokio's `test-util`, or unpaused, its clock is
/// the real one. (The real clock ticks within nanoseconds on the platforms
/// tokio supports; one that has not ticked after a short spin counts as
/// "not paused".)
fn clock_paused() -> bool {
    let before = tokio::time::Instant::now();
    let real = std::time::Instant::now();
    let ticked = (0..10_000).any(|_| std::time::Instant::now() != real);
    ticked && tokio::time::Instant::now() == before
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(lane) = self.lane.take() {
            if self.ended.load(Ordering::Acquire) {
                // Its batch is over: the thread is idle, not stuck.
                self.lanes.give_back(lane);
            } else {
                self.lanes.give_up(lane);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thread_given_up_is_stuck_until_its_batch_ends_and_never_reused() {
        let stuck = Arc::new(AtomicUsize::new(0));
        let lanes = Lanes::new("s", "s-thread".into(), stuck.clone());
        let (release, hold) = mpsc::channel::<()>();
        let blocked = lanes.run(Box::new(move |_| {
            let _ = hold.recv();
            Ok(())
        }));
        // The worker stops waiting: the thread is given up.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), blocked)
                .await
                .is_err()
        );
        assert_eq!(stuck.load(Ordering::SeqCst), 1);
        // The next batch runs on a new thread, which is then reused.
        lanes.run(Box::new(|_| Ok(()))).await.unwrap();
        lanes.run(Box::new(|_| Ok(()))).await.unwrap();
        assert_eq!(lanes.started.load(Ordering::SeqCst), 2);
        // Once its batch ends, the stuck thread leaves.
        release.send(()).unwrap();
        for _ in 0..500 {
            if stuck.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stuck.load(Ordering::SeqCst), 0);
        lanes.run(Box::new(|_| Ok(()))).await.unwrap();
        assert_eq!(lanes.started.load(Ordering::SeqCst), 2, "never reused");
        assert_eq!(lanes.lock().len(), 1);
    }

    /// A worker stopped after its batch ended but before it heard so (the
    /// batch's last report went, the pipeline finished, the worker was
    /// stopped) leaves no stuck thread: the thread is idle and reused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thread_whose_batch_ended_is_not_stuck_when_its_worker_stops_waiting() {
        let stuck = Arc::new(AtomicUsize::new(0));
        let lanes = Lanes::new("s", "s-thread".into(), stuck.clone());
        let (ran, has_run) = mpsc::channel::<()>();
        let (go, wait_for_go) = mpsc::channel::<()>();
        {
            let mut waiting = std::pin::pin!(lanes.run(Box::new(move |_| {
                let _ = wait_for_go.recv_timeout(Duration::from_secs(5));
                let _ = ran.send(());
                Ok(())
            })));
            // Sends the batch, which waits for `go`: it has not ended yet.
            assert!(futures::poll!(waiting.as_mut()).is_pending());
            go.send(()).unwrap();
            has_run.recv_timeout(Duration::from_secs(5)).unwrap();
            // Its end is marked right after the batch returns.
            std::thread::sleep(Duration::from_millis(50));
        } // dropped before it was told
        assert_eq!(
            stuck.load(Ordering::SeqCst),
            0,
            "an idle thread is not stuck"
        );
        lanes.run(Box::new(|_| Ok(()))).await.unwrap();
        assert_eq!(
            lanes.started.load(Ordering::SeqCst),
            1,
            "the idle thread is reused"
        );
    }
}
