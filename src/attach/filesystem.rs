//! Filesystems on a volume's device: probe, format, grow (by running the
//! tools that own each format), and usage figures (statvfs).

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::{AttachError, Result};

/// The filesystems the driver formats and grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filesystem {
    Ext4,
    Xfs,
}

impl Filesystem {
    pub fn parse(fs_type: &str) -> Result<Self> {
        match fs_type {
            "ext4" => Ok(Filesystem::Ext4),
            "xfs" => Ok(Filesystem::Xfs),
            other => Err(AttachError::UnsupportedFilesystem { fs_type: other.to_owned() }),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
        }
    }
}

impl std::fmt::Display for Filesystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Keep error messages a readable size even if a tool is chatty.
const MAX_STDERR: usize = 4096;

/// How long each tool may take before it is killed. Generous: they are
/// quick on a healthy disk (mkfs is lazy, resizes are online), so running
/// into these means a hung device, and the call should fail rather than
/// hold the volume forever.
const BLKID_TIMEOUT: Duration = Duration::from_secs(60);
const MKFS_TIMEOUT: Duration = Duration::from_secs(300);
const GROW_TIMEOUT: Duration = Duration::from_secs(600);

/// Run a tool without a shell; its output is captured, never inherited.
/// Killed when it runs longer than `limit` (or when the caller gives up).
async fn run(program: &'static str, package: &'static str, args: &[&OsStr], subject: &Path, limit: Duration) -> Result<Output> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| AttachError::CommandSpawn { program, package, error })?;
    // Read both pipes while waiting, so a chatty tool cannot block on a
    // full pipe, and so what it said before a timeout is kept.
    let collect = |pipe: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
        tokio::spawn(async move {
            let mut out = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut out).await;
            }
            out
        })
    };
    let stdout = collect(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = collect(child.stderr.take().map(|p| Box::new(p) as _));
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let said = tokio::time::timeout(Duration::from_secs(2), stderr).await.ok().and_then(|r| r.ok()).unwrap_or_default();
            return Err(AttachError::CommandTimedOut {
                program,
                path: subject.to_path_buf(),
                seconds: limit.as_secs_f64(),
                stderr: tidy(&said),
            });
        }
    };
    let status = status.map_err(|error| AttachError::CommandSpawn { program, package, error })?;
    Ok(Output { status, stdout: stdout.await.unwrap_or_default(), stderr: stderr.await.unwrap_or_default() })
}

/// A tool's output made fit for an error message.
fn tidy(text: &[u8]) -> String {
    let mut stderr = String::from_utf8_lossy(text).trim().to_owned();
    if stderr.len() > MAX_STDERR {
        let mut cut = MAX_STDERR;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
        stderr.push_str(" [...]");
    }
    if stderr.is_empty() {
        stderr = "no output".into();
    }
    stderr
}

fn failed(program: &'static str, path: &Path, output: &Output) -> AttachError {
    let text = if output.stderr.iter().any(|b| !b.is_ascii_whitespace()) { &output.stderr } else { &output.stdout };
    let stderr = tidy(text);
    let hint = if stderr.contains("Permission denied to resize") {
        // EXT4_IOC_RESIZE_FS needs CAP_SYS_RESOURCE, not just root.
        "; the node plugin needs CAP_SYS_RESOURCE to grow a mounted ext4 (run it privileged)"
    } else {
        ""
    };
    AttachError::CommandFailed { program, path: path.to_path_buf(), status: output.status.to_string(), stderr, hint }
}

async fn run_checked(program: &'static str, package: &'static str, args: &[&OsStr], subject: &Path, limit: Duration) -> Result<Output> {
    let output = run(program, package, args, subject, limit).await?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(failed(program, subject, &output))
    }
}

