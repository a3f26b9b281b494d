//! The transmission phase: read requests, run them on the blocking pool,
//! write replies as they complete (out of order, as the protocol allows).
//!
//! Bounds per connection: `max_in_flight` requests and `max_bytes_in_flight`
//! payload bytes; at either limit the reader stops reading the socket, so a
//! fast client is slowed by TCP, not by our memory. A client that stops
//! reading replies for `stall_timeout` is disconnected.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info};

use super::handshake::{Session, BASE_ALLOCATION_ID};
use super::image::{errno_for, AlignedBuf, Image, ZeroError};
use super::metrics::VolumeStats;
use super::proto::{self, Command, Negotiated, Refusal, RequestHeader, REQUEST_HEADER_LEN};
use super::{ConnectionError, Export, Shared, Stream};

/// Most extents in one BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 1024;

enum Body {
    Done,
    Data { offset: u64, buf: AlignedBuf },
    Extents(Vec<(u32, u32)>),
    Error { errno: u32, message: String },
}

struct Reply {
    handle: u64,
    body: Body,
    /// Released once the reply is written: they bound what we hold.
    _slot: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

struct ConnectionGuard(Arc<Export>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.stats.connections.dec();
    }
}

pub(crate) async fn serve(shared: &Arc<Shared>, session: Session) -> Result<(), ConnectionError> {
    let Session { stream, export, structured, block_status, peer } = session;
    export.connections.fetch_add(1, Ordering::Relaxed);
    export.stats.connections.inc();
    let _guard = ConnectionGuard(export.clone());
    let limits = &shared.limits;

    let (rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let mut writer = tokio::spawn(write_replies(wr, rx, structured, limits.stall_timeout));
    let mut removed = export.removed.subscribe();

    let negotiated = |size| Negotiated {
        size,
        read_only: export.read_only,
        structured,
        block_status,
        max_payload: limits.max_payload,
    };
    let reader = read_requests(
        BufReader::with_capacity(256 * 1024, rd),
        &export,
        tx,
        negotiated,
        Arc::new(Semaphore::new(limits.max_in_flight)),
        Arc::new(Semaphore::new(limits.max_bytes_in_flight)),
        limits.max_bytes_in_flight,
    );
    tokio::select! {
        r = reader => {
            // The client disconnected (or broke the protocol): finish what is
            // in flight, then close the stream.
            let finished = writer.await.map_err(|e| ConnectionError::Protocol(format!("reply writer: {e}")))?;
            r?;
            finished?;
            info!(%peer, volume = %export.volume, "NBD client disconnected");
            Ok(())
        }
        w = &mut writer => {
            w.map_err(|e| ConnectionError::Protocol(format!("reply writer: {e}")))??;
            Err(ConnectionError::Protocol("reply writer stopped".into()))
        }
        _ = async { let _ = removed.wait_for(|r| *r).await; } => {
            writer.abort();
            info!(%peer, volume = %export.volume, "export removed; connection closed");
            Ok(())
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_requests<R, F>(
    mut rd: BufReader<ReadHalf<R>>,
    export: &Arc<Export>,
    tx: mpsc::UnboundedSender<Reply>,
    negotiated: F,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
) -> Result<(), ConnectionError>
where
    R: tokio::io::AsyncRead,
    F: Fn(u64) -> Negotiated,
{
    loop {
        let slot = slots.clone().acquire_owned().await.expect("semaphore never closed");
        let mut head = [0u8; REQUEST_HEADER_LEN];
        match rd.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                debug!(volume = %export.volume, "client closed the connection without NBD_CMD_DISC");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let started = Instant::now();
        let h = RequestHeader::parse(&head)
            .map_err(|m| ConnectionError::Protocol(format!("request magic {:#x} is wrong", m.0)))?;
        let n = negotiated(export.size.load(Ordering::Acquire));
        let command = match proto::validate(&h, &n) {
            Ok(c) => c,
            Err(Refusal::Fatal(why)) => return Err(ConnectionError::Protocol(why)),
            Err(Refusal::Error { errno, message }) => {
                if h.kind == proto::CMD_WRITE {
                    // validate() let the length through: skip the payload.
                    let skipped = tokio::io::copy(&mut (&mut rd).take(h.length as u64), &mut tokio::io::sink()).await?;
                    if skipped != h.length as u64 {
                        return Ok(());
                    }
                }
                export.stats.observe(h.kind, false, started.elapsed().as_secs_f64());
                let _ = tx.send(Reply { handle: h.handle, body: Body::Error { errno, message }, _slot: Some(slot), _bytes: None });
                continue;
            }
        };
        let payload_len = match command {
            Command::Read { length, .. } | Command::Write { length, .. } => length as usize,
            _ => 0,
        };
        let budget = if payload_len > 0 {
            // A single request may use the whole budget, never more.
            let want = payload_len.min(max_bytes) as u32;
            Some(bytes.clone().acquire_many_owned(want).await.expect("semaphore never closed"))
        } else {
            None
        };
        let mut buf = None;
        if let Command::Write { length, .. } = command {
            let mut b = AlignedBuf::zeroed(length as usize);
            rd.read_exact(&mut b).await?;
            export.stats.written_bytes.inc_by(length as u64);
            buf = Some(b);
        }
        if command == Command::Disconnect {
            return Ok(());
        }
        let image = export.image.clone();
        let stats = export.stats.clone();
        let tx = tx.clone();
        let kind = h.kind;
        tokio::task::spawn_blocking(move || {
            let body = execute(&image, command, buf);
            let ok = !matches!(body, Body::Error { .. });
            if let (true, Body::Data { buf, .. }) = (ok, &body) {
                stats.read_bytes.inc_by(buf.len() as u64);
            }
            record(&stats, kind, ok, started);
            let _ = tx.send(Reply { handle: h.handle, body, _slot: Some(slot), _bytes: budget });
        });
    }
}

fn record(stats: &VolumeStats, kind: u16, ok: bool, started: Instant) {
    stats.observe(kind, ok, started.elapsed().as_secs_f64());
}

fn io_error(e: std::io::Error) -> Body {
    Body::Error { errno: errno_for(&e), message: e.to_string() }
}

fn execute(image: &Image, command: Command, payload: Option<AlignedBuf>) -> Body {
    let done = |r: std::io::Result<()>| r.map(|_| Body::Done).unwrap_or_else(io_error);
    match command {
        Command::Read { offset, length } => {
            let mut buf = AlignedBuf::zeroed(length as usize);
            match image.read_at(&mut buf, offset) {
                Ok(()) => Body::Data { offset, buf },
                Err(e) => io_error(e),
            }
        }
        Command::Write { offset, fua, .. } => {
            let buf = payload.expect("writes carry their payload");
            done(image.write_at(&buf, offset, fua))
        }
        Command::Flush => done(image.flush()),
        Command::Trim { offset, length, fua } => done(image.trim(offset, length as u64, fua)),
        Command::WriteZeroes { offset, length, fua, no_hole, fast } => {
            match image.write_zeroes(offset, length as u64, fua, no_hole, fast) {
                Ok(()) => Body::Done,
                Err(ZeroError::NotFast) => Body::Error {
                    errno: proto::ENOTSUP,
                    message: "zeroing this range would not be fast on this filesystem".into(),
                },
                Err(ZeroError::Io(e)) => io_error(e),
            }
        }
        Command::BlockStatus { length: 0, .. } => Body::Error { errno: proto::EINVAL, message: "zero-length block status".into() },
        Command::BlockStatus { offset, length, one } => {
            match image.extents(offset, length, if one { 1 } else { MAX_EXTENTS }) {
                Ok(e) if !e.is_empty() => Body::Extents(e),
                Ok(_) => Body::Extents(vec![(length.max(1), 0)]),
                Err(e) => io_error(e),
            }
        }
        Command::Disconnect => Body::Done,
    }
}

async fn write_replies<W: Stream>(
    wr: WriteHalf<W>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    structured: bool,
    stall: std::time::Duration,
) -> Result<(), ConnectionError> {
    let mut out = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(first) = rx.recv().await {
        let batch = async {
            encode(&mut out, first, structured).await?;
            // Coalesce whatever else is ready into the same flush.
            while let Ok(next) = rx.try_recv() {
                encode(&mut out, next, structured).await?;
            }
            out.flush().await
        };
        match tokio::time::timeout(stall, batch).await {
            Ok(r) => r?,
            Err(_) => return Err(ConnectionError::Stalled(stall)),
        }
    }
    let _ = tokio::time::timeout(stall, out.shutdown()).await;
    Ok(())
}

async fn encode<W: tokio::io::AsyncWrite + Unpin>(out: &mut W, r: Reply, structured: bool) -> std::io::Result<()> {
    use proto::*;
    match (r.body, structured) {
        (Body::Done, _) => out.write_all(&simple_reply(r.handle, 0)).await,
        (Body::Error { errno, .. }, false) => out.write_all(&simple_reply(r.handle, errno)).await,
        (Body::Error { errno, message }, true) => out.write_all(&structured_error(r.handle, errno, &message)).await,
        (Body::Data { buf, .. }, false) => {
            out.write_all(&simple_reply(r.handle, 0)).await?;
            out.write_all(&buf).await
        }
        (Body::Data { buf, .. }, true) if buf.is_empty() => {
            out.write_all(&structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.handle, 0)).await
        }
        (Body::Data { offset, buf }, true) => {
            let mut head = [0u8; STRUCTURED_HEADER_LEN + 8];
            head[..STRUCTURED_HEADER_LEN].copy_from_slice(&structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                r.handle,
                8 + buf.len() as u32,
            ));
            head[STRUCTURED_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
            out.write_all(&head).await?;
            out.write_all(&buf).await
        }
        (Body::Extents(extents), _) => {
            let mut b = Vec::with_capacity(STRUCTURED_HEADER_LEN + 4 + 8 * extents.len());
            b.extend_from_slice(&structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                r.handle,
                4 + 8 * extents.len() as u32,
            ));
            b.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
            for (len, flags) in extents {
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
            }
            out.write_all(&b).await
        }
    }
}
