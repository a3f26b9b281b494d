//! The NBD wire format (doc/proto.md of the NBD project): magic numbers,
//! option, command, flag and error values, and pure parsing and encoding of
//! the fixed-size messages. Shared by our server (`export`) and our client
//! (`attach::nbd`); nothing here does I/O, so the fuzz target can drive it
//! directly.

/// "NBDMAGIC", the first 8 bytes a server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle marker and the magic of every option request.
pub const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// NBD_INFO_* items of an NBD_REP_INFO reply.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

pub const META_BASE_ALLOCATION: &str = "base:allocation";

/// Error values the protocol allows on the wire.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Strings (export names, messages) are at most this long (proto.md).
pub const MAX_STRING: usize = 4096;

pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_HEADER_LEN: usize = 20;

pub fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write_zeroes",
        CMD_BLOCK_STATUS => "block_status",
        _ => "unknown",
    }
}

/// The 28-byte header of a transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadMagic(pub u64);

impl RequestHeader {
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, BadMagic> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic as u64));
        }
        Ok(RequestHeader {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            handle: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// What the server negotiated for one connection, which decides whether a
/// request is valid.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub block_status: bool,
    pub max_payload: u32,
}

/// A request the server will carry out, checked against the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read { offset: u64, length: u32 },
    Write { offset: u64, length: u32, fua: bool },
    Flush,
    Trim { offset: u64, length: u32, fua: bool },
    WriteZeroes { offset: u64, length: u32, fua: bool, no_hole: bool, fast: bool },
    BlockStatus { offset: u64, length: u32, one: bool },
    Disconnect,
}

/// Why a request is refused. `Fatal` ones leave the stream unframed (a write
/// whose payload we will not read), so the connection must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Error { errno: u32, message: String },
    Fatal(String),
}

fn refuse(errno: u32, message: impl Into<String>) -> Refusal {
    Refusal::Error { errno, message: message.into() }
}

/// Check a request header against what was negotiated. Every arithmetic step
/// is checked: offsets and lengths come from the network.
pub fn validate(h: &RequestHeader, n: &Negotiated) -> Result<Command, Refusal> {
    let allowed_flags = match h.kind {
        CMD_READ => CMD_FLAG_FUA | if n.structured { CMD_FLAG_DF } else { 0 },
        CMD_WRITE | CMD_TRIM | CMD_FLUSH | CMD_DISC => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => {
            // A write's payload length is known; anything else unknown has none.
            return Err(refuse(EINVAL, format!("unknown command {}", h.kind)));
        }
    };
    if h.flags & !allowed_flags != 0 {
        if h.kind == CMD_WRITE {
            // The payload follows; we still read it, then refuse.
            check_payload(h, n)?;
        }
        return Err(refuse(EINVAL, format!("flags {:#x} not valid for {}", h.flags, command_name(h.kind))));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let in_bounds = || -> Result<(), Refusal> {
        match h.offset.checked_add(h.length as u64) {
            Some(end) if end <= n.size => Ok(()),
            _ => Err(refuse(
                if h.kind == CMD_WRITE || h.kind == CMD_WRITE_ZEROES { ENOSPC } else { EINVAL },
                format!("range {}+{} is past the end of the export ({} bytes)", h.offset, h.length, n.size),
            )),
        }
    };
    let writable = || -> Result<(), Refusal> {
        if n.read_only {
            Err(refuse(EPERM, "the export is read-only"))
        } else {
            Ok(())
        }
    };
    match h.kind {
        CMD_READ => {
            if h.length > n.max_payload {
                return Err(refuse(EINVAL, format!("read of {} bytes is over the limit of {}", h.length, n.max_payload)));
            }
            in_bounds()?;
            Ok(Command::Read { offset: h.offset, length: h.length })
        }
        CMD_WRITE => {
            check_payload(h, n)?;
            in_bounds()?;
            writable()?;
            Ok(Command::Write { offset: h.offset, length: h.length, fua })
        }
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM => {
            in_bounds()?;
            writable()?;
            Ok(Command::Trim { offset: h.offset, length: h.length, fua })
        }
        CMD_WRITE_ZEROES => {
            in_bounds()?;
            writable()?;
            Ok(Command::WriteZeroes {
                offset: h.offset,
                length: h.length,
                fua,
                no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
                fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
            })
        }
        CMD_BLOCK_STATUS => {
            if !n.block_status {
                return Err(refuse(EINVAL, "no metadata context was negotiated"));
            }
            in_bounds()?;
            Ok(Command::BlockStatus { offset: h.offset, length: h.length, one: h.flags & CMD_FLAG_REQ_ONE != 0 })
        }
        _ => unreachable!("unknown commands returned above"),
    }
}

fn check_payload(h: &RequestHeader, n: &Negotiated) -> Result<(), Refusal> {
    if h.length > n.max_payload {
        return Err(Refusal::Fatal(format!("write of {} bytes is over the limit of {}; not reading its payload", h.length, n.max_payload)));
    }
    Ok(())
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO: an export name and the
/// information items the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub items: Vec<u16>,
}

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, &'static str> {
    let mut r = Reader(data);
    let name = r.string32()?;
    let count = r.u16()? as usize;
    if r.0.len() != count * 2 {
        return Err("the information request count does not match the option length");
    }
    let items = (0..count).map(|_| r.u16()).collect::<Result<Vec<_>, _>>()?;
    Ok(InfoRequest { name, items })
}

