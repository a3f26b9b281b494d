//! The store: the control plane's records (volumes, snapshots, nodes,
//! exports) behind one trait with compare-and-set updates.
//!
//! Values are opaque bytes with a version that starts at 1 and grows by one
//! per write; callers read, change, and write back with the version they read,
//! and on `Conflict` read again. The typed helpers below store serde records as
//! JSON. `embedded` (redb, one file) is the default; a Kubernetes
//! custom-resource store implements the same trait and must pass
//! `conformance::behaviour_suite`.

pub mod conformance;
pub mod embedded;
#[cfg(test)]
mod tests;

pub use embedded::EmbeddedStore;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The kinds of record; each is its own table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Volume,
    Snapshot,
    Node,
    Export,
}

impl Kind {
    /// Every kind, for implementations that set up one table per kind.
    const ALL: [Kind; 4] = [Kind::Volume, Kind::Snapshot, Kind::Node, Kind::Export];

    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
            Kind::Node => "nodes",
            Kind::Export => "exports",
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
    AlreadyExists {
        kind: &'static str,
        id: String,
        existing: Versioned,
    },
    #[error("{kind} {id:?} does not exist")]
    NotFound { kind: &'static str, id: String },
    #[error(
        "{kind} {id:?} changed since it was read (version {expected} expected, {actual} found); read it again"
    )]
    Conflict {
        kind: &'static str,
        id: String,
        expected: u64,
        actual: u64,
    },
    #[error("store: {0}")]
    Backend(String),
}

impl From<StoreError> for tonic::Status {
    fn from(err: StoreError) -> Self {
        let message = err.to_string();
        match err {
            // ABORTED is what the CSI sidecars retry, which is what a lost
            // compare-and-set needs: the retry reads the record again.
            StoreError::Conflict { .. } => tonic::Status::aborted(message),
            StoreError::NotFound { .. } => tonic::Status::not_found(message),
            StoreError::AlreadyExists { .. } => tonic::Status::already_exists(message),
            StoreError::Backend(_) => tonic::Status::unavailable(message),
        }
    }
}

#[tonic::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, kind: Kind, id: &str) -> Result<Option<Versioned>, StoreError>;
    /// All records of a kind, ordered by id.
    async fn list(&self, kind: Kind) -> Result<Vec<(String, Versioned)>, StoreError>;
    /// Insert; fails with AlreadyExists (carrying the existing value) if the id is taken. Returns version 1.
    async fn create(&self, kind: Kind, id: &str, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Replace only if the stored version equals `expected`; returns the new version.
    async fn update(
        &self,
        kind: Kind,
        id: &str,
        value: Vec<u8>,
        expected: u64,
    ) -> Result<u64, StoreError>;
    /// Insert or replace regardless of version (for heartbeats); returns the new version.
    async fn put(&self, kind: Kind, id: &str, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Remove; with Some(v) only if the version matches (Conflict otherwise); a missing id is Ok.
    async fn delete(&self, kind: Kind, id: &str, expected: Option<u64>) -> Result<(), StoreError>;
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
    serde_json::to_vec(v).map_err(|e| {
        StoreError::Backend(format!(
            "{} {id:?} cannot be encoded as JSON: {e}",
            kind.as_str()
        ))
    })
}

/// Typed helpers over any Store for serde records (JSON values).
pub async fn get_json<T: DeserializeOwned>(
    s: &dyn Store,
    kind: Kind,
    id: &str,
) -> Result<Option<(T, u64)>, StoreError> {
    match s.get(kind, id).await? {
        Some(v) => Ok(Some((decode(kind, id, &v.value)?, v.version))),
        None => Ok(None),
    }
}

pub async fn list_json<T: DeserializeOwned>(
    s: &dyn Store,
    kind: Kind,
) -> Result<Vec<(T, u64)>, StoreError> {
    s.list(kind)
        .await?
        .into_iter()
        .map(|(id, v)| Ok((decode(kind, &id, &v.value)?, v.version)))
        .collect()
}

pub async fn create_json<T: Serialize>(
    s: &dyn Store,
    kind: Kind,
    id: &str,
    v: &T,
) -> Result<u64, StoreError> {
    s.create(kind, id, encode(kind, id, v)?).await
}

pub async fn update_json<T: Serialize>(
    s: &dyn Store,
    kind: Kind,
    id: &str,
    v: &T,
    expected: u64,
) -> Result<u64, StoreError> {
    s.update(kind, id, encode(kind, id, v)?, expected).await
}

pub async fn put_json<T: Serialize>(
    s: &dyn Store,
    kind: Kind,
    id: &str,
    v: &T,
) -> Result<u64, StoreError> {
    s.put(kind, id, encode(kind, id, v)?).await
}
