//! Running in a cluster: custom resources as the store, leader election on
//! a Lease, Events on PVCs, node topology from the Node object.

pub mod certs;
pub mod crds;
pub mod events;
pub mod leader;
pub mod store;

pub use store::KubeStore;

/// A kube client from a kubeconfig path, or the in-cluster / default config.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| format!("reading kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| format!("no kubeconfig and not in a cluster: {e}"))?,
    };
    kube::Client::try_from(config).map_err(|e| format!("kube client: {e}"))
}

/// The zone label of a Node object (`topology.kubernetes.io/zone`), if any.
pub async fn node_zone(client: &kube::Client, node: &str) -> Result<Option<String>, String> {
    let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    let n = api.get_opt(node).await.map_err(|e| format!("reading Node {node}: {e}"))?;
    Ok(n.and_then(|n| n.metadata.labels).and_then(|l| l.get("topology.kubernetes.io/zone").cloned()))
}
