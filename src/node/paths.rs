//! Staging and target paths come from the CO. Before anything is created or
//! mounted, a path must be absolute, written in normal form, and lie
//! strictly below one of the allowed roots, without going through a
//! symbolic link below that root.
//!
//! The check alone would leave a window: a folder on the path could be
//! swapped for a symbolic link between the check and the mount. So what is
//! then created, mounted on or removed is reached from the root's folder
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, and mounts go
//! through the opened descriptor (`attach::mount::Pinned`): a link swapped
//! in makes the call fail, never land elsewhere.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::attach::mount::Pinned;

use super::error::NodeError;

/// Longer paths cannot be mounted on (PATH_MAX).
const MAX_PATH: usize = 4096;

/// No symbolic link (nor /proc magic link) is followed, and nothing above
/// the starting folder is reached.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

#[derive(Debug, Clone)]
pub struct AllowedRoots {
    roots: Vec<PathBuf>,
}

/// The folders of a kubelet whose root folder is `kubelet_dir` where it
/// asks CSI drivers to stage and publish: pods' volume folders, and the
/// CSI plugin folder (global mounts and raw block staging and publishing).
/// Nothing else of the kubelet's (its certificates, plugin sockets, pod
/// resources) is an allowed root.
pub fn kubelet_roots(kubelet_dir: &Path) -> Vec<PathBuf> {
    vec![kubelet_dir.join("pods"), kubelet_dir.join("plugins/kubernetes.io/csi")]
}

impl AllowedRoots {
    pub fn new(roots: Vec<PathBuf>) -> Self {
        AllowedRoots { roots }
    }

    /// Check `raw` (the request's `field`) and return it resolved: the form
    /// the mount table uses. Nothing on disk is changed.
    pub fn check(&self, field: &'static str, raw: &str) -> Result<PathBuf, NodeError> {
        let invalid = |reason: String| NodeError::InvalidPath { field, path: raw.to_string(), reason };
        if raw.is_empty() {
            return Err(NodeError::Missing { field, hint: "" });
        }
        check_form(raw).map_err(invalid)?;
        let resolved = resolve(Path::new(raw)).map_err(|e| invalid(format!("cannot resolve it: {e}")))?;
        let roots: Vec<PathBuf> = self.roots.iter().filter_map(|r| r.canonicalize().ok()).collect();
        let Some(root) = roots.iter().find(|root| resolved.starts_with(root) && resolved != **root) else {
            let shown: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
            let via = if resolved != Path::new(raw) { format!(" (it resolves to {})", resolved.display()) } else { String::new() };
            return Err(invalid(format!(
                "it is not below an allowed root{via}; allowed: {} (the node's --allowed-root)",
                shown.join(", ")
            )));
        };
        // Below the root, the path must be what it says: a symbolic link
        // there resolves it to another path than the one written.
        let rel = resolved.strip_prefix(root).expect("checked above");
        let as_written = Path::new(raw);
        if as_written != root.join(rel) && !self.roots.iter().any(|r| as_written == r.join(rel)) {
            return Err(invalid(format!(
                "it goes through a symbolic link below {} (it resolves to {}); give the path without links",
                root.display(),
                resolved.display()
            )));
        }
        Ok(resolved)
    }

