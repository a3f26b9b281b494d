//! Keeping something in memory current from a store: one full read, then
//! each change of the store's feed applied in order, and a full read again
//! whenever the reader falls behind the feed. The controller's node view
//! (`scheduler::view`) and its index of publications
//! (`controller::publications`) follow the store this way.
//!
//! A caller that must see every write the store answered before it asks
//! (read your writes) waits for `Progress::caught_up(store.change_seq())`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tracing::warn;

use super::{Change, Store, StoreError};

/// What is kept: read whole from the store, then changed change by change.
#[tonic::async_trait]
pub trait Follower: Send + Sync + 'static {
    /// What it is, for the logs.
    fn what(&self) -> &'static str;
    /// Replace what is kept with what the store holds now.
    async fn load(&self, store: &dyn Store) -> Result<(), StoreError>;
    /// Apply one change of the feed (changes of other kinds are ignored).
    fn apply(&self, change: Change);
}

/// How far a follower has got.
pub struct Progress {
    /// True once the first full read is in.
    loaded: watch::Sender<bool>,
    /// The number of the store's last change applied.
    applied: watch::Sender<u64>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress { loaded: watch::channel(false).0, applied: watch::channel(0).0 }
    }
}

impl Progress {
    /// Waits (at most `patience`) until the first full read is in and every
    /// change up to the store's change `seq` is applied: then the follower
    /// holds every write the store answered before `seq` was read.
    pub async fn caught_up(&self, seq: u64, patience: Duration) -> bool {
        let mut loaded = self.loaded.subscribe();
        let mut applied = self.applied.subscribe();
        let waited = tokio::time::timeout(patience, async {
            loaded.wait_for(|l| *l).await.is_ok() && applied.wait_for(|a| *a >= seq).await.is_ok()
        });
        waited.await.unwrap_or(false)
    }
}

/// Spawn the task that keeps `follower` current from `store`. It holds the
/// store weakly (so the store, and its file, close once everyone else has
/// let go of it) and ends when the store is gone.
pub fn spawn<F: Follower>(store: &Arc<dyn Store>, follower: Arc<F>, progress: Arc<Progress>) {
    let weak = Arc::downgrade(store);
    tokio::spawn(async move { run(weak, &*follower, &progress).await });
}

async fn run<F: Follower>(weak: Weak<dyn Store>, follower: &F, progress: &Progress) {
    loop {
        let Some(store) = weak.upgrade() else { return };
        let mut feed = store.changes();
        // Every change up to `base` was committed before the read below
        // starts, so the read holds it; later ones are applied in order.
        let base = store.change_seq();
        if let Err(e) = follower.load(&*store).await {
            warn!(what = follower.what(), error = %e, "reading the store failed; trying again");
            drop(store);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        drop(store);
        progress.loaded.send_replace(true);
        progress.applied.send_if_modified(|a| {
            let moved = *a < base;
            *a = (*a).max(base);
            moved
        });
        loop {
            match feed.recv().await {
                Ok((seq, _)) if seq <= base => {}
                Ok((seq, change)) => {
                    follower.apply(change);
                    progress.applied.send_replace(seq);
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    warn!(what = follower.what(), missed, "fell behind the store's changes; reading the store again");
                    break;
                }
                // The store is gone: the process is stopping.
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}
