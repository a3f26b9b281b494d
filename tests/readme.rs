//! The README's first commands and its "Try it" section, run against the
//! built binary: what a newcomer types must work as written.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The lines of the first ```sh block after `heading` (or of the file's first one).
fn sh_block(text: &str, heading: Option<&str>) -> Vec<String> {
    let from = heading.map(|h| text.find(h).unwrap_or_else(|| panic!("README has no {h:?}"))).unwrap_or(0);
    let rest = &text[from..];
    let start = rest.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
    let end = start + rest[start..].find("```").expect("the block ends");
    rest[start..end].lines().map(str::to_string).collect()
}

#[test]
fn the_first_lines_are_the_two_commands() {
    let first = sh_block(&readme(), None);
    assert_eq!(
        first,
        [
            "cargo run --release -- standalone --data-dir /tmp/cinderblock-demo --endpoint unix:///tmp/cinderblock-demo/csi.sock",
            "sudo scripts/test-all.sh"
        ]
    );
    assert!(readme().starts_with("# cinderblock\n\n```sh\n"), "the commands come first");
}

#[test]
fn the_try_it_section_runs_as_written() {
    let text = readme();
    let block = sh_block(&text, Some("## Try it"));
    // The alias reaches the standalone of the first command.
    assert_eq!(block[0], "alias cb='cargo run --release -q -- ctl --endpoint unix:///tmp/cinderblock-demo/csi.sock'");
    assert!(block[1..].iter().all(|l| l.starts_with("cb ")), "every other line is a cb command: {block:?}");
    assert!(!text[text.find("## Try it").unwrap()..].split("## Binaries").next().unwrap().contains("[0]"), "no index picks");

    // The same, on a standalone like the first command's (3 nodes, 1 zone),
    // with `cb` calling the built binary instead of `cargo run --release`.
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path(), 3, 1, &[]);
    let script =
        format!("set -euo pipefail\ncb() {{ \"$CINDERBLOCK\" ctl --endpoint \"$ENDPOINT\" \"$@\"; }}\n{}\n", block[1..].join("\n"));
    let out = Command::new("bash")
        .args(["-c", &script])
        .env("CINDERBLOCK", env!("CARGO_BIN_EXE_cinderblock"))
        .env("ENDPOINT", &s.endpoint)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the Try it block failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));

    // What the comments promise.
    let ctl = |args: &[&str]| -> Value {
        let o = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
            .arg("ctl")
            .args(args)
            .args(["-o", "json", "--endpoint", &s.endpoint])
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let vols = ctl(&["volume", "list", "--all"]);
    let names: Vec<&str> = vols.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["copy", "restored"], "data was deleted; its clone and restore stay");
    let snap = ctl(&["snapshot", "get", "data-snap"]);
    assert_eq!(snap["phase"], "Available", "the snapshot outlives its volume");
    let restored = &vols[1];
    assert_eq!(restored["node"], snap["node"], "a restore lands on the snapshot's node");
    assert_eq!(vols[0]["provisioning"], "thick");
    assert!(stdout.contains("grew from 1.0 GiB to 2.0 GiB"), "{stdout}");
    assert!(stdout.contains("independent copies"), "{stdout}");
    assert_eq!(ctl(&["node", "list"]).as_array().unwrap().len(), 3);
}
