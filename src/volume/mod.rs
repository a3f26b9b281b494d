//! The node's volume manager: one storage pool (a folder), its images,
//! snapshots and clones, and its capacity in Cinder's terms.

pub mod capacity;
pub mod changes;
pub mod copy;
pub mod error;
pub mod freeze;
pub mod group;
pub mod handles;
pub mod health;
pub mod identity;
pub mod orphans;
pub mod pool;
pub mod records;
pub mod workers;

pub use capacity::{PoolCapacity, Provisioning, Shortfall};
pub use error::VolumeError;
pub use orphans::Orphan;
pub use pool::{ImageKind, Pool, PoolConfig, PoolStatus};
pub use records::{SnapshotRecord, State, VolumeRecord, VolumeSource};

/// IDs become file names, so they are held to a strict alphabet: letters,
/// digits, `-` and `_`, starting with a letter or digit, at most 128 bytes.
/// Nothing that passes can name a path outside the pool.
pub fn validate_id(what: &'static str, id: &str) -> Result<(), VolumeError> {
    let reason = if id.is_empty() {
        "it is empty".to_string()
    } else if id.len() > MAX_ID_LEN {
        format!("it is {} bytes long, the limit is {MAX_ID_LEN}", id.len())
    } else if !id.as_bytes()[0].is_ascii_alphanumeric() {
        "it must start with a letter or digit".to_string()
    } else if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        format!("character {c:?} is not allowed (only letters, digits, '-' and '_')")
    } else {
        return Ok(());
    };
    Err(VolumeError::Invalid { what, reason: format!("{id:?}: {reason}") })
}

pub const MAX_ID_LEN: usize = 128;
/// Metadata is small labels, not data.
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::validate_id;

    #[test]
    fn ids_that_could_escape_the_pool_are_refused() {
        for bad in ["", ".", "..", "../etc", "a/b", "/abs", "-lead", "a b", "a\0b", "vol.img", &"x".repeat(129)] {
            assert!(validate_id("volume id", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["vol-1", "snap_2", "0abc", &"y".repeat(128)] {
            assert!(validate_id("volume id", good).is_ok(), "{good:?} refused");
        }
    }
}
