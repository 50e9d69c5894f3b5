//! The crash-safe metadata store: one redb database holding every snapshot's record, the
//! parent→children index, the thin-id allocation table, the base devices, Docker volumes,
//! the pool's last recorded transaction id, and the progress of resumable jobs (migrations).
//!
//! Writes follow containerd's devmapper `transition` pattern: a record is committed in a
//! "trying" state (`Creating`, `Removing`) before the kernel is touched, and in its final
//! state after; no store transaction is held across an ioctl. After a crash, startup finds
//! every record still in a trying state and finishes or rolls back its operation
//! (`snapshotter::recover`).

pub mod record;
pub mod volume;

use std::path::Path;

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};

pub use record::{Kind, Record, State, Usage};
pub use volume::Volume;

/// Snapshot key → JSON [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Parent key → child keys (every child, whatever its state).
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
/// Thin id → owner (snapshot key, `base:<fs>` or `volume:<name>`).
const THIN_IDS: TableDefinition<u32, &str> = TableDefinition::new("thin_ids");
/// Base devices: filesystem name → JSON [`Record`].
const BASES: TableDefinition<&str, &[u8]> = TableDefinition::new("bases");
/// Docker volumes: volume name → JSON [`Volume`]. A table of their own, so volume names
/// never meet containerd's snapshot keys (and Walk never lists them).
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// Scalars: `next_thin_id`, `pool_txn`, `schema`, `pool`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const POOL_NAME: TableDefinition<&str, &str> = TableDefinition::new("pool");
/// Resumable jobs (e.g. `docker-devicemapper`, a migration) → their JSON progress.
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");

/// Meta key: non-zero while a job that must finish before serving is unfinished.
pub const META_JOB_PENDING: &str = "job_pending";

/// Page cache of the database, in bytes.
const CACHE_BYTES: usize = 32 << 20;

/// Version of the on-disk schema.
pub const SCHEMA: u64 = 1;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (I/O, corruption, a second writer).
    #[error("metadata store {path}: {source}")]
    Db {
        /// The database file.
        path: String,
        /// What redb said.
        source: Box<redb::Error>,
    },
    /// A record could not be decoded.
    #[error("metadata store record {key:?} is unreadable: {source}")]
    Decode {
        /// The record's key.
        key: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The store belongs to another pool or a newer thinsnap.
    #[error("metadata store {path}: {why}")]
    Mismatch {
        /// The database file.
        path: String,
        /// What does not match and what to do.
        why: String,
    },
    /// Every thin id is in use.
    #[error("no free thin device id: all 16,777,216 ids of the pool are in use")]
    IdsExhausted,
}

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// The metadata store.
pub struct Store {
    db: Database,
    path: String,
}

/// A write transaction with thinsnap's operations; commit with [`WriteTx::commit`].
pub struct WriteTx<'a> {
    tx: redb::WriteTransaction,
    store: &'a Store,
}

/// A consistent read view of the store.
pub struct ReadTx<'a> {
    tx: redb::ReadTransaction,
    store: &'a Store,
}

fn encode(r: &Record) -> Vec<u8> {
    serde_json::to_vec(r).expect("records always serialize")
}

