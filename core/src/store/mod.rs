//! The crash-safe metadata store: one redb database holding every snapshot's record, the
//! parent→children index, the thin-id table (every allocated id and its [`Owner`]), the
//! base devices, Docker volumes, and the progress of resumable jobs (migrations).
//!
//! Writes follow containerd's devmapper `transition` pattern: a record is committed in a
//! "trying" state (`Creating`, `Removing`) before the kernel is touched, and in its final
//! state after; no store transaction is held across an ioctl. After a crash, recovery finds
//! every record still in a trying state and finishes or rolls back its operation
//! (`engine::recover`).

mod codec;
mod owner;
pub mod record;
mod upgrade;
pub mod volume;

use std::path::Path;

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};
use serde::{de::DeserializeOwned, Serialize};
use thinpool::{FsType, ThinId};

pub use owner::Owner;
pub use record::{Base, Device, Kind, Record, State, Tombstone, Usage};
pub use volume::Volume;

/// Snapshot key → JSON [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Parent key → child keys (every child, whatever its state).
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
/// Thin id → its [`Owner`], encoded.
const THIN_IDS: TableDefinition<u32, &str> = TableDefinition::new("thin_ids");
/// Snapshot keys whose record is not Ready (Creating or Removing), so Cleanup finds pending
/// removals without reading every record.
const UNSETTLED: TableDefinition<&str, ()> = TableDefinition::new("unsettled");
/// Base devices: filesystem name → JSON [`Base`].
const BASES: TableDefinition<&str, &[u8]> = TableDefinition::new("bases");
/// Docker volumes: volume name → JSON [`Volume`]. A table of their own, so volume names
/// never meet containerd's snapshot keys (and Walk never lists them).
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// Removed snapshots' devices waiting to be reclaimed: thin id → JSON [`Tombstone`].
const RECLAIM: TableDefinition<u32, &[u8]> = TableDefinition::new("reclaim");
/// Scalars: `schema`, `next_thin_id`, [`META_JOB_PENDING`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const POOL_NAME: TableDefinition<&str, &str> = TableDefinition::new("pool");
/// Resumable jobs (e.g. `docker-devicemapper`, a migration) → their JSON progress.
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");

/// Meta key: non-zero while a job that must finish before serving is unfinished.
pub const META_JOB_PENDING: &str = "job_pending";
/// Meta key: the thin id the allocator tries next.
const META_NEXT_THIN_ID: &str = "next_thin_id";

/// Page cache of the database, in bytes.
const CACHE_BYTES: usize = 32 << 20;

/// Version of the on-disk schema. 1: thin-id owners as bare snapshot keys, `base:<fs>` and
/// `volume:<name>`, and the pool's transaction id in the meta table; 2: owners encoded by
/// [`Owner::encode`], no transaction id. Stores of version 1 are upgraded when opened.
pub const SCHEMA: u64 = 2;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file cannot be opened (another process holds it, or it is damaged).
    #[error("metadata store {path}: {source}")]
    Open {
        /// The database file.
        path: String,
        /// What redb said.
        source: Box<redb::Error>,
    },
    /// A read or write failed (I/O, corruption).
    #[error("metadata store: {0}")]
    Db(Box<redb::Error>),
    /// A record could not be decoded.
    #[error("metadata store record {key:?} is unreadable: {source}")]
    Decode {
        /// The record's key.
        key: String,
        /// Why.
        source: serde_json::Error,
    },
    /// A value in the store is not one thinsnap writes.
    #[error("metadata store: {0}")]
    Corrupt(String),
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

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// The metadata store.
///
/// After an I/O error (the state directory's filesystem full, say), redb refuses every
/// later operation (`PreviousIo`) until the database is opened again; the store does that
/// itself on the next operation, so the daemon recovers once the cause is gone.
pub struct Store {
    db: std::sync::RwLock<Option<std::sync::Arc<Database>>>,
    path: std::path::PathBuf,
    /// Set when a commit failed on I/O: the next operation reopens the database.
    broken: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A write transaction with thinsnap's operations; commit with [`WriteTx::commit`].
pub struct WriteTx {
    tx: redb::WriteTransaction,
    broken: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Whether `e` leaves redb refusing everything until it is reopened.
fn is_io(e: &redb::StorageError) -> bool {
    matches!(
        e,
        redb::StorageError::Io(_) | redb::StorageError::PreviousIo
    )
}

/// A consistent read view of the store.
pub struct ReadTx {
    tx: redb::ReadTransaction,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialize")
}

fn decode<T: DeserializeOwned>(bytes: &[u8], key: impl FnOnce() -> String) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode { key: key(), source })
}

