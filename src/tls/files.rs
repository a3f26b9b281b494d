//! A certificate folder (`ca.crt`, `tls.crt`, `tls.key`) read again when its
//! files change: a Secret volume swapped by the kubelet, cert-manager's
//! renewal, or our own node's renewal all take effect on the next handshake.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use tracing::{info, warn};

use super::TlsError;

pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// How often the files are looked at, at most.
const RECHECK: Duration = Duration::from_secs(1);

/// One consistent reading of a certificate folder.
pub struct Material {
    pub roots: Arc<RootCertStore>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    /// Bumped on every reload, so configs built from it can be cached.
    pub generation: u64,
}

impl Material {
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
}

pub struct TlsDir {
    dir: PathBuf,
    state: Mutex<State>,
}

struct State {
    current: Arc<Material>,
    stamp: Vec<(u64, u64, i64, i64)>,
    checked: Instant,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TlsError + 'a {
    move |source| TlsError::Io { what, path: path.display().to_string(), source }
}

pub fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(io("reading", path))
}

/// Write a file so that a reader sees the old or the new content, never a
/// torn one, created with `mode` from the start (keys are never readable by
/// others, not even for an instant).
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let dir = path.parent().ok_or_else(|| TlsError::Invalid(format!("{} has no folder", path.display())))?;
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().unwrap_or_default().to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(bytes).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io("renaming into", path))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing", dir))
}

/// Write a whole certificate folder. The key goes first so that a reader
/// never pairs a new certificate with the old key for long; a reader that
/// catches the two out of step fails to load and keeps what it had.
pub fn write_tls_dir(dir: &Path, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
    write_file(&dir.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
    write_file(&dir.join(CERT_FILE), cert_pem.as_bytes(), 0o644)?;
    write_file(&dir.join(CA_FILE), ca_pem.as_bytes(), 0o644)
}

fn stamp(dir: &Path) -> Vec<(u64, u64, i64, i64)> {
    [CA_FILE, CERT_FILE, KEY_FILE]
        .iter()
        .map(|f| match std::fs::metadata(dir.join(f)) {
            Ok(m) => (m.dev(), m.ino(), m.mtime_nsec() + m.mtime() * 1_000_000_000, m.size() as i64),
            Err(_) => (0, 0, 0, -1),
        })
        .collect()
}

fn load(dir: &Path, generation: u64) -> Result<Material, TlsError> {
    let ca_path = dir.join(CA_FILE);
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let ca_pem = std::fs::read(&ca_path).map_err(io("reading", &ca_path))?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        let c = c.map_err(|e| TlsError::Invalid(format!("{}: {e}", ca_path.display())))?;
        roots.add(c).map_err(|e| TlsError::Invalid(format!("{}: {e}", ca_path.display())))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Invalid(format!("{} holds no certificate", ca_path.display())));
    }
    let cert_pem = std::fs::read(&cert_path).map_err(io("reading", &cert_path))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", cert_path.display())))?;
    if chain.is_empty() {
        return Err(TlsError::Invalid(format!("{} holds no certificate", cert_path.display())));
    }
    let key_pem = std::fs::read(&key_path).map_err(io("reading", &key_path))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid(format!("{}: {e}", key_path.display())))?;
    // The key must belong to the certificate, or every handshake would fail later.
    let signing = super::provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", key_path.display())))?;
    let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
    certified
        .keys_match()
        .map_err(|e| TlsError::Invalid(format!("{} and {} do not belong together: {e}", cert_path.display(), key_path.display())))?;
    Ok(Material { roots: Arc::new(roots), chain, key: Arc::new(key), generation })
}

impl TlsDir {
    /// Load a certificate folder; it must be complete and consistent now.
    pub fn open(dir: &Path) -> Result<Arc<TlsDir>, TlsError> {
        let current = Arc::new(load(dir, 1)?);
        Ok(Arc::new(TlsDir { dir: dir.to_path_buf(), state: Mutex::new(State { current, stamp: stamp(dir), checked: Instant::now() }) }))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The newest consistent material: re-read when the files changed. A
    /// half-written rotation keeps the previous material until it is whole.
    pub fn current(&self) -> Arc<Material> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.checked.elapsed() >= RECHECK {
            st.checked = Instant::now();
            let now = stamp(&self.dir);
            if now != st.stamp {
                match load(&self.dir, st.current.generation + 1) {
                    Ok(m) => {
                        info!(dir = %self.dir.display(), "certificates changed on disk: using the new ones");
                        st.current = Arc::new(m);
                        st.stamp = now;
                    }
                    Err(e) => {
                        warn!(dir = %self.dir.display(), error = %e, "certificates changed on disk but do not load yet; keeping the previous ones")
                    }
                }
            }
        }
        st.current.clone()
    }

    /// When the leaf certificate stops being valid, as Unix seconds.
    pub fn not_after(&self) -> Option<i64> {
        not_after(self.current().leaf())
    }
}

/// The end of a certificate's validity, as Unix seconds.
pub fn not_after(cert_der: &[u8]) -> Option<i64> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(cert_der).ok().map(|(_, c)| c.validity().not_after.timestamp())
}
