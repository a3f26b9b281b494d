//! The mount table as the kernel sees it (`/proc/self/mountinfo`, never a
//! copy in memory) and mount(2)/umount(2) through rustix.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};

use super::{AttachError, Result};

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of `/proc/self/mountinfo` (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_id: u32,
    pub parent_id: u32,
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is mounted (not `/` for bind
    /// mounts of a subdirectory).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options: `rw`/`ro`, `nosuid`, `noatime`, ...
    pub mount_options: Vec<String>,
    /// `shared:N`, `master:N`, ...
    pub optional_fields: Vec<String>,
    pub fs_type: String,
    /// What was mounted, e.g. `/dev/loop3`, or `none`.
    pub source: String,
    /// Per-superblock options.
    pub super_options: Vec<String>,
}

impl MountInfo {
    pub fn is_read_only(&self) -> bool {
        self.mount_options.iter().any(|o| o == "ro")
    }
}

/// Undo the kernel's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn unescape_path(field: &str) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

fn split_options(field: &str) -> Vec<String> {
    field.split(',').filter(|o| !o.is_empty()).map(str::to_owned).collect()
}

/// Parse the text of a mountinfo file.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            parse_line(line).map_err(|reason| AttachError::MountTableParse { line_number: i + 1, line: line.to_owned(), reason })
        })
        .collect()
}

fn parse_line(line: &str) -> std::result::Result<MountInfo, &'static str> {
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-").ok_or("no \"-\" separator")?;
    if sep < 6 {
        return Err("fewer than 6 fields before the separator");
    }
    if fields.len() < sep + 3 {
        return Err("fewer than 3 fields after the separator");
    }
    let (major, minor) = fields[2].split_once(':').ok_or("device is not major:minor")?;
    Ok(MountInfo {
        mount_id: fields[0].parse().map_err(|_| "bad mount id")?,
        parent_id: fields[1].parse().map_err(|_| "bad parent id")?,
        major: major.parse().map_err(|_| "bad major number")?,
        minor: minor.parse().map_err(|_| "bad minor number")?,
        root: unescape_path(fields[3]),
        mount_point: unescape_path(fields[4]),
        mount_options: split_options(fields[5]),
        optional_fields: fields[6..sep].iter().map(|s| s.to_string()).collect(),
        fs_type: String::from_utf8_lossy(&unescape(fields[sep + 1])).into_owned(),
        source: String::from_utf8_lossy(&unescape(fields[sep + 2])).into_owned(),
        super_options: fields.get(sep + 3).map(|f| split_options(f)).unwrap_or_default(),
    })
}

/// The current mount table.
pub fn mount_table() -> Result<Vec<MountInfo>> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(|error| AttachError::MountTable { error })?;
    parse_mountinfo(&text)
}

/// The path as the mount table spells it: absolute, symlinks resolved when
/// the path can be resolved (a dead mount may not allow it).
fn normalize(path: &Path) -> PathBuf {
    path.canonicalize().or_else(|_| std::path::absolute(path)).unwrap_or_else(|_| path.to_path_buf())
}

/// The mount at `target`; when several are stacked there, the top one.
pub fn find_by_target(target: &Path) -> Result<Option<MountInfo>> {
    let target = normalize(target);
    Ok(mount_table()?.into_iter().rev().find(|m| m.mount_point == target))
}

/// Every mount whose source is `source` (e.g. all mounts of `/dev/loop3`).
pub fn find_by_source(source: &str) -> Result<Vec<MountInfo>> {
    Ok(mount_table()?.into_iter().filter(|m| m.source == source).collect())
}

pub fn is_mount_point(path: &Path) -> Result<bool> {
    Ok(find_by_target(path)?.is_some())
}

fn refuse_if_mounted(target: &Path) -> Result<()> {
    match find_by_target(target)? {
        Some(m) => Err(AttachError::AlreadyMounted { target: target.to_path_buf(), source_name: m.source, fs_type: m.fs_type }),
        None => Ok(()),
    }
}

/// CSI mount flags split into mount(2) flags and the filesystem's data string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MountFlags,
    pub data: String,
}

