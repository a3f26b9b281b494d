//! What the controller's flows refuse or fail at, in the domain's terms.
//! The flows (create, delete, expand, publish, snapshots, groups,
//! migrations, evacuations, the reconciler) return `ControllerError`; only
//! the gRPC edges (`service.rs`, `group_service.rs`, `forward.rs`, the admin
//! API) turn it into a `tonic::Status`, through the one
//! `From<ControllerError> for tonic::Status` below, which picks the code
//! the CSI spec names for each variant.
//!
//! Flows decide on `Failure`, the class of a failure (not found, refused,
//! no space, busy, ...), not on gRPC codes. The agent API is gRPC too: its
//! answers become an `AgentError` (a `Failure` and the agent's message) in
//! `agents.rs`, as they arrive. A flow that passes one on wraps it in
//! `Agent`, which keeps its class, and says what it was doing with `During`.
//! `Failure::code` is the one place a class becomes a code.

use tonic::Code;

use super::agents::MISMATCH;
use super::records::{MigrationPhase, Phase};
use crate::flow::FlowFailure;
use crate::store::StoreError;

/// A task of a controller flow failed (see `crate::flow`).
pub type TaskError = crate::flow::TaskError<ControllerError>;

/// The class of a failure: what a caller can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    NotFound,
    AlreadyExists,
    /// An argument that cannot be acted on.
    Invalid,
    /// A size or range out of bounds.
    OutOfRange,
    /// Not in this state of things (in use, being migrated, mismatched):
    /// the caller changes something first.
    Refused,
    /// No room (capacity, no node fits).
    NoSpace,
    /// Something else is under way on the object: retry.
    Busy,
    /// Not now (a node or the store unreachable, not the leader): retry.
    Unavailable,
    /// No answer in time; the call may or may not have happened.
    TimedOut,
    Cancelled,
    /// Nothing is known of what happened.
    Unknown,
    /// Refused for who asked (a node's fence, its certificates).
    Denied,
    Unauthenticated,
    /// A call the other side does not know (an older agent).
    Unsupported,
    /// A fault of the controller or of a node.
    Internal,
    DataLoss,
}

impl Failure {
    /// The gRPC code the CSI spec names for this class.
    pub fn code(self) -> Code {
        match self {
            Failure::NotFound => Code::NotFound,
            Failure::AlreadyExists => Code::AlreadyExists,
            Failure::Invalid => Code::InvalidArgument,
            Failure::OutOfRange => Code::OutOfRange,
            Failure::Refused => Code::FailedPrecondition,
            Failure::NoSpace => Code::ResourceExhausted,
            Failure::Busy => Code::Aborted,
            Failure::Unavailable => Code::Unavailable,
            Failure::TimedOut => Code::DeadlineExceeded,
            Failure::Cancelled => Code::Cancelled,
            Failure::Unknown => Code::Unknown,
            Failure::Denied => Code::PermissionDenied,
            Failure::Unauthenticated => Code::Unauthenticated,
            Failure::Unsupported => Code::Unimplemented,
            Failure::Internal => Code::Internal,
            Failure::DataLoss => Code::DataLoss,
        }
    }

    /// The class of a gRPC code (a node agent's answer, the store's).
    pub fn of(code: Code) -> Failure {
        match code {
            Code::NotFound => Failure::NotFound,
            Code::AlreadyExists => Failure::AlreadyExists,
            Code::InvalidArgument => Failure::Invalid,
            Code::OutOfRange => Failure::OutOfRange,
            Code::FailedPrecondition => Failure::Refused,
            Code::ResourceExhausted => Failure::NoSpace,
            Code::Aborted => Failure::Busy,
            Code::Unavailable => Failure::Unavailable,
            Code::DeadlineExceeded => Failure::TimedOut,
            Code::Cancelled => Failure::Cancelled,
            Code::PermissionDenied => Failure::Denied,
            Code::Unauthenticated => Failure::Unauthenticated,
            Code::Unimplemented => Failure::Unsupported,
            Code::Internal => Failure::Internal,
            Code::DataLoss => Failure::DataLoss,
            // OK is no failure: an error that says it is knows nothing.
            Code::Ok | Code::Unknown => Failure::Unknown,
        }
    }
}

