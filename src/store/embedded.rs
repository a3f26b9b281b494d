//! The default store: one redb file, one table per kind.
//!
//! A row is `id -> 8-byte big-endian version ++ value`. Reads are redb read
//! transactions on tokio's blocking pool; they run beside writes (redb keeps
//! the last committed state for readers).
//!
//! Writes go through group commit: one thread (the committer) takes every
//! write waiting in its queue, applies them in order in one write
//! transaction and commits it durably (one fsync), then answers each. A
//! call therefore answers only after its record is on disk, as before, but
//! 64 concurrent writes cost one commit instead of 64. Each write is still
//! its own compare-and-set: it sees the writes queued before it (in the same
//! transaction) and a refused one (Conflict, AlreadyExists) changes nothing.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use tokio::sync::{broadcast, oneshot};

use super::{Change, Feed, Kind, Store, StoreError, Versioned};

/// redb's page cache. Its default (1 GiB) would let a large store's reads
/// grow the controller's memory far past what it needs; records are small
/// and the OS page cache holds the file anyway.
const CACHE_BYTES: usize = 32 << 20;

/// Most writes committed in one transaction; more wait for the next.
const MAX_BATCH: usize = 1024;

pub struct EmbeddedStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
    /// Taken (closed) on drop, which ends the committer.
    writes: Option<mpsc::Sender<Write>>,
    committer: Option<std::thread::JoinHandle<()>>,
    changes: Arc<Feed>,
    alive: Mutex<HashMap<String, i64>>,
}

impl Drop for EmbeddedStore {
    /// Closes the queue and waits for the committer to finish what is
    /// queued, so the file is closed when the store is gone (and can be
    /// opened again at once).
    fn drop(&mut self) {
        self.writes.take();
        if let Some(thread) = self.committer.take() {
            let _ = thread.join();
        }
    }
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
    Ok(Versioned { version: u64::from_be_bytes(*version), value: value.to_vec() })
}

/// A redb failure as a Backend error that names the file and the operation.
fn backend(path: &Path, what: &str, err: impl Into<redb::Error>) -> StoreError {
    StoreError::Backend(format!("{what} in {}: {}; check the disk and the file's permissions", path.display(), err.into()))
}

/// What a write does, checked against the row it finds.
enum Op {
    Create(Vec<u8>),
    Update(Vec<u8>, u64),
    Put(Vec<u8>),
    Delete(Option<u64>),
}

/// One queued write and where its answer goes.
struct Write {
    kind: Kind,
    id: String,
    op: Op,
    reply: oneshot::Sender<Result<u64, StoreError>>,
}

/// What one write did inside a transaction: refused (nothing changed), or
/// the change to announce once the transaction is durable.
type Applied = Result<(u64, Change), StoreError>;

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
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Backend(format!(
                "{} is already open in another process (or by another store in this one); stop that process or use a different store file",
                path.display()
            )),
            e => backend(path, "opening the store", e),
        })?;
        // Create every table now, so that reads never meet a missing table.
        let txn = db.begin_write().map_err(|e| backend(path, "creating the tables", e))?;
        for kind in Kind::ALL {
            txn.open_table(table(kind)).map_err(|e| backend(path, "creating the tables", e))?;
        }
        txn.commit().map_err(|e| backend(path, "creating the tables", e))?;
        tracing::debug!(store.path = %path.display(), "embedded store open");
        let db = Arc::new(db);
        let path = Arc::new(path.to_path_buf());
        let changes = Arc::new(Feed::default());
        let (writes, queue) = mpsc::channel();
        let committer = Committer { db: db.clone(), path: path.clone(), changes: changes.clone() };
        let thread = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || committer.run(queue))
            .map_err(|e| StoreError::Backend(format!("starting the store's commit thread: {e}")))?;
        Ok(EmbeddedStore { db, path, writes: Some(writes), committer: Some(thread), changes, alive: Mutex::new(HashMap::new()) })
    }

    /// Runs a read on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &Path) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(&db, &path)).await.map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }

    /// Queues one write and waits until the transaction holding it is durable.
    async fn write(&self, kind: Kind, id: &str, op: Op) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        let write = Write { kind, id: id.to_string(), op, reply };
        let stopped = || StoreError::Backend("the store's commit thread has stopped".into());
        self.writes
            .as_ref()
            .ok_or_else(stopped)?
            .send(write)
            .map_err(|_| StoreError::Backend("the store's commit thread has stopped".into()))?;
        answer.await.map_err(|_| StoreError::Backend("the store's commit thread has stopped".into()))?
    }
}

