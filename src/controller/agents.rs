//! The controller's side of the agent API: one lazily connected, mutually
//! authenticated channel per node, and `NodeAgent`, which every call to a
//! node goes through. It
//! - connects only to the certificate that names the node it means to call,
//! - puts the controller's fencing token on every call that changes data,
//!   and refuses to send one when this replica no longer leads,
//! - checks that every answer comes from the node and pool the node's record
//!   names; a mismatch marks the node (status, event, metric) and the answer
//!   is not acted on.
//!
//! `NodeAgent` is where the agent API's gRPC codes end: its calls answer an
//! `AgentError` (the class of the failure and the agent's message). Its own
//! refusals (no longer leading, a mismatched answer) take the same shape, so
//! a flow handles them alike. Flows wrap what they pass on in
//! `ControllerError::Agent`, which keeps the class.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use super::error::{AgentError, ControllerError, Failure};
use super::records::NodeRec;
use crate::agent::fence;
use crate::agent_proto as pb;
use crate::agent_proto::volume_manager_client::VolumeManagerClient;
use crate::tls::{AgentConnector, Peer, TlsDir};

pub type AgentClient = VolumeManagerClient<Channel>;

/// The message prefix of an identity mismatch (the flow must not clean up there).
pub const MISMATCH: &str = "agent identity mismatch";

pub struct Agents {
    channels: Mutex<HashMap<(String, String), Channel>>,
    call_timeout: Duration,
    tls: Arc<TlsDir>,
}

impl Agents {
    pub fn new(call_timeout: Duration, tls: Arc<TlsDir>) -> Self {
        Agents { channels: Mutex::new(HashMap::new()), call_timeout, tls }
    }

    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// A client for `node`'s agent at the address its record names, which
    /// talks only to a certificate naming that node.
    pub fn client(&self, node: &NodeRec) -> Result<AgentClient, ControllerError> {
        let key = (node.id.clone(), node.agent_address.clone());
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(&key) {
            return Ok(VolumeManagerClient::new(c.clone()));
        }
        let address = &node.agent_address;
        let connector = AgentConnector::new(self.tls.clone(), &Peer::Node(node.id.clone()), vec![b"h2".to_vec()])
            .map_err(|e| ControllerError::AgentTls(e.to_string()))?;
        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| ControllerError::BadAgentAddress { node: node.id.clone(), address: address.clone(), reason: e.to_string() })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(self.call_timeout);
        let channel = endpoint.connect_with_connector_lazy(connector);
        channels.insert(key, channel.clone());
        Ok(VolumeManagerClient::new(channel))
    }
}

/// Told when an answer came from another node or pool than the record says.
pub trait MismatchSink: Send + Sync {
    fn mismatch(&self, node: &NodeRec, reason: String);
}

/// One node's agent, as the controller uses it. A clone shares the
/// connection (for calls made side by side).
#[derive(Clone)]
pub struct NodeAgent {
    pub node: NodeRec,
    client: AgentClient,
    /// The fencing token for calls that change data; None: this replica does
    /// not lead, and it sends no such call.
    token: Option<u64>,
    sink: Arc<dyn MismatchSink>,
}

macro_rules! mutating {
    ($name:ident, $req:ty, $resp:ty) => {
        pub async fn $name(&mut self, req: $req) -> Result<$resp, AgentError> {
            let mut r = Request::new(req);
            fence::attach(&mut r, self.leading()?);
            hold_for_tests().await;
            let resp = self.client.$name(r).await.map_err(AgentError::from)?.into_inner();
            self.check(resp.identity.as_ref())?;
            Ok(resp)
        }
    };
}

macro_rules! reading {
    ($name:ident, $req:ty, $resp:ty) => {
        pub async fn $name(&mut self, req: $req) -> Result<$resp, AgentError> {
            let resp = self.client.$name(Request::new(req)).await.map_err(AgentError::from)?.into_inner();
            self.check(resp.identity.as_ref())?;
            Ok(resp)
        }
    };
}

impl NodeAgent {
    pub fn new(node: NodeRec, client: AgentClient, token: Option<u64>, sink: Arc<dyn MismatchSink>) -> Self {
        NodeAgent { node, client, token, sink }
    }

