//! Our NBD client: fixed newstyle handshake (STARTTLS first when TLS is
//! asked for, structured replies, base:allocation, GO with block sizes),
//! then concurrent requests on one connection, matched to replies by handle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::export::proto::{self, *};

/// Byte streams the client speaks over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    /// The name the server's certificate must carry.
    pub server_name: ServerName<'static>,
}

#[derive(Clone)]
pub struct Target {
    /// host:port
    pub address: String,
    pub export: String,
    pub tls: Option<ClientTls>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("address", &self.address).field("tls", &self.tls.is_some()).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot reach NBD server {address}: {error}")]
    Connect { address: String, error: std::io::Error },
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("the NBD server refused option {option}: {reply:#x} {message}")]
    Refused { option: u32, reply: u32, message: String },
    #[error("TLS with the NBD server failed: {0}")]
    Tls(String),
    #[error("the NBD server answered {command} with error {errno}{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Server { command: &'static str, errno: u32, message: String },
    #[error("the NBD connection is closed")]
    Closed,
    #[error("the NBD server does not support {0}")]
    Unsupported(&'static str),
}

impl NbdError {
    /// Whether a new connection might succeed where this one failed (the
    /// server restarted, the network broke) as opposed to an answer.
    pub fn is_connection_loss(&self) -> bool {
        matches!(self, NbdError::Io(_) | NbdError::Closed | NbdError::Connect { .. } | NbdError::Tls(_))
            || matches!(self, NbdError::Server { errno: proto::ESHUTDOWN, .. })
            || matches!(self, NbdError::Refused { reply: proto::REP_ERR_SHUTDOWN, .. })
    }
}

/// What the handshake learnt about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    pub structured: bool,
    pub block_status: bool,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }
    pub fn can_multi_conn(&self) -> bool {
        self.flags & FLAG_CAN_MULTI_CONN != 0
    }
}

/// Open a TCP connection and negotiate; returns the stream in transmission
/// phase. `structured`: ask for structured replies and base:allocation (a
/// kernel client must not: it speaks simple replies only).
pub async fn handshake(target: &Target, structured: bool, timeout: Duration) -> Result<(Box<dyn Stream>, ExportInfo), NbdError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&target.address))
        .await
        .map_err(|_| NbdError::Connect { address: target.address.clone(), error: std::io::ErrorKind::TimedOut.into() })?
        .map_err(|error| NbdError::Connect { address: target.address.clone(), error })?;
    let _ = tcp.set_nodelay(true);
    // A server that took the connection but not the handshake in time (one
    // starting, or overloaded) is unreachable for now, like one that refused
    // it: a reconnect tries again rather than failing the device's I/O.
    tokio::time::timeout(timeout, negotiate(Box::new(tcp), target, structured)).await.map_err(|_| NbdError::Connect {
        address: target.address.clone(),
        error: std::io::Error::new(std::io::ErrorKind::TimedOut, format!("the handshake took longer than {timeout:?}")),
    })?
}

/// A socket for the kernel's nbd driver: in transmission phase, and under
/// TLS the session's keys to install with kernel TLS.
pub struct KernelSocket {
    pub tcp: TcpStream,
    /// None: plain text.
    pub keys: Option<super::ktls::SessionKeys>,
    pub info: ExportInfo,
}

/// The handshake on a connected TCP stream for the kernel driver (simple
/// replies only). With TLS: STARTTLS, the rustls handshake (the target's
/// config must allow secret extraction: `ktls::client_config`), the option
/// haggling up to GO's reply over it, then the session taken apart, so the
/// kernel can carry it on. Nothing may be left in rustls at that point: our
/// server sends nothing between GO's reply and the first request, and a
/// leftover is refused here rather than lost.
pub async fn handshake_for_kernel(mut tcp: TcpStream, target: &Target) -> Result<KernelSocket, NbdError> {
    greet(&mut tcp).await?;
    let Some(tls) = &target.tls else {
        let info = options(&mut tcp, target, false).await?;
        return Ok(KernelSocket { tcp, keys: None, info });
    };
    starttls_option(&mut tcp).await?;
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let mut s = connector.connect(tls.server_name.clone(), tcp).await.map_err(|e| NbdError::Tls(e.to_string()))?;
    let info = options(&mut s, target, false).await?;
    s.flush().await?;
    let (tcp, mut conn) = s.into_inner();
    let state = conn.process_new_packets().map_err(|e| NbdError::Tls(e.to_string()))?;
    if state.plaintext_bytes_to_read() > 0 || state.tls_bytes_to_write() > 0 || state.peer_has_closed() {
        return Err(NbdError::Protocol(format!(
            "the TLS session is not idle after GO ({} bytes from the server unread, {} bytes to send): it cannot be handed to the kernel",
            state.plaintext_bytes_to_read(),
            state.tls_bytes_to_write()
        )));
    }
    let secrets = conn.dangerous_extract_secrets().map_err(|e| NbdError::Tls(format!("extracting the session keys: {e}")))?;
    let keys = super::ktls::SessionKeys::from_rustls(secrets).map_err(NbdError::Tls)?;
    Ok(KernelSocket { tcp, keys: Some(keys), info })
}

