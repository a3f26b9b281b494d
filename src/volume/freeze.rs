//! The pool's hook for clean snapshots. The pool knows images, not mounts:
//! the node process, which can see what is mounted from an image, installs
//! a [`Freezer`] (`Pool::set_freezer`), and the pool asks it to freeze
//! whatever filesystem sits on a volume's image for the moment its
//! snapshot is cut.

use std::path::Path;
use std::time::Duration;

pub trait Freezer: Send + Sync {
    /// Freeze the filesystem mounted from `image`, for at most `max` (then
    /// it is thawed whatever happens). `None` when nothing writable is
    /// mounted from it: the image is already at rest.
    fn freeze(&self, image: &Path, max: Duration) -> Result<Option<Box<dyn Thaw>>, String>;

    /// Freeze the filesystem this node has mounted from `volume`, a volume
    /// of another node's pool used here over NBD (this node is its
    /// consumer), for at most `max`. `None` when nothing writable of it is
    /// mounted here. A node that attaches no other node's volumes has none.
    fn freeze_consumed(&self, _volume: &str, _max: Duration) -> Result<Option<Box<dyn Thaw>>, String> {
        Ok(None)
    }
}

/// A frozen filesystem. Dropping it thaws too, but only `thaw` says
/// whether it stayed frozen all along.
pub trait Thaw: Send {
    fn thaw(self: Box<Self>) -> Result<(), String>;
}
