//! The FUSE attach engine end to end, as root: an export of our server
//! becomes a loop device here; mkfs, mount, write, and the owner's image
//! holds the data; raw block I/O the same; the server restarted in the
//! middle of writes: I/O pauses and resumes with no error and every byte
//! lands. Nothing is left mounted or attached, even when a test fails.

mod nbd_support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cinderblock::attach::nbd::fuse::FuseAttachment;
use cinderblock::attach::nbd::resilient::ReconnectPolicy;
use cinderblock::export::Limits;
use nbd_support::*;

const MIB: u64 = 1 << 20;

fn root_and_tools() -> bool {
    if !rustix::process::geteuid().is_root() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the FUSE engine tests need root (FUSE mount, loop devices)");
        }
        eprintln!("SKIPPED: needs root");
        return false;
    }
    have("mkfs.ext4") && have("mount")
}

/// Unmounts on drop, even after a failed assertion.
struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        if Command::new("mountpoint").arg("-q").arg(&self.0).status().map(|s| s.success()).unwrap_or(false) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Detaches (and so unmounts the FUSE file) on drop if the test did not.
struct Attached(Option<FuseAttachment>, tokio::runtime::Handle);
impl Attached {
    fn device(&self) -> PathBuf {
        self.0.as_ref().unwrap().device.path.clone()
    }
    fn detach(&mut self) {
        if let Some(a) = self.0.take() {
            self.1.block_on(a.detach()).unwrap();
        }
    }
}
impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(a) = self.0.take() {
            let _ = self.1.block_on(a.detach());
        }
    }
}

fn attach(rt: &tokio::runtime::Runtime, srv: &TestServer, name: &cinderblock::export::ExportName, state: &Path) -> Attached {
    let target = srv.target(name, None);
    let policy = ReconnectPolicy { give_up_after: Duration::from_secs(60), ..ReconnectPolicy::default() };
    let a = rt.block_on(FuseAttachment::attach(target, state, policy, false)).unwrap();
    Attached(Some(a), rt.handle().clone())
}

fn fuse_mounts_left(state: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(&state.display().to_string())
}

#[test]
fn a_filesystem_on_a_remote_volume_lands_in_the_owners_image() {
    if !root_and_tools() {
        return;
    }
    let img = TestImage::new(256 * MIB);
    let srv = TestServer::start(None, Limits::default());
    let name = srv.export(&img.path, "node-a", true);
    let rt = runtime();
    let state = tempfile::tempdir().unwrap();
    let mut att = attach(&rt, &srv, &name, state.path());
    let dev = att.device();
    let number: u32 = dev.file_name().unwrap().to_str().unwrap().trim_start_matches("loop").parse().unwrap();
    assert_eq!(cinderblock::attach::loopdev::direct_io(number).unwrap(), Some(true));

    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
    let mnt = tempfile::tempdir().unwrap();
    let data = pattern(11, 8 * MIB as usize);
    {
        let _m = Mounted(mnt.path().to_path_buf());
        run(Command::new("mount").arg(&dev).arg(mnt.path()));
        std::fs::write(mnt.path().join("data.bin"), &data).unwrap();
        run(Command::new("sync").arg("-f").arg(mnt.path().join("data.bin")));
    }
    att.detach();
    assert!(!fuse_mounts_left(state.path()), "FUSE mount left behind");

    // The owner's image, mounted locally, has the file.
    let mnt2 = tempfile::tempdir().unwrap();
    let _m = Mounted(mnt2.path().to_path_buf());
    run(Command::new("mount").args(["-o", "loop,ro"]).arg(&img.path).arg(mnt2.path()));
    assert!(std::fs::read(mnt2.path().join("data.bin")).unwrap() == data);
}

#[test]
fn raw_block_io_survives_a_server_restart() {
    if !root_and_tools() {
        return;
    }
    let img = TestImage::new(64 * MIB);
    let srv = TestServer::start(None, Limits::default());
    let addr = srv.addr;
    let name = srv.export(&img.path, "node-a", true);
    let rt = runtime();
    let state = tempfile::tempdir().unwrap();
    let mut att = attach(&rt, &srv, &name, state.path());
    let dev = att.device();

    // A writer of 1 MiB chunks with O_DIRECT, each fsynced, while the server
    // goes away for two seconds and comes back on the same address.
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&dev).unwrap();
        let mut slowest = Duration::ZERO;
        for i in 0..48u64 {
            let chunk = aligned(pattern(100 + i, MIB as usize));
            let t = Instant::now();
            f.seek(SeekFrom::Start(i * MIB)).unwrap();
            f.write_all(&chunk).unwrap_or_else(|e| panic!("write {i} failed: {e}"));
            f.sync_data().unwrap_or_else(|e| panic!("fsync {i} failed: {e}"));
            slowest = slowest.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(50));
        }
        slowest
    });
    std::thread::sleep(Duration::from_millis(600));
    drop(srv);
    std::thread::sleep(Duration::from_secs(2));
    let srv2 = TestServer::start_on(addr, None, Limits::default());
    srv2.export_named(&img.path, name, "node-a", true);
    let slowest = writer.join().expect("I/O failed during the restart");
    assert!(slowest >= Duration::from_millis(1500), "no write waited for the restart ({slowest:?}): the test did not test it");
    assert!(att.0.as_ref().unwrap().client.reconnects() >= 1);

    // Read back through the device and straight from the image.
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(att.device()).unwrap();
    let mut buf = aligned(vec![0u8; MIB as usize]);
    let on_disk = std::fs::read(&img.path).unwrap();
    for i in 0..48u64 {
        f.seek(SeekFrom::Start(i * MIB)).unwrap();
        f.read_exact(&mut buf).unwrap();
        let want = pattern(100 + i, MIB as usize);
        assert!(buf[..] == want[..], "chunk {i} differs on the device");
        assert!(on_disk[(i * MIB) as usize..((i + 1) * MIB) as usize] == want[..], "chunk {i} differs in the image");
    }
    drop(f);
    att.detach();
    assert!(!fuse_mounts_left(state.path()));
}

/// A buffer at a 4 KiB-aligned address, as O_DIRECT wants.
fn aligned(data: Vec<u8>) -> AlignedVec {
    let mut a = AlignedVec(cinderblock::export::image::AlignedBuf::zeroed(data.len()));
    a.0.copy_from_slice(&data);
    a
}

struct AlignedVec(cinderblock::export::image::AlignedBuf);
impl std::ops::Deref for AlignedVec {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}
impl std::ops::DerefMut for AlignedVec {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}
