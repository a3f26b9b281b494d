//! Our NBD server with our client and with raw bytes on a real TCP socket:
//! every command, several connections, the access rules, and bad input
//! (which must get the protocol's error or a closed connection, and never
//! stall another export).

mod nbd_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use cinderblock::attach::nbd::{Client, NbdError};
use cinderblock::export::proto::*;
use cinderblock::export::{Limits, METRICS};
use nbd_support::*;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(10);

#[test]
fn every_command_round_trips_over_several_connections() {
    every_command_round_trips(Limits::default());
}

/// Where io_uring is refused (a seccomp profile), or turned off.
#[test]
fn every_command_round_trips_on_the_blocking_pool() {
    every_command_round_trips(Limits { io_uring: false, ..Limits::default() });
}

fn every_command_round_trips(limits: Limits) {
    let img = TestImage::new(16 * MIB);
    let srv = TestServer::start(None, limits);
    let name = srv.export(&img.path, "node-a", true);
    let data = pattern(1, 2 * MIB as usize);
    runtime().block_on(async {
        let a = Client::connect(&srv.target(&name, None), T).await.unwrap();
        let b = Client::connect(&srv.target(&name, None), T).await.unwrap();
        let info = a.info();
        assert_eq!(info.size, 16 * MIB);
        assert!(info.can_multi_conn() && info.structured && info.block_status && !info.read_only());
        for flag in [FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, FLAG_SEND_FAST_ZERO] {
            assert_ne!(info.flags & flag, 0, "flag {flag:#x} missing");
        }

        // Concurrent writes on one connection, read back on the other.
        let writes = (0..8).map(|i| {
            let chunk = &data[i * 256 * 1024..(i + 1) * 256 * 1024];
            a.write(MIB + (i as u64) * 256 * 1024, chunk, i == 7)
        });
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
        a.flush().await.unwrap();
        assert_eq!(b.read(MIB, 2 * MIB as u32).await.unwrap(), data);
        // Unaligned I/O goes through the page cache and stays coherent.
        a.write(MIB + 3, b"hello", false).await.unwrap();
        assert_eq!(&b.read(MIB, 16).await.unwrap()[3..8], b"hello");

        // Allocation map: data at 1..3 MiB, holes elsewhere.
        let map = b.block_status(0, 16 * MIB as u32).await.unwrap();
        assert_eq!(map[0], (MIB as u32, STATE_HOLE | STATE_ZERO), "{map:?}");
        assert_eq!(map[1], (2 * MIB as u32, 0), "{map:?}");
        assert_eq!(map.iter().map(|e| e.0 as u64).sum::<u64>(), 16 * MIB);

        // Trim punches a hole; write zeroes reads back zero with or without NO_HOLE.
        a.trim(MIB, MIB as u32).await.unwrap();
        let map = b.block_status(0, 3 * MIB as u32).await.unwrap();
        assert_eq!(map[0], (2 * MIB as u32, STATE_HOLE | STATE_ZERO), "{map:?}");
        a.write_zeroes(2 * MIB, 4096, true).await.unwrap();
        a.write_zeroes(2 * MIB + 8192, 4096, false).await.unwrap();
        let back = b.read(2 * MIB, 16384).await.unwrap();
        assert!(back[..4096].iter().all(|&x| x == 0) && back[8192..12288].iter().all(|&x| x == 0));
        assert_eq!(&back[4096..8192], &data[MIB as usize + 4096..MIB as usize + 8192]);

        a.disconnect().await.unwrap();
        b.disconnect().await.unwrap();
    });
    // The image itself holds what was written.
    let on_disk = std::fs::read(&img.path).unwrap();
    assert_eq!(&on_disk[(2 * MIB + 4096) as usize..(2 * MIB + 8192) as usize], &data[MIB as usize + 4096..MIB as usize + 8192]);
}

