//! The crate's error type: which device, which operation, what the kernel answered, and
//! what to do about it.

use std::{fmt, io, path::PathBuf};

use devicemapper::{errors, DmError};
use nix::errno::Errno;

/// Result of every fallible `thinpool` operation.
pub type Result<T> = std::result::Result<T, Error>;

/// A suggestion shown after an error message, telling the user what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hint(pub Option<&'static str>);

impl fmt::Display for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(h) => write!(f, " ({h})"),
            None => Ok(()),
        }
    }
}

/// Errors from pools, thin devices, loop devices, LVM and filesystems.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device-mapper ioctl failed.
    #[error("{op} on {device} failed: {detail}{hint}")]
    Dm {
        /// The dm device name (or pool) the operation addressed.
        device: String,
        /// The operation, e.g. `create_thin` or `device_remove`.
        op: &'static str,
        /// The errno the kernel returned, when it returned one.
        errno: Option<Errno>,
        /// The kernel's answer in words.
        detail: String,
        /// What to do about it.
        hint: Hint,
    },
    /// A device is in use and cannot be removed or changed now.
    #[error("{device} is busy: {detail}")]
    Busy {
        /// The device.
        device: String,
        /// Who holds it and what to do.
        detail: String,
    },
    /// The pool has no free data space left.
    #[error("pool {pool} is out of data space ({detail}): grow the pool, or delete thin devices")]
    NoSpace {
        /// The pool name.
        pool: String,
        /// What ran out.
        detail: String,
    },
    /// The kernel put the pool in a mode where it refuses changes (read-only, failed,
    /// metadata flagged for checking).
    #[error("pool {pool} is {mode}: {hint}")]
    Degraded {
        /// The pool name.
        pool: String,
        /// The mode the kernel reports.
        mode: String,
        /// What to do.
        hint: &'static str,
    },
    /// Something the operation needs does not exist.
    #[error("{what} not found{hint}")]
    NotFound {
        /// What is missing.
        what: String,
        /// What to do about it.
        hint: Hint,
    },
    /// Something the operation would create already exists.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What exists.
        what: String,
    },
    /// An argument or on-disk value is not acceptable.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// What is invalid.
        what: String,
        /// Why.
        why: String,
    },
    /// The operation does not apply to this kind of pool.
    #[error("{op} is not supported for {what}{hint}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The object it does not apply to.
        what: String,
        /// What to do instead.
        hint: Hint,
    },
    /// A program (mkfs, lvm, thin_check, ...) failed.
    #[error("`{command}` failed with {status}: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status or signal.
        status: String,
        /// The last lines of its standard error.
        stderr: String,
    },
    /// A file or device operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or device.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// An operation failed, and undoing its partial effect failed too.
    #[error("{causal}; undoing it also failed: {rollback}")]
    Rollback {
        /// The first failure.
        causal: Box<Error>,
        /// The failure while rolling back.
        rollback: Box<Error>,
    },
}

impl Error {
    /// The errno the kernel returned, if this error carries one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Dm { errno, .. } => *errno,
            Error::Io { source, .. } => source.raw_os_error().map(Errno::from_raw),
            Error::Rollback { causal, .. } => causal.errno(),
            _ => None,
        }
    }

    /// Builds an [`Error::Io`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::Invalid`].
    pub fn invalid(what: impl Into<String>, why: impl Into<String>) -> Error {
        Error::Invalid {
            what: what.into(),
            why: why.into(),
        }
    }

    /// Combines a failure with a failure to undo it; returns `causal` alone if the undo worked.
    pub fn with_rollback(causal: Error, rollback: Result<()>) -> Error {
        match rollback {
            Ok(()) => causal,
            Err(rollback) => Error::Rollback {
                causal: Box::new(causal),
                rollback: Box::new(rollback),
            },
        }
    }

    /// Converts a `devicemapper` error for operation `op` on `device`.
    pub(crate) fn from_dm(device: impl Into<String>, op: &'static str, err: DmError) -> Error {
        let device = device.into();
        let errno = match &err {
            DmError::Core(errors::Error::Ioctl(_, _, _, e)) => Some(**e),
            _ => None,
        };
        let detail = match (&err, errno) {
            (_, Some(e)) => format!("{} ({})", e.desc(), e),
            (DmError::Core(errors::Error::ContextInit(msg)), None) => {
                format!("cannot open /dev/mapper/control: {msg}")
            }
            (e, None) => e.to_string(),
        };
        let hint = match (op, errno) {
            (_, None) if matches!(err, DmError::Core(errors::Error::ContextInit(_))) => {
                Hint(Some("is the dm_mod module loaded and are you root?"))
            }
            ("create_thin" | "create_snap", Some(Errno::EEXIST)) => {
                Hint(Some("the thin id is already in use in this pool"))
            }
            (_, Some(Errno::ENOSPC)) => {
                Hint(Some("the pool is out of data or metadata space: grow it"))
            }
            (_, Some(Errno::ENXIO | Errno::ENODEV)) => Hint(Some(
                "the device does not exist in the kernel: was it deactivated or removed?",
            )),
            ("table_load", Some(Errno::EINVAL)) => Hint(Some(
                "the kernel rejected the table: see `dmesg`; is the dm_thin_pool module loaded?",
            )),
            (_, Some(Errno::EPERM | Errno::EACCES)) => {
                Hint(Some("device-mapper needs root (CAP_SYS_ADMIN)"))
            }
            (_, Some(Errno::EBUSY)) => Hint(Some(
                "the device is open: unmount it and stop what uses it, then retry",
            )),
            (_, Some(Errno::ENODATA)) => {
                Hint(Some("the thin id does not exist in the pool's metadata"))
            }
            _ => Hint(None),
        };
        Error::Dm {
            device,
            op,
            errno,
            detail,
            hint,
        }
    }
}
