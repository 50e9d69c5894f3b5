//! The engine's errors. Each has one domain [`ErrorKind`] saying what a caller can do about
//! it; the binary's adapters turn kinds into gRPC codes or HTTP answers, in one place each.

use crate::store::StoreError;

/// What kind of failure an [`Error`] is, for callers that answer a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The snapshot, volume or parent does not exist.
    NotFound,
    /// The snapshot, volume or commit target exists already.
    AlreadyExists,
    /// Not in a state that allows the operation (has children, not active, in use).
    FailedPrecondition,
    /// The request is malformed.
    InvalidArgument,
    /// The pool is too full.
    ResourceExhausted,
    /// The pool cannot take changes now (read-only, failed).
    Unavailable,
    /// The kernel, a tool or the store failed.
    Internal,
}

/// Errors of engine operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot (or its parent, or the volume) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The snapshot (or commit target, or volume) exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// Not in a state that allows the operation (has children, not active, device busy).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The pool is too full for new snapshots.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The pool cannot take changes now (read-only, failed).
    #[error("{0}")]
    Unavailable(String),
    /// Something that should not happen did (a task panicked).
    #[error("{0}")]
    Internal(String),
    /// The kernel or a tool failed (with what to do in thinsnap's terms, where there is
    /// something to do).
    #[error("{0}{advice}", advice = advice(.0))]
    Pool(#[from] thinpool::Error),
    /// The metadata store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What to do about a pool error, in thinsnap's commands (the mechanism's message says
/// what is wrong in its own terms).
fn advice(e: &thinpool::Error) -> &'static str {
    match e {
        thinpool::Error::NoSpace { .. } => {
            " (`thinsnap pool grow`, or remove unused snapshots; docs/operations.md)"
        }
        thinpool::Error::Degraded { mode, .. } if mode == "read-only" => {
            " (stop thinsnap, `thinsnap pool check`, then `thinsnap pool repair`; docs/operations.md)"
        }
        thinpool::Error::Degraded { mode, .. } if mode == "failed" => " (then restart thinsnap)",
        thinpool::Error::Degraded { .. } => " (stop thinsnap, then `thinsnap pool check`)",
        thinpool::Error::Dm {
            errno: Some(nix::errno::Errno::ENOSPC),
            ..
        } => " (`thinsnap pool grow`)",
        _ => "",
    }
}

/// Result of engine operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The one classification of errors: a pool out of space is ResourceExhausted, a
    /// degraded pool Unavailable, a busy device FailedPrecondition, an invalid value
    /// InvalidArgument; other kernel and store failures are Internal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::ResourceExhausted(_) => ErrorKind::ResourceExhausted,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::Pool(p) => match p {
                thinpool::Error::NoSpace { .. } => ErrorKind::ResourceExhausted,
                thinpool::Error::Busy { .. } => ErrorKind::FailedPrecondition,
                thinpool::Error::Degraded { .. } => ErrorKind::Unavailable,
                thinpool::Error::Invalid { .. } => ErrorKind::InvalidArgument,
                _ => ErrorKind::Internal,
            },
            Error::Store(_) | Error::Internal(_) => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_errors_are_classified_once() {
        let busy = thinpool::Error::Busy {
            device: "d".into(),
            detail: "mounted".into(),
        };
        assert_eq!(Error::Pool(busy).kind(), ErrorKind::FailedPrecondition);
        assert_eq!(Error::NotFound("x".into()).kind(), ErrorKind::NotFound);
        assert_eq!(
            Error::ResourceExhausted("x".into()).kind(),
            ErrorKind::ResourceExhausted
        );
    }
}