/// Split on commas outside double quotes: kubelet passes SELinux labels
/// like `context="system_u:object_r:container_file_t:s0:c1,c2"`.
fn split_option_list(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Map CSI `mount_flags` (each entry may itself be a comma list) to flags and
/// data. Options that would change what kind of mount this is are refused.
pub fn parse_mount_options(options: &[String], readonly: bool) -> Result<MountOptions> {
    let mut flags = MountFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    let mut ro = readonly;
    for opt in options.iter().flat_map(|o| split_option_list(o)) {
        let opt = opt.trim();
        if opt.contains('\0') {
            return Err(AttachError::BadMountOption { option: opt.to_owned(), reason: "it contains a NUL byte" });
        }
        match opt {
            "" | "defaults" | "async" | "dev" | "suid" | "exec" | "auto" | "nouser" => {}
            "ro" => ro = true,
            "rw" => ro = readonly,
            "noatime" => flags |= MountFlags::NOATIME,
            "nodiratime" => flags |= MountFlags::NODIRATIME,
            "relatime" => flags |= MountFlags::RELATIME,
            "strictatime" => flags |= MountFlags::STRICTATIME,
            "lazytime" => flags |= MountFlags::LAZYTIME,
            "nodev" => flags |= MountFlags::NODEV,
            "nosuid" => flags |= MountFlags::NOSUID,
            "noexec" => flags |= MountFlags::NOEXEC,
            "sync" => flags |= MountFlags::SYNCHRONOUS,
            "dirsync" => flags |= MountFlags::DIRSYNC,
            "silent" => flags |= MountFlags::SILENT,
            "bind" | "rbind" | "remount" | "move" | "loop" => {
                return Err(AttachError::BadMountOption {
                    option: opt.to_owned(),
                    reason: "the driver decides how the volume is mounted; remove it from the mount options",
                })
            }
            other => data.push(other),
        }
    }
    if ro {
        flags |= MountFlags::RDONLY;
    }
    Ok(MountOptions { flags, data: data.join(",") })
}

/// A path held open (`O_PATH`) since it was checked. Mounting on
/// `/proc/self/fd/N` lands on exactly what was opened, whatever has
/// happened to the path meanwhile (a symlink swapped in, a folder renamed):
/// nothing is looked up again.
#[derive(Debug)]
pub struct Pinned {
    fd: OwnedFd,
    path: PathBuf,
}

impl Pinned {
    /// `fd` must be open on `path` (which is only used in messages).
    pub fn new(fd: OwnedFd, path: PathBuf) -> Pinned {
        Pinned { fd, path }
    }

    /// Pin a path the caller trusts, such as a device node under /dev.
    pub fn trusted(path: &Path) -> Result<Pinned> {
        let fd = rustix::fs::open(path, rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty())
            .map_err(|e| AttachError::OpenDevice { device: path.to_path_buf(), error: e.into() })?;
        Ok(Pinned::new(fd, path.to_path_buf()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name through which the kernel reaches the opened file itself.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

impl AsFd for Pinned {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Refuse when something is mounted on the pinned `target` already.
fn refuse_if_mounted_pinned(target: &Pinned) -> Result<()> {
    refuse_if_mounted(&target.proc_path()).map_err(|e| match e {
        AttachError::AlreadyMounted { source_name, fs_type, .. } => {
            AttachError::AlreadyMounted { target: target.path.clone(), source_name, fs_type }
        }
        other => other,
    })
}

/// Mount the filesystem on `device` at `target` (which must exist).
///
/// Refuses when something is mounted at `target` already, so a retried call
/// cannot stack a second mount: look with [`find_by_target`] first.
pub fn mount_fs(device: &Path, target: &Path, fs_type: &str, options: &[String], readonly: bool) -> Result<()> {
    parse_mount_options(options, readonly)?;
    refuse_if_mounted(target)?;
    mount_fs_unchecked(device, target, target, fs_type, options, readonly)
}

/// [`mount_fs`] on a pinned mount point.
pub fn mount_fs_on(device: &Path, target: &Pinned, fs_type: &str, options: &[String], readonly: bool) -> Result<()> {
    parse_mount_options(options, readonly)?;
    refuse_if_mounted_pinned(target)?;
    mount_fs_unchecked(device, &target.proc_path(), &target.path, fs_type, options, readonly)
}

fn mount_fs_unchecked(device: &Path, at: &Path, target: &Path, fs_type: &str, options: &[String], readonly: bool) -> Result<()> {
    let opts = parse_mount_options(options, readonly)?;
    let data = CString::new(opts.data.clone()).expect("NUL bytes were refused above");
    let data = (!opts.data.is_empty()).then_some(data.as_c_str());
    rustix::mount::mount(device, at, fs_type, opts.flags, data).map_err(|e| AttachError::Mount {
        device: device.to_path_buf(),
        target: target.to_path_buf(),
        fs_type: fs_type.to_owned(),
        error: e.into(),
    })?;
    tracing::info!(
        device = %device.display(),
        target = %target.display(),
        fs_type,
        readonly = opts.flags.contains(MountFlags::RDONLY),
        data = %opts.data,
        "mounted filesystem"
    );
    Ok(())
}

/// Bind-mount `source` (a directory, or a device node onto a file) at
/// `target`, read-only when asked.
///
/// Refuses when `target` is a mount point already. Note that a read-only
/// bind mount of a device node does not stop writes to the device (the
/// kernel checks the mount only for files and directories): for a read-only
/// raw block volume, attach the device read-only.
pub fn bind_mount(source: &Path, target: &Path, readonly: bool) -> Result<()> {
    refuse_if_mounted(target)?;
    rustix::mount::mount_bind(source, target).map_err(|e| AttachError::BindMount {
        source_path: source.to_path_buf(),
        target: target.to_path_buf(),
        error: e.into(),
    })?;
    if readonly {
        if let Err(e) = remount_bind(target, true) {
            // Do not leave a writable mount behind a failed read-only publish.
            let _ = rustix::mount::unmount(target, UnmountFlags::empty());
            return Err(e);
        }
    }
    tracing::info!(source = %source.display(), target = %target.display(), readonly, "bind-mounted");
    Ok(())
}

/// [`bind_mount`] from a pinned `source` onto a pinned `target`: the new
/// mount is made detached (`open_tree`), made read-only when asked, and
/// only then attached (`move_mount`), so no path is looked up on the way.
pub fn bind_mount_on(source: &Pinned, target: &Pinned, readonly: bool) -> Result<()> {
    use rustix::mount::{MoveMountFlags, OpenTreeFlags};
    refuse_if_mounted_pinned(target)?;
    let failed =
        |e: rustix::io::Errno| AttachError::BindMount { source_path: source.path.clone(), target: target.path.clone(), error: e.into() };
    let tree = rustix::mount::open_tree(
        source,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(failed)?;
    rustix::mount::move_mount(&tree, "", target, "", MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH)
        .map_err(failed)?;
    // `tree` now names the new mount itself.
    let mounted = Pinned::new(tree, target.path.clone());
    if readonly {
        if let Err(e) = remount_bind_at(&mounted.proc_path(), &target.path, true) {
            let _ = rustix::mount::unmount(mounted.proc_path(), UnmountFlags::empty());
            return Err(e);
        }
    }
    tracing::info!(source = %source.path.display(), target = %target.path.display(), readonly, "bind-mounted");
    Ok(())
}

/// Flip a bind mount between read-only and read-write. Only the mount at
/// `target` changes, not the filesystem under it nor its other mounts.
pub fn remount_bind(target: &Path, readonly: bool) -> Result<()> {
    remount_bind_at(target, target, readonly)
}

fn remount_bind_at(at: &Path, target: &Path, readonly: bool) -> Result<()> {
    // A bind remount replaces the per-mount flags: carry over the ones that
    // are already set so going read-only does not drop nosuid/nodev/noexec.
    let mut flags = MountFlags::BIND;
    if let Some(m) = find_by_target(at)? {
        for o in &m.mount_options {
            match o.as_str() {
                "nosuid" => flags |= MountFlags::NOSUID,
                "nodev" => flags |= MountFlags::NODEV,
                "noexec" => flags |= MountFlags::NOEXEC,
                _ => {}
            }
        }
    }
    if readonly {
        flags |= MountFlags::RDONLY;
    }
    rustix::mount::mount_remount(at, flags, "").map_err(|e| AttachError::Remount {
        target: target.to_path_buf(),
        mode: if readonly { "read-only" } else { "read-write" },
        error: e.into(),
    })
}

/// Unmount `target`. Not mounted, or not there at all, is fine. Returns
/// whether something was unmounted (call again for stacked mounts).
pub fn unmount(target: &Path) -> Result<bool> {
    unmount_at(target, target)
}

/// [`unmount`] of the mount at `name` in the pinned folder `parent`: only
/// that last name is looked up, and a symbolic link there is not followed.
/// (A descriptor on the mount itself would keep it busy.)
pub fn unmount_in(parent: &Pinned, name: &std::ffi::OsStr) -> Result<bool> {
    unmount_with(&parent.proc_path().join(name), &parent.path.join(name), UnmountFlags::NOFOLLOW)
}

fn unmount_at(at: &Path, target: &Path) -> Result<bool> {
    unmount_with(at, target, UnmountFlags::empty())
}

fn unmount_with(at: &Path, target: &Path, flags: UnmountFlags) -> Result<bool> {
    // A reader that has just closed its last file (or a probe such as
    // blkid or udev) can hold the mount for a moment: retry EBUSY briefly
    // before reporting it.
    let mut result = rustix::mount::unmount(at, flags);
    for _ in 0..20 {
        if result != Err(Errno::BUSY) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        result = rustix::mount::unmount(at, flags);
    }
    match result {
        Ok(()) => {
            tracing::info!(target = %target.display(), "unmounted");
            Ok(true)
        }
        Err(Errno::INVAL) | Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(AttachError::Unmount {
            target: target.to_path_buf(),
            hint: if e == Errno::BUSY {
                "; something still uses it (open files, a process's working directory, or a mount below it)"
            } else {
                ""
            },
            error: io::Error::from(e),
        }),
    }
}

/// Whether `path`'s bytes contain anything the mount table would escape.
#[cfg(test)]
fn needs_escape(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().iter().any(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\\'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::filesystem;
    use crate::attach::loopdev::{self, AttachOptions};
    use crate::attach::testutil::{have_program, running_as_root, Cleanup};
    use std::fs::File;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue
40 27 7:3 / /var/lib/kubelet/pods/abc/volumes/my\\040vol ro,nosuid,nodev - ext4 /dev/loop3 ro,seclabel
41 27 0:50 / /tmp/tab\\011and\\134back rw - tmpfs none rw
";

    #[test]
    fn parses_fields_optional_tags_and_escapes() {
        let t = parse_mountinfo(SAMPLE).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t[0].fs_type, "proc");
        assert!(t[0].optional_fields.is_empty());

        let m = &t[1];
        assert_eq!((m.mount_id, m.parent_id, m.major, m.minor), (36, 35, 98, 0));
        assert_eq!(m.root, Path::new("/mnt1"));
        assert_eq!(m.mount_point, Path::new("/mnt2"));
        assert_eq!(m.mount_options, ["rw", "noatime"]);
        assert_eq!(m.optional_fields, ["master:1", "shared:7"]);
        assert_eq!(m.fs_type, "ext3");
        assert_eq!(m.source, "/dev/root");
        assert_eq!(m.super_options, ["rw", "errors=continue"]);
        assert!(!m.is_read_only());

        assert_eq!(t[2].mount_point, Path::new("/var/lib/kubelet/pods/abc/volumes/my vol"));
        assert!(t[2].is_read_only());
        assert_eq!(t[2].source, "/dev/loop3");
        assert_eq!(t[3].mount_point, Path::new("/tmp/tab\tand\\back"));
    }

    #[test]
    fn malformed_lines_say_which_line() {
        let err = parse_mountinfo("22 27 0:21 / /proc rw,relatime - proc proc rw\n23 1 x / /y rw\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 2"), "{msg}");
        assert!(parse_mountinfo("1 2 3:4 / /x rw - ext4").is_err());
        assert!(parse_mountinfo("1 2 34 / /x rw - ext4 /dev/a rw").is_err());
    }

    #[test]
    fn unescape_leaves_lone_backslashes() {
        assert_eq!(unescape(r"a\040b"), b"a b");
        assert_eq!(unescape(r"a\04"), br"a\04");
        assert_eq!(unescape(r"a\999"), br"a\999");
        assert_eq!(unescape(r"\"), br"\");
    }

    #[test]
    fn the_live_table_parses_and_has_root() {
        let t = mount_table().unwrap();
        assert!(t.iter().any(|m| m.mount_point == Path::new("/")));
        assert!(is_mount_point(Path::new("/")).unwrap());
        assert!(is_mount_point(Path::new("/proc")).unwrap());
    }

    #[test]
    fn csi_mount_flags_map_to_flags_and_data() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let m = parse_mount_options(&o(&["noatime", "nodev,nosuid", "noexec", "sync", "discard", "commit=30"]), false).unwrap();
        assert_eq!(m.flags, MountFlags::NOATIME | MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOEXEC | MountFlags::SYNCHRONOUS);
        assert_eq!(m.data, "discard,commit=30");

        let m = parse_mount_options(&o(&["ro"]), false).unwrap();
        assert_eq!(m.flags, MountFlags::RDONLY);
        // "rw" cannot undo a read-only request.
        let m = parse_mount_options(&o(&["rw", "defaults"]), true).unwrap();
        assert_eq!(m.flags, MountFlags::RDONLY);
        assert_eq!(m.data, "");

        let m = parse_mount_options(&o(&[r#"context="system_u:object_r:container_file_t:s0:c1,c2""#, "nouuid"]), false).unwrap();
        assert_eq!(m.data, r#"context="system_u:object_r:container_file_t:s0:c1,c2",nouuid"#);

        assert!(matches!(parse_mount_options(&o(&["bind"]), false), Err(AttachError::BadMountOption { .. })));
        assert!(parse_mount_options(&o(&["a\0b"]), false).is_err());
    }

    #[test]
    fn unmount_of_nothing_is_ok() {
        if !running_as_root("unmount_of_nothing_is_ok") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(!unmount(dir.path()).unwrap());
        assert!(!unmount(&dir.path().join("missing")).unwrap());
    }

    #[tokio::test]
    async fn mount_bind_readonly_and_unmount() {
        if !running_as_root("mount_bind_readonly_and_unmount") || !have_program("mkfs.ext4") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let image = dir.path().join("vol.img");
        File::create(&image).unwrap().set_len(32 << 20).unwrap();
        let staging = dir.path().join("staging dir"); // exercises \040
        let publish = dir.path().join("publish");
        std::fs::create_dir(&staging).unwrap();
        std::fs::create_dir(&publish).unwrap();
        assert!(needs_escape(&staging));

        let handle = loopdev::attach(&image, AttachOptions::for_filesystem(false)).unwrap();
        let dev = handle.device.clone();
        cleanup.attached(&dev);
        filesystem::format(&dev.path, "ext4", &[]).await.unwrap();

        cleanup.mounted(&staging);
        mount_fs(&dev.path, &staging, "ext4", &["noatime".into(), "nodev".into()], false).unwrap();
        drop(handle); // the mount holds the device now

        let m = find_by_target(&staging).unwrap().expect("staging is mounted");
        assert_eq!(m.source, dev.path.to_str().unwrap());
        assert_eq!(m.fs_type, "ext4");
        assert!(m.mount_options.iter().any(|o| o == "noatime"));
        assert!(m.mount_options.iter().any(|o| o == "nodev"));
        assert!(!m.is_read_only());
        assert_eq!(find_by_source(dev.path.to_str().unwrap()).unwrap().len(), 1);
        assert!(loopdev::find_by_backing_file(&image).unwrap().is_some());

        // A second mount on the same target is refused, not stacked.
        let err = mount_fs(&dev.path, &staging, "ext4", &[], false).unwrap_err();
        assert!(matches!(err, AttachError::AlreadyMounted { .. }), "{err}");

        std::fs::write(staging.join("hello"), b"hi").unwrap();

        cleanup.mounted(&publish);
        bind_mount(&staging, &publish, true).unwrap();
        let b = find_by_target(&publish).unwrap().expect("publish is mounted");
        assert!(b.is_read_only());
        assert!(b.mount_options.iter().any(|o| o == "nodev"), "nodev was kept: {:?}", b.mount_options);
        assert_eq!(std::fs::read(publish.join("hello")).unwrap(), b"hi");
        let err = std::fs::write(publish.join("nope"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        // The staging mount itself stays writable.
        std::fs::write(staging.join("still-rw"), b"x").unwrap();
        assert!(matches!(bind_mount(&staging, &publish, true), Err(AttachError::AlreadyMounted { .. })));

        assert!(unmount(&publish).unwrap());
        assert!(!unmount(&publish).unwrap());
        assert!(!is_mount_point(&publish).unwrap());

        // Unmount is refused while something is open there, and says why.
        let open = File::open(staging.join("hello")).unwrap();
        let err = unmount(&staging).unwrap_err();
        assert_eq!(err.io_error().and_then(|e| e.raw_os_error()), Some(libc::EBUSY));
        assert!(err.to_string().contains("still uses it"), "{err}");
        drop(open);

        assert!(unmount(&staging).unwrap());
        assert!(!unmount(&staging).unwrap());
        // Autoclear: the device goes with its last user.
        for _ in 0..200 {
            if loopdev::find_by_backing_file(&image).unwrap().is_none() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("loop device still attached after unmount");
    }

    #[tokio::test]
    async fn block_device_bind_mounted_onto_a_file() {
        if !running_as_root("block_device_bind_mounted_onto_a_file") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let image = dir.path().join("vol.img");
        File::create(&image).unwrap().set_len(8 << 20).unwrap();
        let dev = loopdev::attach(&image, AttachOptions::for_block(false)).unwrap().release();
        cleanup.attached(&dev);
        let target = dir.path().join("block");
        File::create(&target).unwrap();
        cleanup.mounted(&target);
        bind_mount(&dev.path, &target, false).unwrap();
        assert_eq!(loopdev::size_bytes(&target).unwrap(), 8 << 20);
        assert!(unmount(&target).unwrap());
        // No autoclear: still attached after the bind mount is gone.
        assert!(loopdev::find_by_backing_file(&image).unwrap().is_some());
    }

    #[test]
    fn a_pinned_target_is_mounted_on_even_if_its_path_is_swapped() {
        if !running_as_root("a_pinned_target_is_mounted_on_even_if_its_path_is_swapped") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let source = dir.path().join("source");
        let target = dir.path().join("target");
        let elsewhere = dir.path().join("elsewhere");
        for d in [&source, &target, &elsewhere] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(source.join("marker"), b"source").unwrap();
        let src = Pinned::new(
            rustix::fs::open(&source, rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty()).unwrap(),
            source.clone(),
        );
        let at = Pinned::new(
            rustix::fs::open(&target, rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty()).unwrap(),
            target.clone(),
        );
        // After the check: the folder is moved away and a link put in its place.
        let moved = dir.path().join("moved");
        std::fs::rename(&target, &moved).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &target).unwrap();
        cleanup.mounted(&moved);
        bind_mount_on(&src, &at, true).unwrap();
        assert!(find_by_target(&elsewhere).unwrap().is_none(), "the mount followed the link");
        let m = find_by_target(&moved).unwrap().expect("mounted on the folder that was pinned");
        assert!(m.is_read_only());
        assert_eq!(std::fs::read(moved.join("marker")).unwrap(), b"source");
        // Unmounting by a pinned folder and a name does not follow a link
        // put at that name.
        let parent = Pinned::new(
            rustix::fs::open(dir.path(), rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty()).unwrap(),
            dir.path().to_path_buf(),
        );
        assert!(!unmount_in(&parent, std::ffi::OsStr::new("target")).unwrap(), "nothing is mounted at the link");
        assert!(find_by_target(&moved).unwrap().is_some());
        assert!(unmount_in(&parent, std::ffi::OsStr::new("moved")).unwrap());
        assert!(find_by_target(&moved).unwrap().is_none());
    }
}
