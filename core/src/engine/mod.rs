//! The engine: containerd's snapshot semantics, base devices and Docker volumes over one
//! thin [`Pool`] and the metadata [`Store`]. Every device change goes through one
//! lifecycle ([`lifecycle`]): commit the intent to the store, change the pool, commit the
//! result; a crash in between is finished or rolled back by [`Engine::recover`].
//!
//! All methods are synchronous (ioctls and fsyncs); the gRPC service runs them on tokio's
//! blocking pool. The pool serializes its own metadata messages; striped locks keep the
//! activation and deactivation of one device (and the operations of one volume) from
//! interleaving; store writes are serialized by the store.

mod abandoned;
mod admin;
pub mod adopt;
mod bases;
mod commit;
mod create;
pub mod filter;
mod lifecycle;
mod live;
pub mod pool;
mod query;
mod reclaim;
mod recover;
mod remove;
pub mod sim;
mod space;
mod usage;
pub mod volume;

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{Mutex, MutexGuard},
};

use thinpool::{units, ActiveThin, RemoveMode, ThinId, ThinPool};
use tracing::info;

use crate::{
    config::Config,
    error::{Error, Result},
    failpoint,
    store::{Kind, Record, State, Store},
};

pub use admin::Counts;
pub use pool::{KernelPool, Pool};
pub use recover::Report;
pub use usage::{SnapshotUsage, USAGE_MAX_AGE};

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

/// The engine of one pool.
pub struct Engine {
    config: Config,
    pool: std::sync::Arc<dyn Pool>,
    store: Store,
    /// Serializes creation of base devices.
    base_lock: Mutex<()>,
    /// Striped locks serializing device changes per thin id.
    id_locks: Vec<Mutex<()>>,
    /// Striped locks serializing the operations of one Docker volume (by name).
    volume_locks: Vec<Mutex<()>>,
    /// Thin ids the pool holds that no record owns (another tool's devices on a shared
    /// pool): never allocated, never deleted. Seeded by reconciliation, grown when a
    /// create meets an id in use.
    foreign: Mutex<BTreeSet<ThinId>>,
    /// Owners whose operation is in flight ([`live`]).
    live: Mutex<HashMap<crate::store::Owner, u32>>,
    /// Removed snapshots' devices to reclaim in the background ([`reclaim`]).
    reclaimer: reclaim::Reclaimer,
    /// The last reading of the pool's mapping trees, for Usage ([`usage`]).
    mapping: usage::MappingCache,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Opens the pool and store named by `config`, creating them on first use. Call
    /// [`Engine::recover`] next to reconcile them after a crash.
    ///
    /// # Errors
    /// When the pool or store cannot be opened, or a required program is missing.
    pub fn open(config: Config) -> Result<Engine> {
        thinpool::cmd::verify_executables(config.filesystem.programs())?;
        thinpool::cmd::verify_executables(config.volumes.filesystem.programs())?;
        thinpool::private::create_dir(&config.state_dir)?;
        if config.volumes.mount_dir.exists() {
            thinpool::private::restrict(&config.volumes.mount_dir)?;
        }
        let mounts = config.temp_mounts()?;
        let pool = ThinPool::open(&config.pool_name, &config.pool_source, &config.pool_options)?;
        Engine::with_pool(config, Box::new(KernelPool::new(pool, mounts)))
    }

