//! Migration: a volume moves from its node's pool to another node's, with
//! the cross-node copy machinery (`agent::copier`, the source's read-only
//! NBD export, BLOCK_STATUS) doing the copying.
//!
//! The record carries the migration (`VolumeRec::migration`), so a
//! restarted controller goes on with it (the reconciler starts a driver for
//! every migration no driver runs). One driver task per volume, on the
//! leader, moves it through its phases:
//!
//! - `Copying` (only where the source's pool reflinks): pass 1 snapshots
//!   the volume (a reflink: constant time, not frozen), the source exports
//!   the snapshot to the target only, and the target copies its allocated
//!   ranges into a `.partial` image. Pass N+1 snapshots again and exports
//!   the new snapshot as a layer over pass N's: only the ranges whose blocks
//!   differ between the two (`volume::changes`, FIEMAP) are copied, and
//!   ranges that became zeroes are punched. The volume stays in use
//!   meanwhile; after each pass, pass N-1's snapshot goes.
//! - When a pass ends and the volume has no publication, the driver takes
//!   the volume's in-flight guard (a ControllerPublish waits on it), writes
//!   `Switching`, copies the last pass (what changed since the previous
//!   one), and with the target's image whole writes the record's node = the
//!   target in one compare-and-set. A ControllerPublish that finds
//!   `Switching` without the driver (a restarted controller) is ABORTED, so
//!   nothing writes to the source between its last snapshot and the switch.
//!   Without reflink the migration starts in `Switching`: one pass reads
//!   the unpublished volume itself (offline migration).
//! - `CleaningUp`: the record names the target; the source's export, pass
//!   snapshots and image are removed, then the migration leaves the record.
//! - `Cancelling` (asked while `Copying`, or by a DeleteVolume): the
//!   target's partial volume, the export and the pass snapshots go; the
//!   volume stays where it was.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::create::{accessible_from, topology_of};
use super::crossnode::{copy_refused, source_of};
use super::error::{ControllerError, Failure};
use super::manager::Manager;
use super::records::*;
use crate::agent_proto as pb;
use crate::scheduler::ScheduleRequest;
use crate::store::{self, Kind, StoreError};

/// How often a pass asks the target how far it got.
const POLL: Duration = Duration::from_millis(500);
/// How often the record takes a pass's progress (one store write).
const RECORD_EVERY: Duration = Duration::from_secs(2);
/// The pause between live passes while the volume stays published; after
/// a pass that found nothing changed (an idle volume), a longer one, so an
/// idle published volume costs a snapshot and a record write every few
/// seconds, not every second.
const PASS_PAUSE: Duration = Duration::from_secs(1);
const IDLE_PASS_PAUSE: Duration = Duration::from_secs(5);

/// What a migrate request asks.
#[derive(Debug, Clone)]
pub struct MigrateRequest {
    pub volume_id: String,
    pub to: String,
    /// Let a volume pinned to its node (accessibility: node) move; its
    /// accessible topology then names the new node (a Kubernetes PV's node
    /// affinity does not follow).
    pub allow_topology_change: bool,
    /// Started by the evacuation of the source node.
    pub evacuation: bool,
}

enum Step {
    Again,
    Done,
}

impl Manager {
    /// Start migrating a volume (or report the migration to the same
    /// target that runs already). Nothing is changed when it is refused.
    pub async fn migrate_volume(&self, r: MigrateRequest) -> Result<VolumeRec, ControllerError> {
        self.wait_leader().await?;
        let m = self.clone();
        let rec = self.detached(async move { m.start_migration(r).await }).await?;
        self.ensure_migration_driver(&rec.id);
        Ok(rec)
    }

