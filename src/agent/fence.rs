//! Fencing: the agent keeps, durably, the highest fencing token (the leader
//! Lease's transition count) any controller has shown it, and refuses calls
//! that change data with a lower one. A deposed leader that wakes up late
//! (paused, partitioned) therefore cannot act once its successor has.
//!
//! Calls that change data hold a shared guard for their whole run; raising
//! the token takes the exclusive guard, so once a raise returns no call with
//! an older token is running or can start.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::{RwLock, RwLockReadGuard};
use tonic::Status;
use tracing::{info, warn};

use crate::volume::records;

/// The request metadata key that carries the token.
pub const FENCING_METADATA: &str = "cinderblock-fencing-token";
const FILE: &str = "fencing.json";

#[derive(Serialize, Deserialize)]
struct FenceRecord {
    highest: u64,
}

pub struct Fence {
    path: PathBuf,
    highest: RwLock<u64>,
}

impl Fence {
    /// Read the highest token seen from the pool folder (0 when new).
    pub fn open(pool_root: &Path) -> std::io::Result<Fence> {
        let path = pool_root.join(FILE);
        let highest = match records::read_record::<FenceRecord>(&path) {
            Ok(r) => r.highest,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        Ok(Fence { path, highest: RwLock::new(highest) })
    }

    pub fn highest(&self) -> u64 {
        self.highest.try_read().map(|g| *g).unwrap_or(0)
    }

    /// Admit a call carrying `token`: refused when a newer one was seen;
    /// a newer one is recorded first. Hold the guard while the call runs.
    pub async fn admit(&self, token: u64) -> Result<RwLockReadGuard<'_, u64>, Status> {
        {
            let seen = self.highest.read().await;
            if token == *seen {
                return Ok(seen);
            }
            if token < *seen {
                return Err(refused(token, *seen));
            }
        }
        let mut seen = self.highest.write().await;
        if token < *seen {
            return Err(refused(token, *seen));
        }
        if token > *seen {
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || records::write_record(&path, &FenceRecord { highest: token }))
                .await
                .map_err(|e| Status::internal(format!("recording fencing token: {e}")))?
                .map_err(|e| Status::internal(format!("recording fencing token in {}: {e}", self.path.display())))?;
            info!(from = *seen, to = token, "fencing token raised: calls from older controller leaders are refused from now on");
            *seen = token;
        }
        Ok(seen.downgrade())
    }
}

fn refused(token: u64, seen: u64) -> Status {
    warn!(token, seen, "refused a call from a deposed controller leader");
    Status::failed_precondition(format!(
        "fenced: this call carries fencing token {token}, but a newer controller leader (token {seen}) has acted here; \
         this controller is no longer the leader"
    ))
}

/// The token a request carries. Every call that changes data must carry one.
pub fn token_of<T>(request: &tonic::Request<T>) -> Result<u64, Status> {
    let v = request
        .metadata()
        .get(FENCING_METADATA)
        .ok_or_else(|| Status::invalid_argument(format!("this call changes data and needs the {FENCING_METADATA} metadata")))?;
    v.to_str()
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| Status::invalid_argument(format!("{FENCING_METADATA} must be a whole number")))
}

/// Put `token` on an outgoing request.
pub fn attach<T>(request: &mut tonic::Request<T>, token: u64) {
    if let Ok(v) = token.to_string().parse() {
        request.metadata_mut().insert(FENCING_METADATA, v);
    }
}
