//! Every publication (Export record) by volume, in memory, kept current
//! from the store's change feed (`store::follow`), for the reads that
//! report them: ListVolumes, ControllerGetVolume and the health pass. A
//! page of ListVolumes so looks up the publications of its own volumes
//! instead of reading every Export record of the cluster.
//!
//! The flows that change publications (publish, unpublish, delete,
//! migrate) take the IDs of a volume's publications from it and read each
//! record from the store, for the version they write with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tracing::warn;

use super::records::ExportRec;
use crate::store::follow::{self, Follower, Progress};
use crate::store::{self, Change, Kind, Store, StoreError};

/// How long a read waits for the index to hold every write answered before
/// it; past that it reads the store.
pub const PATIENCE: Duration = Duration::from_secs(2);

/// Publications by volume ID.
pub type ByVolume = HashMap<String, Vec<ExportRec>>;

/// Cheap to clone (shared).
#[derive(Clone)]
pub struct Publications {
    index: Arc<Index>,
    progress: Arc<Progress>,
}

#[derive(Default)]
struct Index {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    by_volume: ByVolume,
    /// The volume of each Export record (a deletion names only the record).
    volume_of: HashMap<String, String>,
}

impl State {
    fn remove(&mut self, export_id: &str) {
        let Some(volume) = self.volume_of.remove(export_id) else { return };
        if let Some(list) = self.by_volume.get_mut(&volume) {
            list.retain(|e| e.id != export_id);
            if list.is_empty() {
                self.by_volume.remove(&volume);
            }
        }
    }

    fn insert(&mut self, e: ExportRec) {
        self.remove(&e.id);
        self.volume_of.insert(e.id.clone(), e.volume_id.clone());
        let list = self.by_volume.entry(e.volume_id.clone()).or_default();
        let at = list.binary_search_by(|x| x.id.cmp(&e.id)).unwrap_or_else(|at| at);
        list.insert(at, e);
    }
}

impl Publications {
    /// An index that follows `store`.
    pub fn follow(store: &Arc<dyn Store>) -> Publications {
        let publications = Publications { index: Default::default(), progress: Default::default() };
        follow::spawn(store, publications.index.clone(), publications.progress.clone());
        publications
    }

    /// True once the index holds every write the store answered before its
    /// change `seq` (waiting at most `patience`).
    pub async fn caught_up(&self, seq: u64, patience: Duration) -> bool {
        self.progress.caught_up(seq, patience).await
    }

    /// The publications of `volumes` (only those that have some).
    pub fn of<'a>(&self, volumes: impl IntoIterator<Item = &'a str>) -> ByVolume {
        let state = self.index.lock();
        volumes.into_iter().filter_map(|v| state.by_volume.get(v).map(|list| (v.to_string(), list.clone()))).collect()
    }

    /// Every publication.
    pub fn all(&self) -> ByVolume {
        self.index.lock().by_volume.clone()
    }

    /// The publications of `volumes` (of every volume when None): from the
    /// index once it holds every write `store` answered before this call
    /// (waiting at most `PATIENCE`), else read from the store (the index is
    /// still making its first read, or fell behind).
    pub async fn read(&self, store: &dyn Store, volumes: Option<&[&str]>) -> Result<ByVolume, StoreError> {
        if self.caught_up(store.change_seq(), PATIENCE).await {
            return Ok(match volumes {
                Some(vs) => self.of(vs.iter().copied()),
                None => self.all(),
            });
        }
        let mut found = ByVolume::new();
        for (e, _) in store::list_json::<ExportRec>(store, Kind::Export).await? {
            if volumes.is_none_or(|vs| vs.contains(&e.volume_id.as_str())) {
                found.entry(e.volume_id.clone()).or_default().push(e);
            }
        }
        Ok(found)
    }
}

impl Index {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl Follower for Index {
    fn what(&self) -> &'static str {
        "publications index"
    }

    async fn load(&self, store: &dyn Store) -> Result<(), StoreError> {
        let exports = store::list_json::<ExportRec>(store, Kind::Export).await?;
        let mut fresh = State::default();
        for (e, _) in exports {
            fresh.insert(e);
        }
        *self.lock() = fresh;
        Ok(())
    }