async fn negotiate(mut s: Box<dyn Stream>, target: &Target, structured: bool) -> Result<(Box<dyn Stream>, ExportInfo), NbdError> {
    greet(&mut s).await?;
    let mut s = start_tls(s, target).await?;
    let info = options(&mut s, target, structured).await?;
    Ok((s, info))
}

/// STARTTLS as the first option when the target asks for TLS; no TLS, no
/// session (a refusal is an error, never a silent plain-text fallback).
async fn start_tls(mut s: Box<dyn Stream>, target: &Target) -> Result<Box<dyn Stream>, NbdError> {
    let Some(tls) = &target.tls else { return Ok(s) };
    starttls_option(&mut s).await?;
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let tls_stream = connector.connect(tls.server_name.clone(), s).await.map_err(|e| NbdError::Tls(e.to_string()))?;
    Ok(Box::new(tls_stream))
}

/// NBD_OPT_STARTTLS and its acknowledgement; the TLS handshake comes next.
async fn starttls_option<S: Stream + ?Sized>(s: &mut S) -> Result<(), NbdError> {
    send_option(s, OPT_STARTTLS, &[]).await?;
    let (reply, payload) = read_option_reply(s, OPT_STARTTLS).await?;
    if reply != REP_ACK {
        return Err(refused(OPT_STARTTLS, reply, &payload));
    }
    Ok(())
}

async fn greet<S: Stream + ?Sized>(s: &mut S) -> Result<(), NbdError> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await?;
    if be64(&hello[0..8]) != INIT_MAGIC || be64(&hello[8..16]) != OPT_MAGIC {
        return Err(NbdError::Protocol("not an NBD newstyle server".into()));
    }
    let flags = be16(&hello[16..18]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol("the server does not speak fixed newstyle".into()));
    }
    let mut client = FLAG_C_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        client |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&client.to_be_bytes()).await?;
    Ok(())
}

async fn options<S: Stream + ?Sized>(s: &mut S, target: &Target, structured: bool) -> Result<ExportInfo, NbdError> {
    let mut sr = false;
    let mut meta = false;
    if structured {
        send_option(s, OPT_STRUCTURED_REPLY, &[]).await?;
        let (reply, _) = read_option_reply(s, OPT_STRUCTURED_REPLY).await?;
        sr = reply == REP_ACK;
        if sr {
            let mut p = Vec::new();
            p.extend_from_slice(&(target.export.len() as u32).to_be_bytes());
            p.extend_from_slice(target.export.as_bytes());
            p.extend_from_slice(&1u32.to_be_bytes());
            p.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
            p.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            send_option(s, OPT_SET_META_CONTEXT, &p).await?;
            loop {
                let (reply, payload) = read_option_reply(s, OPT_SET_META_CONTEXT).await?;
                match reply {
                    REP_META_CONTEXT if payload.len() >= 4 && &payload[4..] == META_BASE_ALLOCATION.as_bytes() => meta = true,
                    REP_META_CONTEXT => {}
                    REP_ACK => break,
                    // An error here is not fatal: we do without block status.
                    _ => break,
                }
            }
        }
    }
    let mut p = Vec::new();
    p.extend_from_slice(&(target.export.len() as u32).to_be_bytes());
    p.extend_from_slice(target.export.as_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &p).await?;
    let mut info =
        ExportInfo { size: 0, flags: 0, min_block: 1, preferred_block: 4096, max_block: 32 << 20, structured: sr, block_status: meta };
    let mut have_export = false;
    loop {
        let (reply, payload) = read_option_reply(s, OPT_GO).await?;
        match reply {
            REP_INFO if payload.len() >= 2 => match be16(&payload[0..2]) {
                INFO_EXPORT if payload.len() == 12 => {
                    info.size = be64(&payload[2..10]);
                    info.flags = be16(&payload[10..12]);
                    have_export = true;
                }
                INFO_BLOCK_SIZE if payload.len() == 14 => {
                    info.min_block = be32(&payload[2..6]);
                    info.preferred_block = be32(&payload[6..10]);
                    info.max_block = be32(&payload[10..14]);
                }
                _ => {}
            },
            REP_INFO => return Err(NbdError::Protocol("short NBD_REP_INFO".into())),
            REP_ACK if have_export => return Ok(info),
            REP_ACK => return Err(NbdError::Protocol("GO acknowledged without NBD_INFO_EXPORT".into())),
            _ => return Err(refused(OPT_GO, reply, &payload)),
        }
    }
}

