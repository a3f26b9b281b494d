//! Per-ID serialization: a call holds the IDs it touches (its own and its
//! source's) for its whole run; a second call on any of them waits. All IDs
//! of one call are taken at once, so two calls can never deadlock.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex};

#[derive(Default)]
pub struct KeyedLocks {
    held: Mutex<HashSet<String>>,
    released: Condvar,
}

pub struct KeyGuard<'a> {
    locks: &'a KeyedLocks,
    keys: Vec<String>,
}

impl KeyedLocks {
    /// Block until every key is free, then hold them all.
    pub fn lock(&self, keys: &[String]) -> KeyGuard<'_> {
        let mut keys: Vec<String> = keys.to_vec();
        keys.sort();
        keys.dedup();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while keys.iter().any(|k| held.contains(k)) {
            held = self.released.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        for k in &keys {
            held.insert(k.clone());
        }
        KeyGuard { locks: self, keys }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            held.remove(k);
        }
        self.locks.released.notify_all();
    }
}
