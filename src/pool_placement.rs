//! Where a node's pool may live. A thin pool over-commits its filesystem
//! (20 times by default): on the filesystem that holds the host's system and
//! the kubelet's folder, a few busy volumes fill the disk the node itself
//! needs. The node plugin can refuse such a pool (`--refuse-system-filesystem`,
//! which the Helm chart sets unless `node.pool.allowSystemFilesystem`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The device of `path`, or of its nearest existing parent (a pool folder is
/// created on first start).
fn device_of(path: &Path) -> std::io::Result<u64> {
    let mut p = path;
    loop {
        match std::fs::metadata(p) {
            Ok(m) => return Ok(m.dev()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match p.parent() {
                Some(parent) => p = parent,
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
}

/// Err when `pool` is on the same filesystem as any of `system` (the root
/// folder, the kubelet's folder), saying what to do instead.
pub fn refuse_system_filesystem(pool: &Path, system: &[&Path]) -> Result<(), String> {
    let pool_dev = device_of(pool).map_err(|e| format!("pool {}: {e}", pool.display()))?;
    for s in system {
        let Ok(dev) = device_of(s) else { continue };
        if dev == pool_dev {
            return Err(format!(
                "pool {} is on the same filesystem as {}: thin volumes over-commit their filesystem, and a full pool \
                 would fill the disk this node's system and kubelet need. Mount a dedicated disk at {}, or accept the \
                 risk on purpose: leave out --refuse-system-filesystem (Helm: node.pool.allowSystemFilesystem=true)",
                pool.display(),
                s.display(),
                pool.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_beside_the_kubelet_folder_is_refused_and_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let kubelet = dir.path().join("kubelet");
        std::fs::create_dir(&kubelet).unwrap();
        let pool = dir.path().join("not-yet").join("pool");
        let err = refuse_system_filesystem(&pool, &[&kubelet]).unwrap_err();
        assert!(err.contains("same filesystem as") && err.contains("allowSystemFilesystem"), "{err}");
        // /proc is another filesystem: no conflict.
        assert!(refuse_system_filesystem(&pool, &[Path::new("/proc")]).is_ok());
    }
}
