//! The pool's own record, `<pool>/pool.json`: a UUID given to the pool when it
//! is first created and never changed, so the controller can tell this pool
//! from another one that answers at the same address or under the same node
//! name (a reinstalled node, a reused address, a restored disk).

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::error::VolumeError;
use super::records;

/// The file at the pool's root that holds its identity.
pub const POOL_RECORD: &str = "pool.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub uuid: String,
    pub created_at_ms: i64,
}

/// Read the pool record at `root`: `None` when there is none yet. A record
/// that exists but cannot be read or makes no sense is an error: the pool is
/// then not opened at all, because a new UUID would make the controller take
/// this node's volumes for another pool's.
pub fn read(root: &Path) -> Result<Option<PoolRecord>, VolumeError> {
    let path = root.join(POOL_RECORD);
    let bad = |reason: String| VolumeError::BadPoolRecord { path: path.clone(), reason };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(format!("cannot read it: {e}"))),
    };
    let record: PoolRecord = serde_json::from_slice(&bytes).map_err(|e| bad(format!("it is not a pool record: {e}")))?;
    uuid::Uuid::parse_str(&record.uuid).map_err(|e| bad(format!("uuid {:?} is not a UUID: {e}", record.uuid)))?;
    Ok(Some(record))
}

/// Give the pool at `root` its identity, written crash-safely (temporary
/// file, fsync, rename, fsync of the folder). `adopted` says the pool held
/// volumes before it had a record (made by an older cinderblock).
pub fn create(root: &Path, adopted: bool) -> Result<PoolRecord, VolumeError> {
    let record = PoolRecord { uuid: uuid::Uuid::new_v4().to_string(), created_at_ms: records::now_ms() };
    let path = root.join(POOL_RECORD);
    records::write_record(&path, &record).map_err(VolumeError::io(format!("writing pool record {}", path.display())))?;
    if adopted {
        warn!(pool = %root.display(), pool.uuid = %record.uuid, "pool had no identity (made by an older version); gave it one");
    } else {
        info!(pool = %root.display(), pool.uuid = %record.uuid, "new pool");
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_stable_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let made = create(dir.path(), false).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(made.clone()));
        assert!(!dir.path().join("pool.json.tmp").exists());

        for (bytes, says) in [
            (&b""[..], "not a pool record"),
            (b"{\"uuid\": \"x\", \"created_at_ms\": 1}", "not a UUID"),
            (b"{\"uuid\": \"1f0c", "not a pool record"),
        ] {
            std::fs::write(dir.path().join(POOL_RECORD), bytes).unwrap();
            let e = read(dir.path()).unwrap_err();
            assert!(matches!(e, VolumeError::BadPoolRecord { .. }), "{e}");
            assert!(e.to_string().contains(says) && e.to_string().contains("pool.json"), "{e}");
        }
    }
}
