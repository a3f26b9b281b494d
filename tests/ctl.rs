//! `cinderblock ctl` as a person uses it: the real binary against a real
//! `cinderblock standalone`, checking what is printed and the exit code.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cinderblock::csi;
use cinderblock::csi::controller_client::ControllerClient;
use common::*;
use serde_json::Value;

struct Run {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn ctl(endpoint: &str, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
        .arg("ctl")
        .args(args)
        .env("CSI_ENDPOINT", endpoint)
        .output()
        .expect("running cinderblock ctl");
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json(endpoint: &str, args: &[&str]) -> Value {
    let r = ctl(endpoint, args);
    assert!(r.ok, "{args:?} failed: {}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {}", r.stdout))
}

fn all_volumes(endpoint: &str) -> Vec<Value> {
    json(endpoint, &["volume", "list", "--all", "-o", "json"]).as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_are_validated_and_echoed_in_human_units() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path(), 2, 1, &[]);
    let e = s.endpoint.as_str();

    for (size, says) in [
        ("0", "the smallest is 1Mi"),
        ("0Gi", "the smallest is 1Mi"),
        ("1", "no unit"),
        ("512", "no unit"),
        ("4Ki", "below the smallest volume, 1Mi"),
        ("3Qi", "unknown unit"),
        ("lots", "not a size"),
    ] {
        let r = ctl(e, &["volume", "create", "v", "--size", size]);
        assert!(!r.ok, "--size {size} must be refused");
        assert!(r.stderr.contains(says), "--size {size}: {}", r.stderr);
    }
    assert!(all_volumes(e).is_empty(), "a refused size creates nothing");

    let v = json(e, &["volume", "create", "half", "--size", "1.5Gi", "-o", "json"]);
    assert_eq!(v["size_bytes"], 3u64 << 29);
    assert_eq!(v["size"], "1.5 GiB");
    assert_eq!(v["name"], "half");
    let table = ctl(e, &["volume", "create", "half", "--size", "1.5Gi"]);
    assert!(table.ok && table.stdout.contains("1.5 GiB") && table.stdout.contains("half"), "{}", table.stdout);

    // The default is said in --help, and is what a create without --size gets.
    let help = ctl(e, &["volume", "create", "--help"]);
    assert!(help.stdout.contains("default: 1Gi"), "{}", help.stdout);
    assert_eq!(json(e, &["volume", "create", "plain", "-o", "json"])["size_bytes"], 1u64 << 30);

    // Expand: smaller refused with a non-zero exit and nothing changed; larger grows.
    let r = ctl(e, &["volume", "expand", "half", "--size", "1Gi"]);
    assert!(!r.ok);
    assert!(r.stderr.contains("is 1.5 GiB; 1.0 GiB would shrink it"), "{}", r.stderr);
    assert_eq!(json(e, &["volume", "get", "half", "-o", "json"])["size_bytes"], 3u64 << 29);
    let r = ctl(e, &["volume", "expand", "half", "--size", "2Gi"]);
    assert!(r.ok && r.stdout.contains("grew from 1.5 GiB to 2.0 GiB"), "{} {}", r.stdout, r.stderr);
    let r = ctl(e, &["volume", "expand", "half", "--size", "2Gi"]);
    assert!(r.ok && r.stdout.contains("2.0 GiB already; nothing to do"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_unknown_volume_says_so_while_csi_still_answers_ok() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path(), 1, 1, &[]);
    let e = s.endpoint.as_str();
    let mut csi = ControllerClient::new(csi_channel(e).await);

    for id in ["vol-00000000-0000-0000-0000-000000000000", "not a valid id", "never-made"] {
        let r = ctl(e, &["volume", "delete", id]);
        assert!(!r.ok, "deleting {id:?} must fail for a person");
        assert_eq!(r.code, Some(1));
        assert!(r.stderr.contains(&format!("no such volume {id:?}; nothing to delete")), "{}", r.stderr);
        assert!(!r.stdout.contains("deleted"), "{}", r.stdout);
        // CSI's DeleteVolume of the same ID is OK (the spec's idempotency).
        csi.delete_volume(csi::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() })
            .await
            .expect("CSI DeleteVolume answers OK");
    }
    let r = ctl(e, &["snapshot", "delete", "nope"]);
    assert!(!r.ok && r.stderr.contains("no such snapshot \"nope\"; nothing to delete"), "{}", r.stderr);

