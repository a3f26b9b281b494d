//! The transmission phase. One task per connection (on a thread of its own
//! for TCP, see `ExportServer::serve`) does all of it from one event loop:
//! it reads requests from the socket, submits reads and writes of the image
//! with io_uring (`uring`), collects their completions and
//! writes the replies, several per vectored write. FLUSH, TRIM,
//! WRITE_ZEROES and BLOCK_STATUS (and reads and writes where the kernel
//! refuses io_uring) run on tokio's blocking pool and come back over a
//! channel. Replies go out as requests complete, out of order, as the
//! protocol allows.
//!
//! Bounds per connection: `max_in_flight` requests and `max_bytes_in_flight`
//! payload bytes (requests being served plus read data not yet sent); at
//! either limit the loop stops reading the socket, so a fast client is slowed
//! by TCP, not by our memory. A client that stops reading replies for
//! `stall_timeout` is disconnected.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::handshake::{Session, BASE_ALLOCATION_ID};
use super::image::{errno_for, AlignedBuf, Image, ZeroError};
use super::proto::{self, Command, Negotiated, Refusal, RequestHeader, REQUEST_HEADER_LEN};
use super::uring::{Completion, Ring};
use super::{ConnectionError, Export, Limits, Shared, Stream};

/// Most extents in one BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 1024;
/// Request bytes read from the socket at once.
const INPUT_BUFFER: usize = 256 * 1024;
/// Read data up to this size is copied next to its reply header (one slice
/// for both); larger data is sent from its own buffer.
const COPY_BELOW: usize = 16 * 1024;
/// Payload buffers kept for reuse, and the largest size kept.
const SPARE_BUFFERS: usize = 64;
const SPARE_MAX: usize = 128 * 1024;
/// Slices handed to one vectored write.
const MAX_SLICES: usize = 64;

/// Said once per process: every connection would say the same.
static NO_URING_LOGGED: AtomicBool = AtomicBool::new(false);

type Io = Box<dyn Stream>;

/// A request being served.
struct Request {
    handle: u64,
    kind: u16,
    offset: u64,
    started: Instant,
    /// Payload bytes it holds against `max_bytes_in_flight`.
    budget: usize,
}

enum Body {
    Done,
    Data { offset: u64, buf: AlignedBuf },
    Extents(Vec<(u32, u32)>),
    Error { errno: u32, message: String },
}

/// A request served on the blocking pool.
struct Finished {
    req: Request,
    body: Body,
}

/// A write whose payload is still arriving.
struct Payload {
    req: Request,
    fua: bool,
    buf: AlignedBuf,
    filled: usize,
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

    let ring = match limits.io_uring.then(|| Ring::new(export.image.clone(), limits.max_in_flight)) {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            if !NO_URING_LOGGED.swap(true, Ordering::Relaxed) {
                warn!(error = %e, "io_uring is not available; NBD reads and writes run on the blocking pool");
            }
            None
        }
    };
    let (rd, wr) = tokio::io::split(stream);
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let mut conn = Connection {
        export: &export,
        limits,
        structured,
        block_status,
        rd,
        wr,
        input: Input::new(),
        payload: None,
        skip: 0,
        out: Out::default(),
        stall_at: tokio::time::Instant::now(),
        need_flush: false,
        in_flight: 0,
        bytes_in_flight: 0,
        blocked: false,
        closing: false,
        ring,
        done_tx,
        done_rx,
        spare: Vec::new(),
        completions: Vec::new(),
    };
    let mut removed = export.removed.subscribe();
    tokio::select! {
        r = conn.run() => {
            r?;
            info!(%peer, volume = %export.volume, "NBD client disconnected");
            Ok(())
        }
        _ = async { let _ = removed.wait_for(|r| *r).await; } => {
            info!(%peer, volume = %export.volume, "export removed; connection closed");
            Ok(())
        }
    }
}

