//! `cinderblock bench`: figures for the claims we make. Prints, never asserts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cinderblock::server;
use cinderblock::volume::pool::CreateVolume;

use crate::BenchCommand;
use cinderblock::volume::{Pool, PoolConfig, Provisioning, VolumeSource};

pub struct PoolBenchResult {
    pub data_bytes: u64,
    pub reflink: bool,
    pub snapshot: Vec<Duration>,
    pub clone: Vec<Duration>,
}

pub fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    if s.is_empty() {
        Duration::ZERO
    } else {
        s[s.len() / 2]
    }
}

/// Fill a volume with `data_bytes` of written (not sparse) data, then time
/// `runs` snapshots and `runs` clones of it, each removed before the next.
pub fn snapshot_and_clone(pool_dir: &Path, data_bytes: u64, runs: usize, allow_reflink: bool) -> Result<PoolBenchResult, String> {
    let config = PoolConfig { allow_reflink, ..PoolConfig::default() };
    let (pool, _) = Pool::open(pool_dir, config).map_err(|e| e.to_string())?;
    let id = format!("bench-src-{}", data_bytes >> 20);
    let _ = pool.delete_volume(&id);
    pool.create_volume(CreateVolume {
        id: id.clone(),
        size_bytes: data_bytes,
        provisioning: Provisioning::Thin,
        source: None,
        metadata: BTreeMap::new(),
    })
    .map_err(|e| e.to_string())?;
    fill(&pool.volume_image(&id), data_bytes).map_err(|e| format!("filling the volume: {e}"))?;
    let mut result = PoolBenchResult { data_bytes, reflink: pool.reflink(), snapshot: vec![], clone: vec![] };
    for i in 0..runs {
        let snap = format!("bench-snap-{i}");
        let t = Instant::now();
        pool.create_snapshot(&snap, &id, BTreeMap::new()).map_err(|e| e.to_string())?;
        result.snapshot.push(t.elapsed());
        pool.delete_snapshot(&snap).map_err(|e| e.to_string())?;

        let clone = format!("bench-clone-{i}");
        let t = Instant::now();
        pool.create_volume(CreateVolume {
            id: clone.clone(),
            size_bytes: data_bytes,
            provisioning: Provisioning::Thin,
            source: Some(VolumeSource::Volume(id.clone())),
            metadata: BTreeMap::new(),
        })
        .map_err(|e| e.to_string())?;
        result.clone.push(t.elapsed());
        pool.delete_volume(&clone).map_err(|e| e.to_string())?;
    }
    pool.delete_volume(&id).map_err(|e| e.to_string())?;
    Ok(result)
}

/// Write real data over the whole image in 4 MiB blocks (each block differs,
/// so nothing dedups or compresses away), then fsync.
fn fill(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut block = vec![0u8; 4 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let mut written = 0u64;
    let mut n: u64 = 0;
    while written < bytes {
        block[..8].copy_from_slice(&n.to_le_bytes());
        let len = (block.len() as u64).min(bytes - written) as usize;
        f.write_all(&block[..len])?;
        written += len as u64;
        n += 1;
    }
    f.sync_all()
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub struct CreateBenchRow {
    pub concurrency: usize,
    pub count: usize,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
}

pub fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i]
}

/// The 1-minute load average, to print beside figures taken on a shared machine.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next().and_then(|l| l.parse().ok())).unwrap_or(0.0)
}

/// A CSI Controller client for `endpoint` (unix:// or http://).
async fn controller_client(
    endpoint: &str,
) -> Result<cinderblock::csi::controller_client::ControllerClient<tonic::transport::Channel>, String> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("cannot reach {endpoint}: {e}"))?;
    Ok(cinderblock::csi::controller_client::ControllerClient::new(channel))
}

