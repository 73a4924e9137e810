//! Admission and ordering of the agent's kernel work. Every verb that enters a pod's namespace
//! goes through [`Work::run`]:
//! - verbs on one container run one at a time, in arrival order (a per-container lock), so two
//!   ADDs, or an ADD and a DEL, of one pod never interleave their kernel steps;
//! - at most `workers` of them run at once (each holds one netns thread and one netlink
//!   connection), and at most `queue` more may wait; past that a caller is told at once that the
//!   agent is saturated (the plugin's code 11: the runtime retries), instead of piling up
//!   threads and file descriptors;
//! - a caller that hangs up before its work starts cancels it; work that has started runs to
//!   completion, including recording its result, so the kernel and the agent's records never
//!   disagree because a client went away.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Mutex as AsyncMutex, Semaphore};

/// Kernel work running at once, by default: one job per netns worker thread (two cores' worth
/// of netlink round trips with room for waits on the kernel).
pub const DEFAULT_WORKERS: usize = crate::kernel::netns::MAX_WORKERS;
/// Callers that may wait for a worker, by default. A node starts pods a few at a time; 128
/// waiting is a storm, and beyond it answering "try again" quickly is kinder than queueing.
pub const DEFAULT_QUEUE: usize = 128;
/// The longest a caller without a deadline (the reconciler) waits for its turn; a call's own
/// deadline bounds its wait sooner (`run_within`).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkError {
    #[error(
        "the agent is saturated: {running} pod operations running and {waiting} waiting (limit {queue}); try again"
    )]
    Saturated {
        running: usize,
        waiting: usize,
        queue: usize,
    },
    #[error("no worker became free within {0:?}; try again")]
    WaitedTooLong(Duration),
    #[error("the agent is shutting down")]
    Gone,
}

#[derive(Debug)]
pub struct Work {
    slots: Arc<Semaphore>,
    workers: usize,
    waiting: Arc<AtomicUsize>,
    queue: usize,
    wait: Duration,
    keys: Mutex<HashMap<String, Weak<AsyncMutex<()>>>>,
}

impl Default for Work {
    fn default() -> Self {
        Self::new(DEFAULT_WORKERS, DEFAULT_QUEUE, DEFAULT_WAIT)
    }
}

