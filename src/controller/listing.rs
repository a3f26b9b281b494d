//! ListVolumes and ListSnapshots by key: a page starts after the last ID
//! the previous page returned, so its cost does not grow with the number
//! of records, and a volume created or deleted between two pages moves
//! nothing else (no entry is skipped or repeated, as offsets would).

use super::error::ControllerError;
use super::manager::Manager;
use super::records::{Phase, SnapshotRec, VolumeRec};
use crate::store::{self, Kind};
use serde::de::DeserializeOwned;

/// A page of records and the token of the next one ("" at the end).
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_token: String,
}

/// Records read from the store per round at most while a page fills, and
/// at least after a first round that the filter thinned.
const READ: usize = 4096;
const READ_AGAIN: usize = 256;

impl Manager {
    /// Available volumes: at most `max_entries` (0: all) after `token`.
    pub async fn volume_page(&self, max_entries: i32, token: &str) -> Result<Page<VolumeRec>, ControllerError> {
        let after = start_after(token, "vol-")?;
        self.page(Kind::Volume, max_entries, after, |v: &VolumeRec| v.phase == Phase::Available, |v| &v.id).await
    }

    /// Available snapshots, of one source volume when given: at most
    /// `max_entries` (0: all) after `token`.
    pub async fn snapshot_page(&self, max_entries: i32, token: &str, source_volume_id: &str) -> Result<Page<SnapshotRec>, ControllerError> {
        let after = start_after(token, "snap-")?;
        let keep = |s: &SnapshotRec| s.phase == Phase::Available && (source_volume_id.is_empty() || s.source_volume_id == source_volume_id);
        self.page(Kind::Snapshot, max_entries, after, keep, |s| &s.id).await
    }

    async fn page<T: DeserializeOwned>(
        &self,
        kind: Kind,
        max_entries: i32,
        mut after: Option<String>,
        keep: impl Fn(&T) -> bool,
        id_of: impl Fn(&T) -> &String,
    ) -> Result<Page<T>, ControllerError> {
        if max_entries < 0 {
            return Err(ControllerError::Invalid("max_entries must not be negative".into()));
        }
        let max = if max_entries == 0 { usize::MAX } else { max_entries as usize };
        let mut items = Vec::new();
        let mut rounds = 0;
        loop {
            // First what the page still needs and one more (which says
            // whether another page follows): a page of 100 decodes 101
            // records. Records the filter drops make another round, of a
            // batch at least, so a thin filter does not read one at a time.
            let needed = max.saturating_sub(items.len()).saturating_add(1);
            let want = if rounds == 0 { needed } else { needed.max(READ_AGAIN) }.min(READ);
            rounds += 1;
            let batch = store::list_page_json::<T>(&*self.store, kind, after.as_deref(), want).await?;
            let exhausted = batch.len() < want;
            for (id, rec, _) in batch {
                after = Some(id);
                if !keep(&rec) {
                    continue;
                }
                if items.len() == max {
                    // One more exists: the page is full and has a next one.
                    let next_token = items.last().map(|r| id_of(r).clone()).unwrap_or_default();
                    return Ok(Page { items, next_token });
                }
                items.push(rec);
            }
            if exhausted {
                return Ok(Page { items, next_token: String::new() });
            }
        }
    }
}

/// The key a page starts after: "" is the start; anything but one of our
/// IDs is ABORTED, as the spec asks for a token the plugin cannot use.
fn start_after(token: &str, prefix: &str) -> Result<Option<String>, ControllerError> {
    if token.is_empty() {
        return Ok(None);
    }
    let ours = token.strip_prefix(prefix).is_some_and(|u| uuid::Uuid::parse_str(u).is_ok());
    if !ours {
        return Err(ControllerError::BadPageToken { token: token.to_string() });
    }
    Ok(Some(token.to_string()))
}

#[cfg(test)]
mod tests {
    use super::start_after;

    #[test]
    fn tokens_are_our_ids_and_nothing_else() {
        assert_eq!(start_after("", "vol-").unwrap(), None);
        let id = "vol-6ba7b810-9dad-11d1-80b4-00c04fd430c8";
        assert_eq!(start_after(id, "vol-").unwrap().as_deref(), Some(id));
        for bad in ["2", "nope", "vol-", "snap-6ba7b810-9dad-11d1-80b4-00c04fd430c8", "vol-../x"] {
            assert_eq!(start_after(bad, "vol-").unwrap_err().code(), tonic::Code::Aborted, "{bad}");
        }
    }
}
