//! Cross-node copies: a new volume whose source (a snapshot or a volume)
//! lives on another node is filled from that node's NBD export of it. Only
//! the ranges the source has allocated are read (BLOCK_STATUS
//! `base:allocation`); holes stay holes in the new image, so a thin 100 GiB
//! volume holding 1 GiB copies 1 GiB.
//!
//! Each copy is a task of this process: reads run several requests deep
//! on one connection, writes go to the volume's `.partial` image in order,
//! and every so often the image is synced and the pool notes how far the
//! copy got (`resume_at`), so a copy interrupted by an agent restart goes
//! on from there (`resume_all` at start), and one whose connection breaks
//! reconnects. Deleting the volume cancels its copy first.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tracing::{info, warn};

use crate::attach::nbd::{tls_to_node, Client, Target};
use crate::export::proto::{STATE_HOLE, STATE_ZERO};
use crate::metrics::{PoolLabels, METRICS};
use crate::tls::TlsDir;
use crate::volume::Pool;

/// Bytes per read request (our server takes up to 32 MiB).
const CHUNK: u64 = 4 << 20;
/// Read requests in flight on the connection.
const DEPTH: usize = 8;
/// Sync and note progress after this many bytes, or this much time.
const NOTE_BYTES: u64 = 64 << 20;
const NOTE_EVERY: Duration = Duration::from_secs(2);
/// Extents asked per BLOCK_STATUS request.
const MAP_SPAN: u64 = 1 << 30;

/// What a running (or stopped) copy reports.
#[derive(Default)]
pub struct Progress {
    pub copied: AtomicU64,
    pub total: AtomicU64,
    /// The last error, while the copy retries.
    pub problem: Mutex<String>,
}

