//! The one mapping from snapshotter errors to the gRPC codes containerd expects.

use tonic::{Code, Status};

use crate::snapshotter::Error;

/// The gRPC status for `e`: NotFound, AlreadyExists, FailedPrecondition, InvalidArgument,
/// ResourceExhausted, Unavailable as classified; kernel and store failures are Internal,
/// except a pool out of space (ResourceExhausted) or a busy device (FailedPrecondition).
pub fn to_status(e: &Error) -> Status {
    let code = match e {
        Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::InvalidArgument(_) => Code::InvalidArgument,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Pool(p) => match p {
            thinpool::Error::NoSpace { .. } => Code::ResourceExhausted,
            thinpool::Error::Busy { .. } => Code::FailedPrecondition,
            thinpool::Error::Degraded { .. } => Code::Unavailable,
            thinpool::Error::Invalid { .. } => Code::InvalidArgument,
            _ => Code::Internal,
        },
        Error::Store(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
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
