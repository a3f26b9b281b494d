//! The kernel attach engine: the handshake in userspace (our client), then
//! the connected sockets handed to the kernel's nbd driver over its generic
//! netlink family ("nbd"): CONNECT with several sockets, a per-request
//! timeout and a dead-connection timeout; RECONFIGURE with fresh sockets
//! (and a new size) when the server came back or the volume grew;
//! DISCONNECT. Over TLS the handshake's session is handed to kernel TLS on
//! each socket first (`ktls`); where the kernel has no kernel TLS, plain
//! text, if the export allows this node's address (docs/nbd.md).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use rustix::net::sockopt::Timeout;
use rustix::net::{netlink, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

use tracing::info;

use super::client::{handshake_for_kernel, ExportInfo, NbdError, Target};
use super::ktls::{self, KtlsError};

// Generic netlink (linux/netlink.h, linux/genetlink.h).
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const SOL_NETLINK: i32 = 270;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;

// linux/nbd-netlink.h
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_CMD_LINK_DEAD: u8 = 4;
const NBD_CMD_STATUS: u8 = 5;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_DEVICE_LIST: u16 = 9;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NBD_DEVICE_ITEM: u16 = 1;
const NBD_DEVICE_INDEX: u16 = 1;
const NBD_DEVICE_CONNECTED: u16 = 2;
const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("the kernel has no nbd driver (generic netlink family \"nbd\" not found); load the nbd module or use the FUSE engine")]
    NoDriver,
    #[error("netlink: {0}")]
    Netlink(io::Error),
    #[error("the nbd driver refused {command}: {error}")]
    Refused { command: &'static str, error: io::Error },
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error(transparent)]
    Ktls(#[from] KtlsError),
}

/// Settings of a kernel attachment.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// TCP connections (the server must allow several: CAN_MULTI_CONN).
    pub connections: usize,
    /// A request with no reply after this long fails the connection.
    pub request_timeout: Duration,
    /// How long the device waits for RECONFIGURE after losing every
    /// connection before failing I/O.
    pub dead_connection_timeout: Duration,
    /// Kernel TLS works here (`ktls::probe`): TLS targets are carried on
    /// by the kernel. Without it only plain-text targets can attach.
    pub kernel_tls: bool,
}

impl Default for KernelOptions {
    fn default() -> Self {
        KernelOptions {
            connections: 2,
            request_timeout: Duration::from_secs(30),
            dead_connection_timeout: Duration::from_secs(120),
            kernel_tls: false,
        }
    }
}

/// A connected /dev/nbdN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDevice {
    pub index: u32,
    pub path: PathBuf,
    pub size: u64,
}

/// One connection to `target` in transmission phase, under kernel TLS when
/// the target has TLS, as a blocking socket for the driver.
async fn connect_socket(target: &Target) -> Result<(OwnedFd, ExportInfo), KernelError> {
    let tcp = tokio::net::TcpStream::connect(&target.address)
        .await
        .map_err(|error| NbdError::Connect { address: target.address.clone(), error })?;
    let _ = tcp.set_nodelay(true);
    let sock = handshake_for_kernel(tcp, target).await?;
    let std = sock.tcp.into_std().map_err(NbdError::Io)?;
    if let Some(keys) = &sock.keys {
        ktls::install(&std, keys)?;
    }
    std.set_nonblocking(false).map_err(NbdError::Io)?;
    Ok((OwnedFd::from(std), sock.info))
}

/// Handshake `n` sockets to `target`.
async fn connect_sockets(target: &Target, n: usize) -> Result<(Vec<OwnedFd>, ExportInfo), KernelError> {
    let mut fds = Vec::with_capacity(n);
    let mut info = None;
    for _ in 0..n.max(1) {
        let (fd, i) = connect_socket(target).await?;
        if n > 1 && !i.can_multi_conn() {
            return Err(NbdError::Unsupported("several connections (CAN_MULTI_CONN)").into());
        }
        fds.push(fd);
        info = Some(i);
    }
    Ok((fds, info.expect("at least one connection")))
}

