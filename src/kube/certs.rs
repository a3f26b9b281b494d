//! Certificates in a cluster, with nothing but the Kubernetes API:
//!
//! - The controller keeps the cluster CA in a Secret it creates at first
//!   start (or finds), publishes the CA certificate in a ConfigMap, and
//!   issues its own client certificate into its certificate folder.
//! - A node plugin makes its key on the node (it never leaves it) and asks
//!   for a certificate with a CertificateSigningRequest (signer
//!   `cinderblock.dev/agent`). The API server records who asked; the
//!   controller signs only requests from the node plugins' service account,
//!   and names in the certificate the node that account's token is bound
//!   to (`authentication.kubernetes.io/node-name`), whatever the request
//!   says. A pod on node A can therefore never hold node B's certificate.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec, CertificateSigningRequestStatus,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Client;
use tracing::{info, warn};

use crate::tls::authority::{self, LEAF_VALIDITY};
use crate::tls::{files, Authority, Peer, TlsDir};

/// The signer name of node certificate requests.
pub const SIGNER: &str = "cinderblock.dev/agent";
/// The user-info key the API server fills from a node-bound service account token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

const CA_CERT_KEY: &str = "ca.crt";
const CA_KEY_KEY: &str = "ca.key";

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// The CA from its Secret, made and stored when the Secret does not exist
/// (unless `external`: then made by someone else, cert-manager say, and
/// waited for). Two replicas starting at once agree: the loser of the
/// create reads the winner's. Both our layout (ca.crt, ca.key) and
/// cert-manager's (tls.crt, tls.key) are read.
pub async fn ensure_ca(client: &Client, namespace: &str, name: &str, external: bool) -> Result<Authority, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(s) = api.get_opt(name).await.map_err(|e| err("reading the CA Secret", e))? {
            let data = s.data.unwrap_or_default();
            let get = |keys: [&str; 2]| {
                keys.iter()
                    .find_map(|k| data.get(*k))
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    .ok_or_else(|| format!("Secret {namespace}/{name} has no {}; delete it to have a new CA made, or fill it", keys[0]))
            };
            return Authority::from_pem(&get([CA_CERT_KEY, "tls.crt"])?, &get([CA_KEY_KEY, "tls.key"])?).map_err(|e| e.to_string());
        }
        if external {
            if tokio::time::Instant::now() > deadline {
                return Err(format!("the CA Secret {namespace}/{name} did not appear within 5 minutes; is cert-manager issuing it?"));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let ca = Authority::generate("cinderblock cluster CA").map_err(|e| e.to_string())?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some([("app.kubernetes.io/part-of".to_string(), "cinderblock".to_string())].into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                (CA_CERT_KEY.to_string(), ByteString(ca.cert_pem().as_bytes().to_vec())),
                (CA_KEY_KEY.to_string(), ByteString(ca.key_pem().as_bytes().to_vec())),
            ])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                info!(secret = %format!("{namespace}/{name}"), "made the cluster CA");
                return Ok(ca);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(err("storing the CA Secret", e)),
        }
    }
}

/// Publish the CA certificate (not its key) for the nodes.
pub async fn publish_ca(client: &Client, namespace: &str, name: &str, ca_pem: &str) -> Result<(), String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "cinderblock".to_string())].into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(CA_CERT_KEY.to_string(), ca_pem.to_string())])),
        ..Default::default()
    };
    let pp = PatchParams::apply("cinderblock-controller").force();
    api.patch(name, &pp, &Patch::Apply(&cm)).await.map_err(|e| err("publishing the CA ConfigMap", e))?;
    Ok(())
}

/// Issue the controller's certificate into `dir` when it is missing, from
/// another CA or past two thirds of its life.
pub fn ensure_controller_certificate(ca: &Authority, dir: &Path) -> Result<(), String> {
    let fresh = std::fs::read_to_string(dir.join(files::CA_FILE)).is_ok_and(|c| c == ca.cert_pem())
        && TlsDir::open(dir).ok().and_then(|d| d.not_after()).is_some_and(|t| t - now_s() > LEAF_VALIDITY.as_secs() as i64 / 3);
    if !fresh {
        ca.issue_into(&Peer::Controller, LEAF_VALIDITY, dir).map_err(|e| e.to_string())?;
        info!(dir = %dir.display(), "issued the controller's certificate");
    }
    Ok(())
}

