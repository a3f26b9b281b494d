//! The store: the control plane's records (volumes, snapshots, nodes,
//! exports, group snapshots) behind one trait with compare-and-set updates.
//!
//! Values are opaque bytes with a version that starts at 1 and grows by one
//! per write; callers read, change, and write back with the version they read,
//! and on `Conflict` read again. The typed helpers below store serde records as
//! JSON. `embedded` (redb, one file) is the default; a Kubernetes
//! custom-resource store implements the same trait and must pass
//! the behaviour suite in tests/store_suite.
//!
//! Besides the records, a store carries two things the controller's node
//! view needs: a feed of the changes it commits (`changes`), and node
//! liveness (`renew_liveness`), kept apart from the node records so that a
//! heartbeat costs one small write (a Lease in a cluster) and a node's
//! record is written only when what it reports changes.

pub mod embedded;
pub mod follow;
#[cfg(test)]
mod tests;

pub use embedded::EmbeddedStore;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::broadcast;

/// The kinds of record; each is its own table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Volume,
    Snapshot,
    Node,
    Export,
    GroupSnapshot,
}

impl Kind {
    /// Every kind, for implementations that set up one table per kind.
    const ALL: [Kind; 5] = [Kind::Volume, Kind::Snapshot, Kind::Node, Kind::Export, Kind::GroupSnapshot];

    pub fn all() -> [Kind; 5] {
        Kind::ALL
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
            Kind::Node => "nodes",
            Kind::Export => "exports",
            Kind::GroupSnapshot => "groupsnapshots",
        }
    }
}

/// A stored value with its version; versions start at 1 and grow by one per update.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub version: u64,
    pub value: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {id:?} already exists")]
    AlreadyExists { kind: &'static str, id: String, existing: Versioned },
    #[error("{kind} {id:?} does not exist")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} {id:?} changed since it was read (version {expected} expected, {actual} found); read it again")]
    Conflict { kind: &'static str, id: String, expected: u64, actual: u64 },
    #[error("store: {0}")]
    Backend(String),
}

impl StoreError {
    /// The gRPC code a caller gets for this failure.
    pub fn code(&self) -> tonic::Code {
        match self {
            // ABORTED is what the CSI sidecars retry, which is what a lost
            // compare-and-set needs: the retry reads the record again.
            StoreError::Conflict { .. } => tonic::Code::Aborted,
            StoreError::NotFound { .. } => tonic::Code::NotFound,
            StoreError::AlreadyExists { .. } => tonic::Code::AlreadyExists,
            StoreError::Backend(_) => tonic::Code::Unavailable,
        }
    }
}

impl From<StoreError> for tonic::Status {
    fn from(err: StoreError) -> Self {
        tonic::Status::new(err.code(), err.to_string())
    }
}

/// One change a store committed, in commit order, for whoever keeps a view
/// of the records (the controller's node view).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A record was written (`Some`) or deleted (`None`).
    Record { kind: Kind, id: String, value: Option<Versioned> },
    /// A node said it is alive; `at_ms` by this process's clock, when the
    /// store saw it.
    Alive { node: String, at_ms: i64 },
}

/// How many changes a slow reader may fall behind before it is told to
/// read everything again (`broadcast::error::RecvError::Lagged`).
pub const CHANGE_BACKLOG: usize = 8192;

/// A store's change feed: each change numbered (1, 2, 3...) in the order it
/// was sent, so a reader can tell a caller "everything up to N is in".
pub struct Feed {
    tx: broadcast::Sender<(u64, Change)>,
    seq: std::sync::Mutex<u64>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed { tx: broadcast::channel(CHANGE_BACKLOG).0, seq: std::sync::Mutex::new(0) }
    }
}

