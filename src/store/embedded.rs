//! The default store: one redb file, one table per kind.
//!
//! A row is `id -> 8-byte big-endian version ++ value`. Every call is one
//! read transaction or one durable write transaction, so a compare-and-set
//! is atomic: redb runs one write transaction at a time. redb blocks, so the
//! calls run on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, Table, TableDefinition};

use super::{Kind, Store, StoreError, Versioned};

pub struct EmbeddedStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
}

fn table(kind: Kind) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(kind.as_str())
}

fn encode(version: u64, value: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(8 + value.len());
    row.extend_from_slice(&version.to_be_bytes());
    row.extend_from_slice(value);
    row
}

fn decode(path: &Path, kind: Kind, id: &str, row: &[u8]) -> Result<Versioned, StoreError> {
    let Some((version, value)) = row.split_first_chunk::<8>() else {
        return Err(StoreError::Backend(format!(
            "{} {id:?} in {} is a {}-byte row, too short to hold a version; the file is damaged: restore it from a backup",
            kind.as_str(),
            path.display(),
            row.len()
        )));
    };
    Ok(Versioned {
        version: u64::from_be_bytes(*version),
        value: value.to_vec(),
    })
}

/// A redb failure as a Backend error that names the file and the operation.
fn backend(path: &Path, what: &str, err: impl Into<redb::Error>) -> StoreError {
    StoreError::Backend(format!(
        "{what} in {}: {}; check the disk and the file's permissions",
        path.display(),
        err.into()
    ))
}

impl EmbeddedStore {
    /// Opens the store file, creating it (and its parent folder) if missing.
    /// Only one store may have the file open at a time, in this process or
    /// any other.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Backend(format!(
                    "cannot create the folder {} for the store file: {e}; create it or choose another path",
                    parent.display()
                ))
            })?;
        }
        let db = Database::create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Backend(format!(
                "{} is already open in another process (or by another store in this one); stop that process or use a different store file",
                path.display()
            )),
            e => backend(path, "opening the store", e),
        })?;
        // Create every table now, so that reads never meet a missing table.
        let txn = db
            .begin_write()
            .map_err(|e| backend(path, "creating the tables", e))?;
        for kind in Kind::ALL {
            txn.open_table(table(kind))
                .map_err(|e| backend(path, "creating the tables", e))?;
        }
        txn.commit()
            .map_err(|e| backend(path, "creating the tables", e))?;
        tracing::debug!(store.path = %path.display(), "embedded store open");
        Ok(EmbeddedStore {
            db: Arc::new(db),
            path: Arc::new(path.to_path_buf()),
        })
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &Path) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(&db, &path))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }

    /// One write transaction on one kind's table: committed durably if `f`
    /// succeeds, rolled back (dropped) if it fails.
    async fn write<T, F>(&self, kind: Kind, id: &str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(
                &mut Table<&'static str, &'static [u8]>,
                &str,
                Option<Versioned>,
            ) -> Result<T, StoreError>
            + Send
            + 'static,
    {
        let id = id.to_string();
        self.blocking(move |db, path| {
            let what = format!("writing {} {id:?}", kind.as_str());
            let txn = db.begin_write().map_err(|e| backend(path, &what, e))?;
            let out = {
                let mut t = txn
                    .open_table(table(kind))
                    .map_err(|e| backend(path, &what, e))?;
                let current = match t.get(id.as_str()).map_err(|e| backend(path, &what, e))? {
                    Some(row) => Some(decode(path, kind, &id, row.value())?),
                    None => None,
                };
                f(&mut t, &id, current)?
            };
            txn.commit().map_err(|e| backend(path, &what, e))?;
            Ok(out)
        })
        .await
    }
}

fn insert(
    t: &mut Table<&'static str, &'static [u8]>,
    kind: Kind,
    id: &str,
    version: u64,
    value: &[u8],
) -> Result<(), StoreError> {
    t.insert(id, encode(version, value).as_slice())
        .map_err(|e| StoreError::Backend(format!("writing {} {id:?}: {e}", kind.as_str())))?;
    Ok(())
}

#[tonic::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, kind: Kind, id: &str) -> Result<Option<Versioned>, StoreError> {
        let id = id.to_string();
        self.blocking(move |db, path| {
            let what = format!("reading {} {id:?}", kind.as_str());
            let txn = db.begin_read().map_err(|e| backend(path, &what, e))?;
            let t = txn
                .open_table(table(kind))
                .map_err(|e| backend(path, &what, e))?;
            match t.get(id.as_str()).map_err(|e| backend(path, &what, e))? {
                Some(row) => Ok(Some(decode(path, kind, &id, row.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list(&self, kind: Kind) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.blocking(move |db, path| {
            let what = format!("listing {}", kind.as_str());
            let txn = db.begin_read().map_err(|e| backend(path, &what, e))?;
            let t = txn
                .open_table(table(kind))
                .map_err(|e| backend(path, &what, e))?;
            // redb orders &str keys by their bytes, which is the order we promise.
            t.iter()
                .map_err(|e| backend(path, &what, e))?
                .map(|entry| {
                    let (id, row) = entry.map_err(|e| backend(path, &what, e))?;
                    let id = id.value().to_string();
                    let v = decode(path, kind, &id, row.value())?;
                    Ok((id, v))
                })
                .collect()
        })
        .await
    }

    async fn create(&self, kind: Kind, id: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.write(kind, id, move |t, id, current| match current {
            Some(existing) => Err(StoreError::AlreadyExists {
                kind: kind.as_str(),
                id: id.to_string(),
                existing,
            }),
            None => {
                insert(t, kind, id, 1, &value)?;
                Ok(1)
            }
        })
        .await
    }

    async fn update(
        &self,
        kind: Kind,
        id: &str,
        value: Vec<u8>,
        expected: u64,
    ) -> Result<u64, StoreError> {
        self.write(kind, id, move |t, id, current| match current {
            None => Err(StoreError::NotFound {
                kind: kind.as_str(),
                id: id.to_string(),
            }),
            Some(cur) if cur.version != expected => Err(StoreError::Conflict {
                kind: kind.as_str(),
                id: id.to_string(),
                expected,
                actual: cur.version,
            }),
            Some(cur) => {
                let version = cur.version + 1;
                insert(t, kind, id, version, &value)?;
                Ok(version)
            }
        })
        .await
    }

    async fn put(&self, kind: Kind, id: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.write(kind, id, move |t, id, current| {
            let version = current.map_or(1, |cur| cur.version + 1);
            insert(t, kind, id, version, &value)?;
            Ok(version)
        })
        .await
    }

    async fn delete(&self, kind: Kind, id: &str, expected: Option<u64>) -> Result<(), StoreError> {
        self.write(kind, id, move |t, id, current| match (current, expected) {
            (None, _) => Ok(()),
            (Some(cur), Some(expected)) if cur.version != expected => Err(StoreError::Conflict {
                kind: kind.as_str(),
                id: id.to_string(),
                expected,
                actual: cur.version,
            }),
            (Some(_), _) => {
                t.remove(id).map_err(|e| {
                    StoreError::Backend(format!("deleting {} {id:?}: {e}", kind.as_str()))
                })?;
                Ok(())
            }
        })
        .await
    }
}
