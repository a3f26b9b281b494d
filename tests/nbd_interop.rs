//! Our server and client against real NBD peers from Debian's packages:
//! nbdinfo, nbdcopy (libnbd-bin), qemu-img and qemu-io (qemu-utils) as
//! clients of our server; nbdkit and qemu-nbd as servers for our client.
//! Each with and without TLS. The allow-list holds for them too.
//!
//! scripts/test-all.sh installs the packages; a missing tool fails under
//! CI=true.

mod nbd_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cinderblock::attach::nbd::{Client, NbdError, Target};
use cinderblock::export::{proto, Limits};
use nbd_support::*;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(20);

fn tls_dir(pki: &Pki, node: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("cinderblock-nbd-pki-").tempdir().unwrap();
    pki.write_gnutls_dir(d.path(), node);
    d
}

fn libnbd_uri(srv: &TestServer, name: &cinderblock::export::ExportName, tls: Option<&Path>) -> String {
    match tls {
        None => srv.uri(name),
        Some(dir) => format!("nbds://127.0.0.1:{}/{}?tls-certificates={}", srv.addr.port(), name, dir.display()),
    }
}

fn qemu_tls_args(dir: Option<&Path>, endpoint: &str) -> Vec<String> {
    match dir {
        None => vec![],
        Some(d) => vec!["--object".into(), format!("tls-creds-x509,id=tls0,endpoint={endpoint},dir={}", d.display())],
    }
}

fn qemu_opts(srv: &TestServer, name: &cinderblock::export::ExportName, tls: bool) -> String {
    let mut s = format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={name}", srv.addr.port());
    if tls {
        s.push_str(",tls-creds=tls0");
    }
    s
}

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = run(Command::new("nbdinfo").args(["--json", uri]));
    serde_json::from_str(&out).unwrap()
}

/// nbdinfo, nbdinfo --map, qemu-io, qemu-img and nbdcopy against our server.
fn third_party_clients(tls: bool) {
    for tool in ["nbdinfo", "nbdcopy", "qemu-img", "qemu-io"] {
        if !have(tool) {
            return;
        }
    }
    let pki = Pki::new();
    let img = TestImage::new(64 * MIB);
    let srv = TestServer::start(tls.then(|| pki.server_tls()), Limits::default());
    let name = srv.export(&img.path, "node-a", !tls);
    let dir = tls_dir(&pki, "node-a");
    let tls_path = tls.then(|| dir.path());
    let uri = libnbd_uri(&srv, &name, tls_path);

    // nbdinfo: size, flags, contexts.
    let info = nbdinfo_json(&uri);
    assert_eq!(info["protocol"], "newstyle-fixed");
    assert_eq!(info["TLS"], tls);
    assert_eq!(info["structured"], true);
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 64 * MIB);
    for flag in ["can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df"] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["contexts"][0], "base:allocation");

    // qemu-io writes two patterns, reads them back.
    let mut io = Command::new("qemu-io");
    io.args(qemu_tls_args(tls_path, "client")).args(["--image-opts", &qemu_opts(&srv, &name, tls)]).args([
        "-c",
        "write -P 0xab 1M 2M",
        "-c",
        "write -P 0xcd 8M 1M",
        "-c",
        "read -P 0xab 1M 2M",
        "-c",
        "read -P 0xcd 8M 1M",
        "-c",
        "flush",
    ]);
    let out = run(&mut io);
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // nbdinfo --map: holes where nothing was written.
    let map = run(Command::new("nbdinfo").args(["--map", &uri]));
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(rows.first(), Some(&(0, MIB, 3)), "{map}");
    assert!(rows.contains(&(MIB, 2 * MIB, 0)), "{map}");
    assert!(rows.contains(&(8 * MIB, MIB, 0)), "{map}");
    assert_eq!(rows.last().map(|r| r.0 + r.1), Some(64 * MIB));

    // qemu-img: write a whole image in, read it out again.
    let src = img.dir.path().join("source.raw");
    std::fs::write(&src, pattern(7, 16 * MIB as usize)).unwrap();
    let mut convert = Command::new("qemu-img");
    convert
        .args(["convert", "-n", "-f", "raw", "--target-image-opts"])
        .args(qemu_tls_args(tls_path, "client"))
        .arg(&src)
        .arg(qemu_opts(&srv, &name, tls));
    run(&mut convert);
    let out_path = img.dir.path().join("out.raw");
    let mut back = Command::new("qemu-img");
    back.args(["convert", "-O", "raw", "--image-opts"])
        .args(qemu_tls_args(tls_path, "client"))
        .arg(qemu_opts(&srv, &name, tls))
        .arg(&out_path);
    run(&mut back);
    let got = std::fs::read(&out_path).unwrap();
    assert_eq!(got.len() as u64, 64 * MIB);
    assert!(got[..16 * MIB as usize] == pattern(7, 16 * MIB as usize)[..], "qemu-img round trip differs");

    // nbdcopy with four connections, in and out.
    let src2 = img.dir.path().join("source2.raw");
    let mut data = pattern(9, 64 * MIB as usize);
    data[40 * MIB as usize..48 * MIB as usize].fill(0);
    std::fs::write(&src2, &data).unwrap();
    run(Command::new("nbdcopy").args(["--connections=4", "--requests=16", "--flush"]).arg(&src2).arg(&uri));
    let out2 = img.dir.path().join("out2.raw");
    run(Command::new("nbdcopy").args(["--connections=4"]).arg(&uri).arg(&out2));
    assert!(std::fs::read(&out2).unwrap() == data, "nbdcopy round trip differs");
    assert!(std::fs::read(&img.path).unwrap() == data, "the image does not hold what nbdcopy wrote");
    drop(dir);
}

