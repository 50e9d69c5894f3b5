//! Commit: an active snapshot becomes committed under a new name; its device is
//! deactivated but kept, and its usage recorded.

use std::collections::BTreeMap;

use thinpool::{units, RemoveMode};
use tracing::{instrument, warn};

use super::Engine;
use crate::{
    error::{Error, Result},
    failpoint::hit as fp,
    labels::{validate_key, validate_labels},
    store::{Kind, Owner, Record, State, Usage},
    time::now_ns,
};

impl Engine {
    /// containerd's Commit: active snapshot `key` becomes committed snapshot `name` with
    /// `labels`.
    ///
    /// # Errors
    /// NotFound if `key` does not exist; FailedPrecondition if it is not active;
    /// AlreadyExists if `name` exists; InvalidArgument for malformed requests.
    #[instrument(level = "info", skip(self, labels), fields(name, key))]
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        validate_key("snapshot name", name)?;
        validate_key("snapshot key", key)?;
        validate_labels(&labels)?;
        let _live = (
            self.live(Owner::Snapshot(key.to_string())),
            self.live(Owner::Snapshot(name.to_string())),
        );
        let record = {
            let r = self.store.read()?;
            let record = match r.get(key)? {
                Some(rec) if rec.device.state == State::Ready => rec,
                _ => return Err(Error::NotFound(format!("snapshot {key:?} does not exist"))),
            };
            if record.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is {}, not active: only active snapshots can be committed",
                    record.kind.as_str()
                )));
            }
            if r.get(name)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} already exists"
                )));
            }
            record
        };
        let id = record.device.thin_id;
        let usage = self.measure(&record)?;
        fp("commit.after-measure");
        // The durable rename and the deactivation overlap, so a Commit costs about one
        // deactivation. Each is crash-safe on its own: recovery deactivates a committed
        // snapshot's device left active, and re-activates an active one's.
        let armed = crate::failpoint::Armed::current();
        let (renamed, deactivated) = std::thread::scope(|s| {
            let rename = s.spawn(|| {
                armed.here();
                let r = self.rename_committed(&record, name, labels, usage);
                if r.is_ok() {
                    fp("commit.after-store");
                }
                r
            });
            // The id lock is held until the rename is done: no activation for the old key
            // can slip in between (Engine::activate checks the key under it).
            let _g = self.id_lock(id);
            let d = self.pool.deactivate(id, RemoveMode::Now).or_else(|e| {
                // Still mounted somewhere: the device goes away when it is unmounted.
                warn!(key, error = %e, "committed device still in use; removing it when released");
                self.pool.deactivate(id, RemoveMode::Deferred)
            });
            if d.is_ok() {
                fp("commit.after-deactivate");
            }
            let r = rename
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (r, d)
        });
        if let Err(e) = renamed {
            // Lost a race (e.g. another commit took the name): the snapshot is still active,
            // so its device must be too.
            if matches!(self.store.read()?.get(key)?, Some(r) if r.device.state == State::Ready && r.kind == Kind::Active)
            {
                self.activate(&record)?;
            }
            return Err(e);
        }
        // Committed: a device that would not go away is no reason to fail the Commit; gc
        // and the next start deactivate it once nothing holds it.
        if let Err(e) = deactivated {
            warn!(name, error = %e, "committed, but its device could not be deactivated");
        }
        Ok(())
    }

    /// The store part of a commit, in one transaction: the active record goes, the
    /// committed one takes its device.
    fn rename_committed(
        &self,
        record: &Record,
        name: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<()> {
        let key = record.key.as_str();
        let mut tx = self.store.write()?;
        if tx.get(name)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {name:?} already exists"
            )));
        }
        match tx.get(key)? {
            Some(r) if r.device.state == State::Ready && r.kind == Kind::Active => {}
            _ => return Err(Error::NotFound(format!("snapshot {key:?} does not exist"))),
        }
        tx.delete(key, false)?;
        let now = now_ns();
        let mut committed = record.clone();
        committed.key = name.to_string();
        committed.kind = Kind::Committed;
        committed.labels = labels;
        committed.created_ns = now;
        committed.updated_ns = now;
        committed.usage = Some(usage);
        committed.committed_from = Some(key.to_string());
        tx.put(&committed)?;
        tx.commit()?;
        Ok(())
    }

    /// Usage of a snapshot's device: mapped bytes from the kernel, inodes from its
    /// filesystem (statvfs where it is mounted, else its superblock).
    pub(super) fn measure(&self, record: &Record) -> Result<Usage> {
        let d = record.device;
        // Under the id lock from activation to the last reading: a concurrent Commit or
        // Remove of the same key deactivates the device under it, and would otherwise make
        // a reading here fail on a device that just went away (seen with 64 clients).
        let _g = self.id_lock(d.thin_id);
        // An active snapshot's device is normally active: one status ioctl reads it. One
        // found inactive is activated first (if the key still owns it).
        let reading = match self.pool.read_active(d.thin_id)? {
            Some(r) => r,
            None => {
                self.activate_locked(record)?;
                self.pool.read_active(d.thin_id)?.ok_or_else(|| {
                    Error::Internal(format!(
                        "the device of snapshot {:?} went away as it was activated",
                        record.key
                    ))
                })?
            }
        };
        let bytes = units::sectors_to_bytes(reading.usage.mapped);
        // Where it is mounted, the live counts; else the superblock (which an unmount
        // wrote), without reading the mount table.
        let mounted = match reading.open_count {
            0 => None,
            _ => self.pool.mounts_of(reading.device)?.into_iter().next(),
        };
        let inodes = match mounted {
            Some(m) => self.pool.used_inodes_at(&m).unwrap_or(0),
            None => self.pool.used_inodes(d.fs, &reading.devnode).unwrap_or(0),
        };
        Ok(Usage { bytes, inodes })
    }
}
