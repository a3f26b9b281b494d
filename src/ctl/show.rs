//! How `cinderblock ctl` shows what it got: JSON values made from the
//! admin API's answers, and the tables drawn from them.

use std::collections::HashMap;

use serde_json::{json, Value};

use cinderblock::admin_proto as admin;
use cinderblock::units::format_bytes;

pub(super) fn orphan_json(o: &admin::Orphan) -> Value {
    json!({"name": o.name, "kind": o.kind, "id": o.id, "reason": o.reason, "age_seconds": o.age_seconds,
           "size_bytes": o.size_bytes, "allocated_bytes": o.allocated_bytes})
}

pub(super) fn print_orphans(list: &[admin::Orphan]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|o| vec![o.kind.clone(), o.id.clone(), format_age(o.age_seconds), format_bytes(o.allocated_bytes), o.reason.clone()])
        .collect();
    print_table(&["KIND", "ID", "AGE", "HOLDS", "WHY"], &rows);
}

pub(super) fn format_age(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub(super) fn phase_name(p: i32) -> &'static str {
    match admin::Phase::try_from(p) {
        Ok(admin::Phase::Creating) => "Creating",
        Ok(admin::Phase::Available) => "Available",
        Ok(admin::Phase::Deleting) => "Deleting",
        Ok(admin::Phase::Error) => "Error",
        _ => "Unknown",
    }
}

pub(super) fn time_of(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub(super) fn volume_json(v: &admin::Volume, names: &HashMap<String, String>) -> Value {
    let source = if !v.source_snapshot_id.is_empty() {
        json!({"snapshot": v.source_snapshot_id, "name": names.get(&v.source_snapshot_id)})
    } else if !v.source_volume_id.is_empty() {
        json!({"volume": v.source_volume_id, "name": names.get(&v.source_volume_id)})
    } else {
        Value::Null
    };
    json!({
        "name": v.name,
        "id": v.id,
        "phase": phase_name(v.phase),
        "size_bytes": v.size_bytes,
        "size": format_bytes(v.size_bytes),
        "node": (!v.node.is_empty()).then_some(&v.node),
        "zone": (!v.zone.is_empty()).then_some(&v.zone),
        "provisioning": v.provisioning,
        "source": source,
        "error": (!v.error.is_empty()).then_some(&v.error),
        "attempts": v.attempts.iter().map(|a| json!({"node": a.node, "error": a.error})).collect::<Vec<_>>(),
        "metadata": v.metadata,
        "created": time_of(v.created_ms),
        "migration": v.migration.as_ref().map(migration_json),
    })
}

pub(super) fn migration_json(m: &admin::Migration) -> Value {
    json!({
        "from": m.from_node,
        "to": m.to_node,
        "phase": m.phase,
        "pass": m.pass,
        "live": m.live,
        "copied_bytes": m.copied_bytes,
        "pass_copied_bytes": m.pass_copied_bytes,
        "pass_total_bytes": m.pass_total_bytes,
        "evacuation": m.evacuation,
        "problem": (!m.problem.is_empty()).then_some(&m.problem),
        "started": time_of(m.started_ms),
    })
}

/// One line about a migration under way, for people.
pub(super) fn migration_line(m: &Value) -> String {
    let b = |k: &str| format_bytes(m[k].as_u64().unwrap_or(0));
    let mut line = format!(
        "migration: {} -> {}, {}, pass {} ({} of {}), {} copied in all",
        s(m, "from"),
        s(m, "to"),
        s(m, "phase"),
        s(m, "pass"),
        b("pass_copied_bytes"),
        b("pass_total_bytes"),
        b("copied_bytes")
    );
    if let Some(p) = m["problem"].as_str() {
        line.push_str(&format!("; held up: {p}"));
    }
    line
}

pub(super) fn snapshot_json(s: &admin::Snapshot) -> Value {
    json!({
        "name": s.name,
        "id": s.id,
        "phase": phase_name(s.phase),
        "ready": s.phase == admin::Phase::Available as i32,
        "volume_id": s.source_volume_id,
        "volume_name": (!s.source_volume_name.is_empty()).then_some(&s.source_volume_name),
        "size_bytes": s.size_bytes,
        "size": format_bytes(s.size_bytes),
        "node": s.node,
        "error": (!s.error.is_empty()).then_some(&s.error),
        "created": time_of(s.created_ms),
    })
}

pub(super) fn node_json(n: &admin::Node) -> Value {
    let p = n.pool.clone().unwrap_or_default();
    json!({
        "id": n.id,
        "zone": (!n.zone.is_empty()).then_some(&n.zone),
        "healthy": n.healthy,
        "heartbeat_age_ms": n.heartbeat_age_ms,
        "total_bytes": p.total_bytes,
        "free_bytes": p.free_bytes,
        "provisioned_bytes": p.provisioned_bytes,
        "max_over_subscription_ratio": p.max_over_subscription_ratio,
        "reserved_percentage": p.reserved_percentage,
        "max_thin_volume_bytes": p.max_thin_volume_bytes,
        "max_thick_volume_bytes": p.max_thick_volume_bytes,
        "volumes": n.volume_count,
        "max_volumes": n.max_volumes,
        "snapshots": n.snapshot_count,
        "filesystem": p.filesystem,
        "reflink": p.reflink,
        "evacuating": n.evacuating,
    })
}

pub(super) fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub(super) fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells.iter().enumerate().map(|(i, c)| format!("{:<w$}", c, w = widths[i])).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    println!("{}", line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>()));
    for r in rows {
        println!("{}", line(r));
    }
}