    /// The root folder holding `path` (a checked path), opened, and the
    /// rest of the path below it.
    fn locate<'a>(&self, path: &'a Path) -> Result<(OwnedFd, &'a Path), NodeError> {
        for root in self.roots.iter().filter_map(|r| r.canonicalize().ok()) {
            if let Ok(rel) = path.strip_prefix(&root) {
                if rel.as_os_str().is_empty() {
                    continue;
                }
                let fd = rustix::fs::open(&root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| NodeError::io(format!("opening allowed root {}", root.display()))(e.into()))?;
                return Ok((fd, rel));
            }
        }
        Err(NodeError::Internal { detail: format!("{} is below no allowed root", path.display()) })
    }

    /// Open `path` (a checked path) for mounting on or from, without
    /// following any symbolic link below its root.
    pub fn open(&self, path: &Path) -> Result<Pinned, NodeError> {
        let (root, rel) = self.locate(path)?;
        let fd = rustix::fs::openat2(&root, rel, OFlags::PATH | OFlags::CLOEXEC, Mode::empty(), BENEATH).map_err(|e| moved(path, e))?;
        Ok(Pinned::new(fd, path.to_path_buf()))
    }

    /// Open the folder holding `path` (a checked path), for acting on its
    /// last component only (unmounting it, say).
    pub fn open_parent_pinned<'a>(&self, path: &'a Path) -> Result<(Pinned, &'a OsStr), NodeError> {
        let (fd, name) = self.open_parent(path)?;
        let parent = path.parent().unwrap_or(path).to_path_buf();
        Ok((Pinned::new(fd, parent), name))
    }

    /// Open the folder holding `path`, and give the last component.
    fn open_parent<'a>(&self, path: &'a Path) -> Result<(OwnedFd, &'a OsStr), NodeError> {
        let (root, rel) = self.locate(path)?;
        let name = rel.file_name().ok_or_else(|| NodeError::Internal { detail: format!("{} has no name", path.display()) })?;
        let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
        let fd = match parent {
            Some(p) => rustix::fs::openat2(&root, p, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty(), BENEATH)
                .map_err(|e| moved(path, e))?,
            None => root,
        };
        Ok((fd, name))
    }

    /// Create `dir` (a checked path) and its missing parents, one
    /// component at a time from the root, remembering which were new.
    pub fn create_dirs(&self, dir: &Path, created: &mut CreatedDirs) -> Result<(), NodeError> {
        let (mut current, rel) = self.locate(dir)?;
        let mut at = dir.to_path_buf();
        for _ in rel.components() {
            at.pop();
        }
        for part in rel.components() {
            at.push(part);
            let open = |from: &OwnedFd| {
                rustix::fs::openat2(from, part.as_os_str(), OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty(), BENEATH)
            };
            current = match open(&current) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&current, part.as_os_str(), Mode::from_raw_mode(0o750)) {
                        Ok(()) => created.dirs.push(at.clone()),
                        Err(Errno::EXIST) => {}
                        Err(e) => return Err(NodeError::io(format!("creating folder {}", at.display()))(e.into())),
                    }
                    open(&current).map_err(|e| moved(&at, e))?
                }
                Err(Errno::NOTDIR) => {
                    return Err(NodeError::io(format!("creating folder {}", at.display()))(io::Error::other(
                        "it exists and is not a folder",
                    )))
                }
                Err(e) => return Err(moved(&at, e)),
            };
        }
        created.roots = Some(self.clone());
        Ok(())
    }

    /// Create `path` (a checked path) as an empty file. `false` when a
    /// regular file is there already; anything else there is refused.
    pub fn create_file(&self, field: &'static str, path: &Path) -> Result<bool, NodeError> {
        let (parent, name) = self.open_parent(path)?;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat2(&parent, name, flags, Mode::from_raw_mode(0o640), BENEATH) {
            Ok(_) => Ok(true),
            Err(Errno::EXIST) => match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => Ok(false),
                _ => Err(NodeError::InvalidPath {
                    field,
                    path: path.display().to_string(),
                    reason: "it exists and is not a regular file".into(),
                }),
            },
            Err(e) => Err(NodeError::io(format!("creating {}", path.display()))(e.into())),
        }
    }

    /// Remove the file, or the empty folder, at `path` (a checked path);
    /// one that is gone already is fine.
    pub fn remove(&self, path: &Path, folder: bool) -> io::Result<()> {
        let (parent, name) = self.open_parent(path).map_err(|e| io::Error::other(e.to_string()))?;
        let flags = if folder { AtFlags::REMOVEDIR } else { AtFlags::empty() };
        match rustix::fs::unlinkat(&parent, name, flags) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// An error for a checked path that could not be reached as checked.
fn moved(path: &Path, e: Errno) -> NodeError {
    let why = match e {
        Errno::LOOP => "a symbolic link is on the way now; nothing was done there".to_string(),
        Errno::XDEV => "it leads out of its allowed root now; nothing was done there".to_string(),
        Errno::NOSYS => "the kernel lacks openat2 (Linux 5.6 or later is needed)".to_string(),
        other => io::Error::from(other).to_string(),
    };
    NodeError::PathChanged { path: path.to_path_buf(), detail: why }
}

/// Absolute and already normal: no `.`/`..`, no `//`, no trailing `/`.
fn check_form(raw: &str) -> Result<(), String> {
    if raw.len() > MAX_PATH {
        return Err(format!("it is {} bytes long, the limit is {MAX_PATH}", raw.len()));
    }
    if raw.contains('\0') {
        return Err("it contains a NUL byte".into());
    }
    if !raw.starts_with('/') {
        return Err("it must be an absolute path".into());
    }
    let path = Path::new(raw);
    if path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err("it must not contain \".\" or \"..\" components".into());
    }
    let normal: PathBuf = path.components().collect();
    if normal.as_os_str() != OsStr::new(raw) {
        return Err(format!("it is not in normal form; write it as {}", normal.display()));
    }
    if path.parent().is_none() {
        return Err("it must not be /".into());
    }
    Ok(())
}

