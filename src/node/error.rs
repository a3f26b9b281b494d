//! What a Node call can refuse or fail at, and the gRPC code the CSI spec
//! names for each. Every message says what to do next.

use std::io;
use std::path::PathBuf;

use tonic::Code;

use crate::attach::AttachError;
use crate::volume::VolumeError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{field} is required{hint}")]
    Missing { field: &'static str, hint: &'static str },

    #[error("invalid {field} {path:?}: {reason}")]
    InvalidPath { field: &'static str, path: String, reason: String },

    #[error("unsupported volume_capability: {reason}")]
    InvalidCapability { reason: String },

    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },

    #[error("volume {id:?} does not exist on this node; check the volume ID and that the volume lives in this node's pool")]
    VolumeNotFound { id: String },

    #[error("{path} was checked, but cannot be reached as checked: {detail}")]
    PathChanged { path: PathBuf, detail: String },

    #[error("volume {id:?} is not staged or published at {path}: {detail}")]
    NotAtPath { id: String, path: PathBuf, detail: String },

    #[error("volume {id:?} is already staged at {path} {detail}; unstage it first or repeat the original request")]
    StagedOtherwise { id: String, path: PathBuf, detail: String },

    #[error("{path} is already published {detail}; unpublish it first or repeat the original request")]
    PublishedOtherwise { path: PathBuf, detail: String },

    #[error("{path} already holds {detail}; use another path or clean it up first")]
    Occupied { path: PathBuf, detail: String },

    #[error("{path} holds {detail}, which is not volume {id:?}; nothing was changed, check the volume ID and path")]
    Foreign { id: String, path: PathBuf, detail: String },

    #[error("volume {id:?} is not staged at {path}: {detail}; call NodeStageVolume first")]
    NotStaged { id: String, path: PathBuf, detail: String },

    #[error("staging_target_path is required: this plugin stages volumes (STAGE_UNSTAGE_VOLUME); call NodeStageVolume first and pass its staging path")]
    StagingPathMissing,

    #[error("volume {id:?} {detail}")]
    InUse { id: String, detail: String },

    #[error("volume {id:?} cannot be used as asked: {detail}")]
    Unusable { id: String, detail: String },

    #[error("another call on volume {id:?} is in progress; retry when it has finished")]
    Busy { id: String },

    #[error("capacity_range cannot be met: {detail}")]
    CapacityRange { detail: String },

    #[error(transparent)]
    Attach(#[from] AttachError),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("{detail}")]
    Internal { detail: String },
}

impl NodeError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> NodeError {
        let context = context.into();
        move |source| NodeError::Io { context, source }
    }

    pub fn code(&self) -> Code {
        use NodeError::*;
        match self {
            Missing { .. } | InvalidPath { .. } | InvalidCapability { .. } | Invalid { .. } | PathChanged { .. } => Code::InvalidArgument,
            VolumeNotFound { .. } | NotAtPath { .. } => Code::NotFound,
            StagedOtherwise { .. } | PublishedOtherwise { .. } | Occupied { .. } => Code::AlreadyExists,
            NotStaged { .. } | StagingPathMissing | InUse { .. } | Unusable { .. } | Foreign { .. } => Code::FailedPrecondition,
            Busy { .. } => Code::Aborted,
            CapacityRange { .. } => Code::OutOfRange,
            Attach(e) => match e {
                // The request carried them: the caller must fix it.
                AttachError::BadMountOption { .. } | AttachError::UnsupportedFilesystem { .. } => Code::InvalidArgument,
                // Lost a race for a free loop device: worth a retry.
                AttachError::LoopBusy { .. } => Code::Aborted,
                _ => Code::Internal,
            },
            Io { .. } | Internal { .. } => Code::Internal,
        }
    }
}

impl From<VolumeError> for NodeError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::NotFound { id, .. } => NodeError::VolumeNotFound { id },
            VolumeError::Invalid { what, reason } => NodeError::Invalid { what, reason },
            VolumeError::Broken { id, reason, .. } => NodeError::Unusable {
                id,
                detail: format!("it is broken on this node ({reason}); its files are left for a person to repair"),
            },
            other => NodeError::Internal { detail: other.to_string() },
        }
    }
}

impl From<NodeError> for tonic::Status {
    fn from(e: NodeError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_spec_tables() {
        let id = || "vol-1".to_string();
        let p = || PathBuf::from("/k/x");
        let cases: Vec<(NodeError, Code)> = vec![
            (NodeError::Missing { field: "volume_id", hint: "" }, Code::InvalidArgument),
            (NodeError::VolumeNotFound { id: id() }, Code::NotFound),
            (NodeError::NotAtPath { id: id(), path: p(), detail: "".into() }, Code::NotFound),
            (NodeError::StagedOtherwise { id: id(), path: p(), detail: "".into() }, Code::AlreadyExists),
            (NodeError::PublishedOtherwise { path: p(), detail: "".into() }, Code::AlreadyExists),
            (NodeError::NotStaged { id: id(), path: p(), detail: "".into() }, Code::FailedPrecondition),
            (NodeError::Busy { id: id() }, Code::Aborted),
            (NodeError::CapacityRange { detail: "".into() }, Code::OutOfRange),
            (NodeError::Attach(AttachError::UnsupportedFilesystem { fs_type: "btrfs".into() }), Code::InvalidArgument),
            (NodeError::Attach(AttachError::LoopControl { error: io::Error::other("x") }), Code::Internal),
            (VolumeError::NotFound { kind: "volume", id: id() }.into(), Code::NotFound),
            (VolumeError::Invalid { what: "volume id", reason: "empty".into() }.into(), Code::InvalidArgument),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e}");
            assert_eq!(tonic::Status::from(e).code(), code);
        }
    }
}
