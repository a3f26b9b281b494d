//! Starting `cinderblock node` with --refuse-system-filesystem (what the Helm
//! chart passes by default): a pool on the filesystem of the kubelet's folder
//! is refused with what to do; a pool on its own filesystem starts.

mod common;

use std::process::Command;

use common::*;

#[test]
fn a_pool_on_the_system_filesystem_is_refused_and_a_dedicated_one_starts() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = dir.path().join("kubelet");
    std::fs::create_dir(&kubelet).unwrap();
    let pool = dir.path().join("pool");
    let out = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
        .args(["node", "--refuse-system-filesystem", "--node-id", "n1", "--pool", pool.to_str().unwrap()])
        .args(["--kubelet-dir", kubelet.to_str().unwrap(), "--agent-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--endpoint", &format!("unix://{}", dir.path().join("csi.sock").display())])
        .args(["--tls-dir", dir.path().join("tls").to_str().unwrap()]) // checked after the pool's place
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must refuse: {stderr}");
    assert!(stderr.contains("is on the same filesystem as") && stderr.contains("Mount a dedicated disk"), "{stderr}");
    assert!(!pool.exists(), "a refused start creates nothing");

    // The same, with the pool on a filesystem of its own: it starts.
    let fs = TestFs::new("ext4", "64M");
    let pool = fs.mount.join("pool");
    let node = NodeProcess::start(
        &pool,
        &dir.path().join("csi.sock"),
        "n1",
        &["--refuse-system-filesystem", "--kubelet-dir", kubelet.to_str().unwrap()],
    );
    assert!(pool.join("volumes").is_dir(), "the pool was opened");
    drop(node);
}
