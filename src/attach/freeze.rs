//! Freezing a mounted filesystem (FIFREEZE) so a copy of its device is
//! clean, and thawing it (FITHAW) on every path, with a watchdog.
//!
//! A frozen filesystem blocks every writer until it is thawed, and the
//! kernel does not thaw it when the process that froze it dies. So before
//! freezing, a watchdog process is forked. It holds the mount point open and
//! waits on a pipe:
//! - the freezer is done: it writes a byte; the watchdog exits and the
//!   freezer thaws;
//! - the freezer's process dies (the pipe closes) or `max` passes (the
//!   freezer hangs): the watchdog thaws, and the freezer learns of it when it
//!   tries to finish, so a copy made meanwhile is not trusted.
//!
//! The watchdog runs between `fork` and `_exit` only async-signal-safe
//! system calls on values prepared before the fork, as a child of a
//! multi-threaded process must.

use std::ffi::c_int;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use rustix::ioctl::{self, opcode, NoArg, Opcode};

use super::{AttachError, Result};

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)`; the argument is unused.
const FIFREEZE: Opcode = opcode::read_write::<c_int>(b'X', 119);
const FITHAW: Opcode = opcode::read_write::<c_int>(b'X', 120);

/// The watchdog's exit codes.
const CANCELLED: i32 = 0;
const TIMED_OUT: i32 = 2;
const ORPHANED: i32 = 3;
const POLL_FAILED: i32 = 4;

/// A filesystem frozen by [`freeze`]. `thaw` says whether it stayed frozen
/// the whole time; dropping it thaws too.
#[derive(Debug)]
pub struct Frozen {
    mount_point: PathBuf,
    dir: OwnedFd,
    watchdog: Option<Watchdog>,
    max: Duration,
}

#[derive(Debug)]
struct Watchdog {
    pid: rustix::process::Pid,
    /// Writing a byte here tells the watchdog to leave; its closing (our
    /// process dying) tells it to thaw.
    cancel: OwnedFd,
}

/// Freeze the filesystem mounted at `mount_point` for at most `max`.
pub fn freeze(mount_point: &Path, max: Duration) -> Result<Frozen> {
    let op_err = |op: &'static str| {
        let target = mount_point.to_path_buf();
        move |e: rustix::io::Errno| AttachError::Freeze { op, target, error: e.into() }
    };
    let dir =
        rustix::fs::open(mount_point, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(op_err("opening"))?;
    let (wait_end, cancel) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(op_err("pipe"))?;
    let max_ms = c_int::try_from(max.as_millis()).unwrap_or(c_int::MAX);
    let (wait_fd, dir_fd, cancel_fd) = (wait_end.as_raw_fd(), dir.as_raw_fd(), cancel.as_raw_fd());
    // SAFETY: the child runs only `watchdog`, which makes async-signal-safe
    // system calls on integers prepared above and ends in `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let error = std::io::Error::last_os_error();
        return Err(AttachError::Freeze { op: "fork", target: mount_point.to_path_buf(), error });
    }
    if pid == 0 {
        unsafe { watchdog(wait_fd, dir_fd, cancel_fd, max_ms) }
    }
    drop(wait_end);
    let pid = rustix::process::Pid::from_raw(pid).expect("fork returned a positive pid");
    let mut frozen = Frozen { mount_point: mount_point.to_path_buf(), dir, watchdog: Some(Watchdog { pid, cancel }), max };
    // SAFETY: FIFREEZE takes no argument; `dir` is an open descriptor on the filesystem.
    if let Err(e) = unsafe { ioctl::ioctl(&frozen.dir, NoArg::<FIFREEZE>::new()) } {
        let _ = frozen.stop_watchdog();
        return Err(AttachError::Freeze { op: "FIFREEZE", target: mount_point.to_path_buf(), error: e.into() });
    }
    tracing::debug!(mount_point = %mount_point.display(), "filesystem frozen");
    Ok(frozen)
}

