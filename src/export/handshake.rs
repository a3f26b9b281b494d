//! Fixed newstyle negotiation, server side: options until the client picks
//! an export (GO or EXPORT_NAME) or leaves.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info};

use super::proto::{self, *};
use super::{allowed, canonical_ip, ConnectionError, Export, Shared, Stream};

/// Longest option payload we read; longer ones close the connection.
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Options one connection may send before it must pick an export.
const MAX_OPTIONS: usize = 256;
/// Metadata context ID of base:allocation on our connections.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

pub(crate) struct Session {
    pub stream: Box<dyn Stream>,
    pub export: Arc<Export>,
    pub structured: bool,
    pub block_status: bool,
    pub peer: SocketAddr,
}

struct State {
    stream: Box<dyn Stream>,
    peer: SocketAddr,
    tls_peer: Option<CertificateDer<'static>>,
    tls_done: bool,
    structured: bool,
    /// Export name for which base:allocation was selected.
    meta_for: Option<String>,
    no_zeroes: bool,
}

enum Lookup {
    Found(Arc<Export>),
    Refused(u32, String),
}

pub(crate) async fn negotiate(
    shared: &Arc<Shared>,
    mut stream: Box<dyn Stream>,
    peer: SocketAddr,
) -> Result<Option<Session>, ConnectionError> {
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&INIT_MAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&OPT_MAGIC.to_be_bytes());
    hello[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&hello).await?;
    stream.flush().await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnectionError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let fixed = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let mut st = State {
        stream,
        peer,
        tls_peer: None,
        tls_done: false,
        structured: false,
        meta_for: None,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
    };
    // Without TLS a peer may do anything only if some export lets its address
    // in without TLS; otherwise it must upgrade first (FORCEDTLS for it).
    let ip = canonical_ip(peer.ip());
    let plain_peer_ok = shared.tls.is_none() || shared.all().iter().any(|e| e.access.plain_from.contains(&ip));

    for _ in 0..MAX_OPTIONS {
        let mut head = [0u8; 16];
        st.stream.read_exact(&mut head).await?;
        if be64(&head[0..8]) != OPT_MAGIC {
            return Err(ConnectionError::Protocol("option without the IHAVEOPT magic".into()));
        }
        let option = be32(&head[8..12]);
        let len = be32(&head[12..16]);
        if len > MAX_OPTION_LEN {
            return Err(ConnectionError::Protocol(format!("option {option} of {len} bytes is over the limit")));
        }
        let mut data = vec![0u8; len as usize];
        st.stream.read_exact(&mut data).await?;

        if !fixed && option != OPT_EXPORT_NAME {
            return Err(ConnectionError::Protocol("a non-fixed-newstyle client may only send EXPORT_NAME".into()));
        }
        let must_upgrade = shared.tls.is_some() && !st.tls_done && !plain_peer_ok;
        if must_upgrade && !matches!(option, OPT_STARTTLS | OPT_ABORT | OPT_EXPORT_NAME) {
            reply(&mut st, option, REP_ERR_TLS_REQD, b"this server requires TLS: send NBD_OPT_STARTTLS first").await?;
            continue;
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                return match lookup(shared, &st, &name) {
                    Lookup::Found(export) => {
                        let size = export.size.load(Ordering::Acquire);
                        let mut b = Vec::with_capacity(134);
                        b.extend_from_slice(&size.to_be_bytes());
                        b.extend_from_slice(&export.transmission_flags(st.structured).to_be_bytes());
                        if !st.no_zeroes {
                            b.extend_from_slice(&[0u8; 124]);
                        }
                        st.stream.write_all(&b).await?;
                        st.stream.flush().await?;
                        Ok(Some(session(st, export, &name)))
                    }
                    // EXPORT_NAME cannot fail politely: close.
                    Lookup::Refused(_, why) => Err(ConnectionError::Refused(why)),
                };
            }
            OPT_ABORT => {
                let _ = reply(&mut st, option, REP_ACK, &[]).await;
                let _ = st.stream.shutdown().await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(&mut st, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                let visible: Vec<String> = shared
                    .all()
                    .iter()
                    .filter(|e| allowed(shared, e, &st.peer, st.tls_peer.as_ref()))
                    .map(|e| e.name.to_string())
                    .collect();
                for name in visible {
                    let mut p = Vec::with_capacity(4 + name.len());
                    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    p.extend_from_slice(name.as_bytes());
                    reply(&mut st, option, REP_SERVER, &p).await?;
                }
                reply(&mut st, option, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                let Some(tls) = &shared.tls else {
                    reply(&mut st, option, REP_ERR_POLICY, b"this server has no TLS configured").await?;
                    continue;
                };
                if st.tls_done || !data.is_empty() {
                    reply(&mut st, option, REP_ERR_INVALID, b"TLS is already on, or STARTTLS carried data").await?;
                    continue;
                }
                reply(&mut st, option, REP_ACK, &[]).await?;
                let config = tls.config.current().map_err(|e| ConnectionError::Tls(e.to_string()))?;
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let tls_stream = acceptor.accept(st.stream).await.map_err(|e| ConnectionError::Tls(e.to_string()))?;
                st.tls_peer = tls_stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
                st.stream = Box::new(tls_stream);
                st.tls_done = true;
                debug!(peer = %st.peer, client_cert = st.tls_peer.is_some(), "TLS established");
            }
            OPT_INFO | OPT_GO => {
                let req = match proto::parse_info_request(&data) {
                    Ok(r) => r,
                    Err(why) => {
                        reply(&mut st, option, REP_ERR_INVALID, why.as_bytes()).await?;
                        continue;
                    }
                };
                let export = match lookup(shared, &st, &req.name) {
                    Lookup::Found(e) => e,
                    Lookup::Refused(code, why) => {
                        reply(&mut st, option, code, why.as_bytes()).await?;
                        continue;
                    }
                };
                let mut p = Vec::with_capacity(12);
                p.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                p.extend_from_slice(&export.size.load(Ordering::Acquire).to_be_bytes());
                p.extend_from_slice(&export.transmission_flags(st.structured).to_be_bytes());
                reply(&mut st, option, REP_INFO, &p).await?;
                if req.items.contains(&INFO_BLOCK_SIZE) {
                    let mut p = Vec::with_capacity(14);
                    p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    p.extend_from_slice(&1u32.to_be_bytes());
                    p.extend_from_slice(&4096u32.to_be_bytes());
                    p.extend_from_slice(&shared.limits.max_payload.to_be_bytes());
                    reply(&mut st, option, REP_INFO, &p).await?;
                }
                if req.items.contains(&INFO_NAME) {
                    let mut p = INFO_NAME.to_be_bytes().to_vec();
                    p.extend_from_slice(req.name.as_bytes());
                    reply(&mut st, option, REP_INFO, &p).await?;
                }
                reply(&mut st, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    return Ok(Some(session(st, export, &req.name)));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(&mut st, option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data").await?;
                    continue;
                }
                st.structured = true;
                reply(&mut st, option, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !st.structured {
                    reply(&mut st, option, REP_ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first").await?;
                    continue;
                }
                let req = match proto::parse_meta_request(&data) {
                    Ok(r) => r,
                    Err(why) => {
                        reply(&mut st, option, REP_ERR_INVALID, why.as_bytes()).await?;
                        continue;
                    }
                };
                if let Lookup::Refused(code, why) = lookup(shared, &st, &req.name) {
                    reply(&mut st, option, code, why.as_bytes()).await?;
                    continue;
                }
                let list = option == OPT_LIST_META_CONTEXT;
                let matches = if req.queries.is_empty() {
                    list
                } else {
                    req.queries.iter().any(|q| q == META_BASE_ALLOCATION || (list && q == "base:"))
                };
                if !list {
                    st.meta_for = matches.then(|| req.name.clone());
                }
                if matches {
                    let id: u32 = if list { 0 } else { BASE_ALLOCATION_ID };
                    let mut p = id.to_be_bytes().to_vec();
                    p.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    reply(&mut st, option, REP_META_CONTEXT, &p).await?;
                }
                reply(&mut st, option, REP_ACK, &[]).await?;
            }
            _ => {
                reply(&mut st, option, REP_ERR_UNSUP, format!("option {option} is not supported").as_bytes()).await?;
            }
        }
    }
    Err(ConnectionError::Protocol(format!("more than {MAX_OPTIONS} options without choosing an export")))
}

fn session(st: State, export: Arc<Export>, name: &str) -> Session {
    let block_status = st.structured && st.meta_for.as_deref() == Some(name);
    info!(peer = %st.peer, volume = %export.volume, tls = st.tls_done, structured = st.structured, "NBD client connected");
    Session { stream: st.stream, export, structured: st.structured, block_status, peer: st.peer }
}

fn lookup(shared: &Shared, st: &State, name: &str) -> Lookup {
    let tls_required = shared.tls.is_some() && !st.tls_done;
    match shared.get(name) {
        Some(e) if allowed(shared, &e, &st.peer, st.tls_peer.as_ref()) => {
            // A volume expanded by the volume manager: new connections see
            // the new size (the image only ever grows).
            if let Ok(len) = e.image.size_bytes() {
                e.size.fetch_max(len, std::sync::atomic::Ordering::AcqRel);
            }
            Lookup::Found(e)
        }
        Some(_) if tls_required => Lookup::Refused(REP_ERR_TLS_REQD, "this export needs TLS".into()),
        Some(e) => {
            info!(peer = %st.peer, volume = %e.volume, tls = st.tls_done, "NBD peer refused: not the node this export is for");
            Lookup::Refused(REP_ERR_POLICY, "this peer may not open that export".into())
        }
        None if tls_required => Lookup::Refused(REP_ERR_TLS_REQD, "this server requires TLS".into()),
        None => Lookup::Refused(REP_ERR_UNKNOWN, "no such export".into()),
    }
}

async fn reply(st: &mut State, option: u32, kind: u32, payload: &[u8]) -> Result<(), ConnectionError> {
    st.stream.write_all(&proto::option_reply(option, kind, payload)).await?;
    st.stream.flush().await?;
    Ok(())
}
