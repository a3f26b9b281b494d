//! A loop device bound from a mount namespace that is gone (the node
//! plugin's container, since restarted) shows in sysfs a path relative to
//! its file system's root, e.g. `/vol.img`. The plugin must still find it by
//! the image's own path (same device and inode), or a restarted plugin can
//! neither unpublish nor unstage the volumes of running pods.
//! Seen on the kubelet cluster (scripts/test-cluster.sh): NodeUnpublishVolume
//! answered FAILED_PRECONDITION "holds /dev/loopN (/volumes/vol-x.img),
//! which is not volume vol-x" after the plugin pod was deleted.

mod common;

use std::process::Command;

use cinderblock::attach::loopdev;

/// Detaches the device on drop, even when the test fails.
struct Attached(String);

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).stderr(std::process::Stdio::null()).status();
    }
}

#[test]
fn loop_bound_in_a_gone_mount_namespace_is_found_by_its_image() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let image = pool.join("vol.img");
    std::fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
    // A decoy of the same name in another folder: never matched.
    let decoy = elsewhere.join("vol.img");
    std::fs::File::create(&decoy).unwrap().set_len(16 << 20).unwrap();

    // Bind the image through a mount that exists only in a short-lived
    // mount namespace, as the plugin's container sees its pool.
    let script = format!(
        "mount --bind '{}' '{}' && exec losetup --find --show '{}/vol.img'",
        pool.display(),
        elsewhere.display(),
        elsewhere.display()
    );
    let out = Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().expect("running unshare");
    assert!(out.status.success(), "unshare + losetup failed: {}", String::from_utf8_lossy(&out.stderr));
    let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let _guard = Attached(device.clone());
    let number: u32 = device.trim_start_matches("/dev/loop").parse().expect("a /dev/loopN path");

    let (shown, _) = loopdev::sysfs_backing_file(number).unwrap().expect("the device is bound");
    assert_ne!(shown, image, "sysfs shows the path of the gone mount, not the image's");

    let found = loopdev::find_by_backing_file(&image).unwrap().expect("the device bound to the image");
    assert_eq!(found.number, number);
    assert!(loopdev::is_bound_to(number, &image).unwrap());
    assert!(!loopdev::is_bound_to(number, &decoy).unwrap(), "a file of the same name elsewhere is another file");
    assert!(loopdev::find_by_backing_file(&decoy).unwrap().is_none_or(|d| d.number != number));

    loopdev::detach(&found).unwrap();
    assert!(loopdev::find_by_backing_file(&image).unwrap().is_none(), "detached");
}