#[test]
fn requests_outside_the_export_get_errors_and_the_connection_goes_on() {
    let img = TestImage::new(MIB);
    let srv = TestServer::start(None, Limits { max_payload: 64 * 1024, ..Limits::default() });
    let name = srv.export(&img.path, "node-a", true);
    runtime().block_on(async {
        let c = Client::connect(&srv.target(&name, None), T).await.unwrap();
        let errno = |r: Result<Vec<u8>, NbdError>| match r {
            Err(NbdError::Server { errno, .. }) => errno,
            other => panic!("expected a server error, got {other:?}"),
        };
        assert_eq!(errno(c.read(MIB - 512, 1024).await), EINVAL);
        assert_eq!(errno(c.read(u64::MAX - 10, 512).await), EINVAL);
        assert_eq!(errno(c.read(0, 64 * 1024 + 1).await), EINVAL, "reads over the limit");
        match c.write(MIB - 10, &[1u8; 20], false).await {
            Err(NbdError::Server { errno, .. }) => assert_eq!(errno, ENOSPC),
            other => panic!("{other:?}"),
        }
        // Still usable afterwards.
        c.write(0, b"ok", false).await.unwrap();
        assert_eq!(&c.read(0, 2).await.unwrap(), b"ok");
        // A write over the payload limit closes the connection (we will not
        // read its payload), without touching the image.
        assert!(c.write(0, &vec![9u8; 64 * 1024 + 512], false).await.is_err());
        assert!(c.read(0, 2).await.is_err());
    });
    assert_eq!(&std::fs::read(&img.path).unwrap()[..2], b"ok");
}

/// Raw client: handshake by hand up to transmission on `name`.
fn raw_connect(addr: std::net::SocketAddr, name: &str, structured: bool) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(be64(&hello[0..8]), INIT_MAGIC);
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
    if structured {
        send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(opt_reply(&mut s).0, REP_ACK);
    }
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    send_opt(&mut s, OPT_GO, &p);
    loop {
        let (reply, _) = opt_reply(&mut s);
        if reply == REP_ACK {
            return s;
        }
        assert_eq!(reply, REP_INFO);
    }
}

