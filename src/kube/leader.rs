//! Leader election on a coordination.k8s.io Lease: one controller replica
//! runs flows and the reconciler; a standby takes over when the leader's
//! lease has not been renewed for its duration.
//!
//! It cannot split: every Lease call has a deadline; a leader that has not
//! renewed within the renew deadline (shorter than the lease) stops acting
//! on its own clock, before any standby may take over; and each term
//! carries a fencing token (the Lease's transition count, raised by every
//! takeover) that node agents hold on to, so a leader that was paused past
//! its term is refused by any agent its successor has reached.
//!
//! The leader also writes where its standbys can reach it (its peer
//! address, an annotation on the Lease): the CSI sidecars elect their own
//! leaders, which may run beside a standby, and a standby hands their calls
//! on to the leader (controller/forward.rs).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use std::collections::BTreeMap;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::controller::Leadership;

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    /// How long a Lease lasts without renewal before another replica may take it.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops acting. Shorter
    /// than the lease, so it stops before anyone else may start.
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry_period: Duration,
    /// Where standbys reach this replica while it leads ("host:port" of its
    /// peer server), written on the Lease; None: it does not serve peers.
    pub peer_address: Option<String>,
}

/// The Lease annotation holding the leader's peer address.
pub const PEER_ADDRESS_ANNOTATION: &str = "cinderblock.dev/controller-peer-address";

/// What a campaign tells the replica: whether it leads (and its fencing
/// token), and where the current leader serves its peers when another
/// replica leads.
pub struct Campaign {
    pub leadership: watch::Receiver<Leadership>,
    pub leader_peer: watch::Receiver<Option<String>>,
}

impl LeaderConfig {
    /// The usual proportions (as client-go's defaults: 15 s / 10 s / 2 s).
    pub fn with_lease(namespace: String, lease_name: String, identity: String, lease_duration: Duration) -> Self {
        LeaderConfig {
            namespace,
            lease_name,
            identity,
            renew_deadline: lease_duration.mul_f64(2.0 / 3.0),
            retry_period: lease_duration.mul_f64(2.0 / 15.0).max(Duration::from_millis(200)),
            lease_duration,
            peer_address: None,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.renew_deadline >= self.lease_duration {
            return Err("the renew deadline must be shorter than the lease duration".into());
        }
        if self.retry_period >= self.renew_deadline {
            return Err("the retry period must be shorter than the renew deadline".into());
        }
        Ok(())
    }
}

/// Start campaigning.
pub fn campaign(client: Client, cfg: LeaderConfig) -> Campaign {
    let (tx, rx) = watch::channel(Leadership::default());
    let (peer_tx, peer_rx) = watch::channel(None::<String>);
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
        // When the last successful acquire or renew started: the lease is
        // ours from then, at most, by our own clock.
        let mut valid_from: Option<Instant> = None;
        let mut observed = Observed::default();
        loop {
            let attempt_started = Instant::now();
            let call_deadline = cfg.retry_period.max(Duration::from_secs(1)).min(cfg.renew_deadline / 2);
            let outcome = tokio::time::timeout(call_deadline, try_acquire_or_renew(&api, &cfg, &mut observed)).await;
            // Another replica's live lease names where it serves its peers.
            let peer = match &outcome {
                Ok(Ok(None)) => observed.other_leader_peer.clone(),
                _ => None,
            };
            peer_tx.send_if_modified(|p| {
                let changed = *p != peer;
                *p = peer.clone();
                changed
            });
            let current = *tx.borrow();
            let next = match outcome {
                Ok(Ok(Some(token))) => {
                    valid_from = Some(attempt_started);
                    Leadership { leading: true, token }
                }
                Ok(Ok(None)) => {
                    valid_from = None;
                    Leadership { leading: false, token: current.token }
                }
                other => {
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {call_deadline:?}"),
                    };
                    warn!(error = %why, lease = %cfg.lease_name, "lease call failed");
                    // Keep leading only within the renew deadline of the last renewal.
                    let still = valid_from.is_some_and(|t| t.elapsed() < cfg.renew_deadline);
                    if !still {
                        valid_from = None;
                    }
                    Leadership { leading: current.leading && still, token: current.token }
                }
            };
            if next != current {
                if next.leading != current.leading {
                    info!(identity = %cfg.identity, leading = next.leading, token = next.token, "leadership changed");
                }
                let _ = tx.send(next);
            }
            // Wake up in time to step down at the renew deadline if renewals keep failing.
            let mut sleep = cfg.retry_period;
            if let Some(t) = valid_from {
                let left = cfg.renew_deadline.saturating_sub(t.elapsed());
                sleep = sleep.min(left.max(Duration::from_millis(10)));
            }
            tokio::time::sleep(sleep).await;
            if let Some(t) = valid_from {
                if t.elapsed() >= cfg.renew_deadline && tx.borrow().leading {
                    warn!(identity = %cfg.identity, "renew deadline passed without a renewal: stepping down");
                    valid_from = None;
                    let token = tx.borrow().token;
                    let _ = tx.send(Leadership { leading: false, token });
                }
            }
        }
    });
    Campaign { leadership: rx, leader_peer: peer_rx }
}

