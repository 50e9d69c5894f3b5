//! Remove and Cleanup: a snapshot is marked Removing (invisible from then on), its thin
//! device is discarded and deleted, then its record is deleted. With `async_remove`,
//! Remove returns after the mark and Cleanup does the rest.

use thinpool::{failpoint::hit as fp, RemoveMode};
use tracing::{info, instrument, warn};

use super::{Error, Result, Snapshotter};
use crate::store::{Record, State};

impl Snapshotter {
    /// containerd's Remove.
    ///
    /// # Errors
    /// NotFound if `key` does not exist; FailedPrecondition while it has children or its
    /// device is still mounted (then nothing changes).
    #[instrument(level = "info", skip(self), fields(key))]
    pub fn remove(&self, key: &str) -> Result<()> {
        super::validate_key("snapshot key", key)?;
        self.remove_record(key, self.config.async_remove)
    }

    /// Marks `key` Removing and, unless `only_mark`, deletes its device and record; a device
    /// still in use puts the record back as it was.
    pub(super) fn remove_record(&self, key: &str, only_mark: bool) -> Result<()> {
        let (record, before) = {
            let mut tx = self.store.write()?;
            let record = match tx.get(key)? {
                Some(r) if r.state == State::Ready => r,
                _ => return Err(Error::NotFound(format!("snapshot {key:?} does not exist"))),
            };
            if tx.has_children(key)? {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?}: it has children; remove them first"
                )));
            }
            let mut marked = record.clone();
            marked.state = State::Removing;
            tx.put(&marked)?;
            tx.commit()?;
            (marked, record)
        };
        fp("remove.after-mark");
        if only_mark {
            return Ok(());
        }
        match self.finish_remove(&record) {
            Err(Error::FailedPrecondition(msg)) => {
                // Still in use: put the record back as it was, so nothing changed.
                let mut tx = self.store.write()?;
                tx.put(&before)?;
                tx.commit()?;
                Err(Error::FailedPrecondition(msg))
            }
            r => r,
        }
    }

    /// Deletes the device of a record in state Removing, then the record.
    pub(super) fn finish_remove(&self, record: &Record) -> Result<()> {
        let id = Self::thin_id(record)?;
        let busy = |detail: String| {
            Error::FailedPrecondition(format!(
                "cannot remove snapshot {:?}: its device {} is in use ({detail})",
                record.key,
                &*self.pool.thin_name(id)
            ))
        };
        if self.config.discard_on_remove {
            match self.activate(record) {
                Ok(dev) => match thinpool::fs::discard(&dev.devnode) {
                    Ok(()) => {}
                    Err(thinpool::Error::Busy { detail, .. }) => return Err(busy(detail)),
                    Err(e) => {
                        warn!(key = %record.key, error = %e, "discard failed; the blocks are still freed in the pool")
                    }
                },
                Err(e) => warn!(key = %record.key, error = %e, "cannot activate for discard"),
            }
            fp("remove.after-discard");
        }
        self.deactivate(id, RemoveMode::Now).map_err(|e| match e {
            thinpool::Error::Busy { detail, .. } => busy(detail),
            e => Error::Pool(e),
        })?;
        fp("remove.after-deactivate");
        let txn = self.pool_change("remove.after-message", |p| p.delete_thin(id))?;
        let mut tx = self.store.write()?;
        tx.delete(&record.key, true)?;
        tx.set_meta("pool_txn", txn)?;
        tx.commit()?;
        fp("remove.after-store");
        Ok(())
    }

    /// containerd's Cleanup: finishes every pending removal. Returns how many snapshots
    /// were removed.
    ///
    /// # Errors
    /// The first failure other than a device still in use.
    #[instrument(level = "info", skip(self))]
    pub fn cleanup(&self) -> Result<usize> {
        let pending: Vec<Record> = self
            .store
            .read()?
            .unsettled()?
            .into_iter()
            .filter(|r| r.state == State::Removing)
            .collect();
        let mut done = 0;
        for r in pending {
            match self.finish_remove(&r) {
                Ok(()) => done += 1,
                Err(Error::FailedPrecondition(msg)) => warn!(key = %r.key, "{msg}"),
                Err(e) => return Err(e),
            }
        }
        if done > 0 {
            info!(removed = done, "cleanup");
        }
        Ok(done)
    }
}
