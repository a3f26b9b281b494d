//! The CRDs under deploy/ are exactly what `cinderblock crds` prints, so
//! the manifests never drift from the Rust types.

#[test]
fn deploy_crds_match_the_binary() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cinderblock")).arg("crds").output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/crds/cinderblock.dev.yaml");
    let committed = std::fs::read_to_string(path).unwrap();
    assert!(printed == committed, "deploy/crds/cinderblock.dev.yaml is stale: run `cargo run -- crds > deploy/crds/cinderblock.dev.yaml`");
    for kind in ["BlockVolume", "BlockSnapshot", "StorageNode", "BlockExport", "BlockGroupSnapshot"] {
        assert!(printed.contains(&format!("kind: {kind}\n")), "{kind} missing");
    }
    // No status subresource: a record change is one write, never a second
    // request to mirror it (the printer columns read the spec).
    assert_eq!(printed.matches("subresources:").count(), 0, "no CRD has a status subresource");
    assert!(printed.contains("jsonPath: .spec.phase"), "kubectl shows the phase from the record");
}
