//! Adoption: devices another tool made in a pool that becomes thinsnap's (Docker's
//! devicemapper driver, `thinsnap migrate`) recorded as snapshots and a base device, with
//! the progress of the job that adopts them. The job's caller decides what to adopt; the
//! engine writes the records and touches the devices.

use std::collections::BTreeSet;

use thinpool::{units, ActiveThin, RemoveMode, ThinId};

use super::Engine;
use crate::{
    error::{Error, Result},
    store::{Base, Kind, Record, State, META_JOB_PENDING},
};

/// What a pool holds before adoption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// The pool's transaction id.
    pub transaction_id: u64,
    /// Every thin id in the pool's metadata.
    pub thin_ids: BTreeSet<ThinId>,
}

impl Engine {
    /// What the pool holds now (its metadata is read from a snapshot of it).
    ///
    /// # Errors
    /// When the pool's status or metadata cannot be read.
    pub fn pool_view(&self) -> Result<PoolView> {
        Ok(PoolView {
            transaction_id: self.pool.status()?.transaction_id,
            thin_ids: self.pool.thin_ids()?,
        })
    }

    /// Deletes a thin device of an adopted pool that is not adopted (what its previous
    /// owner would have deleted); an absent id is fine.
    ///
    /// # Errors
    /// When the device is in use or the kernel refuses.
    pub fn delete_unadopted(&self, id: ThinId) -> Result<()> {
        if self.store.read()?.owner(id)?.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "thin id {id} belongs to a thinsnap record: it is not deleted"
            )));
        }
        Ok(self.pool.delete_thin(id)?)
    }

    /// Records adopted devices (Ready) in one transaction, with job `job`'s first
    /// progress; the store refuses to serve until [`Engine::save_job`] marks it finished.
    /// New thin ids are allocated from `next_id` on.
    ///
    /// # Errors
    /// When the store cannot be written.
    pub fn adopt(
        &self,
        base: Option<&Base>,
        snapshots: &[Record],
        next_id: u32,
        job: &str,
        progress: &[u8],
    ) -> Result<()> {
        let mut tx = self.store.write()?;
        if let Some(b) = base {
            tx.put_base(b)?;
        }
        for r in snapshots {
            debug_assert_eq!(r.device.state, State::Ready);
            tx.put(r)?;
        }
        tx.set_next_id(next_id)?;
        tx.set_meta(META_JOB_PENDING, 1)?;
        tx.put_job(job, progress)?;
        tx.commit()?;
        Ok(())
    }

    /// Records job `job`'s progress (and an updated record, in the same transaction);
    /// `finished` lets the store serve again.
    ///
    /// # Errors
    /// When the store cannot be written.
    pub fn save_job(
        &self,
        job: &str,
        progress: &[u8],
        finished: bool,
        record: Option<&Record>,
    ) -> Result<()> {
        let mut tx = self.store.write()?;
        if let Some(r) = record {
            tx.put(r)?;
        }
        tx.put_job(job, progress)?;
        tx.set_meta(META_JOB_PENDING, u64::from(!finished))?;
        tx.commit()?;
        Ok(())
    }

    /// The recorded progress of job `job`, if any.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn job(&self, job: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.store.read()?.job(job)?)
    }

    /// The record of snapshot `key` in any state, if there is one.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn snapshot_record(&self, key: &str) -> Result<Option<Record>> {
        Ok(self.store.read()?.get(key)?)
    }

    /// Activates the device of adopted snapshot `rec` for `f`, then reads the bytes it
    /// maps and deactivates it (also when `f` fails).
    ///
    /// # Errors
    /// `f`'s error first, then the kernel's.
    pub fn with_adopted_device<T, E: From<Error>>(
        &self,
        rec: &Record,
        f: impl FnOnce(&ActiveThin) -> std::result::Result<T, E>,
    ) -> std::result::Result<(T, u64), E> {
        let d = rec.device;
        let dev = self
            .activate_device(d.thin_id, d.size)
            .map_err(Error::Pool)?;
        let out = f(&dev);
        let bytes = self
            .pool
            .thin_usage(d.thin_id)
            .map(|u| units::sectors_to_bytes(u.mapped));
        let deactivated = self.deactivate(d.thin_id, RemoveMode::Now);
        let out = out?;
        deactivated.map_err(Error::Pool)?;
        Ok((out, bytes.map_err(Error::Pool)?))
    }

    /// Activates the devices of every Ready active snapshot (after adoption).
    ///
    /// # Errors
    /// Names the snapshot whose device cannot be activated.
    pub fn activate_actives(&self) -> Result<()> {
        for r in self.store.read()?.all()? {
            if r.kind == Kind::Active && r.device.state == State::Ready {
                self.activate(&r)?;
            }
        }
        Ok(())
    }
}
