//! What the node can tell about a volume's health from its pool: the image
//! is there, the pool's filesystem still takes writes, the volume is not
//! broken. The controller puts it in the CSI VolumeCondition
//! (ControllerGetVolume, ListVolumes); the node plugin adds what only the
//! host of the mount sees (NodeGetVolumeStats).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use super::pool::Pool;

/// What a look at one volume's image found.
pub struct ImageLook {
    /// Why the volume is not healthy here, or None.
    pub problem: Option<String>,
    /// The blocks its image holds, in bytes (0 when it cannot be read).
    pub allocated_bytes: u64,
    /// Where its image is (or would be).
    pub image: std::path::PathBuf,
}

/// Looks at volumes of one pool for one answer: the pool's broken list and
/// its filesystem are read once, then each image costs one stat (a listing
/// of many volumes does not repeat the pool-wide checks per volume).
pub struct ImageLooker<'a> {
    pool: &'a Pool,
    broken: HashMap<String, String>,
    /// Why the pool's filesystem takes no writes, or None.
    filesystem: Option<String>,
}

impl Pool {
    /// A looker for one answer about any number of this pool's volumes.
    pub fn image_looker(&self) -> ImageLooker<'_> {
        let broken = self.broken().into_iter().filter(|b| b.kind == "volume").map(|b| (b.id, b.reason)).collect();
        let filesystem = match rustix::fs::statvfs(self.root()) {
            Ok(s) if s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) => Some(format!(
                "the pool's filesystem at {} is read-only (remounted after errors?); writes fail: see the node's kernel log",
                self.root().display()
            )),
            Ok(_) => None,
            Err(e) => Some(format!("the pool's filesystem at {} cannot be inspected: {e}", self.root().display())),
        };
        ImageLooker { pool: self, broken, filesystem }
    }
}

impl ImageLooker<'_> {
    /// Volume `id`'s image: broken, missing, not a file, on a filesystem
    /// that takes no writes, or healthy; and what it holds.
    pub fn look(&self, id: &str) -> ImageLook {
        let image = self.pool.volume_image(id);
        let (problem, allocated_bytes) = if let Some(reason) = self.broken.get(id) {
            (Some(format!("its image is broken on this node: {reason}")), 0)
        } else {
            match std::fs::symlink_metadata(&image) {
                Ok(m) if m.is_file() => (self.filesystem.clone(), m.blocks() * 512),
                Ok(_) => (Some(format!("its image {} is not a regular file any more; a person must look at the pool", image.display())), 0),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                    Some(format!(
                        "its image {} is missing from the pool; data written to it now is lost: copy out what a pod still sees, then restore from a snapshot",
                        image.display()
                    )),
                    0,
                ),
                Err(e) => (Some(format!("its image {} cannot be inspected: {e}", image.display())), 0),
            }
        };
        ImageLook { problem, allocated_bytes, image }
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
        assert_eq!(pool.image_looker().look("vol-h").problem, None);
        std::fs::remove_file(pool.volume_image("vol-h")).unwrap();
        let why = pool.image_looker().look("vol-h").problem.expect("a missing image is a problem");
        assert!(why.contains("missing"), "{why}");
    }
}
