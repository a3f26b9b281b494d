//! One operation at a time per record key inside this controller: a second
//! CreateVolume with the same name waits for the first, then sees its result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
pub struct Inflight {
    keys: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub struct InflightGuard<'a> {
    owner: &'a Inflight,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Inflight {
    pub async fn acquire(&self, key: &str) -> InflightGuard<'_> {
        let m = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.entry(key.to_string()).or_default().clone()
        };
        let guard = m.lock_owned().await;
        InflightGuard { owner: self, key: key.to_string(), guard: Some(guard) }
    }

    /// True when some operation holds `key` right now.
    pub fn busy(&self, key: &str) -> bool {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.get(key).is_some_and(|m| m.try_lock().is_err())
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut keys = self.owner.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.get(&self.key).is_some_and(|m| Arc::strong_count(m) == 1) {
            keys.remove(&self.key);
        }
    }
}
