//! Open handles on images for the NBD server (`crate::export`), which never
//! builds a pool path itself: it asks for a volume or snapshot by ID and
//! gets an open file, or the reason it cannot.

use std::fs::File;

use super::error::VolumeError;
use super::pool::Pool;
use super::records::State;

impl Pool {
    /// The image of an available volume, open for reading and writing.
    pub fn open_volume_image(&self, id: &str) -> Result<File, VolumeError> {
        let rec = self.get_volume(id)?;
        if rec.state != State::Available {
            return Err(VolumeError::Conflict {
                kind: "volume",
                id: id.to_string(),
                detail: format!("it is {:?}, not Available; export it once it is", rec.state),
            });
        }
        let path = self.volume_image(id);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(VolumeError::io(format!("opening the image of volume {id} for export")))
    }

    /// The image of a snapshot, open read-only.
    pub fn open_snapshot_image(&self, id: &str) -> Result<File, VolumeError> {
        self.get_snapshot(id)?;
        File::open(self.snapshot_image(id)).map_err(VolumeError::io(format!("opening the image of snapshot {id} for export")))
    }
}