/// CreateVolume end to end through a running endpoint (standalone): `count`
/// distinct volumes at the given concurrency, timed per call; then deleted.
pub async fn create_volumes(endpoint: &str, concurrency: usize, count: usize, tag: &str, size: u64) -> Result<CreateBenchRow, String> {
    use cinderblock::csi;
    let client = controller_client(endpoint).await?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let mut c = client.clone();
        let next = next.clone();
        let tag = tag.to_string();
        workers.spawn(async move {
            let mut lat = vec![];
            let mut ids = vec![];
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= count {
                    break;
                }
                let t = Instant::now();
                let r = c
                    .create_volume(csi::CreateVolumeRequest {
                        name: format!("bench-{tag}-{i}"),
                        capacity_range: Some(csi::CapacityRange { required_bytes: size as i64, limit_bytes: 0 }),
                        volume_capabilities: vec![csi::VolumeCapability {
                            access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
                            access_mode: Some(csi::volume_capability::AccessMode {
                                mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                            }),
                        }],
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| format!("CreateVolume: {}", s.message()))?;
                lat.push(t.elapsed());
                ids.push(r.into_inner().volume.map(|v| v.volume_id).unwrap_or_default());
            }
            Ok::<_, String>((lat, ids))
        });
    }
    let mut lat = vec![];
    let mut ids = vec![];
    while let Some(r) = workers.join_next().await {
        let (l, i) = r.map_err(|e| e.to_string())??;
        lat.extend(l);
        ids.extend(i);
    }
    let elapsed = start.elapsed();
    // Deleted the same way, so the next level starts from an empty driver.
    let ids = std::sync::Arc::new(std::sync::Mutex::new(ids));
    let mut deleters = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(16) {
        let (mut c, ids) = (client.clone(), ids.clone());
        deleters.spawn(async move {
            loop {
                let Some(id) = ids.lock().unwrap_or_else(|p| p.into_inner()).pop() else { return };
                let _ = c.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await;
            }
        });
    }
    while deleters.join_next().await.is_some() {}
    Ok(CreateBenchRow { concurrency, count, elapsed, p50: percentile(&lat, 0.5), p99: percentile(&lat, 0.99) })
}

/// The resident memory of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb << 10)
}