/// Every value of a JSON table, in key order; `key` names a record in errors.
fn scan<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: impl Fn(&str) -> String,
) -> StoreResult<Vec<T>> {
    let mut out = Vec::with_capacity(t.len()? as usize);
    for entry in t.iter()? {
        let (k, v) = entry?;
        out.push(decode(v.value(), || key(k.value()))?);
    }
    Ok(out)
}

/// One value of a JSON table.
fn lookup<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    k: &str,
    key: impl FnOnce() -> String,
) -> StoreResult<Option<T>> {
    t.get(k)?.map(|v| decode(v.value(), key)).transpose()
}

impl Store {
    /// Opens (creating if needed) the store at `path` for pool `pool`, upgrading a store of
    /// an older schema.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the file cannot be opened (another process holds it);
    /// [`StoreError::Mismatch`] when it belongs to another pool or a newer schema.
    pub fn open(path: &Path, pool: &str) -> StoreResult<Store> {
        let p = path.display().to_string();
        let io = |e: std::io::Error| StoreError::Open {
            path: p.clone(),
            source: Box::new(redb::Error::Io(e)),
        };
        // Root's alone (it names every snapshot and volume): made 0600 before redb fills
        // it, or made so if an earlier version left it open to others.
        {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    thinpool::private::restrict(path).map_err(|e| io(std::io::Error::other(e)))?;
                }
                Err(e) => return Err(io(e)),
            }
        }
        let db = Self::open_db(path)?;
        let tx = db.begin_write()?;
        upgrade::prepare(&tx, &p, pool)?;
        tx.commit()?;
        Ok(Store {
            db: std::sync::RwLock::new(Some(std::sync::Arc::new(db))),
            path: path.to_path_buf(),
            broken: Default::default(),
        })
    }

    fn open_db(path: &Path) -> StoreResult<Database> {
        // A modest page cache: records are small, and the daemon's RSS should stay small.
        redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                source: Box::new(e.into()),
            })
    }

    /// The database, opened again first if an I/O error left it refusing everything.
    fn db(&self) -> StoreResult<std::sync::Arc<Database>> {
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::Acquire) {
            let mut g = self.db.write().unwrap_or_else(|p| p.into_inner());
            if self.broken.load(Ordering::Acquire) {
                // The old one closes once its last transaction ends; until then redb says
                // it is still open.
                drop(g.take());
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                let db = loop {
                    match Self::open_db(&self.path) {
                        Ok(db) => break db,
                        Err(StoreError::Open { source, .. })
                            if matches!(*source, redb::Error::DatabaseAlreadyOpen)
                                && std::time::Instant::now() < deadline =>
                        {
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                        Err(e) => return Err(e),
                    }
                };
                *g = Some(std::sync::Arc::new(db));
                self.broken.store(false, Ordering::Release);
                tracing::warn!(path = %self.path.display(), "metadata store opened again after an I/O error");
            }
        }
        let g = self.db.read().unwrap_or_else(|p| p.into_inner());
        Ok(g.as_ref().expect("the store is open").clone())
    }

    /// Runs `begin` on the database; on an I/O error it marks the store for reopening and
    /// tries once more.
    fn begin<T>(
        &self,
        begin: impl Fn(&Database) -> Result<T, redb::TransactionError>,
    ) -> StoreResult<T> {
        match begin(&*self.db()?) {
            Err(redb::TransactionError::Storage(e)) if is_io(&e) => {
                self.broken
                    .store(true, std::sync::atomic::Ordering::Release);
                Ok(begin(&*self.db()?)?)
            }
            r => Ok(r?),
        }
    }

    /// Makes every commit so far durable (those made without waiting for the disk too):
    /// an empty durable commit. The daemon calls it when it stops, since its engine is not
    /// dropped (redb would do the same when it is).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn flush(&self) -> StoreResult<()> {
        self.write()?.commit()
    }

    /// Starts a write transaction (waits for any other writer).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn write(&self) -> StoreResult<WriteTx> {
        Ok(WriteTx {
            tx: self.begin(Database::begin_write)?,
            broken: self.broken.clone(),
        })
    }

    /// Starts a read transaction.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn read(&self) -> StoreResult<ReadTx> {
        Ok(ReadTx {
            tx: self.begin(Database::begin_read)?,
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
                lookup(&self.tx.open_table(SNAPSHOTS)?, key, || key.to_string())
            }

            /// The tombstone of removed snapshot device `id`, if it waits to be reclaimed.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn tombstone(&self, id: ThinId) -> StoreResult<Option<Tombstone>> {
                self.tx
                    .open_table(RECLAIM)?
                    .get(id.get())?
                    .map(|v| decode(v.value(), || format!("reclaim:{id}")))
                    .transpose()
            }

            /// Every tombstone, by thin id.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn tombstones(&self) -> StoreResult<Vec<Tombstone>> {
                let t = self.tx.open_table(RECLAIM)?;
                let mut out = Vec::new();
                for entry in t.iter()? {
                    let (k, v) = entry?;
                    out.push(decode(v.value(), || format!("reclaim:{}", k.value()))?);
                }
                Ok(out)
            }

            /// How many removed snapshots' devices wait to be reclaimed.
            ///
            /// # Errors
            /// [`StoreError::Db`].
            pub fn tombstone_count(&self) -> StoreResult<u64> {
                Ok(self.tx.open_table(RECLAIM)?.len()?)
            }

            /// Whether `key` has children (in any state).
            ///
            /// # Errors
            /// [`StoreError::Db`].
            pub fn has_children(&self, key: &str) -> StoreResult<bool> {
                let t = self.tx.open_multimap_table(CHILDREN)?;
                let any = t.get(key)?.next().is_some();
                Ok(any)
            }

            /// Every snapshot record, in key order.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn all(&self) -> StoreResult<Vec<Record>> {
                scan(&self.tx.open_table(SNAPSHOTS)?, str::to_string)
            }

            /// Every snapshot record that is not Ready (Creating or Removing), in key order;
            /// the cost does not grow with the number of Ready snapshots.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn unsettled(&self) -> StoreResult<Vec<Record>> {
                let mut keys = Vec::new();
                for entry in self.tx.open_table(UNSETTLED)?.iter()? {
                    keys.push(entry?.0.value().to_string());
                }
                let mut out = Vec::with_capacity(keys.len());
                for k in keys {
                    out.extend(self.get(&k)?);
                }
                Ok(out)
            }

            /// The base device record for filesystem `fs`.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn base(&self, fs: FsType) -> StoreResult<Option<Base>> {
                lookup(&self.tx.open_table(BASES)?, fs.as_str(), || {
                    Owner::Base(fs).encode()
                })
            }

            /// Every base device record.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn bases(&self) -> StoreResult<Vec<Base>> {
                scan(&self.tx.open_table(BASES)?, |fs| format!("base:{fs}"))
            }

            /// The record of volume `name`, in any state.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn volume(&self, name: &str) -> StoreResult<Option<Volume>> {
                lookup(&self.tx.open_table(VOLUMES)?, name, || {
                    Owner::Volume(name.to_string()).encode()
                })
            }

            /// Every volume record, in name order.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn volumes(&self) -> StoreResult<Vec<Volume>> {
                scan(&self.tx.open_table(VOLUMES)?, |n| {
                    Owner::Volume(n.to_string()).encode()
                })
            }

            /// Every allocated thin id with its owner.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn thin_ids(&self) -> StoreResult<Vec<(ThinId, Owner)>> {
                let mut out = Vec::new();
                for entry in self.tx.open_table(THIN_IDS)?.iter()? {
                    let (k, v) = entry?;
                    let id = ThinId::new(k.value())
                        .map_err(|e| StoreError::Corrupt(format!("thin-id table: {e}")))?;
                    out.push((id, Owner::decode(v.value())?));
                }
                Ok(out)
            }

            /// The owner of thin id `id`, if it is allocated.
            ///
            /// # Errors
            /// [`StoreError`] on database or decoding failure.
            pub fn owner(&self, id: ThinId) -> StoreResult<Option<Owner>> {
                let t = self.tx.open_table(THIN_IDS)?;
                let v = t.get(id.get())?;
                v.map(|v| Owner::decode(v.value())).transpose()
            }

            /// The recorded progress of job `name`, if any.
            ///
            /// # Errors
            /// [`StoreError::Db`].
            pub fn job(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
                let t = self.tx.open_table(JOBS)?;
                let v = t.get(name)?;
                Ok(v.map(|v| v.value().to_vec()))
            }

            /// A scalar from the meta table (0 when unset).
            ///
            /// # Errors
            /// [`StoreError::Db`].
            pub fn meta(&self, name: &str) -> StoreResult<u64> {
                let t = self.tx.open_table(META)?;
                let v = t.get(name)?.map(|v| v.value()).unwrap_or(0);
                Ok(v)
            }
        }
    };
}