/// Decrements the waiting count once, when the work starts or is abandoned.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Work {
    pub fn new(workers: usize, queue: usize, wait: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(workers.max(1))),
            workers: workers.max(1),
            waiting: Arc::default(),
            queue,
            wait,
            keys: Mutex::default(),
        }
    }

    /// Operations running now and waiting now (for metrics and errors).
    pub fn load(&self) -> (usize, usize) {
        (
            self.workers - self.slots.available_permits(),
            self.waiting.load(Ordering::Acquire),
        )
    }

    /// The lock of one container, shared by every verb on it while any holds or awaits it.
    fn key_lock(&self, key: &str) -> Arc<AsyncMutex<()>> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = keys.get(key).and_then(Weak::upgrade) {
            return lock;
        }
        // Entries of finished containers are dropped here, so the map holds at most the
        // containers with work in flight (plus this one).
        keys.retain(|_, w| w.strong_count() > 0);
        let lock = Arc::new(AsyncMutex::new(()));
        keys.insert(key.to_owned(), Arc::downgrade(&lock));
        lock
    }

    /// Runs `work` for container `key` under the rules in the module docs.
    pub async fn run<T, F>(&self, key: &str, work: F) -> Result<T, WorkError>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        self.run_within(key, self.wait, work).await
    }

    /// [`Work::run`], waiting for a turn at most `limit` (and never longer than the configured
    /// wait): the caller's deadline, so a waiter whose caller has given up leaves the queue
    /// when its caller does, instead of holding a place until the configured wait runs out.
    pub async fn run_within<T, F>(
        &self,
        key: &str,
        limit: Duration,
        work: F,
    ) -> Result<T, WorkError>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let waiting = self.waiting.fetch_add(1, Ordering::AcqRel) + 1;
        let guard = Waiting(self.waiting.clone());
        if waiting > self.queue {
            let (running, _) = self.load();
            drop(guard);
            return Err(WorkError::Saturated {
                running,
                waiting: waiting - 1,
                queue: self.queue,
            });
        }
        let lock = self.key_lock(key);
        let slots = self.slots.clone();
        let wait = self.wait.min(limit);
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Detached, so that once started the work finishes even if the caller hangs up.
        tokio::spawn(async move {
            let admitted = tokio::time::timeout(wait, async {
                let key_guard = lock.lock_owned().await;
                let slot = slots.acquire_owned().await.ok()?;
                Some((key_guard, slot))
            })
            .await;
            drop(guard);
            let result = match admitted {
                Err(_) => Err(WorkError::WaitedTooLong(wait)),
                Ok(None) => Err(WorkError::Gone),
                // The caller hung up while waiting: never start.
                Ok(Some(_)) if tx.is_closed() => return,
                Ok(Some((_key, _slot))) => Ok(work.await),
            };
            let _ = tx.send(result);
        });
        rx.await.unwrap_or(Err(WorkError::Gone))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// Polls `cond` (every millisecond, for at most 10 s).
    async fn until(cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "condition never held");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_container_runs_one_verb_at_a_time_and_others_run_beside_it() {
        let work = Arc::new(Work::new(4, 32, Duration::from_secs(5)));
        let busy = Arc::new(AtomicBool::new(false));
        let overlaps = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (work, busy, overlaps) = (work.clone(), busy.clone(), overlaps.clone());
            tasks.push(tokio::spawn(async move {
                work.run("pod-a", async move {
                    if busy.swap(true, Ordering::SeqCst) {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    busy.store(false, Ordering::SeqCst);
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("task"), Ok(()));
        }
        assert_eq!(overlaps.load(Ordering::SeqCst), 0);
        assert!(work.keys.lock().expect("keys").len() <= 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_queue_callers_are_told_to_try_again_at_once() {
        let work = Arc::new(Work::new(1, 1, Duration::from_secs(5)));
        let (release, hold) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        // One at a time, so the first is running before the second queues: (1, 0) then (1, 1).
        for (i, want) in [(0, (1, 0)), (1, (1, 1))] {
            let (w, mut hold) = (work.clone(), hold.clone());
            tasks.push(tokio::spawn(async move {
                w.run(&format!("pod-{i}"), async move {
                    let _ = hold.wait_for(|v| *v).await;
                })
                .await
            }));
            until(|| work.load() == want).await;
        }
        let started = std::time::Instant::now();
        let third = work.run("pod-2", async {}).await;
        assert_eq!(
            third,
            Err(WorkError::Saturated {
                running: 1,
                waiting: 1,
                queue: 1
            })
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused at once"
        );
        let _ = release.send(true);
        for t in tasks {
            assert_eq!(t.await.expect("task"), Ok(()));
        }
        assert_eq!(work.load(), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_whose_caller_left_before_it_started_never_runs() {
        let work = Arc::new(Work::new(1, 8, Duration::from_secs(5)));
        let (release, hold) = tokio::sync::watch::channel(false);
        let blocker = {
            let (work, mut hold) = (work.clone(), hold.clone());
            tokio::spawn(async move {
                work.run("pod-a", async move {
                    let _ = hold.wait_for(|v| *v).await;
                })
                .await
            })
        };
        until(|| work.load().0 == 1).await;
        let ran = Arc::new(AtomicBool::new(false));
        let caller = {
            let (work, ran) = (work.clone(), ran.clone());
            tokio::spawn(async move {
                work.run("pod-b", async move { ran.store(true, Ordering::SeqCst) })
                    .await
            })
        };
        until(|| work.load().1 == 1).await;
        caller.abort();
        let _ = caller.await;
        let _ = release.send(true);
        assert_eq!(blocker.await.expect("blocker"), Ok(()));
        // Idle again means the abandoned task had its turn: it holds a worker slot from its
        // admission until it has returned, having run its work or not.
        until(|| work.load() == (0, 0)).await;
        assert!(!ran.load(Ordering::SeqCst), "abandoned work never starts");
    }
}
