//! Kernel TLS for the kernel attach engine. The NBD handshake, STARTTLS
//! included, runs in userspace over rustls; then the session's traffic keys
//! and record sequence numbers are installed on the TCP socket (the `tls`
//! upper-layer protocol, `SOL_TLS` `TLS_TX` and `TLS_RX`), and the socket is
//! handed to the nbd driver, whose plain `sendmsg`/`recvmsg` the kernel
//! encrypts and decrypts from there on.
//!
//! What the kernel can take: TLS 1.3 with AES-GCM (128 or 256), the suites
//! our client offers on this path; application-data records only (a
//! handshake record after the hand-over, a session ticket or a key update,
//! fails the connection, so the export server sends no tickets).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

// linux/tls.h
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;

/// One direction's keys, as the kernel's `tls12_crypto_info_aes_gcm_*`
/// wants them (the same structs serve TLS 1.3).
pub struct DirectionKeys {
    /// 16 (AES-128-GCM) or 32 (AES-256-GCM) bytes.
    key: Vec<u8>,
    /// The 12-byte TLS 1.3 IV: the kernel calls its first 4 bytes the salt.
    iv: [u8; 12],
    /// Sequence number of the next record in this direction.
    seq: u64,
}

impl Drop for DirectionKeys {
    fn drop(&mut self) {
        self.key.fill(0);
        self.iv.fill(0);
    }
}

impl DirectionKeys {
    fn from_rustls((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<DirectionKeys, String> {
        let (key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } | ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (key, iv),
            _ => return Err("the TLS session uses a cipher the kernel path does not take (AES-GCM only)".into()),
        };
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| "a TLS IV that is not 12 bytes".to_string())?;
        Ok(DirectionKeys { key: key.as_ref().to_vec(), iv, seq })
    }

    /// `struct tls12_crypto_info_aes_gcm_{128,256}`: version, cipher,
    /// iv (8), key, salt (4), rec_seq (8, big-endian).
    fn crypto_info(&self) -> Result<Vec<u8>, String> {
        let cipher = match self.key.len() {
            16 => TLS_CIPHER_AES_GCM_128,
            32 => TLS_CIPHER_AES_GCM_256,
            n => return Err(format!("an AES-GCM key of {n} bytes")),
        };
        let mut b = Vec::with_capacity(56);
        b.extend_from_slice(&TLS_1_3_VERSION.to_ne_bytes());
        b.extend_from_slice(&cipher.to_ne_bytes());
        b.extend_from_slice(&self.iv[4..]);
        b.extend_from_slice(&self.key);
        b.extend_from_slice(&self.iv[..4]);
        b.extend_from_slice(&self.seq.to_be_bytes());
        Ok(b)
    }
}

/// Both directions of a session, from the client's side.
pub struct SessionKeys {
    pub tx: DirectionKeys,
    pub rx: DirectionKeys,
}

impl SessionKeys {
    pub fn from_rustls(s: ExtractedSecrets) -> Result<SessionKeys, String> {
        Ok(SessionKeys { tx: DirectionKeys::from_rustls(s.tx)?, rx: DirectionKeys::from_rustls(s.rx)? })
    }
}

fn setsockopt(fd: &impl AsFd, level: libc::c_int, name: libc::c_int, value: &[u8]) -> io::Result<()> {
    // SAFETY: setsockopt reads `value.len()` bytes from a valid buffer.
    let r = unsafe {
        libc::setsockopt(fd.as_fd().as_raw_fd(), level, name, value.as_ptr() as *const libc::c_void, value.len() as libc::socklen_t)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error("this kernel has no kernel TLS (setsockopt TCP_ULP \"tls\": {0}); load the tls module (modprobe tls)")]
    NoUlp(io::Error),
    #[error("the kernel refused the TLS {direction} keys ({error}); it may lack AES-GCM (modprobe gcm aesni_intel)")]
    Keys { direction: &'static str, error: io::Error },
    #[error("{0}")]
    Session(String),
}

/// Put a connected TCP socket under kernel TLS with `keys`. After this the
/// socket carries plain bytes for its users and TLS records on the wire.
pub fn install(socket: &impl AsFd, keys: &SessionKeys) -> Result<(), KtlsError> {
    setsockopt(socket, libc::SOL_TCP, libc::TCP_ULP, b"tls").map_err(KtlsError::NoUlp)?;
    let tx = keys.tx.crypto_info().map_err(KtlsError::Session)?;
    setsockopt(socket, libc::SOL_TLS, TLS_TX, &tx).map_err(|error| KtlsError::Keys { direction: "transmit", error })?;
    let rx = keys.rx.crypto_info().map_err(KtlsError::Session)?;
    setsockopt(socket, libc::SOL_TLS, TLS_RX, &rx).map_err(|error| KtlsError::Keys { direction: "receive", error })?;
    Ok(())
}

/// Whether kernel TLS works here: two loopback sockets put under kernel TLS
/// with matching keys, one record sent across and read back. Blocking.
pub fn probe() -> Result<(), KtlsError> {
    let fail = |e: io::Error| KtlsError::Session(format!("kernel TLS self-test on loopback: {e}"));
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).map_err(fail)?;
    let mut a = std::net::TcpStream::connect(listener.local_addr().map_err(fail)?).map_err(fail)?;
    let (mut b, _) = listener.accept().map_err(fail)?;
    let keys = |k: u8, seq: u64| DirectionKeys { key: vec![k; 16], iv: [k ^ 0x5a; 12], seq };
    install(&a, &SessionKeys { tx: keys(1, 7), rx: keys(2, 0) })?;
    install(&b, &SessionKeys { tx: keys(2, 0), rx: keys(1, 7) })?;
    b.set_read_timeout(Some(Duration::from_secs(5))).map_err(fail)?;
    let hello = b"cinderblock kernel TLS self-test";
    a.write_all(hello).map_err(fail)?;
    let mut got = [0u8; 32];
    b.read_exact(&mut got).map_err(fail)?;
    if &got != hello {
        return Err(KtlsError::Session("kernel TLS self-test: the record read back differs from the one sent".into()));
    }
    Ok(())
}

