//! The fuzz target's entry (fuzz/fuzz_targets/nbd_server.rs): one client
//! connection whose every byte comes from the fuzzer, served by a real
//! server on a real (small, temporary) image. Not for production use.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::LazyLock;

use super::proto::*;
use super::{Access, ExportName, ExportServer, ExportSpec, ImageSource, Limits};

const NAME: [u8; 16] = [0x5a; 16];

struct Harness {
    rt: tokio::runtime::Runtime,
    server: ExportServer,
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    // An anonymous memory file: nothing to clean up, holes and all.
    let fd = rustix::fs::memfd_create("cinderblock-fuzz", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
    let image = std::fs::File::from(fd);
    image.set_len(1 << 20).expect("fuzz image size");
    let server = ExportServer::new(None, Limits { direct_io: false, max_payload: 256 * 1024, ..Limits::default() });
    server
        .add(ExportSpec {
            name: ExportName(NAME),
            volume: "fuzz".into(),
            image: ImageSource::File(image),
            read_only: false,
            access: Access { node: "fuzz".into(), plain_from: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)] },
            changes: None,
        })
        .expect("fuzz export");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    Harness { rt, server }
});

/// A valid handshake up to transmission on the fuzz export, with structured
/// replies and base:allocation, so inputs can reach request parsing at once.
pub fn handshake_prefix() -> Vec<u8> {
    let name = ExportName(NAME).to_string();
    let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    let mut opt = |o: u32, data: &[u8]| {
        b.extend_from_slice(&OPT_MAGIC.to_be_bytes());
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
    };
    opt(OPT_STRUCTURED_REPLY, &[]);
    let mut meta = (name.len() as u32).to_be_bytes().to_vec();
    meta.extend_from_slice(name.as_bytes());
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
    meta.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
    opt(OPT_SET_META_CONTEXT, &meta);
    let mut go = (name.len() as u32).to_be_bytes().to_vec();
    go.extend_from_slice(name.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    opt(OPT_GO, &go);
    b
}

/// Serve one connection fed with `data` (after the valid handshake when the
/// first byte is odd); the server's replies are discarded.
pub fn serve_bytes(data: &[u8]) {
    let h = &*HARNESS;
    let Some((&first, rest)) = data.split_first() else { return };
    let mut input = if first & 1 == 1 { handshake_prefix() } else { Vec::new() };
    input.extend_from_slice(rest);
    // The pure parsers too, on the raw bytes.
    let _ = parse_info_request(rest);
    let _ = parse_meta_request(rest);
    if let Ok(head) = <&[u8; REQUEST_HEADER_LEN]>::try_from(rest.get(..REQUEST_HEADER_LEN).unwrap_or(&[])) {
        if let Ok(req) = RequestHeader::parse(head) {
            let n = Negotiated {
                size: 1 << 20,
                read_only: first & 2 != 0,
                structured: first & 4 != 0,
                block_status: first & 8 != 0,
                max_payload: 1 << 16,
            };
            let _ = validate(&req, &n);
        }
    }
    let stream = tokio::io::join(std::io::Cursor::new(input), tokio::io::sink());
    let peer = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);
    let _ = h.rt.block_on(h.server.serve_stream(stream, peer));
}
