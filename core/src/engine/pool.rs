//! The kernel as the engine sees it: a thin pool, its thin devices, and the filesystems
//! on them. [`Pool`] is implemented by [`KernelPool`] (device-mapper through `thinpool`)
//! and by [`super::sim::SimPool`] (in memory, for tests of the engine without a kernel).

use std::{collections::BTreeSet, path::Path, path::PathBuf};

use thinpool::{
    ActiveThin, Count, DataBlocks, Device, FsType, LvmPool, MappingUsage, MountDir, PoolName,
    PoolStatus, RemoveMode, Result, Sectors, ThinId, ThinPool, ThinReading, ThinUsage,
};

/// One thin pool and the filesystems on its devices. Every method is one kernel step (or
/// one tool run); they are synchronous, and errors are `thinpool`'s, so the engine
/// handles a simulated failure exactly as a real one.
pub trait Pool: Send + Sync + 'static {
    /// The pool's name.
    fn name(&self) -> &PoolName;
    /// Where the pool's storage comes from, for people.
    fn describe_source(&self) -> String;
    /// The pool's status (the kernel commits its metadata first).
    fn status(&self) -> Result<PoolStatus>;
    /// The pool's status without a metadata commit.
    fn status_noflush(&self) -> Result<PoolStatus>;
    /// The pool's status without a metadata commit; [`thinpool::Error::Degraded`] unless
    /// the pool takes writes.
    fn check_writable(&self) -> Result<PoolStatus>;
    /// Every thin id in the pool's metadata.
    fn thin_ids(&self) -> Result<BTreeSet<ThinId>>;
    /// The pool's active thin devices: id, dm name, device number.
    fn active_thins(&self) -> Result<Vec<(ThinId, String, Device)>>;
    /// The dm name of thin device `id`.
    fn thin_name(&self, id: ThinId) -> String;

    /// Creates an empty thin device (a pool message).
    fn create_thin(&self, id: ThinId) -> Result<()>;
    /// Creates thin device `id` as a snapshot of `origin` (a pool message).
    fn create_snapshot(&self, id: ThinId, origin: ThinId) -> Result<()>;
    /// Deletes thin device `id` (deactivating it first); an absent id is not an error.
    fn delete_thin(&self, id: ThinId) -> Result<()>;
    /// Activates thin device `id` with `size`.
    fn activate(&self, id: ThinId, size: Sectors) -> Result<ActiveThin>;
    /// Deactivates thin device `id`; an inactive one is not an error.
    fn deactivate(&self, id: ThinId, mode: RemoveMode) -> Result<()>;
    /// Whether thin device `id` is active.
    fn is_active(&self, id: ThinId) -> Result<bool>;
    /// How many holders have thin device `id` open (a mount is one); None when inactive.
    fn open_count(&self, id: ThinId) -> Result<Option<u32>>;
    /// What active thin device `id` maps.
    fn thin_usage(&self, id: ThinId) -> Result<ThinUsage>;
    /// Thin device `id`'s number, node, open count and usage in one step; None when it
    /// is not active.
    fn read_active(&self, id: ThinId) -> Result<Option<ThinReading>>;
    /// Mapped and exclusive data blocks of every thin device, from a metadata snapshot
    /// (one read per distinct metadata node: the engine caches it).
    fn mapping_usage(&self, what: Count) -> Result<MappingUsage>;

    /// Makes a filesystem on `dev`.
    fn mkfs(&self, fs: FsType, dev: &Path, extra: &[String]) -> Result<()>;
    /// Grows the unmounted filesystem on `dev` to its device's size (mounting it for a
    /// moment in the private mount directory).
    fn grow_unmounted(&self, fs: FsType, dev: &Path) -> Result<()>;
    /// Removes the empty `lost+found` mkfs made in the unmounted filesystem on `dev`
    /// (mounting it for a moment in the private mount directory); whether it was there.
    fn remove_lost_found(&self, fs: FsType, dev: &Path) -> Result<bool>;
    /// Grows the filesystem on `dev`, mounted at `dir`, to its device's size.
    fn grow_mounted(&self, fs: FsType, dev: &Path, dir: &Path) -> Result<()>;
    /// Discards every block of `dev` (opened exclusively: never a mounted device).
    fn discard(&self, dev: &Path) -> Result<()>;
    /// Inodes in use in the unmounted filesystem on `dev`.
    fn used_inodes(&self, fs: FsType, dev: &Path) -> Result<u64>;
    /// Inodes in use in the filesystem mounted at `dir`.
    fn used_inodes_at(&self, dir: &Path) -> Result<u64>;
    /// Mounts `dev` at `dir` (xfs with the configured ENOSPC retries).
    fn mount(&self, dev: &Path, dir: &Path, fs: FsType, options: &[String]) -> Result<()>;
    /// Unmounts `dir`; not mounted is not an error.
    fn umount(&self, dir: &Path) -> Result<()>;
    /// Whether something is mounted at `dir`.
    fn is_mounted(&self, dir: &Path) -> Result<bool>;
    /// Where device `device` is mounted.
    fn mounts_of(&self, device: Device) -> Result<Vec<PathBuf>>;
    /// Flushes the filesystem mounted at `dir`.
    fn syncfs(&self, dir: &Path) -> Result<()>;
    /// Temporary mounts (in the private mount directory) of processes that are gone.
    fn stale_temp_mounts(&self) -> Result<Vec<PathBuf>>;
    /// Unmounts (if mounted) and removes a stale temporary mount.
    fn remove_temp_mount(&self, dir: &Path) -> Result<()>;

    /// Size of the pool's data device in bytes.
    fn data_bytes(&self) -> Result<u64>;
    /// Grows the pool's data device to `data_bytes` (and metadata to `meta_bytes`).
    fn grow(&self, data_bytes: u64, meta_bytes: Option<u64>) -> Result<()>;
    /// Sets the pool's low-water mark.
    fn set_low_water_mark(&self, blocks: DataBlocks) -> Result<()>;
    /// The LVM thin pool behind the pool, if it is one.
    fn lvm(&self) -> Option<&LvmPool>;
    /// The device-mapper pool itself, for administration that needs it (backup, check);
    /// None for a simulated pool.
    fn kernel(&self) -> Option<&ThinPool>;
}