/// The one thread that writes.
struct Committer {
    db: Arc<Database>,
    path: Arc<PathBuf>,
    changes: Arc<Feed>,
}

impl Committer {
    /// Until every store handle is gone: wait for a write, take whatever
    /// else is queued behind it, commit them together.
    fn run(self, queue: mpsc::Receiver<Write>) {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&self, batch: Vec<Write>) {
        match self.apply_all(&batch) {
            Ok(results) => self.answer(batch, results),
            // The transaction failed as a whole (the disk, not a refused
            // compare-and-set): nothing of it is on disk. Alone, each write
            // gets its own answer, and one bad write cannot fail the others.
            Err(_) if batch.len() > 1 => {
                for w in batch {
                    self.commit(vec![w]);
                }
            }
            Err(e) => self.answer(batch, vec![Err(e)]),
        }
    }

    /// Applies every write in order in one transaction and commits it.
    fn apply_all(&self, batch: &[Write]) -> Result<Vec<Applied>, StoreError> {
        let path = &*self.path;
        let what = "writing";
        let txn = self.db.begin_write().map_err(|e| backend(path, what, e))?;
        let mut results = Vec::with_capacity(batch.len());
        for w in batch {
            results.push(self.apply(&txn, w)?);
        }
        txn.commit().map_err(|e| backend(path, what, e))?;
        crate::metrics::METRICS.store_commits.inc();
        crate::metrics::METRICS.store_writes.inc_by(batch.len() as u64);
        Ok(results)
    }

    /// One write: `Ok(Err(..))` is a refusal (nothing written), `Err` a
    /// failure of the transaction.
    fn apply(&self, txn: &WriteTransaction, w: &Write) -> Result<Applied, StoreError> {
        let path = &*self.path;
        let (kind, id) = (w.kind, w.id.as_str());
        let what = format!("writing {} {id:?}", kind.as_str());
        let mut t = txn.open_table(table(kind)).map_err(|e| backend(path, &what, e))?;
        let current = match t.get(id).map_err(|e| backend(path, &what, e))? {
            Some(row) => Some(decode(path, kind, id, row.value())?),
            None => None,
        };
        let conflict = |expected: u64, actual: u64| StoreError::Conflict { kind: kind.as_str(), id: id.to_string(), expected, actual };
        let (version, value) = match (&w.op, current) {
            (Op::Create(_), Some(existing)) => {
                return Ok(Err(StoreError::AlreadyExists { kind: kind.as_str(), id: id.to_string(), existing }))
            }
            (Op::Create(value), None) => (1, value),
            (Op::Update(..), None) => return Ok(Err(StoreError::NotFound { kind: kind.as_str(), id: id.to_string() })),
            (Op::Update(_, expected), Some(cur)) if cur.version != *expected => return Ok(Err(conflict(*expected, cur.version))),
            (Op::Update(value, _), Some(cur)) => (cur.version + 1, value),
            (Op::Put(value), cur) => (cur.map_or(1, |c| c.version + 1), value),
            (Op::Delete(_), None) => return Ok(Ok((0, deleted(kind, id)))),
            (Op::Delete(Some(expected)), Some(cur)) if cur.version != *expected => return Ok(Err(conflict(*expected, cur.version))),
            (Op::Delete(_), Some(_)) => {
                t.remove(id).map_err(|e| backend(path, &what, e))?;
                return Ok(Ok((0, deleted(kind, id))));
            }
        };
        insert(&mut t, id, version, value).map_err(|e| backend(path, &what, e))?;
        let change = Change::Record { kind, id: id.to_string(), value: Some(Versioned { version, value: value.clone() }) };
        Ok(Ok((version, change)))
    }

