//! `cinderblock bench`: figures for the claims we make. Prints, never asserts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::volume::pool::CreateVolume;
use crate::volume::{Pool, PoolConfig, Provisioning, VolumeSource};

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
