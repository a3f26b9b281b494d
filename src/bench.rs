//! `cinderblock bench`: figures for the claims we make. Prints, never asserts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use cinderblock::volume::pool::CreateVolume;
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