/// Connect a free nbd device to the export.
pub async fn connect(target: &Target, opts: &KernelOptions, identifier: &str) -> Result<KernelDevice, KernelError> {
    let (fds, info) = connect_sockets(target, opts.connections).await?;
    let mut attrs = Vec::new();
    put_u64(&mut attrs, NBD_ATTR_SIZE_BYTES, info.size);
    put_u64(&mut attrs, NBD_ATTR_BLOCK_SIZE_BYTES, 4096);
    put_u64(&mut attrs, NBD_ATTR_SERVER_FLAGS, info.flags as u64);
    put_u64(&mut attrs, NBD_ATTR_TIMEOUT, opts.request_timeout.as_secs().max(1));
    put_u64(&mut attrs, NBD_ATTR_DEAD_CONN_TIMEOUT, opts.dead_connection_timeout.as_secs().max(1));
    put_u64(&mut attrs, NBD_ATTR_CLIENT_FLAGS, NBD_CFLAG_DESTROY_ON_DISCONNECT);
    put_str(&mut attrs, NBD_ATTR_BACKEND_IDENTIFIER, identifier);
    put_sockets(&mut attrs, &fds);
    let reply = nbd_request(NBD_CMD_CONNECT, attrs, "CONNECT").await?;
    // The kernel holds its own references to the sockets now.
    drop(fds);
    let index = find_attr(&reply, NBD_ATTR_INDEX).and_then(u32_of);
    let index = index.ok_or_else(|| KernelError::Netlink(io::Error::other("CONNECT reply without a device index")))?;
    info!(
        device = index,
        size = info.size,
        connections = opts.connections,
        kernel_tls = target.tls.is_some(),
        "NBD export connected to the kernel driver"
    );
    Ok(KernelDevice { index, path: PathBuf::from(format!("/dev/nbd{index}")), size: info.size })
}

/// Give device `index` new connections (after the server restarted) and the
/// export's current size (after it grew).
pub async fn reconfigure(index: u32, target: &Target, opts: &KernelOptions, identifier: &str) -> Result<u64, KernelError> {
    let (fds, info) = connect_sockets(target, opts.connections).await?;
    let mut attrs = Vec::new();
    put_u32(&mut attrs, NBD_ATTR_INDEX, index);
    put_u64(&mut attrs, NBD_ATTR_SIZE_BYTES, info.size);
    put_str(&mut attrs, NBD_ATTR_BACKEND_IDENTIFIER, identifier);
    put_sockets(&mut attrs, &fds);
    nbd_request(NBD_CMD_RECONFIGURE, attrs, "RECONFIGURE").await?;
    drop(fds);
    info!(device = index, size = info.size, kernel_tls = target.tls.is_some(), "NBD device reconfigured with new connections");
    Ok(info.size)
}