    // Delete by name, of a volume with a snapshot: allowed, and the snapshot stays.
    assert!(ctl(e, &["volume", "create", "data", "--size", "16Mi"]).ok);
    assert!(ctl(e, &["snapshot", "create", "data-snap", "--volume", "data"]).ok);
    let r = ctl(e, &["volume", "delete", "data"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("volume data (vol-") && r.stdout.contains("deleted"), "{}", r.stdout);
    assert!(r.stdout.contains("1 snapshot(s) stay: they are independent copies"), "{}", r.stdout);
    let snap = json(e, &["snapshot", "get", "data-snap", "-o", "json"]);
    assert_eq!(snap["phase"], "Available");
    let help = ctl(e, &["volume", "delete", "--help"]);
    assert!(help.stdout.contains("Its snapshots and the volumes cloned or restored from it stay"), "{}", help.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_flags_go_anywhere_and_output_is_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path(), 3, 2, &[]);
    let e = s.endpoint.as_str();

    // -o json and --endpoint after the subcommand.
    let out = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
        .args(["ctl", "volume", "create", "data", "--size", "64Mi", "-o", "json", "--endpoint", e])
        .env_remove("CSI_ENDPOINT")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON after the subcommand");
    assert_eq!((v["name"].as_str(), v["phase"].as_str()), (Some("data"), Some("Available")));
    // Before the subcommand still works.
    let out =
        Command::new(env!("CARGO_BIN_EXE_cinderblock")).args(["ctl", "-o", "json", "--endpoint", e, "volume", "list"]).output().unwrap();
    assert!(serde_json::from_slice::<Value>(&out.stdout).is_ok());

    // Sources by name, shown by name.
    assert!(ctl(e, &["snapshot", "create", "data-snap", "--volume", "data"]).ok);
    let r = json(e, &["volume", "create", "restored", "--from-snapshot", "data-snap", "-o", "json"]);
    assert_eq!(r["source"]["name"], "data-snap");
    assert_eq!(r["node"], v["node"], "a restore lands on the snapshot's node");
    let c = json(e, &["volume", "create", "copy", "--clone", "data", "--param", "provisioning=thick", "-o", "json"]);
    assert_eq!((c["source"]["name"].as_str(), c["provisioning"].as_str()), (Some("data"), Some("thick")));
    let table = ctl(e, &["volume", "list"]).stdout;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("snapshot data-snap") && table.contains("volume data"), "{table}");
    let snap = ctl(e, &["snapshot", "get", "data-snap"]);
    assert!(snap.ok && snap.stdout.contains("data-snap") && snap.stdout.contains("Available"), "{}", snap.stdout);

    // Nodes: pools, capacity, health and zone.
    let nodes = json(e, &["node", "list", "-o", "json"]);
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n["healthy"] == true && n["total_bytes"].as_u64().unwrap() > 0), "{nodes:?}");
    let zones: std::collections::BTreeSet<_> = nodes.iter().map(|n| n["zone"].as_str().unwrap().to_string()).collect();
    assert_eq!(zones.into_iter().collect::<Vec<_>>(), ["zone-1", "zone-2"]);
    let table = ctl(e, &["node", "list"]).stdout;
    assert!(table.contains("node-3") && table.contains("zone-2") && table.contains(" ok "), "{table}");

    // Capacity of a zone that does not exist is an error, not 0 B.
    let r = ctl(e, &["capacity", "--zone", "zone-9"]);
    assert!(!r.ok && r.stderr.contains("no node is in zone \"zone-9\"; zones: zone-1, zone-2"), "{}", r.stderr);
    let r = ctl(e, &["capacity", "--zone", "zone-2"]);
    assert!(r.ok && r.stdout.contains("largest volume that fits now"), "{}", r.stderr);
    let r = ctl(e, &["capacity", "--node", "node-9"]);
    assert!(!r.ok && r.stderr.contains("no node is called \"node-9\""));

    // A volume nothing can take: every node's reason in GiB and plain words,
    // and the failed record shows in --all with its phase.
    let r = ctl(e, &["volume", "create", "huge", "--size", "4000Ti"]);
    assert!(!r.ok);
    for n in ["node-1", "node-2", "node-3"] {
        assert!(r.stderr.contains(&format!("{n}: room for ")), "{n} missing: {}", r.stderr);
    }
    assert!(r.stderr.contains("no node can take a 3.9 PiB thin volume. Of 3 nodes, 3 have too little room"), "{}", r.stderr);
    assert!(r.stderr.contains(" GiB free"), "{}", r.stderr);
    assert!(!r.stderr.contains("bytes"), "no raw byte counts: {}", r.stderr);
    let listed = ctl(e, &["volume", "list"]).stdout;
    assert!(!listed.contains("huge"), "without --all only Available volumes: {listed}");
    let all = all_volumes(e);
    let huge = all.iter().find(|v| v["name"] == "huge").expect("the failed volume is listed with --all");
    assert_eq!(huge["phase"], "Error");
    assert!(huge["error"].as_str().unwrap().contains("no node can take"));
    assert!(ctl(e, &["volume", "list", "--all"]).stdout.contains("Error"));
}