/// What is on `device`: `None` when blkid finds nothing (safe to format),
/// the filesystem type (`"ext4"`, `"xfs"`, ...), or, for a device that holds
/// a partition table and no filesystem, `"<type> partition table"`.
///
/// Anything blkid cannot answer cleanly (e.g. an ambivalent result with two
/// signatures) is an error, never "blank".
pub async fn probe(device: &Path) -> Result<Option<String>> {
    // blkid answers "nothing found" (exit 2) for a missing path too.
    std::fs::metadata(device).map_err(|error| AttachError::OpenDevice { device: device.to_path_buf(), error })?;
    let args = [
        OsStr::new("-p"),
        OsStr::new("-s"),
        OsStr::new("TYPE"),
        OsStr::new("-s"),
        OsStr::new("PTTYPE"),
        OsStr::new("-o"),
        OsStr::new("export"),
        device.as_os_str(),
    ];
    let output = run("blkid", "util-linux", &args, device, BLKID_TIMEOUT).await?;
    match output.status.code() {
        Some(0) => {}
        Some(2) => return Ok(None),
        _ => return Err(failed("blkid", device, &output)),
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let value = |key: &str| {
        text.lines().filter_map(|l| l.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v.trim().to_owned()).filter(|v| !v.is_empty())
    };
    Ok(value("TYPE").or_else(|| value("PTTYPE").map(|pt| format!("{pt} partition table"))))
}

/// Make a filesystem on `device`, overwriting whatever is there: call
/// [`probe`] first and format only a blank device. `extra` goes to mkfs
/// before the device (for ext4, an `-E` in it replaces our `-E nodiscard`).
/// Discard is skipped: the image is new and sparse, and discarding it is slow.
///
/// Blocks (ext4) and sectors (xfs) are 4 KiB whatever the device says: a
/// loop device with direct I/O takes its sector size from its image, and a
/// reflinked image (a snapshot, a clone, a restore on XFS) asks for 4 KiB
/// where the original asked for 512 bytes. A filesystem made with smaller
/// blocks would not mount from the copy ("bad block size").
pub async fn format(device: &Path, fs_type: &str, extra: &[String]) -> Result<()> {
    let fs = Filesystem::parse(fs_type)?;
    let (program, base): (&'static str, &[&str]) = match fs {
        Filesystem::Ext4 => ("mkfs.ext4", &["-F", "-q", "-b", "4096", "-E", "nodiscard"]),
        Filesystem::Xfs => ("mkfs.xfs", &["-f", "-q", "-K", "-s", "size=4096"]),
    };
    let mut args: Vec<&OsStr> = base.iter().map(OsStr::new).collect();
    args.extend(extra.iter().map(OsStr::new));
    args.push(device.as_os_str());
    run_checked(program, package_of(fs), &args, device, MKFS_TIMEOUT).await?;
    tracing::info!(device = %device.display(), fs_type = fs.as_str(), "formatted");
    Ok(())
}

fn package_of(fs: Filesystem) -> &'static str {
    match fs {
        Filesystem::Ext4 => "e2fsprogs",
        Filesystem::Xfs => "xfsprogs",
    }
}

/// Grow the mounted filesystem on `device` to fill it (after the device has
/// grown, e.g. `loopdev::refresh_capacity`). ext4 grows online through the
/// device; xfs only online, through its mount point.
pub async fn grow(device: &Path, fs_type: &str, mount_point: &Path) -> Result<()> {
    let fs = Filesystem::parse(fs_type)?;
    match fs {
        Filesystem::Ext4 => {
            run_checked("resize2fs", package_of(fs), &[device.as_os_str()], device, GROW_TIMEOUT).await?;
        }
        Filesystem::Xfs => {
            run_checked("xfs_growfs", package_of(fs), &[OsStr::new("-d"), mount_point.as_os_str()], mount_point, GROW_TIMEOUT).await?;
        }
    }
    tracing::info!(device = %device.display(), mount_point = %mount_point.display(), fs_type = fs.as_str(), "filesystem fills its device");
    Ok(())
}

/// Whether the xfs on `device` would grow by `xfs_growfs`: its data
/// section (from the primary superblock) is smaller than the device by at
/// least the smallest allocation group tail xfs_growfs adds (64 blocks; a
/// smaller remainder it leaves unused). Reading the superblock costs one
/// 16-byte read instead of a process per stage. `None` when the device
/// does not start with an xfs superblock.
pub fn xfs_would_grow(device: &Path, device_bytes: u64) -> Result<Option<bool>> {
    Ok(xfs_data_section(device)?.map(|(block_size, data_bytes)| data_bytes + 64 * block_size <= device_bytes))
}