struct Job {
    progress: Arc<Progress>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Copier {
    pool: Arc<Pool>,
    tls: Arc<TlsDir>,
    node_id: String,
    jobs: Mutex<HashMap<String, Job>>,
}

impl Copier {
    pub fn new(pool: Arc<Pool>, tls: Arc<TlsDir>, node_id: String) -> Arc<Copier> {
        Arc::new(Copier { pool, tls, node_id, jobs: Mutex::new(HashMap::new()) })
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Go on with every copy the pool holds (after a restart).
    pub fn resume_all(self: &Arc<Self>) {
        for v in self.pool.copies() {
            info!(volume.id = %v.id, resume_at = v.copy.as_ref().map(|c| c.resume_at).unwrap_or(0), "resuming a cross-node copy");
            self.ensure(&v.id);
        }
    }

    fn still_copying(&self, id: &str) -> bool {
        self.pool.get_volume(id).is_ok_and(|v| v.state == crate::volume::State::Creating && v.copy.as_ref().is_some_and(|c| !c.pass_done))
    }

    /// Run the copy of `id` unless it runs already (or is done).
    pub fn ensure(self: &Arc<Self>, id: &str) {
        let mut jobs = self.jobs();
        if jobs.get(id).is_some_and(|j| !j.task.is_finished()) || !self.still_copying(id) {
            return;
        }
        let progress = Arc::new(Progress::default());
        let (me, vol, p) = (self.clone(), id.to_string(), progress.clone());
        let task = tokio::spawn(async move { me.run(&vol, &p).await });
        jobs.insert(id.to_string(), Job { progress, task });
    }

    /// (copied, total, problem) of a copy this process runs or ran.
    pub fn progress(&self, id: &str) -> Option<(u64, u64, String)> {
        let jobs = self.jobs();
        let p = &jobs.get(id)?.progress;
        let problem = p.problem.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Some((p.copied.load(Ordering::Relaxed), p.total.load(Ordering::Relaxed), problem))
    }

    /// Stop the copy of `id` (its volume is being deleted) and wait until it
    /// no longer runs.
    pub async fn cancel(&self, id: &str) {
        let job = self.jobs().remove(id);
        if let Some(job) = job {
            job.task.abort();
            let _ = job.task.await;
            info!(volume.id = %id, "cross-node copy cancelled");
        }
    }

    /// Copy until done, reconnecting after failures (the source's agent may
    /// restart; the controller cancels a copy that makes no progress).
    async fn run(&self, id: &str, progress: &Progress) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let before = progress.copied.load(Ordering::Relaxed);
            match self.copy_once(id, progress).await {
                Ok(()) => break,
                Err(_) if !self.still_copying(id) => return, // deleted, or finished by an earlier run
                Err(e) => {
                    warn!(volume.id = %id, error = %e, "cross-node copy interrupted; retrying");
                    *progress.problem.lock().unwrap_or_else(|p| p.into_inner()) = e;
                    if progress.copied.load(Ordering::Relaxed) > before {
                        backoff = Duration::from_millis(200);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        let pool = self.pool.clone();
        let vol = id.to_string();
        // A migration's pass with more to follow waits for the next one;
        // the last pass (or a one-time copy) makes the volume whole.
        let finish = move || match pool.get_volume(&vol)?.copy {
            Some(c) if c.more_passes => pool.note_pass_done(&vol),
            _ => pool.finish_copy(&vol).map(|_| ()),
        };
        match tokio::task::spawn_blocking(finish).await {
            Ok(Ok(_)) => progress.problem.lock().unwrap_or_else(|p| p.into_inner()).clear(),
            Ok(Err(e)) => *progress.problem.lock().unwrap_or_else(|p| p.into_inner()) = format!("finishing the copy: {e}"),
            Err(e) => *progress.problem.lock().unwrap_or_else(|p| p.into_inner()) = format!("finishing the copy: {e}"),
        }
    }

    /// One connection's worth of copying, from the last durable point.
    async fn copy_once(&self, id: &str, progress: &Progress) -> Result<(), String> {
        let pool = self.pool.clone();
        let vol = id.to_string();
        let (file, rec) =
            tokio::task::spawn_blocking(move || pool.copy_target(&vol)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        let file = Arc::new(file);
        let from = rec.copy.clone().ok_or("the volume is not being copied")?;
        let tls = tls_to_node(self.tls.clone(), &from.server_node)?;
        let target = Target { address: from.address.clone(), export: from.export_name.clone(), tls: Some(tls) };
        let client = Client::connect(&target, Duration::from_secs(30))
            .await
            .map_err(|e| format!("connecting to {}'s export: {e}", from.server_node))?;
        let info = client.info();
        if !info.block_status {
            return Err(format!("node {}'s NBD server gives no block status; cannot copy only what is allocated", from.server_node));
        }
        if info.size > rec.size_bytes {
            return Err(format!("the source has {} bytes, more than the new volume's {}", info.size, rec.size_bytes));
        }
        // Map what is left, then read only the allocated ranges. A
        // migration pass's export says which ranges became zeroes (ZERO
        // without HOLE): those are punched here, not read.
        let mut extents: Vec<(u64, u64)> = Vec::new();
        let mut zeroes: Vec<(u64, u64)> = Vec::new();
        let mut off = from.resume_at.min(info.size);
        while off < info.size {
            let span = (info.size - off).min(MAP_SPAN) as u32;
            let map = client.block_status(off, span).await.map_err(|e| format!("mapping the source at {off}: {e}"))?;
            if map.is_empty() || map[0].0 == 0 {
                return Err(format!("the source's block status at {off} is empty"));
            }
            for (len, flags) in map {
                let len = (len as u64).min(info.size - off);
                if flags & STATE_HOLE == 0 && flags & STATE_ZERO != 0 {
                    zeroes.push((off, len));
                } else if flags & STATE_HOLE == 0 {
                    match extents.last_mut() {
                        Some((o, l)) if *o + *l == off => *l += len,
                        _ => extents.push((off, len)),
                    }
                }
                off += len;
                if off >= info.size {
                    break;
                }
            }
        }
        if !zeroes.is_empty() {
            let f = file.clone();
            tokio::task::spawn_blocking(move || punch(&f, &zeroes))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("punching ranges that became zeroes: {e}"))?;
        }
        let left: u64 = extents.iter().map(|(_, l)| l).sum();
        let total = from.copied_bytes + left;
        progress.total.store(total, Ordering::Relaxed);
        progress.copied.store(from.copied_bytes, Ordering::Relaxed);
        let chunks =
            extents.into_iter().flat_map(|(o, l)| (0..l.div_ceil(CHUNK)).map(move |i| (o + i * CHUNK, (l - i * CHUNK).min(CHUNK))));
        let client = &client;
        let reads =
            futures::stream::iter(chunks).map(|(o, l)| async move { client.read(o, l as u32).await.map(|d| (o, d)) }).buffered(DEPTH);
        let counter = METRICS.volume_copy_bytes.get_or_create(&PoolLabels { node: self.node_id.clone() }).clone();
        // Reading and writing overlap: the reads go on (DEPTH of them in
        // flight) while the chunks read so far are written, in order, so
        // each noted resume point has everything before it on disk.
        let (to_writer, mut written) = tokio::sync::mpsc::channel::<(u64, Vec<u8>)>(DEPTH);
        let reader = async move {
            let mut reads = std::pin::pin!(reads);
            while let Some(read) = reads.next().await {
                let chunk = read.map_err(|e| format!("reading the source: {e}"))?;
                if to_writer.send(chunk).await.is_err() {
                    break; // the writer failed; its error is the one returned
                }
            }
            Ok::<(), String>(())
        };
        let writer = async {
            let (mut copied, mut unnoted, mut noted_at) = (from.copied_bytes, 0u64, Instant::now());
            while let Some((o, data)) = written.recv().await {
                let len = data.len() as u64;
                let f = file.clone();
                tokio::task::spawn_blocking(move || f.write_all_at(&data, o))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("writing the new image: {e}"))?;
                copied += len;
                unnoted += len;
                counter.inc_by(len);
                progress.copied.store(copied, Ordering::Relaxed);
                if unnoted >= NOTE_BYTES || noted_at.elapsed() >= NOTE_EVERY {
                    self.note(id, &file, o + len, copied, total).await?;
                    (unnoted, noted_at) = (0, Instant::now());
                }
            }
            Ok::<u64, String>(copied)
        };
        let ((), copied) = tokio::try_join!(reader, writer)?;
        self.note(id, &file, info.size, copied, total).await?;
        let _ = client.disconnect().await;
        info!(volume.id = %id, copied, server = %from.server_node, "cross-node copy complete");
        Ok(())
    }

    /// Make what was written durable, then note it.
    async fn note(&self, id: &str, file: &Arc<std::fs::File>, resume_at: u64, copied: u64, total: u64) -> Result<(), String> {
        let (pool, f, vol) = (self.pool.clone(), file.clone(), id.to_string());
        tokio::task::spawn_blocking(move || {
            f.sync_data().map_err(|e| format!("syncing the new image: {e}"))?;
            pool.note_copy_progress(&vol, resume_at, copied, total).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Make `ranges` of the image read as zeroes without keeping blocks for them.
fn punch(f: &std::fs::File, ranges: &[(u64, u64)]) -> std::io::Result<()> {
    use rustix::fs::FallocateFlags;
    for &(off, len) in ranges {
        match rustix::fs::fallocate(f, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, off, len) {
            Ok(()) => {}
            Err(rustix::io::Errno::OPNOTSUPP) => {
                let zeroes = vec![0u8; (len as usize).min(1 << 20)];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zeroes.len() as u64) as usize;
                    f.write_all_at(&zeroes[..n], off + done)?;
                    done += n as u64;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
