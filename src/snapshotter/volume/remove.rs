//! VolumeDriver.Remove: refused while containers hold the volume mounted; otherwise the
//! volume is marked Removing, its device discarded and deleted, then its record deleted.

use thinpool::{failpoint::hit as fp, RemoveMode, ThinId};
use tracing::{info, instrument, warn};

use super::validate_name;
use crate::{
    snapshotter::{Error, Result, Snapshotter},
    store::{State, Volume},
};

impl Snapshotter {
    /// Removes volume `name` and its data.
    ///
    /// # Errors
    /// NotFound if it does not exist; FailedPrecondition while containers hold it mounted
    /// or its device is in use (then nothing changes).
    #[instrument(level = "info", skip(self), fields(name))]
    pub fn remove_volume(&self, name: &str) -> Result<()> {
        validate_name("volume name", name)?;
        let _g = self.lock_volumes(&[name]);
        let (marked, before) = {
            let mut tx = self.store.write()?;
            let v = match tx.volume(name)? {
                Some(v) if v.state == State::Ready => v,
                _ => return Err(Error::NotFound(format!("volume {name:?} does not exist"))),
            };
            if !v.mounts.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove volume {name:?}: it is mounted at {} for {} container mount(s); stop and remove the containers using it first (`docker ps -a --filter volume={name}`)",
                    self.volume_dir(name).display(),
                    v.mounts.len()
                )));
            }
            let mut marked = v.clone();
            marked.state = State::Removing;
            tx.put_volume(&marked)?;
            tx.commit()?;
            (marked, v)
        };
        fp("volume-remove.after-mark");
        match self.finish_volume_remove(&marked) {
            Err(Error::FailedPrecondition(msg)) => {
                // Still in use: put the record back as it was, so nothing changed.
                let mut tx = self.store.write()?;
                tx.put_volume(&before)?;
                tx.commit()?;
                Err(Error::FailedPrecondition(msg))
            }
            Ok(()) => {
                info!(volume = name, "removed volume");
                Ok(())
            }
            r => r,
        }
    }

    /// Deletes the device of a volume in state Removing (discarding its blocks first, as
    /// for snapshots), then its record.
    pub(super) fn finish_volume_remove(&self, v: &Volume) -> Result<()> {
        let id = ThinId::new(v.thin_id)?;
        let busy = |detail: String| {
            Error::FailedPrecondition(format!(
                "cannot remove volume {:?}: its device {} is in use ({detail})",
                v.name,
                &*self.pool.thin_name(id)
            ))
        };
        if self.config.discard_on_remove {
            match self.activate_volume(v) {
                Ok(dev) => match thinpool::fs::discard(&dev.devnode) {
                    Ok(()) => {}
                    Err(thinpool::Error::Busy { detail, .. }) => return Err(busy(detail)),
                    Err(e) => {
                        warn!(volume = %v.name, error = %e, "discard failed; the blocks are still freed in the pool")
                    }
                },
                Err(e) => warn!(volume = %v.name, error = %e, "cannot activate for discard"),
            }
            fp("volume-remove.after-discard");
        }
        self.deactivate(id, RemoveMode::Now).map_err(|e| match e {
            thinpool::Error::Busy { detail, .. } => busy(detail),
            e => Error::Pool(e),
        })?;
        let txn = self.pool_change("volume-remove.after-message", |p| p.delete_thin(id))?;
        fp("volume-remove.after-txn");
        let mut tx = self.store.write()?;
        tx.delete_volume(&v.name)?;
        tx.set_meta("pool_txn", txn)?;
        tx.commit()?;
        let _ = std::fs::remove_dir(self.volume_dir(&v.name));
        fp("volume-remove.after-store");
        Ok(())
    }
}
