//! The pool's freezer on a node: the filesystem mounted from a volume's
//! image (through its loop device) is found in the mount table and frozen
//! with a watchdog (`attach::freeze`), so a snapshot of a volume in use is
//! clean, not merely crash-consistent.

use std::path::Path;
use std::time::Duration;

use crate::attach::freeze::{self, Frozen};
use crate::attach::mount::mount_table;
use crate::volume::freeze::{Freezer, Thaw};

use super::host::{is_node_bind, mounts_of_image};

pub struct MountedFilesystems;

impl Freezer for MountedFilesystems {
    fn freeze(&self, image: &Path, max: Duration) -> Result<Option<Box<dyn Thaw>>, String> {
        let table = mount_table().map_err(|e| e.to_string())?;
        let mounts = mounts_of_image(&table, image).map_err(|e| e.to_string())?;
        // Every mount of the filesystem shares one superblock: freezing
        // through one freezes it. Raw block volumes (a device node bound on
        // a file) have no filesystem the node knows; read-only ones are at rest.
        let writable = mounts.iter().find(|(m, _)| !is_node_bind(m) && !m.super_options.iter().any(|o| o == "ro"));
        let Some((m, dev)) = writable else { return Ok(None) };
        let frozen = freeze::freeze(&m.mount_point, max).map_err(|e| e.to_string())?;
        tracing::debug!(image = %image.display(), device = %dev.path().display(), mount_point = %m.mount_point.display(), "frozen for a snapshot");
        Ok(Some(Box::new(frozen)))
    }
}

impl Thaw for Frozen {
    fn thaw(self: Box<Self>) -> Result<(), String> {
        Frozen::thaw(*self).map_err(|e| e.to_string())
    }
}