/// Canonicalize the longest existing prefix and append the rest (which,
/// having passed `check_form`, holds no `..` and, not existing, no links).
fn resolve(path: &Path) -> io::Result<PathBuf> {
    let mut missing: Vec<&OsStr> = Vec::new();
    let mut current = path;
    loop {
        match current.canonicalize() {
            Ok(base) => {
                let mut out = base;
                for part in missing.iter().rev() {
                    out.push(part);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (current.parent(), current.file_name()) else {
                    return Err(e);
                };
                missing.push(name);
                current = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Folders a call created (`AllowedRoots::create_dirs`), removed again
/// (deepest first, the same way they were made) unless the call succeeds
/// and calls `keep`. Only empty folders are removed.
#[derive(Default)]
pub struct CreatedDirs {
    dirs: Vec<PathBuf>,
    roots: Option<AllowedRoots>,
}

impl CreatedDirs {
    pub fn keep(mut self) {
        self.dirs.clear();
    }
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        if let Some(roots) = &self.roots {
            for d in self.dirs.iter().rev() {
                let _ = roots.remove(d, true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn roots(dir: &Path) -> AllowedRoots {
        AllowedRoots::new(vec![dir.join("kubelet")])
    }

    #[test]
    fn bad_forms_are_refused_before_looking_at_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("kubelet")).unwrap();
        let r = roots(dir.path());
        let k = dir.path().join("kubelet").display().to_string();
        for bad in [
            "relative/path".to_string(),
            format!("{k}/a/../b"),
            format!("{k}/./a"),
            format!("{k}//a"),
            format!("{k}/a/"),
            format!("{k}/a\0b"),
            "/".to_string(),
            format!("/{}", "x".repeat(5000)),
        ] {
            let e = r.check("staging_target_path", &bad).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e}");
            assert!(e.to_string().contains("staging_target_path"), "{e}");
        }
        let e = r.check("target_path", "").unwrap_err();
        assert!(matches!(e, NodeError::Missing { field: "target_path", .. }));
    }

    #[test]
    fn only_strictly_below_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("kubelet");
        std::fs::create_dir_all(k.join("pods")).unwrap();
        let r = roots(dir.path());
        let canon = k.canonicalize().unwrap();
        // Existing, and not yet existing below an existing folder.
        assert_eq!(r.check("p", k.join("pods").to_str().unwrap()).unwrap(), canon.join("pods"));
        assert_eq!(r.check("p", k.join("pods/a/b").to_str().unwrap()).unwrap(), canon.join("pods/a/b"));
        // The root itself, a sibling with a common prefix, and elsewhere.
        for bad in [k.clone(), dir.path().join("kubelet2/x"), PathBuf::from("/etc/x")] {
            let e = r.check("p", bad.to_str().unwrap()).unwrap_err();
            assert!(e.to_string().contains("not below an allowed root"), "{e}");
        }
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("kubelet");
        std::fs::create_dir_all(&k).unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), k.join("link")).unwrap();
        let r = roots(dir.path());
        let e = r.check("p", k.join("link/x").to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("resolves to"), "{e}");
        assert!(r.check("p", k.join("link").to_str().unwrap()).is_err());
    }

    #[test]
    fn a_missing_root_allows_nothing() {
        let r = AllowedRoots::new(vec![PathBuf::from("/nonexistent-cinderblock-root")]);
        assert!(r.check("p", "/nonexistent-cinderblock-root/a").is_err());
    }

    #[test]
    fn created_dirs_are_removed_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap().join("kubelet");
        std::fs::create_dir(&root).unwrap();
        let r = AllowedRoots::new(vec![root.clone()]);
        let deep = root.join("a/b/c");
        {
            let mut c = CreatedDirs::default();
            r.create_dirs(&deep, &mut c).unwrap();
            assert!(deep.is_dir());
        }
        assert!(!root.join("a").exists());
        let mut c = CreatedDirs::default();
        r.create_dirs(&deep, &mut c).unwrap();
        c.keep();
        assert!(deep.is_dir());
        // Existing folders are never removed.
        {
            let mut c = CreatedDirs::default();
            r.create_dirs(&deep.join("d"), &mut c).unwrap();
        }
        assert!(deep.is_dir() && !deep.join("d").exists());
        // Files: created once, then found; anything else refused.
        assert!(r.create_file("p", &deep.join("f")).unwrap());
        assert!(!r.create_file("p", &deep.join("f")).unwrap());
        assert!(r.create_file("p", &deep).is_err());
        r.remove(&deep.join("f"), false).unwrap();
        r.remove(&deep.join("f"), false).unwrap();
        assert!(!deep.join("f").exists());
    }

    #[test]
    fn a_symlink_below_the_root_is_refused_even_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().canonicalize().unwrap().join("kubelet");
        std::fs::create_dir_all(k.join("pods/real")).unwrap();
        std::os::unix::fs::symlink(k.join("pods/real"), k.join("pods/link")).unwrap();
        let r = AllowedRoots::new(vec![k.clone()]);
        let e = r.check("p", k.join("pods/link/x").to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(r.check("p", k.join("pods/real/x").to_str().unwrap()).is_ok());
        // A root given through a link is fine: only links below it count.
        std::os::unix::fs::symlink(&k, dir.path().join("kubelet-link")).unwrap();
        let via = AllowedRoots::new(vec![dir.path().canonicalize().unwrap().join("kubelet-link")]);
        let p = dir.path().canonicalize().unwrap().join("kubelet-link/pods/real/x");
        assert_eq!(via.check("p", p.to_str().unwrap()).unwrap(), k.join("pods/real/x"));
    }

    /// The race the pinning closes: the path is checked, then a folder on
    /// it is swapped for a link to somewhere else before the call acts.
    #[test]
    fn a_symlink_swapped_in_after_the_check_stops_every_action() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let k = base.join("kubelet");
        let outside = base.join("outside");
        std::fs::create_dir_all(k.join("pods/p1")).unwrap();
        std::fs::create_dir_all(outside.join("volumes")).unwrap();
        std::fs::write(outside.join("victim"), b"keep me").unwrap();
        let r = AllowedRoots::new(vec![k.clone()]);
        let target = r.check("target_path", k.join("pods/p1/volumes/mount").to_str().unwrap()).unwrap();
        let file = r.check("target_path", k.join("pods/p1/victim").to_str().unwrap()).unwrap();

        std::fs::remove_dir(k.join("pods/p1")).unwrap();
        std::os::unix::fs::symlink(&outside, k.join("pods/p1")).unwrap();

        let e = r.create_dirs(&target, &mut CreatedDirs::default()).unwrap_err();
        assert!(matches!(e, NodeError::PathChanged { .. }) && e.to_string().contains("symbolic link"), "{e}");
        assert!(!outside.join("volumes/mount").exists(), "a folder was made outside the root");
        assert!(matches!(r.open(&outside.join("volumes")), Err(NodeError::Internal { .. })));
        assert!(matches!(r.open(&target), Err(NodeError::PathChanged { .. })));
        assert!(r.create_file("target_path", &file).is_err());
        assert!(r.remove(&file, false).is_err());
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep me");
        // The final component swapped for a link is refused too.
        std::fs::remove_file(k.join("pods/p1")).unwrap();
        std::fs::create_dir(k.join("pods/p1")).unwrap();
        std::os::unix::fs::symlink(outside.join("volumes"), k.join("pods/p1/volumes")).unwrap();
        assert!(matches!(r.open(&k.join("pods/p1/volumes")), Err(NodeError::PathChanged { .. })));
    }

    #[test]
    fn kubelet_roots_are_the_pod_and_csi_plugin_folders() {
        let roots = kubelet_roots(Path::new("/var/lib/kubelet"));
        assert_eq!(roots, [PathBuf::from("/var/lib/kubelet/pods"), PathBuf::from("/var/lib/kubelet/plugins/kubernetes.io/csi")]);
    }
}