    /// An engine over `pool` (the kernel's, or a [`sim::SimPool`]) with the store of
    /// `config`.
    ///
    /// # Errors
    /// When the store cannot be opened.
    pub fn with_pool(config: Config, pool: Box<dyn Pool>) -> Result<Engine> {
        let store = Store::open(&config.store_path(), config.pool_name.as_str())?;
        info!(pool = %config.pool_name, source = %pool.describe_source(), "pool open");
        Ok(Engine {
            config,
            pool: pool.into(),
            store,
            base_lock: Mutex::new(()),
            id_locks: (0..64).map(|_| Mutex::new(())).collect(),
            volume_locks: (0..16).map(|_| Mutex::new(())).collect(),
            foreign: Mutex::new(BTreeSet::new()),
            live: Mutex::new(HashMap::new()),
            reclaimer: reclaim::Reclaimer::default(),
            mapping: usage::MappingCache::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The dm name of thin device `id` (for messages and status output).
    pub fn device_name(&self, id: ThinId) -> String {
        self.pool.thin_name(id)
    }

    /// The kernel's pool, for administration that needs the real one (None for a
    /// simulated pool).
    pub fn kernel_pool(&self) -> Option<&ThinPool> {
        self.pool.kernel()
    }

    /// Runs `change` (one pool metadata message, which the kernel commits before it
    /// returns); `point` names the crash point right after it.
    ///
    /// The pool's transaction id is not advanced per operation: recovery finds half-done
    /// work from the store's Creating/Removing records and probes the thin id (`delete`
    /// answers ENODATA when it is absent), so a `set_transaction_id` message, a second
    /// synchronous metadata commit on every Prepare, View and Remove, would buy nothing. It
    /// also leaves the id alone for tools that own it (LVM on an LVM thin pool).
    fn pool_change(
        &self,
        point: &'static str,
        change: impl FnOnce(&dyn Pool) -> thinpool::Result<()>,
    ) -> Result<()> {
        change(&*self.pool)?;
        failpoint::hit(point);
        Ok(())
    }

    /// Serializes device changes of one thin id (striped), so a concurrent activation
    /// and deactivation of the same device cannot interleave inside the kernel calls.
    fn id_lock(&self, id: ThinId) -> MutexGuard<'_, ()> {
        lock(&self.id_locks[id.get() as usize % self.id_locks.len()])
    }

    /// Activates thin device `id` at `size` bytes under its id lock.
    fn activate_device(&self, id: ThinId, size: u64) -> thinpool::Result<ActiveThin> {
        let _g = self.id_lock(id);
        self.pool.activate(id, units::bytes_to_sectors(size))
    }

    /// Activates a snapshot's device, under its id lock and only while `record`'s key still
    /// owns it: a concurrent Commit (which deactivates the device under the same lock, then
    /// moves it to the committed name) or Remove makes this NotFound, never a committed
    /// snapshot's device left active.
    fn activate(&self, record: &Record) -> Result<ActiveThin> {
        let _g = self.id_lock(record.device.thin_id);
        self.activate_locked(record)
    }

    /// [`Self::activate`] for a caller that holds the device's id lock, and keeps it while
    /// it reads the active device (so a Commit or Remove cannot take it away meanwhile).
    fn activate_locked(&self, record: &Record) -> Result<ActiveThin> {
        let d = record.device;
        match self.store.read()?.get(&record.key)? {
            Some(r) if r.device.thin_id == d.thin_id && r.device.state != State::Removing => {}
            _ => {
                return Err(Error::NotFound(format!(
                    "snapshot {:?} does not exist (it was removed or committed)",
                    record.key
                )))
            }
        }
        Ok(self
            .pool
            .activate(d.thin_id, units::bytes_to_sectors(d.size))?)
    }

    /// Deactivates thin device `id` under its id lock.
    fn deactivate(&self, id: ThinId, mode: RemoveMode) -> thinpool::Result<()> {
        let _g = self.id_lock(id);
        self.pool.deactivate(id, mode)
    }

    fn mounts_for(&self, record: &Record, dev: &ActiveThin) -> Vec<Mount> {
        let fs = record.device.fs;
        let mut options: Vec<String> = self.config.mount_options.clone();
        options.extend(fs.required_options().iter().map(|s| s.to_string()));
        if record.kind == Kind::View {
            options.push("ro".into());
        }
        vec![Mount {
            fs: fs.as_str().to_string(),
            source: dev.devnode.clone(),
            options,
        }]
    }
}
