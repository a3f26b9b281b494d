//! The store on Kubernetes custom resources: one object per record, named
//! by its ID. The record is the object's spec. Compare-and-set rides on
//! metadata.resourceVersion (the API server refuses a stale replace with
//! 409), and a per-record counter in an annotation gives the store's
//! versions (1, 2, 3...), so two controllers never both win an update.

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::{ApiResource, DynamicObject};
use kube::Client;
use serde_json::{json, Value};

use super::crds::{BlockExport, BlockSnapshot, BlockVolume, StorageNode};
use crate::store::{Kind, Store, StoreError, Versioned};

pub const VERSION_ANNOTATION: &str = "cinderblock.dev/record-version";

pub struct KubeStore {
    client: Client,
    changes: crate::store::Feed,
}

impl KubeStore {
    pub fn new(client: Client) -> Self {
        KubeStore { client, changes: Default::default() }
    }

    fn resource(kind: Kind) -> ApiResource {
        match kind {
            Kind::Volume => ApiResource::erase::<BlockVolume>(&()),
            Kind::Snapshot => ApiResource::erase::<BlockSnapshot>(&()),
            Kind::Node => ApiResource::erase::<StorageNode>(&()),
            Kind::Export => ApiResource::erase::<BlockExport>(&()),
        }
    }

    fn api(&self, kind: Kind) -> (Api<DynamicObject>, ApiResource) {
        let ar = Self::resource(kind);
        (Api::all_with(self.client.clone(), &ar), ar)
    }

    async fn mirror_status(&self, kind: Kind, id: &str, record: &Value) {
        let (api, _) = self.api(kind);
        let phase = record.get("phase").and_then(Value::as_str).map(str::to_string);
        let node = match record.get("node") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let message = record.get("error").and_then(Value::as_str).map(str::to_string);
        let status = json!({"status": {"phase": phase, "node": node, "message": message}});
        // A display mirror: the record in spec is the truth.
        let _ = api.patch_status(id, &PatchParams::default(), &Patch::Merge(&status)).await;
    }
}

fn backend(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{what}: {e}"))
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn versioned(obj: &DynamicObject) -> Result<Versioned, StoreError> {
    let version = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(VERSION_ANNOTATION))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1);
    let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
    let value = serde_json::to_vec(&spec).map_err(|e| backend("encoding a record", e))?;
    Ok(Versioned { version, value })
}

fn object(ar: &ApiResource, id: &str, value: &[u8], version: u64, resource_version: Option<String>) -> Result<(DynamicObject, Value), StoreError> {
    let spec: Value = serde_json::from_slice(value).map_err(|e| backend("a record must be JSON", e))?;
    let mut obj = DynamicObject::new(id, ar).data(json!({ "spec": spec }));
    obj.metadata.annotations = Some([(VERSION_ANNOTATION.to_string(), version.to_string())].into());
    obj.metadata.resource_version = resource_version;
    Ok((obj, spec))
}

#[tonic::async_trait]
impl Store for KubeStore {
    async fn get(&self, kind: Kind, id: &str) -> Result<Option<Versioned>, StoreError> {
        let (api, _) = self.api(kind);
        match api.get_opt(id).await.map_err(|e| backend("reading a record", e))? {
            Some(obj) => Ok(Some(versioned(&obj)?)),
            None => Ok(None),
        }
    }

