//! The reconciler: finishes what interruptions left half-done, and never
//! destroys data.
//!
//! - A record stuck in `Creating` is resolved by asking its node: the image
//!   is there and whole → the record is finished (`Available`); the node
//!   has nothing → `Error` (nothing to clean); still being made or node
//!   unreachable → left for the next pass.
//! - An image on a node that no record places there (any phase, `Deleting`
//!   included) and that is older than the grace period by the node's own
//!   clock is moved to the node's `orphaned/` folder with a note, never
//!   deleted. An image must also have been seen without a record by this
//!   controller for the grace period, pass after pass, before it moves: a
//!   store being emptied one object at a time (a `kubectl delete --all`
//!   arrives as a stream of watch events) is thus seen whole, not as a
//!   trickle of single orphans. A circuit breaker holds the whole node's
//!   pass when the candidates (ripe or not) are more than a few images or
//!   a share of them (a store emptied or restored from an old backup, a
//!   renamed node): it then moves nothing and raises a Warning event and a
//!   metric for a person to look at.
//! - Mismatched and silent nodes are skipped entirely.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tracing::{info, warn};

use super::create::accessible_from;
use super::error::{ControllerError, Failure};
use super::manager::Manager;
use super::records::*;
use crate::agent_proto as pb;
use crate::metrics::{PoolLabels, METRICS};
use crate::store::{self, Kind};

pub use crate::reconcile_report::ReconcileReport;

impl Manager {
    /// One pass of the reconciler (leader only). Everything it does is logged.
    ///
    /// The records are read once, a page at a time, keeping only what the
    /// pass needs (IDs per node, the few stuck or expired records): its
    /// memory does not grow with the records' size, only with their number.
    pub async fn reconcile_once(&self) -> Result<ReconcileReport, ControllerError> {
        let mut report = ReconcileReport::default();
        if !self.is_leader() {
            // A later term starts its watch afresh.
            self.orphan_candidates.lock().unwrap().clear();
            return Ok(report);
        }
        let grace = self.config.stuck_grace.as_millis() as i64;
        let now = now_ms();
        // What the records place on each node, in every phase.
        let mut owned: HashMap<String, HashSet<String>> = HashMap::new();
        let mut stuck_volumes = Vec::new();
        let mut expired = Vec::new();
        let mut phases = PhaseCounts::default();
        let mut migrating = Vec::new();
        let evacuating: HashSet<String> = self.nodes().await?.into_iter().filter(|n| n.evacuating).map(|n| n.id).collect();
        let mut on_evacuating = Vec::new();
        store::for_each_json::<VolumeRec>(&*self.store, Kind::Volume, |rec, version| {
            phases.volume(rec.phase);
            let movable = rec.accessibility != Accessibility::Node || rec.migration.is_some();
            if let Some(n) = rec.node.as_ref().filter(|n| movable && evacuating.contains(*n)) {
                on_evacuating.push((rec.id.clone(), Some(n.clone()), rec.migration.is_some()));
            }
            if let Some(m) = &rec.migration {
                // Both nodes hold a copy, and the source its pass snapshots.
                migrating.push(rec.id.clone());
                let on_source = owned.entry(m.from.clone()).or_default();
                on_source.insert(rec.id.clone());
                on_source.insert(m.pass_snapshot(&rec.id, m.pass));
                on_source.insert(m.pass_snapshot(&rec.id, m.pass.saturating_sub(1)));
                owned.entry(m.to.clone()).or_default().insert(rec.id.clone());
            }
            if rec.phase == Phase::Creating && now - rec.updated_ms > grace {
                stuck_volumes.push(rec.id.clone());
            }
            // A record left in Error with nothing on any node is only a note
            // of a failure; the CO retries CreateVolume while it still wants
            // the volume (which makes a new record), so it expires.
            if rec.phase == Phase::Error && rec.node.is_none() && now - rec.updated_ms > grace {
                expired.push((rec.id.clone(), rec.name.clone(), rec.error.clone(), version));
            }
            if let Some(n) = rec.node {
                owned.entry(n).or_default().insert(rec.id);
            }
        })
        .await?;
        let mut stuck_snapshots = Vec::new();
        store::for_each_json::<SnapshotRec>(&*self.store, Kind::Snapshot, |s, _| {
            phases.snapshot(s.phase);
            // A group's member is settled only by its group (a retry cuts
            // every member again; a delete removes them): alone, it could
            // be Available without its group's freeze having held.
            if s.phase == Phase::Creating && now - s.created_ms > grace && s.group_id.is_none() {
                stuck_snapshots.push(s.id.clone());
            }
            owned.entry(s.node).or_default().insert(s.id);
        })
        .await?;
        phases.publish();
        // A migration no driver follows (a restarted or new leader) goes on.
        for id in &migrating {
            self.ensure_migration_driver(id);
        }
        self.evacuate_some(&on_evacuating).await;

        // A stuck record stays owned by its node whatever it resolves to:
        // it becomes Available there, or Error because the node has nothing.
        for id in stuck_volumes {
            if !self.inflight.busy(&id) {
                self.resolve_stuck_volume(&id, &mut report).await?;
            }
        }
        for (id, name, error, version) in expired {
            if self.inflight.busy(&id) {
                continue;
            }
            let _guard = self.inflight.acquire(&id).await;
            if self.store.delete(Kind::Volume, &id, Some(version)).await.is_ok() {
                warn!(volume.id = %id, volume.name = %name, error = ?error, "failed volume record expired");
                report.expired.push(id);
            }
        }
        for id in stuck_snapshots {
            if !self.inflight.busy(&id) {
                self.resolve_stuck_snapshot(&id, &mut report).await?;
            }
        }

        let empty = HashSet::new();
        for node in self.nodes().await? {
            if !self.node_is_healthy(&node) {
                continue;
            }
            let mine = owned.get(&node.id).unwrap_or(&empty);
            self.quarantine_pass(&node, mine, &mut report).await;
        }
        Ok(report)
    }