/// Creates `count` volumes named `scale-<i>` (existing ones answer at once:
/// CreateVolume is idempotent), `concurrency` at a time, printing progress.
pub async fn fill_volumes(endpoint: &str, count: usize, concurrency: usize) -> Result<Duration, String> {
    use cinderblock::csi;
    let client = controller_client(endpoint).await?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (mut c, next) = (client.clone(), next.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= count {
                    return Ok::<_, String>(());
                }
                if i % 10_000 == 0 && i > 0 {
                    eprintln!("  {i} volumes, {:.0}/s", i as f64 / start.elapsed().as_secs_f64());
                }
                c.create_volume(csi::CreateVolumeRequest {
                    name: format!("scale-{i}"),
                    capacity_range: Some(csi::CapacityRange { required_bytes: 1 << 20, limit_bytes: 0 }),
                    volume_capabilities: vec![csi::VolumeCapability {
                        access_type: Some(csi::volume_capability::AccessType::Block(Default::default())),
                        access_mode: Some(csi::volume_capability::AccessMode {
                            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                        }),
                    }],
                    ..Default::default()
                })
                .await
                .map_err(|s| format!("CreateVolume scale-{i}: {}", s.message()))?;
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    Ok(start.elapsed())
}

/// Walks ListVolumes in pages of `page`, timing each call; returns the
/// number of volumes seen and each page's time.
pub async fn walk_pages(endpoint: &str, page: i32, most: usize) -> Result<(usize, Vec<Duration>), String> {
    use cinderblock::csi;
    let mut c = controller_client(endpoint).await?;
    let (mut token, mut seen, mut times) = (String::new(), 0, vec![]);
    while times.len() < most {
        let t = Instant::now();
        let r = c
            .list_volumes(csi::ListVolumesRequest { max_entries: page, starting_token: token })
            .await
            .map_err(|s| format!("ListVolumes: {}", s.message()))?
            .into_inner();
        times.push(t.elapsed());
        seen += r.entries.len();
        token = r.next_token;
        if token.is_empty() {
            break;
        }
    }
    Ok((seen, times))
}

/// See `bench kube-start`: makes BlockVolume objects up to `objects`, then
/// times a watching store's start (every kind listed into its cache).
pub async fn kube_start(kubeconfig: &Path, objects: usize) -> Result<(), String> {
    use cinderblock::controller::records::{Phase, VolumeRec};
    use cinderblock::store::{self, Kind, Store};
    let client = cinderblock::kube::client(Some(kubeconfig)).await?;
    let direct = std::sync::Arc::new(cinderblock::kube::KubeStore::new(client.clone()));
    let have = {
        let api: kube::Api<kube::core::DynamicObject> =
            kube::Api::all_with(client.clone(), &kube::core::ApiResource::erase::<cinderblock::kube::crds::BlockVolume>(&()));
        let mut n = 0;
        let mut lp = kube::api::ListParams::default().limit(500);
        loop {
            let page = api.list_metadata(&lp).await.map_err(|e| e.to_string())?;
            n += page.items.len();
            match page.metadata.continue_ {
                Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
                _ => break,
            }
        }
        n
    };
    if have < objects {
        println!("making {} BlockVolume objects ({have} exist)", objects - have);
        let started = Instant::now();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(have));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (s, next) = (direct.clone(), next.clone());
            workers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= objects {
                        return Ok::<_, String>(());
                    }
                    let name = format!("kube-start-{i}");
                    let id = cinderblock::controller::records::volume_id_for(&name);
                    let rec = VolumeRec {
                        id: id.clone(),
                        name,
                        size_bytes: 1 << 30,
                        node: Some(format!("node-{}", i % 100)),
                        phase: Phase::Available,
                        source: None,
                        provisioning: Default::default(),
                        parameters: Default::default(),
                        fingerprint: "bench".into(),
                        accessibility: Default::default(),
                        copy: None,
                        migration: None,
                        accessible_topology: vec![],
                        attempts: vec![],
                        error: None,
                        metadata: [("csi.storage.k8s.io/pvc/name".to_string(), format!("claim-{i}"))].into(),
                        created_ms: 1,
                        updated_ms: 1,
                    };
                    match store::create_json(&*s, Kind::Volume, &id, &rec).await {
                        Ok(_) | Err(cinderblock::store::StoreError::AlreadyExists { .. }) => {}
                        Err(e) => return Err(e.to_string()),
                    }
                }
            });
        }
        while let Some(r) = workers.join_next().await {
            r.map_err(|e| e.to_string())??;
        }
        println!("made in {:.1} s", started.elapsed().as_secs_f64());
    }
    let t0 = Instant::now();
    let store = cinderblock::kube::KubeStore::watching(client, "default", Duration::from_secs(600)).await.map_err(|e| e.to_string())?;
    let took = t0.elapsed();
    let n = store.list_page(Kind::Volume, None, usize::MAX).await.map_err(|e| e.to_string())?.len();
    println!(
        "kube store start with {n} BlockVolume objects: caches filled in {:.2} s (load {:.1}); RSS of this process {:.1} MiB",
        took.as_secs_f64(),
        load_average(),
        rss_bytes(std::process::id()) as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// Runs one `cinderblock bench` command.
pub async fn run(cmd: BenchCommand) -> Result<(), String> {
    match cmd {
        BenchCommand::Create { concurrency, count, nodes, data_dir, endpoint, label, csv, size } => {
            let tmp = std::env::temp_dir().join(format!("cinderblock-bench-create-{}", std::process::id()));
            let dir = data_dir.unwrap_or_else(|| tmp.clone());
            let mut child = None;
            let endpoint = match endpoint {
                Some(e) => e,
                None => {
                    let sock = dir.join("csi.sock");
                    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                    child = Some(
                        tokio::process::Command::new(exe)
                            .args(["standalone", "--data-dir"])
                            .arg(&dir)
                            .args(["--nodes", &nodes.to_string(), "--endpoint"])
                            .arg(format!("unix://{}", sock.display()))
                            .env("RUST_LOG", "warn")
                            .kill_on_drop(true)
                            .spawn()
                            .map_err(|e| e.to_string())?,
                    );
                    format!("unix://{}", sock.display())
                }
            };
            let sock = server::unix_endpoint_path(&endpoint)?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while tokio::net::UnixStream::connect(&sock).await.is_err() {
                if std::time::Instant::now() > deadline {
                    return Err(format!("nothing answers on {endpoint}"));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            if !csv {
                println!("{label}: {count} volumes of {} per level", cinderblock::units::format_bytes(size));
                println!("{:>11} {:>7} {:>12} {:>10} {:>10} {:>6}", "concurrency", "volumes", "volumes/s", "p50 ms", "p99 ms", "load");
            }
            for c in concurrency {
                let n = count.max(c * 4);
                let r = create_volumes(&endpoint, c, n, &format!("{label}-c{c}"), size).await?;
                let load = load_average();
                let rate = r.count as f64 / r.elapsed.as_secs_f64();
                if csv {
                    println!("{label},{},{},{rate:.1},{:.2},{:.2},{load:.1}", r.concurrency, r.count, ms(r.p50), ms(r.p99));
                } else {
                    println!("{:>11} {:>7} {:>12.1} {:>10.2} {:>10.2} {:>6.1}", r.concurrency, r.count, rate, ms(r.p50), ms(r.p99), load);
                }
            }
            if let Some(mut child) = child {
                let _ = child.kill().await;
            }
            if dir == tmp {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Ok(())
        }
        BenchCommand::Scale { volumes, data_dir, concurrency, publications } => {
            bench_scale(volumes, data_dir, concurrency, publications).await
        }
        BenchCommand::KubeStart { kubeconfig, objects } => kube_start(&kubeconfig, objects).await,
        BenchCommand::Pool { pool, sizes_gib, runs, no_reflink } => {
            println!(
                "{:<10} {:>8} {:>10} {:>14} {:>14} {:>14} {:>14}",
                "filesystem", "data", "method", "snapshot p50", "snapshot max", "clone p50", "clone max"
            );
            for gib in sizes_gib {
                let dir = pool.clone();
                let r = tokio::task::spawn_blocking(move || snapshot_and_clone(&dir, gib << 30, runs, !no_reflink))
                    .await
                    .map_err(|e| e.to_string())??;
                let fs = cinderblock::volume::Pool::open(&pool, PoolConfig::default())
                    .map(|(p, _)| p.status().map(|s| s.filesystem).unwrap_or_default())
                    .unwrap_or_default();
                let max = |v: &[std::time::Duration]| v.iter().max().copied().unwrap_or_default();

                println!(
                    "{:<10} {:>6}Gi {:>10} {:>11.2} ms {:>11.2} ms {:>11.2} ms {:>11.2} ms",
                    fs,
                    r.data_bytes >> 30,
                    if r.reflink { "reflink" } else { "copy" },
                    ms(median(&r.snapshot)),
                    ms(max(&r.snapshot)),
                    ms(median(&r.clone)),
                    ms(max(&r.clone))
                );
            }
            Ok(())
        }
    }
}

/// Seconds between the reconciler's passes in `bench scale` (the default is 30).
const RECONCILE_EVERY: u32 = 10;

/// See `BenchCommand::Scale`.
/// Publish the first `wanted` volumes of the store (by ID) locally on their
/// own node, as the controller records a local publication, unless the
/// store holds that many publications already. Returns how many it made
/// and how many there are.
async fn add_publications(store_file: &Path, wanted: usize) -> Result<(usize, usize), String> {
    use cinderblock::controller::publish::TRANSPORT_LOCAL;
    use cinderblock::controller::records::{export_id_for, ExportRec, Phase, VolumeRec};
    use cinderblock::store::{self, EmbeddedStore, Kind};
    let s = EmbeddedStore::open(store_file).map_err(|e| format!("opening {}: {e}", store_file.display()))?;
    let held = store::list_json::<ExportRec>(&s, Kind::Export).await.map_err(|e| e.to_string())?.len();
    if held >= wanted {
        return Ok((0, held));
    }
    let mut made = 0;
    let mut after: Option<String> = None;
    while held + made < wanted {
        let page = store::list_page_json::<VolumeRec>(&s, Kind::Volume, after.as_deref(), store::PAGE).await.map_err(|e| e.to_string())?;
        let Some((last, _, _)) = page.last() else { break };
        after = Some(last.clone());
        for (id, v, _) in page {
            let Some(node) = v.node.clone().filter(|_| v.phase == Phase::Available) else { continue };
            let rec = ExportRec {
                id: export_id_for(&id, &node),
                volume_id: id,
                node_id: node.clone(),
                protocol: TRANSPORT_LOCAL.into(),
                address: String::new(),
                export_name: String::new(),
                phase: Phase::Available,
                owner_node: node,
                read_only: false,
                plain_text: false,
            };
            match store::create_json(&s, Kind::Export, &rec.id, &rec).await {
                Ok(_) => made += 1,
                Err(store::StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.to_string()),
            }
            if held + made >= wanted {
                break;
            }
        }
    }
    if held + made < wanted {
        eprintln!("only {} Available volumes to publish: {} publications, not {wanted}", held + made, held + made);
    }
    Ok((made, held + made))
}

async fn bench_scale(volumes: usize, data_dir: PathBuf, concurrency: usize, publications: usize) -> Result<(), String> {
    std::fs::create_dir_all(&data_dir).map_err(|e| e.to_string())?;
    let data_dir = data_dir.canonicalize().map_err(|e| e.to_string())?;
    let sock = data_dir.join("csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // The reconciler runs as it does for a user, a little more often (its
    // health pass is what ListVolumes answers from). Each start counts the
    // health passes its log reports.
    let start = || {
        let _ = std::fs::remove_file(&sock);
        let mut child = tokio::process::Command::new(&exe)
            .args(["standalone", "--data-dir"])
            .arg(&data_dir)
            .args(["--nodes", "3", "--endpoint", &endpoint, "--reconcile-interval", &RECONCILE_EVERY.to_string()])
            .env("RUST_LOG", "warn,cinderblock::controller::health=info")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| e.to_string())?;
        let (passes, seen) = tokio::sync::watch::channel(Vec::<String>::new());
        let stderr = child.stderr.take().ok_or("no stderr")?;
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("volume health checked") {
                    passes.send_modify(|p| p.push(line));
                } else {
                    eprintln!("{line}");
                }
            }
        });
        Ok::<_, String>((child, seen))
    };
    // Ready: the socket answers a first page of ListVolumes.
    let ready = |t0: std::time::Instant| {
        let endpoint = endpoint.clone();
        async move {
            loop {
                if walk_pages(&endpoint, 1, 1).await.is_ok() {
                    return Ok::<_, String>(t0.elapsed());
                }
                if t0.elapsed() > std::time::Duration::from_secs(600) {
                    return Err("the standalone did not answer within 10 minutes".to_string());
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    };
    let (mut child, _) = start()?;
    ready(std::time::Instant::now()).await?;
    println!("filling to {volumes} volumes ({concurrency} at a time; existing ones answer at once)");
    let took = fill_volumes(&endpoint, volumes, concurrency).await?;
    println!("{volumes} volumes in place after {:.1} s (load {:.1})", took.as_secs_f64(), load_average());
    // Let the reports and a reconciler-free steady state settle, then measure.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let pid = child.id().unwrap_or(0);
    let (seen, _) = walk_pages(&endpoint, 1000, usize::MAX).await?;
    let rss = rss_bytes(pid);
    println!("volumes listed: {seen}");
    println!(
        "RSS of the standalone (controller + 3 nodes' pools) after a full listing: {:.1} MiB (load {:.1})",
        rss as f64 / (1 << 20) as f64,
        load_average()
    );
    let _ = child.kill().await;
    if publications > 0 {
        let (made, held) = add_publications(&data_dir.join("store.redb"), publications).await?;
        println!("publications in the store: {held} ({made} made now)");
    }
    let t0 = std::time::Instant::now();
    let (mut child, mut passes) = start()?;
    let restart = ready(t0).await?;
    let ready_at = std::time::Instant::now();
    println!(
        "restart to ready (process start to the first ListVolumes answer): {:.2} s (load {:.1})",
        restart.as_secs_f64(),
        load_average()
    );
    let pages = |what: &str, times: &[std::time::Duration]| {
        println!(
            "ListVolumes, pages of 100, {what}: {} pages, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (load {:.1})",
            times.len(),
            ms(percentile(times, 0.5)),
            ms(percentile(times, 0.99)),
            ms(times.iter().max().copied().unwrap_or_default()),
            load_average()
        )
    };
    if passes.borrow().is_empty() {
        let (_, times) = walk_pages(&endpoint, 100, 300).await?;
        pages("before the first health pass (each page asks the nodes)", &times);
    }
    passes.wait_for(|p| !p.is_empty()).await.map_err(|_| "the standalone ended before its first health pass".to_string())?;
    println!(
        "first health pass ended {:.1} s after ready: {}",
        ready_at.elapsed().as_secs_f64(),
        passes.borrow()[0].split("volume health checked").nth(1).unwrap_or("").trim()
    );
    let (_, times) = walk_pages(&endpoint, 100, 300).await?;
    pages("answered from that pass", &times);
    println!("RSS after restart and 300 pages: {:.1} MiB", rss_bytes(child.id().unwrap_or(0)) as f64 / (1 << 20) as f64);
    let _ = child.kill().await;
    Ok(())
}