/// The watchdog: wait for the word, the pipe's end, or the time limit.
///
/// # Safety
/// Only to be called in the child right after `fork`.
unsafe fn watchdog(wait_fd: c_int, dir_fd: c_int, cancel_fd: c_int, max_ms: c_int) -> ! {
    // Keep only what is needed, at known numbers, and close the rest: the
    // parent's other descriptors (sockets, other watchdogs' pipes) must not
    // live on in here.
    libc::close(cancel_fd);
    libc::dup2(wait_fd, 0);
    libc::dup2(dir_fd, 1);
    if libc::syscall(libc::SYS_close_range, 2 as libc::c_uint, libc::c_uint::MAX, 0 as libc::c_uint) != 0 {
        for fd in 2..4096 {
            libc::close(fd);
        }
    }
    let mut pfd = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
    let code = loop {
        let n = libc::poll(&mut pfd, 1, max_ms);
        if n == 0 {
            break TIMED_OUT;
        }
        if n < 0 {
            if *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break POLL_FAILED;
        }
        let mut byte = 0u8;
        let r = libc::read(0, (&mut byte as *mut u8).cast(), 1);
        if r == 1 {
            libc::_exit(CANCELLED);
        }
        if r < 0 && *libc::__errno_location() == libc::EINTR {
            continue;
        }
        break ORPHANED;
    };
    libc::ioctl(1, FITHAW as _, 0);
    libc::_exit(code)
}

impl Frozen {
    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// Thaw. An error means the filesystem did not stay frozen until now
    /// (the watchdog or someone else thawed it), so whatever was copied
    /// meanwhile may not be clean.
    pub fn thaw(mut self) -> Result<()> {
        self.finish()
    }

    fn stop_watchdog(&mut self) -> Option<i32> {
        let w = self.watchdog.take()?;
        let _ = rustix::io::write(&w.cancel, &[1]);
        drop(w.cancel);
        loop {
            match rustix::process::waitpid(Some(w.pid), rustix::process::WaitOptions::empty()) {
                Ok(Some((_, status))) => return status.exit_status(),
                Err(rustix::io::Errno::INTR) => continue,
                _ => return None,
            }
        }
    }

    fn finish(&mut self) -> Result<()> {
        let Some(code) = self.watchdog.is_some().then(|| self.stop_watchdog()) else {
            return Ok(()); // finished already
        };
        if code != Some(CANCELLED) {
            let why = match code {
                Some(TIMED_OUT) => format!("it stayed frozen longer than {:.0} s", self.max.as_secs_f64()),
                _ => "the watchdog ended unexpectedly".to_string(),
            };
            // Thaw in case the watchdog could not.
            // SAFETY: FITHAW takes no argument; `dir` is open on the filesystem.
            let _ = unsafe { ioctl::ioctl(&self.dir, NoArg::<FITHAW>::new()) };
            return Err(AttachError::ThawedEarly { target: self.mount_point.clone(), reason: why });
        }
        // SAFETY: as above.
        match unsafe { ioctl::ioctl(&self.dir, NoArg::<FITHAW>::new()) } {
            Ok(()) => {
                tracing::debug!(mount_point = %self.mount_point.display(), "filesystem thawed");
                Ok(())
            }
            // Not frozen any more: someone else thawed it meanwhile.
            Err(rustix::io::Errno::INVAL) => {
                Err(AttachError::ThawedEarly { target: self.mount_point.clone(), reason: "something else thawed it meanwhile".into() })
            }
            Err(e) => Err(AttachError::Freeze { op: "FITHAW", target: self.mount_point.clone(), error: e.into() }),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!(mount_point = %self.mount_point.display(), error = %e, "thaw on drop");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::filesystem;
    use crate::attach::loopdev::{self, AttachOptions};
    use crate::attach::mount;
    use crate::attach::testutil::{running_as_root, Cleanup};
    use std::io::Write;
    use std::time::Instant;

    /// An ext4 filesystem on a loop device, mounted in `dir`.
    async fn mounted_ext4(dir: &Path, cleanup: &mut Cleanup) -> PathBuf {
        let image = dir.join("fs.img");
        std::fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
        let target = dir.join("mnt");
        std::fs::create_dir(&target).unwrap();
        let handle = loopdev::attach(&image, AttachOptions::for_filesystem(false)).unwrap();
        cleanup.attached(&handle.device);
        filesystem::format(&handle.device.path, "ext4", &[]).await.unwrap();
        cleanup.mounted(&target);
        mount::mount_fs(&handle.device.path, &target, "ext4", &[], false).unwrap();
        target
    }

    /// A write (with fsync) on `mnt` in a thread; how long it took, or
    /// `None` if it did not finish within `wait`.
    fn timed_write(mnt: &Path, name: &str, wait: Duration) -> Option<Duration> {
        let path = mnt.join(name);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let t = Instant::now();
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(b"x").unwrap();
            f.sync_all().unwrap();
            let _ = tx.send(t.elapsed());
        });
        rx.recv_timeout(wait).ok()
    }