/// `reconfigure` again and again until it works or the device's
/// dead-connection timeout has passed (the server is restarting: its
/// listener comes back a few seconds later).
pub async fn reconnect(index: u32, target: &Target, opts: &KernelOptions, identifier: &str) -> Result<u64, KernelError> {
    let started = std::time::Instant::now();
    loop {
        match reconfigure(index, target, opts, identifier).await {
            Ok(size) => return Ok(size),
            Err(e) if started.elapsed() < opts.dead_connection_timeout => {
                tracing::warn!(device = index, error = %e, "reconnect failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Tell device `index` the export's current size (after the volume grew),
/// keeping its connections.
pub async fn resize(index: u32, target: &Target, identifier: &str) -> Result<u64, KernelError> {
    let tcp = tokio::net::TcpStream::connect(&target.address)
        .await
        .map_err(|error| NbdError::Connect { address: target.address.clone(), error })?;
    let info = handshake_for_kernel(tcp, target).await?.info;
    let mut attrs = Vec::new();
    put_u32(&mut attrs, NBD_ATTR_INDEX, index);
    put_u64(&mut attrs, NBD_ATTR_SIZE_BYTES, info.size);
    put_str(&mut attrs, NBD_ATTR_BACKEND_IDENTIFIER, identifier);
    nbd_request(NBD_CMD_RECONFIGURE, attrs, "RECONFIGURE").await?;
    info!(device = index, size = info.size, "NBD device resized");
    Ok(info.size)
}

/// Disconnect device `index` (it goes away: DESTROY_ON_DISCONNECT).
pub async fn disconnect(index: u32) -> Result<(), KernelError> {
    let mut attrs = Vec::new();
    put_u32(&mut attrs, NBD_ATTR_INDEX, index);
    nbd_request(NBD_CMD_DISCONNECT, attrs, "DISCONNECT").await.map(drop)
}

/// One request to the nbd family, on the blocking pool.
async fn nbd_request(cmd: u8, attrs: Vec<u8>, what: &'static str) -> Result<Vec<u8>, KernelError> {
    tokio::task::spawn_blocking(move || {
        let nl = Genl::open()?;
        let family = nl.family("nbd")?;
        nl.request(family, cmd, &attrs, what)
    })
    .await
    .expect("netlink task")
}

/// Indexes of nbd devices and whether each is connected.
pub async fn status() -> Result<Vec<(u32, bool)>, KernelError> {
    let reply = nbd_request(NBD_CMD_STATUS, Vec::new(), "STATUS").await?;
    {
        let mut out = Vec::new();
        if let Some(list) = find_attr(&reply, NBD_ATTR_DEVICE_LIST) {
            for (t, item) in attrs(list) {
                if t != NBD_DEVICE_ITEM {
                    continue;
                }
                let idx = find_attr(item, NBD_DEVICE_INDEX).and_then(u32_of);
                let conn = find_attr(item, NBD_DEVICE_CONNECTED).and_then(|v| v.first()).is_some_and(|&b| b != 0);
                if let Some(i) = idx {
                    out.push((i, conn));
                }
            }
        }
        Ok(out)
    }
}

/// The driver's "nbd_mc_group" notifications: which device lost a
/// connection (NBD_CMD_LINK_DEAD), so a supervisor can RECONFIGURE it.
pub struct LinkDeadWatcher {
    nl: Genl,
}

impl LinkDeadWatcher {
    pub fn open() -> Result<LinkDeadWatcher, KernelError> {
        let nl = Genl::open()?;
        let mut a = Vec::new();
        put_str(&mut a, CTRL_ATTR_FAMILY_NAME, "nbd");
        let reply = match nl.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, &a, "GETFAMILY") {
            Err(KernelError::Refused { error, .. }) if error.raw_os_error() == Some(libc::ENOENT) => return Err(KernelError::NoDriver),
            r => r?,
        };
        let groups = find_attr(&reply, CTRL_ATTR_MCAST_GROUPS).unwrap_or(&[]);
        let group = attrs(groups).into_iter().find_map(|(_, g)| {
            let name = find_attr(g, CTRL_ATTR_MCAST_GRP_NAME)?;
            (name.strip_suffix(b"\0").unwrap_or(name) == b"nbd_mc_group")
                .then(|| find_attr(g, CTRL_ATTR_MCAST_GRP_ID).and_then(u32_of))
                .flatten()
        });
        let group = group.ok_or_else(|| KernelError::Netlink(io::Error::other("the nbd family has no nbd_mc_group")))?;
        // SAFETY: setsockopt with a u32 group number.
        let r = unsafe {
            libc::setsockopt(nl.fd.as_raw_fd(), SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group as *const u32 as *const libc::c_void, 4)
        };
        if r < 0 {
            return Err(KernelError::Netlink(io::Error::last_os_error()));
        }
        Ok(LinkDeadWatcher { nl })
    }

    /// Wait up to `timeout` for a notification; the device index, if any.
    pub fn next(&self, timeout: Duration) -> Result<Option<u32>, KernelError> {
        // A zero timeout would mean "wait for ever".
        rustix::net::sockopt::set_socket_timeout(&self.nl.fd, Timeout::Recv, Some(timeout.max(Duration::from_millis(1))))
            .map_err(|e| KernelError::Netlink(e.into()))?;
        let mut buf = vec![0u8; 8192];
        let n = match rustix::net::recv(&self.nl.fd, &mut buf[..], RecvFlags::empty()) {
            Ok((n, _)) => n,
            Err(e) => {
                let e = io::Error::from(e);
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => Ok(None),
                    _ => Err(KernelError::Netlink(e)),
                };
            }
        };
        let msg = &buf[..n];
        if msg.len() < 20 || msg[16] != NBD_CMD_LINK_DEAD {
            return Ok(None);
        }
        Ok(find_attr(&msg[20..], NBD_ATTR_INDEX).and_then(u32_of))
    }
}

// ------------------------------------------------------------ netlink

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn put_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len() + align4(len) - len, 0);
}
fn put_u32(buf: &mut Vec<u8>, kind: u16, v: u32) {
    put_attr(buf, kind, &v.to_ne_bytes());
}
fn put_u64(buf: &mut Vec<u8>, kind: u16, v: u64) {
    put_attr(buf, kind, &v.to_ne_bytes());
}
fn put_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let mut d = s.as_bytes().to_vec();
    d.push(0);
    put_attr(buf, kind, &d);
}
fn put_sockets(buf: &mut Vec<u8>, fds: &[OwnedFd]) {
    let mut list = Vec::new();
    for fd in fds {
        let mut item = Vec::new();
        put_u32(&mut item, NBD_SOCK_FD, fd.as_raw_fd() as u32);
        put_attr(&mut list, NBD_SOCK_ITEM, &item);
    }
    put_attr(buf, NBD_ATTR_SOCKETS, &list);
}