/// The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, &'static str> {
    let mut r = Reader(data);
    let name = r.string32()?;
    let count = r.u32()? as usize;
    // Each query takes at least its 4-byte length: a count beyond that is a lie.
    if count > r.0.len() / 4 {
        return Err("the query count does not match the option length");
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(r.string32()?);
    }
    if !r.0.is_empty() {
        return Err("trailing bytes after the queries");
    }
    Ok(MetaRequest { name, queries })
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], &'static str> {
        if self.0.len() < n {
            return Err("the option is shorter than its fields say");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(be16(self.take(2)?))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(be32(self.take(4)?))
    }
    fn string32(&mut self) -> Result<String, &'static str> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err("a string is longer than 4096 bytes");
        }
        let bytes = self.take(len)?;
        let s = std::str::from_utf8(bytes).map_err(|_| "a string is not UTF-8")?;
        if s.contains('\0') {
            return Err("a string contains NUL");
        }
        Ok(s.to_string())
    }
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// An option reply: header and payload in one buffer.
pub fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&REP_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

pub fn simple_reply(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

pub fn structured_header(flags: u16, kind: u16, handle: u64, length: u32) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut b = [0u8; STRUCTURED_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A structured error chunk (final) with a message for a person.
pub fn structured_error(handle: u64, errno: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut b = Vec::with_capacity(STRUCTURED_HEADER_LEN + 6 + msg.len());
    b.extend_from_slice(&structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + msg.len() as u32));
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg() -> Negotiated {
        Negotiated { size: 1 << 20, read_only: false, structured: true, block_status: true, max_payload: 1 << 16 }
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, kind, handle: 7, offset, length }
    }

    #[test]
    fn header_round_trips_and_checks_magic() {
        let h = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        assert_eq!(RequestHeader::parse(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(RequestHeader::parse(&bad).is_err());
    }

    #[test]
    fn ranges_past_the_end_and_overflowing_offsets_are_refused() {
        let n = neg();
        assert!(validate(&req(CMD_READ, 0, (1 << 20) - 512, 512), &n).is_ok());
        for (kind, errno) in [(CMD_READ, EINVAL), (CMD_WRITE, ENOSPC), (CMD_TRIM, EINVAL), (CMD_BLOCK_STATUS, EINVAL)] {
            match validate(&req(kind, 0, (1 << 20) - 511, 512), &n) {
                Err(Refusal::Error { errno: e, .. }) => assert_eq!(e, errno, "{}", command_name(kind)),
                other => panic!("{}: {other:?}", command_name(kind)),
            }
            assert!(validate(&req(kind, 0, u64::MAX, 2), &n).is_err());
        }
    }

    #[test]
    fn oversize_writes_close_the_connection_and_oversize_reads_are_errors() {
        let n = neg();
        assert!(matches!(validate(&req(CMD_WRITE, 0, 0, (1 << 16) + 1), &n), Err(Refusal::Fatal(_))));
        assert!(matches!(validate(&req(CMD_READ, 0, 0, (1 << 16) + 1), &n), Err(Refusal::Error { errno: EINVAL, .. })));
    }

    #[test]
    fn flags_and_commands_that_do_not_apply_are_einval() {
        let n = neg();
        assert!(matches!(validate(&req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1), &n), Err(Refusal::Error { errno: EINVAL, .. })));
        assert!(matches!(validate(&req(CMD_CACHE, 0, 0, 1), &n), Err(Refusal::Error { errno: EINVAL, .. })));
        assert!(matches!(validate(&req(99, 0, 0, 1), &n), Err(Refusal::Error { errno: EINVAL, .. })));
        let no_sr = Negotiated { structured: false, block_status: false, ..n };
        assert!(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &no_sr).is_err());
        assert!(validate(&req(CMD_BLOCK_STATUS, 0, 0, 1), &no_sr).is_err());
        assert_eq!(
            validate(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, 0, 8), &n),
            Ok(Command::WriteZeroes { offset: 0, length: 8, fua: false, no_hole: true, fast: true })
        );
    }

    #[test]
    fn read_only_exports_refuse_writes_with_eperm() {
        let n = Negotiated { read_only: true, ..neg() };
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert!(matches!(validate(&req(kind, 0, 0, 8), &n), Err(Refusal::Error { errno: EPERM, .. })));
        }
    }

    #[test]
    fn option_payloads_with_lying_lengths_are_refused() {
        let mut ok = Vec::new();
        ok.extend_from_slice(&3u32.to_be_bytes());
        ok.extend_from_slice(b"abc");
        ok.extend_from_slice(&1u16.to_be_bytes());
        ok.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_info_request(&ok), Ok(InfoRequest { name: "abc".into(), items: vec![INFO_BLOCK_SIZE] }));
        assert!(parse_info_request(&ok[..ok.len() - 1]).is_err());
        let mut long = ok.clone();
        long[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&long).is_err());

        let mut meta = Vec::new();
        meta.extend_from_slice(&0u32.to_be_bytes());
        meta.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&meta).is_err());
    }
}
