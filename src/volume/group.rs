//! Freezes held for a group snapshot. A group snapshot is cut in three
//! steps across nodes: every member's filesystem frozen (`freeze_group`),
//! every member's snapshot taken (`create_snapshot_in_group`, which finds
//! its source frozen already and does not freeze it again), every member
//! thawed (`thaw_group`). Between the calls the freezes live here, keyed by
//! volume. Each is bounded by the freezer's watchdog: a controller that
//! dies between the steps leaves the filesystems frozen for at most the
//! limit it asked for.
//!
//! A member used from another node over NBD has its filesystem mounted on
//! that node, its consumer: the owner holds it (nothing of it is mounted
//! there, so its snapshot is cut as the group's and no other is) and the
//! consumer freezes its mount of it (`consumed`, through the node's
//! freezer), under the same group, watchdog and thaw report.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::copy;
use super::error::VolumeError;
use super::freeze::Thaw;
use super::pool::Pool;
use super::validate_id;

/// The longest a group may keep filesystems frozen (plus copy time where
/// there is no reflink).
pub const MAX_GROUP_FREEZE: Duration = Duration::from_secs(120);
/// A group nobody thawed is forgotten this long after its limit passed
/// (the watchdog has thawed it by then); until then `thaw_group` can still
/// tell the caller that it did not hold.
const FORGET_AFTER: Duration = Duration::from_secs(600);

struct Held {
    /// Per member volume: the frozen filesystem (None: nothing writable was
    /// mounted from it, it is at rest already).
    members: BTreeMap<String, Option<Box<dyn Thaw>>>,
    /// Per volume of another node mounted here (this node is its
    /// consumer): the frozen filesystem (None: not mounted writable here).
    consumed: BTreeMap<String, Option<Box<dyn Thaw>>>,
    until: Instant,
}

#[derive(Default)]
pub struct GroupFreezes {
    groups: Mutex<HashMap<String, Held>>,
}

impl GroupFreezes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The group holding `volume` frozen, and whether its time is still running.
    pub(super) fn holder(&self, volume: &str) -> Option<(String, bool)> {
        let now = Instant::now();
        self.lock().iter().find(|(_, h)| h.members.contains_key(volume)).map(|(g, h)| (g.clone(), now < h.until))
    }
}

