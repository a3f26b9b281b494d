//! Serving gRPC on a CSI unix socket and on the agent's TCP address.
//!
//! A unix socket path is shared ground: another cinderblock (or anything
//! else) may be serving on it. So binding never takes a path over from a
//! live server, is born with mode 0600 (bound inside a private folder, then
//! moved into place without replacing anything), and on shutdown the path is
//! removed only if it still is the socket this process bound.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::Stream;

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

/// What is at a socket path now.
#[derive(Debug, PartialEq, Eq)]
pub enum SocketState {
    /// Nothing there.
    Absent,
    /// A socket something listens on.
    Live,
    /// A socket nobody listens on (left by a process that died), identified
    /// by (device, inode) so only that very file is removed.
    Stale { dev: u64, ino: u64 },
    /// Some other kind of file.
    NotASocket,
}

/// Look at `path` without changing it: connect to a socket found there (a
/// non-blocking connect, so a server with a full backlog still counts as live).
pub fn probe_socket(path: &Path) -> io::Result<SocketState> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SocketState::Absent),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Ok(SocketState::NotASocket);
    }
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC, None)?;
    match rustix::net::connect(&fd, &SocketAddrUnix::new(path)?) {
        Ok(()) | Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INPROGRESS) => Ok(SocketState::Live),
        Err(rustix::io::Errno::CONNREFUSED) => Ok(SocketState::Stale { dev: meta.dev(), ino: meta.ino() }),
        Err(rustix::io::Errno::NOENT) => Ok(SocketState::Absent),
        Err(e) => Err(io::Error::other(format!("cannot tell whether something serves on {}: {e}", path.display()))),
    }
}

/// Fail early (before opening pools and stores) when a server answers on
/// `path`; `bind_unix` checks again when it binds.
pub fn refuse_if_live(path: &Path) -> Result<(), String> {
    match probe_socket(path) {
        Ok(SocketState::Live) => Err(format!(
            "{} is in use: another server answers on it (a cinderblock already running?); stop it first or pick another endpoint",
            path.display()
        )),
        Ok(SocketState::NotASocket) => Err(format!("{} exists and is not a socket; remove it or pick another endpoint", path.display())),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// A bound unix socket, as a stream of connections for tonic's
/// `serve_with_incoming*`. When the server drops it, the socket file is
/// removed if it still is the one bound here (same device and inode).
pub struct UnixIncoming {
    inner: UnixListenerStream,
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl UnixIncoming {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Stream for UnixIncoming {
    type Item = io::Result<UnixStream>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Drop for UnixIncoming {
    fn drop(&mut self) {
        remove_if_same(&self.path, self.dev, self.ino);
    }
}

/// Remove `path` only if it is the socket file (dev, ino).
fn remove_if_same(path: &Path, dev: u64, ino: u64) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() && m.dev() == dev && m.ino() == ino => std::fs::remove_file(path).is_ok(),
        _ => false,
    }
}

/// Bind a unix socket at `path` with mode 0600.
///
/// Refused when something already serves there (the message says what to
/// do) or when the path is not a socket; a stale socket (nobody listening)
/// is replaced. The socket is bound inside a fresh 0700 folder beside
/// `path`, set to 0600 there, and then renamed onto `path` with
/// RENAME_NOREPLACE: nobody can connect before the mode is right, and two
/// servers starting at once cannot both win.
pub fn bind_unix(path: &Path) -> io::Result<UnixIncoming> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| io::Error::new(e.kind(), format!("creating socket folder {}: {e}", dir.display())))?;
    let private = private_dir(&dir)?;
    let result = bind_via(&private, path);
    let _ = std::fs::remove_dir_all(&private);
    result
}

fn private_dir(dir: &Path) -> io::Result<PathBuf> {
    for _ in 0..8 {
        let p = dir.join(format!(".cb-{:08x}", rand::random::<u32>()));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("creating a private folder in {}: {e}", dir.display()))),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("no free private folder name in {}", dir.display())))
}

fn bind_via(private: &Path, path: &Path) -> io::Result<UnixIncoming> {
    let temp = private.join("s");
    let std_listener = std::os::unix::net::UnixListener::bind(&temp)
        .map_err(|e| io::Error::new(e.kind(), format!("binding a socket in {}: {e}", private.display())))?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))?;
    let meta = std::fs::symlink_metadata(&temp)?;
    let (dev, ino) = (meta.dev(), meta.ino());
    // A stale socket is replaced; a racing server that binds meanwhile wins
    // and this one is refused, so a few rounds at most.
    for _ in 0..5 {
        match place(&temp, path) {
            Ok(()) => {
                std_listener.set_nonblocking(true)?;
                let listener = UnixListener::from_std(std_listener)?;
                return Ok(UnixIncoming { inner: UnixListenerStream::new(listener), path: path.to_path_buf(), dev, ino });
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match probe_socket(path)? {
                SocketState::Absent => continue,
                SocketState::Stale { dev, ino } => {
                    remove_if_same(path, dev, ino);
                    continue;
                }
                SocketState::Live => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "{} is in use: another server answers on it (a cinderblock already running?); stop it first or pick another endpoint",
                            path.display()
                        ),
                    ))
                }
                SocketState::NotASocket => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket; remove it or pick another endpoint", path.display()),
                    ))
                }
            },
            Err(e) => return Err(io::Error::new(e.kind(), format!("placing the socket at {}: {e}", path.display()))),
        }
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{} keeps changing under us; is another server starting there?", path.display())))
}

/// Move the bound socket onto `path` unless something is there already.
fn place(temp: &Path, path: &Path) -> io::Result<()> {
    use rustix::fs::{RenameFlags, CWD};
    match rustix::fs::renameat_with(CWD, temp, CWD, path, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Err(io::ErrorKind::AlreadyExists.into()),
        // Filesystems without RENAME_NOREPLACE: a hard link is just as exclusive.
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOSYS) => match std::fs::hard_link(temp, path) {
            Ok(()) => std::fs::remove_file(temp),
            Err(e) => Err(e),
        },
        Err(e) => Err(e.into()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn a_live_socket_is_never_taken_over_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let first = bind_unix(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let err = bind_unix(&path).err().expect("a second bind is refused");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert!(err.to_string().contains("in use"), "{err}");
        // The first still owns the path, and no private folder is left behind.
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        // A socket nobody listens on is stale and replaced.
        drop(first); // removes its own file
        assert!(!path.exists());
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale); // the file stays, nobody listens
        assert!(matches!(probe_socket(&path).unwrap(), SocketState::Stale { .. }));
        let second = bind_unix(&path).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());

        // A file that replaced ours is not removed on shutdown.
        std::fs::remove_file(&path).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(second);
        assert!(path.exists(), "another server's socket must survive our shutdown");
        drop(other);
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        std::fs::write(&path, b"precious").unwrap();
        let err = bind_unix(&path).err().expect("refused");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
