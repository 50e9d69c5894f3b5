//! What the daemon's other parts read and do through the engine: the pool's status (for
//! metrics and the pool watcher), growing the pool, and counts of what the store holds.

use thinpool::{DataBlocks, LvmPool, PoolStatus};

use super::Engine;
use crate::{error::Result, store::Kind};

/// What the store holds, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Active snapshots.
    pub active: u64,
    /// Committed snapshots.
    pub committed: u64,
    /// Views.
    pub views: u64,
    /// Docker volumes.
    pub volumes: u64,
    /// Base devices.
    pub bases: u64,
    /// Removed snapshots' devices waiting to be reclaimed.
    pub reclaiming: u64,
}

impl Counts {
    /// Thin devices thinsnap keeps in the pool.
    pub fn thin_devices(&self) -> u64 {
        self.active + self.committed + self.views + self.volumes + self.bases + self.reclaiming
    }
}

impl Engine {
    /// The pool's status. With `flush`, the kernel commits the pool's metadata first (exact
    /// figures for people); without, it answers from memory (cheap, for monitoring).
    ///
    /// # Errors
    /// When the kernel cannot be asked.
    pub fn pool_status(&self, flush: bool) -> Result<PoolStatus> {
        Ok(if flush {
            self.pool.status()?
        } else {
            self.pool.status_noflush()?
        })
    }

    /// Where the pool's storage comes from, for people.
    pub fn describe_pool(&self) -> String {
        self.pool.describe_source()
    }

    /// Size of the pool's data device in bytes.
    ///
    /// # Errors
    /// When it cannot be read.
    pub fn pool_data_bytes(&self) -> Result<u64> {
        Ok(self.pool.data_bytes()?)
    }

    /// Grows the pool's data device to `data_bytes` (and its metadata to `meta_bytes`).
    ///
    /// # Errors
    /// When the kernel or LVM refuses.
    pub fn grow_pool(&self, data_bytes: u64, meta_bytes: Option<u64>) -> Result<()> {
        Ok(self.pool.grow(data_bytes, meta_bytes)?)
    }

    /// Sets the pool's low-water mark (the kernel signals a dm event below it).
    ///
    /// # Errors
    /// When the kernel refuses.
    pub fn set_low_water_mark(&self, blocks: DataBlocks) -> Result<()> {
        Ok(self.pool.set_low_water_mark(blocks)?)
    }

    /// The LVM thin pool behind the pool, if it is one.
    pub fn pool_lvm(&self) -> Option<&LvmPool> {
        self.pool.lvm()
    }

    /// Snapshots by kind, volumes and base devices in the store (Ready or not).
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn counts(&self) -> Result<Counts> {
        let r = self.store.read()?;
        let mut c = Counts {
            volumes: r.volumes()?.len() as u64,
            bases: r.bases()?.len() as u64,
            reclaiming: r.tombstone_count()?,
            ..Counts::default()
        };
        for rec in r.all()? {
            match rec.kind {
                Kind::Active => c.active += 1,
                Kind::Committed => c.committed += 1,
                Kind::View => c.views += 1,
            }
        }
        Ok(c)
    }
}