impl Pool {
    /// Freeze the filesystems mounted from these volumes' images, all of
    /// them or none, and hold them for group `group` until `thaw_group` or
    /// `max` (then the watchdogs thaw them). Repeating it for a group that
    /// holds the same volumes is success.
    /// With them, the filesystems this node has mounted from `consumed`,
    /// volumes of other nodes used here over NBD (their owners hold them
    /// for the group and cut them). All of them or none.
    pub fn freeze_group(&self, group: &str, volumes: &[String], consumed: &[String], max: Duration) -> Result<Vec<String>, VolumeError> {
        validate_id("group snapshot id", group)?;
        if volumes.is_empty() && consumed.is_empty() {
            return Err(VolumeError::Invalid { what: "volume list", reason: "no volume to freeze".into() });
        }
        let max = max.min(MAX_GROUP_FREEZE);
        let mut sorted: Vec<String> = volumes.to_vec();
        sorted.sort();
        sorted.dedup();
        for v in &sorted {
            validate_id("volume id", v)?;
            self.get_volume(v)?;
        }
        let mut sorted_consumed: Vec<String> = consumed.to_vec();
        sorted_consumed.sort();
        sorted_consumed.dedup();
        for v in &sorted_consumed {
            validate_id("consumed volume id", v)?;
        }
        self.forget_stale_groups();
        {
            let held = self.groups.lock();
            if let Some(h) = held.get(group) {
                let same = h.members.keys().eq(sorted.iter()) && h.consumed.keys().eq(sorted_consumed.iter());
                return match same && Instant::now() < h.until {
                    true => Ok(sorted),
                    false => Err(VolumeError::Conflict {
                        kind: "group freeze",
                        id: group.to_string(),
                        detail: format!("it holds volumes {:?} (or its time ran out); thaw it first", h.members.keys().collect::<Vec<_>>()),
                    }),
                };
            }
            if let Some((g, v)) = held.iter().find_map(|(g, h)| sorted.iter().find(|v| h.members.contains_key(*v)).map(|v| (g, v))) {
                return Err(VolumeError::Freeze {
                    volume: v.clone(),
                    reason: format!("group snapshot {g} holds it frozen; retry when that one ends"),
                });
            }
            if let Some((g, v)) =
                held.iter().find_map(|(g, h)| sorted_consumed.iter().find(|v| h.consumed.contains_key(*v)).map(|v| (g, v)))
            {
                return Err(VolumeError::Freeze {
                    volume: v.clone(),
                    reason: format!("group snapshot {g} holds its filesystem on this node frozen; retry when that one ends"),
                });
            }
        }
        let started = Instant::now();
        let mut members = BTreeMap::new();
        for v in &sorted {
            let image = self.volume_image(v);
            let opened = File::open(&image).map_err(VolumeError::io(format!("opening {}", image.display())))?;
            let copy_time = if self.reflink() { 0 } else { copy::allocated_bytes(&opened).unwrap_or(0) / (20 << 20) };
            let limit = max + Duration::from_secs(copy_time);
            // On an error the freezes made so far are dropped, which thaws them.
            let frozen = self.freeze_with(&image, limit)?;
            members.insert(v.clone(), frozen);
        }
        let mut consumed = BTreeMap::new();
        for v in &sorted_consumed {
            let frozen = self.freeze_consumed_with(v, max)?;
            consumed.insert(v.clone(), frozen);
        }
        let filesystems = members.values().filter(|f| f.is_some()).count();
        let consumed_filesystems = consumed.values().filter(|f| f.is_some()).count();
        info!(
            group,
            volumes = ?sorted,
            filesystems,
            consumed = ?sorted_consumed,
            consumed_filesystems,
            took_ms = started.elapsed().as_millis() as u64,
            "volumes frozen for a group snapshot"
        );
        self.groups.lock().insert(group.to_string(), Held { members, consumed, until: started + max });
        Ok(sorted)
    }

    /// Thaw what group `group` holds. The answer lists each member that did
    /// not stay frozen until now, with why (its snapshot may not be clean).
    /// A group that holds nothing here is success with nothing to report.
    pub fn thaw_group(&self, group: &str) -> Result<Vec<(String, String)>, VolumeError> {
        validate_id("group snapshot id", group)?;
        let Some(held) = self.groups.lock().remove(group) else {
            return Ok(vec![]);
        };
        let mut early = vec![];
        for (volume, frozen) in held.members.into_iter().chain(held.consumed) {
            if let Some(f) = frozen {
                if let Err(reason) = f.thaw() {
                    warn!(group, volume.id = %volume, %reason, "a group member did not stay frozen");
                    early.push((volume, reason));
                }
            }
        }
        info!(group, thawed_early = early.len(), "group snapshot's volumes thawed");
        Ok(early)
    }