    fn leading(&self) -> Result<u64, AgentError> {
        self.token
            .ok_or_else(|| AgentError::new(Failure::Unavailable, "this controller replica no longer leads; the new leader answers (retry)"))
    }

    /// The answer must come from the node and pool the record names.
    fn check(&self, identity: Option<&pb::AgentIdentity>) -> Result<(), AgentError> {
        let Some(id) = identity else {
            return Err(self.mismatched("the answer carries no identity".into()));
        };
        if id.node_id != self.node.id {
            return Err(self.mismatched(format!("the agent at {} answered as node {:?}", self.node.agent_address, id.node_id)));
        }
        if !self.node.pool_uuid.is_empty() && id.pool_uuid != self.node.pool_uuid {
            return Err(
                self.mismatched(format!("the agent serves pool {} but the node's record names pool {}", id.pool_uuid, self.node.pool_uuid))
            );
        }
        Ok(())
    }

    fn mismatched(&self, reason: String) -> AgentError {
        self.sink.mismatch(&self.node, reason.clone());
        let e = ControllerError::Mismatch { node: self.node.id.clone(), reason };
        AgentError::new(e.failure(), e.to_string())
    }

    mutating!(create_volume, pb::CreateVolumeRequest, pb::CreateVolumeResponse);
    mutating!(delete_volume, pb::DeleteVolumeRequest, pb::DeleteVolumeResponse);
    mutating!(create_snapshot, pb::CreateSnapshotRequest, pb::CreateSnapshotResponse);
    mutating!(delete_snapshot, pb::DeleteSnapshotRequest, pb::DeleteSnapshotResponse);
    mutating!(expand_volume, pb::ExpandVolumeRequest, pb::ExpandVolumeResponse);
    mutating!(quarantine_volume, pb::QuarantineRequest, pb::QuarantineResponse);
    mutating!(quarantine_snapshot, pb::QuarantineRequest, pb::QuarantineResponse);
    mutating!(purge_orphans, pb::PurgeOrphansRequest, pb::PurgeOrphansResponse);
    mutating!(fence, pb::FenceRequest, pb::FenceResponse);
    mutating!(create_export, pb::CreateExportRequest, pb::CreateExportResponse);
    mutating!(delete_export, pb::DeleteExportRequest, pb::DeleteExportResponse);
    mutating!(freeze_volumes, pb::FreezeVolumesRequest, pb::FreezeVolumesResponse);
    reading!(thaw_volumes, pb::ThawVolumesRequest, pb::ThawVolumesResponse);
    reading!(list_exports, pb::ListExportsRequest, pb::ListExportsResponse);
    reading!(get_volume, pb::GetVolumeRequest, pb::GetVolumeResponse);
    reading!(get_snapshot, pb::GetSnapshotRequest, pb::GetSnapshotResponse);
    reading!(list_volumes, pb::ListVolumesRequest, pb::ListVolumesResponse);
    reading!(list_snapshots, pb::ListSnapshotsRequest, pb::ListSnapshotsResponse);
    reading!(list_orphans, pb::ListOrphansRequest, pb::ListOrphansResponse);
    reading!(get_pool_status, pb::GetPoolStatusRequest, pb::GetPoolStatusResponse);

    /// Every volume on the node, handed to `each` as its page arrives: asked
    /// for in pages of `LISTING_PAGE` (one answer for a whole pool of tens of
    /// thousands would outgrow gRPC's message limit) and never held whole.
    pub async fn each_volume(&self, each: impl FnMut(pb::Volume)) -> Result<(), AgentError> {
        let agent = self.clone();
        each_in_pages(
            move |after| {
                let mut agent = agent.clone();
                async move {
                    let asked = pb::ListVolumesRequest { after, max_entries: LISTING_PAGE, ..Default::default() };
                    Ok(agent.list_volumes(asked).await?.volumes)
                }
            },
            |v| &v.volume_id,
            each,
        )
        .await
    }

    /// Every snapshot on the node, in pages like `each_volume`.
    pub async fn each_snapshot(&self, each: impl FnMut(pb::Snapshot)) -> Result<(), AgentError> {
        let agent = self.clone();
        each_in_pages(
            move |after| {
                let mut agent = agent.clone();
                async move {
                    let asked = pb::ListSnapshotsRequest { after, max_entries: LISTING_PAGE, ..Default::default() };
                    Ok(agent.list_snapshots(asked).await?.snapshots)
                }
            },
            |s| &s.snapshot_id,
            each,
        )
        .await
    }
}