    #[tokio::test]
    async fn writers_wait_while_frozen_and_go_on_after_thaw() {
        if !running_as_root("writers_wait_while_frozen_and_go_on_after_thaw") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let mnt = mounted_ext4(dir.path(), &mut cleanup).await;
        let frozen = freeze(&mnt, Duration::from_secs(30)).unwrap();
        // A second freeze of a frozen filesystem is refused, not stacked.
        let e = freeze(&mnt, Duration::from_secs(30)).unwrap_err();
        assert!(e.to_string().contains("FIFREEZE"), "{e}");
        assert_eq!(timed_write(&mnt, "during", Duration::from_millis(300)), None, "a write got through a freeze");
        frozen.thaw().unwrap();
        assert!(timed_write(&mnt, "after", Duration::from_secs(10)).is_some());
        // Dropping without thawing thaws too.
        drop(freeze(&mnt, Duration::from_secs(30)).unwrap());
        assert!(timed_write(&mnt, "after-drop", Duration::from_secs(10)).is_some());
    }

    #[tokio::test]
    async fn the_watchdog_thaws_a_freezer_that_hangs_and_says_so() {
        if !running_as_root("the_watchdog_thaws_a_freezer_that_hangs_and_says_so") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let mnt = mounted_ext4(dir.path(), &mut cleanup).await;
        let frozen = freeze(&mnt, Duration::from_millis(300)).unwrap();
        // Blocked until the watchdog thaws, about 300 ms in.
        let waited = timed_write(&mnt, "blocked", Duration::from_secs(10)).expect("the watchdog never thawed");
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        let e = frozen.thaw().unwrap_err();
        assert!(matches!(e, AttachError::ThawedEarly { .. }) && e.to_string().contains("longer than"), "{e}");
    }

    /// Run by `the_watchdog_thaws_when_the_freezer_dies` in a process of
    /// its own: freeze the mount point named in the environment, say so, wait.
    #[test]
    #[ignore]
    fn freeze_and_wait_helper() {
        let Some(mnt) = std::env::var_os("CINDERBLOCK_FREEZE_HELPER") else { return };
        let _frozen = freeze(Path::new(&mnt), Duration::from_secs(600)).unwrap();
        println!("FROZEN");
        std::io::stdout().flush().unwrap();
        std::thread::sleep(Duration::from_secs(600));
    }

    #[tokio::test]
    async fn the_watchdog_thaws_when_the_freezer_dies() {
        if !running_as_root("the_watchdog_thaws_when_the_freezer_dies") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let mnt = mounted_ext4(dir.path(), &mut cleanup).await;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "attach::freeze::tests::freeze_and_wait_helper", "--ignored", "--nocapture"])
            .env("CINDERBLOCK_FREEZE_HELPER", &mnt)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("FROZEN") {
            line.clear();
            assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0, "the helper ended before freezing");
        }
        assert_eq!(timed_write(&mnt, "during", Duration::from_millis(300)), None, "not frozen");
        child.kill().unwrap(); // SIGKILL: no destructor runs
        child.wait().unwrap();
        assert!(timed_write(&mnt, "after", Duration::from_secs(5)).is_some(), "still frozen after the freezer died");
    }
}