fn refused(option: u32, reply: u32, payload: &[u8]) -> NbdError {
    NbdError::Refused { option, reply, message: String::from_utf8_lossy(payload).into_owned() }
}

async fn send_option<S: Stream + ?Sized>(s: &mut S, option: u32, data: &[u8]) -> Result<(), NbdError> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await?;
    s.flush().await?;
    Ok(())
}

async fn read_option_reply<S: Stream + ?Sized>(s: &mut S, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await?;
    if be64(&h[0..8]) != REP_MAGIC || be32(&h[8..12]) != option {
        return Err(NbdError::Protocol("bad option reply header".into()));
    }
    let len = be32(&h[16..20]);
    if len > 1 << 20 {
        return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await?;
    Ok((be32(&h[12..16]), payload))
}

/// Export names a server lists to us.
pub async fn list_exports(target: &Target) -> Result<Vec<String>, NbdError> {
    let tcp = TcpStream::connect(&target.address).await.map_err(|error| NbdError::Connect { address: target.address.clone(), error })?;
    let mut s: Box<dyn Stream> = Box::new(tcp);
    greet(&mut s).await?;
    let mut s = start_tls(s, target).await?;
    send_option(&mut s, OPT_LIST, &[]).await?;
    let mut names = Vec::new();
    loop {
        let (reply, payload) = read_option_reply(&mut s, OPT_LIST).await?;
        match reply {
            REP_SERVER if payload.len() >= 4 => {
                let n = (be32(&payload[0..4]) as usize).min(payload.len() - 4);
                names.push(String::from_utf8_lossy(&payload[4..4 + n]).into_owned());
            }
            REP_ACK => break,
            _ => return Err(refused(OPT_LIST, reply, &payload)),
        }
    }
    send_option(&mut s, OPT_ABORT, &[]).await?;
    Ok(names)
}

// ------------------------------------------------------------ transmission

enum Pending {
    Read { buf: Vec<u8>, offset: u64, error: Option<(u32, String)>, tx: oneshot::Sender<Result<Vec<u8>, NbdError>> },
    Other { command: u16, extents: Vec<(u32, u32)>, error: Option<(u32, String)>, tx: oneshot::Sender<Result<Vec<(u32, u32)>, NbdError>> },
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    closed: AtomicBool,
}

/// A connected client. Cheap to share: requests from many tasks go out on
/// one connection and their replies come back in any order.
pub struct Client {
    info: ExportInfo,
    writer: tokio::sync::Mutex<BufWriter<WriteHalf<Box<dyn Stream>>>>,
    shared: Arc<Shared>,
    next_handle: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    pub async fn connect(target: &Target, timeout: Duration) -> Result<Client, NbdError> {
        let (stream, info) = handshake(target, true, timeout).await?;
        Ok(Client::start(stream, info))
    }

    /// Take over a stream already in transmission phase.
    pub fn start(stream: Box<dyn Stream>, info: ExportInfo) -> Client {
        let (rd, wr) = tokio::io::split(stream);
        let shared = Arc::new(Shared { pending: Mutex::new(HashMap::new()), closed: AtomicBool::new(false) });
        let reader = tokio::spawn(read_replies(BufReader::with_capacity(256 * 1024, rd), shared.clone(), info.structured));
        Client {
            info,
            writer: tokio::sync::Mutex::new(BufWriter::with_capacity(256 * 1024, wr)),
            shared,
            next_handle: AtomicU64::new(1),
            reader,
        }
    }

    pub fn info(&self) -> ExportInfo {
        self.info
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    async fn send(&self, kind: u16, flags: u16, offset: u64, length: u32, payload: &[u8], pending: Pending) -> Result<(), NbdError> {
        if self.is_closed() {
            return Err(NbdError::Closed);
        }
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.shared.pending.lock().unwrap().insert(handle, pending);
        let header = RequestHeader { flags, kind, handle, offset, length }.encode();
        let mut w = self.writer.lock().await;
        let r = async {
            w.write_all(&header).await?;
            w.write_all(payload).await?;
            w.flush().await
        }
        .await;
        if let Err(e) = r {
            self.shared.pending.lock().unwrap().remove(&handle);
            self.shared.closed.store(true, Ordering::Release);
            return Err(e.into());
        }
        Ok(())
    }

    async fn call(&self, kind: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> Result<Vec<(u32, u32)>, NbdError> {
        let (tx, rx) = oneshot::channel();
        self.send(kind, flags, offset, length, payload, Pending::Other { command: kind, extents: Vec::new(), error: None, tx }).await?;
        rx.await.map_err(|_| NbdError::Closed)?
    }

    pub async fn read(&self, offset: u64, length: u32) -> Result<Vec<u8>, NbdError> {
        let (tx, rx) = oneshot::channel();
        let pending = Pending::Read { buf: vec![0u8; length as usize], offset, error: None, tx };
        self.send(CMD_READ, 0, offset, length, &[], pending).await?;
        rx.await.map_err(|_| NbdError::Closed)?
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let flags = if fua && self.info.flags & FLAG_SEND_FUA != 0 { CMD_FLAG_FUA } else { 0 };
        self.call(CMD_WRITE, flags, offset, data.len() as u32, data).await.map(drop)
    }

    pub async fn flush(&self) -> Result<(), NbdError> {
        if self.info.flags & FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.call(CMD_FLUSH, 0, 0, 0, &[]).await.map(drop)
    }

    pub async fn trim(&self, offset: u64, length: u32) -> Result<(), NbdError> {
        if self.info.flags & FLAG_SEND_TRIM == 0 {
            return Err(NbdError::Unsupported("trim"));
        }
        self.call(CMD_TRIM, 0, offset, length, &[]).await.map(drop)
    }

    pub async fn write_zeroes(&self, offset: u64, length: u32, no_hole: bool) -> Result<(), NbdError> {
        if self.info.flags & FLAG_SEND_WRITE_ZEROES == 0 {
            return Err(NbdError::Unsupported("write zeroes"));
        }
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.call(CMD_WRITE_ZEROES, flags, offset, length, &[]).await.map(drop)
    }

    /// base:allocation extents (length, flags) from `offset`.
    pub async fn block_status(&self, offset: u64, length: u32) -> Result<Vec<(u32, u32)>, NbdError> {
        if !self.info.block_status {
            return Err(NbdError::Unsupported("block status"));
        }
        self.call(CMD_BLOCK_STATUS, 0, offset, length, &[]).await
    }

    /// Send NBD_CMD_DISC and close our side.
    pub async fn disconnect(&self) -> Result<(), NbdError> {
        let header = RequestHeader { flags: 0, kind: CMD_DISC, handle: 0, offset: 0, length: 0 }.encode();
        let mut w = self.writer.lock().await;
        w.write_all(&header).await?;
        w.flush().await?;
        let _ = w.shutdown().await;
        self.shared.closed.store(true, Ordering::Release);
        Ok(())
    }
}

async fn read_replies<R: AsyncRead + Unpin>(mut rd: R, shared: Arc<Shared>, structured: bool) {
    let r = reply_loop(&mut rd, &shared, structured).await;
    shared.closed.store(true, Ordering::Release);
    let pending: Vec<Pending> = shared.pending.lock().unwrap().drain().map(|(_, p)| p).collect();
    let _ = r;
    for p in pending {
        match p {
            Pending::Read { tx, .. } => drop(tx.send(Err(NbdError::Closed))),
            Pending::Other { tx, .. } => drop(tx.send(Err(NbdError::Closed))),
        }
    }
}

async fn reply_loop<R: AsyncRead + Unpin>(rd: &mut R, shared: &Shared, structured: bool) -> Result<(), NbdError> {
    loop {
        let magic = rd.read_u32().await?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let errno = rd.read_u32().await?;
                let handle = rd.read_u64().await?;
                let p = shared.pending.lock().unwrap().remove(&handle).ok_or_else(|| unknown(handle))?;
                match p {
                    Pending::Read { mut buf, tx, .. } => {
                        if errno == 0 {
                            rd.read_exact(&mut buf).await?;
                            let _ = tx.send(Ok(buf));
                        } else {
                            let _ = tx.send(Err(NbdError::Server { command: "read", errno, message: String::new() }));
                        }
                    }
                    Pending::Other { command, extents, tx, .. } => {
                        let _ = tx.send(if errno == 0 {
                            Ok(extents)
                        } else {
                            Err(NbdError::Server { command: proto::command_name(command), errno, message: String::new() })
                        });
                    }
                }
            }
            STRUCTURED_REPLY_MAGIC if structured => {
                let flags = rd.read_u16().await?;
                let kind = rd.read_u16().await?;
                let handle = rd.read_u64().await?;
                let len = rd.read_u32().await? as usize;
                if len > (64 << 20) {
                    return Err(NbdError::Protocol(format!("structured chunk of {len} bytes")));
                }
                if !shared.pending.lock().unwrap().contains_key(&handle) {
                    return Err(unknown(handle));
                }
                // Read the payload outside the lock: it can be large.
                let mut chunk = vec![0u8; len];
                rd.read_exact(&mut chunk).await?;
                let mut guard = shared.pending.lock().unwrap();
                let p2 = guard.get_mut(&handle).ok_or_else(|| unknown(handle))?;
                apply_chunk(p2, kind, &chunk)?;
                if flags & REPLY_FLAG_DONE != 0 {
                    let p = guard.remove(&handle).expect("present");
                    drop(guard);
                    finish(p);
                }
            }
            other => return Err(NbdError::Protocol(format!("reply magic {other:#x}"))),
        }
    }
}

fn unknown(handle: u64) -> NbdError {
    NbdError::Protocol(format!("reply for handle {handle} that we did not send"))
}

fn apply_chunk(p: &mut Pending, kind: u16, chunk: &[u8]) -> Result<(), NbdError> {
    let error_of = |chunk: &[u8]| -> Result<(u32, String), NbdError> {
        if chunk.len() < 6 {
            return Err(NbdError::Protocol("short error chunk".into()));
        }
        let n = (be16(&chunk[4..6]) as usize).min(chunk.len() - 6);
        Ok((be32(&chunk[0..4]), String::from_utf8_lossy(&chunk[6..6 + n]).into_owned()))
    };
    match (p, kind) {
        (Pending::Read { buf, offset, .. }, REPLY_TYPE_OFFSET_DATA) if chunk.len() >= 8 => {
            let at = be64(&chunk[0..8]).checked_sub(*offset).ok_or_else(|| NbdError::Protocol("data before the request".into()))?;
            let data = &chunk[8..];
            let end = (at as usize).checked_add(data.len()).filter(|&e| e <= buf.len());
            let end = end.ok_or_else(|| NbdError::Protocol("data past the request".into()))?;
            buf[at as usize..end].copy_from_slice(data);
        }
        (Pending::Read { buf, offset, .. }, REPLY_TYPE_OFFSET_HOLE) if chunk.len() == 12 => {
            let at = be64(&chunk[0..8]).checked_sub(*offset).ok_or_else(|| NbdError::Protocol("hole before the request".into()))?;
            let n = be32(&chunk[8..12]) as usize;
            let end = (at as usize).checked_add(n).filter(|&e| e <= buf.len());
            let end = end.ok_or_else(|| NbdError::Protocol("hole past the request".into()))?;
            buf[at as usize..end].fill(0);
        }
        (Pending::Other { extents, .. }, REPLY_TYPE_BLOCK_STATUS) if chunk.len() >= 12 && (chunk.len() - 4).is_multiple_of(8) => {
            for pair in chunk[4..].chunks_exact(8) {
                extents.push((be32(&pair[0..4]), be32(&pair[4..8])));
            }
        }
        (_, REPLY_TYPE_NONE) => {}
        (Pending::Read { error, .. }, k) | (Pending::Other { error, .. }, k) if k & 0x8000 != 0 => {
            *error = Some(error_of(chunk)?);
        }
        (_, k) => return Err(NbdError::Protocol(format!("unexpected structured chunk type {k}"))),
    }
    Ok(())
}

fn finish(p: Pending) {
    match p {
        Pending::Read { buf, error, tx, .. } => {
            let _ = tx.send(match error {
                None => Ok(buf),
                Some((errno, message)) => Err(NbdError::Server { command: "read", errno, message }),
            });
        }
        Pending::Other { command, extents, error, tx } => {
            let _ = tx.send(match error {
                None => Ok(extents),
                Some((errno, message)) => Err(NbdError::Server { command: proto::command_name(command), errno, message }),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that takes the connection and then says nothing (one still
    /// starting, or overloaded): the handshake's time runs out, and that
    /// counts as a lost connection, which a reconnect tries again.
    #[tokio::test]
    async fn a_server_silent_through_the_handshake_is_unreachable_for_now() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let silent = tokio::spawn(async move {
            let (held, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(held);
        });
        let target = Target { address, export: "vol-x".into(), tls: None };
        let e = match handshake(&target, true, Duration::from_millis(200)).await {
            Ok(_) => panic!("a silent server completed a handshake"),
            Err(e) => e,
        };
        assert!(e.is_connection_loss(), "{e}");
        assert!(e.to_string().contains("handshake took longer"), "{e}");
        silent.abort();
    }
}