struct Connection<'a> {
    export: &'a Arc<Export>,
    limits: &'a Limits,
    structured: bool,
    block_status: bool,
    rd: ReadHalf<Io>,
    wr: WriteHalf<Io>,
    input: Input,
    payload: Option<Payload>,
    /// Payload bytes of a refused write still to discard.
    skip: u64,
    out: Out,
    /// When the replies waiting in `out` count as stalled.
    stall_at: tokio::time::Instant,
    /// Bytes were written since the last flush (TLS buffers them).
    need_flush: bool,
    in_flight: usize,
    bytes_in_flight: usize,
    /// A request is waiting for in-flight room: stop reading.
    blocked: bool,
    /// Disconnect or end of stream: finish what is in flight, then close.
    closing: bool,
    ring: Option<Ring<Request>>,
    done_tx: mpsc::UnboundedSender<Finished>,
    done_rx: mpsc::UnboundedReceiver<Finished>,
    spare: Vec<AlignedBuf>,
    completions: Vec<Completion<Request>>,
}

enum Event {
    Read(io::Result<usize>),
    Wrote(io::Result<usize>),
    Ring(io::Result<()>),
    Done(Finished),
    Stalled,
}

impl Connection<'_> {
    async fn run(&mut self) -> Result<(), ConnectionError> {
        loop {
            self.parse()?;
            if let Some(ring) = &mut self.ring {
                ring.submit()?;
            }
            // Completions the kernel posted while this task was busy (it
            // posts them at our system calls): reply now, not after a trip
            // through the eventfd and the runtime's poller.
            self.reap();
            let writing = !self.out.is_empty() || self.need_flush;
            if self.closing && self.in_flight == 0 && !writing {
                let _ = tokio::time::timeout(self.limits.stall_timeout, self.wr.shutdown()).await;
                return Ok(());
            }
            let reading = !self.closing && (self.payload.is_some() || (!self.blocked && self.input.has_room()));
            let ring_waiting = self.ring.as_ref().is_some_and(|r| r.pending() > 0);
            let stall_at = self.stall_at;
            let event = {
                let Connection { rd, wr, input, payload, out, ring, done_rx, .. } = self;
                tokio::select! {
                    r = read_some(rd, input, payload), if reading => Event::Read(r),
                    r = write_some(wr, out), if writing => Event::Wrote(r),
                    r = async { ring.as_ref().expect("a ring").ready().await }, if ring_waiting => Event::Ring(r),
                    Some(f) = done_rx.recv() => Event::Done(f),
                    _ = tokio::time::sleep_until(stall_at), if writing => Event::Stalled,
                }
            };
            match event {
                Event::Read(Ok(0)) => {
                    debug!(volume = %self.export.volume, "client closed the connection without NBD_CMD_DISC");
                    if let Some(p) = self.payload.take() {
                        self.in_flight -= 1;
                        self.bytes_in_flight -= p.req.budget;
                    }
                    self.closing = true;
                }
                Event::Read(Ok(_)) => {
                    if self.payload.as_ref().is_some_and(|p| p.filled == p.buf.len()) {
                        let p = self.payload.take().expect("a payload");
                        self.export.stats.written_bytes.inc_by(p.buf.len() as u64);
                        self.start_write(p.req, p.buf, p.fua);
                    }
                }
                Event::Read(Err(e)) => return Err(e.into()),
                Event::Wrote(Ok(n)) => {
                    if self.out.is_empty() {
                        self.need_flush = false;
                    } else if n == 0 {
                        return Err(io::Error::from(io::ErrorKind::WriteZero).into());
                    } else {
                        self.out.advance(n);
                        self.need_flush = true;
                    }
                    self.stall_at = tokio::time::Instant::now() + self.limits.stall_timeout;
                }
                Event::Wrote(Err(e)) => return Err(e.into()),
                Event::Ring(r) => {
                    r?;
                    self.reap();
                }
                Event::Done(f) => self.reply(f.req, f.body),
                Event::Stalled => return Err(ConnectionError::Stalled(self.limits.stall_timeout)),
            }
        }
    }

    /// Take the complete requests out of the input, as far as the bounds
    /// allow, and start them.
    fn parse(&mut self) -> Result<(), ConnectionError> {
        self.blocked = false;
        let max_bytes = self.limits.max_bytes_in_flight;
        loop {
            if self.closing || self.payload.is_some() {
                return Ok(());
            }
            if self.skip > 0 {
                let n = (self.skip as usize).min(self.input.len());
                self.input.consume(n);
                self.skip -= n as u64;
                if self.skip > 0 {
                    return Ok(());
                }
            }
            if self.input.len() < REQUEST_HEADER_LEN {
                return Ok(());
            }
            if self.in_flight >= self.limits.max_in_flight {
                self.blocked = true;
                return Ok(());
            }
            let mut head = [0u8; REQUEST_HEADER_LEN];
            head.copy_from_slice(&self.input.data()[..REQUEST_HEADER_LEN]);
            let h = RequestHeader::parse(&head).map_err(|m| ConnectionError::Protocol(format!("request magic {:#x} is wrong", m.0)))?;
            let negotiated = Negotiated {
                size: self.export.size.load(Ordering::Acquire),
                read_only: self.export.read_only,
                structured: self.structured,
                block_status: self.block_status,
                max_payload: self.limits.max_payload,
            };
            let command = match proto::validate(&h, &negotiated) {
                Ok(c) => c,
                Err(Refusal::Fatal(why)) => return Err(ConnectionError::Protocol(why)),
                Err(Refusal::Error { errno, message }) => {
                    self.input.consume(REQUEST_HEADER_LEN);
                    if h.kind == proto::CMD_WRITE {
                        // validate() let the length through: skip the payload.
                        self.skip = h.length as u64;
                    }
                    self.export.stats.observe(h.kind, false, 0.0);
                    self.encode(h.handle, Body::Error { errno, message });
                    continue;
                }
            };
            let payload_len = match command {
                Command::Read { length, .. } | Command::Write { length, .. } => length as usize,
                _ => 0,
            };
            // A single request may use the whole budget, never more.
            let budget = payload_len.min(max_bytes);
            let held = self.bytes_in_flight + self.out.bytes;
            if budget > 0 && held > 0 && held + budget > max_bytes {
                self.blocked = true;
                return Ok(());
            }
            self.input.consume(REQUEST_HEADER_LEN);
            if command == Command::Disconnect {
                self.closing = true;
                return Ok(());
            }
            self.in_flight += 1;
            self.bytes_in_flight += budget;
            let req = Request { handle: h.handle, kind: h.kind, offset: h.offset, started: Instant::now(), budget };
            match command {
                Command::Read { length, .. } => {
                    let buf = self.take_buffer(length as usize);
                    self.start_read(req, buf);
                }
                Command::Write { length, fua, .. } => {
                    let mut buf = self.take_buffer(length as usize);
                    let have = self.input.len().min(buf.len());
                    buf[..have].copy_from_slice(&self.input.data()[..have]);
                    self.input.consume(have);
                    if have < buf.len() {
                        self.payload = Some(Payload { req, fua, buf, filled: have });
                        return Ok(());
                    }
                    self.export.stats.written_bytes.inc_by(buf.len() as u64);
                    self.start_write(req, buf, fua);
                }
                other => self.on_pool(req, other, None),
            }
        }
    }

    fn start_read(&mut self, req: Request, buf: AlignedBuf) {
        let (offset, length) = (req.offset, buf.len() as u32);
        let rejected = match &mut self.ring {
            Some(ring) if !buf.is_empty() => ring.read(req, offset, buf).err(),
            _ => Some((req, buf)),
        };
        if let Some((req, buf)) = rejected {
            self.on_pool(req, Command::Read { offset, length }, Some(buf));
        }
    }

    fn start_write(&mut self, req: Request, buf: AlignedBuf, fua: bool) {
        let (offset, length) = (req.offset, buf.len() as u32);
        let rejected = match &mut self.ring {
            Some(ring) if !buf.is_empty() => ring.write(req, offset, buf, fua).err(),
            _ => Some((req, buf)),
        };
        if let Some((req, buf)) = rejected {
            self.on_pool(req, Command::Write { offset, length, fua }, Some(buf));
        }
    }

    fn on_pool(&self, req: Request, command: Command, buf: Option<AlignedBuf>) {
        let image = self.export.image.clone();
        let tx = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let body = execute(&image, command, buf);
            let _ = tx.send(Finished { req, body });
        });
    }

    /// Reply to the reads and writes that completed (no waiting).
    fn reap(&mut self) {
        let Some(ring) = self.ring.as_mut().filter(|r| r.pending() > 0) else {
            return;
        };
        let mut done = std::mem::take(&mut self.completions);
        ring.reap(&mut done);
        for c in done.drain(..) {
            self.io_done(c);
        }
        self.completions = done;
    }

    fn io_done(&mut self, c: Completion<Request>) {
        let body = match (c.result, c.tag.kind) {
            (Ok(()), proto::CMD_READ) => Body::Data { offset: c.tag.offset, buf: c.buf },
            (Ok(()), _) => {
                self.give_buffer(c.buf);
                Body::Done
            }
            (Err(e), _) => {
                self.give_buffer(c.buf);
                io_error(e)
            }
        };
        self.reply(c.tag, body);
    }

    fn reply(&mut self, req: Request, body: Body) {
        self.in_flight -= 1;
        self.bytes_in_flight -= req.budget;
        let ok = !matches!(body, Body::Error { .. });
        let stats = &self.export.stats;
        if let (true, Body::Data { buf, .. }) = (ok, &body) {
            stats.read_bytes.inc_by(buf.len() as u64);
        }
        stats.observe(req.kind, ok, req.started.elapsed().as_secs_f64());
        self.encode(req.handle, body);
    }

    /// Queue a reply for the socket.
    fn encode(&mut self, handle: u64, body: Body) {
        use proto::*;
        if self.out.is_empty() && !self.need_flush {
            self.stall_at = tokio::time::Instant::now() + self.limits.stall_timeout;
        }
        let out = &mut self.out;
        match (body, self.structured) {
            (Body::Done, _) => out.put(&simple_reply(handle, 0)),
            (Body::Error { errno, .. }, false) => out.put(&simple_reply(handle, errno)),
            (Body::Error { errno, message }, true) => out.put(&structured_error(handle, errno, &message)),
            (Body::Data { buf, .. }, false) => {
                out.put(&simple_reply(handle, 0));
                if let Some(b) = out.put_data(buf) {
                    self.give_buffer(b);
                }
            }
            (Body::Data { buf, .. }, true) if buf.is_empty() => out.put(&structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)),
            (Body::Data { offset, buf }, true) => {
                let mut head = [0u8; STRUCTURED_HEADER_LEN + 8];
                head[..STRUCTURED_HEADER_LEN].copy_from_slice(&structured_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    handle,
                    8 + buf.len() as u32,
                ));
                head[STRUCTURED_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
                out.put(&head);
                if let Some(b) = out.put_data(buf) {
                    self.give_buffer(b);
                }
            }
            (Body::Extents(extents), _) => {
                let mut b = Vec::with_capacity(STRUCTURED_HEADER_LEN + 4 + 8 * extents.len());
                b.extend_from_slice(&structured_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, 4 + 8 * extents.len() as u32));
                b.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
                for (len, flags) in extents {
                    b.extend_from_slice(&len.to_be_bytes());
                    b.extend_from_slice(&flags.to_be_bytes());
                }
                out.put(&b)
            }
        }
    }

    /// A payload buffer: a kept one of that size, or a new one. A kept one
    /// holds earlier data of this same export, and is filled completely
    /// before anything of it is sent.
    fn take_buffer(&mut self, len: usize) -> AlignedBuf {
        match self.spare.iter().position(|b| b.len() == len) {
            Some(i) => self.spare.swap_remove(i),
            None => AlignedBuf::zeroed(len),
        }
    }

    fn give_buffer(&mut self, buf: AlignedBuf) {
        if !buf.is_empty() && buf.len() <= SPARE_MAX && self.spare.len() < SPARE_BUFFERS {
            self.spare.push(buf);
        }
    }
}

