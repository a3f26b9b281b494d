//! A scrape of /metrics from a running standalone after a create, a
//! snapshot and a delete shows those operations counted, in valid
//! OpenMetrics text.

mod common;

use std::io::{Read, Write};

use cinderblock::csi;
use cinderblock::csi::controller_client::ControllerClient;
use common::*;

fn scrape(address: &str) -> String {
    let mut s = std::net::TcpStream::connect(address).expect("metrics port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    body.to_string()
}

/// The value of the sample whose name and labels contain every `part`.
fn sample(text: &str, parts: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn assert_valid_openmetrics(text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "OpenMetrics text ends with # EOF");
    for l in &lines {
        if l.starts_with("# HELP ") || l.starts_with("# TYPE ") || l.starts_with("# UNIT ") || *l == "# EOF" {
            continue;
        }
        let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {l:?}"));
        assert!(value.parse::<f64>().is_ok() || value == "+Inf", "bad value in {l:?}");
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name in {l:?}");
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels in {l:?}");
        }
    }
}

#[tokio::test]
async fn metrics_count_create_snapshot_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    // Port 0: the kernel picks a free port and the standalone logs it, so
    // tests running side by side never race for one.
    let s = Standalone::start(dir.path(), 2, 1, &["--metrics-addr", "127.0.0.1:0", "--heartbeat-interval", "0.2"]);
    let mut c = ControllerClient::new(csi_channel(&s.endpoint).await);
    let cap = csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(csi::volume_capability::AccessMode { mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32 }),
    };
    let v = c
        .create_volume(csi::CreateVolumeRequest {
            name: "metered".into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 1 << 20, limit_bytes: 0 }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    c.create_snapshot(csi::CreateSnapshotRequest {
        source_volume_id: v.volume_id.clone(),
        name: "metered-snap".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_volume(csi::DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }).await.unwrap();
    let err = c.create_volume(csi::CreateVolumeRequest { volume_capabilities: vec![cap], ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let address = loop {
        if let Some(a) = metrics_address_in_log(&s.log) {
            break a;
        }
        assert!(std::time::Instant::now() < deadline, "no metrics address in {}", s.log.display());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let text = scrape(&address);
    assert_valid_openmetrics(&text);
    let calls = |svc: &str, method: &str, code: &str| {
        sample(
            &text,
            &["cinderblock_grpc_calls_total{", &format!("service=\"{svc}\""), &format!("method=\"{method}\""), &format!("code=\"{code}\"")],
        )
    };
    assert_eq!(calls("csi.v1.Controller", "CreateVolume", "OK"), Some(1.0), "{text}");
    assert_eq!(calls("csi.v1.Controller", "CreateSnapshot", "OK"), Some(1.0));
    assert_eq!(calls("csi.v1.Controller", "DeleteVolume", "OK"), Some(1.0));
    assert_eq!(calls("csi.v1.Controller", "CreateVolume", "INVALID_ARGUMENT"), Some(1.0));
    // The controller reached the node agents over gRPC, and that is counted too.
    assert_eq!(calls("cinderblock.agent.v1.VolumeManager", "CreateVolume", "OK"), Some(1.0));
    assert_eq!(calls("cinderblock.agent.v1.VolumeManager", "CreateSnapshot", "OK"), Some(1.0));
    let latency = sample(&text, &["cinderblock_grpc_call_seconds_count{", "method=\"CreateVolume\"", "service=\"csi.v1.Controller\""]);
    assert_eq!(latency, Some(2.0));
    let total = sample(&text, &["cinderblock_pool_total_bytes{", "node=\"node-1\""]).expect("pool gauge for node-1");
    assert!(total > 0.0);
    // The snapshot is still there: provisioned counts it.
    let provisioned: f64 =
        ["node-1", "node-2"].iter().filter_map(|n| sample(&text, &["cinderblock_pool_provisioned_bytes{", &format!("node=\"{n}\"")])).sum();
    assert_eq!(provisioned, (1 << 20) as f64);
}