/// (type, payload) of each attribute in `buf`; stops at malformed ones.
fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((kind, &buf[4..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

fn find_attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).into_iter().find(|(k, _)| *k == kind).map(|(_, v)| v)
}

struct Genl {
    fd: OwnedFd,
}

impl Genl {
    fn open() -> Result<Genl, KernelError> {
        let fd = rustix::net::socket_with(AddressFamily::NETLINK, SocketType::RAW, SocketFlags::CLOEXEC, Some(netlink::GENERIC))
            .map_err(|e| KernelError::Netlink(e.into()))?;
        rustix::net::sockopt::set_socket_timeout(&fd, Timeout::Recv, Some(Duration::from_secs(30)))
            .map_err(|e| KernelError::Netlink(e.into()))?;
        Ok(Genl { fd })
    }

    fn family(&self, name: &str) -> Result<u16, KernelError> {
        let mut a = Vec::new();
        put_str(&mut a, CTRL_ATTR_FAMILY_NAME, name);
        match self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, &a, "GETFAMILY") {
            Ok(reply) => find_attr(&reply, CTRL_ATTR_FAMILY_ID)
                .and_then(|v| Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?)))
                .ok_or_else(|| KernelError::Netlink(io::Error::other("family reply without an ID"))),
            Err(KernelError::Refused { error, .. }) if error.raw_os_error() == Some(libc::ENOENT) => Err(KernelError::NoDriver),
            Err(e) => Err(e),
        }
    }

    /// Send one request and collect the attributes of its reply (if any)
    /// until the kernel's acknowledgement.
    fn request(&self, family: u16, cmd: u8, payload: &[u8], what: &'static str) -> Result<Vec<u8>, KernelError> {
        let version = 1;
        let len = 16 + 4 + payload.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel fills it
        msg.push(cmd);
        msg.push(version);
        msg.extend_from_slice(&0u16.to_ne_bytes());
        msg.extend_from_slice(payload);
        // To the kernel: port 0, no groups.
        rustix::net::sendto(&self.fd, &msg, SendFlags::empty(), &netlink::SocketAddrNetlink::new(0, 0))
            .map_err(|e| KernelError::Netlink(e.into()))?;
        let mut reply = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (n, _) = rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty()).map_err(|e| KernelError::Netlink(e.into()))?;
            let mut rest = &buf[..n];
            while rest.len() >= 16 {
                let mlen = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let mtype = u16::from_ne_bytes([rest[4], rest[5]]);
                if mlen < 16 || mlen > rest.len() {
                    return Err(KernelError::Netlink(io::Error::other("truncated netlink message")));
                }
                let body = &rest[16..mlen];
                match mtype {
                    NLMSG_ERROR => {
                        let code = u32_of(body)
                            .map(|c| c as i32)
                            .ok_or_else(|| KernelError::Netlink(io::Error::other("short netlink error message")))?;
                        if code == 0 {
                            return Ok(reply);
                        }
                        return Err(KernelError::Refused { command: what, error: io::Error::from_raw_os_error(-code) });
                    }
                    NLMSG_DONE => return Ok(reply),
                    _ if body.len() >= 4 => reply.extend_from_slice(&body[4..]),
                    _ => {}
                }
                rest = &rest[align4(mlen).min(rest.len())..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding() {
        let mut b = Vec::new();
        put_u32(&mut b, 1, 7);
        put_str(&mut b, 10, "abc");
        put_u64(&mut b, 2, 1 << 40);
        let a = attrs(&b);
        assert_eq!(a.len(), 3);
        assert_eq!(find_attr(&b, 10), Some(&b"abc\0"[..]));
        assert_eq!(find_attr(&b, 2).map(|v| u64::from_ne_bytes(v.try_into().unwrap())), Some(1 << 40));
        assert!(attrs(&[200, 0, 1, 0]).is_empty(), "a length past the buffer stops parsing");
    }

    #[test]
    fn no_driver_here_is_reported_as_such() {
        // This development machine has no nbd module; a machine that has one
        // answers with a family ID instead.
        match Genl::open().and_then(|g| g.family("nbd")) {
            Ok(_) | Err(KernelError::NoDriver) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
}