/// A client configuration for the kernel path: TLS 1.3 with AES-GCM only
/// (what the kernel takes), and secret extraction on, from the folder's
/// current certificates.
pub fn client_config(dir: &crate::tls::TlsDir) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![cipher_suite::TLS13_AES_256_GCM_SHA384, cipher_suite::TLS13_AES_128_GCM_SHA256],
        ..default_provider()
    };
    let m = dir.current();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(m.roots.clone())
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?;
    cfg.enable_secret_extraction = true;
    // No resumption: a ticket is of no use to a session the kernel carries on.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_info_has_the_kernel_layout() {
        let mut iv = [0u8; 12];
        iv.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let k = DirectionKeys { key: vec![0xaa; 16], iv, seq: 0x0102 };
        let b = k.crypto_info().unwrap();
        assert_eq!(b.len(), 40, "sizeof(struct tls12_crypto_info_aes_gcm_128)");
        assert_eq!(&b[0..2], &0x0304u16.to_ne_bytes());
        assert_eq!(&b[2..4], &51u16.to_ne_bytes());
        assert_eq!(&b[4..12], &iv[4..], "iv: the last 8 bytes");
        assert_eq!(&b[12..28], &[0xaa; 16]);
        assert_eq!(&b[28..32], &iv[..4], "salt: the first 4 bytes");
        assert_eq!(&b[32..40], &[0, 0, 0, 0, 0, 0, 1, 2], "record sequence, big-endian");
        let k = DirectionKeys { key: vec![0xbb; 32], iv, seq: 0 };
        assert_eq!(k.crypto_info().unwrap().len(), 56, "sizeof(struct tls12_crypto_info_aes_gcm_256)");
    }

    #[test]
    fn probe_answers_either_way() {
        // This development machine's kernel has no tls module; a guest with
        // one passes (scripts/vm/nbd-kernel-test.sh).
        match probe() {
            Ok(()) | Err(KtlsError::NoUlp(_)) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }

    /// The hand-over without a kernel that has TLS (this machine): a real
    /// server with a node's certificate folder, our handshake up to GO, and
    /// then the kernel's part played here: records sealed and opened with
    /// the extracted keys from the extracted sequence numbers, on the bare
    /// socket. A write and a read go through; any byte left in rustls, a
    /// ticket after GO or a wrong sequence number would fail to decrypt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn extracted_keys_carry_on_the_session_on_the_bare_socket() {
        use crate::export::{Access, ExportName, ExportServer, ExportSpec, ImageSource, Limits};
        use crate::tls::{authority, Peer, TlsDir};
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        authority::ensure_local_pki(&pki, &[Peer::Node("own".into()), Peer::Node("con".into())]).unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
        let own = TlsDir::open(&authority::local_peer_dir(&pki, &Peer::Node("own".into()))).unwrap();
        let server = ExportServer::new(Some(crate::export::node_tls(own)), Limits::default());
        let name = ExportName::random();
        let access = Access { node: "con".into(), plain_from: vec![] };
        let spec =
            ExportSpec { name, volume: "vol-k".into(), image: ImageSource::Path(image.clone()), read_only: false, access, changes: None };
        server.add(spec).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let s = server.clone();
        tokio::spawn(async move { s.serve(listener, std::future::pending()).await });

        let con = TlsDir::open(&authority::local_peer_dir(&pki, &Peer::Node("con".into()))).unwrap();
        let tls = crate::attach::nbd::kernel_tls_to_node(&con, "own").unwrap();
        let target = crate::attach::nbd::Target { address: address.clone(), export: name.to_string(), tls: Some(tls) };
        let tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
        let sock = crate::attach::nbd::client::handshake_for_kernel(tcp, &target).await.unwrap();
        assert_eq!(sock.info.size, 1 << 20);
        let keys = sock.keys.expect("TLS keys");
        assert!(keys.tx.seq > 0 && keys.rx.seq > 0, "options went over TLS: tx {} rx {}", keys.tx.seq, keys.rx.seq);
        let tcp = sock.tcp.into_std().unwrap();
        tcp.set_nonblocking(false).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let replies = tokio::task::spawn_blocking(move || {
            let mut tcp = tcp;
            let (mut tx_seq, mut rx_seq) = (keys.tx.seq, keys.rx.seq);
            let request = |kind: u16, handle: u64, offset: u64, len: u32| {
                let mut r = Vec::new();
                r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
                r.extend_from_slice(&0u16.to_be_bytes());
                r.extend_from_slice(&kind.to_be_bytes());
                r.extend_from_slice(&handle.to_be_bytes());
                r.extend_from_slice(&offset.to_be_bytes());
                r.extend_from_slice(&len.to_be_bytes());
                r
            };
            let mut write = request(1, 1, 8192, 4096);
            write.extend_from_slice(&data);
            let mut send = |tcp: &mut std::net::TcpStream, plain: Vec<u8>| {
                tcp.write_all(&seal(&keys.tx, tx_seq, &plain)).unwrap();
                tx_seq += 1;
            };
            send(&mut tcp, write);
            send(&mut tcp, request(3, 2, 0, 0));
            // Replies in the order their I/O completed: 16 bytes each, the
            // read's followed by its 4096 bytes. The read goes out once the
            // write and the flush are answered (NBD orders nothing in flight).
            let mut got = Vec::new();
            let mut receive = |tcp: &mut std::net::TcpStream, until: usize| {
                while got.len() < until {
                    let mut header = [0u8; 5];
                    tcp.read_exact(&mut header).unwrap();
                    let mut body = vec![0u8; u16::from_be_bytes([header[3], header[4]]) as usize];
                    tcp.read_exact(&mut body).unwrap();
                    got.extend_from_slice(&open(&keys.rx, rx_seq, &header, body));
                    rx_seq += 1;
                }
            };
            receive(&mut tcp, 32);
            send(&mut tcp, request(0, 3, 8192, 4096));
            receive(&mut tcp, 48 + 4096);
            (got, data)
        })
        .await
        .unwrap();
        let (got, data) = replies;
        let (mut at, mut handles, mut read) = (0, vec![], None);
        while at < got.len() {
            assert_eq!(&got[at..at + 4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
            let handle = u64::from_be_bytes(got[at + 8..at + 16].try_into().unwrap());
            assert_eq!(&got[at + 4..at + 8], &[0, 0, 0, 0], "no error for handle {handle}");
            handles.push(handle);
            at += 16;
            if handle == 3 {
                read = Some(got[at..at + 4096].to_vec());
                at += 4096;
            }
        }
        handles.sort();
        assert_eq!(handles, [1, 2, 3]);
        let read = read.unwrap();
        assert_eq!(read, data, "the read returns what the write stored");
        let on_disk = std::fs::read(&image).unwrap();
        assert_eq!(&on_disk[8192..8192 + 4096], &data[..], "the image holds the write");
    }

    fn aead_key(k: &DirectionKeys) -> ring::aead::LessSafeKey {
        let alg = if k.key.len() == 16 { &ring::aead::AES_128_GCM } else { &ring::aead::AES_256_GCM };
        ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(alg, &k.key).unwrap())
    }

    fn nonce(k: &DirectionKeys, seq: u64) -> ring::aead::Nonce {
        let mut n = k.iv;
        for (i, b) in seq.to_be_bytes().iter().enumerate() {
            n[4 + i] ^= b;
        }
        ring::aead::Nonce::assume_unique_for_key(n)
    }

    /// One TLS 1.3 application-data record, as kernel TLS would send it.
    fn seal(k: &DirectionKeys, seq: u64, plain: &[u8]) -> Vec<u8> {
        let mut inner = plain.to_vec();
        inner.push(0x17);
        let len = (inner.len() + 16) as u16;
        let header = [0x17, 3, 3, (len >> 8) as u8, len as u8];
        aead_key(k).seal_in_place_append_tag(nonce(k, seq), ring::aead::Aad::from(header), &mut inner).unwrap();
        [&header[..], &inner].concat()
    }

    /// The plaintext of one received record, which must be application data.
    fn open(k: &DirectionKeys, seq: u64, header: &[u8; 5], mut body: Vec<u8>) -> Vec<u8> {
        assert_eq!(header[0], 0x17, "outer type of a TLS 1.3 record");
        let plain = aead_key(k).open_in_place(nonce(k, seq), ring::aead::Aad::from(*header), &mut body).expect("record decrypts");
        let end = plain.iter().rposition(|&b| b != 0).expect("a content type");
        assert_eq!(plain[end], 0x17, "application data, not a handshake message (a ticket, a key update)");
        plain[..end].to_vec()
    }
}
