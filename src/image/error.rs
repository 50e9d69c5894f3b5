//! Errors of image import and export: what went wrong, on which file, entry or layer, and
//! what to do about it.

use std::{io, path::PathBuf};

use super::digest::Digest;

/// Result of image operations.
pub type Result<T> = std::result::Result<T, Error>;

/// An error from a [`Backend`](super::Backend) (the snapshotter), as it reported it.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of image import and export.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the archive or writing the export failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done, e.g. `read`.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's answer.
        #[source]
        source: io::Error,
    },
    /// The archive is not a usable image archive: malformed, truncated, too large, or an
    /// unsupported kind of image.
    #[error("{}: {what}", archive.display())]
    Archive {
        /// The archive file.
        archive: PathBuf,
        /// What is wrong, naming the entry, and what to do.
        what: String,
    },
    /// A blob in the archive does not match its digest or its declared size.
    #[error(
        "{}: {entry}: {what}; the archive is corrupt or was altered: create it again \
         (e.g. `docker save -o FILE IMAGE`)",
        archive.display()
    )]
    Integrity {
        /// The archive file.
        archive: PathBuf,
        /// The archive entry holding the blob.
        entry: String,
        /// What did not match.
        what: String,
    },
    /// A layer entry that must not be applied: it would write outside the snapshot, or
    /// through a symlink, or it is otherwise malicious. Nothing after it is applied.
    #[error("refusing layer entry {entry:?}: {why}")]
    Unsafe {
        /// The entry's name as it is in the layer.
        entry: String,
        /// Why it is refused.
        why: String,
    },
    /// Applying a layer entry failed.
    #[error("layer entry {entry:?}: cannot {op}")]
    Apply {
        /// The entry's name as it is in the layer.
        entry: String,
        /// What was being done.
        op: String,
        /// The system's answer.
        #[source]
        source: io::Error,
    },
    /// A layer's tar stream is malformed (bad header, truncated data, unknown entry type).
    #[error("layer {what}")]
    LayerFormat {
        /// What is wrong.
        what: String,
    },
    /// A layer's uncompressed content does not match the image configuration's diff id.
    #[error(
        "{}: layer {entry}: its uncompressed content has digest {actual} ({bytes} bytes), \
         but the image configuration says {expected}; the archive is corrupt or was altered",
        archive.display()
    )]
    DiffId {
        /// The archive file.
        archive: PathBuf,
        /// The archive entry holding the layer.
        entry: String,
        /// The diff id from the image configuration.
        expected: Digest,
        /// The digest of what was decompressed.
        actual: Digest,
        /// Uncompressed size.
        bytes: u64,
    },
    /// The snapshotter (the daemon) refused or failed a request.
    #[error("{op}")]
    Backend {
        /// The request, e.g. `prepare snapshot "import-1-abc" on sha256:...`.
        op: String,
        /// The snapshotter's answer.
        #[source]
        source: BackendError,
    },
    /// Mounting or unmounting a snapshot failed.
    #[error("{op}")]
    Mount {
        /// What was being done.
        op: String,
        /// The cause.
        #[source]
        source: thinpool::Error,
    },
    /// Importing one layer failed. The layers below it that were committed are complete and
    /// stay; the next import reuses them. Nothing of the failed layer is left (unless
    /// `cleanup` says otherwise).
    #[error(
        "layer {index}/{total} ({chain_id}) was not imported; {}{}",
        kept(*committed),
        cleanup.as_deref().map(|c| format!("; {c}")).unwrap_or_default()
    )]
    Layer {
        /// 1-based position of the layer, bottom first.
        index: usize,
        /// Number of layers of the image.
        total: usize,
        /// The chain id the layer would have been committed as.
        chain_id: Digest,
        /// Layers this import committed before it failed.
        committed: usize,
        /// What went wrong while cleaning up, with the command that finishes the job.
        cleanup: Option<String>,
        /// The cause.
        #[source]
        source: Box<Error>,
    },
    /// The operation was interrupted (SIGINT or SIGTERM).
    #[error("interrupted")]
    Interrupted,
}

fn kept(committed: usize) -> String {
    match committed {
        0 => "no snapshot of this import is left".into(),
        1 => "the 1 layer this import committed below it is complete and stays: the next \
              import reuses it"
            .into(),
        n => format!(
            "the {n} layers this import committed below it are complete and stay: the next \
             import reuses them"
        ),
    }
}

impl Error {
    /// An [`Error::Io`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Backend`].
    pub fn backend(op: impl Into<String>, source: impl Into<BackendError>) -> Error {
        Error::Backend {
            op: op.into(),
            source: source.into(),
        }
    }
}
