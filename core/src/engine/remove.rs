//! Remove and Cleanup. Remove takes a snapshot out of the namespace in one store commit:
//! its record becomes a tombstone that keeps its thin id, the key is free again at once,
//! and the device is reclaimed in the background ([`super::reclaim`]). Cleanup reclaims
//! whatever is left, waiting for what the workers are at.

use tracing::{info, instrument, warn};

use super::Engine;
use crate::{
    error::{Error, Result},
    failpoint::hit as fp,
    labels::{validate_key, KEEP_LABEL},
    store::{Kind, Owner, Record, State},
};

impl Engine {
    /// containerd's Remove.
    ///
    /// # Errors
    /// NotFound if `key` does not exist; FailedPrecondition while it has children, its
    /// device is open (mounted), or it is kept ([`KEEP_LABEL`]): then nothing changes.
    #[instrument(level = "info", skip(self), fields(key))]
    pub fn remove(&self, key: &str) -> Result<()> {
        validate_key("snapshot key", key)?;
        let _live = self.live(Owner::Snapshot(key.to_string()));
        let load = |r: Option<Record>| match r {
            Some(r) if r.device.state == State::Ready => Ok(r),
            _ => Err(Error::NotFound(format!("snapshot {key:?} does not exist"))),
        };
        let rec = load(self.store.read()?.get(key)?)?;
        if rec.kind != Kind::Committed {
            self.refuse_if_open(&rec)?;
        }
        let buried = {
            let mut tx = self.store.write()?;
            let rec = load(tx.get(key)?)?;
            if tx.has_children(key)? {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?}: it has children; remove them first"
                )));
            }
            if let Some(why) = rec.labels.get(KEEP_LABEL) {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is kept ({KEEP_LABEL}={why}): containerd does not know it, and its garbage collector would remove it; remove it with `thinsnap snapshot rm`, or remove the label first"
                )));
            }
            let t = tx
                .bury(key)?
                .expect("the record was read in this transaction");
            tx.commit()?;
            t
        };
        fp("remove.after-mark");
        self.reclaim_later(buried.device.thin_id)
    }

    /// Refuses to remove a snapshot whose device is open (mounted by a container, say).
    fn refuse_if_open(&self, rec: &Record) -> Result<()> {
        let id = rec.device.thin_id;
        match self.pool.open_count(id)? {
            Some(n) if n > 0 => Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {:?}: its device {} is in use (open {n} time(s), mounted?): unmount it first",
                rec.key,
                self.pool.thin_name(id)
            ))),
            _ => Ok(()),
        }
    }

    /// containerd's Cleanup: reclaims every removed snapshot's device (waiting for those
    /// being reclaimed) and finishes removals an earlier version left pending. Returns how
    /// many devices were reclaimed.
    ///
    /// # Errors
    /// The first failure other than a device still in use.
    #[instrument(level = "info", skip(self))]
    pub fn cleanup(&self) -> Result<usize> {
        let mut done = self.reclaim_all()?.len();
        // Records marked Removing under their key (an earlier version's async removals).
        let pending: Vec<Record> = self
            .store
            .read()?
            .unsettled()?
            .into_iter()
            .filter(|r| r.device.state == State::Removing)
            .collect();
        for r in pending {
            // A removal in flight (gc) finishes by itself.
            let Some(_live) = self.claim(r.owner()) else {
                continue;
            };
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
