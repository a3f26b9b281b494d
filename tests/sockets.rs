//! The CSI unix socket as a user meets it: a second `cinderblock standalone`
//! on a live endpoint is refused and the first keeps serving; a socket left
//! by a killed process is replaced; a clean stop removes only its own
//! socket; the socket is 0600 from the start.

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use cinderblock::csi;
use cinderblock::csi::identity_client::IdentityClient;
use common::*;

async fn plugin_name(endpoint: &str) -> String {
    let mut c = IdentityClient::new(csi_channel(endpoint).await);
    c.get_plugin_info(csi::GetPluginInfoRequest {}).await.expect("GetPluginInfo").into_inner().name
}

// Multi-threaded: a dropped client's connection must close while the test
// thread waits for the server to stop (a graceful stop waits for open connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_standalone_on_a_live_endpoint_is_refused_and_the_first_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let first = Standalone::start(&dir.path().join("a"), 1, 1, &[]);
    let sock = dir.path().join("a").join("csi.sock");
    let before = std::fs::metadata(&sock).unwrap();
    assert_eq!(before.mode() & 0o777, 0o600, "the socket is 0600");

    // The same endpoint, another data folder: refused, non-zero, and says why.
    let second_dir = dir.path().join("b");
    let out = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
        .args(["standalone", "--data-dir", second_dir.to_str().unwrap(), "--nodes", "1"])
        .args(["--endpoint", &first.endpoint])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second standalone must fail: {stderr}");
    assert!(stderr.contains("is in use") && stderr.contains("stop it first"), "{stderr}");

    // The first one still serves on the very same socket file.
    assert_eq!(plugin_name(&first.endpoint).await, cinderblock::DRIVER_NAME);
    let after = std::fs::metadata(&sock).unwrap();
    assert_eq!((before.dev(), before.ino()), (after.dev(), after.ino()), "the socket was not replaced");

    // A node plugin given the same endpoint is refused too.
    let out = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
        .args(["node", "--pool", dir.path().join("pool").to_str().unwrap(), "--node-id", "n1"])
        .args(["--agent-listen", &format!("127.0.0.1:{}", free_port()), "--endpoint", &first.endpoint])
        .args(["--tls-dir", dir.path().join("tls").to_str().unwrap()]) // checked after the endpoint
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is in use"));
    assert_eq!(plugin_name(&first.endpoint).await, cinderblock::DRIVER_NAME);
}

// Multi-threaded: a dropped client's connection must close while the test
// thread waits for the server to stop (a graceful stop waits for open connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_left_by_a_killed_standalone_is_replaced_and_a_clean_stop_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut first = Standalone::start(&data, 1, 1, &[]);
    let sock = data.join("csi.sock");
    first.kill9();
    assert!(sock.exists(), "SIGKILL leaves the socket file behind");

    // Standalone::start would remove the file; start by hand to see the server do it.
    let log = dir.path().join("second.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
        .args(["standalone", "--data-dir", data.to_str().unwrap(), "--nodes", "1"])
        .args(["--endpoint", &format!("unix://{}", sock.display())])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("standalone ready") {
        assert!(child.try_wait().unwrap().is_none(), "second standalone exited: {}", std::fs::read_to_string(&log).unwrap());
        assert!(std::time::Instant::now() < deadline, "second standalone did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(plugin_name(&format!("unix://{}", sock.display())).await, cinderblock::DRIVER_NAME);
    assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o600);

    rustix::process::kill_process(rustix::process::Pid::from_raw(child.id() as i32).unwrap(), rustix::process::Signal::TERM).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("standalone did not stop within 20 s of SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(!sock.exists(), "a clean stop removes its own socket");
    // Nothing else was left in the folder by the bind (no private folders).
    let leftovers: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".cb-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
