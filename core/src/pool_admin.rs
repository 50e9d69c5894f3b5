//! Administration of the pool while thinsnap does not serve it (the caller holds the state
//! lock): repairing a pool the kernel degraded, and destroying the pool with its storage.

use thinpool::{PoolMode, PoolStatus, RemoveMode, ThinPool};

use crate::{
    config::Config,
    error::{Error, Result},
    store::Store,
};

/// Opens the pool `config` names (creating a loopback or LVM pool on first use).
///
/// # Errors
/// When the pool cannot be opened or created.
pub fn open_pool(config: &Config) -> Result<ThinPool> {
    Ok(ThinPool::open(
        &config.pool_name,
        &config.pool_source,
        &config.pool_options,
    )?)
}

/// What a repair did.
#[derive(Debug)]
pub struct Repaired {
    /// The pool's mode (and needs_check flag) before.
    pub before: (PoolMode, bool),
    /// After.
    pub after: (PoolMode, bool),
    /// What the repair tools did, line by line.
    pub report: String,
}

fn mode(st: &PoolStatus) -> (PoolMode, bool) {
    (st.mode, st.needs_check)
}

/// Repairs a pool the kernel made read-only or flagged `needs_check`: every thin device
/// of the pool is deactivated (the next start re-activates what active snapshots need),
/// then its metadata is checked and, if needed, rebuilt, and the pool activated again.
///
/// # Errors
/// FailedPrecondition while a thin device of the pool is mounted (containers still use
/// it); the repair tools' errors otherwise.
pub fn repair_pool(config: &Config) -> Result<Repaired> {
    let pool = open_pool(config)?;
    let before = mode(&pool.status()?);
    for (id, name, dev) in pool.active_thins()? {
        if let Some(m) = thinpool::fs::mounts_of(dev)?.first() {
            return Err(Error::FailedPrecondition(format!(
                "{} is mounted at {}: stop the containers using the pool first",
                &*name,
                m.display()
            )));
        }
        pool.deactivate(id, RemoveMode::Now)?;
    }
    let (pool, report) = pool.repair()?;
    let after = mode(&pool.status()?);
    Ok(Repaired {
        before,
        after,
        report,
    })
}

/// Deactivates the pool and deletes its storage (loopback files or LVM volume) and the
/// store. Refuses while the store records snapshots or volumes, unless `force`.
///
/// # Errors
/// FailedPrecondition when the store records snapshots or volumes and `force` is off;
/// the kernel's or LVM's errors otherwise.
pub fn destroy_pool(config: &Config, force: bool) -> Result<()> {
    let store_path = config.store_path();
    if store_path.exists() {
        let store = Store::open(&store_path, config.pool_name.as_str())?;
        let (n, v) = {
            let r = store.read()?;
            (r.all()?.len(), r.volumes()?.len())
        };
        drop(store);
        if (n > 0 || v > 0) && !force {
            return Err(Error::FailedPrecondition(format!(
                "the store records {n} snapshot(s) and {v} volume(s) in pool {}: remove them first, or pass --force to destroy them all",
                config.pool_name
            )));
        }
    }
    let pool = open_pool(config)?;
    for (id, _, _) in pool.active_thins()? {
        pool.deactivate(id, RemoveMode::Now)?;
    }
    pool.destroy()?;
    if store_path.exists() {
        std::fs::remove_file(&store_path)
            .map_err(|e| thinpool::Error::io("remove", &store_path, e))?;
    }
    Ok(())
}
