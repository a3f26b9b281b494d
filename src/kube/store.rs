//! The store on Kubernetes custom resources: one object per record, named
//! by its ID. The record is the object's spec. Compare-and-set rides on
//! metadata.resourceVersion (the API server refuses a stale replace with
//! 409), and a per-record counter in an annotation gives the store's
//! versions (1, 2, 3...), so two controllers never both win an update.
//!
//! Two ways to read:
//! - `KubeStore::new`: every read asks the API server (a node plugin, which
//!   reads its own record once at start).
//! - `KubeStore::watching`: the controller. Every kind is listed once and
//!   then watched (kube-runtime's watcher), into ordered caches that every
//!   read answers from, including objects being deleted: the reconciler must
//!   see records in every phase. Writes still go to the API server with the
//!   resourceVersion read, and their answers go into the cache at once (a
//!   caller reads its own writes). A write from a stale cache gets 409: the
//!   object is read again into the cache and the caller gets `Conflict`, so
//!   its retry reads fresh. A CreateVolume then costs only its writes.
//!
//! Node liveness is a Lease per node (`cinderblock-node-<node>`, as the
//! kubelet's node leases): one small request per heartbeat. The controller
//! watches them; a Lease whose node has no record gets an annotation that
//! the node's next renewal reads as "write your record again".

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use super::crds::{BlockExport, BlockGroupSnapshot, BlockSnapshot, BlockVolume, StorageNode};
use crate::store::{Change, Feed, Kind, Store, StoreError, Versioned};

pub const VERSION_ANNOTATION: &str = "cinderblock.dev/record-version";
/// Label of the nodes' liveness Leases.
pub const NODE_LEASE_LABEL: &str = "cinderblock.dev/node-lease";
/// Set on a node's Lease by the controller when the node has no record.
pub const REGISTER_ANNOTATION: &str = "cinderblock.dev/register-again";
const LEASE_PREFIX: &str = "cinderblock-node-";
/// Objects per page of the initial lists.
const LIST_PAGE: u32 = 500;

pub struct KubeStore {
    client: Client,
    feed: Arc<Feed>,
    /// Where the nodes' liveness Leases live.
    lease_namespace: String,
    /// The watch caches (`watching`), or None: read from the API server.
    caches: Option<Arc<Caches>>,
}

/// The controller's copy of every record and node Lease.
struct Caches {
    kinds: [RwLock<KindCache>; 5],
    /// Node ID -> when its Lease was last seen renewed (this process's clock, ms).
    leases: RwLock<HashMap<String, i64>>,
    /// Nodes whose Lease carries the register-again annotation.
    asked: RwLock<HashMap<String, i64>>,
    /// Kinds (and the leases) whose first list is in.
    synced: watch::Sender<u32>,
}

#[derive(Default)]
struct KindCache {
    objects: BTreeMap<String, Cached>,
    /// Deleted here, with the last resourceVersion known: an older watch
    /// event must not bring them back.
    gone: HashMap<String, u64>,
}

#[derive(Clone)]
struct Cached {
    rv: u64,
    rv_text: String,
    record: Versioned,
}

fn slot(kind: Kind) -> usize {
    match kind {
        Kind::Volume => 0,
        Kind::Snapshot => 1,
        Kind::Node => 2,
        Kind::Export => 3,
        Kind::GroupSnapshot => 4,
    }
}

fn resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Volume => ApiResource::erase::<BlockVolume>(&()),
        Kind::Snapshot => ApiResource::erase::<BlockSnapshot>(&()),
        Kind::Node => ApiResource::erase::<StorageNode>(&()),
        Kind::Export => ApiResource::erase::<BlockExport>(&()),
        Kind::GroupSnapshot => ApiResource::erase::<BlockGroupSnapshot>(&()),
    }
}