/// A node agent's answer that is not a success: its class and the agent's
/// message. `NodeAgent`'s own refusals (no longer leading, a mismatched
/// answer) take the same shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub failure: Failure,
    pub message: String,
}

impl AgentError {
    pub fn new(failure: Failure, message: impl Into<String>) -> Self {
        AgentError { failure, message: message.into() }
    }
}

impl From<tonic::Status> for AgentError {
    fn from(s: tonic::Status) -> Self {
        AgentError { failure: Failure::of(s.code()), message: s.message().to_string() }
    }
}

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
    /// A node's agent answered with an error: passed on with its class and message.
    #[error("{0}")]
    Agent(AgentError),
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
    pub fn during(what: impl Into<String>) -> impl FnOnce(AgentError) -> ControllerError {
        let what = what.into();
        move |e| ControllerError::During { what, cause: Box::new(ControllerError::Agent(e)) }
    }

    /// Wraps an agent's failure at a change that is safe to repeat, with
    /// what the flow was doing: `Unfinished`, for a retry.
    pub fn unfinished(what: impl Into<String>) -> impl FnOnce(AgentError) -> ControllerError {
        let during = ControllerError::during(what);
        move |e| ControllerError::Unfinished(Box::new(during(e)))
    }

    /// Wraps an agent's failure at a change that is safe to repeat: the
    /// node's refusal (say, the volume is in use there) stays one; anything
    /// else is `Unfinished`, for a retry.
    pub fn unfinished_unless_refused(what: impl Into<String>) -> impl FnOnce(AgentError) -> ControllerError {
        let what = what.into();
        move |e| match e.failure {
            Failure::Refused => ControllerError::during(what)(e),
            _ => ControllerError::unfinished(what)(e),
        }
    }

    /// The gRPC code the CSI spec names for this failure (for the gRPC edges).
    pub fn code(&self) -> Code {
        self.failure().code()
    }

    /// The class of this failure.
    pub fn failure(&self) -> Failure {
        use ControllerError::*;
        match self {
            NotFound { .. } | NodeNotFound { .. } => Failure::NotFound,
            NameTaken { .. } | PublishedOtherwise { .. } => Failure::AlreadyExists,
            Invalid(_) => Failure::Invalid,
            // The spec's answer to a token the plugin cannot use is ABORTED.
            BadPageToken { .. } => Failure::Busy,
            // Something else is under way on the object: the sidecars retry ABORTED.
            BeingDeleted { .. } | Migrating { .. } | InProgress(_) | CopyGivenUp(_) | NotCutTogether(_) => Failure::Busy,
            NotAvailable { .. }
            | InUse { .. }
            | MigrationUnderWay { .. }
            | NotMigrating { .. }
            | TooLateToCancel { .. }
            | NodeUnfit { .. }
            | TopologyUnmet(_)
            | Mismatch { .. }
            | AgentTls(_) => Failure::Refused,
            NoNodeFits { .. } => Failure::NoSpace,
            TargetCannotTake { capacity: true, .. } => Failure::NoSpace,
            TargetCannotTake { capacity: false, .. } => Failure::Refused,
            SmallerThanSource { .. } => Failure::OutOfRange,
            NodeNotRegistered { .. } | OutcomeUnknown { .. } | Unfinished(_) | NotLeader | ViewNotReady => Failure::Unavailable,
            Agent(e) => e.failure,
            During { cause, .. } => cause.failure(),
            // What a caller can act on passes; anything else is the node's trouble.
            SnapshotFailed { cause, .. } => match cause.failure() {
                f @ (Failure::NotFound | Failure::NoSpace | Failure::Unavailable | Failure::Refused) => f,
                _ => Failure::Internal,
            },
            GroupSnapshotFailed { cause, .. } => match cause.failure() {
                f @ (Failure::NotFound | Failure::NoSpace | Failure::Unavailable | Failure::Refused | Failure::Busy) => f,
                _ => Failure::Internal,
            },
            AttemptsFailed { rescheduled: true, .. } => Failure::Internal,
            AttemptsFailed { last, .. } => last.failure(),
            FlowFailed(f) => f.error.error.failure(),
            Store(e) => Failure::of(e.code()),
            BadAgentAddress { .. } | IncompleteAnswer(_) | Internal(_) => Failure::Internal,
        }
    }

    /// True for a failure that says nothing about what the node did: the
    /// call may or may not have happened (timeout, broken connection).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self.failure(), Failure::TimedOut | Failure::Unavailable | Failure::Cancelled | Failure::Unknown)
    }

    /// True when the call to a node never left (no connection).
    pub fn never_sent(&self) -> bool {
        self.to_string().contains(crate::tls::client::NOT_CONNECTED)
    }

    /// True when a node answered as another node or pool (nothing may be
    /// written there, not even a cleanup).
    pub fn is_mismatch(&self) -> bool {
        self.failure() == Failure::Refused && self.to_string().starts_with(MISMATCH)
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
            (E::Unfinished(boxed(E::Agent(tonic::Status::internal("x").into()))), Code::Unavailable),
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
    fn every_code_an_agent_can_answer_keeps_its_class_and_comes_back_the_same() {
        let codes = [
            Code::Cancelled,
            Code::Unknown,
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::DataLoss,
            Code::Unauthenticated,
        ];
        for code in codes {
            let e = AgentError::from(tonic::Status::new(code, "m"));
            assert_eq!((e.failure.code(), e.message.as_str()), (code, "m"));
            assert_eq!(status(E::Agent(e)), (code, "m".to_string()));
        }
        assert_eq!(Failure::of(Code::Ok), Failure::Unknown, "an error that says OK");
    }

    #[test]
    fn an_agents_answer_keeps_its_code_and_message_with_what_the_flow_did() {
        let e = E::during("node n1 could not export volume v")(tonic::Status::resource_exhausted("pool full").into());
        assert_eq!(status(e), (Code::ResourceExhausted, "node n1 could not export volume v: pool full".into()));
        assert_eq!(status(E::Agent(tonic::Status::not_found("gone").into())), (Code::NotFound, "gone".into()));
    }

    #[test]
    fn failed_snapshots_pass_on_only_what_a_caller_can_act_on() {
        let snap = |c: tonic::Status| E::SnapshotFailed { snapshot: "s".into(), node: "n".into(), cause: boxed(E::Agent(c.into())) };
        assert_eq!(status(snap(tonic::Status::resource_exhausted("full"))).0, Code::ResourceExhausted);
        assert_eq!(status(snap(tonic::Status::invalid_argument("x"))).0, Code::Internal);
        assert_eq!(status(snap(tonic::Status::aborted("x"))).0, Code::Internal);
        let group = |c: ControllerError| E::GroupSnapshotFailed { group: "g".into(), cause: boxed(c) };
        assert_eq!(status(group(E::NotCutTogether("thawed early".into()))).0, Code::Aborted);
        assert_eq!(status(group(E::Agent(tonic::Status::data_loss("x").into()))).0, Code::Internal);
    }

    #[test]
    fn a_create_out_of_attempts_is_internal_only_when_another_node_might_have_done() {
        let last = || boxed(E::During { what: "node n".into(), cause: boxed(E::Agent(tonic::Status::invalid_argument("bad").into())) });
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
        let lost = E::Agent(tonic::Status::deadline_exceeded("timeout").into());
        assert!(lost.outcome_unknown() && !lost.never_sent());
        let unsent = E::Agent(tonic::Status::unavailable(format!("{} node n", crate::tls::client::NOT_CONNECTED)).into());
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
            status(unfinished(tonic::Status::internal("busy").into())),
            (Code::Unavailable, "node n could not delete volume v: busy; retry".into())
        );
        let refused = E::unfinished_unless_refused("node n could not delete volume v");
        assert_eq!(
            status(refused(tonic::Status::failed_precondition("in use").into())),
            (Code::FailedPrecondition, "node n could not delete volume v: in use".into())
        );
    }
}
