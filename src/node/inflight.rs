//! One call at a time per volume. A second call on a volume that is busy is
//! answered ABORTED at once (the CSI sidecars and kubelet retry it), rather
//! than queued behind a mkfs or racing the first call over the same mount.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::error::NodeError;

#[derive(Default, Clone)]
pub struct InFlight {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held for the whole call; frees the volume when dropped.
#[must_use]
pub struct VolumeGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl InFlight {
    pub fn try_begin(&self, id: &str) -> Result<VolumeGuard, NodeError> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(id.to_string()) {
            return Err(NodeError::Busy { id: id.to_string() });
        }
        Ok(VolumeGuard { busy: self.busy.clone(), id: id.to_string() })
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_call_on_a_volume_is_aborted_until_the_first_ends() {
        let f = InFlight::default();
        let a = f.try_begin("vol-a").unwrap();
        assert!(matches!(f.try_begin("vol-a"), Err(NodeError::Busy { .. })));
        let b = f.try_begin("vol-b").unwrap(); // other volumes are independent
        drop(a);
        let _a2 = f.try_begin("vol-a").unwrap();
        drop(b);
        assert!(f.try_begin("vol-b").is_ok());
    }

    #[test]
    fn a_panicking_holder_still_frees_the_volume() {
        let f = InFlight::default();
        let f2 = f.clone();
        let r = std::thread::spawn(move || {
            let _g = f2.try_begin("vol-p").unwrap();
            panic!("boom");
        })
        .join();
        assert!(r.is_err());
        assert!(f.try_begin("vol-p").is_ok());
    }
}