fn send_opt(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = OPT_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

fn opt_reply(s: &mut TcpStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be64(&h[0..8]), REP_MAGIC);
    let mut p = vec![0u8; be32(&h[16..20]) as usize];
    s.read_exact(&mut p).unwrap();
    (be32(&h[12..16]), p)
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn unknown_options_and_commands_are_refused_politely() {
    let img = TestImage::new(MIB);
    let srv = TestServer::start(None, Limits::default());
    let name = srv.export(&img.path, "node-a", true);

    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    send_opt(&mut s, 4242, b"whatever");
    assert_eq!(opt_reply(&mut s).0, REP_ERR_UNSUP);
    send_opt(&mut s, OPT_LIST, b"x");
    assert_eq!(opt_reply(&mut s).0, REP_ERR_INVALID);
    send_opt(&mut s, OPT_SET_META_CONTEXT, &[0; 8]);
    assert_eq!(opt_reply(&mut s).0, REP_ERR_INVALID, "meta context before structured replies");
    send_opt(&mut s, OPT_GO, &[0, 0, 0, 40, 1]);
    assert_eq!(opt_reply(&mut s).0, REP_ERR_INVALID, "GO with a name length past its data");
    send_opt(&mut s, OPT_ABORT, &[]);
    assert_eq!(opt_reply(&mut s).0, REP_ACK);
    assert!(closed(&mut s));

    // Unknown command and a flag that does not apply: EINVAL, connection lives.
    let mut s = raw_connect(srv.addr, &name.to_string(), false);
    for (kind, flags) in [(77u16, 0u16), (CMD_READ, CMD_FLAG_REQ_ONE), (CMD_CACHE, 0)] {
        s.write_all(&RequestHeader { flags, kind, handle: 5, offset: 0, length: 512 }.encode()).unwrap();
        let mut r = [0u8; 16];
        s.read_exact(&mut r).unwrap();
        assert_eq!((be32(&r[0..4]), be32(&r[4..8]), be64(&r[8..16])), (SIMPLE_REPLY_MAGIC, EINVAL, 5));
    }
    s.write_all(&RequestHeader { flags: 0, kind: CMD_READ, handle: 6, offset: 0, length: 4 }.encode()).unwrap();
    let mut r = [0u8; 20];
    s.read_exact(&mut r).unwrap();
    assert_eq!(be32(&r[4..8]), 0);
    // A bad request magic closes the connection.
    s.write_all(&[0xAB; 28]).unwrap();
    assert!(closed(&mut s));
}

#[test]
fn garbage_and_silent_clients_do_not_stall_other_exports() {
    let img = TestImage::new(4 * MIB);
    let other = TestImage::new(MIB);
    let limits = Limits { stall_timeout: Duration::from_secs(2), handshake_timeout: Duration::from_secs(2), ..Limits::default() };
    let srv = TestServer::start(None, limits);
    let name = srv.export(&img.path, "node-a", true);
    let other_name = srv.export(&other.path, "node-b", true);

    // Garbage instead of client flags and options.
    let mut g = TcpStream::connect(srv.addr).unwrap();
    g.set_read_timeout(Some(T)).unwrap();
    g.write_all(&[0xFF; 64]).unwrap();
    let mut hello = [0u8; 18];
    g.read_exact(&mut hello).unwrap();
    assert!(closed(&mut g), "unknown client flags close the connection");
    let mut g = TcpStream::connect(srv.addr).unwrap();
    g.set_read_timeout(Some(T)).unwrap();
    g.read_exact(&mut hello).unwrap();
    g.write_all(&[0, 0, 0, 1]).unwrap();
    g.write_all(b"GARBAGE!GARBAGE!GARBAGE!").unwrap();
    assert!(closed(&mut g), "an option without the magic closes the connection");
    // An option claiming 4 GiB of data.
    let mut g = TcpStream::connect(srv.addr).unwrap();
    g.set_read_timeout(Some(T)).unwrap();
    g.read_exact(&mut hello).unwrap();
    g.write_all(&[0, 0, 0, 1]).unwrap();
    let mut opt = OPT_MAGIC.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&u32::MAX.to_be_bytes());
    g.write_all(&opt).unwrap();
    assert!(closed(&mut g));
    // A client that connects and says nothing is dropped after the handshake timeout.
    let mut silent = TcpStream::connect(srv.addr).unwrap();
    silent.set_read_timeout(Some(T)).unwrap();
    silent.read_exact(&mut hello).unwrap();
    let t = Instant::now();
    assert!(closed(&mut silent));
    assert!(t.elapsed() < Duration::from_secs(8));

    // A client that sends reads and never reads the replies.
    let mut hog = raw_connect(srv.addr, &name.to_string(), false);
    hog.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let started = Instant::now();
    let mut sent = 0;
    for i in 0..4096u64 {
        let req = RequestHeader { flags: 0, kind: CMD_READ, handle: i, offset: 0, length: 4 << 20 }.encode();
        if hog.write_all(&req).is_err() {
            break;
        }
        sent += 1;
    }
    // Meanwhile another export answers promptly.
    runtime().block_on(async {
        let c = Client::connect(&srv.target(&other_name, None), T).await.unwrap();
        let t = Instant::now();
        c.write(0, b"still here", true).await.unwrap();
        assert_eq!(&c.read(0, 10).await.unwrap(), b"still here");
        assert!(t.elapsed() < Duration::from_secs(2), "other export waited {:?}", t.elapsed());
    });
    // And the hog is disconnected once its replies stall.
    hog.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let mut sink = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        match hog.read(&mut sink) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => {
                panic!("the stalled connection is still open after {:?} ({sent} requests, {total} bytes read): {e}", started.elapsed())
            }
        }
    }
    assert!(total < 256 << 20, "the server buffered {total} bytes for a client that did not read");
}

#[test]
fn only_the_allowed_node_opens_an_export() {
    let pki = Pki::new();
    let img = TestImage::new(MIB);
    let srv = TestServer::start(Some(pki.server_tls()), Limits::default());
    let name = srv.export(&img.path, "node-a", false);
    runtime().block_on(async {
        let a = Client::connect(&srv.target(&name, Some(pki.client_tls(Some("node-a")))), T).await.unwrap();
        a.write(0, b"tls", true).await.unwrap();
        assert_eq!(&a.read(0, 3).await.unwrap(), b"tls");
        a.disconnect().await.unwrap();

        // Another node's certificate: refused by policy.
        match Client::connect(&srv.target(&name, Some(pki.client_tls(Some("node-b")))), T).await {
            Err(NbdError::Refused { reply, .. }) => assert_eq!(reply, REP_ERR_POLICY),
            other => panic!("node-b was not refused: {:?}", other.err()),
        }
        // No certificate: the TLS handshake fails.
        assert!(Client::connect(&srv.target(&name, Some(pki.client_tls(None))), T).await.is_err());
        // No TLS at all: TLS required.
        match Client::connect(&srv.target(&name, None), T).await {
            Err(NbdError::Refused { reply, .. }) => assert_eq!(reply, REP_ERR_TLS_REQD),
            other => panic!("plain text was not refused: {:?}", other.err()),
        }
        // A guessed name, with a valid certificate: unknown.
        let guess = cinderblock::export::ExportName::random();
        match Client::connect(&srv.target(&guess, Some(pki.client_tls(Some("node-a")))), T).await {
            Err(NbdError::Refused { reply, .. }) => assert_eq!(reply, REP_ERR_UNKNOWN),
            other => panic!("a guessed name was not refused: {:?}", other.err()),
        }
        // LIST shows the export to its node only.
        let list = cinderblock::attach::nbd::client::list_exports;
        assert_eq!(list(&srv.target(&name, Some(pki.client_tls(Some("node-a"))))).await.unwrap(), vec![name.to_string()]);
        assert!(list(&srv.target(&name, Some(pki.client_tls(Some("node-b"))))).await.unwrap().is_empty());
    });
    assert_eq!(&std::fs::read(&img.path).unwrap()[..3], b"tls");
}

