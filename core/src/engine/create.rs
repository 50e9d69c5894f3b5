//! Prepare and View: a new thin snapshot of a committed parent (or of the base device of
//! the configured filesystem), activated and sized, with its mounts.

use std::collections::BTreeMap;

use thinpool::units;
use tracing::instrument;

use super::{Engine, Mount};
use crate::{
    error::{Error, Result},
    failpoint::hit as fp,
    labels::{requested_size, validate_key, validate_labels, KEEP_LABEL, REF_LABEL},
    store::{Device, Kind, Owner, Record, State},
};

impl Engine {
    /// containerd's Prepare: a new active (writable) snapshot `key` of committed `parent`
    /// (or of the empty base filesystem), returning its mounts.
    ///
    /// # Errors
    /// AlreadyExists if `key` exists, or if the `containerd.io/snapshot.ref` label names a
    /// committed snapshot; NotFound if `parent` does not exist; InvalidArgument if it is not
    /// committed or the request is malformed; ResourceExhausted if the pool is too full.
    #[instrument(level = "info", skip(self, labels), fields(key))]
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    /// containerd's View: a new read-only snapshot `key` of committed `parent`.
    ///
    /// # Errors
    /// As [`Engine::prepare`].
    #[instrument(level = "info", skip(self, labels), fields(key))]
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    /// containerd takes over the committed snapshot `key` it found by its chain id (its
    /// metadata names it from now on, and its garbage collector may remove it like its
    /// own): the snapshot is no longer kept ([`KEEP_LABEL`]).
    fn release_kept(&self, key: &str) -> Result<()> {
        let mut tx = self.store.write()?;
        let Some(mut r) = tx.get(key)? else {
            return Ok(());
        };
        if r.labels.remove(KEEP_LABEL).is_some() {
            r.updated_ns = crate::time::now_ns();
            tx.put(&r)?;
            tx.commit()?;
            tracing::info!(key, "containerd took over the snapshot: no longer kept");
        }
        Ok(())
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        validate_key("snapshot key", key)?;
        if !parent.is_empty() {
            validate_key("parent key", parent)?;
        }
        validate_labels(&labels)?;
        let _live = self.live(Owner::Snapshot(key.to_string()));
        if let Some(target) = labels.get(REF_LABEL) {
            let existing = self.store.read()?.get(target)?;
            if matches!(existing, Some(r) if r.kind == Kind::Committed && r.device.state == State::Ready)
            {
                self.release_kept(target)?;
                return Err(Error::AlreadyExists(format!(
                    "target snapshot {target:?}: already exists"
                )));
            }
        }
        let requested = requested_size(&labels)?;
        if let Some(s) = requested {
            self.check_size(s, "the snapshot's size label")?;
        }
        let origin = self.origin(parent)?;
        let size = match requested {
            Some(s) if s < origin.size => {
                return Err(Error::InvalidArgument(format!(
                    "requested size {} is smaller than the parent's {}: filesystems cannot shrink",
                    units::format_size(s),
                    units::format_size(origin.size)
                )))
            }
            Some(s) => s,
            None => origin.size,
        };
        let parent = (!parent.is_empty()).then(|| parent.to_string());
        let (record, dev) = self.create_device(
            |tx| {
                if tx.get(key)?.is_some() {
                    return Err(Error::AlreadyExists(format!(
                        "snapshot {key:?} already exists"
                    )));
                }
                // The parent may have been removed since it was read.
                match &parent {
                    Some(p) if !matches!(tx.get(p)?, Some(r) if r.device.state == State::Ready) => {
                        Err(Error::NotFound(format!(
                            "parent snapshot {p:?} does not exist"
                        )))
                    }
                    _ => Ok(()),
                }
            },
            |id| {
                Record::new(
                    key,
                    kind,
                    parent.clone(),
                    labels.clone(),
                    Device::creating(id, size, origin.fs),
                )
            },
            Some(origin.thin_id),
            |r| {
                // No other request changes a Creating record (Remove and Commit want it
                // Ready; gc and Cleanup leave live owners alone): the id is the key's.
                let dev = self.activate_device(r.device.thin_id, r.device.size)?;
                fp("create.after-activate");
                if r.device.size > origin.size {
                    self.pool.grow_unmounted(r.device.fs, &dev.devnode)?;
                    fp("create.after-grow");
                }
                Ok(dev)
            },
        )?;
        Ok(self.mounts_for(&record, &dev))
    }

    /// Finishes a create a crash interrupted after its device was made: activates it, grows
    /// its filesystem if it is larger than its origin's (an idempotent step), and records it
    /// Ready.
    pub(super) fn finish_snapshot_create(&self, rec: &Record) -> Result<()> {
        let origin = match &rec.parent {
            Some(p) => self.store.read()?.get(p)?.map(|r| r.device),
            None => self.store.read()?.base(rec.device.fs)?.map(|b| b.device),
        }
        .ok_or_else(|| Error::Internal(format!("the origin of snapshot {:?} is gone", rec.key)))?;
        let dev = self.activate_device(rec.device.thin_id, rec.device.size)?;
        if rec.device.size > origin.size {
            self.pool.grow_unmounted(rec.device.fs, &dev.devnode)?;
        }
        let mut done = rec.clone();
        done.device.state = State::Ready;
        let mut tx = self.store.write()?;
        tx.put(&done)?;
        tx.commit()?;
        Ok(())
    }

    /// The device a new snapshot of `parent` starts from: the parent's (which must be
    /// committed), or the base device of the configured filesystem when there is none.
    fn origin(&self, parent: &str) -> Result<Device> {
        if parent.is_empty() {
            return Ok(self.ensure_base(self.config.filesystem)?.device);
        }
        match self.store.read()?.get(parent)? {
            Some(p) if p.device.state == State::Ready && p.kind == Kind::Committed => Ok(p.device),
            Some(p) if p.device.state == State::Ready => Err(Error::InvalidArgument(format!(
                "parent snapshot {parent:?} is {}, not committed: commit it first",
                p.kind.as_str()
            ))),
            _ => Err(Error::NotFound(format!(
                "parent snapshot {parent:?} does not exist"
            ))),
        }
    }
}