impl Store {
    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    /// Opens (creating if needed) the store at `path` for pool `pool`.
    ///
    /// # Errors
    /// [`StoreError::Db`] when the file cannot be opened (another process holds it);
    /// [`StoreError::Mismatch`] when it belongs to another pool or schema.
    pub fn open(path: &Path, pool: &str) -> StoreResult<Store> {
        let p = path.display().to_string();
        // A modest page cache: records are small, and the daemon's RSS should stay small.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Db {
                path: p.clone(),
                source: Box::new(e.into()),
            })?;
        let store = Store { db, path: p };
        let tx = store.db.begin_write().map_err(|e| store.err(e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| store.err(e))?;
            let mut name = tx.open_table(POOL_NAME).map_err(|e| store.err(e))?;
            tx.open_table(SNAPSHOTS).map_err(|e| store.err(e))?;
            tx.open_multimap_table(CHILDREN).map_err(|e| store.err(e))?;
            tx.open_table(THIN_IDS).map_err(|e| store.err(e))?;
            tx.open_table(BASES).map_err(|e| store.err(e))?;
            tx.open_table(VOLUMES).map_err(|e| store.err(e))?;
            tx.open_table(JOBS).map_err(|e| store.err(e))?;
            let schema = meta
                .get("schema")
                .map_err(|e| store.err(e))?
                .map(|v| v.value());
            match schema {
                None => {
                    meta.insert("schema", SCHEMA).map_err(|e| store.err(e))?;
                    meta.insert("next_thin_id", 1).map_err(|e| store.err(e))?;
                    meta.insert("pool_txn", 0).map_err(|e| store.err(e))?;
                }
                Some(SCHEMA) => {}
                Some(v) => {
                    return Err(StoreError::Mismatch {
                        path: store.path.clone(),
                        why: format!("schema version {v} is not {SCHEMA}: it was written by another thinsnap version"),
                    })
                }
            }
            let recorded = name
                .get("name")
                .map_err(|e| store.err(e))?
                .map(|v| v.value().to_string());
            match recorded {
                None => {
                    name.insert("name", pool).map_err(|e| store.err(e))?;
                }
                Some(n) if n == pool => {}
                Some(n) => {
                    return Err(StoreError::Mismatch {
                        path: store.path.clone(),
                        why: format!(
                            "it records pool {n:?}, but the configuration names pool {pool:?}: fix `pool.name`, or use another `state_dir`"
                        ),
                    })
                }
            }
        }
        tx.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }

    /// Starts a write transaction (waits for any other writer).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn write(&self) -> StoreResult<WriteTx<'_>> {
        Ok(WriteTx {
            tx: self.db.begin_write().map_err(|e| self.err(e))?,
            store: self,
        })
    }

    /// Starts a read transaction.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn read(&self) -> StoreResult<ReadTx<'_>> {
        Ok(ReadTx {
            tx: self.db.begin_read().map_err(|e| self.err(e))?,
            store: self,
        })
    }
}

