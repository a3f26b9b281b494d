//! What the node can tell about a volume's health from its pool: the image
//! is there, the pool's filesystem still takes writes, the volume is not
//! broken. The controller puts it in the CSI VolumeCondition
//! (ControllerGetVolume, ListVolumes); the node plugin adds what only the
//! host of the mount sees (NodeGetVolumeStats).

use super::pool::Pool;

impl Pool {
    /// Why volume `id` is not healthy here, or None. Cheap: a stat and a
    /// statvfs, no data read.
    pub fn volume_problem(&self, id: &str) -> Option<String> {
        if let Some(b) = self.broken().into_iter().find(|b| b.kind == "volume" && b.id == id) {
            return Some(format!("its image is broken on this node: {}", b.reason));
        }
        let image = self.volume_image(id);
        match std::fs::symlink_metadata(&image) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Some(format!("its image {} is not a regular file any more; a person must look at the pool", image.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Some(format!(
                    "its image {} is missing from the pool; data written to it now is lost: copy out what a pod still sees, then restore from a snapshot",
                    image.display()
                ))
            }
            Err(e) => return Some(format!("its image {} cannot be inspected: {e}", image.display())),
        }
        match rustix::fs::statvfs(self.root()) {
            Ok(s) if s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) => Some(format!(
                "the pool's filesystem at {} is read-only (remounted after errors?); writes fail: see the node's kernel log",
                self.root().display()
            )),
            Ok(_) => None,
            Err(e) => Some(format!("the pool's filesystem at {} cannot be inspected: {e}", self.root().display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::volume::pool::{CreateVolume, Pool, PoolConfig};
    use crate::volume::Provisioning;

    #[test]
    fn a_missing_image_is_a_problem_a_present_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
        let req = CreateVolume {
            id: "vol-h".into(),
            size_bytes: 1 << 20,
            provisioning: Provisioning::Thin,
            source: None,
            metadata: Default::default(),
        };
        pool.create_volume(req).unwrap();
        assert_eq!(pool.volume_problem("vol-h"), None);
        std::fs::remove_file(pool.volume_image("vol-h")).unwrap();
        let why = pool.volume_problem("vol-h").expect("a missing image is a problem");
        assert!(why.contains("missing"), "{why}");
    }
}