impl Feed {
    pub fn send(&self, change: Change) {
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        *seq += 1;
        // Nobody may be listening; that is fine.
        let _ = self.tx.send((*seq, change));
    }
    pub fn subscribe(&self) -> broadcast::Receiver<(u64, Change)> {
        self.tx.subscribe()
    }
    /// The number of the last change sent.
    pub fn seq(&self) -> u64 {
        *self.seq.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Records per page when a store walks a whole kind.
pub const PAGE: usize = 500;

#[tonic::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, kind: Kind, id: &str) -> Result<Option<Versioned>, StoreError>;
    /// All records of a kind, ordered by id. For kinds that can be large
    /// (volumes, snapshots), walk them with `list_page` instead.
    async fn list(&self, kind: Kind) -> Result<Vec<(String, Versioned)>, StoreError> {
        let mut out = Vec::new();
        loop {
            let after = out.last().map(|(id, _): &(String, Versioned)| id.clone());
            let page = self.list_page(kind, after.as_deref(), PAGE).await?;
            let done = page.len() < PAGE;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }
    /// At most `limit` records of a kind whose ids come after `after` (all
    /// when None), ordered by id: a page whose cost does not grow with the
    /// number of records.
    async fn list_page(&self, kind: Kind, after: Option<&str>, limit: usize) -> Result<Vec<(String, Versioned)>, StoreError>;
    /// Insert; fails with AlreadyExists (carrying the existing value) if the id is taken. Returns version 1.
    async fn create(&self, kind: Kind, id: &str, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Replace only if the stored version equals `expected`; returns the new version.
    async fn update(&self, kind: Kind, id: &str, value: Vec<u8>, expected: u64) -> Result<u64, StoreError>;
    /// Insert or replace regardless of version (for heartbeats); returns the new version.
    async fn put(&self, kind: Kind, id: &str, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Remove; with Some(v) only if the version matches (Conflict otherwise); a missing id is Ok.
    async fn delete(&self, kind: Kind, id: &str, expected: Option<u64>) -> Result<(), StoreError>;
    /// Every change committed from now on: this store's own writes, and
    /// (for a store shared with other processes) what it watches of theirs.
    fn changes(&self) -> broadcast::Receiver<(u64, Change)>;
    /// The number of the last change sent on the feed: a reader that has
    /// applied it has seen every write this store answered before.
    fn change_seq(&self) -> u64;
    /// Node `node` is alive now: one small write (nothing on disk for the
    /// embedded store, whose nodes live in the same process; a Lease in a
    /// cluster). True when the store holds no record of the node (an
    /// operator deleted it to resolve a mismatch): the node writes its
    /// record again.
    async fn renew_liveness(&self, node: &str) -> Result<bool, StoreError>;
    /// When each node last said it is alive, by this process's clock (ms).
    async fn liveness(&self) -> Result<Vec<(String, i64)>, StoreError>;
}

fn decode<T: DeserializeOwned>(kind: Kind, id: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| {
        StoreError::Backend(format!(
            "{} {id:?} is not a valid record ({e}); it was written by an incompatible version or edited by hand: fix or delete it",
            kind.as_str()
        ))
    })
}

fn encode<T: Serialize>(kind: Kind, id: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Backend(format!("{} {id:?} cannot be encoded as JSON: {e}", kind.as_str())))
}

/// Typed helpers over any Store for serde records (JSON values).
pub async fn get_json<T: DeserializeOwned>(s: &dyn Store, kind: Kind, id: &str) -> Result<Option<(T, u64)>, StoreError> {
    match s.get(kind, id).await? {
        Some(v) => Ok(Some((decode(kind, id, &v.value)?, v.version))),
        None => Ok(None),
    }
}

pub async fn list_json<T: DeserializeOwned>(s: &dyn Store, kind: Kind) -> Result<Vec<(T, u64)>, StoreError> {
    s.list(kind).await?.into_iter().map(|(id, v)| Ok((decode(kind, &id, &v.value)?, v.version))).collect()
}

/// One page of records (see `Store::list_page`), decoded.
pub async fn list_page_json<T: DeserializeOwned>(
    s: &dyn Store,
    kind: Kind,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, T, u64)>, StoreError> {
    s.list_page(kind, after, limit)
        .await?
        .into_iter()
        .map(|(id, v)| {
            let rec = decode(kind, &id, &v.value)?;
            Ok((id, rec, v.version))
        })
        .collect()
}

/// Calls `visit` with every record of a kind, a page at a time, so that
/// only one page is ever decoded in memory.
pub async fn for_each_json<T: DeserializeOwned>(s: &dyn Store, kind: Kind, mut visit: impl FnMut(T, u64)) -> Result<(), StoreError> {
    let mut after: Option<String> = None;
    loop {
        let page = list_page_json::<T>(s, kind, after.as_deref(), PAGE).await?;
        let done = page.len() < PAGE;
        for (id, rec, version) in page {
            after = Some(id);
            visit(rec, version);
        }
        if done {
            return Ok(());
        }
    }
}

pub fn decode_json<T: DeserializeOwned>(kind: Kind, id: &str, bytes: &[u8]) -> Result<T, StoreError> {
    decode(kind, id, bytes)
}

pub async fn create_json<T: Serialize>(s: &dyn Store, kind: Kind, id: &str, v: &T) -> Result<u64, StoreError> {
    s.create(kind, id, encode(kind, id, v)?).await
}

pub async fn update_json<T: Serialize>(s: &dyn Store, kind: Kind, id: &str, v: &T, expected: u64) -> Result<u64, StoreError> {
    s.update(kind, id, encode(kind, id, v)?, expected).await
}

pub async fn put_json<T: Serialize>(s: &dyn Store, kind: Kind, id: &str, v: &T) -> Result<u64, StoreError> {
    s.put(kind, id, encode(kind, id, v)?).await
}
