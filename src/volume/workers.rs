//! Where the volume manager's blocking work runs, and how much of the heavy
//! part of it runs at once.
//!
//! The agent's calls (creates, snapshots, deletes: fsyncs, copies,
//! allocations) run on a fixed set of threads of their own, so a burst of
//! them queues here instead of taking the runtime's blocking threads, which
//! the CSI Node calls on the same process need. Heavy calls (a copy where the
//! pool has no reflink, a thick allocation) also pass a gate that lets a few
//! through at a time; the others wait their turn, for a bounded time.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

type Job = Box<dyn FnOnce() + Send>;

/// How many threads, how many heavy calls at once, and how long a heavy
/// call may wait for its turn.
#[derive(Debug, Clone)]
pub struct WorkLimits {
    pub threads: usize,
    pub heavy: usize,
    pub heavy_wait: Duration,
}

impl Default for WorkLimits {
    fn default() -> Self {
        // Copies are bound by the disk, not the CPU: a few at a time keep it
        // busy; the rest of the threads serve the light calls meanwhile.
        WorkLimits { threads: 16, heavy: 4, heavy_wait: Duration::from_secs(120) }
    }
}

/// A fixed set of threads that run closures in the order they come.
pub struct Workers {
    queue: mpsc::Sender<Job>,
}

impl Workers {
    pub fn new(name: &str, threads: usize) -> std::io::Result<Workers> {
        let (queue, jobs) = mpsc::channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        for i in 0..threads.max(1) {
            let jobs = jobs.clone();
            std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || loop {
                let next = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
                match next {
                    Ok(job) => job(),
                    Err(_) => return, // the Workers were dropped
                }
            })?;
        }
        Ok(Workers { queue })
    }

    /// Run `f` on one of the threads and wait for its result. Once queued,
    /// `f` runs to its end even if the caller stops waiting. A panic in `f`
    /// comes back as an error; the thread carries on.
    pub async fn run<T, F>(&self, f: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(f)));
        });
        self.queue.send(job).map_err(|_| "the worker threads have stopped".to_string())?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(panic)) => Err(panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a worker thread panicked".into())),
            Err(_) => Err("the worker thread dropped the call".into()),
        }
    }
}

/// Lets `limit` heavy calls run at once; the others queue (fairly, first
/// come first served) for at most `max_wait`.
pub struct HeavyGate {
    permits: Arc<Semaphore>,
    limit: usize,
    waiting: AtomicUsize,
    max_wait: Duration,
}

/// A heavy call that did not get its turn in time.
#[derive(Debug, Clone, PartialEq)]
pub struct Busy {
    pub running: usize,
    pub waiting: usize,
    pub waited: Duration,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the node is busy: {} heavy operations (copies without reflink, thick allocations) are running and {} more are waiting; this one waited {:.0} s: retry later or use another node",
            self.running,
            self.waiting,
            self.waited.as_secs_f64()
        )
    }
}

impl HeavyGate {
    pub fn new(limit: usize, max_wait: Duration) -> HeavyGate {
        let limit = limit.max(1);
        HeavyGate { permits: Arc::new(Semaphore::new(limit)), limit, waiting: AtomicUsize::new(0), max_wait }
    }

    /// Wait for a turn; the permit is the turn, given back when dropped.
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, Busy> {
        let started = Instant::now();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let got = tokio::time::timeout(self.max_wait, self.permits.clone().acquire_owned()).await;
        let waiting = self.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        match got {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it like a timeout anyway.
            Ok(Err(_)) | Err(_) => Err(Busy { running: self.limit - self.permits.available_permits(), waiting, waited: started.elapsed() }),
        }
    }

    /// Heavy calls running now.
    pub fn running(&self) -> usize {
        self.limit - self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_off_the_runtime_and_a_panic_is_an_error() {
        let w = Workers::new("test-worker", 2).unwrap();
        let name = w.run(|| std::thread::current().name().unwrap_or_default().to_string()).await.unwrap();
        assert!(name.starts_with("test-worker-"), "{name}");
        let e = w.run(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert!(e.contains("boom"), "{e}");
        assert_eq!(w.run(|| 7).await.unwrap(), 7, "the thread survives a panic");
    }

    #[tokio::test]
    async fn queued_work_finishes_even_when_the_caller_gives_up() {
        let w = Workers::new("test-worker", 1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let call = w.run(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(()).unwrap();
        });
        // Give the call a moment to be queued, then drop it.
        let _ = tokio::time::timeout(Duration::from_millis(5), call).await;
        rx.recv_timeout(Duration::from_secs(5)).expect("the work ran to its end");
    }

    #[tokio::test]
    async fn the_gate_lets_limit_through_and_the_rest_wait_their_turn() {
        let gate = Arc::new(HeavyGate::new(2, Duration::from_millis(200)));
        let a = gate.enter().await.unwrap();
        let _b = gate.enter().await.unwrap();
        assert_eq!(gate.running(), 2);
        // A third waits, then gives up with the reason.
        let busy = gate.enter().await.unwrap_err();
        assert_eq!((busy.running, busy.waiting), (2, 0));
        assert!(busy.waited >= Duration::from_millis(200));
        assert!(busy.to_string().contains("2 heavy operations"), "{busy}");
        // One finishing lets a waiting one in.
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.enter().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a);
        waiter.await.unwrap().unwrap();
    }
}
