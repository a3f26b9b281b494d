//! The pool's freezer on a node: the filesystem mounted from a volume's
//! image (through its loop device) is found in the mount table and frozen
//! with a watchdog (`attach::freeze`), so a snapshot of a volume in use is
//! clean, not merely crash-consistent. A node that attaches other nodes'
//! volumes (`MountedFilesystems::remote`) also freezes, for a group snapshot, the
//! filesystem it has staged from such a volume (a loop device on the
//! attachment's backing path: the FUSE file or the nbd device).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::attach::freeze::{self, Frozen};
use crate::attach::mount::mount_table;
use crate::volume::freeze::{Freezer, Thaw};

use super::host::{is_node_bind, mounts_of_image};
use super::remote::Remote;

/// The filesystems mounted here from this pool's images, and (with
/// `remote`, on a node that attaches other nodes' volumes) those staged
/// here from other nodes' volumes, found from the node plugin's attachments.
#[derive(Default)]
pub struct MountedFilesystems {
    pub remote: Option<Arc<Remote>>,
}

impl Freezer for MountedFilesystems {
    fn freeze(&self, image: &Path, max: Duration) -> Result<Option<Box<dyn Thaw>>, String> {
        freeze_mounted(image, max).map(boxed)
    }

    fn freeze_consumed(&self, volume: &str, max: Duration) -> Result<Option<Box<dyn Thaw>>, String> {
        // Published here but not (or no longer) staged: nothing writes it here.
        let Some(backing) = self.remote.as_ref().and_then(|r| r.backing_of_blocking(volume)) else { return Ok(None) };
        let frozen = freeze_mounted(&backing, max)?;
        if let Some(f) = &frozen {
            let mount_point = f.mount_point().display();
            tracing::info!(volume.id = %volume, backing = %backing.display(), %mount_point, "filesystem of another node's volume frozen on this node, its consumer");
        }
        Ok(boxed(frozen))
    }
}

/// Freeze the writable filesystem mounted from `image` (a loop device's
/// backing file or device), if there is one.
fn freeze_mounted(image: &Path, max: Duration) -> Result<Option<Frozen>, String> {
    let table = mount_table().map_err(|e| e.to_string())?;
    let mounts = mounts_of_image(&table, image).map_err(|e| e.to_string())?;
    // Every mount of the filesystem shares one superblock: freezing
    // through one freezes it. Raw block volumes (a device node bound on
    // a file) have no filesystem the node knows; read-only ones are at rest.
    let writable = mounts.iter().find(|(m, _)| !is_node_bind(m) && !m.super_options.iter().any(|o| o == "ro"));
    let Some((m, dev)) = writable else { return Ok(None) };
    let frozen = freeze::freeze(&m.mount_point, max).map_err(|e| e.to_string())?;
    tracing::debug!(image = %image.display(), device = %dev.path().display(), mount_point = %m.mount_point.display(), "frozen for a snapshot");
    Ok(Some(frozen))
}

fn boxed(frozen: Option<Frozen>) -> Option<Box<dyn Thaw>> {
    frozen.map(|f| Box::new(f) as Box<dyn Thaw>)
}

impl Thaw for Frozen {
    fn thaw(self: Box<Self>) -> Result<(), String> {
        Frozen::thaw(*self).map_err(|e| e.to_string())
    }
}