fn backend(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{what}: {e}"))
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// resourceVersions are etcd revisions: numbers that grow with every write.
/// Kubernetes calls them opaque; an unparsable one counts as newest.
fn rv_of(obj: &DynamicObject) -> (u64, String) {
    let text = obj.metadata.resource_version.clone().unwrap_or_default();
    (text.parse().unwrap_or(u64::MAX), text)
}

fn versioned(obj: &DynamicObject) -> Result<Versioned, StoreError> {
    let version =
        obj.metadata.annotations.as_ref().and_then(|a| a.get(VERSION_ANNOTATION)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(1);
    let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
    let value = serde_json::to_vec(&spec).map_err(|e| backend("encoding a record", e))?;
    Ok(Versioned { version, value })
}

fn object(ar: &ApiResource, id: &str, value: &[u8], version: u64, resource_version: Option<String>) -> Result<DynamicObject, StoreError> {
    let spec: Value = serde_json::from_slice(value).map_err(|e| backend("a record must be JSON", e))?;
    let mut obj = DynamicObject::new(id, ar).data(json!({ "spec": spec }));
    obj.metadata.annotations = Some([(VERSION_ANNOTATION.to_string(), version.to_string())].into());
    obj.metadata.resource_version = resource_version;
    Ok(obj)
}

fn node_of_lease(name: &str) -> Option<&str> {
    name.strip_prefix(LEASE_PREFIX)
}

impl KubeStore {
    /// A store that reads from the API server on every call.
    pub fn new(client: Client) -> Self {
        Self::with_lease_namespace(client, "kube-system")
    }

    pub fn with_lease_namespace(client: Client, lease_namespace: &str) -> Self {
        KubeStore { client, feed: Arc::new(Feed::default()), lease_namespace: lease_namespace.to_string(), caches: None }
    }

    /// A store that lists and watches every kind and the node Leases, and
    /// answers reads from those caches; returns once every first list is in
    /// (or `patience` passed: then an error).
    pub async fn watching(client: Client, lease_namespace: &str, patience: Duration) -> Result<Self, StoreError> {
        let (synced, _) = watch::channel(0);
        let caches = Arc::new(Caches { kinds: Default::default(), leases: Default::default(), asked: Default::default(), synced });
        let store = KubeStore {
            client: client.clone(),
            feed: Arc::new(Feed::default()),
            lease_namespace: lease_namespace.to_string(),
            caches: Some(caches.clone()),
        };
        for kind in Kind::all() {
            tokio::spawn(watch_kind(client.clone(), kind, caches.clone(), store.feed.clone()));
        }
        tokio::spawn(watch_leases(client, lease_namespace.to_string(), caches.clone(), store.feed.clone()));
        let started = std::time::Instant::now();
        let mut rx = caches.synced.subscribe();
        let all = Kind::all().len() as u32 + 1;
        let filled = tokio::time::timeout(patience, rx.wait_for(|n| *n >= all)).await.is_ok_and(|r| r.is_ok());
        match filled {
            true => {
                let counts: Vec<usize> = caches.kinds.iter().map(|k| k.read().unwrap_or_else(|p| p.into_inner()).objects.len()).collect();
                info!(
                    volumes = counts[0],
                    snapshots = counts[1],
                    nodes = counts[2],
                    exports = counts[3],
                    group_snapshots = counts[4],
                    took_ms = started.elapsed().as_millis() as u64,
                    "kube store: caches filled"
                );
                Ok(store)
            }
            false => Err(StoreError::Backend(format!(
                "the records could not be listed from the API server within {} s; check the controller's RBAC and the API server",
                patience.as_secs()
            ))),
        }
    }

    fn api(&self, kind: Kind) -> (Api<DynamicObject>, ApiResource) {
        let ar = resource(kind);
        (Api::all_with(self.client.clone(), &ar), ar)
    }

    fn cache(&self, kind: Kind) -> Option<&RwLock<KindCache>> {
        self.caches.as_ref().map(|c| &c.kinds[slot(kind)])
    }

    /// The record as this store knows it, with its resourceVersion: from the
    /// cache when watching, else from the API server.
    async fn current(&self, kind: Kind, id: &str) -> Result<Option<Cached>, StoreError> {
        if let Some(cache) = self.cache(kind) {
            return Ok(cache.read().unwrap_or_else(|p| p.into_inner()).objects.get(id).cloned());
        }
        self.fetch(kind, id).await
    }

    /// Reads one object from the API server (into the cache when watching).
    async fn fetch(&self, kind: Kind, id: &str) -> Result<Option<Cached>, StoreError> {
        let (api, _) = self.api(kind);
        match api.get_opt(id).await.map_err(|e| backend("reading a record", e))? {
            Some(obj) => {
                let cached = Cached { rv: rv_of(&obj).0, rv_text: rv_of(&obj).1, record: versioned(&obj)? };
                self.remember(kind, id, Some(&obj));
                Ok(Some(cached))
            }
            None => {
                self.remember(kind, id, None);
                Ok(None)
            }
        }
    }

    /// What the API server answered to our write or read goes into the
    /// cache (if newer than what it holds) and onto the feed.
    fn remember(&self, kind: Kind, id: &str, obj: Option<&DynamicObject>) {
        match &self.caches {
            Some(caches) => apply(&caches.kinds[slot(kind)], &self.feed, kind, id, obj, None),
            None => {
                let value = obj.and_then(|o| versioned(o).ok());
                self.feed.send(Change::Record { kind, id: id.to_string(), value });
            }
        }
    }

    fn forget(&self, kind: Kind, id: &str, rv: u64) {
        match &self.caches {
            Some(caches) => apply(&caches.kinds[slot(kind)], &self.feed, kind, id, None, Some(rv)),
            None => self.feed.send(Change::Record { kind, id: id.to_string(), value: None }),
        }
    }

    fn lease_api(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.lease_namespace)
    }
}

/// Puts `obj` (or its absence) for `id` into a kind's cache, unless the
/// cache already holds something newer; tells the feed what changed.
/// `deleted_rv`: deleted by us, at this resourceVersion.
fn apply(cache: &RwLock<KindCache>, feed: &Feed, kind: Kind, id: &str, obj: Option<&DynamicObject>, deleted_rv: Option<u64>) {
    let mut c = cache.write().unwrap_or_else(|p| p.into_inner());
    match obj {
        Some(obj) => {
            let (rv, rv_text) = rv_of(obj);
            if c.gone.get(id).is_some_and(|gone| *gone >= rv) || c.objects.get(id).is_some_and(|cur| cur.rv >= rv) {
                return;
            }
            let Ok(record) = versioned(obj) else { return };
            c.gone.remove(id);
            c.objects.insert(id.to_string(), Cached { rv, rv_text, record: record.clone() });
            feed.send(Change::Record { kind, id: id.to_string(), value: Some(record) });
        }
        None => {
            let last = c.objects.get(id).map(|cur| cur.rv).unwrap_or(0);
            let rv = deleted_rv.unwrap_or(last).max(last);
            if c.objects.remove(id).is_some() {
                feed.send(Change::Record { kind, id: id.to_string(), value: None });
            }
            if deleted_rv.is_some() {
                c.gone.insert(id.to_string(), rv);
            }
        }
    }
}

/// Lists and watches one kind into its cache, for as long as the process runs.
async fn watch_kind(client: Client, kind: Kind, caches: Arc<Caches>, feed: Arc<Feed>) {
    let ar = resource(kind);
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let cache = &caches.kinds[slot(kind)];
    let mut events = watcher::watcher(api, watcher::Config::default().page_size(LIST_PAGE)).boxed();
    let mut listing: Option<(Vec<String>, u64)> = None;
    let mut first = true;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => listing = Some((Vec::new(), 0)),
            Ok(watcher::Event::InitApply(obj)) => {
                let name = obj.metadata.name.clone().unwrap_or_default();
                if let Some((seen, newest)) = &mut listing {
                    *newest = (*newest).max(rv_of(&obj).0);
                    seen.push(name.clone());
                }
                apply(cache, &feed, kind, &name, Some(&obj), None);
            }
            Ok(watcher::Event::InitDone) => {
                // What the new list no longer holds is gone (unless it was
                // written after the list was taken).
                if let Some((seen, newest)) = listing.take() {
                    let seen: std::collections::HashSet<String> = seen.into_iter().collect();
                    let stale: Vec<String> = {
                        let c = cache.read().unwrap_or_else(|p| p.into_inner());
                        c.objects.iter().filter(|(id, o)| !seen.contains(*id) && o.rv <= newest).map(|(id, _)| id.clone()).collect()
                    };
                    for id in stale {
                        apply(cache, &feed, kind, &id, None, None);
                    }
                }
                if first {
                    first = false;
                    caches.synced.send_modify(|n| *n += 1);
                }
            }
            Ok(watcher::Event::Apply(obj)) => {
                let name = obj.metadata.name.clone().unwrap_or_default();
                apply(cache, &feed, kind, &name, Some(&obj), None);
            }
            Ok(watcher::Event::Delete(obj)) => {
                let name = obj.metadata.name.clone().unwrap_or_default();
                let rv = rv_of(&obj).0;
                let newer = cache.read().unwrap_or_else(|p| p.into_inner()).objects.get(&name).is_some_and(|cur| cur.rv > rv);
                if !newer {
                    apply(cache, &feed, kind, &name, None, None);
                }
            }
            Err(e) => {
                warn!(kind = kind.as_str(), error = %e, "kube store: watch failed; it resumes");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Watches the nodes' Leases: each renewal is a liveness change; a Lease of
/// a node that has no record is asked (by annotation) to register again.
async fn watch_leases(client: Client, namespace: String, caches: Arc<Caches>, feed: Arc<Feed>) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{NODE_LEASE_LABEL}=true")).page_size(LIST_PAGE);
    let mut events = watcher::watcher(api.clone(), config).boxed();
    let mut renewals: HashMap<String, String> = HashMap::new();
    let mut first = true;
    while let Some(event) = events.next().await {
        let lease = match event {
            Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l)) => l,
            Ok(watcher::Event::Delete(l)) => {
                if let Some(node) = l.metadata.name.as_deref().and_then(node_of_lease) {
                    renewals.remove(node);
                }
                continue;
            }
            Ok(watcher::Event::Init) => continue,
            Ok(watcher::Event::InitDone) => {
                if first {
                    first = false;
                    caches.synced.send_modify(|n| *n += 1);
                }
                continue;
            }
            Err(e) => {
                warn!(error = %e, "kube store: watching the node leases failed; it resumes");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(node) = lease.metadata.name.as_deref().and_then(node_of_lease).map(str::to_string) else { continue };
        let renew = lease.spec.as_ref().and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
        let renew_text = renew.map(|t| t.to_string()).unwrap_or_default();
        if renewals.get(&node) == Some(&renew_text) {
            continue; // another field changed (our annotation): no renewal
        }
        renewals.insert(node.clone(), renew_text);
        let now = crate::volume::records::now_ms();
        // Judged by when this process saw the renewal, so the two hosts'
        // clocks are never compared; a Lease found at start counts from
        // its renewal time, if that is earlier.
        let at = match renew {
            Some(t) if first => now.min(t.as_millisecond()),
            _ => now,
        };
        caches.leases.write().unwrap_or_else(|p| p.into_inner()).insert(node.clone(), at);
        feed.send(Change::Alive { node: node.clone(), at_ms: at });
        let annotated = lease.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(REGISTER_ANNOTATION));
        let has_record = caches.kinds[slot(Kind::Node)].read().unwrap_or_else(|p| p.into_inner()).objects.contains_key(&node);
        let nodes_synced = *caches.synced.borrow() >= 1;
        let value = match (has_record, annotated) {
            (false, false) if nodes_synced => Some(Value::String(now.to_string())),
            (true, true) => Some(Value::Null),
            _ => None,
        };
        if let Some(value) = value {
            let patch = json!({"metadata": {"annotations": {REGISTER_ANNOTATION: value}}});
            if let Err(e) = api.patch(&format!("{LEASE_PREFIX}{node}"), &PatchParams::default(), &Patch::Merge(&patch)).await {
                warn!(node = %node, error = %e, "kube store: could not mark the node's lease");
            }
            caches.asked.write().unwrap_or_else(|p| p.into_inner()).insert(node, now);
        }
    }
}

#[tonic::async_trait]
impl Store for KubeStore {
    async fn get(&self, kind: Kind, id: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.current(kind, id).await?.map(|c| c.record))
    }

    async fn list_page(&self, kind: Kind, after: Option<&str>, limit: usize) -> Result<Vec<(String, Versioned)>, StoreError> {
        if let Some(cache) = self.cache(kind) {
            let c = cache.read().unwrap_or_else(|p| p.into_inner());
            let start = after.map_or(Bound::Unbounded, Bound::Excluded);
            return Ok(c
                .objects
                .range::<str, _>((start, Bound::Unbounded))
                .take(limit)
                .map(|(id, o)| (id.clone(), o.record.clone()))
                .collect());
        }
        // Without a cache: the API server's own pages are in its order, not
        // by name, so read the kind and cut the page here (the node plugin's
        // only list is of nodes, once at start).
        let (api, _) = self.api(kind);
        let list = api.list(&ListParams::default()).await.map_err(|e| backend("listing records", e))?;
        let mut out = Vec::with_capacity(list.items.len());
        for obj in &list.items {
            let id = obj.metadata.name.clone().unwrap_or_default();
            if after.is_none_or(|a| id.as_str() > a) {
                out.push((id, versioned(obj)?));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.truncate(limit);
        Ok(out)
    }

    async fn create(&self, kind: Kind, id: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        let (api, ar) = self.api(kind);
        let obj = object(&ar, id, &value, 1, None)?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(made) => {
                self.remember(kind, id, Some(&made));
                Ok(1)
            }
            Err(e) if is_code(&e, 409) => {
                let existing = match self.current(kind, id).await? {
                    Some(c) => c,
                    None => self.fetch(kind, id).await?.ok_or_else(|| backend("record vanished after a conflict", id))?,
                };
                Err(StoreError::AlreadyExists { kind: kind.as_str(), id: id.to_string(), existing: existing.record })
            }
            Err(e) => Err(backend("creating a record", e)),
        }
    }

    async fn update(&self, kind: Kind, id: &str, value: Vec<u8>, expected: u64) -> Result<u64, StoreError> {
        let (api, ar) = self.api(kind);
        let current = self.current(kind, id).await?.ok_or_else(|| StoreError::NotFound { kind: kind.as_str(), id: id.to_string() })?;
        let actual = current.record.version;
        if actual != expected {
            return Err(StoreError::Conflict { kind: kind.as_str(), id: id.to_string(), expected, actual });
        }
        let obj = object(&ar, id, &value, expected + 1, Some(current.rv_text.clone()))?;
        match api.replace(id, &PostParams::default(), &obj).await {
            Ok(replaced) => {
                self.remember(kind, id, Some(&replaced));
                Ok(expected + 1)
            }
            Err(e) if is_code(&e, 409) => {
                // Our copy was stale: read it again, so the caller's retry is fresh.
                let actual = self.fetch(kind, id).await?.map(|c| c.record.version).unwrap_or(0);
                Err(StoreError::Conflict { kind: kind.as_str(), id: id.to_string(), expected, actual })
            }
            Err(e) if is_code(&e, 404) => {
                self.forget(kind, id, current.rv);
                Err(StoreError::NotFound { kind: kind.as_str(), id: id.to_string() })
            }
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
        let Some(current) = self.current(kind, id).await? else {
            return Ok(());
        };
        let mut dp = DeleteParams::default();
        if let Some(expected) = expected {
            let actual = current.record.version;
            if actual != expected {
                return Err(StoreError::Conflict { kind: kind.as_str(), id: id.to_string(), expected, actual });
            }
            dp.preconditions = Some(Preconditions { resource_version: Some(current.rv_text.clone()), uid: None });
        }
        match api.delete(id, &dp).await {
            // Gone now, or being deleted (finalizers): the watch tells which.
            Ok(either) => {
                match either.left() {
                    Some(still) => self.remember(kind, id, Some(&still)),
                    None => self.forget(kind, id, current.rv),
                }
                Ok(())
            }
            Err(e) if is_code(&e, 404) => {
                self.forget(kind, id, current.rv);
                Ok(())
            }
            Err(e) if is_code(&e, 409) => {
                let actual = self.fetch(kind, id).await?.map(|c| c.record.version).unwrap_or(0);
                Err(StoreError::Conflict { kind: kind.as_str(), id: id.to_string(), expected: expected.unwrap_or(0), actual })
            }
            Err(e) => Err(backend("deleting a record", e)),
        }
    }

    fn changes(&self) -> broadcast::Receiver<(u64, Change)> {
        self.feed.subscribe()
    }

    fn change_seq(&self) -> u64 {
        self.feed.seq()
    }

    /// One server-side apply of the node's Lease (it makes the Lease the
    /// first time): one request per heartbeat.
    async fn renew_liveness(&self, node: &str) -> Result<bool, StoreError> {
        let now = k8s_openapi::jiff::Timestamp::now();
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": format!("{LEASE_PREFIX}{node}"),
                "labels": {NODE_LEASE_LABEL: "true"},
            },
            "spec": {
                "holderIdentity": node,
                "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
            },
        });
        let params = PatchParams::apply("cinderblock-node").force();
        let renewed = self
            .lease_api()
            .patch(&format!("{LEASE_PREFIX}{node}"), &params, &Patch::Apply(&lease))
            .await
            .map_err(|e| backend("renewing the node's lease", e))?;
        let asked = renewed.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(REGISTER_ANNOTATION));
        Ok(asked)
    }

    async fn liveness(&self) -> Result<Vec<(String, i64)>, StoreError> {
        if let Some(c) = &self.caches {
            let leases = c.leases.read().unwrap_or_else(|p| p.into_inner());
            return Ok(leases.iter().map(|(n, at)| (n.clone(), *at)).collect());
        }
        let now = crate::volume::records::now_ms();
        let list = self
            .lease_api()
            .list(&ListParams::default().labels(&format!("{NODE_LEASE_LABEL}=true")))
            .await
            .map_err(|e| backend("listing the node leases", e))?;
        Ok(list
            .items
            .iter()
            .filter_map(|l| {
                let node = node_of_lease(l.metadata.name.as_deref()?)?;
                let at = l.spec.as_ref()?.renew_time.as_ref()?.0.as_millisecond().min(now);
                Some((node.to_string(), at))
            })
            .collect())
    }
}
