//! Volume migration on real Kubernetes parts (the kube-apiserver of
//! scripts/k8s/testbed.sh; records are CRDs), with each process of it
//! killed on its own: two `cinderblock controller` replicas (leader
//! election, the standby hands calls to the leader) and three `cinderblock
//! node` processes, two of them in one zone with pools on XFS with reflink
//! (live passes).
//!
//! Three migrations of a zone volume from mig-a to mig-c, each started
//! through the standby replica's admin API (handed to the leader, which
//! answers and drives it). The volume is published on its node and written
//! by fio through a loop device on its image while passes copy it; it also
//! holds data at odd offsets with holes between. Each migration loses one
//! process twice, by SIGKILL: the leader controller, the source node or
//! the target node, once during the copy (a random delay into it) and once
//! around the switch (a random delay after the volume is unpublished). The
//! process is restarted with the same arguments and state: the leader after
//! the standby took over during the copy, and at once around the switch (it
//! takes its own Lease back). Each migration must end on the target with
//! the image byte for byte what was written (fio's verification too), the
//! holes kept, and nothing left behind: no `.partial` image, pass snapshot
//! or export on either node, no BlockExport or BlockSnapshot record, no
//! source image.
//!
//! The delays come from a seed printed at the start; CINDERBLOCK_TEST_SEED
//! repeats a run's kill points. Runs when CINDERBLOCK_TEST_KUBECONFIG names
//! the bed's admin kubeconfig (scripts/test-all.sh sets it); needs root,
//! mkfs.xfs, losetup and fio.

mod common;
#[path = "common/kube.rs"]
mod kube_bed;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cinderblock::admin_proto as admin;
use cinderblock::controller::records::{MigrationPhase, VolumeRec};
use cinderblock::csi;
use cinderblock::kube::crds::{BlockExport, BlockSnapshot, BlockVolume, StorageNode};
use common::*;
use kube::api::{Api, ListParams};
use kube::Client;
use kube_bed::*;
use rand::{Rng, SeedableRng};
use tonic::Code;

type Csi = csi::controller_client::ControllerClient<tonic::transport::Channel>;
type Admin = admin::admin_client::AdminClient<tonic::transport::Channel>;

/// mig-a and mig-c share zone-1: a zone volume moves between them.
const NODES: [(&str, &str); 3] = [("mig-a", "zone-1"), ("mig-b", "zone-2"), ("mig-c", "zone-1")];
const SOURCE: &str = "mig-a";
const TARGET: &str = "mig-c";
const CONTROLLERS: [&str; 2] = ["ctrl-a", "ctrl-b"];
/// Its own Lease, so the controllers of other tests on the bed do not compete.
const LEASE: &str = "cinderblock-migrate";
const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;
/// fio writes every block of the first FIO_SPAN bytes, twice over.
const FIO_SPAN: u64 = 24 * MIB;
/// Data beyond fio's span, at odd offsets: (offset, length). The large
/// piece makes the first pass long enough to be killed in the middle of.
const DATA: [(u64, usize); 4] =
    [(40 * MIB + 4097, 300_000), (70 * MIB + 123, 2 * MIB as usize), (128 * MIB + 1, 96 * MIB as usize), (SIZE - 5000, 5000)];
/// Ranges nothing writes: they must stay holes on the target.
const HOLES: [(u64, u64); 4] = [(32 * MIB, 40 * MIB), (48 * MIB, 64 * MIB), (80 * MIB, 120 * MIB), (232 * MIB, 250 * MIB)];

#[derive(Debug, Clone, Copy)]
enum Victim {
    Leader,
    Source,
    Target,
}

struct Bed {
    dir: PathBuf,
    client: Client,
    procs: BTreeMap<String, Proc>,
    pools: BTreeMap<String, PathBuf>,
    /// The fixed agent port of each node (a restart listens where it did).
    agent_ports: BTreeMap<String, u16>,
    bvols: Api<BlockVolume>,
    /// Names this run's volumes (the bed may hold an earlier run's records).
    run: u64,
}

