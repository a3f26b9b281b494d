//! Serving gRPC on a CSI unix socket and on the agent's TCP address.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow_like::Context as _;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// `unix:///path/csi.sock` or `unix:/path` → the path. Anything else is refused.
pub fn unix_endpoint_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .ok_or_else(|| format!("endpoint {endpoint:?} must start with unix:// (for example unix:///run/csi/csi.sock)"))?;
    if path.is_empty() {
        return Err(format!("endpoint {endpoint:?} names no socket path"));
    }
    Ok(PathBuf::from(path))
}

/// Bind a unix socket with mode 0600, removing a stale socket at the path
/// first (only if it really is a socket: never delete another kind of file).
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListenerStream> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; remove it or pick another endpoint", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).context_io(format!("creating socket folder {}", dir.display()))?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(UnixListenerStream::new(listener))
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

mod anyhow_like {
    pub trait Context<T> {
        fn context_io(self, what: String) -> std::io::Result<T>;
    }
    impl<T> Context<T> for std::io::Result<T> {
        fn context_io(self, what: String) -> std::io::Result<T> {
            self.map_err(|e| std::io::Error::new(e.kind(), format!("{what}: {e}")))
        }
    }
}