macro_rules! reads {
    ($t:ty) => {
        impl $t {
            /// The record of snapshot `key`, in any state.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn get(&self, key: &str) -> StoreResult<Option<Record>> {
                let t = self
                    .tx
                    .open_table(SNAPSHOTS)
                    .map_err(|e| self.store.err(e))?;
                let v = t.get(key).map_err(|e| self.store.err(e))?;
                v.map(|v| {
                    serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                        key: key.to_string(),
                        source,
                    })
                })
                .transpose()
            }

            /// Whether `key` has children (in any state).
            ///
            /// # Errors
            /// [`StoreError::Db`].
            pub fn has_children(&self, key: &str) -> StoreResult<bool> {
                let t = self
                    .tx
                    .open_multimap_table(CHILDREN)
                    .map_err(|e| self.store.err(e))?;
                let mut it = t.get(key).map_err(|e| self.store.err(e))?;
                let any = it.next().is_some();
                Ok(any)
            }

            /// Every snapshot record, in key order.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn all(&self) -> StoreResult<Vec<Record>> {
                let t = self
                    .tx
                    .open_table(SNAPSHOTS)
                    .map_err(|e| self.store.err(e))?;
                let mut out = Vec::with_capacity(t.len().map_err(|e| self.store.err(e))? as usize);
                for entry in t.iter().map_err(|e| self.store.err(e))? {
                    let (k, v) = entry.map_err(|e| self.store.err(e))?;
                    out.push(serde_json::from_slice(v.value()).map_err(|source| {
                        StoreError::Decode {
                            key: k.value().to_string(),
                            source,
                        }
                    })?);
                }
                Ok(out)
            }

            /// The base device record for filesystem `fs`.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn base(&self, fs: &str) -> StoreResult<Option<Record>> {
                let t = self.tx.open_table(BASES).map_err(|e| self.store.err(e))?;
                let v = t.get(fs).map_err(|e| self.store.err(e))?;
                v.map(|v| {
                    serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                        key: format!("base:{fs}"),
                        source,
                    })
                })
                .transpose()
            }

            /// Every base device record.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn bases(&self) -> StoreResult<Vec<Record>> {
                let t = self.tx.open_table(BASES).map_err(|e| self.store.err(e))?;
                let mut out = Vec::new();
                for entry in t.iter().map_err(|e| self.store.err(e))? {
                    let (k, v) = entry.map_err(|e| self.store.err(e))?;
                    out.push(serde_json::from_slice(v.value()).map_err(|source| {
                        StoreError::Decode {
                            key: format!("base:{}", k.value()),
                            source,
                        }
                    })?);
                }
                Ok(out)
            }

            /// The record of volume `name`, in any state.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn volume(&self, name: &str) -> StoreResult<Option<Volume>> {
                let t = self.tx.open_table(VOLUMES).map_err(|e| self.store.err(e))?;
                let v = t.get(name).map_err(|e| self.store.err(e))?;
                v.map(|v| {
                    serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                        key: format!("{}{name}", volume::OWNER_PREFIX),
                        source,
                    })
                })
                .transpose()
            }

            /// Every volume record, in name order.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn volumes(&self) -> StoreResult<Vec<Volume>> {
                let t = self.tx.open_table(VOLUMES).map_err(|e| self.store.err(e))?;
                let mut out = Vec::new();
                for entry in t.iter().map_err(|e| self.store.err(e))? {
                    let (k, v) = entry.map_err(|e| self.store.err(e))?;
                    out.push(serde_json::from_slice(v.value()).map_err(|source| {
                        StoreError::Decode {
                            key: format!("{}{}", volume::OWNER_PREFIX, k.value()),
                            source,
                        }
                    })?);
                }
                Ok(out)
            }

            /// Every allocated thin id with its owner.
            ///
            /// # Errors
            /// [`StoreError::Db`].
            pub fn thin_ids(&self) -> StoreResult<Vec<(u32, String)>> {
                let t = self
                    .tx
                    .open_table(THIN_IDS)
                    .map_err(|e| self.store.err(e))?;
                let mut out = Vec::new();
                for entry in t.iter().map_err(|e| self.store.err(e))? {
                    let (k, v) = entry.map_err(|e| self.store.err(e))?;
                    out.push((k.value(), v.value().to_string()));
                }
                Ok(out)
            }

            /// The recorded progress of job `name`, if any.
            ///
            /// # Errors
            /// [`StoreError::Db`].
            pub fn job(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
                let t = self.tx.open_table(JOBS).map_err(|e| self.store.err(e))?;
                let v = t.get(name).map_err(|e| self.store.err(e))?;
                Ok(v.map(|v| v.value().to_vec()))
            }

            /// A scalar from the meta table (`next_thin_id`, `pool_txn`).
            ///
            /// # Errors
            /// [`StoreError::Db`].
            pub fn meta(&self, name: &str) -> StoreResult<u64> {
                let t = self.tx.open_table(META).map_err(|e| self.store.err(e))?;
                let v = t
                    .get(name)
                    .map_err(|e| self.store.err(e))?
                    .map(|v| v.value())
                    .unwrap_or(0);
                Ok(v)
            }
        }
    };
}

