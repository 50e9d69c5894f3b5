//! The snapshotter: containerd's snapshot semantics over one thin pool and the metadata
//! store. Each operation commits its intent to the store, changes the pool, then commits
//! the result; a crash in between is finished or rolled back by `recover` at startup.
//!
//! All methods are synchronous (ioctls and fsyncs); the gRPC service runs them on tokio's
//! blocking pool. Pool metadata changes are serialized by one lock per pool, which also
//! carries the pool's transaction id; store writes are serialized by the store itself.

mod abandoned;
mod commit;
mod create;
pub mod filter;
mod query;
mod recover;
mod remove;
pub mod volume;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Mutex, MutexGuard},
};

use thinpool::{ActiveThin, FsType, ThinId, ThinPool};
use tracing::info;

use crate::{
    config::Config,
    store::{Record, Store, StoreError},
};

pub use recover::Report;

/// Label giving a snapshot's thin device size, e.g. `20G` (thinsnap's own).
pub const SIZE_LABEL: &str = "containerd.io/snapshot/thinsnap.size";
/// containerd's label giving a snapshot's maximum size in bytes (containerd 2.4).
pub const MAX_SIZE_LABEL: &str = "containerd.io/snapshot/max-size";
/// containerd's remote-snapshotter label: the chain id a Prepare would create.
pub const REF_LABEL: &str = "containerd.io/snapshot.ref";
/// Longest accepted snapshot key, in bytes.
pub const MAX_KEY_LEN: usize = 4096;
/// Longest accepted label key plus value, in bytes (containerd's limit).
pub const MAX_LABEL_LEN: usize = 4096;

/// Errors of snapshot operations, one variant per gRPC code containerd expects.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot (or its parent) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The snapshot (or commit target) exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The snapshot is not in a state that allows the operation (has children, not active,
    /// device busy).
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
    /// The kernel or a tool failed.
    #[error(transparent)]
    Pool(#[from] thinpool::Error),
    /// The metadata store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result of snapshot operations.
pub type Result<T> = std::result::Result<T, Error>;

/// What containerd mounts for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type (`ext4`, `xfs`).
    pub fs: String,
    /// Device node, `/dev/dm-N`.
    pub source: PathBuf,
    /// Mount options.
    pub options: Vec<String>,
}

/// The snapshotter of one pool.
pub struct Snapshotter {
    config: Config,
    pool: ThinPool,
    store: Store,
    /// Serializes pool metadata changes; holds the pool's transaction id.
    txn: Mutex<u64>,
    /// Serializes creation of base devices.
    base_lock: Mutex<()>,
    /// Striped locks serializing device changes per thin id.
    id_locks: Vec<Mutex<()>>,
    /// Striped locks serializing the operations of one Docker volume (by name).
    volume_locks: Vec<Mutex<()>>,
}

