//! What the controller's flows refuse or fail at, in the domain's terms.
//! The flows (create, delete, expand, publish, snapshots, groups,
//! migrations, evacuations, the reconciler) return `ControllerError`; only
//! the gRPC edges (`service.rs`, `group_service.rs`, `forward.rs`, the admin
//! API) turn it into a `tonic::Status`, through the one
//! `From<ControllerError> for tonic::Status` below, which picks the code
//! the CSI spec names for each variant.
//!
//! Calls to node agents still answer `tonic::Status` (the agent API is gRPC
//! too): a flow that passes an agent's answer on wraps it in `Agent`, which
//! keeps the agent's code, and says what it was doing with `During`.

use tonic::Code;

use super::agents::MISMATCH;
use super::records::{MigrationPhase, Phase};
use crate::flow::FlowFailure;
use crate::store::StoreError;

/// A task of a controller flow failed (see `crate::flow`).
pub type TaskError = crate::flow::TaskError<ControllerError>;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    // What the request names.
    /// A volume, snapshot or group snapshot (or a request's source) that does not exist.
    #[error("{kind} {id} does not exist")]
    NotFound { kind: &'static str, id: String },
    #[error("no node is called {node:?} (no StorageNode is registered by that name; cinderblock ctl node list)")]
    NodeNotFound { node: String },
    /// A name reused with other arguments.
    #[error("{kind} name {name:?} is taken by {holder}; pick another name or repeat the original request")]
    NameTaken { kind: &'static str, name: String, holder: String },
    /// A publication to the same node with another access (read-only or not).
    #[error("volume {volume} is published to node {node} {} already; unpublish it first", if *.read_only { "read-only" } else { "read-write" })]
    PublishedOtherwise { volume: String, node: String, read_only: bool },
    /// An argument the controller cannot act on (the message says which and why).
    #[error("{0}")]
    Invalid(String),
    #[error("starting_token {token:?} is not valid; list again from the start")]
    BadPageToken { token: String },

    // The object's state.
    #[error("{kind} {name:?} is being deleted; retry when it is gone")]
    BeingDeleted { kind: &'static str, name: String },
    /// `what` ("volume X", "source snapshot Y") is in another phase than Available.
    #[error("{what} is {phase:?}, not Available; {then}")]
    NotAvailable { what: String, phase: Phase, then: &'static str },
    /// The volume is published where this operation needs it unpublished (or published elsewhere).
    #[error("volume {volume} is published to node(s) {}; {why}", .nodes.join(", "))]
    InUse { volume: String, nodes: Vec<String>, why: String },
    /// The volume is being migrated, and this operation waits for the migration.
    #[error("volume {volume} is being migrated to node {to} ({phase:?}); {then}; retry")]
    Migrating { volume: String, to: String, phase: MigrationPhase, then: &'static str },
    #[error("volume {volume} is being migrated to node {to} already ({phase:?}); wait for it, or cancel it first (cinderblock ctl volume migrate {volume} --cancel)")]
    MigrationUnderWay { volume: String, to: String, phase: MigrationPhase },
    #[error("volume {volume} is not being migrated")]
    NotMigrating { volume: String },
    #[error("volume {volume}'s migration to node {to} is {phase:?}: too late to cancel; it ends in a moment")]
    TooLateToCancel { volume: String, to: String, phase: MigrationPhase },
    /// Another operation on the same object is under way, or won a race with this one.
    #[error("{0}")]
    InProgress(String),
    /// A copy from another node stopped (the volume is being deleted, or it made no progress).
    #[error("{0}")]
    CopyGivenUp(String),
    /// A group snapshot's members could not be cut at one instant (a freeze
    /// or a cut too slow, a member not frozen all along).
    #[error("{0}")]
    NotCutTogether(String),

    // Nodes and placement.
    /// No node can take the volume: the scheduler's reasons (and earlier attempts').
    #[error("{reasons}")]
    NoNodeFits { reasons: String },
    /// The node named as a migration's target cannot take the volume.
    #[error("node {node} cannot take volume {volume} ({size}): {}{}", .reasons.join("; "), if *.capacity { "; free space there or pick another node" } else { "" })]
    TargetCannotTake { node: String, volume: String, size: String, reasons: Vec<String>, capacity: bool },
    /// A node that cannot serve this request as it is (mismatched, silent,
    /// evacuating, or without what the request needs).
    #[error("node {node} {why}")]
    NodeUnfit { node: String, why: String },
    /// Where the volume can be used from does not include where it is asked for.
    #[error("{0}")]
    TopologyUnmet(String),
    /// The node's agent answered as another node or pool.
    #[error("{} on node {node}: {reason}; nothing is written there until an operator resolves it (docs/security.md)", MISMATCH)]
    Mismatch { node: String, reason: String },
    #[error("{size} bytes is smaller than {of} ({of_size} bytes)")]
    SmallerThanSource { size: u64, of: String, of_size: u64 },
    #[error("node {node} is not registered")]
    NodeNotRegistered { node: String },
    /// A call to a node whose outcome is unknown, and the node cannot be asked.
    #[error("node {node} did not answer ({call}) and cannot be asked what it did ({asked}); retry")]
    OutcomeUnknown { node: String, call: String, asked: String },
    /// A node's agent answered with an error: passed on with the agent's code and message.
    #[error("{}", .0.message())]
    Agent(tonic::Status),
    /// What the flow was doing (on which node) when `cause` happened; `cause`'s code is kept.
    #[error("{what}: {cause}")]
    During { what: String, cause: Box<ControllerError> },
    /// A node did not do (or could not be asked to do) its part of a change
    /// that is safe to repeat: the caller retries.
    #[error("{0}; retry")]
    Unfinished(Box<ControllerError>),
    #[error("snapshot {snapshot} failed on node {node}: {cause}")]
    SnapshotFailed { snapshot: String, node: String, cause: Box<ControllerError> },
    #[error("group snapshot {group} failed: {cause}")]
    GroupSnapshotFailed { group: String, cause: Box<ControllerError> },
    /// Every attempt on a node failed. `rescheduled`: the last failure
    /// belonged to its node and another one might have done.
    #[error("volume could not be created after {attempts} attempt(s): {reasons}")]
    AttemptsFailed { attempts: usize, reasons: String, last: Box<ControllerError>, rescheduled: bool },
    /// The create-volume flow failed (and reverted what it could).
    #[error("{0}")]
    FlowFailed(Box<FlowFailure<ControllerError>>),

    // The controller itself.
    #[error("this controller replica is not the leader; retry (the leader answers)")]
    NotLeader,
    #[error("the controller has not read the nodes from its store yet; retry")]
    ViewNotReady,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The controller's client certificate cannot be used to call a node.
    #[error("{0}")]
    AgentTls(String),
    #[error("node {node} agent address {address:?} is not a URL: {reason}")]
    BadAgentAddress { node: String, address: String, reason: String },
    #[error("the agent answered without {0}")]
    IncompleteAnswer(&'static str),
    /// A broken invariant of the controller (a bug), or its task died.
    #[error("{0}")]
    Internal(String),
}

impl ControllerError {
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        ControllerError::NotFound { kind, id: id.into() }
    }

    /// Wraps an agent's answer with what the flow was doing.
    pub fn during(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> ControllerError {
        let what = what.into();
        move |status| ControllerError::During { what, cause: Box::new(ControllerError::Agent(status)) }
    }

    /// Wraps an agent's failure at a change that is safe to repeat, with
    /// what the flow was doing: `Unfinished`, for a retry.
    pub fn unfinished(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> ControllerError {
        let during = ControllerError::during(what);
        move |status| ControllerError::Unfinished(Box::new(during(status)))
    }

    /// Wraps an agent's failure at a change that is safe to repeat: the
    /// node's refusal (FAILED_PRECONDITION: say, the volume is in use there)
    /// stays one; anything else is `Unfinished`, for a retry.
    pub fn unfinished_unless_refused(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> ControllerError {
        let what = what.into();
        move |status| match status.code() {
            Code::FailedPrecondition => ControllerError::during(what)(status),
            _ => ControllerError::unfinished(what)(status),
        }
    }

    /// The gRPC code the CSI spec names for this failure.
    pub fn code(&self) -> Code {
        use ControllerError::*;
        match self {
            NotFound { .. } | NodeNotFound { .. } => Code::NotFound,
            NameTaken { .. } | PublishedOtherwise { .. } => Code::AlreadyExists,
            Invalid(_) => Code::InvalidArgument,
            // The spec's answer to a token the plugin cannot use.
            BadPageToken { .. } => Code::Aborted,
            // Something else is under way on the object: the sidecars retry ABORTED.
            BeingDeleted { .. } | Migrating { .. } | InProgress(_) | CopyGivenUp(_) | NotCutTogether(_) => Code::Aborted,
            NotAvailable { .. }
            | InUse { .. }
            | MigrationUnderWay { .. }
            | NotMigrating { .. }
            | TooLateToCancel { .. }
            | NodeUnfit { .. }
            | TopologyUnmet(_)
            | Mismatch { .. }
            | AgentTls(_) => Code::FailedPrecondition,
            NoNodeFits { .. } => Code::ResourceExhausted,
            TargetCannotTake { capacity: true, .. } => Code::ResourceExhausted,
            TargetCannotTake { capacity: false, .. } => Code::FailedPrecondition,
            SmallerThanSource { .. } => Code::OutOfRange,
            NodeNotRegistered { .. } | OutcomeUnknown { .. } | Unfinished(_) | NotLeader | ViewNotReady => Code::Unavailable,
            Agent(status) => status.code(),
            During { cause, .. } => cause.code(),
            // What a caller can act on passes; anything else is the node's trouble.
            SnapshotFailed { cause, .. } => match cause.code() {
                c @ (Code::NotFound | Code::ResourceExhausted | Code::Unavailable | Code::FailedPrecondition) => c,
                _ => Code::Internal,
            },
            GroupSnapshotFailed { cause, .. } => match cause.code() {
                c @ (Code::NotFound | Code::ResourceExhausted | Code::Unavailable | Code::FailedPrecondition | Code::Aborted) => c,
                _ => Code::Internal,
            },
            AttemptsFailed { rescheduled: true, .. } => Code::Internal,
            AttemptsFailed { last, .. } => last.code(),
            FlowFailed(f) => f.error.error.code(),
            Store(e) => e.code(),
            BadAgentAddress { .. } | IncompleteAnswer(_) | Internal(_) => Code::Internal,
        }
    }

    /// True for a failure that says nothing about what the node did: the
    /// call may or may not have happened (timeout, broken connection).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self.code(), Code::DeadlineExceeded | Code::Unavailable | Code::Cancelled | Code::Unknown)
    }

    /// True when the call to a node never left (no connection).
    pub fn never_sent(&self) -> bool {
        self.to_string().contains(crate::tls::client::NOT_CONNECTED)
    }

    /// True when a node answered as another node or pool (nothing may be
    /// written there, not even a cleanup).
    pub fn is_mismatch(&self) -> bool {
        self.code() == Code::FailedPrecondition && self.to_string().starts_with(MISMATCH)
    }
}

impl From<ControllerError> for tonic::Status {
    fn from(e: ControllerError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ControllerError as E;

    fn status(e: ControllerError) -> (Code, String) {
        let s = tonic::Status::from(e);
        (s.code(), s.message().to_string())
    }

    fn boxed(e: ControllerError) -> Box<ControllerError> {
        Box::new(e)
    }

    #[test]
    fn each_failure_gets_the_code_the_csi_spec_names() {
        let phase = MigrationPhase::Copying;
        let cases: Vec<(ControllerError, Code)> = vec![
            (E::not_found("volume", "vol-1"), Code::NotFound),
            (E::NodeNotFound { node: "n".into() }, Code::NotFound),
            (E::NameTaken { kind: "volume", name: "a".into(), holder: "b".into() }, Code::AlreadyExists),
            (E::PublishedOtherwise { volume: "v".into(), node: "n".into(), read_only: true }, Code::AlreadyExists),
            (E::Invalid("x".into()), Code::InvalidArgument),
            (E::BadPageToken { token: "t".into() }, Code::Aborted),
            (E::BeingDeleted { kind: "snapshot", name: "s".into() }, Code::Aborted),
            (E::NotAvailable { what: "volume v".into(), phase: Phase::Creating, then: "wait" }, Code::FailedPrecondition),
            (E::InUse { volume: "v".into(), nodes: vec!["n".into()], why: "unpublish it first".into() }, Code::FailedPrecondition),
            (E::Migrating { volume: "v".into(), to: "n".into(), phase, then: "later" }, Code::Aborted),
            (E::MigrationUnderWay { volume: "v".into(), to: "n".into(), phase }, Code::FailedPrecondition),
            (E::NotMigrating { volume: "v".into() }, Code::FailedPrecondition),
            (E::TooLateToCancel { volume: "v".into(), to: "n".into(), phase }, Code::FailedPrecondition),
            (E::InProgress("x".into()), Code::Aborted),
            (E::CopyGivenUp("x".into()), Code::Aborted),
            (E::NotCutTogether("x".into()), Code::Aborted),
            (E::NoNodeFits { reasons: "full".into() }, Code::ResourceExhausted),
            (
                E::TargetCannotTake { node: "n".into(), volume: "v".into(), size: "1 GiB".into(), reasons: vec![], capacity: true },
                Code::ResourceExhausted,
            ),
            (
                E::TargetCannotTake { node: "n".into(), volume: "v".into(), size: "1 GiB".into(), reasons: vec![], capacity: false },
                Code::FailedPrecondition,
            ),
            (E::NodeUnfit { node: "n".into(), why: "is being evacuated".into() }, Code::FailedPrecondition),
            (E::TopologyUnmet("x".into()), Code::FailedPrecondition),
            (E::Mismatch { node: "n".into(), reason: "r".into() }, Code::FailedPrecondition),
            (E::SmallerThanSource { size: 1, of: "volume v".into(), of_size: 2 }, Code::OutOfRange),
            (E::NodeNotRegistered { node: "n".into() }, Code::Unavailable),
            (E::OutcomeUnknown { node: "n".into(), call: "a".into(), asked: "b".into() }, Code::Unavailable),
            (E::Unfinished(boxed(E::Agent(tonic::Status::internal("x")))), Code::Unavailable),
            (E::NotLeader, Code::Unavailable),
            (E::ViewNotReady, Code::Unavailable),
            (E::Store(StoreError::Conflict { kind: "volume", id: "v".into(), expected: 1, actual: 2 }), Code::Aborted),
            (E::Store(StoreError::NotFound { kind: "volume", id: "v".into() }), Code::NotFound),
            (E::Store(StoreError::Backend("down".into())), Code::Unavailable),
            (
                E::Store(StoreError::AlreadyExists {
                    kind: "volume",
                    id: "v".into(),
                    existing: crate::store::Versioned { version: 1, value: vec![] },
                }),
                Code::AlreadyExists,
            ),
            (E::AgentTls("x".into()), Code::FailedPrecondition),
            (E::BadAgentAddress { node: "n".into(), address: "a".into(), reason: "r".into() }, Code::Internal),
            (E::IncompleteAnswer("a volume"), Code::Internal),
            (E::Internal("x".into()), Code::Internal),
        ];
        for (e, code) in cases {
            let what = format!("{e:?}");
            assert_eq!(status(e).0, code, "{what}");
        }
    }

    #[test]
    fn an_agents_answer_keeps_its_code_and_message_with_what_the_flow_did() {
        let e = E::during("node n1 could not export volume v")(tonic::Status::resource_exhausted("pool full"));
        assert_eq!(status(e), (Code::ResourceExhausted, "node n1 could not export volume v: pool full".into()));
        assert_eq!(status(E::Agent(tonic::Status::not_found("gone"))), (Code::NotFound, "gone".into()));
    }

    #[test]
    fn failed_snapshots_pass_on_only_what_a_caller_can_act_on() {
        let snap = |c: tonic::Status| E::SnapshotFailed { snapshot: "s".into(), node: "n".into(), cause: boxed(E::Agent(c)) };
        assert_eq!(status(snap(tonic::Status::resource_exhausted("full"))).0, Code::ResourceExhausted);
        assert_eq!(status(snap(tonic::Status::invalid_argument("x"))).0, Code::Internal);
        assert_eq!(status(snap(tonic::Status::aborted("x"))).0, Code::Internal);
        let group = |c: ControllerError| E::GroupSnapshotFailed { group: "g".into(), cause: boxed(c) };
        assert_eq!(status(group(E::NotCutTogether("thawed early".into()))).0, Code::Aborted);
        assert_eq!(status(group(E::Agent(tonic::Status::data_loss("x")))).0, Code::Internal);
    }

    #[test]
    fn a_create_out_of_attempts_is_internal_only_when_another_node_might_have_done() {
        let last = || boxed(E::During { what: "node n".into(), cause: boxed(E::Agent(tonic::Status::invalid_argument("bad"))) });
        let failed = |rescheduled| E::AttemptsFailed { attempts: 1, reasons: "n: bad".into(), last: last(), rescheduled };
        assert_eq!(status(failed(true)).0, Code::Internal);
        assert_eq!(status(failed(false)), (Code::InvalidArgument, "volume could not be created after 1 attempt(s): n: bad".into()));
    }

    #[test]
    fn a_failed_flow_answers_with_its_failing_tasks_code_and_every_reason() {
        let failure = FlowFailure {
            flow: "create_volume",
            task: "schedule_and_create",
            error: TaskError::new(E::NoNodeFits { reasons: "no node can take it".into() }),
            revert_errors: vec![("record", TaskError::new(E::Store(StoreError::Backend("down".into()))))],
        };
        let (code, message) = status(E::FlowFailed(Box::new(failure)));
        assert_eq!(code, Code::ResourceExhausted);
        assert_eq!(message, "create_volume failed at schedule_and_create: no node can take it; revert of record also failed: store: down");
    }

    #[test]
    fn mismatches_and_unknown_outcomes_are_told_apart() {
        let m = E::Mismatch { node: "n".into(), reason: "answered as node m".into() };
        assert!(m.is_mismatch() && !m.outcome_unknown());
        assert!(status(m).1.starts_with(MISMATCH));
        let lost = E::Agent(tonic::Status::deadline_exceeded("timeout"));
        assert!(lost.outcome_unknown() && !lost.never_sent());
        let unsent = E::Agent(tonic::Status::unavailable(format!("{} node n", crate::tls::client::NOT_CONNECTED)));
        assert!(unsent.never_sent());
    }

    #[test]
    fn messages_say_what_to_do_next() {
        let (_, m) = status(E::InUse { volume: "v".into(), nodes: vec!["a".into(), "b".into()], why: "unpublish it first".into() });
        assert_eq!(m, "volume v is published to node(s) a, b; unpublish it first");
        let (_, m) = status(E::PublishedOtherwise { volume: "v".into(), node: "n".into(), read_only: true });
        assert_eq!(m, "volume v is published to node n read-only already; unpublish it first");
        let unfinished = E::unfinished_unless_refused("node n could not delete volume v");
        assert_eq!(
            status(unfinished(tonic::Status::internal("busy"))),
            (Code::Unavailable, "node n could not delete volume v: busy; retry".into())
        );
        let refused = E::unfinished_unless_refused("node n could not delete volume v");
        assert_eq!(
            status(refused(tonic::Status::failed_precondition("in use"))),
            (Code::FailedPrecondition, "node n could not delete volume v: in use".into())
        );
    }
}