reads!(ReadTx<'_>);
reads!(WriteTx<'_>);

impl WriteTx<'_> {
    /// Inserts or replaces `record` under its key, keeping the parent index and the thin-id
    /// table in step.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn put(&mut self, record: &Record) -> StoreResult<()> {
        let s = self.store;
        let old = self.get(&record.key)?;
        {
            let mut children = self
                .tx
                .open_multimap_table(CHILDREN)
                .map_err(|e| s.err(e))?;
            if let Some(p) = old.as_ref().and_then(|o| o.parent.as_deref()) {
                children
                    .remove(p, record.key.as_str())
                    .map_err(|e| s.err(e))?;
            }
            if let Some(p) = record.parent.as_deref() {
                children
                    .insert(p, record.key.as_str())
                    .map_err(|e| s.err(e))?;
            }
        }
        let mut ids = self.tx.open_table(THIN_IDS).map_err(|e| s.err(e))?;
        if let Some(o) = &old {
            if o.thin_id != record.thin_id {
                ids.remove(o.thin_id).map_err(|e| s.err(e))?;
            }
        }
        ids.insert(record.thin_id, record.key.as_str())
            .map_err(|e| s.err(e))?;
        let mut t = self.tx.open_table(SNAPSHOTS).map_err(|e| s.err(e))?;
        t.insert(record.key.as_str(), encode(record).as_slice())
            .map_err(|e| s.err(e))?;
        Ok(())
    }

    /// Deletes the record of `key` (its parent-index entry too). With `release_id`, its thin
    /// id becomes free for reuse; otherwise the caller still owns it (e.g. a commit that
    /// moves the device to another key).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn delete(&mut self, key: &str, release_id: bool) -> StoreResult<Option<Record>> {
        let s = self.store;
        let Some(old) = self.get(key)? else {
            return Ok(None);
        };
        if let Some(p) = old.parent.as_deref() {
            let mut children = self
                .tx
                .open_multimap_table(CHILDREN)
                .map_err(|e| s.err(e))?;
            children.remove(p, key).map_err(|e| s.err(e))?;
        }
        if release_id {
            let mut ids = self.tx.open_table(THIN_IDS).map_err(|e| s.err(e))?;
            let owner = ids
                .get(old.thin_id)
                .map_err(|e| s.err(e))?
                .map(|v| v.value().to_string());
            if owner.as_deref() == Some(key) {
                ids.remove(old.thin_id).map_err(|e| s.err(e))?;
            }
        }
        let mut t = self.tx.open_table(SNAPSHOTS).map_err(|e| s.err(e))?;
        t.remove(key).map_err(|e| s.err(e))?;
        Ok(Some(old))
    }

    /// Inserts or replaces the base device record for its filesystem.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn put_base(&mut self, record: &Record) -> StoreResult<()> {
        let s = self.store;
        let owner = format!("base:{}", record.fs);
        self.tx
            .open_table(THIN_IDS)
            .map_err(|e| s.err(e))?
            .insert(record.thin_id, owner.as_str())
            .map_err(|e| s.err(e))?;
        self.tx
            .open_table(BASES)
            .map_err(|e| s.err(e))?
            .insert(record.fs.as_str(), encode(record).as_slice())
            .map_err(|e| s.err(e))?;
        Ok(())
    }

    /// Deletes the base device record of filesystem `fs` and frees its thin id.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn delete_base(&mut self, fs: &str) -> StoreResult<()> {
        let s = self.store;
        if let Some(b) = self.base(fs)? {
            self.tx
                .open_table(THIN_IDS)
                .map_err(|e| s.err(e))?
                .remove(b.thin_id)
                .map_err(|e| s.err(e))?;
        }
        self.tx
            .open_table(BASES)
            .map_err(|e| s.err(e))?
            .remove(fs)
            .map_err(|e| s.err(e))?;
        Ok(())
    }

    /// Inserts or replaces the record of a volume, keeping the thin-id table in step.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn put_volume(&mut self, volume: &Volume) -> StoreResult<()> {
        let s = self.store;
        let old = self.volume(&volume.name)?;
        let mut ids = self.tx.open_table(THIN_IDS).map_err(|e| s.err(e))?;
        if let Some(o) = &old {
            if o.thin_id != volume.thin_id {
                ids.remove(o.thin_id).map_err(|e| s.err(e))?;
            }
        }
        ids.insert(volume.thin_id, volume.owner().as_str())
            .map_err(|e| s.err(e))?;
        let bytes = serde_json::to_vec(volume).expect("volumes always serialize");
        self.tx
            .open_table(VOLUMES)
            .map_err(|e| s.err(e))?
            .insert(volume.name.as_str(), bytes.as_slice())
            .map_err(|e| s.err(e))?;
        Ok(())
    }

    /// Deletes the record of volume `name` and frees its thin id.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn delete_volume(&mut self, name: &str) -> StoreResult<Option<Volume>> {
        let s = self.store;
        let Some(old) = self.volume(name)? else {
            return Ok(None);
        };
        let mut ids = self.tx.open_table(THIN_IDS).map_err(|e| s.err(e))?;
        let owner = ids
            .get(old.thin_id)
            .map_err(|e| s.err(e))?
            .map(|v| v.value().to_string());
        if owner == Some(old.owner()) {
            ids.remove(old.thin_id).map_err(|e| s.err(e))?;
        }
        drop(ids);
        self.tx
            .open_table(VOLUMES)
            .map_err(|e| s.err(e))?
            .remove(name)
            .map_err(|e| s.err(e))?;
        Ok(Some(old))
    }

    /// Allocates a thin id: the next one after the last allocated, skipping ids still
    /// recorded, wrapping at 2^24. Ids are not reused while any record holds them.
    ///
    /// # Errors
    /// [`StoreError::IdsExhausted`] when every id is in use.
    pub fn allocate_id(&mut self) -> StoreResult<u32> {
        let s = self.store;
        let ids = self.tx.open_table(THIN_IDS).map_err(|e| s.err(e))?;
        let mut meta = self.tx.open_table(META).map_err(|e| s.err(e))?;
        let mut next = meta
            .get("next_thin_id")
            .map_err(|e| s.err(e))?
            .map(|v| v.value())
            .unwrap_or(1) as u32;
        for _ in 0..=thinpool::ThinId::MAX {
            let candidate = if next == 0 || next > thinpool::ThinId::MAX {
                1
            } else {
                next
            };
            next = candidate + 1;
            if ids.get(candidate).map_err(|e| s.err(e))?.is_none() {
                meta.insert("next_thin_id", next as u64)
                    .map_err(|e| s.err(e))?;
                return Ok(candidate);
            }
        }
        Err(StoreError::IdsExhausted)
    }

    /// Sets a scalar in the meta table.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn set_meta(&mut self, name: &str, value: u64) -> StoreResult<()> {
        let s = self.store;
        self.tx
            .open_table(META)
            .map_err(|e| s.err(e))?
            .insert(name, value)
            .map_err(|e| s.err(e))?;
        Ok(())
    }

    /// Records the progress of job `name` (replacing what was recorded).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn put_job(&mut self, name: &str, progress: &[u8]) -> StoreResult<()> {
        let s = self.store;
        self.tx
            .open_table(JOBS)
            .map_err(|e| s.err(e))?
            .insert(name, progress)
            .map_err(|e| s.err(e))?;
        Ok(())
    }

    /// Commits the transaction durably.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn commit(self) -> StoreResult<()> {
        let s = self.store;
        self.tx.commit().map_err(|e| s.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, parent: Option<&str>, id: u32) -> Record {
        Record::new(
            key,
            Kind::Active,
            parent.map(str::to_string),
            Default::default(),
            id,
            1 << 30,
            "ext4",
            0,
        )
    }

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("m.redb"), "default").unwrap();
        (d, s)
    }

    #[test]
    fn records_round_trip_and_index_children() {
        let (_d, s) = store();
        let mut tx = s.write().unwrap();
        tx.put(&rec("base", None, 1)).unwrap();
        tx.put(&rec("child", Some("base"), 2)).unwrap();
        tx.commit().unwrap();
        let r = s.read().unwrap();
        assert_eq!(
            r.get("child").unwrap().unwrap().parent.as_deref(),
            Some("base")
        );
        assert!(r.has_children("base").unwrap());
        assert!(!r.has_children("child").unwrap());
        assert_eq!(
            r.thin_ids().unwrap(),
            vec![(1, "base".into()), (2, "child".into())]
        );
        drop(r);
        let mut tx = s.write().unwrap();
        tx.delete("child", true).unwrap();
        tx.commit().unwrap();
        let r = s.read().unwrap();
        assert!(!r.has_children("base").unwrap());
        assert_eq!(r.thin_ids().unwrap(), vec![(1, "base".into())]);
    }

    #[test]
    fn uncommitted_writes_are_not_visible() {
        let (_d, s) = store();
        {
            let mut tx = s.write().unwrap();
            tx.put(&rec("a", None, 1)).unwrap();
            // dropped without commit
        }
        assert!(s.read().unwrap().get("a").unwrap().is_none());
    }

    #[test]
    fn ids_are_allocated_monotonically_and_skip_used_ones() {
        let (_d, s) = store();
        let mut tx = s.write().unwrap();
        assert_eq!(tx.allocate_id().unwrap(), 1);
        tx.put(&rec("a", None, 1)).unwrap();
        assert_eq!(tx.allocate_id().unwrap(), 2);
        tx.put(&rec("b", None, 3)).unwrap();
        assert_eq!(tx.allocate_id().unwrap(), 4, "3 is taken");
        tx.set_meta("next_thin_id", thinpool::ThinId::MAX as u64)
            .unwrap();
        assert_eq!(tx.allocate_id().unwrap(), thinpool::ThinId::MAX);
        assert_eq!(
            tx.allocate_id().unwrap(),
            2,
            "wraps, skipping 1 which is in use"
        );
        tx.commit().unwrap();
    }

    #[test]
    fn volumes_own_their_thin_ids_apart_from_snapshots() {
        let (_d, s) = store();
        let mut tx = s.write().unwrap();
        tx.put(&rec("data", None, 1)).unwrap();
        let id = tx.allocate_id().unwrap();
        assert_eq!(id, 2, "volumes and snapshots share one id space");
        tx.put_volume(&Volume::new(
            "data",
            id,
            1 << 30,
            "ext4",
            None,
            Default::default(),
        ))
        .unwrap();
        tx.commit().unwrap();
        let r = s.read().unwrap();
        assert_eq!(r.get("data").unwrap().unwrap().thin_id, 1);
        assert_eq!(r.volume("data").unwrap().unwrap().thin_id, 2);
        assert_eq!(r.all().unwrap().len(), 1, "Walk does not see volumes");
        assert_eq!(
            r.thin_ids().unwrap(),
            vec![(1, "data".into()), (2, "volume:data".into())]
        );
        drop(r);
        let mut tx = s.write().unwrap();
        assert!(tx.delete_volume("data").unwrap().is_some());
        assert!(tx.delete_volume("data").unwrap().is_none());
        tx.commit().unwrap();
        let r = s.read().unwrap();
        assert!(r.volumes().unwrap().is_empty());
        assert_eq!(r.thin_ids().unwrap(), vec![(1, "data".into())]);
    }

    #[test]
    fn jobs_round_trip() {
        let (_d, s) = store();
        assert_eq!(s.read().unwrap().job("j").unwrap(), None);
        let mut tx = s.write().unwrap();
        tx.put_job("j", b"{\"step\":1}").unwrap();
        tx.set_meta(META_JOB_PENDING, 1).unwrap();
        tx.commit().unwrap();
        let r = s.read().unwrap();
        assert_eq!(r.job("j").unwrap().as_deref(), Some(&b"{\"step\":1}"[..]));
        assert_eq!(r.meta(META_JOB_PENDING).unwrap(), 1);
    }

    #[test]
    fn a_store_belongs_to_one_pool() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.redb");
        drop(Store::open(&p, "one").unwrap());
        let e = Store::open(&p, "two").err().unwrap();
        assert!(e.to_string().contains("pool.name"), "{e}");
        Store::open(&p, "one").unwrap();
    }

    #[test]
    fn data_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.redb");
        {
            let s = Store::open(&p, "default").unwrap();
            let mut tx = s.write().unwrap();
            tx.put(&rec("a", None, 7)).unwrap();
            tx.put_base(&rec("base:ext4", None, 9)).unwrap();
            tx.set_meta("pool_txn", 42).unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(&p, "default").unwrap();
        let r = s.read().unwrap();
        assert_eq!(r.get("a").unwrap().unwrap().thin_id, 7);
        assert_eq!(r.base("ext4").unwrap().unwrap().thin_id, 9);
        assert_eq!(r.meta("pool_txn").unwrap(), 42);
    }
}