/// The last change of the Lease this replica saw, and when (its own
/// monotonic clock): the Lease is expired when it has not changed for its
/// duration, however the hosts' clocks disagree.
#[derive(Default)]
struct Observed {
    record: Option<(String, Option<i64>)>,
    at: Option<Instant>,
    /// The peer address of another replica holding a live Lease.
    other_leader_peer: Option<String>,
}

/// Some(token) when this replica holds the Lease after the call.
async fn try_acquire_or_renew(api: &Api<Lease>, cfg: &LeaderConfig, observed: &mut Observed) -> Result<Option<u64>, kube::Error> {
    let now = Timestamp::now();
    let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.lease_duration.as_secs().max(1) as i32),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let annotations = || cfg.peer_address.as_ref().map(|a| BTreeMap::from([(PEER_ADDRESS_ANNOTATION.to_string(), a.clone())]));
    observed.other_leader_peer = None;
    let Some(mut lease) = api.get_opt(&cfg.lease_name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(cfg.lease_name.clone()), annotations: annotations(), ..Default::default() },
            spec: Some(spec(0, None)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Some(0)),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
            Err(e) => Err(e),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let holder = current.holder_identity.clone().unwrap_or_default();
    let duration = Duration::from_secs(current.lease_duration_seconds.unwrap_or(15).max(1) as u64);
    let seen = (holder.clone(), current.renew_time.as_ref().map(|t| t.0.as_millisecond()));
    if observed.record.as_ref() != Some(&seen) {
        observed.record = Some(seen);
        observed.at = Some(Instant::now());
    }
    let expired = observed.at.is_some_and(|t| t.elapsed() > duration);
    let transitions = current.lease_transitions.unwrap_or(0);
    let token = if holder == cfg.identity {
        lease.spec = Some(spec(transitions, current.acquire_time.clone()));
        transitions
    } else if expired || holder.is_empty() {
        lease.spec = Some(spec(transitions + 1, None));
        transitions + 1
    } else {
        observed.other_leader_peer = lease.metadata.annotations.as_ref().and_then(|a| a.get(PEER_ADDRESS_ANNOTATION)).cloned();
        return Ok(None);
    };
    // Ours now: our peer address replaces whatever a former leader wrote.
    let mut notes = lease.metadata.annotations.take().unwrap_or_default();
    notes.remove(PEER_ADDRESS_ANNOTATION);
    notes.extend(annotations().unwrap_or_default());
    lease.metadata.annotations = Some(notes);
    // Replace carries the resourceVersion we read: a racing replica gets 409.
    match api.replace(&cfg.lease_name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(Some(token.max(0) as u64)),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}