reads!(ReadTx);
reads!(WriteTx);

impl WriteTx {
    /// Records `owner` as the owner of `id` in the thin-id table.
    fn own(&mut self, id: ThinId, owner: &Owner) -> StoreResult<()> {
        self.tx
            .open_table(THIN_IDS)?
            .insert(id.get(), owner.encode().as_str())?;
        Ok(())
    }

    /// Frees `id` if `owner` owns it.
    fn release(&mut self, id: ThinId, owner: &Owner) -> StoreResult<()> {
        if self.owner(id)?.as_ref() == Some(owner) {
            self.tx.open_table(THIN_IDS)?.remove(id.get())?;
        }
        Ok(())
    }

    /// Inserts or replaces `record` under its key, keeping the parent index and the thin-id
    /// table in step.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn put(&mut self, record: &Record) -> StoreResult<()> {
        let key = record.key.as_str();
        let old = self.get(key)?;
        // Only what changed is rewritten: a state change (Creating to Ready, the common
        // case) touches the record and the unsettled index alone.
        if old.as_ref().map(|o| &o.parent) != Some(&record.parent) {
            let mut children = self.tx.open_multimap_table(CHILDREN)?;
            if let Some(p) = old.as_ref().and_then(|o| o.parent.as_deref()) {
                children.remove(p, key)?;
            }
            if let Some(p) = record.parent.as_deref() {
                children.insert(p, key)?;
            }
        }
        match &old {
            // The key owns its record's id already.
            Some(o) if o.device.thin_id == record.device.thin_id => {}
            Some(o) => {
                self.release(o.device.thin_id, &record.owner())?;
                self.own(record.device.thin_id, &record.owner())?;
            }
            None => self.own(record.device.thin_id, &record.owner())?,
        }
        self.write_record(record)
    }

    /// Writes `record` over the stored record of its key, which differs from it only in its
    /// device's state (a create's intent becoming Ready): the parent index and the thin-id
    /// table stay as they are, only the record and the unsettled index are written.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn settle(&mut self, record: &Record) -> StoreResult<()> {
        let key = record.key.as_str();
        debug_assert!(
            matches!(self.get(key), Ok(Some(o)) if o.parent == record.parent && o.device.thin_id == record.device.thin_id),
            "settle is for a record whose parent and thin id are stored already"
        );
        self.write_record(record)
    }

    /// Writes the record itself and its entry in the unsettled index (present unless Ready).
    fn write_record(&mut self, record: &Record) -> StoreResult<()> {
        let key = record.key.as_str();
        let mut unsettled = self.tx.open_table(UNSETTLED)?;
        if record.device.state == State::Ready {
            unsettled.remove(key)?;
        } else {
            unsettled.insert(key, ())?;
        }
        self.tx
            .open_table(SNAPSHOTS)?
            .insert(key, encode(record).as_slice())?;
        Ok(())
    }

    /// Deletes the record of `key` (its parent-index entry too). With `release_id`, its thin
    /// id becomes free for reuse; otherwise the caller still owns it (e.g. a commit that
    /// moves the device to another key).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn delete(&mut self, key: &str, release_id: bool) -> StoreResult<Option<Record>> {
        let Some(old) = self.get(key)? else {
            return Ok(None);
        };
        if let Some(p) = old.parent.as_deref() {
            self.tx.open_multimap_table(CHILDREN)?.remove(p, key)?;
        }
        if release_id {
            self.release(old.device.thin_id, &old.owner())?;
        }
        self.tx.open_table(UNSETTLED)?.remove(key)?;
        self.tx.open_table(SNAPSHOTS)?.remove(key)?;
        Ok(Some(old))
    }

    /// Takes snapshot `key` out of the namespace (its key is free again at once) and leaves
    /// its device to be reclaimed: the record goes, a [`Tombstone`] takes over its thin id.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn bury(&mut self, key: &str) -> StoreResult<Option<Tombstone>> {
        let Some(old) = self.delete(key, false)? else {
            return Ok(None);
        };
        let t = Tombstone::of(&old);
        self.own(t.device.thin_id, &t.owner())?;
        self.tx
            .open_table(RECLAIM)?
            .insert(t.device.thin_id.get(), encode(&t).as_slice())?;
        Ok(Some(t))
    }

    /// Forgets the tombstone of device `id` (reclaimed) and frees its thin id.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn delete_tombstone(&mut self, id: ThinId) -> StoreResult<()> {
        self.tx.open_table(RECLAIM)?.remove(id.get())?;
        self.release(id, &Owner::Reclaim(id))
    }

    /// Inserts or replaces the base device record of its filesystem.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn put_base(&mut self, base: &Base) -> StoreResult<()> {
        self.own(base.device.thin_id, &base.owner())?;
        self.tx
            .open_table(BASES)?
            .insert(base.device.fs.as_str(), encode(base).as_slice())?;
        Ok(())
    }

    /// Deletes the base device record of filesystem `fs` and frees its thin id.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn delete_base(&mut self, fs: FsType) -> StoreResult<Option<Base>> {
        let Some(old) = self.base(fs)? else {
            return Ok(None);
        };
        self.release(old.device.thin_id, &old.owner())?;
        self.tx.open_table(BASES)?.remove(fs.as_str())?;
        Ok(Some(old))
    }

    /// Inserts or replaces the record of a volume, keeping the thin-id table in step.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn put_volume(&mut self, volume: &Volume) -> StoreResult<()> {
        if let Some(o) = self.volume(&volume.name)? {
            if o.device.thin_id != volume.device.thin_id {
                self.release(o.device.thin_id, &o.owner())?;
            }
        }
        self.own(volume.device.thin_id, &volume.owner())?;
        self.tx
            .open_table(VOLUMES)?
            .insert(volume.name.as_str(), encode(volume).as_slice())?;
        Ok(())
    }

    /// Deletes the record of volume `name` and frees its thin id.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn delete_volume(&mut self, name: &str) -> StoreResult<Option<Volume>> {
        let Some(old) = self.volume(name)? else {
            return Ok(None);
        };
        self.release(old.device.thin_id, &old.owner())?;
        self.tx.open_table(VOLUMES)?.remove(name)?;
        Ok(Some(old))
    }

    /// Allocates a thin id: the next one after the last allocated that no record holds and
    /// `taken` (e.g. the pool, for ids of other tools) does not claim, wrapping at 2^24.
    ///
    /// # Errors
    /// [`StoreError::IdsExhausted`] when every id is in use.
    pub fn allocate_id(&mut self, taken: impl Fn(ThinId) -> bool) -> StoreResult<ThinId> {
        let ids = self.tx.open_table(THIN_IDS)?;
        let mut meta = self.tx.open_table(META)?;
        let mut next = meta.get(META_NEXT_THIN_ID)?.map(|v| v.value()).unwrap_or(1) as u32;
        for _ in 0..=ThinId::MAX {
            let candidate = if next == 0 || next > ThinId::MAX {
                1
            } else {
                next
            };
            next = candidate + 1;
            let id = ThinId::new(candidate).expect("candidates are in range");
            if ids.get(candidate)?.is_none() && !taken(id) {
                meta.insert(META_NEXT_THIN_ID, u64::from(next))?;
                return Ok(id);
            }
        }
        Err(StoreError::IdsExhausted)
    }

    /// Makes the allocator try `id` next (after adopting devices up to `id - 1`).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn set_next_id(&mut self, id: u32) -> StoreResult<()> {
        self.set_meta(META_NEXT_THIN_ID, u64::from(id))
    }

    /// Sets a scalar in the meta table.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn set_meta(&mut self, name: &str, value: u64) -> StoreResult<()> {
        self.tx.open_table(META)?.insert(name, value)?;
        Ok(())
    }

    /// Records the progress of job `name` (replacing what was recorded).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn put_job(&mut self, name: &str, progress: &[u8]) -> StoreResult<()> {
        self.tx.open_table(JOBS)?.insert(name, progress)?;
        Ok(())
    }

    /// Makes this transaction's commit not wait for the disk: it is persisted with the next
    /// durable commit, and lost if the process or machine dies before (for results that
    /// recovery can redo from the durable intent).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn without_waiting_for_the_disk(&mut self) -> StoreResult<()> {
        self.tx
            .set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Corrupt(format!("cannot relax durability: {e}")))
    }

    /// Commits the transaction durably (unless
    /// [`WriteTx::without_waiting_for_the_disk`]).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn commit(self) -> StoreResult<()> {
        let _span = tracing::info_span!("store_commit").entered();
        match self.tx.commit() {
            Err(redb::CommitError::Storage(e)) if is_io(&e) => {
                self.broken
                    .store(true, std::sync::atomic::Ordering::Release);
                Err(redb::CommitError::Storage(e).into())
            }
            r => Ok(r?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> ThinId {
        ThinId::new(n).unwrap()
    }

    fn dev(n: u32) -> Device {
        Device::creating(id(n), 1 << 30, FsType::Ext4)
    }

    fn rec(key: &str, parent: Option<&str>, n: u32) -> Record {
        Record::new(
            key,
            Kind::Active,
            parent.map(str::to_string),
            Default::default(),
            dev(n),
        )
    }

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("m.redb"), "default").unwrap();
        (d, s)
    }

    fn snap(key: &str) -> Owner {
        Owner::Snapshot(key.into())
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
            vec![(id(1), snap("base")), (id(2), snap("child"))]
        );
        drop(r);
        let mut tx = s.write().unwrap();
        tx.delete("child", true).unwrap();
        tx.commit().unwrap();
        let r = s.read().unwrap();
        assert!(!r.has_children("base").unwrap());
        assert_eq!(r.thin_ids().unwrap(), vec![(id(1), snap("base"))]);
    }

    #[test]
    fn settling_an_intent_keeps_its_parent_and_id_and_leaves_the_unsettled_index() {
        let (_d, s) = store();
        let mut tx = s.write().unwrap();
        let mut base = rec("base", None, 1);
        base.device.state = State::Ready;
        tx.put(&base).unwrap();
        let intent = rec("child", Some("base"), 2);
        tx.put(&intent).unwrap();
        tx.commit().unwrap();
        assert_eq!(s.read().unwrap().unsettled().unwrap().len(), 1);

        let mut done = intent.clone();
        done.device.state = State::Ready;
        let mut tx = s.write().unwrap();
        tx.settle(&done).unwrap();
        tx.commit().unwrap();
        let r = s.read().unwrap();
        assert_eq!(r.get("child").unwrap(), Some(done));
        assert!(r.unsettled().unwrap().is_empty());
        assert!(r.has_children("base").unwrap());
        assert_eq!(
            r.thin_ids().unwrap(),
            vec![(id(1), snap("base")), (id(2), snap("child"))]
        );
    }

    #[test]
    fn unsettled_lists_exactly_the_records_not_ready() {
        let keys = |s: &Store| -> Vec<String> {
            let r = s.read().unwrap();
            r.unsettled().unwrap().into_iter().map(|r| r.key).collect()
        };
        let (d, s) = store();
        let mut ready = rec("ready", None, 1);
        ready.device.state = State::Ready;
        let mut removing = rec("removing", None, 2);
        removing.device.state = State::Removing;
        let creating = rec("creating", None, 3);
        let mut tx = s.write().unwrap();
        for r in [&ready, &removing, &creating] {
            tx.put(r).unwrap();
        }
        tx.commit().unwrap();
        assert_eq!(keys(&s), ["creating", "removing"]);

        let mut tx = s.write().unwrap();
        let mut done = creating.clone();
        done.device.state = State::Ready;
        tx.put(&done).unwrap();
        tx.delete("removing", true).unwrap();
        tx.commit().unwrap();
        assert!(keys(&s).is_empty());

        // A store written before the index existed is indexed at its next open.
        let mut tx = s.write().unwrap();
        tx.put(&removing).unwrap();
        tx.commit().unwrap();
        let tx = s.db().unwrap().begin_write().unwrap();
        tx.open_table(UNSETTLED)
            .unwrap()
            .remove("removing")
            .unwrap();
        tx.open_table(META)
            .unwrap()
            .remove("unsettled_indexed")
            .unwrap();
        tx.commit().unwrap();
        assert!(keys(&s).is_empty());
        drop(s);
        let s = Store::open(&d.path().join("m.redb"), "default").unwrap();
        assert_eq!(keys(&s), ["removing"]);
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
        let none = |_| false;
        let mut tx = s.write().unwrap();
        assert_eq!(tx.allocate_id(none).unwrap(), id(1));
        tx.put(&rec("a", None, 1)).unwrap();
        assert_eq!(tx.allocate_id(none).unwrap(), id(2));
        tx.put(&rec("b", None, 3)).unwrap();
        assert_eq!(tx.allocate_id(none).unwrap(), id(4), "3 is taken");
        assert_eq!(
            tx.allocate_id(|i| i == id(5) || i == id(6)).unwrap(),
            id(7),
            "ids the caller claims are skipped"
        );
        tx.set_next_id(ThinId::MAX).unwrap();
        assert_eq!(tx.allocate_id(none).unwrap(), id(ThinId::MAX));
        assert_eq!(
            tx.allocate_id(none).unwrap(),
            id(2),
            "wraps, skipping 1 which is in use"
        );
        tx.commit().unwrap();
    }

    #[test]
    fn volumes_and_bases_own_their_thin_ids_apart_from_snapshots() {
        let (_d, s) = store();
        let mut tx = s.write().unwrap();
        tx.put(&rec("data", None, 1)).unwrap();
        let vid = tx.allocate_id(|_| false).unwrap();
        assert_eq!(vid, id(2), "volumes and snapshots share one id space");
        let mut vdev = dev(0);
        vdev.thin_id = vid;
        tx.put_volume(&Volume::new("data", vdev, None, Default::default()))
            .unwrap();
        tx.put_base(&Base::new(dev(3))).unwrap();
        tx.commit().unwrap();
        let r = s.read().unwrap();
        assert_eq!(r.get("data").unwrap().unwrap().device.thin_id, id(1));
        assert_eq!(r.volume("data").unwrap().unwrap().device.thin_id, id(2));
        assert_eq!(r.all().unwrap().len(), 1, "Walk does not see volumes");
        assert_eq!(
            r.thin_ids().unwrap(),
            vec![
                (id(1), snap("data")),
                (id(2), Owner::Volume("data".into())),
                (id(3), Owner::Base(FsType::Ext4))
            ]
        );
        drop(r);
        let mut tx = s.write().unwrap();
        assert!(tx.delete_volume("data").unwrap().is_some());
        assert!(tx.delete_volume("data").unwrap().is_none());
        assert!(tx.delete_base(FsType::Ext4).unwrap().is_some());
        tx.commit().unwrap();
        let r = s.read().unwrap();
        assert!(r.volumes().unwrap().is_empty());
        assert_eq!(r.thin_ids().unwrap(), vec![(id(1), snap("data"))]);
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
            tx.put_base(&Base::new(dev(9))).unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(&p, "default").unwrap();
        let r = s.read().unwrap();
        assert_eq!(r.get("a").unwrap().unwrap().device.thin_id, id(7));
        assert_eq!(r.base(FsType::Ext4).unwrap().unwrap().device.thin_id, id(9));
    }

    #[test]
    fn an_unknown_filesystem_in_a_record_is_an_error_not_ext4() {
        let (_d, s) = store();
        let tx = s.db().unwrap().begin_write().unwrap();
        tx.open_table(SNAPSHOTS)
            .unwrap()
            .insert(
                "k",
                br#"{"key":"k","kind":"active","parent":null,"labels":{},"created_ns":0,"updated_ns":0,"thin_id":1,"size":1,"fs":"btrfs","state":"ready","usage":null}"#.as_slice(),
            )
            .unwrap();
        tx.commit().unwrap();
        let e = s.read().unwrap().get("k").unwrap_err();
        assert!(e.to_string().contains("btrfs"), "{e}");
    }

    /// A store written by schema 1 (thin-id owners as bare keys, `base:`/`volume:` strings,
    /// the pool's transaction id in records and meta) opens, upgraded.
    #[test]
    fn schema_1_stores_are_upgraded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.redb");
        drop(Store::open(&p, "default").unwrap());
        let db = Database::create(&p).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut meta = tx.open_table(META).unwrap();
            meta.insert("schema", 1).unwrap();
            meta.insert("pool_txn", 7).unwrap();
            let mut ids = tx.open_table(THIN_IDS).unwrap();
            // A snapshot whose key looks like a base owner, a base, a volume.
            ids.insert(1, "base:ext4").unwrap();
            ids.insert(2, "base:ext4").unwrap();
            ids.insert(3, "volume:v").unwrap();
            tx.open_table(SNAPSHOTS).unwrap().insert("base:ext4", br#"{"key":"base:ext4","kind":"committed","parent":null,"labels":{},"created_ns":0,"updated_ns":0,"thin_id":1,"size":1,"fs":"ext4","txn":7,"state":"ready","usage":null}"#.as_slice()).unwrap();
            tx.open_table(BASES).unwrap().insert("ext4", br#"{"key":"base:ext4","kind":"committed","parent":null,"labels":{},"created_ns":0,"updated_ns":0,"thin_id":2,"size":1,"fs":"ext4","txn":7,"state":"ready","usage":null}"#.as_slice()).unwrap();
            tx.open_table(VOLUMES).unwrap().insert("v", br#"{"name":"v","thin_id":3,"size":1,"fs":"xfs","origin":null,"opts":{},"created_ns":0,"txn":7,"state":"ready","mounts":[],"boot_id":""}"#.as_slice()).unwrap();
        }
        tx.commit().unwrap();
        drop(db);
        let s = Store::open(&p, "default").unwrap();
        let r = s.read().unwrap();
        assert_eq!(r.meta("schema").unwrap(), SCHEMA);
        assert_eq!(r.meta("pool_txn").unwrap(), 0, "dropped");
        assert_eq!(
            r.thin_ids().unwrap(),
            vec![
                (id(1), snap("base:ext4")),
                (id(2), Owner::Base(FsType::Ext4)),
                (id(3), Owner::Volume("v".into()))
            ]
        );
        assert_eq!(r.volume("v").unwrap().unwrap().device.fs, FsType::Xfs);
        assert_eq!(r.get("base:ext4").unwrap().unwrap().device.thin_id, id(1));
    }
}
