use std::io;

use super::capacity::Shortfall;

/// Everything the volume manager can refuse or fail at. Each variant maps to
/// one gRPC code (see `From<VolumeError> for tonic::Status`).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("{kind} {id:?} does not exist on this node")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} {id:?} already exists with other arguments ({detail}); use another ID or repeat the original request")]
    Conflict { kind: &'static str, id: String, detail: String },
    #[error("the pool cannot hold {requested} bytes now: {shortfall}; free space or pick another node")]
    Capacity { requested: u64, shortfall: Shortfall },
    #[error("size {requested} bytes is out of range: {reason}")]
    OutOfRange { requested: u64, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("snapshot of volume {volume:?} not taken: {reason}")]
    Freeze { volume: String, reason: String },
    #[error("{kind} {id:?} is broken on this node: {reason}; its files are left as they are for a person to repair (deleting it moves them to orphaned/)")]
    Broken { kind: &'static str, id: String, reason: String },
    #[error("the pool record {path} is unusable ({reason}); the pool was not opened and nothing was changed: restore the file from a backup, or move the pool folder aside if it is not this node's")]
    BadPoolRecord { path: std::path::PathBuf, reason: String },
}

impl VolumeError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> VolumeError {
        let context = context.into();
        move |source| VolumeError::Io { context, source }
    }
}

impl From<VolumeError> for tonic::Status {
    fn from(e: VolumeError) -> Self {
        use tonic::Code;
        let code = match &e {
            VolumeError::Invalid { .. } => Code::InvalidArgument,
            VolumeError::NotFound { .. } => Code::NotFound,
            VolumeError::Conflict { .. } => Code::AlreadyExists,
            VolumeError::Capacity { .. } => Code::ResourceExhausted,
            VolumeError::OutOfRange { .. } => Code::OutOfRange,
            VolumeError::BadPoolRecord { .. } | VolumeError::Broken { .. } => Code::FailedPrecondition,
            // Freezing the volume's filesystem failed or did not hold: worth a retry.
            VolumeError::Freeze { .. } => Code::Aborted,
            // A read-only or full pool is a condition of this node, which the
            // controller treats as "try another node".
            VolumeError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => Code::ResourceExhausted,
                // A size this pool's filesystem cannot hold.
                Some(libc::EFBIG) => Code::OutOfRange,
                _ => Code::Internal,
            },
        };
        tonic::Status::new(code, e.to_string())
    }
}
