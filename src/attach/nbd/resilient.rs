//! A client that outlives its connections: when the server goes away (the
//! owner's agent restarts, the network breaks) requests wait while it
//! reconnects, then are sent again, so I/O pauses instead of failing.
//!
//! Safe replay. Every NBD request is idempotent (a write sent twice leaves
//! the same bytes), so a request whose reply was lost is simply sent again.
//! The harder case is a write the old server acknowledged but never made
//! durable (its host lost power before a FLUSH): a FLUSH on the new
//! connection would then wrongly cover it. So writes acknowledged since the
//! last successful FLUSH are kept (up to `replay_limit` bytes, past which we
//! FLUSH early to empty the buffer) and written again, in order, on every
//! new connection before anything else is sent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::RwLock;
use tracing::{info, warn};

use super::client::{Client, ExportInfo, NbdError, Target};

#[derive(Debug, Clone)]
pub struct ReconnectPolicy {
    /// Give up (and fail I/O with the error) after the server has been
    /// unreachable this long.
    pub give_up_after: Duration,
    /// Time allowed for one connection attempt and handshake.
    pub connect_timeout: Duration,
    /// Bytes of acknowledged, not yet flushed writes kept for replay.
    pub replay_limit: usize,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy { give_up_after: Duration::from_secs(300), connect_timeout: Duration::from_secs(10), replay_limit: 64 << 20 }
    }
}

struct Unflushed {
    writes: VecDeque<(u64, Arc<Vec<u8>>)>,
    bytes: usize,
}

pub struct ResilientClient {
    target: Target,
    policy: ReconnectPolicy,
    current: RwLock<Arc<Client>>,
    /// Bumped on every reconnect; a failed request reconnects only if no one
    /// else already did since it started.
    generation: AtomicU64,
    reconnect: tokio::sync::Mutex<()>,
    unflushed: Mutex<Unflushed>,
    info: ExportInfo,
    reconnects: AtomicU64,
}

impl ResilientClient {
    pub async fn connect(target: Target, policy: ReconnectPolicy) -> Result<ResilientClient, NbdError> {
        let client = Client::connect(&target, policy.connect_timeout).await?;
        let info = client.info();
        Ok(ResilientClient {
            target,
            policy,
            current: RwLock::new(Arc::new(client)),
            generation: AtomicU64::new(0),
            reconnect: tokio::sync::Mutex::new(()),
            unflushed: Mutex::new(Unflushed { writes: VecDeque::new(), bytes: 0 }),
            info,
            reconnects: AtomicU64::new(0),
        })
    }

    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// How many times a connection was replaced.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    async fn client(&self) -> (Arc<Client>, u64) {
        let c = self.current.read().await.clone();
        (c, self.generation.load(Ordering::Acquire))
    }

    /// Replace the connection that failed at `seen` (unless someone already
    /// did), replaying unflushed writes on the new one.
    async fn reconnect(&self, seen: u64, since: Instant) -> Result<(), NbdError> {
        let _one = self.reconnect.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return Ok(());
        }
        let mut delay = Duration::from_millis(50);
        loop {
            match Client::connect(&self.target, self.policy.connect_timeout).await {
                Ok(client) => {
                    let info = client.info();
                    if info.size < self.info.size {
                        return Err(NbdError::Protocol(format!(
                            "the export shrank from {} to {} bytes across a reconnect",
                            self.info.size, info.size
                        )));
                    }
                    let replay: Vec<(u64, Arc<Vec<u8>>)> = self.unflushed.lock().unwrap().writes.iter().cloned().collect();
                    let mut ok = true;
                    for (offset, data) in &replay {
                        if let Err(e) = client.write(*offset, data, false).await {
                            warn!(error = %e, "replaying an unflushed write failed; reconnecting again");
                            ok = false;
                            break;
                        }
                    }
                    if ok {
                        *self.current.write().await = Arc::new(client);
                        self.generation.fetch_add(1, Ordering::AcqRel);
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                        info!(address = %self.target.address, replayed = replay.len(), paused_ms = since.elapsed().as_millis() as u64, "NBD connection restored");
                        return Ok(());
                    }
                }
                Err(e) if e.is_connection_loss() || matches!(e, NbdError::Refused { .. }) => {
                    if since.elapsed() > self.policy.give_up_after {
                        return Err(e);
                    }
                    warn!(address = %self.target.address, error = %e, "NBD server unreachable; retrying");
                }
                Err(e) => return Err(e),
            }
            if since.elapsed() > self.policy.give_up_after {
                return Err(NbdError::Closed);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Run `op` on the current connection, reconnecting and retrying while
    /// the failure is the connection's.
    async fn with_retry<T, F, Fut>(&self, op: F) -> Result<T, NbdError>
    where
        F: Fn(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T, NbdError>>,
    {
        let mut since: Option<Instant> = None;
        loop {
            let (client, generation) = self.client().await;
            match op(client).await {
                Err(e) if e.is_connection_loss() => {
                    let started = *since.get_or_insert_with(Instant::now);
                    self.reconnect(generation, started).await?;
                }
                other => return other,
            }
        }
    }

    pub async fn read(&self, offset: u64, length: u32) -> Result<Vec<u8>, NbdError> {
        self.with_retry(|c| async move { c.read(offset, length).await }).await
    }

    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), NbdError> {
        let data = Arc::new(data);
        let d = data.clone();
        self.with_retry(move |c| {
            let d = d.clone();
            async move { c.write(offset, &d, fua).await }
        })
        .await?;
        if !fua {
            let full = {
                let mut u = self.unflushed.lock().unwrap();
                u.bytes += data.len();
                u.writes.push_back((offset, data));
                u.bytes > self.policy.replay_limit
            };
            if full {
                self.flush().await?;
            }
        }
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), NbdError> {
        // Only writes acknowledged before the flush was sent are covered.
        let covered = self.unflushed.lock().unwrap().writes.len();
        self.with_retry(|c| async move { c.flush().await }).await?;
        let mut u = self.unflushed.lock().unwrap();
        for _ in 0..covered.min(u.writes.len()) {
            if let Some((_, d)) = u.writes.pop_front() {
                u.bytes -= d.len();
            }
        }
        Ok(())
    }

    pub async fn trim(&self, offset: u64, length: u32) -> Result<(), NbdError> {
        self.with_retry(|c| async move { c.trim(offset, length).await }).await
    }

    pub async fn write_zeroes(&self, offset: u64, length: u32, no_hole: bool) -> Result<(), NbdError> {
        // A replayed older write must not land on zeroed bytes: empty the
        // replay buffer first, and make the zeroes durable at once (zeroing
        // is rare: mkfs, discard).
        self.flush().await?;
        self.with_retry(|c| async move { c.write_zeroes(offset, length, no_hole).await }).await?;
        self.flush().await
    }

    pub async fn disconnect(&self) -> Result<(), NbdError> {
        let (c, _) = self.client().await;
        c.flush().await?;
        c.disconnect().await
    }
}
