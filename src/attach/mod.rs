//! The node side of a volume, what os-brick's `connect_volume` does for
//! Cinder: put a block device in front of the volume's image (a loop device
//! when the image is local), probe and format it, mount it, grow it.
//!
//! The functions here do one thing each and do not remember anything: the
//! caller inspects first (`loopdev::find_by_backing_file`,
//! `mount::find_by_target`, `filesystem::probe`) and then acts, which is what
//! makes NodeStage/NodePublish idempotent. Syscalls go through rustix and run
//! synchronously (call them from `spawn_blocking` in async code if a slow
//! device is a concern); tools that own a format (blkid, mkfs, resize2fs,
//! xfs_growfs) are run with `tokio::process`.

pub mod filesystem;
pub mod freeze;
pub mod loopdev;
pub mod mount;
pub mod nbd;

use std::io;
use std::path::PathBuf;

pub use filesystem::{Filesystem, FsStats};
pub use loopdev::{AttachOptions, LoopDevice, LoopHandle};
pub use mount::MountInfo;

pub type Result<T, E = AttachError> = std::result::Result<T, E>;

/// Everything that can go wrong while attaching, formatting or mounting.
///
/// Each message names the device or path and the cause (the OS error or the
/// tool's stderr), and, where there is one, what to do about it. The cause is
/// part of the message rather than a `source()`, so printing the chain does not
/// repeat it; `io_error()` gives it back to code that needs the errno.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("cannot use {path} as a volume image: {reason}")]
    BadBackingFile { path: PathBuf, reason: String },

    #[error("cannot open volume image {path}: {error}; check that the image exists and the node plugin can read it")]
    OpenBackingFile { path: PathBuf, error: io::Error },

    #[error("cannot get a free loop device from /dev/loop-control: {error}; check that the loop module is loaded and the plugin sees the host's /dev")]
    LoopControl { error: io::Error },

    #[error("cannot open {device}: {error}")]
    OpenDevice { device: PathBuf, error: io::Error },

    #[error("{op} on {device} failed: {error}")]
    LoopIoctl { op: &'static str, device: PathBuf, error: io::Error },

    #[error("could not attach {backing_file} to a loop device: other processes took each free device first ({attempts} tries); retry")]
    LoopBusy { backing_file: PathBuf, attempts: u32 },

    #[error("cannot read {path}: {error}")]
    Sysfs { path: PathBuf, error: io::Error },

    #[error("cannot read the mount table /proc/self/mountinfo: {error}")]
    MountTable { error: io::Error },

    #[error("malformed line {line_number} in /proc/self/mountinfo ({reason}): {line:?}")]
    MountTableParse { line_number: usize, line: String, reason: &'static str },

    #[error("{target} is already a mount point (of {source_name}, {fs_type}); unmount it first or reuse that mount")]
    AlreadyMounted { target: PathBuf, source_name: String, fs_type: String },

    #[error("mount option {option:?} is not allowed: {reason}")]
    BadMountOption { option: String, reason: &'static str },

    #[error("mounting {device} ({fs_type}) on {target} failed: {error}")]
    Mount { device: PathBuf, target: PathBuf, fs_type: String, error: io::Error },

    #[error("bind-mounting {source_path} on {target} failed: {error}")]
    BindMount { source_path: PathBuf, target: PathBuf, error: io::Error },

    #[error("remounting {target} {mode} failed: {error}")]
    Remount { target: PathBuf, mode: &'static str, error: io::Error },

    #[error("unmounting {target} failed: {error}{hint}")]
    Unmount { target: PathBuf, error: io::Error, hint: &'static str },

    #[error("filesystem type {fs_type:?} is not supported; use ext4 or xfs")]
    UnsupportedFilesystem { fs_type: String },

    #[error("cannot run {program}: {error}; install {package} on the node")]
    CommandSpawn { program: &'static str, package: &'static str, error: io::Error },

    #[error("{program} on {path} failed ({status}): {stderr}{hint}")]
    CommandFailed { program: &'static str, path: PathBuf, status: String, stderr: String, hint: &'static str },

    #[error("{program} on {path} did not finish within {seconds} s and was stopped (it said: {stderr}); the device may be hung: check the node's kernel log")]
    CommandTimedOut { program: &'static str, path: PathBuf, seconds: f64, stderr: String },

    #[error("{op} on {target} failed: {error}")]
    Freeze { op: &'static str, target: PathBuf, error: io::Error },

    #[error("the filesystem at {target} was thawed before its copy was done ({reason}); the copy may not be clean: retry")]
    ThawedEarly { target: PathBuf, reason: String },

    #[error("cannot read filesystem statistics of {path}: {error}")]
    Statvfs { path: PathBuf, error: io::Error },
}

impl AttachError {
    /// The OS error behind this failure, when there is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        use AttachError::*;
        match self {
            OpenBackingFile { error, .. }
            | LoopControl { error }
            | OpenDevice { error, .. }
            | LoopIoctl { error, .. }
            | Sysfs { error, .. }
            | MountTable { error }
            | Mount { error, .. }
            | BindMount { error, .. }
            | Remount { error, .. }
            | Unmount { error, .. }
            | CommandSpawn { error, .. }
            | Freeze { error, .. }
            | Statvfs { error, .. } => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Real devices and mounts in tests: only as root, always cleaned up.

    use super::loopdev::{self, LoopDevice};
    use super::mount;
    use std::path::{Path, PathBuf};

    /// A test that cannot run here: under `CI=true` that fails it (a test
    /// that cannot run must not pass); elsewhere it says so and the test
    /// returns, so `cargo test` stays usable without root.
    fn cannot_run(test: &str, why: &str) {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("{test} cannot run: {why} (CI=true: a test that cannot run fails)");
        }
        eprintln!("SKIPPED {test}: {why}");
    }

    /// Tests that need loop devices and mount(2) call this first and return
    /// when it says false.
    pub fn running_as_root(test: &str) -> bool {
        let root = rustix::process::geteuid().is_root();
        if !root {
            cannot_run(test, "needs root for loop devices and mounts");
        }
        root
    }

    /// Whether this process has capability `cap` (linux/capability.h number).
    pub fn has_capability(cap: u32) -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << cap) != 0)
    }

    /// Whether `program` is on PATH; a test that needs it returns when not
    /// (and fails under `CI=true`).
    pub fn have_program(program: &str) -> bool {
        let found =
            std::env::var_os("PATH").map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file())).unwrap_or(false);
        if !found {
            cannot_run("this test", &format!("needs {program} on PATH (scripts/test-all.sh installs it)"));
        }
        found
    }

    /// Undoes what a test set up, in reverse, even when the test panics.
    #[derive(Default)]
    pub struct Cleanup {
        mounts: Vec<PathBuf>,
        loops: Vec<LoopDevice>,
    }

    impl Cleanup {
        pub fn mounted(&mut self, target: &Path) {
            self.mounts.push(target.to_path_buf());
        }
        pub fn attached(&mut self, dev: &LoopDevice) {
            self.loops.push(dev.clone());
        }
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            for target in self.mounts.iter().rev() {
                // Loop in case a failed test stacked mounts.
                for _ in 0..4 {
                    match mount::unmount(target) {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            eprintln!("cleanup: {e}; detaching lazily");
                            let _ = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH);
                            break;
                        }
                    }
                }
            }
            for dev in self.loops.iter().rev() {
                if let Err(e) = loopdev::detach(dev) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
    }
}
