//! Staging and target paths come from the CO. Before anything is created or
//! mounted, a path must be absolute, written in normal form, and resolve
//! (symlinks followed) to somewhere strictly below one of the allowed roots.

use std::ffi::OsStr;
use std::io;
use std::path::{Component, Path, PathBuf};

use super::error::NodeError;

/// Longer paths cannot be mounted on (PATH_MAX).
const MAX_PATH: usize = 4096;

#[derive(Debug, Clone)]
pub struct AllowedRoots {
    roots: Vec<PathBuf>,
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
        if roots.iter().any(|root| resolved.starts_with(root) && resolved != *root) {
            Ok(resolved)
        } else {
            let shown: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
            let via = if resolved != Path::new(raw) {
                format!(" (it resolves to {})", resolved.display())
            } else {
                String::new()
            };
            Err(invalid(format!(
                "it is not below an allowed root{via}; allowed: {} (the node's --allowed-root)",
                shown.join(", ")
            )))
        }
    }
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

/// Folders this call created, removed again (deepest first) unless the call
/// succeeds and calls `keep`. Only empty folders are removed.
#[derive(Default)]
pub struct CreatedDirs {
    dirs: Vec<PathBuf>,
}

impl CreatedDirs {
    /// Create `dir` and any missing parents, remembering which were new.
    pub fn create(&mut self, dir: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        for a in dir.ancestors() {
            match std::fs::symlink_metadata(a) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(a.to_path_buf()),
                Err(e) => return Err(e),
            }
        }
        for d in missing.into_iter().rev() {
            match std::fs::create_dir(&d) {
                Ok(()) => self.dirs.push(d),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn keep(mut self) {
        self.dirs.clear();
    }
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
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
        let deep = dir.path().join("a/b/c");
        {
            let mut c = CreatedDirs::default();
            c.create(&deep).unwrap();
            assert!(deep.is_dir());
        }
        assert!(!dir.path().join("a").exists());
        let mut c = CreatedDirs::default();
        c.create(&deep).unwrap();
        c.keep();
        assert!(deep.is_dir());
        // Existing folders are never removed.
        {
            let mut c = CreatedDirs::default();
            c.create(&deep.join("d")).unwrap();
        }
        assert!(deep.is_dir() && !deep.join("d").exists());
    }
}