    async fn list_page(&self, kind: Kind, after: Option<&str>, limit: usize) -> Result<Vec<(String, Versioned)>, StoreError> {
        let all = self.list(kind).await?;
        Ok(all.into_iter().filter(|(id, _)| after.is_none_or(|a| id.as_str() > a)).take(limit).collect())
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<(u64, crate::store::Change)> {
        self.changes.subscribe()
    }

    fn change_seq(&self) -> u64 {
        self.changes.seq()
    }

    async fn renew_liveness(&self, _node: &str) -> Result<bool, StoreError> {
        Ok(false)
    }

    async fn liveness(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(vec![])
    }

    async fn list(&self, kind: Kind) -> Result<Vec<(String, Versioned)>, StoreError> {
        let (api, _) = self.api(kind);
        let list = api.list(&ListParams::default()).await.map_err(|e| backend("listing records", e))?;
        let mut out = Vec::with_capacity(list.items.len());
        for obj in &list.items {
            if obj.metadata.deletion_timestamp.is_some() {
                continue;
            }
            out.push((obj.metadata.name.clone().unwrap_or_default(), versioned(obj)?));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn create(&self, kind: Kind, id: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        let (api, ar) = self.api(kind);
        let (obj, spec) = object(&ar, id, &value, 1, None)?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => {
                self.mirror_status(kind, id, &spec).await;
                Ok(1)
            }
            Err(e) if is_code(&e, 409) => {
                let existing = self.get(kind, id).await?.ok_or_else(|| backend("record vanished after a conflict", id))?;
                Err(StoreError::AlreadyExists { kind: kind.as_str(), id: id.to_string(), existing })
            }
            Err(e) => Err(backend("creating a record", e)),
        }
    }

    async fn update(&self, kind: Kind, id: &str, value: Vec<u8>, expected: u64) -> Result<u64, StoreError> {
        let (api, ar) = self.api(kind);
        let current = api
            .get_opt(id)
            .await
            .map_err(|e| backend("reading a record", e))?
            .ok_or_else(|| StoreError::NotFound { kind: kind.as_str(), id: id.to_string() })?;
        let actual = versioned(&current)?.version;
        if actual != expected {
            return Err(StoreError::Conflict { kind: kind.as_str(), id: id.to_string(), expected, actual });
        }
        let (obj, spec) = object(&ar, id, &value, expected + 1, current.metadata.resource_version.clone())?;
        match api.replace(id, &PostParams::default(), &obj).await {
            Ok(_) => {
                self.mirror_status(kind, id, &spec).await;
                Ok(expected + 1)
            }
            Err(e) if is_code(&e, 409) => {
                let actual = self.get(kind, id).await?.map(|v| v.version).unwrap_or(0);
                Err(StoreError::Conflict { kind: kind.as_str(), id: id.to_string(), expected, actual })
            }
            Err(e) if is_code(&e, 404) => Err(StoreError::NotFound { kind: kind.as_str(), id: id.to_string() }),
            Err(e) => Err(backend("updating a record", e)),
        }
    }

    async fn put(&self, kind: Kind, id: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        loop {
            match self.get(kind, id).await? {
                None => match self.create(kind, id, value.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(StoreError::AlreadyExists { .. }) => continue,
                    Err(e) => return Err(e),
                },
                Some(cur) => match self.update(kind, id, value.clone(), cur.version).await {
                    Ok(v) => return Ok(v),
                    Err(StoreError::Conflict { .. }) | Err(StoreError::NotFound { .. }) => continue,
                    Err(e) => return Err(e),
                },
            }
        }
    }

    async fn delete(&self, kind: Kind, id: &str, expected: Option<u64>) -> Result<(), StoreError> {
        let (api, _) = self.api(kind);
        let Some(current) = api.get_opt(id).await.map_err(|e| backend("reading a record", e))? else {
            return Ok(());
        };
        let mut dp = DeleteParams::default();
        if let Some(expected) = expected {
            let actual = versioned(&current)?.version;
            if actual != expected {
                return Err(StoreError::Conflict { kind: kind.as_str(), id: id.to_string(), expected, actual });
            }
            dp.preconditions = Some(Preconditions { resource_version: current.metadata.resource_version.clone(), uid: None });
        }
        match api.delete(id, &dp).await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, 404) => Ok(()),
            Err(e) if is_code(&e, 409) => {
                let actual = self.get(kind, id).await?.map(|v| v.version).unwrap_or(0);
                Err(StoreError::Conflict { kind: kind.as_str(), id: id.to_string(), expected: expected.unwrap_or(0), actual })
            }
            Err(e) => Err(backend("deleting a record", e)),
        }
    }
}