async fn read_some(rd: &mut ReadHalf<Io>, input: &mut Input, payload: &mut Option<Payload>) -> io::Result<usize> {
    match payload {
        Some(p) => {
            let n = rd.read(&mut p.buf[p.filled..]).await?;
            p.filled += n;
            Ok(n)
        }
        None => {
            let n = rd.read(input.room()).await?;
            input.end += n;
            Ok(n)
        }
    }
}

/// Write some of `out`, or flush when it is empty.
async fn write_some(wr: &mut WriteHalf<Io>, out: &Out) -> io::Result<usize> {
    if out.is_empty() {
        wr.flush().await?;
        return Ok(0);
    }
    let mut slices = [IoSlice::new(&[]); MAX_SLICES];
    let n = out.slices(&mut slices);
    wr.write_vectored(&slices[..n]).await
}

/// Bytes read from the socket, not yet taken as requests.
struct Input {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Input {
    fn new() -> Input {
        Input { buf: vec![0; INPUT_BUFFER].into_boxed_slice(), start: 0, end: 0 }
    }
    fn len(&self) -> usize {
        self.end - self.start
    }
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
    fn has_room(&self) -> bool {
        self.len() < self.buf.len()
    }
    /// Free space at the end, after moving what is left to the front.
    fn room(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }
}

enum Chunk {
    Bytes(Vec<u8>),
    Data(AlignedBuf),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Bytes(v) => v,
            Chunk::Data(b) => b,
        }
    }
}