pub(super) const VOLUME_HEADERS: [&str; 7] = ["NAME", "ID", "PHASE", "SIZE", "NODE", "PROVISIONING", "SOURCE"];
pub(super) fn volume_row(v: &Value) -> Vec<String> {
    let source = match &v["source"] {
        Value::Object(m) => {
            let kind = if m.contains_key("snapshot") { "snapshot" } else { "volume" };
            let shown = m.get("name").and_then(|n| n.as_str()).or_else(|| m.get(kind).and_then(|i| i.as_str())).unwrap_or("");
            format!("{kind} {shown}")
        }
        _ => "-".into(),
    };
    vec![s(v, "name"), s(v, "id"), s(v, "phase"), s(v, "size"), s(v, "node"), s(v, "provisioning"), source]
}

pub(super) const SNAPSHOT_HEADERS: [&str; 7] = ["NAME", "ID", "PHASE", "VOLUME", "SIZE", "NODE", "CREATED"];
pub(super) fn snapshot_row(v: &Value) -> Vec<String> {
    let volume = v["volume_name"].as_str().map(str::to_string).unwrap_or_else(|| s(v, "volume_id"));
    vec![s(v, "name"), s(v, "id"), s(v, "phase"), volume, s(v, "size"), s(v, "node"), s(v, "created")]
}

pub(super) const NODE_HEADERS: [&str; 10] =
    ["NODE", "ZONE", "HEALTH", "POOL", "FREE", "PROMISED", "OVERCOMMIT", "RESERVE", "VOLUMES", "LARGEST THIN/THICK"];
pub(super) fn node_row(n: &Value) -> Vec<String> {
    let b = |k: &str| format_bytes(n[k].as_u64().unwrap_or(0));
    let mut health = if n["healthy"].as_bool() == Some(true) {
        "ok".to_string()
    } else {
        format!("silent {}s", n["heartbeat_age_ms"].as_i64().unwrap_or(0) / 1000)
    };
    if n["evacuating"].as_bool() == Some(true) {
        health.push_str(", evacuating");
    }
    let volumes = match n["max_volumes"].as_u64() {
        Some(0) | None => s(n, "volumes"),
        Some(m) => format!("{}/{m}", s(n, "volumes")),
    };
    vec![
        s(n, "id"),
        s(n, "zone"),
        health,
        format!("{} {}", b("total_bytes"), s(n, "filesystem")),
        b("free_bytes"),
        b("provisioned_bytes"),
        format!("{}x", n["max_over_subscription_ratio"].as_f64().unwrap_or(0.0)),
        format!("{}%", s(n, "reserved_percentage")),
        volumes,
        format!("{} / {}", b("max_thin_volume_bytes"), b("max_thick_volume_bytes")),
    ]
}

pub(super) struct Out {
    pub(super) json: bool,
}

impl Out {
    pub(super) fn show(&self, value: &Value, table: impl FnOnce(&Value)) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
        } else {
            table(value);
        }
    }
}