#[test]
fn third_party_clients_use_our_server_in_plain_text() {
    third_party_clients(false);
}

#[test]
fn third_party_clients_use_our_server_over_tls() {
    third_party_clients(true);
}

#[test]
fn third_party_clients_are_held_to_the_allow_list() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let pki = Pki::new();
    let img = TestImage::new(MIB);
    let srv = TestServer::start(Some(pki.server_tls()), Limits::default());
    let name = srv.export(&img.path, "node-a", false);
    let good = tls_dir(&pki, "node-a");
    let other_node = tls_dir(&pki, "node-b");
    let no_cert = tls_dir(&pki, "node-a");
    std::fs::remove_file(no_cert.path().join("client-cert.pem")).unwrap();
    std::fs::remove_file(no_cert.path().join("client-key.pem")).unwrap();

    nbdinfo_json(&libnbd_uri(&srv, &name, Some(good.path())));
    // Refused at GO, after a good TLS handshake: the certificate names node-b.
    let err = run_fails(Command::new("nbdinfo").arg(libnbd_uri(&srv, &name, Some(other_node.path()))));
    assert!(err.contains("opt_go"), "{err}");
    run_fails(Command::new("nbdinfo").arg(libnbd_uri(&srv, &name, Some(no_cert.path()))));
    let err = run_fails(Command::new("nbdinfo").arg(srv.uri(&name)));
    assert!(err.contains("opt_go"), "{err}");
    let guess = cinderblock::export::ExportName::random();
    let err = run_fails(Command::new("nbdinfo").arg(libnbd_uri(&srv, &guess, Some(good.path()))));
    assert!(err.contains("opt_go"), "{err}");
    // And nothing was written by the refused peers.
    let mut io = Command::new("qemu-io");
    io.args(qemu_tls_args(Some(other_node.path()), "client")).args([
        "--image-opts",
        &qemu_opts(&srv, &name, true),
        "-c",
        "write -P 0x11 0 4k",
    ]);
    run_fails(&mut io);
    assert!(std::fs::read(&img.path).unwrap().iter().all(|&b| b == 0));
}

// ------------------------------------------------------------ our client

