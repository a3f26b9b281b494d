//! The cluster certificate authority: makes the CA, issues node and
//! controller certificates, and signs a node's certificate request with the
//! name the caller vouches for (never the names the request asks for).

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use super::{files, Peer, TlsError};

/// How long a CA lives; certificates it issues live `LEAF_VALIDITY` by default.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

pub struct Authority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn err(e: rcgen::Error) -> TlsError {
    TlsError::Authority(e.to_string())
}

fn window(validity: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack before now for clocks that lag behind the issuer's.
    (now - time::Duration::minutes(5), now + time::Duration::seconds(validity.as_secs() as i64))
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // a positive number
    SerialNumber::from_slice(&bytes)
}

/// What a leaf certificate for `peer` says: its name, and what it may be used for.
fn leaf_params(peer: &Peer, validity: Duration) -> Result<CertificateParams, TlsError> {
    let name = peer.dns_name()?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name.clone());
    dn.push(DnType::OrganizationName, "cinderblock");
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::DnsName(name.try_into().map_err(err)?)];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = match peer {
        // The controller calls agents, and its leader serves its standbys
        // (controller/forward.rs).
        Peer::Controller => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        // A node serves (agent API, NBD exports) and calls (NBD as consumer).
        Peer::Node(_) => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
    };
    p.is_ca = IsCa::ExplicitNoCa;
    (p.not_before, p.not_after) = window(validity);
    p.serial_number = Some(serial());
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// A fresh key and a certificate request for it (the node side of signing).
pub fn certificate_request(peer: &Peer) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(err)?;
    // A request says only who asks; the signer decides the rest.
    let name = peer.dns_name()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name.clone());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(name.try_into().map_err(err)?)];
    let csr = params.serialize_request(&key).map_err(err)?;
    Ok((csr.pem().map_err(err)?, key.serialize_pem()))
}

impl Authority {
    /// A new self-signed CA.
    pub fn generate(common_name: &str) -> Result<Authority, TlsError> {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "cinderblock");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        (p.not_before, p.not_after) = window(CA_VALIDITY);
        p.serial_number = Some(serial());
        let cert = p.self_signed(&key).map_err(err)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Authority::from_pem(&cert_pem, &key_pem)
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::Authority(format!("CA key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| TlsError::Authority(format!("CA certificate: {e}")))?;
        Ok(Authority { cert_pem: cert_pem.to_string(), key_pem: key_pem.to_string(), issuer })
    }

    /// Read `ca.crt` and `ca.key` from a folder.
    pub fn load(dir: &Path) -> Result<Authority, TlsError> {
        let cert = files::read_text(&dir.join("ca.crt"))?;
        let key = files::read_text(&dir.join("ca.key"))?;
        Authority::from_pem(&cert, &key)
    }

    /// Write `ca.crt` and `ca.key` (mode 0600) into a folder.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        files::write_file(&dir.join("ca.key"), self.key_pem.as_bytes(), 0o600)?;
        files::write_file(&dir.join("ca.crt"), self.cert_pem.as_bytes(), 0o644)
    }

    /// The CA's certificate (what every peer trusts).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A new key and certificate for `peer`: (certificate PEM, key PEM).
    pub fn issue(&self, peer: &Peer, validity: Duration) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(err)?;
        let cert = leaf_params(peer, validity)?.signed_by(&key, &self.issuer).map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Sign a certificate request for `peer`, whose identity the caller has
    /// established by other means. The request contributes only its public
    /// key (its signature is checked); names and uses come from `peer`.
    pub fn sign_request(&self, csr_pem: &str, peer: &Peer, validity: Duration) -> Result<String, TlsError> {
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| TlsError::Invalid(format!("certificate request: {e}")))?;
        csr.params = leaf_params(peer, validity)?;
        Ok(csr.signed_by(&self.issuer).map_err(err)?.pem())
    }

    /// Issue a certificate for `peer` into a certificate folder (`ca.crt`,
    /// `tls.crt`, `tls.key`), the layout every cinderblock process reads.
    pub fn issue_into(&self, peer: &Peer, validity: Duration, dir: &Path) -> Result<(), TlsError> {
        let (cert, key) = self.issue(peer, validity)?;
        files::write_tls_dir(dir, &self.cert_pem, &cert, &key)
    }
}

/// A CA and certificates kept in one folder, for a single machine (the
/// standalone mode and tests): `<dir>/ca.crt`, `<dir>/ca.key`, and a
/// certificate folder per peer, `<dir>/controller/` and `<dir>/<node-id>/`.
/// Existing material is kept; a peer's certificate is issued again when it
/// is missing, from another CA, or within a third of its life of expiring.
pub fn ensure_local_pki(dir: &Path, peers: &[Peer]) -> Result<(), TlsError> {
    let ca = if dir.join("ca.key").exists() {
        Authority::load(dir)?
    } else {
        let ca = Authority::generate("cinderblock local CA")?;
        ca.save(dir)?;
        ca
    };
    for peer in peers {
        let sub = dir.join(match peer {
            Peer::Controller => "controller".to_string(),
            Peer::Node(id) => id.clone(),
        });
        let fresh = std::fs::read_to_string(sub.join(files::CA_FILE)).is_ok_and(|c| c == ca.cert_pem())
            && std::fs::read(sub.join(files::CERT_FILE)).ok().and_then(|pem| {
                let der = rustls_pki_types::pem::PemObject::from_pem_slice(&pem).ok()?;
                let der: rustls_pki_types::CertificateDer<'static> = der;
                let left = files::not_after(&der)? - time::OffsetDateTime::now_utc().unix_timestamp();
                Some(left > LEAF_VALIDITY.as_secs() as i64 / 3 && super::peers_of(&der).contains(peer))
            }) == Some(true);
        if !fresh {
            ca.issue_into(peer, LEAF_VALIDITY, &sub)?;
        }
    }
    Ok(())
}

/// The certificate folder `ensure_local_pki` made for `peer`.
pub fn local_peer_dir(dir: &Path, peer: &Peer) -> std::path::PathBuf {
    dir.join(match peer {
        Peer::Controller => "controller",
        Peer::Node(id) => id.as_str(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_request_carries_the_vouched_name_not_the_requested_one() {
        let ca = Authority::generate("test CA").unwrap();
        // node-b asks for a certificate naming node-a...
        let (csr, _key) = certificate_request(&Peer::Node("node-a".into())).unwrap();
        // ...but the signer knows the caller is node-b.
        let cert = ca.sign_request(&csr, &Peer::Node("node-b".into()), LEAF_VALIDITY).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c)
            .unwrap();
        assert_eq!(super::super::peers_of(&der), vec![Peer::Node("node-b".into())]);
    }

    #[test]
    fn a_tampered_request_is_refused() {
        let ca = Authority::generate("test CA").unwrap();
        let (csr, _) = certificate_request(&Peer::Node("node-a".into())).unwrap();
        let mut bytes = csr.into_bytes();
        let mid = bytes.len() / 2;
        bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert!(ca.sign_request(&tampered, &Peer::Node("node-a".into()), LEAF_VALIDITY).is_err());
    }
}
