//! The one lock primitive: locks named by keys (volume and snapshot IDs,
//! record keys). A call holds every key it touches for its whole run and
//! takes them all at once, so two calls never deadlock. Three ways to ask,
//! one state:
//!
//! - `lock`: wait on this thread (the volume manager, which runs on blocking
//!   threads);
//! - `lock_async`: wait as a task (the controller: a second CreateVolume of
//!   the same name waits for the first, then sees its result);
//! - `try_lock`: do not wait (the node service answers ABORTED at once, and
//!   the sidecars or the kubelet retry).
//!
//! A guard frees its keys when dropped, also when its holder panics.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Default, Clone)]
pub struct KeyedLocks {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    held: Mutex<HashSet<String>>,
    /// Wakes threads waiting in `lock`.
    released: Condvar,
    /// Wakes tasks waiting in `lock_async`.
    released_async: tokio::sync::Notify,
}

/// Holds its keys until dropped.
#[must_use = "the keys are free again as soon as the guard is dropped"]
pub struct KeyGuard {
    inner: Arc<Inner>,
    keys: Vec<String>,
}

fn wanted<K: AsRef<str>>(keys: &[K]) -> Vec<String> {
    let mut keys: Vec<String> = keys.iter().map(|k| k.as_ref().to_string()).collect();
    keys.sort();
    keys.dedup();
    keys
}

impl Inner {
    fn held(&self) -> MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl KeyedLocks {
    /// Takes every key if none is held; `None` otherwise (nothing taken).
    pub fn try_lock<K: AsRef<str>>(&self, keys: &[K]) -> Option<KeyGuard> {
        let keys = wanted(keys);
        let mut held = self.inner.held();
        self.take(&mut held, keys)
    }

    /// Blocks this thread until every key is free, then holds them all.
    pub fn lock<K: AsRef<str>>(&self, keys: &[K]) -> KeyGuard {
        let keys = wanted(keys);
        let mut held = self.inner.held();
        while keys.iter().any(|k| held.contains(k)) {
            held = self.inner.released.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        self.take(&mut held, keys).expect("every key is free")
    }

    /// Waits as a task until every key is free, then holds them all.
    pub async fn lock_async<K: AsRef<str>>(&self, keys: &[K]) -> KeyGuard {
        let keys = wanted(keys);
        loop {
            // Registered before looking, so a release between the look and
            // the wait is not missed.
            let released = self.inner.released_async.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(guard) = self.take(&mut self.inner.held(), keys.clone()) {
                return guard;
            }
            released.await;
        }
    }

    /// True when some call holds `key` now.
    pub fn is_held(&self, key: &str) -> bool {
        self.inner.held().contains(key)
    }

    fn take(&self, held: &mut HashSet<String>, keys: Vec<String>) -> Option<KeyGuard> {
        if keys.iter().any(|k| held.contains(k)) {
            return None;
        }
        held.extend(keys.iter().cloned());
        Some(KeyGuard { inner: self.inner.clone(), keys })
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        {
            let mut held = self.inner.held();
            for k in &self.keys {
                held.remove(k);
            }
        }
        self.inner.released.notify_all();
        self.inner.released_async.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_held_key_refuses_a_try_and_frees_on_drop() {
        let locks = KeyedLocks::default();
        let a = locks.try_lock(&["vol-a"]).unwrap();
        assert!(locks.try_lock(&["vol-a"]).is_none());
        assert!(locks.try_lock(&["vol-b", "vol-a"]).is_none(), "all or nothing");
        assert!(!locks.is_held("vol-b"), "a refused try takes nothing");
        let b = locks.try_lock(&["vol-b"]).unwrap();
        drop(a);
        assert!(locks.try_lock(&["vol-a"]).is_some());
        drop(b);
        assert!(!locks.is_held("vol-b"));
    }

    #[test]
    fn a_panicking_holder_still_frees_its_keys() {
        let locks = KeyedLocks::default();
        let l2 = locks.clone();
        let r = std::thread::spawn(move || {
            let _g = l2.lock(&["vol-p"]);
            panic!("boom");
        })
        .join();
        assert!(r.is_err());
        assert!(locks.try_lock(&["vol-p"]).is_some());
    }

    #[test]
    fn threads_on_overlapping_keys_never_run_together_nor_deadlock() {
        let locks = KeyedLocks::default();
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (locks, inside) = (locks.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        // Every pair shares "k1" with some order of the other keys.
                        let keys = if i % 2 == 0 { ["k1", "k2"] } else { ["k2", "k1"] };
                        let _g = locks.lock(&keys);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders of one key");
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_waits_for_a_thread_that_holds_the_key() {
        let locks = KeyedLocks::default();
        let held = locks.lock(&["vol-w"]);
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock_async(&["vol-w"]).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the task took a held key");
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("the task woke when the key was freed").unwrap();
        assert!(!locks.is_held("vol-w"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_tasks_on_one_key_take_turns() {
        let locks = KeyedLocks::default();
        let inside = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (locks, inside) = (locks.clone(), inside.clone());
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let _g = locks.lock_async(&["one"]).await;
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        tokio::task::yield_now().await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(30), t).await.expect("no task starves").unwrap();
        }
    }
}