#[test]
fn removing_an_export_closes_its_connections_and_counts_show_in_metrics() {
    let img = TestImage::new(MIB);
    let srv = TestServer::start(None, Limits::default());
    let name = srv.export(&img.path, "node-a", true);
    let volume = srv.server.list()[0].volume.clone();
    runtime().block_on(async {
        let c = Client::connect(&srv.target(&name, None), T).await.unwrap();
        c.write(0, &[1u8; 4096], false).await.unwrap();
        c.read(0, 4096).await.unwrap();
        let text = cinderblock::metrics::METRICS.encode();
        let line = |metric: &str| {
            text.lines()
                .find(|l| l.starts_with(metric) && l.contains(&format!("volume=\"{volume}\"")))
                .unwrap_or_else(|| panic!("{metric} for {volume} missing"))
                .to_string()
        };
        assert!(line("cinderblock_export_written_bytes_total").ends_with(" 4096"));
        assert!(line("cinderblock_export_read_bytes_total").ends_with(" 4096"));
        assert!(line("cinderblock_export_connections").ends_with(" 1"));
        assert!(!text.contains(&name.to_string()), "metrics must not show export names");
        let _ = &*METRICS;

        assert!(srv.server.remove(&name));
        let t = Instant::now();
        while !c.is_closed() && t.elapsed() < T {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(c.read(0, 1).await.is_err(), "connection survived removal");
        assert!(Client::connect(&srv.target(&name, None), T).await.is_err());
        assert!(!cinderblock::metrics::METRICS.encode().contains(&volume));
    });
}

#[test]
fn a_pool_volume_is_served_through_the_handle_the_volume_manager_opens() {
    use cinderblock::export::{Access, ExportName, ExportSpec, ImageSource};
    use cinderblock::volume::pool::CreateVolume;
    use cinderblock::volume::{Pool, PoolConfig, Provisioning};
    let dir = tempfile::Builder::new().prefix("cinderblock-nbd-pool-").tempdir_in("/var/tmp").unwrap();
    let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
    pool.create_volume(CreateVolume {
        id: "vol-exported".into(),
        size_bytes: 4 * MIB,
        provisioning: Provisioning::Thin,
        source: None,
        metadata: Default::default(),
    })
    .unwrap();
    assert!(pool.open_volume_image("../etc").is_err(), "IDs that could leave the pool are refused");
    assert!(pool.open_volume_image("vol-missing").is_err());
    let srv = TestServer::start(None, Limits::default());
    let name = ExportName::random();
    srv.server
        .add(ExportSpec {
            name,
            volume: "vol-exported".into(),
            image: ImageSource::File(pool.open_volume_image("vol-exported").unwrap()),
            read_only: false,
            access: Access { node: "node-b".into(), plain_from: vec![LOOPBACK] },
            changes: None,
        })
        .unwrap();
    runtime().block_on(async {
        let c = Client::connect(&srv.target(&name, None), T).await.unwrap();
        assert_eq!(c.info().size, 4 * MIB);
        c.write(MIB, b"through the handle", true).await.unwrap();
        c.disconnect().await.unwrap();
    });
    let img = std::fs::read(pool.volume_image("vol-exported")).unwrap();
    assert_eq!(&img[MIB as usize..MIB as usize + 18], b"through the handle");
}