/// Replies not yet written to the socket.
#[derive(Default)]
struct Out {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    pos: usize,
    bytes: usize,
    /// A cleared chunk kept for the next replies.
    spare: Vec<u8>,
}

impl Out {
    fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    fn put(&mut self, b: &[u8]) {
        self.bytes += b.len();
        if let Some(Chunk::Bytes(v)) = self.chunks.back_mut() {
            if v.len() < INPUT_BUFFER {
                v.extend_from_slice(b);
                return;
            }
        }
        let mut v = std::mem::take(&mut self.spare);
        v.extend_from_slice(b);
        self.chunks.push_back(Chunk::Bytes(v));
    }

    /// Queue read data; a small buffer is copied and handed back for reuse.
    fn put_data(&mut self, buf: AlignedBuf) -> Option<AlignedBuf> {
        if buf.len() < COPY_BELOW {
            self.put(&buf);
            return Some(buf);
        }
        self.bytes += buf.len();
        self.chunks.push_back(Chunk::Data(buf));
        None
    }

    fn slices<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (i, c) in self.chunks.iter().enumerate().take(dst.len()) {
            let b = c.bytes();
            dst[i] = IoSlice::new(if i == 0 { &b[self.pos..] } else { b });
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let left = self.chunks.front().expect("written bytes were queued").bytes().len() - self.pos;
            if n < left {
                self.pos += n;
                return;
            }
            n -= left;
            self.pos = 0;
            if let Some(Chunk::Bytes(mut v)) = self.chunks.pop_front() {
                if v.capacity() <= 4 * INPUT_BUFFER {
                    v.clear();
                    self.spare = v;
                }
            }
        }
    }
}

fn io_error(e: io::Error) -> Body {
    Body::Error { errno: errno_for(&e), message: e.to_string() }
}

fn execute(image: &Image, command: Command, payload: Option<AlignedBuf>) -> Body {
    let done = |r: io::Result<()>| r.map(|_| Body::Done).unwrap_or_else(io_error);
    match command {
        Command::Read { offset, length } => {
            let mut buf = payload.unwrap_or_else(|| AlignedBuf::zeroed(length as usize));
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
                Err(ZeroError::NotFast) => {
                    Body::Error { errno: proto::ENOTSUP, message: "zeroing this range would not be fast on this filesystem".into() }
                }
                Err(ZeroError::Io(e)) => io_error(e),
            }
        }
        Command::BlockStatus { length: 0, .. } => Body::Error { errno: proto::EINVAL, message: "zero-length block status".into() },
        Command::BlockStatus { offset, length, one } => match image.extents(offset, length, if one { 1 } else { MAX_EXTENTS }) {
            Ok(e) if !e.is_empty() => Body::Extents(e),
            Ok(_) => Body::Extents(vec![(length.max(1), 0)]),
            Err(e) => io_error(e),
        },
        Command::Disconnect => Body::Done,
    }
}