/// Every entry of a listing asked for page by page, each handed to `each`:
/// `page(after)` answers the entries after that ID (from the first when
/// empty), `id` names one.
async fn each_in_pages<T, F, Fut>(mut page: F, id: impl Fn(&T) -> &String, mut each: impl FnMut(T)) -> Result<(), AgentError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, AgentError>>,
{
    let mut after = String::new();
    loop {
        let got = page(after.clone()).await?;
        // An agent that does not page answers the whole listing each time:
        // on the first call, that is every entry; on a later one, the
        // first answer was every entry already.
        let whole = ignored_paging(got.len(), got.first().map(|e| id(e).as_str()), &after);
        if whole && !after.is_empty() {
            return Ok(());
        }
        let last = whole || got.len() < LISTING_PAGE as usize;
        if let Some(e) = got.last() {
            after = id(e).clone();
        }
        got.into_iter().for_each(&mut each);
        if last {
            return Ok(());
        }
    }
}

/// How many volumes or snapshots one listing call asks a node for.
const LISTING_PAGE: u32 = 1000;

/// Whether an answer to a page request shows an agent that does not page
/// (one older than paging, during an upgrade): more entries than asked for,
/// or a first entry not after `after`. Its answer is then the whole
/// listing, and asking again would never end.
fn ignored_paging(len: usize, first: Option<&str>, after: &str) -> bool {
    len > LISTING_PAGE as usize || (!after.is_empty() && first.is_some_and(|f| f <= after))
}

/// Fault injection for the fencing test (tests/kube_e2e.rs), off unless
/// the environment names a file: while that file exists, a call that
/// changes data waits after this replica checked that it leads and before
/// the call leaves, which is the window a real pause (GC, SIGSTOP, a
/// stalled VM) can fall into and which fencing exists for. No test can place
/// a real pause there reliably, hence the hook.
async fn hold_for_tests() {
    let Some(path) = std::env::var_os("CINDERBLOCK_TEST_HOLD_AGENT_WRITES") else { return };
    let path = std::path::PathBuf::from(path);
    while path.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node of `n` entries ("e00000", ...), paging or not.
    async fn walk(n: usize, pages: bool) -> (Vec<String>, usize) {
        let all: Vec<String> = (0..n).map(|i| format!("e{i:05}")).collect();
        let calls = std::cell::Cell::new(0);
        let mut seen = Vec::new();
        let page = |after: String| {
            calls.set(calls.get() + 1);
            let got: Vec<String> = if pages {
                all.iter().filter(|e| after.is_empty() || **e > after).take(LISTING_PAGE as usize).cloned().collect()
            } else {
                all.clone()
            };
            async move { Ok(got) }
        };
        each_in_pages(page, |e: &String| e, |e| seen.push(e)).await.unwrap();
        (seen, calls.get())
    }

    #[tokio::test]
    async fn each_entry_comes_once_from_an_agent_that_pages_or_not() {
        let page = LISTING_PAGE as usize;
        for n in [0, 1, page - 1, page, page + 1, 2 * page, 2 * page + 500] {
            for pages in [true, false] {
                let (seen, calls) = walk(n, pages).await;
                let expected: Vec<String> = (0..n).map(|i| format!("e{i:05}")).collect();
                assert_eq!(seen, expected, "{n} entries, paging {pages}");
                let most = if pages { n / page + 1 } else { 2 };
                assert!(calls <= most, "{calls} calls for {n} entries, paging {pages}");
            }
        }
    }

    #[test]
    fn an_agent_that_does_not_page_is_recognised() {
        assert!(!ignored_paging(0, None, ""), "an empty pool");
        assert!(!ignored_paging(LISTING_PAGE as usize, Some("vol-a"), ""), "a full first page");
        assert!(!ignored_paging(3, Some("vol-k"), "vol-j"), "a later page");
        assert!(ignored_paging(LISTING_PAGE as usize + 1, Some("vol-a"), ""), "more than asked for");
        assert!(ignored_paging(LISTING_PAGE as usize, Some("vol-a"), "vol-j"), "from the start again");
        assert!(ignored_paging(2, Some("vol-j"), "vol-j"), "the last ID again");
    }
}
