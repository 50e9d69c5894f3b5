//! Commit: an active snapshot becomes committed under a new name; its device is
//! deactivated but kept, and its usage recorded.

use std::collections::BTreeMap;

use thinpool::{failpoint::hit as fp, units, RemoveMode};
use tracing::{instrument, warn};

use super::{validate_key, validate_labels, Error, Result, Snapshotter};
use crate::store::{record::now_ns, Kind, State, Usage};

impl Snapshotter {
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
        let record = {
            let r = self.store.read()?;
            let record = match r.get(key)? {
                Some(rec) if rec.state == State::Ready => rec,
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
        let id = Self::thin_id(&record)?;
        let usage = self.measure(&record)?;
        fp("commit.after-measure");
        if let Err(e) = self.deactivate(id, RemoveMode::Now) {
            // Still mounted somewhere: the device goes away when it is unmounted.
            warn!(key, error = %e, "committed device still in use; removing it when released");
            self.deactivate(id, RemoveMode::Deferred)?;
        }
        fp("commit.after-deactivate");
        let stored = (|| -> Result<()> {
            let mut tx = self.store.write()?;
            if tx.get(name)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} already exists"
                )));
            }
            match tx.get(key)? {
                Some(r) if r.state == State::Ready && r.kind == Kind::Active => {}
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
        })();
        if let Err(e) = stored {
            // Lost a race (e.g. another commit took the name): the snapshot is still active,
            // so its device must be too.
            if matches!(self.store.read()?.get(key)?, Some(r) if r.state == State::Ready && r.kind == Kind::Active)
            {
                self.activate(&record)?;
            }
            return Err(e);
        }
        fp("commit.after-store");
        Ok(())
    }

    /// Usage of a snapshot's device: mapped bytes from the kernel, inodes from its
    /// filesystem (statvfs where it is mounted, else its superblock).
    pub(super) fn measure(&self, record: &crate::store::Record) -> Result<Usage> {
        let id = Self::thin_id(record)?;
        let dev = self.activate(record)?;
        let bytes = units::sectors_to_bytes(self.pool.thin_usage(id)?.mapped);
        let fs: thinpool::FsType = record.fs.parse().unwrap_or_default();
        let inodes = match thinpool::fs::mounts_of(dev.device)?.first() {
            Some(m) => nix::sys::statvfs::statvfs(m.as_path())
                .map(|s| s.files() - s.files_free())
                .unwrap_or(0),
            None => thinpool::fs::used_inodes(fs, &dev.devnode).unwrap_or(0),
        };
        Ok(Usage { bytes, inodes })
    }
}