    async fn start_migration(&self, r: MigrateRequest) -> Result<VolumeRec, ControllerError> {
        let id = r.volume_id.as_str();
        let _guard = self.inflight.acquire(id).await;
        let (mut rec, version) = self.volume(id).await?.ok_or_else(|| ControllerError::not_found("volume", id))?;
        if let Some(mig) = &rec.migration {
            if mig.to == r.to && mig.phase != MigrationPhase::Cancelling {
                return Ok(rec);
            }
            return Err(ControllerError::MigrationUnderWay { volume: id.to_string(), to: mig.to.clone(), phase: mig.phase });
        }
        let (Phase::Available, Some(from)) = (rec.phase, rec.node.clone()) else {
            let what = format!("volume {id}");
            return Err(ControllerError::NotAvailable { what, phase: rec.phase, then: "only an Available volume can migrate" });
        };
        if r.to == from {
            return Err(ControllerError::Invalid(format!("volume {id} lives on node {from} already; name another node")));
        }
        let target = self
            .node_in_view(&r.to)
            .await?
            .ok_or_else(|| ControllerError::Invalid(format!("no node {:?} is registered (cinderblock ctl node list)", r.to)))?;
        let unfit = |why: String| ControllerError::NodeUnfit { node: r.to.clone(), why };
        if let Some(why) = &target.mismatch {
            return Err(unfit(format!("is marked mismatched ({why}); nothing is written there")));
        }
        if !self.node_is_healthy(&target) {
            let secs = self.config.heartbeat_timeout.as_secs();
            return Err(unfit(format!("has not reported for over {secs} s; migrate to a node that is up")));
        }
        if target.evacuating {
            return Err(unfit("is being evacuated; it takes no volumes".into()));
        }
        let at = topology_of(&r.to, &target.zone);
        let inside = rec.accessible_topology.is_empty()
            || rec
                .accessible_topology
                .iter()
                .any(|t| t.iter().all(|(k, v)| (r.allow_topology_change && k == crate::TOPOLOGY_NODE_KEY) || at.get(k) == Some(v)));
        if !inside {
            let hint = if rec.accessibility == Accessibility::Node {
                " (its StorageClass pins it to its node, and a Kubernetes PV's node affinity would keep pods there; \
                 allow it with --allow-topology-change where nothing depends on that)"
            } else {
                ""
            };
            return Err(ControllerError::TopologyUnmet(format!(
                "node {} (zone {:?}) is outside volume {id}'s accessible topology {:?}{hint}",
                r.to, target.zone, rec.accessible_topology
            )));
        }
        let live = self.node_in_view(&from).await?.is_some_and(|n| n.reflink);
        if !live {
            let published: Vec<String> = self.publications(id).await?.into_iter().map(|e| e.node_id).collect();
            if !published.is_empty() {
                let why = format!("node {from}'s pool cannot reflink, so the volume migrates offline only: unpublish it first");
                return Err(ControllerError::InUse { volume: id.to_string(), nodes: published, why });
            }
        }
        let req = ScheduleRequest {
            size_bytes: rec.size_bytes,
            provisioning: rec.provisioning,
            pinned_node: Some(r.to.clone()),
            now_ms: now_ms(),
            heartbeat_timeout_ms: self.config.heartbeat_timeout.as_millis() as i64,
            ..Default::default()
        };
        let reservation = self.view.place(&format!("{id}/migration"), &req).map_err(|e| {
            let (reasons, capacity) = e.why_not(&r.to);
            let size = crate::units::format_bytes(rec.size_bytes);
            ControllerError::TargetCannotTake { node: r.to.clone(), volume: id.to_string(), size, reasons, capacity }
        })?;
        let phase = if live { MigrationPhase::Copying } else { MigrationPhase::Switching };
        rec.migration = Some(MigrationRec {
            from: from.clone(),
            to: r.to.clone(),
            phase,
            live,
            pass: 1,
            copied_bytes: 0,
            pass_copied_bytes: 0,
            pass_total_bytes: 0,
            started_ms: now_ms(),
            evacuation: r.evacuation,
            problem: None,
        });
        rec.updated_ms = now_ms();
        store::update_json(&*self.store, Kind::Volume, id, &rec, version).await?;
        reservation.settle();
        info!(volume.id = %id, from = %from, to = %r.to, live, evacuation = r.evacuation, "migration started");
        self.event(&rec, false, "Migrating", format!("migrating from node {from} to node {}", r.to)).await;
        Ok(rec)
    }