impl Snapshotter {
    /// Opens the pool and store named by `config`, creating them on first use. Call
    /// [`Snapshotter::recover`] next to reconcile them after a crash.
    ///
    /// # Errors
    /// When the pool or store cannot be opened, or a required program is missing.
    pub fn open(config: Config) -> Result<Snapshotter> {
        thinpool::cmd::verify_executables(config.filesystem.programs())?;
        thinpool::cmd::verify_executables(config.volumes.filesystem.programs())?;
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| thinpool::Error::io("create state directory", &config.state_dir, e))?;
        let pool = ThinPool::open(&config.pool_name, &config.pool_source, &config.pool_options)?;
        let store = Store::open(&config.store_path(), config.pool_name.as_str())?;
        let txn = pool.transaction_id()?;
        info!(pool = %config.pool_name, source = %pool.describe_source(), txn, "pool open");
        Ok(Snapshotter {
            config,
            pool,
            store,
            txn: Mutex::new(txn),
            base_lock: Mutex::new(()),
            id_locks: (0..64).map(|_| Mutex::new(())).collect(),
            volume_locks: (0..16).map(|_| Mutex::new(())).collect(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The pool.
    pub fn pool(&self) -> &ThinPool {
        &self.pool
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn fs(&self) -> FsType {
        self.config.filesystem
    }

    fn lock_txn(&self) -> MutexGuard<'_, u64> {
        self.txn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `change` (one pool metadata message) under the pool lock, then advances the
    /// pool's transaction id; returns the new id. `failpoint` names the crash point between
    /// the message and the transaction id.
    fn pool_change(
        &self,
        failpoint: &'static str,
        change: impl FnOnce(&ThinPool) -> thinpool::Result<()>,
    ) -> Result<u64> {
        let mut txn = self.lock_txn();
        change(&self.pool).map_err(pool_error)?;
        thinpool::failpoint::hit(failpoint);
        let next = *txn + 1;
        if let Err(e) = self.pool.set_transaction_id(*txn, next) {
            // Someone else moved it (e.g. another tool on an existing pool): resync.
            let actual = self.pool.transaction_id()?;
            self.pool
                .set_transaction_id(actual, actual + 1)
                .map_err(|_| Error::Pool(e))?;
            *txn = actual + 1;
        } else {
            *txn = next;
        }
        Ok(*txn)
    }

    fn thin_id(record: &Record) -> Result<ThinId> {
        Ok(ThinId::new(record.thin_id)?)
    }

    /// Serializes device changes of one thin id (striped), so a concurrent activation
    /// and deactivation of the same device cannot interleave inside the kernel calls.
    fn id_lock(&self, id: ThinId) -> MutexGuard<'_, ()> {
        self.id_locks[id.get() as usize % self.id_locks.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Activates a record's device. If that fails because the snapshot went away
    /// meanwhile (a concurrent Remove), the answer is NotFound, not a kernel error.
    fn activate(&self, record: &Record) -> Result<ActiveThin> {
        let id = Self::thin_id(record)?;
        let res = {
            let _g = self.id_lock(id);
            self.pool
                .activate(id, thinpool::units::bytes_to_sectors(record.size))
        };
        res.or_else(|e| match self.store.read()?.get(&record.key)? {
            Some(r) if r.state != crate::store::State::Removing => Err(Error::Pool(e)),
            _ => Err(Error::NotFound(format!(
                "snapshot {:?} does not exist (it was removed)",
                record.key
            ))),
        })
    }

    /// Deactivates thin device `id` under its id lock.
    fn deactivate(&self, id: ThinId, mode: thinpool::RemoveMode) -> thinpool::Result<()> {
        let _g = self.id_lock(id);
        self.pool.deactivate(id, mode)
    }

    fn mounts_for(&self, record: &Record, dev: &ActiveThin) -> Vec<Mount> {
        let fs: FsType = record.fs.parse().unwrap_or_default();
        let mut options: Vec<String> = self.config.mount_options.clone();
        options.extend(fs.required_options().iter().map(|s| s.to_string()));
        if record.kind == crate::store::Kind::View {
            options.push("ro".into());
        }
        vec![Mount {
            fs: fs.as_str().to_string(),
            source: dev.devnode.clone(),
            options,
        }]
    }
}

/// Converts pool errors that mean "no space" or "pool unusable" to their gRPC classes.
fn pool_error(e: thinpool::Error) -> Error {
    match e {
        thinpool::Error::NoSpace { .. } => Error::ResourceExhausted(e.to_string()),
        thinpool::Error::Degraded { .. } => Error::Unavailable(e.to_string()),
        thinpool::Error::Busy { .. } => Error::FailedPrecondition(e.to_string()),
        e => Error::Pool(e),
    }
}

/// Checks a snapshot key.
fn validate_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} must not be empty")));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes long; the limit is {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(())
}

/// Checks labels as containerd does: key plus value at most 4096 bytes, keys non-empty.
fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        if k.is_empty() {
            return Err(Error::InvalidArgument(
                "label keys must not be empty".into(),
            ));
        }
        if k.len() + v.len() > MAX_LABEL_LEN {
            let short: String = k.chars().take(64).collect();
            return Err(Error::InvalidArgument(format!(
                "label key and value length ({} bytes) greater than maximum size ({MAX_LABEL_LEN} bytes), key: {short}",
                k.len() + v.len()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("key", "a").is_ok());
        assert!(matches!(
            validate_key("key", ""),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            validate_key("key", &"x".repeat(MAX_KEY_LEN + 1)),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn labels_are_validated_like_containerd() {
        let mut l = BTreeMap::new();
        l.insert("k".to_string(), "v".repeat(MAX_LABEL_LEN - 1));
        assert!(validate_labels(&l).is_ok());
        l.insert("k".to_string(), "v".repeat(MAX_LABEL_LEN));
        let e = validate_labels(&l).unwrap_err();
        assert!(e.to_string().contains("greater than maximum size"), "{e}");
        let mut l = BTreeMap::new();
        l.insert(String::new(), "v".into());
        assert!(matches!(
            validate_labels(&l),
            Err(Error::InvalidArgument(_))
        ));
    }
}
