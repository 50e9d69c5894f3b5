//! [`ThinPool`]: a device-mapper thin pool from one of three sources (loopback files, an
//! existing dm pool, LVM), with status, low-water mark, growing, transaction ids and
//! teardown. Thin devices inside the pool are in `thin.rs`.

use std::{
    fs,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Mutex, MutexGuard},
};

use devicemapper::{
    DataBlocks, Device, DmName, DmNameBuf, MetaBlocks, Sectors, ThinPoolStatus,
    ThinPoolStatusSummary,
};
use tracing::{info, instrument, warn};

use crate::{
    dm::{self, TableLine},
    error::{Error, Hint, Result},
    loopback::{self, LoopFile},
    lvm,
    names::{self, PoolName},
    options::PoolOptions,
    units::{self, GIB, MAX_BLOCK_SIZE, META_BLOCK_BYTES, MIN_BLOCK_SIZE},
};

/// How long [`ThinPool::with_metadata_snapshot`] waits for someone else's metadata snapshot
/// to be released: readings take well under a second, so a snapshot held longer is stale
/// or an admin's.
pub const HELD_SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a pool's storage comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Sparse `data` and `metadata` files in `dir`, on loop devices; created if absent.
    Loopback {
        /// Directory holding the two files.
        dir: PathBuf,
        /// Size of a new data file in bytes (sparse).
        data_size: u64,
        /// Size of a new metadata file in bytes (sparse).
        meta_size: u64,
    },
    /// A thin-pool that is already active, by its dm name; never created or removed here.
    Existing {
        /// The dm name of the thin-pool device.
        dm_name: String,
    },
    /// An LVM thin-pool logical volume `vg/lv`.
    Lvm(lvm::LvmPool),
}

/// The storage behind an open pool.
#[derive(Debug)]
enum Backing {
    Loopback {
        dir: PathBuf,
        data: LoopFile,
        meta: LoopFile,
    },
    Existing,
    Lvm(lvm::LvmPool),
}

/// The kernel's summary of a pool's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// Working normally.
    ReadWrite,
    /// Metadata trouble: the kernel refuses changes until `thin_check`/`thin_repair`.
    ReadOnly,
    /// No free data blocks: writes to unprovisioned blocks fail or queue.
    OutOfDataSpace,
    /// The pool failed: its devices error all I/O.
    Failed,
}

impl std::fmt::Display for PoolMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolMode::ReadWrite => "rw",
            PoolMode::ReadOnly => "read-only",
            PoolMode::OutOfDataSpace => "out-of-space",
            PoolMode::Failed => "failed",
        })
    }
}

/// A snapshot of a pool's status, from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// The pool's transaction id (set with [`ThinPool::set_transaction_id`]).
    pub transaction_id: u64,
    /// Data blocks in use.
    pub data_used: DataBlocks,
    /// Data blocks in all.
    pub data_total: DataBlocks,
    /// Metadata blocks (4 KiB) in use.
    pub meta_used: MetaBlocks,
    /// Metadata blocks in all.
    pub meta_total: MetaBlocks,
    /// Size of a data block.
    pub block_size: Sectors,
    /// Health.
    pub mode: PoolMode,
    /// The metadata is flagged for checking with `thin_check`.
    pub needs_check: bool,
    /// The current low-water mark in data blocks.
    pub low_water_mark: DataBlocks,
    /// Block of a reserved metadata snapshot, if one is held.
    pub held_metadata_root: Option<MetaBlocks>,
}