#[test]
fn logs_written_to_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path(), 1, 1, &[]); // stderr goes to a file
                                                      // The socket answers a moment before the ready line is written.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut log = s.log_text();
    while !log.contains("cinderblock standalone ready") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        log = s.log_text();
    }
    assert!(log.contains("cinderblock standalone ready"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in a log file: {log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_cut_by_a_crash_says_the_volume_may_exist_and_how_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Standalone::start(dir.path(), 1, 1, &[]);
    let pid = rustix::process::Pid::from_raw(s.child.id() as i32).unwrap();
    // Freeze the standalone, send the create, and kill it once the request
    // is on the wire (h2 logs the DATA frame): the answer never comes.
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
        .args(["ctl", "--endpoint", &s.endpoint, "volume", "create", "cut", "--size", "64Mi"])
        .env("RUST_LOG", "h2=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut buf = [0u8; 4096];
        let mut signalled = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = stderr.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            if !signalled && all.contains("send frame=Data { stream_id: StreamId(1)") {
                signalled = true;
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            assert!(Instant::now() < deadline);
        }
        (signalled, all)
    });
    let status = child.wait().unwrap();
    let (signalled, all) = reader.join().unwrap();
    s.kill9();
    assert!(signalled, "the request never went out: {all}");
    assert!(!status.success());
    assert!(all.contains("may or may not exist"), "{all}");
    assert!(all.contains("cinderblock ctl volume get cut"), "{all}");
    assert!(all.contains("Running the same create again is safe"), "{all}");

    // Following the advice: restart, check, create again.
    let s = Standalone::start(dir.path(), 1, 1, &[]);
    let r = ctl(&s.endpoint, &["volume", "get", "cut"]);
    assert!(r.ok || r.stderr.contains("no such volume \"cut\""), "{}", r.stderr);
    assert!(ctl(&s.endpoint, &["volume", "create", "cut", "--size", "64Mi"]).ok);
    assert!(ctl(&s.endpoint, &["volume", "get", "cut"]).stdout.contains("Available"));
}

/// An image the records do not know is quarantined by the reconciler, shown
/// by `ctl node orphans`, and deleted only by `ctl node purge-orphans`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_images_are_listed_and_purged_only_on_request() {
    let dir = tempfile::tempdir().unwrap();
    // A volume on node-1 that no record names (a store restored from an old backup, say).
    let stray = dir.path().join("node-1/pool/volumes");
    std::fs::create_dir_all(&stray).unwrap();
    write_file(
        &stray.join("vol-stray.json"),
        br#"{"id":"vol-stray","size_bytes":8192,"provisioning":"thin","source":null,"metadata":{},"created_at_ms":0,"state":"Available"}"#,
    );
    write_file(&stray.join("vol-stray.img"), &[7u8; 8192]);
    let s = Standalone::start(dir.path(), 2, 1, &["--stuck-grace", "0.5", "--reconcile-interval", "0.5"]);
    let e = s.endpoint.as_str();
    let deadline = Instant::now() + Duration::from_secs(20);
    let listed = loop {
        let l = json(e, &["node", "orphans", "node-1", "-o", "json"]);
        if !l.as_array().unwrap().is_empty() {
            break l;
        }
        assert!(Instant::now() < deadline, "the stray image was not quarantined");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(listed[0]["id"], "vol-stray");
    assert!(listed[0]["reason"].as_str().unwrap().contains("no record"), "{listed}");
    let table = ctl(e, &["node", "orphans", "node-1"]);
    assert!(table.ok && table.stdout.contains("vol-stray") && table.stdout.contains("WHY"), "{}", table.stdout);
    let kept = || std::fs::read_dir(dir.path().join("node-1/pool/orphaned")).unwrap().count();
    assert_eq!(kept(), 3, "image, record and note are kept");

    let young = ctl(e, &["node", "purge-orphans", "node-1", "--older-than", "7d"]);
    assert!(young.ok && young.stdout.contains("nothing on node node-1 is older than 7d"), "{}", young.stdout);
    let dry = ctl(e, &["node", "purge-orphans", "node-1", "--older-than", "0", "--dry-run"]);
    assert!(dry.ok && dry.stdout.contains("would delete 1"), "{}", dry.stdout);
    assert_eq!(kept(), 3, "a dry run deleted something");
    let bad = ctl(e, &["node", "purge-orphans", "node-1", "--older-than", "7"]);
    assert!(!bad.ok && bad.stderr.contains("needs a unit"), "{}", bad.stderr);
    let gone = ctl(e, &["node", "purge-orphans", "nobody", "--older-than", "0"]);
    assert!(!gone.ok && gone.stderr.contains("no node is called"), "{}", gone.stderr);
    let done = ctl(e, &["node", "purge-orphans", "node-1", "--older-than", "0"]);
    assert!(done.ok && done.stdout.contains("deleted 1"), "{}", done.stdout);
    assert_eq!(kept(), 0);
}