fn now_s() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Why a request is refused, or the node it may be signed for.
pub fn node_of_request(csr: &CertificateSigningRequest, node_service_account: &str) -> Result<String, String> {
    let spec = &csr.spec;
    if spec.signer_name != SIGNER {
        return Err(format!("signer {} is not ours", spec.signer_name));
    }
    let user = spec.username.clone().unwrap_or_default();
    if user != node_service_account {
        return Err(format!("requested by {user:?}, not by the node plugins' service account {node_service_account:?}"));
    }
    let nodes = spec.extra.as_ref().and_then(|e| e.get(NODE_NAME_EXTRA)).cloned().unwrap_or_default();
    match nodes.as_slice() {
        [node] => {
            crate::tls::node_dns_name(node).map_err(|e| e.to_string())?;
            Ok(node.clone())
        }
        _ => Err(format!(
            "the requester's token is not bound to one node ({NODE_NAME_EXTRA} = {nodes:?}); node plugins must use their pod's service account token"
        )),
    }
}

/// Sign pending node requests, forever (the leader runs it).
pub async fn sign_node_requests(client: Client, ca: std::sync::Arc<Authority>, node_service_account: String, every: Duration) {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    loop {
        match api.list(&ListParams::default()).await {
            Ok(list) => {
                for csr in list.items {
                    if csr.spec.signer_name != SIGNER || csr.status.as_ref().and_then(|s| s.certificate.as_ref()).is_some() {
                        continue;
                    }
                    let denied = csr
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Denied" || c.type_ == "Failed"));
                    if denied {
                        continue;
                    }
                    if let Err(e) = sign_one(&api, &csr, &ca, &node_service_account).await {
                        warn!(csr = ?csr.metadata.name, error = %e, "could not handle a certificate request");
                    }
                }
            }
            Err(e) => warn!(error = %e, "listing certificate requests failed"),
        }
        tokio::time::sleep(every).await;
    }
}

async fn sign_one(api: &Api<CertificateSigningRequest>, csr: &CertificateSigningRequest, ca: &Authority, sa: &str) -> Result<(), String> {
    let name = csr.metadata.name.clone().unwrap_or_default();
    let condition = |type_: &str, reason: &str, message: String| CertificateSigningRequestCondition {
        type_: type_.to_string(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message),
        ..Default::default()
    };
    let node = match node_of_request(csr, sa) {
        Ok(n) => n,
        Err(why) => {
            warn!(csr = %name, reason = %why, "denied a certificate request");
            let status =
                CertificateSigningRequestStatus { conditions: Some(vec![condition("Denied", "NotANodePlugin", why)]), certificate: None };
            let patch = serde_json::json!({ "status": status });
            api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|e| err("denying", e))?;
            return Ok(());
        }
    };
    let pem = String::from_utf8_lossy(&csr.spec.request.0).into_owned();
    let cert = ca.sign_request(&pem, &Peer::Node(node.clone()), LEAF_VALIDITY).map_err(|e| e.to_string())?;
    let approved = csr.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == "Approved"));
    if !approved {
        let status = CertificateSigningRequestStatus {
            conditions: Some(vec![condition("Approved", "NodePlugin", format!("node plugin on node {node}"))]),
            certificate: None,
        };
        let patch = serde_json::json!({ "status": status });
        api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|e| err("approving", e))?;
    }
    // The certificate, then the CA, so the node can check what it got.
    let bundle = format!("{cert}{}", ca.cert_pem());
    let patch = serde_json::json!({ "status": { "certificate": ByteString(bundle.into_bytes()) } });
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|e| err("signing", e))?;
    info!(csr = %name, node = %node, "signed a node certificate");
    Ok(())
}