impl Bed {
    fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    async fn csi(&self, ctrl: &str) -> Csi {
        csi::controller_client::ControllerClient::new(csi_channel(&format!("unix://{}", self.socket(ctrl).display())).await)
    }

    async fn admin(&self, ctrl: &str) -> Admin {
        admin::admin_client::AdminClient::new(csi_channel(&format!("unix://{}", self.socket(ctrl).display())).await)
    }

    /// The replica that holds the Lease (and is running), and the other.
    async fn leader_and_standby(&self) -> (String, String) {
        let leader = eventually("a controller holds the Lease", Duration::from_secs(30), || async {
            lease_holder(&self.client, LEASE).await.filter(|h| CONTROLLERS.contains(&h.as_str()))
        })
        .await;
        let standby = CONTROLLERS.iter().find(|c| **c != leader).unwrap().to_string();
        (leader, standby)
    }

    /// How far the target's copy is, from its record in its pool.
    fn target_copy(&self, id: &str) -> String {
        let path = self.pools[TARGET].join("volumes").join(format!("{id}.json"));
        let Some(rec) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()) else {
            return "no copy yet".into();
        };
        let copy = &rec["copy"];
        let pass = if copy["pass_done"] == true { "done" } else { "under way" };
        format!("{}, pass {} {pass}, {} of {} bytes copied", rec["state"], copy["pass"], copy["copied_bytes"], copy["total_bytes"])
    }

    async fn record(&self, id: &str) -> VolumeRec {
        self.bvols.get(id).await.unwrap_or_else(|e| panic!("BlockVolume {id}: {e}")).spec.record
    }

    fn image(&self, node: &str, id: &str) -> PathBuf {
        self.pools[node].join("volumes").join(format!("{id}.img"))
    }

    /// Wait until a restarted process serves again: a controller its CSI
    /// socket, a node its agent port.
    async fn serving(&self, name: &str) {
        let started = Instant::now();
        if let Some(port) = self.agent_ports.get(name) {
            eventually(&format!("{name} listening again"), Duration::from_secs(30), || async { listening_on(*port).then_some(()) }).await;
        } else {
            let sock = self.socket(name);
            eventually(&format!("{name} serving again"), Duration::from_secs(30), || async {
                std::os::unix::net::UnixStream::connect(&sock).ok().map(|_| ())
            })
            .await;
        }
        eprintln!("   {name} serving again {:.1} s after its restart", started.elapsed().as_secs_f64());
    }

    /// MigrateVolume answers with `code` served by `ctrl` (from its metrics).
    fn served_migrations(&self, ctrl: &str, code: &str) -> u64 {
        let addr = metrics_address_in_log(&self.procs[ctrl].log()).unwrap_or_else(|| panic!("{ctrl}'s metrics address in its log"));
        let text = http_get(&addr, "/metrics");
        text.lines()
            .filter(|l| {
                l.starts_with("cinderblock_grpc_calls_total{")
                    && l.contains("service=\"cinderblock.admin.v1.Admin\"")
                    && l.contains("method=\"MigrateVolume\"")
                    && l.contains(&format!("code=\"{code}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }
}

/// Run a CSI or admin call until it is not answered UNAVAILABLE or ABORTED
/// (a replica starting, a leadership changing hands, a volume busy).
async fn retrying<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if matches!(e.code(), Code::Unavailable | Code::Aborted) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{what}: {e:?}"),
        }
    }
}

fn phase_of(rec: &VolumeRec) -> String {
    match &rec.migration {
        Some(m) => format!("{:?}, pass {}, {} bytes of the pass copied, node {:?}", m.phase, m.pass, m.pass_copied_bytes, rec.node),
        None => format!("no migration, node {:?}", rec.node),
    }
}

/// A free port not in `taken` (the nodes keep theirs across restarts, as a DaemonSet's do).
fn unused_port(taken: &mut Vec<u16>) -> u16 {
    loop {
        let p = free_port();
        if !taken.contains(&p) {
            taken.push(p);
            return p;
        }
    }
}

fn seed() -> u64 {
    match std::env::var("CINDERBLOCK_TEST_SEED") {
        Ok(s) => s.parse().unwrap_or_else(|_| panic!("CINDERBLOCK_TEST_SEED={s:?} is not a number")),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000_007,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_end_whole_when_the_leader_the_source_or_the_target_is_killed() {
    require_root!();
    require_tools!("mkfs.xfs", "losetup", "fio");
    let kubeconfig = require_kube_bed!();
    let seed = seed();
    eprintln!("kube_migrate: seed {seed} (CINDERBLOCK_TEST_SEED={seed} repeats these kill points)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let began = Instant::now();

    // Pools of the zone-1 nodes on XFS with reflink; sockets, logs,
    // certificates beside them (kept on failure: the folder is printed).
    let fs = TestFs::new("xfs-reflink", "2G");
    let pools = fs.mount.join("pools");
    let _leftovers = Leftovers(pools.clone());
    let work = tempfile::Builder::new().prefix("cinderblock-migrate-").tempdir().unwrap().keep();
    let d = work.as_path();
    eprintln!("work folder (logs): {}", d.display());
    let client = cinderblock::kube::client(Some(Path::new(&kubeconfig))).await.unwrap();
    let kc = kubeconfig.as_str();
    apply_crds(&client, &cinderblock::kube::crds::all_yaml()).await;
    register_nodes(&client, &NODES).await;
    // A StorageNode of an earlier run on this bed names another pool: the
    // node would register as mismatched. Removed, as an operator would.
    let storage_nodes: Api<StorageNode> = Api::all(client.clone());
    for (name, _) in NODES {
        let _ = storage_nodes.delete(name, &Default::default()).await;
    }

    let cb = PathBuf::from(env!("CARGO_BIN_EXE_cinderblock"));
    let pki = local_pki(d, &NODES.map(|(n, _)| n));
    let mut bed = Bed {
        dir: d.to_path_buf(),
        client: client.clone(),
        procs: BTreeMap::new(),
        pools: BTreeMap::new(),
        agent_ports: BTreeMap::new(),
        bvols: Api::all(client.clone()),
        run: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
    };
    let mut taken = vec![];
    for (name, zone) in NODES {
        let pool = if zone == "zone-1" { pools.join(name).join("pool") } else { d.join(name).join("pool") };
        let (agent_port, nbd_port) = (unused_port(&mut taken), unused_port(&mut taken));
        let args = node_args(d, name, &pool, kc, &pki, &format!("127.0.0.1:{agent_port}"), &format!("127.0.0.1:{nbd_port}"));
        bed.procs.insert(name.to_string(), Proc::start(d, name, &cb, &args, &[]));
        bed.pools.insert(name.to_string(), pool);
        bed.agent_ports.insert(name.to_string(), agent_port);
    }
    // ctrl-a takes the Lease first (it may still name a replica of an earlier run: that one's Lease runs out).
    bed.procs.insert("ctrl-a".into(), Proc::start(d, "ctrl-a", &cb, &controller_args(d, "ctrl-a", kc, &pki, LEASE), &[]));
    eventually("ctrl-a leads", Duration::from_secs(30), || async {
        (lease_holder(&client, LEASE).await.as_deref() == Some("ctrl-a")).then_some(())
    })
    .await;
    bed.procs.insert("ctrl-b".into(), Proc::start(d, "ctrl-b", &cb, &controller_args(d, "ctrl-b", kc, &pki, LEASE), &[]));
    bed.serving("ctrl-b").await;
    for (name, _) in NODES {
        eventually(&format!("{name} registered and healthy"), Duration::from_secs(30), || async {
            let mut a = bed.admin("ctrl-a").await;
            let nodes = a.list_nodes(admin::ListNodesRequest {}).await.ok()?.into_inner().nodes;
            nodes.iter().any(|n| n.id == name && n.healthy && n.pool.as_ref().is_some_and(|p| p.reflink || name == "mig-b")).then_some(())
        })
        .await;
    }
    eprintln!("bed up in {:.1} s", began.elapsed().as_secs_f64());

    for (round, victim) in [Victim::Leader, Victim::Source, Victim::Target].into_iter().enumerate() {
        let started = Instant::now();
        migrate_and_kill(&mut bed, &mut rng, round as u32, victim).await;
        eprintln!("{victim:?}: migration ended whole in {:.1} s", started.elapsed().as_secs_f64());
    }
    eprintln!("kube_migrate: all three in {:.1} s (seed {seed})", began.elapsed().as_secs_f64());
    drop(bed);
    let _ = std::fs::remove_dir_all(&work);
}

async fn kill_and_restart(bed: &mut Bed, victim: Victim, wait_for_takeover: bool) -> String {
    let name = match victim {
        Victim::Leader => bed.leader_and_standby().await.0,
        Victim::Source => SOURCE.to_string(),
        Victim::Target => TARGET.to_string(),
    };
    bed.procs.get_mut(&name).unwrap().kill9();
    if wait_for_takeover {
        let other = CONTROLLERS.iter().find(|c| **c != name).unwrap().to_string();
        let t = Instant::now();
        eventually(&format!("{other} takes over from {name}"), Duration::from_secs(30), || async {
            (lease_holder(&bed.client, LEASE).await.as_deref() == Some(other.as_str())).then_some(())
        })
        .await;
        eprintln!("   {other} took over {:.1} s after {name} was killed", t.elapsed().as_secs_f64());
    }
    bed.procs.get_mut(&name).unwrap().restart();
    bed.serving(&name).await;
    name
}

async fn migrate_and_kill(bed: &mut Bed, rng: &mut rand::rngs::StdRng, round: u32, victim: Victim) {
    let (leader, standby) = bed.leader_and_standby().await;
    let name = format!("moving-{}-{round}", bed.run);
    let v =
        retrying("CreateVolume", || async { bed.csi(&leader).await.create_volume(zone_volume_on(&name, SOURCE, SIZE as i64, true)).await })
            .await
            .into_inner()
            .volume
            .unwrap();
    let id = v.volume_id.clone();
    let src = bed.image(SOURCE, &id);
    for (i, (offset, len)) in DATA.into_iter().enumerate() {
        write_pattern(&src, offset, len, round as u8 * 3 + i as u8 + 1);
    }
    // Published on its own node (a pod there) and written through a loop device, as NodeStageVolume does.
    let publish = csi::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: SOURCE.into(),
        volume_capability: Some(rwo_capability(true)),
        ..Default::default()
    };
    retrying("ControllerPublishVolume", || async { bed.csi(&leader).await.controller_publish_volume(publish.clone()).await }).await;
    let dev = Loop::attach(&src);

    // Through the standby: handed to the leader, which answers and drives it.
    let mut through_standby = bed.admin(&standby).await;
    let ask = |to: &str| admin::MigrateVolumeRequest { volume: id.clone(), to_node: to.into(), ..Default::default() };
    if round == 0 {
        let refused = bed.served_migrations(&leader, "FAILED_PRECONDITION");
        let e = through_standby.migrate_volume(ask("mig-b")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "another zone, through the standby: {e:?}");
        assert!(e.message().contains("accessible topology"), "{}", e.message());
        assert_eq!(bed.served_migrations(&leader, "FAILED_PRECONDITION"), refused + 1, "the leader refused it");
        assert!(bed.record(&id).await.migration.is_none(), "a refused migration changes nothing");
    }
    let served = bed.served_migrations(&leader, "OK");
    let answer = through_standby.migrate_volume(ask(TARGET)).await.expect("MigrateVolume through the standby").into_inner();
    let m = answer.volume.unwrap().migration.expect("the answer shows the migration");
    assert_eq!((m.from_node.as_str(), m.to_node.as_str(), m.phase.as_str(), m.live), (SOURCE, TARGET, "Copying", true));
    assert_eq!(bed.served_migrations(&leader, "OK"), served + 1, "{standby} handed MigrateVolume to the leader {leader}");
    let started_line = |ctrl: &str| bed.procs[ctrl].all_logs().lines().any(|l| l.contains("migration started") && l.contains(&id));
    eventually("the leader's log names the migration", Duration::from_secs(5), || async { started_line(&leader).then_some(()) }).await;
    assert!(!started_line(&standby), "the standby {standby} started the migration itself");
    eprintln!("{victim:?}: {id} migrating {SOURCE} -> {TARGET}, asked of the standby {standby}, started by the leader {leader}");

    // Two rounds of fio over the same blocks while passes copy; the victim killed at a random point of it.
    let (seed_1, seed_2) = (round * 2 + 1, round * 2 + 2);
    let writer = {
        let dev = dev.0.clone();
        tokio::task::spawn_blocking(move || {
            fio(&dev, FIO_SPAN, seed_1, false, "12m");
            fio(&dev, FIO_SPAN, seed_2, false, "12m");
        })
    };
    let delay = Duration::from_millis(rng.random_range(0..3500));
    tokio::time::sleep(delay).await;
    let at_kill = bed.record(&id).await;
    let target_copy = bed.target_copy(&id);
    let copying = at_kill.migration.clone().expect("the migration goes on");
    assert_eq!(copying.phase, MigrationPhase::Copying, "no switch while published");
    let killed = kill_and_restart(bed, victim, matches!(victim, Victim::Leader)).await;
    eprintln!(
        "{victim:?}: killed {killed} {} ms into the copy ({}; the target: {target_copy}); restarted",
        delay.as_millis(),
        phase_of(&at_kill)
    );
    writer.await.unwrap();
    // The copy goes on after the restart: the pass under way at the kill ends, and another follows.
    let resumed = Instant::now();
    let pass = eventually("passes after the restart", Duration::from_secs(90), || async {
        let r = bed.record(&id).await;
        let m = r.migration.clone().expect("the migration goes on");
        assert_eq!((m.phase, r.node.as_deref()), (MigrationPhase::Copying, Some(SOURCE)), "no switch while published");
        (m.pass >= copying.pass + 2).then_some(m.pass)
    })
    .await;
    eprintln!("   copying again: pass {pass} {:.1} s after the restart", resumed.elapsed().as_secs_f64());

    // The pod is gone: writes stop, the node unstages, the CO unpublishes.
    drop(dev);
    let want = checksum(&src);
    let src_segments = data_segments(&src);
    let (leader, _) = bed.leader_and_standby().await;
    let unpublish = csi::ControllerUnpublishVolumeRequest { volume_id: id.clone(), node_id: SOURCE.into(), ..Default::default() };
    retrying("ControllerUnpublishVolume", || async { bed.csi(&leader).await.controller_unpublish_volume(unpublish.clone()).await }).await;
    // The pass under way (or the pause after it) ends, then the last pass and the switch follow.
    let unpublished = Instant::now();
    let leaving = loop {
        let r = bed.record(&id).await;
        if r.migration.as_ref().is_none_or(|m| m.phase != MigrationPhase::Copying) {
            break r;
        }
        assert!(
            unpublished.elapsed() < Duration::from_secs(60),
            "{victim:?}: still Copying a minute after the unpublish: {}",
            phase_of(&r)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let left_copying = unpublished.elapsed();
    let delay = Duration::from_millis(rng.random_range(0..600));
    tokio::time::sleep(delay).await;
    let before = bed.record(&id).await;
    let killed = kill_and_restart(bed, victim, false).await;
    let after = bed.record(&id).await;
    eprintln!(
        "{victim:?}: killed {killed} {} ms after the migration left Copying ({} ms after the unpublish; then {}; \
         before the kill {}; after it {}); restarted",
        delay.as_millis(),
        left_copying.as_millis(),
        phase_of(&leaving),
        phase_of(&before),
        phase_of(&after)
    );
    if after.migration.as_ref().is_some_and(|m| m.phase == MigrationPhase::Switching) {
        // A pod asking for the volume now waits for the switch and gets the
        // target, or is told to retry: never the source, whose writes the
        // switch would lose.
        let (leader, _) = bed.leader_and_standby().await;
        let mut req = tonic::Request::new(publish.clone());
        req.set_timeout(Duration::from_secs(60));
        match bed.csi(&leader).await.controller_publish_volume(req).await {
            Ok(r) => {
                let ctx = r.into_inner().publish_context;
                assert_eq!(ctx.get(cinderblock::attach::nbd::CONTEXT_OWNER).map(String::as_str), Some(TARGET), "{victim:?}: {ctx:?}");
                eprintln!("   a publication during the switch waited for it and got {TARGET}'s export");
                retrying("ControllerUnpublishVolume", || async {
                    bed.csi(&leader).await.controller_unpublish_volume(unpublish.clone()).await
                })
                .await;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Aborted, "{victim:?}: a publication during the switch: {e:?}");
                eprintln!("   a publication during the switch was told to retry");
            }
        }
    }

    let done = eventually("the migration ends", Duration::from_secs(120), || async {
        let r = bed.record(&id).await;
        r.migration.is_none().then_some(r)
    })
    .await;
    assert_eq!(done.node.as_deref(), Some(TARGET), "{victim:?}: the volume lives on the target");
    let dst = bed.image(TARGET, &id);
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), SIZE);
    assert_eq!(checksum(&dst), want, "{victim:?}: the target's image differs from what was written");
    let verified = fio(dst.to_str().unwrap(), FIO_SPAN, seed_2, true, "");
    assert!(verified.contains("err= 0"), "{victim:?}: fio's verification of the target: {verified}");
    let dst_segments = data_segments(&dst);
    for (a, b) in HOLES {
        let inside: Vec<_> = dst_segments.iter().filter(|(s, e)| (*s as u64) < b && (*e as u64) > a).collect();
        assert!(inside.is_empty(), "{victim:?}: data in the hole {a}..{b} on the target: {inside:?} (source: {src_segments:?})");
    }

    // Nothing left behind, on the nodes or in the records.
    assert_eq!(pool_files(&bed.pools[SOURCE]), Vec::<String>::new(), "{victim:?}: the source keeps nothing");
    assert_eq!(
        pool_files(&bed.pools[TARGET]),
        vec![format!("volumes/{id}.img"), format!("volumes/{id}.json")],
        "{victim:?}: the target keeps the volume only"
    );
    assert_eq!(pool_files(&bed.pools["mig-b"]), Vec::<String>::new());
    let exports: Api<BlockExport> = Api::all(bed.client.clone());
    let all = exports.list(&ListParams::default()).await.unwrap().items;
    let left: Vec<_> = all.into_iter().map(|e| e.spec.record).filter(|e| e.volume_id == id).collect();
    assert!(left.is_empty(), "{victim:?}: BlockExports left: {left:?}");
    let snapshots: Api<BlockSnapshot> = Api::all(bed.client.clone());
    let all = snapshots.list(&ListParams::default()).await.unwrap().items;
    let left: Vec<_> = all.into_iter().map(|s| s.spec.record).filter(|s| s.source_volume_id == id).collect();
    assert!(left.is_empty(), "{victim:?}: BlockSnapshots left: {left:?}");

    // Gone for good, from its new node.
    let (leader, _) = bed.leader_and_standby().await;
    let delete = csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() };
    retrying("DeleteVolume", || async { bed.csi(&leader).await.delete_volume(delete.clone()).await }).await;
    assert_eq!(pool_files(&bed.pools[TARGET]), Vec::<String>::new());
}