    /// Stop a migration that has not reached its switch: the target's copy
    /// and the pass snapshots are removed, the volume stays where it is.
    pub async fn cancel_migration(&self, id: &str) -> Result<VolumeRec, ControllerError> {
        self.wait_leader().await?;
        let (m, i) = (self.clone(), id.to_string());
        let rec = self
            .detached(async move {
                let _guard = m.inflight.acquire(&i).await;
                let (rec, version) = m.volume(&i).await?.ok_or_else(|| ControllerError::not_found("volume", &i))?;
                m.mark_cancelling(rec, version).await
            })
            .await?;
        self.ensure_migration_driver(id);
        Ok(rec)
    }

    /// With the in-flight guard held: `Copying` becomes `Cancelling`.
    pub(super) async fn mark_cancelling(&self, mut rec: VolumeRec, version: u64) -> Result<VolumeRec, ControllerError> {
        let id = rec.id.clone();
        let Some(mig) = rec.migration.as_mut() else {
            return Err(ControllerError::NotMigrating { volume: id });
        };
        match mig.phase {
            MigrationPhase::Cancelling => return Ok(rec),
            MigrationPhase::Copying => mig.phase = MigrationPhase::Cancelling,
            phase => return Err(ControllerError::TooLateToCancel { volume: id, to: mig.to.clone(), phase }),
        }
        rec.updated_ms = now_ms();
        store::update_json(&*self.store, Kind::Volume, &id, &rec, version).await?;
        info!(volume.id = %id, "migration cancelled");
        Ok(rec)
    }