/// The node side: make a key, ask for a certificate, wait for it, and write
/// the certificate folder. Only when the folder's certificate is missing,
/// for another node, or past two thirds of its life.
pub async fn bootstrap_node(client: &Client, node_id: &str, dir: &Path, ca_namespace: &str, ca_configmap: &str) -> Result<bool, String> {
    let peer = Peer::Node(node_id.to_string());
    let fresh = TlsDir::open(dir).ok().is_some_and(|d| {
        let leaf = d.current().leaf().to_vec();
        crate::tls::peers_of(&leaf).contains(&peer)
            && files::not_after(&leaf).is_some_and(|t| t - now_s() > LEAF_VALIDITY.as_secs() as i64 / 3)
    });
    let ca_pem = read_ca(client, ca_namespace, ca_configmap).await?;
    if fresh {
        // The CA may have been rotated: keep ca.crt current.
        if std::fs::read_to_string(dir.join(files::CA_FILE)).ok().as_deref() != Some(ca_pem.as_str()) {
            files::write_file(&dir.join(files::CA_FILE), ca_pem.as_bytes(), 0o644).map_err(|e| e.to_string())?;
        }
        return Ok(false);
    }
    let (request, key) = authority::certificate_request(&peer).map_err(|e| e.to_string())?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let suffix: u32 = rand::random();
    let name = format!("cinderblock-{node_id}-{suffix:08x}");
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request.into_bytes()),
            signer_name: SIGNER.into(),
            usages: Some(vec!["digital signature".into(), "key encipherment".into(), "server auth".into(), "client auth".into()]),
            expiration_seconds: Some(LEAF_VALIDITY.as_secs() as i32),
            ..Default::default()
        },
        status: None,
    };
    api.create(&PostParams::default(), &csr).await.map_err(|e| err("asking for a certificate", e))?;
    info!(csr = %name, "asked the controller for this node's certificate");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let bundle = loop {
        let got = api.get(&name).await.map_err(|e| err("reading the certificate request", e))?;
        if let Some(st) = got.status {
            if let Some(c) = st.conditions.as_ref().and_then(|c| c.iter().find(|c| c.type_ == "Denied" || c.type_ == "Failed")) {
                return Err(format!(
                    "certificate request {name} was {}: {}",
                    c.type_.to_lowercase(),
                    c.message.clone().unwrap_or_default()
                ));
            }
            if let Some(cert) = st.certificate {
                break String::from_utf8_lossy(&cert.0).into_owned();
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("certificate request {name} was not signed within 2 minutes; is the cinderblock controller running?"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    // Only the leaf goes in tls.crt; the CA comes from the ConfigMap.
    let leaf = bundle.split_inclusive("-----END CERTIFICATE-----").next().unwrap_or_default().trim_start().to_string() + "\n";
    files::write_tls_dir(dir, &ca_pem, &leaf, &key).map_err(|e| e.to_string())?;
    TlsDir::open(dir).map_err(|e| format!("the signed certificate does not load: {e}"))?;
    let _ = api.delete(&name, &Default::default()).await;
    info!(dir = %dir.display(), "node certificate written");
    Ok(true)
}

async fn read_ca(client: &Client, namespace: &str, name: &str) -> Result<String, String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(cm) = api.get_opt(name).await.map_err(|e| err("reading the CA ConfigMap", e))? {
            if let Some(pem) = cm.data.and_then(|d| d.get(CA_CERT_KEY).cloned()) {
                return Ok(pem);
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "ConfigMap {namespace}/{name} with the cluster CA did not appear within 2 minutes; is the cinderblock controller running?"
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keep the node's certificate fresh: check every `every`, renew when due.
pub async fn renew_node_forever(client: Client, node_id: String, dir: std::path::PathBuf, ns: String, cm: String, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match bootstrap_node(&client, &node_id, &dir, &ns, &cm).await {
            Ok(true) => info!("node certificate renewed"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "node certificate renewal failed; retrying"),
        }
    }
}
