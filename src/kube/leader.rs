//! Leader election on a coordination.k8s.io Lease: one controller replica
//! runs flows and the reconciler; a standby takes over when the leader's
//! lease has not been renewed for its duration.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

/// Start campaigning; the receiver says whether this replica leads now.
pub fn campaign(client: Client, cfg: LeaderConfig) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
        let mut last_renew = std::time::Instant::now();
        loop {
            let leading = match try_acquire_or_renew(&api, &cfg).await {
                Ok(l) => {
                    if l {
                        last_renew = std::time::Instant::now();
                    }
                    l
                }
                Err(e) => {
                    warn!(error = %e, lease = %cfg.lease_name, "lease call failed");
                    // Keep leading only while our last renewal is still valid.
                    *tx.borrow() && last_renew.elapsed() < cfg.lease_duration
                }
            };
            if leading != *tx.borrow() {
                info!(identity = %cfg.identity, leading, "leadership changed");
                let _ = tx.send(leading);
            }
            tokio::time::sleep(cfg.renew_every).await;
        }
    });
    rx
}

async fn try_acquire_or_renew(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.lease_duration.as_secs().max(1) as i32),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(&cfg.lease_name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(cfg.lease_name.clone()), ..Default::default() },
            spec: Some(spec(0, None)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let holder = current.holder_identity.clone().unwrap_or_default();
    let duration_ms = i64::from(current.lease_duration_seconds.unwrap_or(15)) * 1000;
    let renewed_ms = current.renew_time.as_ref().map(|t| t.0.as_millisecond()).unwrap_or(0);
    let expired = now.as_millisecond() - renewed_ms > duration_ms;
    let transitions = current.lease_transitions.unwrap_or(0);
    if holder == cfg.identity {
        lease.spec = Some(spec(transitions, current.acquire_time.clone()));
    } else if expired || holder.is_empty() {
        lease.spec = Some(spec(transitions + 1, None));
    } else {
        return Ok(false);
    }
    // Replace carries the resourceVersion we read: a racing replica gets 409.
    match api.replace(&cfg.lease_name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
