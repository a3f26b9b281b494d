//! Kubernetes Events on the PVC a volume was made for (its name and
//! namespace arrive as csi.storage.k8s.io/pvc/* parameters when the
//! provisioner runs with --extra-create-metadata), and on StorageNodes
//! (identity mismatches, the reconciler's quarantine and circuit breaker).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;

#[derive(Clone)]
pub struct PvcEvents {
    recorder: Recorder,
}

impl PvcEvents {
    pub fn new(client: Client, instance: String) -> Self {
        let reporter = Reporter { controller: "cinderblock-controller".into(), instance: Some(instance) };
        PvcEvents { recorder: Recorder::new(client, reporter) }
    }

    pub async fn publish(&self, metadata: &std::collections::BTreeMap<String, String>, warning: bool, reason: &str, note: String) {
        let (Some(name), Some(namespace)) = (metadata.get("csi.storage.k8s.io/pvc/name"), metadata.get("csi.storage.k8s.io/pvc/namespace"))
        else {
            return;
        };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolumeClaim".into()),
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            ..Default::default()
        };
        self.send(&reference, warning, reason, "Provisioning", note).await;
    }

    async fn send(&self, reference: &ObjectReference, warning: bool, reason: &str, action: &str, note: String) {
        let ev = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, reference).await {
            tracing::warn!(error = %e, object = ?reference.name, "could not record an event");
        }
    }
}

#[tonic::async_trait]
impl crate::controller::manager::EventSink for PvcEvents {
    async fn volume_event(&self, volume: &crate::controller::records::VolumeRec, warning: bool, reason: &str, note: String) {
        self.publish(&volume.metadata, warning, reason, format!("volume {}: {note}", volume.id)).await;
    }

    async fn node_event(&self, node: &str, warning: bool, reason: &str, note: String) {
        let reference = ObjectReference {
            api_version: Some(format!("{}/{}", super::crds::GROUP, super::crds::VERSION)),
            kind: Some("StorageNode".into()),
            name: Some(node.to_string()),
            ..Default::default()
        };
        self.send(&reference, warning, reason, "Reconciling", note).await;
    }
}
