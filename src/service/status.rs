//! The one mapping from the engine's error kinds to the gRPC codes containerd expects.

use thinsnap_core::{Error, ErrorKind};
use tonic::{Code, Status};

/// The gRPC code of an error kind.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The gRPC status for `e`: its kind's code and its message.
pub fn to_status(e: &Error) -> Status {
    Status::new(code(e.kind()), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(
            to_status(&Error::NotFound("x".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            to_status(&Error::AlreadyExists("x".into())).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            to_status(&Error::FailedPrecondition("x".into())).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            to_status(&Error::InvalidArgument("x".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            to_status(&Error::ResourceExhausted("x".into())).code(),
            Code::ResourceExhausted
        );
        let busy = thinpool::Error::Busy {
            device: "d".into(),
            detail: "mounted".into(),
        };
        assert_eq!(
            to_status(&Error::Pool(busy)).code(),
            Code::FailedPrecondition
        );
        let e = to_status(&Error::NotFound("snapshot \"k\" does not exist".into()));
        assert!(e.message().contains("\"k\""));
    }
}