    /// Run the driver of `id`'s migration unless one runs (leader only).
    pub(crate) fn ensure_migration_driver(&self, id: &str) {
        if !self.is_leader() {
            return;
        }
        let Some(driving) = self.migrations.try_lock(&[id]) else { return };
        let (m, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            m.drive_migration(&id).await;
            drop(driving);
        });
    }

    async fn drive_migration(&self, id: &str) {
        let mut backoff = Duration::from_secs(1);
        while self.is_leader() {
            match self.migration_step(id).await {
                Ok(Step::Again) => backoff = Duration::from_secs(1),
                Ok(Step::Done) => return,
                Err(e) => {
                    warn!(volume.id = %id, failure = ?e.failure(), error = %e, "migration held up; retrying");
                    self.note_migration_problem(id, &e.to_string()).await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn note_migration_problem(&self, id: &str, problem: &str) {
        let Ok(Some((mut rec, version))) = self.volume(id).await else { return };
        let Some(mig) = rec.migration.as_mut() else { return };
        if mig.problem.as_deref() == Some(problem) {
            return;
        }
        mig.problem = Some(problem.to_string());
        let _ = store::update_json(&*self.store, Kind::Volume, id, &rec, version).await;
    }

    async fn migration_step(&self, id: &str) -> Result<Step, ControllerError> {
        let Some((rec, _)) = self.volume(id).await? else { return Ok(Step::Done) };
        let Some(mig) = rec.migration.clone() else { return Ok(Step::Done) };
        match mig.phase {
            MigrationPhase::Copying => {
                if !self.run_pass(&rec, &mig, true).await? {
                    return Ok(Step::Again); // the record moved on (cancelled)
                }
                self.end_pass(id, &mig).await?;
                let guard = self.inflight.acquire(id).await;
                let Some((mut rec, version)) = self.volume(id).await? else { return Ok(Step::Done) };
                let Some(now) = rec.migration.as_mut().filter(|m| m.phase == MigrationPhase::Copying && m.pass == mig.pass) else {
                    return Ok(Step::Again);
                };
                let published = !self.publications(id).await?.is_empty();
                let pause = if now.pass_copied_bytes == 0 && mig.pass > 1 { IDLE_PASS_PAUSE } else { PASS_PAUSE };
                now.copied_bytes += now.pass_copied_bytes;
                (now.pass, now.pass_copied_bytes, now.pass_total_bytes, now.problem) = (mig.pass + 1, 0, 0, None);
                if !published {
                    now.phase = MigrationPhase::Switching;
                }
                rec.updated_ms = now_ms();
                store::update_json(&*self.store, Kind::Volume, id, &rec, version).await?;
                if published {
                    drop(guard);
                    tokio::time::sleep(pause).await;
                    return Ok(Step::Again);
                }
                info!(volume.id = %id, pass = mig.pass + 1, "volume unpublished: last pass and switch");
                self.switch(id, guard).await
            }
            MigrationPhase::Switching => {
                let guard = self.inflight.acquire(id).await;
                self.switch(id, guard).await
            }
            MigrationPhase::CleaningUp => self.clean_up(id, &mig).await,
            MigrationPhase::Cancelling => self.roll_back(id, &mig).await,
        }
    }

    /// The last pass and the switch, with the volume's in-flight guard held
    /// throughout (publications wait).
    async fn switch(&self, id: &str, _guard: crate::keyed_locks::KeyGuard) -> Result<Step, ControllerError> {
        let Some((rec, version)) = self.volume(id).await? else { return Ok(Step::Done) };
        let Some(mig) = rec.migration.clone().filter(|m| m.phase == MigrationPhase::Switching) else { return Ok(Step::Again) };
        let published: Vec<String> = self.publications(id).await?.into_iter().map(|e| e.node_id).collect();
        if !published.is_empty() {
            // Published before `Switching` was written (an older controller):
            // back to live passes, or wait where they are impossible.
            if !mig.live {
                let why = "again: its offline migration waits until it is unpublished".into();
                return Err(ControllerError::InUse { volume: id.to_string(), nodes: published, why });
            }
            let mut rec = rec;
            if let Some(m) = rec.migration.as_mut() {
                m.phase = MigrationPhase::Copying;
            }
            store::update_json(&*self.store, Kind::Volume, id, &rec, version).await?;
            return Ok(Step::Again);
        }
        if !self.run_pass(&rec, &mig, false).await? {
            return Ok(Step::Again);
        }
        let zone = self.node_in_view(&mig.to).await?.map(|n| n.zone).unwrap_or_default();
        let Some((mut rec, version)) = self.volume(id).await? else { return Ok(Step::Done) };
        let Some(now) = rec.migration.as_mut().filter(|m| m.phase == MigrationPhase::Switching && m.pass == mig.pass) else {
            return Ok(Step::Again);
        };
        now.copied_bytes += now.pass_copied_bytes;
        (now.pass_copied_bytes, now.pass_total_bytes, now.phase, now.problem) = (0, 0, MigrationPhase::CleaningUp, None);
        rec.node = Some(mig.to.clone());
        rec.accessible_topology = vec![accessible_from(&mig.to, &zone, rec.accessibility)];
        rec.updated_ms = now_ms();
        // The switch: one compare-and-set. Before it the source is the volume, after it the target.
        store::update_json(&*self.store, Kind::Volume, id, &rec, version).await?;
        info!(volume.id = %id, from = %mig.from, to = %mig.to, passes = mig.pass, "volume switched to its new node");
        self.event(&rec, false, "Migrated", format!("the volume now lives on node {} (was {})", mig.to, mig.from)).await;
        Ok(Step::Again)
    }

    /// Copy pass `mig.pass` to the target and follow it until it is done
    /// (true), or until the record moves on (false: cancelled, say).
    async fn run_pass(&self, rec: &VolumeRec, mig: &MigrationRec, more: bool) -> Result<bool, ControllerError> {
        let id = rec.id.as_str();
        let finished = |v: &pb::Volume| {
            if more {
                v.copy_pass == mig.pass && v.copy_pass_done
            } else {
                v.state == pb::ImageState::Available as i32
            }
        };
        // Done already (a restart after the pass): its export and its base may be gone.
        let mut target = self.agent_for(&mig.to).await?;
        match target.get_volume(pb::GetVolumeRequest { volume_id: id.to_string() }).await {
            Ok(r) if r.volume.as_ref().is_some_and(finished) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.failure == Failure::NotFound => {}
            Err(e) => return Err(ControllerError::during(format!("node {}", mig.to))(e)),
        }
        let snapshot = mig.live.then(|| mig.pass_snapshot(id, mig.pass));
        let base = (mig.live && mig.pass > 1).then(|| mig.pass_snapshot(id, mig.pass - 1));
        let mut source = self.agent_for(&mig.from).await?;
        if let Some(s) = &snapshot {
            source
                .create_snapshot(pb::CreateSnapshotRequest {
                    snapshot_id: s.clone(),
                    source_volume_id: id.to_string(),
                    migration_pass: true,
                    ..Default::default()
                })
                .await
                .map_err(ControllerError::during(format!("node {} could not snapshot volume {id} for pass {}", mig.from, mig.pass)))?;
        }
        let export = source
            .create_export(pb::CreateExportRequest {
                volume_id: if snapshot.is_some() { String::new() } else { id.to_string() },
                snapshot_id: snapshot.clone().unwrap_or_default(),
                consumer_node: mig.to.clone(),
                read_only: true,
                copy_for: id.to_string(),
                base_snapshot_id: base.unwrap_or_default(),
                // A copy is read over TLS only.
                plain_from: vec![],
            })
            .await
            .map_err(ControllerError::during(format!("node {} could not export volume {id} to node {}", mig.from, mig.to)))?
            .export
            .ok_or(ControllerError::IncompleteAnswer("an export"))?;
        let req = pb::CreateVolumeRequest {
            volume_id: id.to_string(),
            size_bytes: rec.size_bytes,
            provisioning: crate::agent::provisioning_to_pb(rec.provisioning) as i32,
            source: source_of(&rec.source),
            metadata: rec.metadata.clone().into_iter().collect(),
            remote: Some(pb::RemoteSource {
                address: export.address,
                export_name: export.export_name,
                server_node: mig.from.clone(),
                pass: mig.pass,
                more_passes: more,
            }),
        };
        let mut recorded_at = Instant::now();
        loop {
            let Some((mut now, version)) = self.volume(id).await? else { return Ok(false) };
            let Some(cur) = now.migration.as_mut().filter(|m| m.phase == mig.phase && m.pass == mig.pass) else { return Ok(false) };
            let answer = match self.agent_for(&mig.to).await {
                Ok(mut agent) => {
                    agent.create_volume(req.clone()).await.map(|r| r.volume.unwrap_or_default()).map_err(ControllerError::Agent)
                }
                Err(e) => Err(e),
            };
            match answer {
                Ok(v) if finished(&v) => {
                    if (cur.pass_copied_bytes, cur.pass_total_bytes) != (v.copied_bytes, v.copy_total_bytes) {
                        (cur.pass_copied_bytes, cur.pass_total_bytes) = (v.copied_bytes, v.copy_total_bytes);
                        store::update_json(&*self.store, Kind::Volume, id, &now, version).await?;
                    }
                    info!(volume.id = %id, pass = mig.pass, copied = v.copied_bytes, last = !more, "migration pass copied");
                    return Ok(true);
                }
                Ok(v) => {
                    let progress = (v.copied_bytes, v.copy_total_bytes);
                    if (cur.pass_copied_bytes, cur.pass_total_bytes) != progress && recorded_at.elapsed() >= RECORD_EVERY {
                        (cur.pass_copied_bytes, cur.pass_total_bytes) = progress;
                        cur.problem = Some(v.problem).filter(|p| !p.is_empty());
                        match store::update_json(&*self.store, Kind::Volume, id, &now, version).await {
                            Ok(_) | Err(StoreError::Conflict { .. }) => {}
                            Err(e) => return Err(e.into()),
                        }
                        recorded_at = Instant::now();
                    }
                }
                // The target refused (capacity, arguments, the fence): the driver retries and notes why.
                Err(e) if copy_refused(e.failure()) => {
                    let what = format!("node {} refused pass {} of volume {id}", mig.to, mig.pass);
                    return Err(ControllerError::During { what, cause: Box::new(e) });
                }
                Err(e) => warn!(volume.id = %id, node = %mig.to, error = %e, "cannot ask the target about its copy now"),
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A live pass is copied: its export goes, and so does the previous
    /// pass's snapshot (this pass's is the next one's base).
    async fn end_pass(&self, id: &str, mig: &MigrationRec) -> Result<(), ControllerError> {
        self.drop_pass_export(id, mig).await?;
        if mig.pass > 1 {
            self.delete_pass_snapshot(id, mig, mig.pass - 1).await?;
        }
        Ok(())
    }

    async fn drop_pass_export(&self, id: &str, mig: &MigrationRec) -> Result<(), ControllerError> {
        let source = if mig.live { SourceRef::Snapshot(mig.pass_snapshot(id, mig.pass)) } else { SourceRef::Volume(id.to_string()) };
        self.drop_copy_export(id, &source, &mig.from, &mig.to).await
    }

    async fn delete_pass_snapshot(&self, id: &str, mig: &MigrationRec, pass: u32) -> Result<(), ControllerError> {
        if !mig.live || self.node_in_view(&mig.from).await?.is_none() {
            return Ok(());
        }
        let snapshot_id = mig.pass_snapshot(id, pass);
        let mut agent = self.agent_for(&mig.from).await?;
        agent
            .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: snapshot_id.clone() })
            .await
            .map_err(ControllerError::during(format!("node {} could not delete pass snapshot {snapshot_id}", mig.from)))?;
        Ok(())
    }

    /// Remove everything of the migration on `node` (the export, the pass
    /// snapshots, and the volume's image there), then the migration from
    /// the record.
    async fn remove_leftovers(&self, id: &str, mig: &MigrationRec, image_on: &str) -> Result<(), ControllerError> {
        self.drop_pass_export(id, mig).await?;
        self.delete_pass_snapshot(id, mig, mig.pass).await?;
        if mig.pass > 1 {
            self.delete_pass_snapshot(id, mig, mig.pass - 1).await?;
        }
        if self.node_in_view(image_on).await?.is_some() {
            let mut agent = self.agent_for(image_on).await?;
            agent
                .delete_volume(pb::DeleteVolumeRequest { volume_id: id.to_string() })
                .await
                .map_err(ControllerError::during(format!("node {image_on} could not delete its copy of volume {id}")))?;
        }
        let _guard = self.inflight.acquire(id).await;
        let Some((mut rec, version)) = self.volume(id).await? else { return Ok(()) };
        if rec.migration.as_ref().is_some_and(|m| m.phase == mig.phase && m.to == mig.to) {
            rec.migration = None;
            rec.updated_ms = now_ms();
            store::update_json(&*self.store, Kind::Volume, id, &rec, version).await?;
        }
        Ok(())
    }

    async fn clean_up(&self, id: &str, mig: &MigrationRec) -> Result<Step, ControllerError> {
        self.remove_leftovers(id, mig, &mig.from).await?;
        info!(volume.id = %id, from = %mig.from, to = %mig.to, copied = mig.copied_bytes, "migration complete; the source's image is gone");
        Ok(Step::Done)
    }

    async fn roll_back(&self, id: &str, mig: &MigrationRec) -> Result<Step, ControllerError> {
        self.remove_leftovers(id, mig, &mig.to).await?;
        info!(volume.id = %id, from = %mig.from, to = %mig.to, "migration cancelled; the target's copy is gone");
        Ok(Step::Done)
    }
}
