//! One call at a time per volume. A second call on a volume that is busy is
//! answered ABORTED at once (the CSI sidecars and kubelet retry it), rather
//! than queued behind a mkfs or racing the first call over the same mount.

use super::error::NodeError;
use crate::keyed_locks::{KeyGuard, KeyedLocks};

#[derive(Default, Clone)]
pub struct InFlight {
    locks: KeyedLocks,
}

/// Held for the whole call; frees the volume when dropped.
pub type VolumeGuard = KeyGuard;

impl InFlight {
    pub fn try_begin(&self, id: &str) -> Result<VolumeGuard, NodeError> {
        self.locks.try_lock(&[id]).ok_or_else(|| NodeError::Busy { id: id.to_string() })
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