struct Peer {
    child: Child,
    port: u16,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program` with a socket we already listen on, by socket
/// activation (LISTEN_FDS, LISTEN_PID; both nbdkit and qemu-nbd take it).
/// The port is ours from the bind on, so no other test's server can hold
/// it, and a client's connect waits in the backlog until the server
/// accepts: no poll for readiness. (Handing the server a port number to
/// bind raced with other tests' servers binding port 0: a CI run once
/// talked to another test's server, reset when that test ended.)
fn serve(program: &str, args: &[String]) -> Peer {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    // The shell's PID is the server's once it execs.
    cmd.args(["-c", "LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"", "sh", program]).args(args);
    cmd.env("LISTEN_FDS", "1").env_remove("LISTEN_FDNAMES").stdout(Stdio::null());
    // SAFETY: between fork and exec only dup2 and fcntl run, both
    // async-signal-safe, on a descriptor this process owns.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {program}: {e}"));
    drop(listener); // the server holds its own copy
    Peer { child, port }
}

fn nbdkit(image: &Path, tls: Option<&Path>) -> Peer {
    let mut args: Vec<String> = vec!["-f".into(), "--exit-with-parent".into()];
    if let Some(d) = tls {
        args.extend(["--tls=require".into(), "--tls-verify-peer".into(), format!("--tls-certificates={}", d.display())]);
    }
    args.extend(["file".into(), image.display().to_string()]);
    serve("nbdkit", &args)
}

fn qemu_nbd(image: &Path, tls: Option<&Path>) -> Peer {
    let mut args: Vec<String> = ["-f", "raw", "-x", "vol", "--persistent", "--shared=4"].map(String::from).into();
    if let Some(d) = tls {
        args.extend([
            "--object".into(),
            format!("tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=on", d.display()),
            "--tls-creds".into(),
            "tls0".into(),
        ]);
    }
    args.push(image.display().to_string());
    serve("qemu-nbd", &args)
}

async fn exercise(target: &Target, image: &Path) {
    let c = Client::connect(target, T).await.unwrap();
    let info = c.info();
    assert_eq!(info.size, 32 * MIB);
    assert!(info.structured, "structured replies not negotiated");
    let data = pattern(3, 3 * MIB as usize);
    c.write(MIB, &data, false).await.unwrap();
    c.write(16 * MIB, b"fua", true).await.unwrap();
    c.flush().await.unwrap();
    assert!(c.read(MIB, 3 * MIB as u32).await.unwrap() == data);
    c.write_zeroes(MIB, 4096, false).await.unwrap();
    assert!(c.read(MIB, 4096).await.unwrap().iter().all(|&b| b == 0));
    assert!(info.block_status, "base:allocation not negotiated");
    {
        let map = c.block_status(0, 32 * MIB as u32).await.unwrap();
        assert_eq!(map[0].1 & proto::STATE_HOLE, proto::STATE_HOLE, "{map:?}");
        assert!(map.iter().any(|e| e.1 == 0), "{map:?}");
    }
    c.disconnect().await.unwrap();
    let disk = std::fs::read(image).unwrap();
    assert_eq!(&disk[16 * MIB as usize..16 * MIB as usize + 3], b"fua");
    assert!(disk[(MIB + 4096) as usize..4 * MIB as usize] == data[4096..]);
}

fn our_client_against(server: &str, tls: bool) {
    if !have(server) {
        return;
    }
    let pki = Pki::new();
    let dir = tls_dir(&pki, "node-a");
    let img = TestImage::new(32 * MIB);
    let tls_path = tls.then(|| dir.path());
    let (peer, export) = match server {
        "nbdkit" => (nbdkit(&img.path, tls_path), ""),
        _ => (qemu_nbd(&img.path, tls_path), "vol"),
    };
    let target =
        Target { address: format!("127.0.0.1:{}", peer.port), export: export.into(), tls: tls.then(|| pki.client_tls(Some("node-a"))) };
    runtime().block_on(async {
        exercise(&target, &img.path).await;
        if tls {
            // Without TLS these servers refuse us.
            let plain = Target { tls: None, ..target.clone() };
            match Client::connect(&plain, T).await {
                Err(NbdError::Refused { .. }) | Err(NbdError::Io(_)) | Err(NbdError::Protocol(_)) => {}
                other => panic!("{server} took a plain connection: {:?}", other.err()),
            }
        }
    });
    drop(peer);
}

#[test]
fn our_client_against_nbdkit() {
    our_client_against("nbdkit", false);
}

#[test]
fn our_client_against_nbdkit_over_tls() {
    our_client_against("nbdkit", true);
}

#[test]
fn our_client_against_qemu_nbd() {
    our_client_against("qemu-nbd", false);
}

#[test]
fn our_client_against_qemu_nbd_over_tls() {
    our_client_against("qemu-nbd", true);
}
