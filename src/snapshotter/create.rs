//! Prepare and View: a new thin snapshot of a committed parent (or of the pool's base
//! device, formatted once), activated and sized, with its mounts.

use std::collections::BTreeMap;

use thinpool::{failpoint::hit as fp, units, FsType, RemoveMode};
use tracing::{info, instrument, warn};

use super::{pool_error, validate_key, validate_labels, Error, Mount, Result, Snapshotter};
use super::{MAX_SIZE_LABEL, REF_LABEL, SIZE_LABEL};
use crate::store::{Kind, Record, State};

/// The size a snapshot asks for in its labels, if any.
fn requested_size(labels: &BTreeMap<String, String>) -> Result<Option<u64>> {
    let mut size = None;
    for label in [SIZE_LABEL, MAX_SIZE_LABEL] {
        if let Some(v) = labels.get(label) {
            let bytes = units::parse_size(v)
                .map_err(|e| Error::InvalidArgument(format!("label {label}: {e}")))?;
            size = Some(size.map_or(bytes, |s: u64| s.max(bytes)));
        }
    }
    Ok(size)
}

impl Snapshotter {
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
    /// As [`Snapshotter::prepare`].
    #[instrument(level = "info", skip(self, labels), fields(key))]
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
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
        if let Some(target) = labels.get(REF_LABEL) {
            let existing = self.store.read()?.get(target)?;
            if matches!(existing, Some(r) if r.kind == Kind::Committed && r.state == State::Ready) {
                return Err(Error::AlreadyExists(format!(
                    "target snapshot {target:?}: already exists"
                )));
            }
        }
        let origin = if parent.is_empty() {
            self.ensure_base(self.fs())?
        } else {
            match self.store.read()?.get(parent)? {
                Some(p) if p.state == State::Ready && p.kind == Kind::Committed => p,
                Some(p) if p.state == State::Ready => {
                    return Err(Error::InvalidArgument(format!(
                        "parent snapshot {parent:?} is {}, not committed: commit it first",
                        p.kind.as_str()
                    )))
                }
                _ => {
                    return Err(Error::NotFound(format!(
                        "parent snapshot {parent:?} does not exist"
                    )))
                }
            }
        };
        let size = match requested_size(&labels)? {
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
        self.check_space()?;

        // Intent: the record in state Creating, with a fresh thin id.
        let record = {
            let mut tx = self.store.write()?;
            if tx.get(key)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {key:?} already exists"
                )));
            }
            // The parent may have been removed since it was read.
            if !parent.is_empty() && !matches!(tx.get(parent)?, Some(p) if p.state == State::Ready)
            {
                return Err(Error::NotFound(format!(
                    "parent snapshot {parent:?} does not exist"
                )));
            }
            let id = tx.allocate_id()?;
            let parent = (!parent.is_empty()).then(|| parent.to_string());
            let r = Record::new(key, kind, parent, labels, id, size, &origin.fs, 0);
            tx.put(&r)?;
            tx.commit()?;
            r
        };
        fp("create.after-intent");
        match self.materialize(&record, &origin) {
            Ok((record, dev)) => Ok(self.mounts_for(&record, &dev)),
            Err(e) => {
                if let Err(undo) = self.undo_create(&record) {
                    warn!(key, error = %undo, "rolling back a failed create failed; startup recovery will finish it");
                }
                Err(e)
            }
        }
    }

    /// The kernel part of a create: snapshot, activate, grow the filesystem if larger, and
    /// mark the record ready.
    fn materialize(
        &self,
        record: &Record,
        origin: &Record,
    ) -> Result<(Record, thinpool::ActiveThin)> {
        let id = Self::thin_id(record)?;
        let origin_id = Self::thin_id(origin)?;
        let txn = self.pool_change("create.after-message", |p| p.create_snapshot(id, origin_id))?;
        fp("create.after-txn");
        let dev = self.activate(record)?;
        fp("create.after-activate");
        if record.size > origin.size {
            thinpool::fs::grow_unmounted(record.fs.parse().unwrap_or_default(), &dev.devnode)?;
            fp("create.after-grow");
        }
        let mut done = record.clone();
        done.state = State::Ready;
        done.txn = txn;
        let mut tx = self.store.write()?;
        tx.put(&done)?;
        tx.set_meta("pool_txn", txn)?;
        tx.commit()?;
        fp("create.after-ready");
        Ok((done, dev))
    }

    /// Rolls back a create: deactivate and delete the thin device, delete the record.
    pub(super) fn undo_create(&self, record: &Record) -> Result<()> {
        let id = Self::thin_id(record)?;
        self.deactivate(id, RemoveMode::Now)?;
        let txn = self.pool_change("undo-create.after-message", |p| p.delete_thin(id))?;
        let mut tx = self.store.write()?;
        tx.delete(&record.key, true)?;
        tx.set_meta("pool_txn", txn)?;
        tx.commit()?;
        Ok(())
    }

    /// Refuses new snapshots while free data or metadata space is under the threshold, or
    /// while the kernel reports the pool unwritable.
    pub(super) fn check_space(&self) -> Result<()> {
        let st = self.pool.check_writable().map_err(pool_error)?;
        let min = self.config.min_free_space;
        let data_free = 1.0 - st.data_fraction();
        let meta_free = 1.0 - st.meta_fraction();
        if data_free < min || meta_free < min {
            let (what, used, total) = if data_free < min {
                ("data", st.data_used_bytes(), st.data_total_bytes())
            } else {
                ("metadata", st.meta_used_bytes(), st.meta_total_bytes())
            };
            let a = &self.config.autogrow;
            let max = if what == "data" {
                a.max_data_size
            } else {
                a.max_metadata_size
            };
            let fix = if a.enabled && total >= max {
                format!("the pool reached its autogrow maximum (pool.autogrow.max_{what}_size = {}): raise it, grow the pool with `thinsnap pool grow`, or remove unused snapshots", units::format_size(max))
            } else if a.enabled {
                "autogrow is growing the pool: retry shortly, or grow it with `thinsnap pool grow`"
                    .to_string()
            } else {
                "grow it with `thinsnap pool grow`, or remove unused snapshots".to_string()
            };
            return Err(Error::ResourceExhausted(format!(
                "pool {} has too little free {what} space for a new snapshot ({} of {} used; at least {:.0}% must stay free): {fix}",
                self.config.pool_name,
                units::format_size(used),
                units::format_size(total),
                min * 100.0
            )));
        }
        Ok(())
    }

    /// The base device of filesystem `fs` (snapshots use the configured one, volumes may
    /// ask for another), created and formatted on first use. `mkfs_options` apply to the
    /// configured filesystem only: they are options of its mkfs.
    pub(super) fn ensure_base(&self, fstype: FsType) -> Result<Record> {
        let fs = fstype.as_str();
        if let Some(b) = self.store.read()?.base(fs)? {
            if b.state == State::Ready {
                return Ok(b);
            }
        }
        let _g = self.base_lock.lock().unwrap_or_else(|p| p.into_inner());
        let leftover = self.store.read()?.base(fs)?;
        match leftover {
            Some(b) if b.state == State::Ready => return Ok(b),
            Some(b) => self.undo_base(&b)?,
            None => {}
        }
        self.check_space()?;
        let record = {
            let mut tx = self.store.write()?;
            let id = tx.allocate_id()?;
            let r = Record::new(
                &format!("base:{fs}"),
                Kind::Committed,
                None,
                BTreeMap::new(),
                id,
                self.config.default_size,
                fs,
                0,
            );
            tx.put_base(&r)?;
            tx.commit()?;
            r
        };
        fp("base.after-intent");
        let made = (|| -> Result<Record> {
            let id = Self::thin_id(&record)?;
            let txn = self.pool_change("base.after-message", |p| p.create_thin(id))?;
            fp("base.after-txn");
            let dev = self.activate(&record)?;
            let extra: &[String] = if fstype == self.fs() {
                &self.config.mkfs_options
            } else {
                &[]
            };
            fstype.mkfs(&dev.devnode, extra)?;
            fp("base.after-mkfs");
            self.deactivate(id, RemoveMode::Now)?;
            let mut done = record.clone();
            done.state = State::Ready;
            done.txn = txn;
            let mut tx = self.store.write()?;
            tx.put_base(&done)?;
            tx.set_meta("pool_txn", txn)?;
            tx.commit()?;
            fp("base.after-ready");
            Ok(done)
        })();
        match made {
            Ok(b) => {
                info!(fs, thin_id = b.thin_id, size = %units::format_size(b.size), "formatted base device");
                Ok(b)
            }
            Err(e) => {
                if let Err(undo) = self.undo_base(&record) {
                    warn!(error = %undo, "rolling back the base device failed; startup recovery will finish it");
                }
                Err(e)
            }
        }
    }

    /// Deletes a half-made base device and its record.
    pub(super) fn undo_base(&self, record: &Record) -> Result<()> {
        let id = Self::thin_id(record)?;
        self.deactivate(id, RemoveMode::Now)?;
        let txn = self.pool_change("undo-base.after-message", |p| p.delete_thin(id))?;
        let mut tx = self.store.write()?;
        tx.delete_base(&record.fs)?;
        tx.set_meta("pool_txn", txn)?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_labels() {
        let mut l = BTreeMap::new();
        assert_eq!(requested_size(&l).unwrap(), None);
        l.insert(SIZE_LABEL.to_string(), "20G".to_string());
        assert_eq!(requested_size(&l).unwrap(), Some(20 * units::GIB));
        l.insert(MAX_SIZE_LABEL.to_string(), (30 * units::GIB).to_string());
        assert_eq!(
            requested_size(&l).unwrap(),
            Some(30 * units::GIB),
            "the larger wins"
        );
        l.insert(SIZE_LABEL.to_string(), "lots".to_string());
        assert!(matches!(requested_size(&l), Err(Error::InvalidArgument(_))));
    }
}