    /// Groups whose limit passed long ago: their watchdogs thawed them.
    fn forget_stale_groups(&self) {
        let now = Instant::now();
        self.groups.lock().retain(|g, h| {
            let keep = now < h.until + FORGET_AFTER;
            if !keep {
                warn!(group = %g, "a group freeze nobody thawed is forgotten (its watchdogs thawed it)");
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::freeze::Freezer;
    use crate::volume::pool::{CreateVolume, PoolConfig};
    use crate::volume::Provisioning;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts freezes and thaws. The real freezer needs a mounted
    /// filesystem (tests/group_snapshot.rs freezes real ones); here only
    /// the pool's bookkeeping around it is checked.
    #[derive(Default)]
    struct Counting {
        frozen: Arc<AtomicUsize>,
        thawed: Arc<AtomicUsize>,
    }
    struct CountingThaw(Arc<AtomicUsize>);
    impl Thaw for CountingThaw {
        fn thaw(self: Box<Self>) -> Result<(), String> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    impl Freezer for Counting {
        fn freeze(&self, _image: &Path, _max: Duration) -> Result<Option<Box<dyn Thaw>>, String> {
            self.frozen.fetch_add(1, Ordering::SeqCst);
            Ok(Some(Box::new(CountingThaw(self.thawed.clone()))))
        }
        fn freeze_consumed(&self, volume: &str, max: Duration) -> Result<Option<Box<dyn Thaw>>, String> {
            self.freeze(Path::new(volume), max)
        }
    }

    fn volume(pool: &Pool, id: &str) {
        let req = CreateVolume {
            id: id.into(),
            size_bytes: 1 << 20,
            provisioning: Provisioning::Thin,
            source: None,
            metadata: Default::default(),
        };
        pool.create_volume(req).unwrap();
    }

    #[test]
    fn a_group_holds_its_members_frozen_for_its_own_snapshots_only() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
        let counting = Counting::default();
        let (frozen, thawed) = (counting.frozen.clone(), counting.thawed.clone());
        pool.set_freezer(Arc::new(counting));
        volume(&pool, "vol-a");
        volume(&pool, "vol-b");
        let members = vec!["vol-b".to_string(), "vol-a".to_string()];
        let limit = Duration::from_secs(30);
        assert_eq!(pool.freeze_group("group-1", &members, &[], limit).unwrap(), ["vol-a", "vol-b"]);
        assert_eq!(frozen.load(Ordering::SeqCst), 2);
        // A repeat holds what it holds; another group or other members do not get in.
        pool.freeze_group("group-1", &members, &[], limit).unwrap();
        assert_eq!(frozen.load(Ordering::SeqCst), 2);
        assert!(matches!(pool.freeze_group("group-2", &["vol-a".to_string()], &[], limit), Err(VolumeError::Freeze { .. })));
        assert!(matches!(pool.freeze_group("group-1", &["vol-a".to_string()], &[], limit), Err(VolumeError::Conflict { .. })));
        // A plain snapshot waits for the group; the group's own is cut without a second freeze.
        assert!(matches!(pool.create_snapshot("snap-x", "vol-a", Default::default()), Err(VolumeError::Freeze { .. })));
        assert!(matches!(
            pool.create_snapshot_in_group("snap-y", "vol-a", Default::default(), Some("group-2")),
            Err(VolumeError::Freeze { .. })
        ));
        pool.create_snapshot_in_group("snap-a", "vol-a", Default::default(), Some("group-1")).unwrap();
        assert_eq!(frozen.load(Ordering::SeqCst), 2);
        assert_eq!(pool.thaw_group("group-1").unwrap(), vec![]);
        assert_eq!(thawed.load(Ordering::SeqCst), 2);
        // Thawed: nothing held; a group member without its freeze is refused.
        assert_eq!(pool.thaw_group("group-1").unwrap(), vec![]);
        assert!(matches!(
            pool.create_snapshot_in_group("snap-b", "vol-b", Default::default(), Some("group-1")),
            Err(VolumeError::Freeze { .. })
        ));
        pool.create_snapshot("snap-x", "vol-a", Default::default()).unwrap();
        // Unknown volumes and bad IDs change nothing.
        assert!(matches!(pool.freeze_group("group-3", &["vol-zz".to_string()], &[], limit), Err(VolumeError::NotFound { .. })));
        assert!(matches!(pool.freeze_group("../x", &members, &[], limit), Err(VolumeError::Invalid { .. })));
        assert!(matches!(pool.freeze_group("group-3", &[], &[], limit), Err(VolumeError::Invalid { .. })));
        assert_eq!(frozen.load(Ordering::SeqCst), 3, "only the plain snapshot froze again");
    }

    /// This node mounts volumes of another node's pool (its consumer): a
    /// group freezes them here, with or without members of its own, holds
    /// them for no snapshot here and thaws them with the rest.
    #[test]
    fn a_group_freezes_what_this_node_mounts_of_other_nodes_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
        let counting = Counting::default();
        let (frozen, thawed) = (counting.frozen.clone(), counting.thawed.clone());
        pool.set_freezer(Arc::new(counting));
        volume(&pool, "vol-own");
        let limit = Duration::from_secs(30);
        let elsewhere = vec!["vol-remote".to_string()];
        // Not in this pool, and that is fine: only its mount here is frozen.
        assert_eq!(pool.freeze_group("group-1", &[], &elsewhere, limit).unwrap(), Vec::<String>::new());
        assert_eq!(frozen.load(Ordering::SeqCst), 1);
        pool.freeze_group("group-1", &[], &elsewhere, limit).unwrap();
        assert_eq!(frozen.load(Ordering::SeqCst), 1, "a repeat holds what it holds");
        let e = pool.freeze_group("group-2", &["vol-own".to_string()], &elsewhere, limit).unwrap_err();
        assert!(matches!(e, VolumeError::Freeze { .. }), "{e}");
        assert!(matches!(pool.freeze_group("group-1", &["vol-own".to_string()], &[], limit), Err(VolumeError::Conflict { .. })));
        // Holding a consumed volume does not hold this pool's own volumes.
        pool.create_snapshot("snap-own", "vol-own", Default::default()).unwrap();
        assert_eq!(frozen.load(Ordering::SeqCst), 2);
        assert_eq!(pool.thaw_group("group-1").unwrap(), vec![]);
        assert_eq!(thawed.load(Ordering::SeqCst), 2);
        let bad = vec!["../x".to_string()];
        assert!(matches!(pool.freeze_group("group-3", &[], &bad, limit), Err(VolumeError::Invalid { .. })));
        assert!(matches!(pool.freeze_group("group-3", &[], &[], limit), Err(VolumeError::Invalid { .. })));
    }
}

#[cfg(test)]
mod real_freeze {
    use super::*;
    use crate::attach::loopdev::{self, AttachOptions};
    use crate::attach::testutil::{running_as_root, Cleanup};
    use crate::attach::{filesystem, mount};
    use crate::volume::pool::{CreateVolume, PoolConfig};
    use crate::volume::Provisioning;
    use std::io::Write;
    use std::sync::Arc;

    /// The controller froze a group and died before thawing it: the
    /// watchdog thaws the filesystem at the limit, writers go on, and a
    /// late thaw says the freeze did not hold (so no member is trusted).
    #[tokio::test]
    async fn a_group_nobody_thaws_is_thawed_at_its_limit() {
        if !running_as_root("a_group_nobody_thaws_is_thawed_at_its_limit") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let (pool, _) = Pool::open(&dir.path().join("pool"), PoolConfig::default()).unwrap();
        pool.set_freezer(Arc::new(crate::node::freeze::MountedFilesystems::default()));
        let req = CreateVolume {
            id: "vol-f".into(),
            size_bytes: 32 << 20,
            provisioning: Provisioning::Thin,
            source: None,
            metadata: Default::default(),
        };
        pool.create_volume(req).unwrap();
        let handle = loopdev::attach(&pool.volume_image("vol-f"), AttachOptions::for_filesystem(false)).unwrap();
        cleanup.attached(&handle.device);
        filesystem::format(&handle.device.path, "ext4", &[]).await.unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        cleanup.mounted(&mnt);
        mount::mount_fs(&handle.device.path, &mnt, "ext4", &[], false).unwrap();

        let started = Instant::now();
        pool.freeze_group("group-gone", &["vol-f".to_string()], &[], Duration::from_millis(1500)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let file = mnt.join("after");
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(&file).unwrap();
            f.write_all(b"x").unwrap();
            f.sync_all().unwrap();
            let _ = tx.send(Instant::now());
        });
        let written = rx.recv_timeout(Duration::from_secs(20)).expect("the filesystem stayed frozen past its limit");
        let waited = written - started;
        assert!(waited >= Duration::from_millis(1000), "the write went through a freeze after {waited:?}");
        // The group's own snapshot is refused now, and a late thaw reports it.
        let e = pool.create_snapshot_in_group("snap-late", "vol-f", Default::default(), Some("group-gone")).unwrap_err();
        assert!(matches!(e, VolumeError::Freeze { .. }), "{e}");
        let early = pool.thaw_group("group-gone").unwrap();
        assert_eq!(early.len(), 1, "{early:?}");
        assert!(early[0].1.contains("longer than"), "{early:?}");
    }
}