/// The real pool: device-mapper ioctls through `thinpool`, with the private directory its
/// temporary mounts go to.
pub struct KernelPool {
    pool: ThinPool,
    mounts: MountDir,
}

impl KernelPool {
    /// The kernel's `pool`, mounting for a moment only in `mounts`.
    pub fn new(pool: ThinPool, mounts: MountDir) -> KernelPool {
        KernelPool { pool, mounts }
    }
}

impl Pool for KernelPool {
    fn name(&self) -> &PoolName {
        self.pool.name()
    }
    fn describe_source(&self) -> String {
        self.pool.describe_source()
    }
    fn status(&self) -> Result<PoolStatus> {
        self.pool.status()
    }
    fn status_noflush(&self) -> Result<PoolStatus> {
        self.pool.status_noflush()
    }
    fn check_writable(&self) -> Result<PoolStatus> {
        self.pool.check_writable()
    }
    fn thin_ids(&self) -> Result<BTreeSet<ThinId>> {
        self.pool.thin_ids()
    }
    fn active_thins(&self) -> Result<Vec<(ThinId, String, Device)>> {
        Ok(self
            .pool
            .active_thins()?
            .into_iter()
            .map(|(id, name, dev)| (id, name.to_string(), dev))
            .collect())
    }
    fn thin_name(&self, id: ThinId) -> String {
        self.pool.thin_name(id).to_string()
    }
    fn create_thin(&self, id: ThinId) -> Result<()> {
        self.pool.create_thin(id)
    }
    fn create_snapshot(&self, id: ThinId, origin: ThinId) -> Result<()> {
        self.pool.create_snapshot(id, origin)
    }
    fn delete_thin(&self, id: ThinId) -> Result<()> {
        self.pool.delete_thin(id)
    }
    fn activate(&self, id: ThinId, size: Sectors) -> Result<ActiveThin> {
        self.pool.activate(id, size)
    }
    fn deactivate(&self, id: ThinId, mode: RemoveMode) -> Result<()> {
        self.pool.deactivate(id, mode)
    }
    fn is_active(&self, id: ThinId) -> Result<bool> {
        self.pool.is_active(id)
    }
    fn open_count(&self, id: ThinId) -> Result<Option<u32>> {
        self.pool.open_count(id)
    }
    fn thin_usage(&self, id: ThinId) -> Result<ThinUsage> {
        self.pool.thin_usage(id)
    }
    fn read_active(&self, id: ThinId) -> Result<Option<ThinReading>> {
        self.pool.read_active(id)
    }
    fn mapping_usage(&self, what: Count) -> Result<MappingUsage> {
        self.pool.mapping_usage(what)
    }
    fn mkfs(&self, fs: FsType, dev: &Path, extra: &[String]) -> Result<()> {
        fs.mkfs(dev, extra)
    }
    fn grow_unmounted(&self, fs: FsType, dev: &Path) -> Result<()> {
        thinpool::fs::grow_unmounted(fs, dev, &self.mounts)
    }
    fn remove_lost_found(&self, fs: FsType, dev: &Path) -> Result<bool> {
        thinpool::fs::remove_lost_found(fs, dev, &self.mounts)
    }
    fn grow_mounted(&self, fs: FsType, dev: &Path, dir: &Path) -> Result<()> {
        thinpool::fs::grow_mounted(fs, dev, dir)
    }
    fn discard(&self, dev: &Path) -> Result<()> {
        thinpool::fs::discard(dev)
    }
    fn used_inodes(&self, fs: FsType, dev: &Path) -> Result<u64> {
        thinpool::fs::used_inodes(fs, dev)
    }
    fn used_inodes_at(&self, dir: &Path) -> Result<u64> {
        let s = nix::sys::statvfs::statvfs(dir)
            .map_err(|e| thinpool::Error::io("statvfs", dir, e.into()))?;
        Ok(s.files().saturating_sub(s.files_free()))
    }
    fn mount(&self, dev: &Path, dir: &Path, fs: FsType, options: &[String]) -> Result<()> {
        thinpool::fs::mount(dev, dir, fs, options)?;
        if let Err(e) = thinpool::fs::configure_mounted(fs, dev, self.mounts.xfs_enospc_retries()) {
            let _ = thinpool::fs::umount(dir);
            return Err(e);
        }
        Ok(())
    }
    fn umount(&self, dir: &Path) -> Result<()> {
        thinpool::fs::umount(dir)
    }
    fn is_mounted(&self, dir: &Path) -> Result<bool> {
        thinpool::fs::is_mounted(dir)
    }
    fn mounts_of(&self, device: Device) -> Result<Vec<PathBuf>> {
        thinpool::fs::mounts_of(device)
    }
    fn syncfs(&self, dir: &Path) -> Result<()> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(dir).map_err(|e| thinpool::Error::io("open", dir, e))?;
        // SAFETY: syncfs on a file descriptor we own.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(thinpool::Error::io(
                "syncfs",
                dir,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
    fn stale_temp_mounts(&self) -> Result<Vec<PathBuf>> {
        self.mounts.stale()
    }
    fn remove_temp_mount(&self, dir: &Path) -> Result<()> {
        self.mounts.remove(dir)
    }
    fn data_bytes(&self) -> Result<u64> {
        self.pool.data_bytes()
    }
    fn grow(&self, data_bytes: u64, meta_bytes: Option<u64>) -> Result<()> {
        self.pool.grow(data_bytes, meta_bytes)
    }
    fn set_low_water_mark(&self, blocks: DataBlocks) -> Result<()> {
        self.pool.set_low_water_mark(blocks)
    }
    fn lvm(&self) -> Option<&LvmPool> {
        self.pool.lvm()
    }
    fn kernel(&self) -> Option<&ThinPool> {
        Some(&self.pool)
    }
}