/// The block size and data section size in bytes of the xfs on `device`,
/// read from its primary superblock at byte 0: magic "XFSB", then
/// sb_blocksize (big-endian u32) and sb_dblocks (big-endian u64).
fn xfs_data_section(device: &Path) -> Result<Option<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    let open_err = |error| AttachError::OpenDevice { device: device.to_path_buf(), error };
    let file = std::fs::File::open(device).map_err(open_err)?;
    let mut sb = [0u8; 16];
    file.read_exact_at(&mut sb, 0).map_err(open_err)?;
    if &sb[0..4] != b"XFSB" {
        return Ok(None);
    }
    let block_size = u64::from(u32::from_be_bytes(sb[4..8].try_into().expect("4 bytes")));
    let blocks = u64::from_be_bytes(sb[8..16].try_into().expect("8 bytes"));
    Ok(Some((block_size, blocks.saturating_mul(block_size))))
}

/// Before mounting: grow an unmounted ext4 on `device` that is smaller than
/// the device (its volume was expanded while it was not staged). Offline
/// growth needs no CAP_SYS_RESOURCE, which growing a mounted ext4 does, and
/// the kubelet's NodeExpandVolume after the stage then finds nothing to do.
/// resize2fs wants a fresh check first, so e2fsck runs before it, and only
/// when the sizes differ. Returns whether it grew. xfs grows only mounted,
/// so other filesystems are left alone.
pub async fn grow_unmounted_ext4(device: &Path) -> Result<bool> {
    let output = run_checked("dumpe2fs", "e2fsprogs", &[OsStr::new("-h"), device.as_os_str()], device, BLKID_TIMEOUT).await?;
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |key: &str| {
        text.lines().filter_map(|l| l.split_once(':')).find(|(k, _)| k.trim() == key).and_then(|(_, v)| v.trim().parse::<u64>().ok())
    };
    let (Some(blocks), Some(block_size)) = (field("Block count"), field("Block size")) else {
        return Err(AttachError::CommandFailed {
            program: "dumpe2fs",
            path: device.to_path_buf(),
            status: output.status.to_string(),
            stderr: "no block count or block size in its summary".into(),
            hint: "",
        });
    };
    let device_bytes = super::loopdev::size_bytes(device)?;
    if blocks >= device_bytes / block_size.max(1) {
        return Ok(false);
    }
    // -p: repair only what is safe without a person; 1 means it did.
    let check = run("e2fsck", "e2fsprogs", &[OsStr::new("-f"), OsStr::new("-p"), device.as_os_str()], device, GROW_TIMEOUT).await?;
    if !matches!(check.status.code(), Some(0) | Some(1)) {
        return Err(failed("e2fsck", device, &check));
    }
    run_checked("resize2fs", "e2fsprogs", &[device.as_os_str()], device, GROW_TIMEOUT).await?;
    tracing::info!(device = %device.display(), from_bytes = blocks * block_size, device_bytes, "grew ext4 before mounting it");
    Ok(true)
}

/// Usage of the filesystem holding `path`, as NodeGetVolumeStats reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