    async fn resume_migrations(&self) -> Result<(), ControllerError> {
        self.view_ready().await?;
        let mut migrating = Vec::new();
        store::for_each_json::<VolumeRec>(&*self.store, Kind::Volume, |rec, _| {
            if rec.migration.is_some() {
                migrating.push(rec.id);
            }
        })
        .await?;
        for id in &migrating {
            self.ensure_migration_driver(id);
        }
        Ok(())
    }

    async fn resolve_stuck_volume(&self, id: &str, report: &mut ReconcileReport) -> Result<(), ControllerError> {
        let _guard = self.inflight.acquire(id).await;
        let Some((mut rec, version)) = self.volume(id).await? else { return Ok(()) };
        if rec.phase != Phase::Creating {
            return Ok(());
        }
        if let Some(node) = rec.node.clone() {
            let Ok(mut agent) = self.agent_for(&node).await else { return Ok(()) };
            match agent.get_volume(pb::GetVolumeRequest { volume_id: id.to_string() }).await {
                Ok(r) => {
                    let v = r.volume.unwrap_or_default();
                    if v.state != pb::ImageState::Available as i32 {
                        // Still being made: next pass. A copy from another
                        // node goes on by itself there; its record shows how far.
                        if let Some(c) = rec.copy.as_mut().filter(|c| c.copied_bytes != v.copied_bytes) {
                            (c.copied_bytes, c.total_bytes) = (v.copied_bytes, v.copy_total_bytes);
                            rec.updated_ms = now_ms();
                            store::update_json(&*self.store, Kind::Volume, id, &rec, version).await?;
                        }
                        return Ok(());
                    }
                    if let (Some(c), Some(source)) = (rec.copy_under_way().cloned(), rec.source.clone()) {
                        self.drop_copy_export(id, &source, &c.source_node, &c.node).await?;
                        rec.copy = Some(CopyRec { copied_bytes: v.copied_bytes, total_bytes: v.copy_total_bytes, finished: true, ..c });
                    }
                    // The node finished what the interrupted flow asked for.
                    let zone = self.node_in_view(&node).await?.map(|n| n.zone).unwrap_or_default();
                    rec.size_bytes = v.size_bytes;
                    rec.accessible_topology = vec![accessible_from(&node, &zone, rec.accessibility)];
                    rec.phase = Phase::Available;
                    rec.error = None;
                    rec.updated_ms = now_ms();
                    store::update_json(&*self.store, Kind::Volume, id, &rec, version).await?;
                    info!(volume.id = %id, node = %node, "interrupted creation finished: the node had made the volume");
                    report.finished.push(id.to_string());
                    return Ok(());
                }
                Err(e) if e.failure == Failure::NotFound => {}
                Err(_) => return Ok(()), // cannot ask now: next pass
            }
        }
        warn!(volume.id = %id, volume.name = %rec.name, "volume stuck in Creating with nothing on its node: Error");
        rec.phase = Phase::Error;
        rec.node = None;
        rec.error = Some("creation was interrupted before the node made the volume; a retry of CreateVolume starts it again".into());
        rec.updated_ms = now_ms();
        store::update_json(&*self.store, Kind::Volume, id, &rec, version).await?;
        report.failed.push(id.to_string());
        Ok(())
    }