    /// Answers every write of a durable transaction, then tells the
    /// watchers what changed.
    fn answer(&self, batch: Vec<Write>, results: Vec<Applied>) {
        let mut results = results.into_iter();
        for w in batch {
            let result = results.next().unwrap_or_else(|| Err(StoreError::Backend("the write was not applied".into())));
            match result {
                Ok((version, change)) => {
                    self.changes.send(change);
                    let _ = w.reply.send(Ok(version));
                }
                Err(e) => {
                    let _ = w.reply.send(Err(e));
                }
            }
        }
    }
}

fn deleted(kind: Kind, id: &str) -> Change {
    Change::Record { kind, id: id.to_string(), value: None }
}

fn insert(t: &mut Table<&'static str, &'static [u8]>, id: &str, version: u64, value: &[u8]) -> Result<(), redb::StorageError> {
    t.insert(id, encode(version, value).as_slice())?;
    Ok(())
}

#[tonic::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, kind: Kind, id: &str) -> Result<Option<Versioned>, StoreError> {
        let id = id.to_string();
        self.read(move |db, path| {
            let what = format!("reading {} {id:?}", kind.as_str());
            let txn = db.begin_read().map_err(|e| backend(path, &what, e))?;
            let t = txn.open_table(table(kind)).map_err(|e| backend(path, &what, e))?;
            match t.get(id.as_str()).map_err(|e| backend(path, &what, e))? {
                Some(row) => Ok(Some(decode(path, kind, &id, row.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list_page(&self, kind: Kind, after: Option<&str>, limit: usize) -> Result<Vec<(String, Versioned)>, StoreError> {
        let after = after.map(str::to_string);
        self.read(move |db, path| {
            let what = format!("listing {}", kind.as_str());
            let txn = db.begin_read().map_err(|e| backend(path, &what, e))?;
            let t = txn.open_table(table(kind)).map_err(|e| backend(path, &what, e))?;
            // redb orders &str keys by their bytes, which is the order we promise.
            let start = match &after {
                Some(a) => Bound::Excluded(a.as_str()),
                None => Bound::Unbounded,
            };
            t.range::<&str>((start, Bound::Unbounded))
                .map_err(|e| backend(path, &what, e))?
                .take(limit)
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
        self.write(kind, id, Op::Create(value)).await
    }

    async fn update(&self, kind: Kind, id: &str, value: Vec<u8>, expected: u64) -> Result<u64, StoreError> {
        self.write(kind, id, Op::Update(value, expected)).await
    }

    async fn put(&self, kind: Kind, id: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.write(kind, id, Op::Put(value)).await
    }

    async fn delete(&self, kind: Kind, id: &str, expected: Option<u64>) -> Result<(), StoreError> {
        self.write(kind, id, Op::Delete(expected)).await.map(|_| ())
    }

    fn changes(&self) -> broadcast::Receiver<(u64, Change)> {
        self.changes.subscribe()
    }

    fn change_seq(&self) -> u64 {
        self.changes.seq()
    }

    /// The embedded store's nodes run in the same process (standalone), so
    /// liveness is kept in memory: a restarted process hears from every node
    /// again within one heartbeat.
    async fn renew_liveness(&self, node: &str) -> Result<bool, StoreError> {
        let at_ms = crate::volume::records::now_ms();
        self.alive.lock().unwrap_or_else(|p| p.into_inner()).insert(node.to_string(), at_ms);
        self.changes.send(Change::Alive { node: node.to_string(), at_ms });
        Ok(self.get(Kind::Node, node).await?.is_none())
    }

    async fn liveness(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let alive = self.alive.lock().unwrap_or_else(|p| p.into_inner());
        Ok(alive.iter().map(|(n, at)| (n.clone(), *at)).collect())
    }
}