pub fn stats(path: &Path) -> Result<FsStats> {
    let s = rustix::fs::statvfs(path).map_err(|e| AttachError::Statvfs { path: path.to_path_buf(), error: e.into() })?;
    let unit = s.f_frsize;
    Ok(FsStats {
        total_bytes: s.f_blocks.saturating_mul(unit),
        // What an unprivileged writer can still use (root's reserve excluded).
        available_bytes: s.f_bavail.saturating_mul(unit),
        used_bytes: s.f_blocks.saturating_sub(s.f_bfree).saturating_mul(unit),
        total_inodes: s.f_files,
        free_inodes: s.f_ffree,
        used_inodes: s.f_files.saturating_sub(s.f_ffree),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::loopdev::{self, AttachOptions};
    use crate::attach::mount;
    use crate::attach::testutil::{has_capability, have_program, running_as_root, Cleanup};
    use std::fs::{File, OpenOptions};
    use std::io::Write;

    const MIB: u64 = 1024 * 1024;
    const CAP_SYS_RESOURCE: u32 = 24;

    #[test]
    fn only_ext4_and_xfs() {
        assert_eq!(Filesystem::parse("ext4").unwrap(), Filesystem::Ext4);
        assert_eq!(Filesystem::parse("xfs").unwrap(), Filesystem::Xfs);
        let err = Filesystem::parse("btrfs").unwrap_err();
        assert!(err.to_string().contains("btrfs") && err.to_string().contains("ext4 or xfs"), "{err}");
    }

    #[tokio::test]
    async fn format_refuses_other_types_before_running_anything() {
        let err = format(Path::new("/nonexistent"), "ntfs", &[]).await.unwrap_err();
        assert!(matches!(err, AttachError::UnsupportedFilesystem { .. }), "{err}");
    }

    #[tokio::test]
    async fn probe_of_a_missing_device_is_an_error_not_blank() {
        let err = probe(Path::new("/dev/does-not-exist")).await.unwrap_err();
        assert!(err.to_string().contains("/dev/does-not-exist"), "{err}");
    }

    #[tokio::test]
    async fn missing_tool_says_what_to_install() {
        let err = run("cinderblock-no-such-tool", "some-package", &[], Path::new("/dev/x"), BLKID_TIMEOUT).await.unwrap_err();
        assert!(err.to_string().contains("install some-package"), "{err}");
    }

    #[tokio::test]
    async fn a_tool_that_hangs_is_killed_and_its_stderr_kept() {
        let pid_file = tempfile::NamedTempFile::new().unwrap();
        let script = format!("echo $$ > {}; echo 'waiting for the device' >&2; exec sleep 30", pid_file.path().display());
        let args = [OsStr::new("-c"), OsStr::new(&script)];
        let started = std::time::Instant::now();
        let err = run("sh", "dash", &args, Path::new("/dev/loop99"), Duration::from_millis(300)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        let msg = err.to_string();
        assert!(matches!(err, AttachError::CommandTimedOut { .. }), "{msg}");
        assert!(msg.contains("sh on /dev/loop99") && msg.contains("0.3 s") && msg.contains("waiting for the device"), "{msg}");
        // The tool is gone, not left running.
        let pid: i32 = std::fs::read_to_string(pid_file.path()).unwrap().trim().parse().unwrap();
        let alive = rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid).unwrap()).is_ok();
        assert!(!alive, "process {pid} still runs");
    }

    #[test]
    fn stats_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let s = stats(dir.path()).unwrap();
        assert!(s.total_bytes > 0);
        assert!(s.available_bytes <= s.total_bytes);
        assert!(s.used_bytes <= s.total_bytes);
        assert_eq!(s.used_inodes + s.free_inodes, s.total_inodes);
        assert!(stats(&dir.path().join("missing")).is_err());
    }

    #[tokio::test]
    async fn probe_blank_then_format_then_probe() {
        if !running_as_root("probe_blank_then_format_then_probe") || !have_program("mkfs.ext4") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let image = dir.path().join("vol.img");
        File::create(&image).unwrap().set_len(32 * MIB).unwrap();
        let dev = loopdev::attach(&image, AttachOptions::for_block(false)).unwrap().release();
        cleanup.attached(&dev);

        assert_eq!(probe(&dev.path).await.unwrap(), None);
        format(&dev.path, "ext4", &[]).await.unwrap();
        assert_eq!(probe(&dev.path).await.unwrap().as_deref(), Some("ext4"));

        // A failing mkfs reports its stderr and the device.
        let err = format(&dev.path, "ext4", &["--no-such-option".into()]).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("mkfs.ext4") && msg.contains(dev.path.to_str().unwrap()), "{msg}");
        assert!(matches!(err, AttachError::CommandFailed { ref stderr, .. } if !stderr.is_empty()));
    }

    #[tokio::test]
    async fn partition_table_is_not_blank() {
        if !running_as_root("partition_table_is_not_blank") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let image = dir.path().join("vol.img");
        let mut f = File::create(&image).unwrap();
        f.set_len(16 * MIB).unwrap();
        // A DOS label with one Linux partition at LBA 2048.
        let mut mbr = [0u8; 512];
        mbr[446 + 4] = 0x83;
        mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        mbr[446 + 12..446 + 16].copy_from_slice(&30000u32.to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        f.write_all(&mbr).unwrap();
        drop(f);
        let dev = loopdev::attach(&image, AttachOptions::for_block(true)).unwrap().release();
        cleanup.attached(&dev);
        assert_eq!(probe(&dev.path).await.unwrap().as_deref(), Some("dos partition table"));
    }

    /// Attach, format, mount; grow the image; refresh, grow online; check.
    /// Returns grow()'s error, if any; every other step must succeed.
    async fn grow_online(fs_type: &str, initial: u64, grown: u64) -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let image = dir.path().join("vol.img");
        File::create(&image).unwrap().set_len(initial).unwrap();
        let target = dir.path().join("mnt");
        std::fs::create_dir(&target).unwrap();

        let handle = loopdev::attach(&image, AttachOptions::for_filesystem(false)).unwrap();
        cleanup.attached(&handle.device);
        let dev = handle.device.clone();
        assert_eq!(probe(&dev.path).await.unwrap(), None);
        format(&dev.path, fs_type, &[]).await.unwrap();
        assert_eq!(probe(&dev.path).await.unwrap().as_deref(), Some(fs_type));
        cleanup.mounted(&target);
        mount::mount_fs(&dev.path, &target, fs_type, &[], false).unwrap();
        drop(handle);

        std::fs::write(target.join("data"), vec![7u8; 1 << 20]).unwrap();
        let before = stats(&target).unwrap();
        assert!(before.total_bytes < initial);
        assert!(before.used_bytes >= 1 << 20);

        OpenOptions::new().write(true).open(&image).unwrap().set_len(grown).unwrap();
        assert_eq!(loopdev::refresh_capacity(&dev).unwrap(), grown);
        grow(&dev.path, fs_type, &target).await?;

        let after = stats(&target).unwrap();
        assert!(after.total_bytes > before.total_bytes + (grown - initial) * 8 / 10, "{fs_type}: {before:?} -> {after:?}");
        assert!(after.total_bytes <= grown);
        assert!(after.available_bytes > before.available_bytes);
        assert!(after.total_inodes >= before.total_inodes);
        assert_eq!(std::fs::read(target.join("data")).unwrap(), vec![7u8; 1 << 20]);
        Ok(())
    }

    #[tokio::test]
    async fn grow_ext4_online() {
        if !running_as_root("grow_ext4_online") || !have_program("mkfs.ext4") {
            return;
        }
        if !has_capability(CAP_SYS_RESOURCE) {
            // Online ext4 resize checks CAP_SYS_RESOURCE; check that the
            // error says so, then stop.
            let err = grow_online("ext4", 64 * MIB, 192 * MIB).await.unwrap_err();
            assert!(err.to_string().contains("CAP_SYS_RESOURCE"), "{err}");
            eprintln!("note: grow_ext4_online: this process lacks CAP_SYS_RESOURCE, so only the refusal was checked");
            return;
        }
        grow_online("ext4", 64 * MIB, 192 * MIB).await.unwrap();
    }

    /// The superblock read agrees with mkfs.xfs's size, and a larger device
    /// (or not) is told apart; a file that is not xfs gives None.
    #[tokio::test]
    async fn xfs_superblock_tells_whether_it_would_grow() {
        if !have_program("mkfs.xfs") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("xfs.img");
        File::create(&image).unwrap().set_len(320 * MIB).unwrap();
        format(&image, "xfs", &[]).await.unwrap();
        let (block_size, data_bytes) = xfs_data_section(&image).unwrap().expect("an xfs superblock");
        assert_eq!(data_bytes, 320 * MIB, "block size {block_size}");
        assert_eq!(xfs_would_grow(&image, 320 * MIB).unwrap(), Some(false));
        assert_eq!(xfs_would_grow(&image, 320 * MIB + 63 * block_size).unwrap(), Some(false));
        assert_eq!(xfs_would_grow(&image, 320 * MIB + 64 * block_size).unwrap(), Some(true));
        assert_eq!(xfs_would_grow(&image, 640 * MIB).unwrap(), Some(true));
        let other = dir.path().join("zeros.img");
        File::create(&other).unwrap().set_len(MIB).unwrap();
        assert_eq!(xfs_would_grow(&other, MIB).unwrap(), None);
    }

    #[tokio::test]
    async fn grow_xfs_online() {
        if !running_as_root("grow_xfs_online") {
            return;
        }
        if !have_program("mkfs.xfs") || !have_program("xfs_growfs") {
            return;
        }
        // mkfs.xfs refuses filesystems under 300 MiB.
        grow_online("xfs", 320 * MIB, 640 * MIB).await.unwrap();
    }
}