    async fn resolve_stuck_snapshot(&self, id: &str, report: &mut ReconcileReport) -> Result<(), ControllerError> {
        let _guard = self.inflight.acquire(id).await;
        let Some((mut rec, version)) = self.snapshot(id).await? else { return Ok(()) };
        if rec.phase != Phase::Creating {
            return Ok(());
        }
        let Ok(mut agent) = self.agent_for(&rec.node).await else { return Ok(()) };
        match agent.get_snapshot(pb::GetSnapshotRequest { snapshot_id: id.to_string() }).await {
            Ok(r) => {
                let s = r.snapshot.unwrap_or_default();
                if s.state != pb::ImageState::Available as i32 {
                    return Ok(());
                }
                rec.phase = Phase::Available;
                rec.size_bytes = s.size_bytes;
                rec.error = None;
                report.finished.push(id.to_string());
            }
            Err(e) if e.failure == Failure::NotFound => {
                rec.phase = Phase::Error;
                rec.error = Some("snapshot was interrupted before the node made it; a retry of CreateSnapshot starts it again".into());
                report.failed.push(id.to_string());
            }
            Err(_) => return Ok(()),
        }
        store::update_json(&*self.store, Kind::Snapshot, id, &rec, version).await?;
        Ok(())
    }

    /// Quarantine the images on `node` that no record places there, unless
    /// that would be more than the breaker allows.
    async fn quarantine_pass(&self, node: &NodeRec, owned: &HashSet<String>, report: &mut ReconcileReport) {
        let Ok(mut agent) = self.agent_of(node.clone()) else { return };
        let grace = self.config.stuck_grace.as_millis() as u64;
        let available = pb::ImageState::Available as i32;
        // The node's images, page by page; only the candidates are kept
        // (volume or not, ID): no record places them here, they are
        // Available and older than the grace, and no operation holds them.
        let mut total = 0usize;
        let mut candidates: Vec<(bool, String)> = Vec::new();
        let mut consider = |is_volume: bool, id: String, age: u64, state: i32| {
            total += 1;
            if state == available && age > grace && !owned.contains(&id) && !self.inflight.busy(&id) {
                candidates.push((is_volume, id));
            }
        };
        let listed = match agent.each_volume(|v| consider(true, v.volume_id, v.age_ms, v.state)).await {
            Ok(()) => agent.each_snapshot(|s| consider(false, s.snapshot_id, s.age_ms, s.state)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = listed {
            warn!(node = %node.id, error = %e, "could not list the node's images; its orphans are looked for at the next pass");
            return;
        }
        let labels = PoolLabels { node: node.id.clone() };
        METRICS.orphan_candidates.get_or_create(&labels).set(candidates.len() as i64);
        // When this controller first saw each candidate without a record;
        // an image that got a record again (or went) is forgotten.
        let ripe: HashSet<String> = {
            let mut seen = self.orphan_candidates.lock().unwrap();
            let first_seen = seen.entry(node.id.clone()).or_default();
            let now = std::time::Instant::now();
            first_seen.retain(|id, _| candidates.iter().any(|(_, c)| c == id));
            for (_, id) in &candidates {
                first_seen.entry(id.clone()).or_insert(now);
            }
            let patience = self.config.stuck_grace;
            first_seen.iter().filter(|(_, t)| now.duration_since(**t) >= patience).map(|(id, _)| id.clone()).collect()
        };
        if candidates.is_empty() {
            return;
        }
        let n = candidates.len();
        let share_exceeded = n > 1 && (n as u64) * 100 > (total as u64) * u64::from(self.config.orphan_breaker_percent);
        if n > self.config.orphan_breaker_count || share_exceeded {
            METRICS.breaker_held.get_or_create(&labels).inc();
            let note = format!(
                "{n} of the {total} images on node {} have no record placing them there; quarantining that many at once \
                 looks like a lost or restored store, a renamed node or a reused agent address, so nothing was moved. \
                 Check the records (kubectl get blockvolumes,blocksnapshots) before anything else; \
                 images: {}",
                node.id,
                candidates.iter().map(|(_, id)| id.as_str()).take(20).collect::<Vec<_>>().join(", ")
            );
            warn!(node = %node.id, candidates = n, total, "reconciler circuit breaker held: nothing quarantined");
            self.node_event(&node.id, true, "QuarantineHeld", note).await;
            report.breaker_held.push((node.id.clone(), n));
            return;
        }
        let mut moved_here = 0;
        for (is_volume, id) in candidates.into_iter().filter(|(_, id)| ripe.contains(id)) {
            let req = pb::QuarantineRequest {
                id: id.clone(),
                reason: format!("no record placed this image on node {} (reconciler, after more than {} s)", node.id, grace / 1000),
                min_age_ms: grace,
            };
            let moved = if is_volume { agent.quarantine_volume(req).await } else { agent.quarantine_snapshot(req).await };
            match moved {
                Ok(r) if r.moved => {
                    warn!(node = %node.id, id = %id, orphan = %r.orphan, "image without a record quarantined in orphaned/");
                    report.quarantined.push(format!("{}/{id}", node.id));
                    moved_here += 1;
                }
                Ok(_) => {}
                Err(e) => warn!(node = %node.id, id = %id, error = %e, "could not quarantine an image"),
            }
        }
        if moved_here > 0 {
            let note = format!("{moved_here} image(s) without a record moved to orphaned/ (purge: cinderblock ctl node purge-orphans)");
            self.node_event(&node.id, true, "ImagesQuarantined", note).await;
        }
    }

    /// A node's quarantined images.
    pub async fn list_orphans(&self, node: &str) -> Result<Vec<pb::Orphan>, ControllerError> {
        let (rec, _) = self.node(node).await?.ok_or_else(|| ControllerError::NodeNotFound { node: node.to_string() })?;
        let mut agent = self.agent_of(rec)?;
        Ok(agent.list_orphans(pb::ListOrphansRequest {}).await.map_err(ControllerError::during(format!("node {node}")))?.orphans)
    }

    /// Delete a node's quarantined images older than `older_than` (node
    /// clock): an operator's request, the leader carries it out.
    pub async fn purge_orphans(&self, node: &str, older_than: Duration, dry_run: bool) -> Result<Vec<pb::Orphan>, ControllerError> {
        self.wait_leader().await?;
        let (rec, _) = self.node(node).await?.ok_or_else(|| ControllerError::NodeNotFound { node: node.to_string() })?;
        let mut agent = self.agent_of(rec)?;
        let purged = agent
            .purge_orphans(pb::PurgeOrphansRequest { older_than_ms: older_than.as_millis() as u64, dry_run })
            .await
            .map_err(ControllerError::during(format!("node {node}")))?
            .purged;
        if !dry_run && !purged.is_empty() {
            let bytes: u64 = purged.iter().map(|o| o.allocated_bytes).sum();
            warn!(node, count = purged.len(), bytes, "quarantined images purged on an operator's request");
            self.node_event(
                node,
                false,
                "OrphansPurged",
                format!("{} quarantined image(s), {bytes} bytes, purged on request", purged.len()),
            )
            .await;
        }
        Ok(purged)
    }

    /// Run `reconcile_once` every `every` until the process stops.
    pub async fn run_reconciler(self, every: Duration) {
        // Migrations left by a restart go on at once, not a pass later.
        if let Err(e) = self.resume_migrations().await {
            warn!(error = %e, "could not look for migrations to resume");
        }
        loop {
            tokio::time::sleep(every).await;
            match self.reconcile_once().await {
                Ok(r) if !r.is_empty() => info!(?r, "reconciler acted"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "reconciler pass failed"),
            }
            if self.is_leader() {
                // Good for two intervals: one missed pass is no reason to
                // ask every node again on each ListVolumes.
                if let Err(e) = self.check_health(every * 2).await {
                    warn!(error = %e, "volume health check failed");
                }
            } else {
                // A later term looks afresh before it answers from a pass.
                self.forget_health_pass();
            }
            // The pass held every record's ID and each node's listing for
            // a moment: give those pages back rather than keep them.
            crate::memory::give_back_freed();
        }
    }
}

/// Records by kind and phase, counted during the pass, for the metrics.
#[derive(Default)]
struct PhaseCounts {
    volumes: [i64; 4],
    snapshots: [i64; 4],
}

const PHASES: [Phase; 4] = [Phase::Creating, Phase::Available, Phase::Deleting, Phase::Error];

impl PhaseCounts {
    fn volume(&mut self, p: Phase) {
        self.volumes[PHASES.iter().position(|x| *x == p).unwrap_or(0)] += 1;
    }
    fn snapshot(&mut self, p: Phase) {
        self.snapshots[PHASES.iter().position(|x| *x == p).unwrap_or(0)] += 1;
    }
    fn publish(&self) {
        use crate::metrics::RecordLabels;
        for (kind, counts) in [("volume", &self.volumes), ("snapshot", &self.snapshots)] {
            for (phase, n) in PHASES.iter().zip(counts) {
                METRICS.records.get_or_create(&RecordLabels { kind: kind.into(), phase: format!("{phase:?}") }).set(*n);
            }
        }
    }
}