impl PoolStatus {
    /// Data bytes in use.
    pub fn data_used_bytes(&self) -> u64 {
        *self.data_used * units::sectors_to_bytes(self.block_size)
    }
    /// Data bytes in all.
    pub fn data_total_bytes(&self) -> u64 {
        *self.data_total * units::sectors_to_bytes(self.block_size)
    }
    /// Metadata bytes in use.
    pub fn meta_used_bytes(&self) -> u64 {
        *self.meta_used * META_BLOCK_BYTES
    }
    /// Metadata bytes in all.
    pub fn meta_total_bytes(&self) -> u64 {
        *self.meta_total * META_BLOCK_BYTES
    }
    /// Fraction of data space in use, 0.0 to 1.0.
    pub fn data_fraction(&self) -> f64 {
        ratio(*self.data_used, *self.data_total)
    }
    /// Fraction of metadata space in use, 0.0 to 1.0.
    pub fn meta_fraction(&self) -> f64 {
        ratio(*self.meta_used, *self.meta_total)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Parsed parameters of a thin-pool table line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PoolTable {
    length: Sectors,
    meta: Device,
    data: Device,
    block_size: Sectors,
    low_water_mark: DataBlocks,
    features: Vec<String>,
}

impl PoolTable {
    fn parse(length: u64, params: &str) -> Result<PoolTable> {
        let bad = || Error::invalid(format!("thin-pool table {params:?}"), "cannot parse it");
        let f: Vec<&str> = params.split_whitespace().collect();
        if f.len() < 4 {
            return Err(bad());
        }
        let nfeat: usize = f.get(4).map_or(Ok(0), |s| s.parse()).map_err(|_| bad())?;
        Ok(PoolTable {
            length: Sectors(length),
            meta: dm::parse_device(f[0])?,
            data: dm::parse_device(f[1])?,
            block_size: Sectors(f[2].parse().map_err(|_| bad())?),
            low_water_mark: DataBlocks(f[3].parse().map_err(|_| bad())?),
            features: f
                .iter()
                .skip(5)
                .take(nfeat)
                .map(|s| s.to_string())
                .collect(),
        })
    }

    fn line(&self) -> TableLine {
        let mut params = format!(
            "{}:{} {}:{} {} {}",
            self.meta.major,
            self.meta.minor,
            self.data.major,
            self.data.minor,
            *self.block_size,
            *self.low_water_mark
        );
        params.push_str(&format!(" {}", self.features.len()));
        for f in &self.features {
            params.push(' ');
            params.push_str(f);
        }
        (0, *self.length, "thin-pool".into(), params)
    }
}

/// An open thin pool. Thin-device operations are in `thin.rs`.
///
/// Methods are synchronous ioctls. Messages that change the pool's metadata are serialized
/// by an internal lock, so one `ThinPool` may be shared between threads.
#[derive(Debug)]
pub struct ThinPool {
    pub(crate) name: PoolName,
    pub(crate) dm_name: DmNameBuf,
    pub(crate) device: Device,
    pub(crate) block_size: Sectors,
    backing: Backing,
    msg_lock: Mutex<()>,
    /// Serializes this process's metadata snapshots (the pool has one at a time), apart
    /// from `msg_lock`: a reading of the snapshot never holds up create, delete or resize.
    snap_lock: Mutex<()>,
}

fn features(opts: &PoolOptions) -> Vec<String> {
    let mut f = Vec::new();
    if !opts.zero_new_blocks {
        f.push("skip_block_zeroing".to_string());
    }
    if !opts.discard_passdown {
        f.push("no_discard_passdown".to_string());
    }
    if opts.error_if_no_space {
        f.push("error_if_no_space".to_string());
    }
    f
}

fn validate_options(opts: &PoolOptions) -> Result<()> {
    let bs = opts.block_size;
    if bs < MIN_BLOCK_SIZE || bs > MAX_BLOCK_SIZE || *bs % *MIN_BLOCK_SIZE != 0 {
        return Err(Error::invalid(
            format!("block size {} bytes", units::sectors_to_bytes(bs)),
            "must be a multiple of 64 KiB between 64 KiB and 1 GiB",
        ));
    }
    Ok(())
}

impl ThinPool {
    /// Opens the pool `name` from `source`, creating it when the source allows and it does
    /// not exist yet; an active pool device of the same name is re-adopted.
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad options or a half-present pool; [`Error::Dm`],
    /// [`Error::Io`] or [`Error::Command`] when a step fails. A failed open releases what it
    /// set up (loop devices, files of a pool it was creating).
    #[instrument(level = "info", skip(source, opts), fields(pool = %name.to_string()))]
    pub fn open(name: &PoolName, source: &Source, opts: &PoolOptions) -> Result<ThinPool> {
        validate_options(opts)?;
        match source {
            Source::Loopback {
                dir,
                data_size,
                meta_size,
            } => Self::open_loopback(name, dir, *data_size, *meta_size, opts),
            Source::Existing { dm_name } => {
                let dm_name = DmNameBuf::new(dm_name.clone()).map_err(|_| {
                    Error::invalid(format!("dm name {dm_name:?}"), "not a valid dm name")
                })?;
                Self::adopt(name, dm_name, Backing::Existing)
            }
            Source::Lvm(pool) => {
                let dm_name = pool.open(opts)?;
                let dm_name = DmNameBuf::new(dm_name)
                    .map_err(|_| Error::invalid("LVM pool dm name", "not a valid dm name"))?;
                Self::adopt(name, dm_name, Backing::Lvm(pool.clone()))
            }
        }
    }

    fn adopt(name: &PoolName, dm_name: DmNameBuf, backing: Backing) -> Result<ThinPool> {
        let info = dm::info(&dm_name)?.ok_or_else(|| Error::NotFound {
            what: format!("thin-pool device {}", &*dm_name),
            hint: Hint(Some("activate the pool first (e.g. `lvchange -ay VG/LV`) or check its name with `ls /sys/block/dm-*/dm/name`")),
        })?;
        let (len, ty, params) = dm::table(&dm_name)?;
        if ty != "thin-pool" {
            return Err(Error::invalid(
                format!("dm device {}", &*dm_name),
                format!("it is a {ty} device, not a thin-pool"),
            ));
        }
        let table = PoolTable::parse(len, &params)?;
        info!(dm = %dm_name.to_string(), "adopted pool");
        Ok(ThinPool {
            name: name.clone(),
            dm_name,
            device: info.device(),
            block_size: table.block_size,
            backing,
            msg_lock: Mutex::new(()),
            snap_lock: Mutex::new(()),
        })
    }

    fn open_loopback(
        name: &PoolName,
        dir: &Path,
        data_size: u64,
        meta_size: u64,
        opts: &PoolOptions,
    ) -> Result<ThinPool> {
        let data_file = dir.join("data");
        let meta_file = dir.join("metadata");
        let fresh = match (data_file.exists(), meta_file.exists()) {
            (false, false) => true,
            (true, true) => false,
            _ => {
                return Err(Error::invalid(
                    format!("loopback pool in {}", dir.display()),
                    "only one of its `data` and `metadata` files exists: restore the missing file, or remove the other to start a new, empty pool",
                ))
            }
        };
        if fresh {
            check_sizes(data_size, meta_size, opts.block_size)?;
            crate::private::create_dir(dir)?;
            loopback::create_sparse(&meta_file, meta_size)?;
            if let Err(e) = loopback::create_sparse(&data_file, data_size) {
                let _ = fs::remove_file(&meta_file);
                return Err(e);
            }
            info!(dir = %dir.display(), data = %units::format_size(data_size), metadata = %units::format_size(meta_size), "created loopback pool files");
        } else {
            // The files hold every image's, container's and volume's blocks.
            for p in [dir, &data_file, &meta_file] {
                crate::private::restrict(p)?;
            }
        }
        let undo_files = |e: Error| -> Error {
            if fresh {
                let _ = fs::remove_file(&data_file);
                let _ = fs::remove_file(&meta_file);
            }
            e
        };
        let meta = loopback::attach(&meta_file, opts.direct_io).map_err(undo_files)?;
        let data = match loopback::attach(&data_file, opts.direct_io) {
            Ok(d) => d,
            Err(e) => {
                let _ = meta.detach();
                return Err(undo_files(e));
            }
        };
        let (dm_name, uuid) = names::pool_names(name);
        let result = (|| -> Result<Device> {
            if let Some(info) = dm::info(&dm_name)? {
                let (len, ty, params) = dm::table(&dm_name)?;
                let table = PoolTable::parse(len, &params)?;
                if ty != "thin-pool" || table.meta != meta.device || table.data != data.device {
                    return Err(Error::invalid(
                        format!("dm device {}", &*dm_name),
                        format!(
                            "it exists but does not map {} and {}: another pool of the same name is active; deactivate it or choose another pool name",
                            meta.file.display(),
                            data.file.display()
                        ),
                    ));
                }
                info!(dm = %dm_name.to_string(), "re-adopted active loopback pool");
                finish_interrupted_grow(&dm_name, table, &data, &meta)?;
                return Ok(info.device());
            }
            let data_len = units::bytes_to_sectors(data.size()?);
            let length = Sectors(*data_len - *data_len % *opts.block_size);
            let table = PoolTable {
                length,
                meta: meta.device,
                data: data.device,
                block_size: opts.block_size,
                low_water_mark: opts
                    .low_water_mark
                    .unwrap_or(DataBlocks(*length / *opts.block_size / 10)),
                features: features(opts),
            };
            let info = dm::create(&dm_name, Some(&uuid), &[table.line()])?;
            info!(dm = %dm_name.to_string(), "activated loopback pool");
            Ok(info.device())
        })();
        match result {
            Ok(device) => Ok(ThinPool {
                name: name.clone(),
                dm_name,
                device,
                block_size: opts.block_size,
                backing: Backing::Loopback {
                    dir: dir.to_path_buf(),
                    data,
                    meta,
                },
                msg_lock: Mutex::new(()),
                snap_lock: Mutex::new(()),
            }),
            Err(e) => {
                let undo = data.detach().and(meta.detach());
                Err(undo_files(Error::with_rollback(e, undo)))
            }
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &PoolName {
        &self.name
    }

    /// The dm name of the thin-pool device.
    pub fn dm_name(&self) -> &DmName {
        &self.dm_name
    }

    /// The thin-pool device's number.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Size of a data block.
    pub fn block_size(&self) -> Sectors {
        self.block_size
    }

    /// A human description of the pool's storage (files, dm name or LVM volume).
    pub fn describe_source(&self) -> String {
        match &self.backing {
            Backing::Loopback {
                dir, data, meta, ..
            } => format!(
                "loopback files in {} ({} and {})",
                dir.display(),
                data.dev_path.display(),
                meta.dev_path.display()
            ),
            Backing::Existing => format!("existing dm pool {}", &*self.dm_name),
            Backing::Lvm(p) => format!("LVM thin pool {}/{}", p.vg, p.lv),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, ()> {
        self.msg_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn table(&self) -> Result<PoolTable> {
        let (len, _, params) = dm::table(&self.dm_name)?;
        PoolTable::parse(len, &params)
    }

    /// The pool's current status from the kernel (the kernel commits the pool's metadata
    /// first, so the figures are exact).
    ///
    /// # Errors
    /// [`Error::Dm`] when the status cannot be read; [`Error::Invalid`] if it cannot be parsed.
    pub fn status(&self) -> Result<PoolStatus> {
        self.status_with(true)
    }

    /// The pool's status without the metadata commit the kernel otherwise does before
    /// answering: figures may lag by the kernel's commit period (1 s), and the call costs
    /// no synchronous metadata write. For checks on every request.
    ///
    /// # Errors
    /// As [`ThinPool::status`].
    pub fn status_noflush(&self) -> Result<PoolStatus> {
        self.status_with(false)
    }

    fn status_with(&self, flush: bool) -> Result<PoolStatus> {
        let (_, line) = dm::status(&self.dm_name, flush)?;
        let table = self.table()?;
        let parsed = ThinPoolStatus::from_str(&line)
            .map_err(|e| Error::invalid(format!("status of {}", &*self.dm_name), e.to_string()))?;
        let failed = PoolStatus {
            transaction_id: 0,
            data_used: DataBlocks(0),
            data_total: DataBlocks(*table.length / *table.block_size),
            meta_used: MetaBlocks(0),
            meta_total: MetaBlocks(0),
            block_size: table.block_size,
            mode: PoolMode::Failed,
            needs_check: true,
            low_water_mark: table.low_water_mark,
            held_metadata_root: None,
        };
        Ok(match parsed {
            ThinPoolStatus::Working(w) => PoolStatus {
                transaction_id: w.transaction_id,
                data_used: w.usage.used_data,
                data_total: w.usage.total_data,
                meta_used: w.usage.used_meta,
                meta_total: w.usage.total_meta,
                block_size: table.block_size,
                mode: match w.summary {
                    ThinPoolStatusSummary::Good => PoolMode::ReadWrite,
                    ThinPoolStatusSummary::ReadOnly => PoolMode::ReadOnly,
                    ThinPoolStatusSummary::OutOfSpace => PoolMode::OutOfDataSpace,
                },
                needs_check: w.needs_check,
                low_water_mark: table.low_water_mark,
                held_metadata_root: w.held_metadata_root,
            },
            ThinPoolStatus::Error | ThinPoolStatus::Fail => failed,
        })
    }

    /// The pool's status, or an error when the pool cannot take new data: out of data
    /// space ([`Error::NoSpace`]), or read-only, failed or flagged for checking
    /// ([`Error::Degraded`]), each with what to do.
    ///
    /// # Errors
    /// As described, and as [`ThinPool::status`].
    pub fn check_writable(&self) -> Result<PoolStatus> {
        let st = self.status_noflush()?;
        let degraded = |mode: &str, hint| Error::Degraded {
            pool: self.name.to_string(),
            mode: mode.to_string(),
            hint,
        };
        match st.mode {
            PoolMode::OutOfDataSpace => Err(Error::NoSpace {
                pool: self.name.to_string(),
                detail: format!(
                    "{} of {} data blocks used",
                    st.data_used, st.data_total
                ),
            }),
            PoolMode::ReadOnly => Err(degraded(
                "read-only",
                "the kernel found a metadata problem: check the metadata with thin_check, then repair it with thin_repair",
            )),
            PoolMode::Failed => Err(degraded(
                "failed",
                "its devices error all I/O: check `dmesg` for the cause (a missing or failing disk) and fix it",
            )),
            PoolMode::ReadWrite if st.needs_check => Err(degraded(
                "flagged for a metadata check",
                "deactivate the pool and check its metadata with thin_check",
            )),
            PoolMode::ReadWrite => Ok(st),
        }
    }

    /// The pool's transaction id.
    ///
    /// # Errors
    /// As [`ThinPool::status`].
    pub fn transaction_id(&self) -> Result<u64> {
        Ok(self.status()?.transaction_id)
    }

    /// Sets the transaction id from `old` to `new`; the kernel refuses if the id is not `old`.
    ///
    /// Callers pair each metadata change with a new transaction id and record it in their
    /// own store, so after a crash they can tell which changes completed.
    ///
    /// # Errors
    /// [`Error::Dm`] (EINVAL) when the current id is not `old`.
    #[instrument(level = "debug", skip(self), fields(pool = %self.name))]
    pub fn set_transaction_id(&self, old: u64, new: u64) -> Result<()> {
        let _g = self.lock();
        dm::message(
            &self.dm_name,
            "set_transaction_id",
            &format!("set_transaction_id {old} {new}"),
        )
        .map(|_| ())
    }

    /// Sets the low-water mark (in data blocks) by reloading the pool's table.
    ///
    /// # Errors
    /// [`Error::Invalid`] when it exceeds the pool's size; [`Error::Dm`] on failure.
    #[instrument(level = "info", skip(self), fields(pool = %self.name))]
    pub fn set_low_water_mark(&self, blocks: DataBlocks) -> Result<()> {
        let _g = self.lock();
        let mut table = self.table()?;
        if *blocks > *table.length / *table.block_size {
            return Err(Error::invalid(
                format!("low-water mark {blocks}"),
                "is larger than the pool",
            ));
        }
        table.low_water_mark = blocks;
        dm::reload(&self.dm_name, &[table.line()])
    }

    /// Grows the pool's data space to `data_bytes` and, if given, its metadata space to
    /// `meta_bytes`, online: loopback files are extended and the table reloaded; LVM volumes
    /// are extended with `lvextend`. Growing to the current size is a no-op.
    ///
    /// # Errors
    /// [`Error::Invalid`] when a size would shrink the pool; [`Error::Unsupported`] for an
    /// existing dm pool (grow its devices yourself); [`Error::Io`]/[`Error::Command`] on failure.
    #[instrument(level = "info", skip(self), fields(pool = %self.name))]
    pub fn grow(&self, data_bytes: u64, meta_bytes: Option<u64>) -> Result<()> {
        let _g = self.lock();
        match &self.backing {
            Backing::Loopback { data, meta, .. } => {
                let cur = data.size()?;
                if data_bytes < cur {
                    return Err(Error::invalid(
                        format!("new data size {}", units::format_size(data_bytes)),
                        format!(
                            "the pool already has {}; pools cannot shrink",
                            units::format_size(cur)
                        ),
                    ));
                }
                if let Some(m) = meta_bytes {
                    if m > units::TIB / 64 {
                        return Err(Error::invalid(
                            format!("metadata size {}", units::format_size(m)),
                            "thin-pool metadata is at most 16 GiB",
                        ));
                    }
                    meta.grow(m)?;
                    crate::failpoint::hit("grow.after-metadata-file");
                }
                data.grow(data_bytes)?;
                crate::failpoint::hit("grow.after-data-file");
                let mut table = self.table()?;
                let len = units::bytes_to_sectors(data_bytes);
                table.length = Sectors(*len - *len % *table.block_size);
                // Resuming with the new table makes the kernel pick up both new sizes.
                dm::reload(&self.dm_name, &[table.line()])?;
                crate::failpoint::hit("grow.after-reload");
                info!(data = %units::format_size(data_bytes), "grew loopback pool");
                Ok(())
            }
            Backing::Lvm(p) => p.grow(data_bytes, meta_bytes),
            Backing::Existing => Err(Error::Unsupported {
                op: "grow",
                what: format!("existing dm pool {}", &*self.dm_name),
                hint: Hint(Some(
                    "grow its data device and reload its table with the tool that created it",
                )),
            }),
        }
    }

    /// The LVM thin pool behind this pool, if it is one.
    pub fn lvm(&self) -> Option<&lvm::LvmPool> {
        match &self.backing {
            Backing::Lvm(p) => Some(p),
            _ => None,
        }
    }

    /// Size of the pool's data space in bytes, from its table.
    ///
    /// # Errors
    /// As [`ThinPool::status`].
    pub fn data_bytes(&self) -> Result<u64> {
        Ok(units::sectors_to_bytes(self.table()?.length))
    }

    /// The metadata device's node, e.g. `/dev/loop1` or `/dev/dm-3`.
    ///
    /// # Errors
    /// As [`ThinPool::status`].
    pub fn metadata_devnode(&self) -> Result<PathBuf> {
        dm::devnode(self.table()?.meta)
    }

    /// Holds a metadata snapshot while `f` runs: `f` gets the metadata device and the
    /// block of the snapshot's superblock. The snapshot is released afterwards. The pool
    /// has one metadata snapshot at a time: while another process holds one (a daemon's
    /// usage reading, a CLI's count, an admin's `thin_ls`), this waits for it to be
    /// released, up to [`HELD_SNAPSHOT_WAIT`].
    ///
    /// # Errors
    /// [`Error::Busy`] when a metadata snapshot is still held by someone else after the
    /// wait; errors of `f`; [`Error::Dm`] when reserving or releasing fails.
    pub fn with_metadata_snapshot<T>(&self, f: impl FnOnce(&Path, u64) -> Result<T>) -> Result<T> {
        let _g = self.snap_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.reserve_metadata_snapshot()?;
        let res = (|| {
            let root = self.status()?.held_metadata_root.ok_or_else(|| {
                Error::invalid(
                    format!("pool {}", self.name),
                    "reserved a metadata snapshot but reports none",
                )
            })?;
            f(&self.metadata_devnode()?, *root)
        })();
        let release = dm::message(
            &self.dm_name,
            "release_metadata_snap",
            "release_metadata_snap",
        )
        .map(|_| ());
        match (res, release) {
            (Ok(v), Ok(())) => Ok(v),
            (Ok(_), Err(e)) => Err(e),
            (Err(e), r) => Err(Error::with_rollback(e, r)),
        }
    }

    /// Reserves the pool's metadata snapshot, waiting while someone else holds one.
    fn reserve_metadata_snapshot(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + HELD_SNAPSHOT_WAIT;
        loop {
            let held = match self.status_noflush()?.held_metadata_root {
                None => match dm::message(
                    &self.dm_name,
                    "reserve_metadata_snap",
                    "reserve_metadata_snap",
                ) {
                    Ok(_) => return Ok(()),
                    // Someone else reserved one between our look and our message.
                    Err(e) => match self.status_noflush()?.held_metadata_root {
                        Some(root) => root,
                        None => return Err(e),
                    },
                },
                Some(root) => root,
            };
            if std::time::Instant::now() >= deadline {
                return Err(Error::Busy {
                    device: self.dm_name.to_string(),
                    detail: format!(
                        "a metadata snapshot (block {held}) has been held by someone else for more than {} s: release it with the tool that took it (message `release_metadata_snap`)",
                        HELD_SNAPSHOT_WAIT.as_secs()
                    ),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Checks the live pool's metadata with `thin_check` on a metadata snapshot, returning
    /// its report.
    ///
    /// # Errors
    /// [`Error::Command`] with thin_check's findings when the metadata is damaged;
    /// [`Error::Busy`] when someone else holds a metadata snapshot.
    pub fn check_metadata(&self) -> Result<String> {
        self.with_metadata_snapshot(|meta, _| crate::cmd::thin_check(meta, true))
    }

    /// Writes the pool's metadata, as of now, to `out` as thin_dump's XML (from a metadata
    /// snapshot, so the pool stays live). The file appears only when complete.
    ///
    /// # Errors
    /// As [`ThinPool::with_metadata_snapshot`]; [`Error::Command`]/[`Error::Io`] when the
    /// dump cannot be written.
    #[instrument(level = "info", skip(self), fields(pool = %self.name))]
    pub fn backup_metadata(&self, out: &Path) -> Result<()> {
        let name = out.file_name().ok_or_else(|| {
            Error::invalid(format!("backup file {}", out.display()), "names no file")
        })?;
        let partial = out.with_file_name(format!(".{}.partial", name.to_string_lossy()));
        let res = self
            .with_metadata_snapshot(|meta, _| crate::cmd::thin_dump_snapshot(meta, &partial))
            .and_then(|()| {
                std::fs::File::open(&partial)
                    .and_then(|f| f.sync_all())
                    .and_then(|()| std::fs::rename(&partial, out))
                    .map_err(|e| Error::io("write", out, e))
            });
        if res.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        res
    }

    /// Repairs a pool the kernel put in read-only mode or flagged `needs_check` (after an
    /// I/O error or a metadata problem): with every thin device of the pool inactive, the
    /// pool device is removed, its metadata checked with `thin_check` (which clears the
    /// flag when the metadata is sound), or for loopback pools rebuilt with `thin_repair`
    /// into a new file (the old one is kept as `metadata.broken-<time>`), and the pool is
    /// activated again with the same table. LVM pools are repaired with
    /// `lvconvert --repair`. Returns a report of what was done.
    ///
    /// # Errors
    /// [`Error::Busy`] while thin devices of the pool are active; [`Error::Command`] when the
    /// metadata cannot be salvaged (the pool stays inactive; the error says what to do).
    #[instrument(level = "info", skip(self), fields(pool = %self.name))]
    pub fn repair(self) -> Result<(ThinPool, String)> {
        let active = self.active_thins()?;
        if !active.is_empty() {
            return Err(Error::Busy {
                device: self.dm_name.to_string(),
                detail: format!(
                    "{} thin device(s) of the pool are active (e.g. {}): stop the containers using them and deactivate them first",
                    active.len(),
                    &*active[0].1
                ),
            });
        }
        let mut report = String::new();
        if let Backing::Lvm(p) = &self.backing {
            crate::cmd::lvm(&["lvchange", "-an", &format!("{}/{}", p.vg, p.lv)])?;
            crate::cmd::lvm(&["lvconvert", "--repair", "-y", &format!("{}/{}", p.vg, p.lv)])?;
            crate::cmd::lvm(&["lvchange", "-ay", &format!("{}/{}", p.vg, p.lv)])?;
            report.push_str("LVM repaired the pool (lvconvert --repair)\n");
            return Ok((self, report));
        }
        let mut table = self.table()?;
        let uuid = dm::info(&self.dm_name)?.and_then(|i| i.uuid().map(|u| u.to_owned()));
        dm::remove(&self.dm_name, dm::RemoveMode::Now)?;
        let meta_node = dm::devnode(table.meta)?;
        report.push_str(&format!("deactivated {}\n", &*self.dm_name));
        match crate::cmd::thin_check_clear(&meta_node) {
            Ok(out) => report.push_str(&format!(
                "thin_check: metadata is sound; needs_check cleared\n{out}"
            )),
            Err(check) => {
                let Backing::Loopback { dir, meta, .. } = &self.backing else {
                    return Err(Error::with_rollback(check, Err(Error::Unsupported {
                        op: "automatic metadata repair",
                        what: format!("existing dm pool {}", &*self.dm_name),
                        hint: Hint(Some("run thin_repair onto a spare device and reload the pool's table with it")),
                    })));
                };
                report.push_str(&format!("thin_check found damage: {check}\n"));
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let fresh = dir.join("metadata.repaired");
                let _ = fs::remove_file(&fresh);
                loopback::create_sparse(&fresh, meta.size()?)?;
                let target = loopback::attach(&fresh, false)?;
                let repaired = crate::cmd::thin_repair(&meta.dev_path, &target.dev_path);
                target.detach()?;
                repaired?;
                meta.detach()?;
                let broken = dir.join(format!("metadata.broken-{stamp}"));
                fs::rename(&meta.file, &broken).map_err(|e| Error::io("rename", &meta.file, e))?;
                fs::rename(&fresh, &meta.file).map_err(|e| Error::io("rename", &fresh, e))?;
                let new_meta = loopback::attach(&meta.file, true)?;
                table.meta = new_meta.device;
                report.push_str(&format!(
                    "thin_repair rebuilt the metadata; the damaged copy is {}\n",
                    broken.display()
                ));
                dm::create(&self.dm_name, uuid.as_deref(), &[table.line()])?;
                report.push_str(&format!("re-activated {}\n", &*self.dm_name));
                let ThinPool {
                    name,
                    dm_name,
                    block_size,
                    backing,
                    ..
                } = self;
                let Backing::Loopback { dir, data, .. } = backing else {
                    unreachable!()
                };
                let info = dm::info(&dm_name)?
                    .ok_or_else(|| Error::invalid(dm_name.to_string(), "vanished"))?;
                return Ok((
                    ThinPool {
                        name,
                        device: info.device(),
                        dm_name,
                        block_size,
                        backing: Backing::Loopback {
                            dir,
                            data,
                            meta: new_meta,
                        },
                        msg_lock: Mutex::new(()),
                        snap_lock: Mutex::new(()),
                    },
                    report,
                ));
            }
        }
        let info = dm::create(&self.dm_name, uuid.as_deref(), &[table.line()])?;
        report.push_str(&format!("re-activated {}\n", &*self.dm_name));
        let mut pool = self;
        pool.device = info.device();
        Ok((pool, report))
    }

    /// Deactivates the pool: removes its thin-pool device (loopback pools) and detaches its
    /// loop devices. Existing and LVM pools stay active; only this handle is dropped.
    ///
    /// # Errors
    /// [`Error::Busy`] while thin devices of the pool are active.
    #[instrument(level = "info", skip(self), fields(pool = %self.name))]
    pub fn teardown(self) -> Result<()> {
        let active = self.active_thins()?;
        if !active.is_empty() {
            return Err(Error::Busy {
                device: self.dm_name.to_string(),
                detail: format!(
                    "{} thin device(s) of the pool are active (e.g. {}): deactivate them first",
                    active.len(),
                    &*active[0].1
                ),
            });
        }
        if let Backing::Loopback { data, meta, .. } = &self.backing {
            dm::remove(&self.dm_name, dm::RemoveMode::Now)?;
            data.detach()?;
            meta.detach()?;
            info!("loopback pool deactivated");
        }
        Ok(())
    }

    /// Tears the pool down and deletes its storage: the loopback files, or the LVM logical
    /// volume. Refuses for an existing dm pool, which thinsnap did not create.
    ///
    /// # Errors
    /// As [`ThinPool::teardown`]; [`Error::Unsupported`] for existing pools.
    #[instrument(level = "info", skip(self), fields(pool = %self.name))]
    pub fn destroy(self) -> Result<()> {
        match &self.backing {
            Backing::Existing => Err(Error::Unsupported {
                op: "destroy",
                what: format!("existing dm pool {}", &*self.dm_name),
                hint: Hint(Some(
                    "it was not created here; remove it with the tool that created it",
                )),
            }),
            Backing::Loopback { dir, .. } => {
                let dir = dir.clone();
                self.teardown()?;
                for f in ["data", "metadata"] {
                    let p = dir.join(f);
                    fs::remove_file(&p).map_err(|e| Error::io("remove", &p, e))?;
                }
                warn!(dir = %dir.display(), "loopback pool destroyed");
                Ok(())
            }
            Backing::Lvm(p) => {
                let p = p.clone();
                self.teardown()?;
                p.remove()
            }
        }
    }
}

/// A grow interrupted after extending the files but before the table was reloaded leaves
/// files larger than the live pool; reloading the table (resume picks up both sizes)
/// finishes it.
fn finish_interrupted_grow(
    dm_name: &DmName,
    mut table: PoolTable,
    data: &LoopFile,
    meta: &LoopFile,
) -> Result<()> {
    // The crash may have come between extending a file and telling its loop device.
    let data_bytes = data.size()?;
    let meta_bytes = meta.size()?;
    data.grow(data_bytes)?;
    meta.grow(meta_bytes)?;
    let data_len = units::bytes_to_sectors(data_bytes);
    let data_len = Sectors(*data_len - *data_len % *table.block_size);
    let (_, line) = dm::status(dm_name, true)?;
    let meta_total = match ThinPoolStatus::from_str(&line) {
        Ok(ThinPoolStatus::Working(w)) => *w.usage.total_meta * META_BLOCK_BYTES,
        _ => meta_bytes,
    };
    // The kernel uses whole metadata blocks, and at most 16 GiB of a larger device.
    let meta_grown = meta_bytes / META_BLOCK_BYTES * META_BLOCK_BYTES > meta_total
        && meta_total < 16 * GIB - 64 * units::MIB;
    if data_len > table.length || meta_grown {
        table.length = table.length.max(data_len);
        dm::reload(dm_name, &[table.line()])?;
        info!(dm = %dm_name.to_string(), data = %units::format_size(units::sectors_to_bytes(table.length)), "finished an interrupted pool grow");
    }
    Ok(())
}

fn check_sizes(data: u64, meta: u64, block_size: Sectors) -> Result<()> {
    let bs = units::sectors_to_bytes(block_size);
    if data < 16 * bs {
        return Err(Error::invalid(
            format!("data size {}", units::format_size(data)),
            format!("must hold at least 16 blocks of {}", units::format_size(bs)),
        ));
    }
    if !(2 * units::MIB..=16 * GIB).contains(&meta) {
        return Err(Error::invalid(
            format!("metadata size {}", units::format_size(meta)),
            "must be between 2 MiB and 16 GiB",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_table_round_trips() {
        let params = "7:1 7:0 128 1000 2 skip_block_zeroing error_if_no_space";
        let t = PoolTable::parse(2048000, params).unwrap();
        assert_eq!(t.block_size, Sectors(128));
        assert_eq!(t.low_water_mark, DataBlocks(1000));
        assert_eq!(t.features, vec!["skip_block_zeroing", "error_if_no_space"]);
        assert_eq!(t.line().3, params);
    }

    #[test]
    fn pool_table_without_features() {
        let t = PoolTable::parse(100, "253:1 253:2 128 0 0").unwrap();
        assert!(t.features.is_empty());
        assert!(PoolTable::parse(100, "253:1 nonsense").is_err());
    }

    #[test]
    fn block_sizes_are_checked() {
        for (bs, ok) in [
            (128, true),
            (256, true),
            (64, false),
            (192, false),
            (4 * 1024 * 1024, false),
        ] {
            let opts = PoolOptions {
                block_size: Sectors(bs),
                ..Default::default()
            };
            assert_eq!(validate_options(&opts).is_ok(), ok, "{bs}");
        }
    }

    #[test]
    fn sizes_are_checked() {
        assert!(check_sizes(100 * GIB, 2 * GIB, Sectors(128)).is_ok());
        assert!(check_sizes(1024, 2 * GIB, Sectors(128)).is_err());
        assert!(check_sizes(GIB, 1024, Sectors(128)).is_err());
    }

    #[test]
    fn default_features() {
        assert_eq!(features(&PoolOptions::default()), vec!["error_if_no_space"]);
    }
}