    fn apply(&self, change: Change) {
        match change {
            Change::Record { kind: Kind::Export, id, value: Some(v) } => match store::decode_json::<ExportRec>(Kind::Export, &id, &v.value)
            {
                Ok(e) => self.lock().insert(e),
                Err(e) => {
                    // Not kept as it was: the record changed into something
                    // this version cannot read.
                    warn!(export = %id, error = %e, "publications index: an Export record could not be read; left out");
                    self.lock().remove(&id);
                }
            },
            Change::Record { kind: Kind::Export, id, value: None } => self.lock().remove(&id),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::records::Phase;
    use crate::store::EmbeddedStore;

    fn export(volume: &str, node: &str) -> ExportRec {
        ExportRec {
            id: format!("exp-{volume}-{node}"),
            volume_id: volume.into(),
            node_id: node.into(),
            protocol: "nbd".into(),
            address: "127.0.0.1:10809".into(),
            export_name: format!("{volume}@{node}"),
            phase: Phase::Available,
            owner_node: "node-a".into(),
            read_only: false,
            plain_text: false,
        }
    }

    fn nodes(p: &Publications, volume: &str) -> Vec<String> {
        p.of([volume]).remove(volume).unwrap_or_default().into_iter().map(|e| e.node_id).collect()
    }

    #[test]
    fn a_record_that_moves_or_cannot_be_read_leaves_no_stale_entry() {
        let index = Index::default();
        let put = |e: &ExportRec| Change::Record {
            kind: Kind::Export,
            id: e.id.clone(),
            value: Some(store::Versioned { version: 1, value: serde_json::to_vec(e).unwrap() }),
        };
        let first = export("vol-1", "node-b");
        index.apply(put(&first));
        // The same record naming another volume (not something the flows
        // do, but the index must not keep it under both).
        let moved = ExportRec { volume_id: "vol-2".into(), ..first.clone() };
        index.apply(put(&moved));
        let state = index.lock();
        assert!(!state.by_volume.contains_key("vol-1"));
        assert_eq!(state.by_volume["vol-2"].len(), 1);
        drop(state);
        // Rewritten as something this version cannot read: left out.
        index.apply(Change::Record {
            kind: Kind::Export,
            id: first.id.clone(),
            value: Some(store::Versioned { version: 2, value: b"{\"phase\": \"Unheard\"}".to_vec() }),
        });
        assert!(index.lock().by_volume.is_empty());
        assert!(index.lock().volume_of.is_empty());
    }

    #[tokio::test]
    async fn the_index_follows_publications_written_before_and_after_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let s = &*store;
        // Written before the index starts: found by its first read.
        store::create_json(s, Kind::Export, &export("vol-1", "node-b").id, &export("vol-1", "node-b")).await.unwrap();
        let p = Publications::follow(&store);
        let patience = Duration::from_secs(10);
        assert!(p.caught_up(store.change_seq(), patience).await);
        assert_eq!(nodes(&p, "vol-1"), ["node-b"]);

        // Written after: each write is in once the caller's change is.
        let (b, c) = (export("vol-1", "node-b"), export("vol-1", "node-c"));
        store::create_json(s, Kind::Export, &c.id, &c).await.unwrap();
        store::create_json(s, Kind::Export, &export("vol-2", "node-b").id, &export("vol-2", "node-b")).await.unwrap();
        assert!(p.caught_up(store.change_seq(), patience).await);
        assert_eq!(nodes(&p, "vol-1"), ["node-b", "node-c"]);
        let some = p.of(["vol-2", "vol-none"]);
        assert_eq!(some.keys().collect::<Vec<_>>(), ["vol-2"]);

        // A change to a record replaces it; a deletion removes it, and a
        // volume left without any has no entry.
        let mut changed = b.clone();
        changed.read_only = true;
        let version = store::get_json::<ExportRec>(s, Kind::Export, &b.id).await.unwrap().unwrap().1;
        store::update_json(s, Kind::Export, &b.id, &changed, version).await.unwrap();
        assert!(p.caught_up(store.change_seq(), patience).await);
        let vol1 = p.of(["vol-1"]).remove("vol-1").unwrap();
        assert_eq!(vol1.len(), 2);
        assert!(vol1.iter().any(|e| e.node_id == "node-b" && e.read_only));
        store.delete(Kind::Export, &b.id, None).await.unwrap();
        store.delete(Kind::Export, &c.id, None).await.unwrap();
        assert!(p.caught_up(store.change_seq(), patience).await);
        assert!(nodes(&p, "vol-1").is_empty());
        assert_eq!(p.all().keys().collect::<Vec<_>>(), ["vol-2"]);
    }
}
