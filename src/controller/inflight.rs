//! One operation at a time per record key inside this controller: a second
//! CreateVolume with the same name waits for the first, then sees its result.

use crate::keyed_locks::{KeyGuard, KeyedLocks};

#[derive(Default)]
pub struct Inflight {
    locks: KeyedLocks,
}

impl Inflight {
    pub async fn acquire(&self, key: &str) -> KeyGuard {
        self.locks.lock_async(&[key]).await
    }

    /// True when some operation holds `key` right now.
    pub fn busy(&self, key: &str) -> bool {
        self.locks.is_held(key)
    }
}
