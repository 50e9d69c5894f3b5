//! A thin pool in memory, for tests of the engine without a kernel: thin ids, snapshots,
//! activation, mounts and filesystems follow device-mapper's rules (an id exists once, a
//! mounted device cannot be deactivated or discarded, deleting an absent id is not an
//! error), and any step can be made to fail once. Clones share one pool, so a test can
//! drop an engine mid-operation, as a crash would, and open another on the same pool.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use nix::errno::Errno;
use thinpool::{
    units, ActiveThin, Count, DataBlocks, Device, DeviceBlocks, DmNameBuf, Error, FsType, Hint,
    LvmPool, MappingUsage, PoolMode, PoolName, PoolStatus, RemoveMode, Result, Sectors, ThinId,
    ThinPool, ThinReading, ThinUsage,
};

use super::pool::Pool;

/// Bytes a fresh filesystem maps on its device.
const MKFS_BYTES: u64 = 64 << 20;

/// A simulated thin pool; clones share it.
#[derive(Clone)]
pub struct SimPool {
    name: PoolName,
    sim: Arc<Mutex<Sim>>,
}

#[derive(Debug, Clone, Default)]
struct Thin {
    /// Bytes mapped.
    mapped: u64,
    /// Bytes of those no other device maps: the sim's model of sharing is that a
    /// snapshot shares everything its origin mapped, and only mkfs writes.
    own: u64,
    /// The filesystem on it, if one was made.
    fs: Option<FsType>,
    /// Whether its filesystem has the `lost+found` mkfs.ext4 makes.
    lost_found: bool,
    /// Size of its filesystem in bytes: what the device had when it was made or last
    /// grown. A device activated smaller than its filesystem cannot be mounted.
    fs_size: u64,
}

#[derive(Debug)]
struct Sim {
    thins: BTreeMap<ThinId, Thin>,
    /// Active devices: id → (minor, size).
    active: BTreeMap<ThinId, (u32, Sectors)>,
    /// Deactivations deferred until the device is released.
    deferred: BTreeSet<ThinId>,
    /// Mount directory → device.
    mounts: BTreeMap<PathBuf, ThinId>,
    next_minor: u32,
    data_total: u64,
    meta_total: u64,
    mode: PoolMode,
    /// Steps that fail the next time they run.
    faults: BTreeMap<&'static str, Errno>,
    /// Every step run, in order (for tests that count kernel work).
    log: Vec<String>,
    /// Readings of the mapping trees ([`Pool::mapping_usage`]) so far.
    mapping_reads: u64,
}

impl SimPool {
    /// An empty pool named `name` with 100 GiB of data space.
    pub fn new(name: &str) -> SimPool {
        SimPool {
            name: PoolName::new(name).expect("a valid pool name"),
            sim: Arc::new(Mutex::new(Sim {
                thins: BTreeMap::new(),
                active: BTreeMap::new(),
                deferred: BTreeSet::new(),
                mounts: BTreeMap::new(),
                next_minor: 0,
                data_total: 100 << 30,
                meta_total: 2 << 30,
                mode: PoolMode::ReadWrite,
                faults: BTreeMap::new(),
                log: Vec::new(),
                mapping_reads: 0,
            })),
        }
    }

    fn sim(&self) -> MutexGuard<'_, Sim> {
        self.sim.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes step `op` (a [`Pool`] method's name) fail once with `errno`.
    pub fn fail_next(&self, op: &'static str, errno: Errno) {
        self.sim().faults.insert(op, errno);
    }

    /// Puts the pool in `mode` (e.g. read-only after a metadata error).
    pub fn set_mode(&self, mode: PoolMode) {
        self.sim().mode = mode;
    }

    /// Creates thin device `id` behind the engine's back, as another tool sharing the
    /// pool would.
    pub fn create_foreign(&self, id: ThinId, mapped: u64) {
        let old = self.sim().thins.insert(
            id,
            Thin {
                mapped,
                ..Thin::default()
            },
        );
        assert!(old.is_none(), "thin id {id} exists already");
    }

    /// Writes `bytes` of new data to thin device `id`: blocks it provisions itself.
    pub fn write(&self, id: ThinId, bytes: u64) {
        let mut s = self.sim();
        let t = s
            .thins
            .get_mut(&id)
            .expect("writes go to devices that exist");
        t.mapped += bytes;
        t.own += bytes;
    }

    /// How many times the mapping trees were read (for tests of the engine's cache).
    pub fn mapping_reads(&self) -> u64 {
        self.sim().mapping_reads
    }

    /// Whether the pool holds thin id `id`.
    pub fn holds(&self, id: ThinId) -> bool {
        self.sim().thins.contains_key(&id)
    }

    /// Whether the filesystem on thin device `id` has mkfs.ext4's `lost+found`.
    pub fn has_lost_found(&self, id: ThinId) -> bool {
        self.sim().thins.get(&id).is_some_and(|t| t.lost_found)
    }

    /// Gives the filesystem on thin device `id` a `lost+found` again (a base device made
    /// by an earlier version).
    pub fn add_lost_found(&self, id: ThinId) {
        if let Some(t) = self.sim().thins.get_mut(&id) {
            t.lost_found = true;
        }
    }

    /// The size of the filesystem on thin device `id` (0 without one).
    pub fn fs_size(&self, id: ThinId) -> u64 {
        self.sim().thins.get(&id).map_or(0, |t| t.fs_size)
    }

    /// The active thin ids.
    pub fn active_ids(&self) -> BTreeSet<ThinId> {
        self.sim().active.keys().copied().collect()
    }

    /// Every mount: directory → thin id.
    pub fn mount_table(&self) -> BTreeMap<PathBuf, ThinId> {
        self.sim().mounts.clone()
    }

    /// The steps run so far, each `op id`.
    pub fn log(&self) -> Vec<String> {
        self.sim().log.clone()
    }

    /// Runs step `op` on the pool: records it, or fails it once if a fault is set.
    fn step<T>(
        &self,
        op: &'static str,
        detail: String,
        f: impl FnOnce(&mut Sim) -> Result<T>,
    ) -> Result<T> {
        let mut s = self.sim();
        s.log.push(format!("{op} {detail}").trim_end().to_string());
        if let Some(errno) = s.faults.remove(op) {
            return Err(Error::Dm {
                device: self.name.to_string(),
                op,
                errno: Some(errno),
                detail: format!("injected failure: {errno}"),
                hint: Hint(None),
            });
        }
        f(&mut s)
    }

    fn no_thin(&self, op: &'static str, id: ThinId) -> Error {
        Error::Dm {
            device: self.thin_name(id),
            op,
            errno: Some(Errno::ENODATA),
            detail: format!("thin id {id} does not exist"),
            hint: Hint(None),
        }
    }

    fn dev_of(s: &Sim, dev: &Path) -> Result<ThinId> {
        let minor: u32 = dev
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("dm-"))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                Error::invalid(format!("device {}", dev.display()), "not a sim device")
            })?;
        s.active
            .iter()
            .find(|(_, (m, _))| *m == minor)
            .map(|(id, _)| *id)
            .ok_or_else(|| Error::io("open", dev, std::io::Error::from_raw_os_error(libc::ENXIO)))
    }

    fn busy(&self, id: ThinId, dirs: &[&PathBuf]) -> Error {
        Error::Busy {
            device: self.thin_name(id),
            detail: format!(
                "it is mounted at {}: unmount it first",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The size in bytes active device `id` has.
    fn active_bytes(s: &Sim, id: ThinId) -> u64 {
        s.active
            .get(&id)
            .map_or(0, |(_, size)| units::sectors_to_bytes(*size))
    }

    /// Grows the filesystem on active device `id` to fill it.
    fn grow_fs(s: &mut Sim, id: ThinId) {
        let size = Self::active_bytes(s, id);
        if let Some(t) = s.thins.get_mut(&id) {
            t.fs_size = t.fs_size.max(size);
        }
    }

    fn mounted_dirs(s: &Sim, id: ThinId) -> Vec<&PathBuf> {
        s.mounts
            .iter()
            .filter(|(_, d)| **d == id)
            .map(|(p, _)| p)
            .collect()
    }

    fn used(s: &Sim) -> u64 {
        s.thins
            .values()
            .map(|t| t.mapped)
            .sum::<u64>()
            .min(s.data_total)
    }
}

impl Pool for SimPool {
    fn name(&self) -> &PoolName {
        &self.name
    }

    fn describe_source(&self) -> String {
        "a simulated pool (in memory)".into()
    }

    fn status(&self) -> Result<PoolStatus> {
        let s = self.sim();
        let block = units::bytes_to_sectors(64 << 10);
        let blocks = |bytes: u64| DataBlocks(bytes / (64 << 10));
        Ok(PoolStatus {
            transaction_id: 0,
            data_used: blocks(Self::used(&s)),
            data_total: blocks(s.data_total),
            meta_used: thinpool::units::MetaBlocks(s.thins.len() as u64 + 64),
            meta_total: thinpool::units::MetaBlocks(s.meta_total / 4096),
            block_size: block,
            mode: s.mode,
            needs_check: false,
            low_water_mark: DataBlocks(0),
            held_metadata_root: None,
        })
    }

    fn status_noflush(&self) -> Result<PoolStatus> {
        self.status()
    }

    fn check_writable(&self) -> Result<PoolStatus> {
        let st = self.status()?;
        match st.mode {
            PoolMode::ReadWrite => Ok(st),
            PoolMode::OutOfDataSpace => Err(Error::NoSpace {
                pool: self.name.to_string(),
                detail: "simulated".into(),
            }),
            m => Err(Error::Degraded {
                pool: self.name.to_string(),
                mode: m.to_string(),
                hint: "simulated",
            }),
        }
    }

    fn thin_ids(&self) -> Result<BTreeSet<ThinId>> {
        self.step("thin_ids", String::new(), |s| {
            Ok(s.thins.keys().copied().collect())
        })
    }

    fn active_thins(&self) -> Result<Vec<(ThinId, String, Device)>> {
        let s = self.sim();
        Ok(s.active
            .iter()
            .map(|(id, (minor, _))| {
                (
                    *id,
                    self.thin_name(*id),
                    Device {
                        major: 253,
                        minor: *minor,
                    },
                )
            })
            .collect())
    }

    fn thin_name(&self, id: ThinId) -> String {
        format!("thinsnap-{}-{id}", self.name)
    }

    fn create_thin(&self, id: ThinId) -> Result<()> {
        self.step("create_thin", id.to_string(), |s| {
            if s.thins.contains_key(&id) {
                return Err(Error::AlreadyExists {
                    what: format!("thin id {id}"),
                });
            }
            s.thins.insert(id, Thin::default());
            Ok(())
        })
    }

    fn create_snapshot(&self, id: ThinId, origin: ThinId) -> Result<()> {
        self.step("create_snapshot", format!("{id} {origin}"), |s| {
            if s.thins.contains_key(&id) {
                return Err(Error::AlreadyExists {
                    what: format!("thin id {id}"),
                });
            }
            let o = s
                .thins
                .get(&origin)
                .cloned()
                .ok_or_else(|| self.no_thin("create_snap", origin))?;
            s.thins.insert(id, Thin { own: 0, ..o });
            Ok(())
        })
    }

    fn delete_thin(&self, id: ThinId) -> Result<()> {
        self.deactivate(id, RemoveMode::Now)?;
        self.step("delete_thin", id.to_string(), |s| {
            s.thins.remove(&id);
            Ok(())
        })
    }

    fn activate(&self, id: ThinId, size: Sectors) -> Result<ActiveThin> {
        self.step("activate", id.to_string(), |s| {
            if !s.thins.contains_key(&id) {
                return Err(self.no_thin("table_load", id));
            }
            let minor = match s.active.get(&id) {
                Some((m, _)) => *m,
                None => {
                    s.next_minor += 1;
                    s.next_minor
                }
            };
            s.active.insert(id, (minor, size));
            s.deferred.remove(&id);
            Ok(ActiveThin {
                id,
                name: DmNameBuf::new(self.thin_name(id)).expect("a valid dm name"),
                device: Device { major: 253, minor },
                devnode: PathBuf::from(format!("/dev/sim/dm-{minor}")),
                size,
            })
        })
    }

    fn deactivate(&self, id: ThinId, mode: RemoveMode) -> Result<()> {
        self.step("deactivate", id.to_string(), |s| {
            if !s.active.contains_key(&id) {
                return Ok(());
            }
            let dirs = Self::mounted_dirs(s, id);
            if !dirs.is_empty() {
                if mode == RemoveMode::Deferred {
                    s.deferred.insert(id);
                    return Ok(());
                }
                return Err(self.busy(id, &dirs));
            }
            s.active.remove(&id);
            Ok(())
        })
    }

    fn is_active(&self, id: ThinId) -> Result<bool> {
        Ok(self.sim().active.contains_key(&id))
    }

    fn open_count(&self, id: ThinId) -> Result<Option<u32>> {
        let s = self.sim();
        Ok(s.active
            .contains_key(&id)
            .then(|| Self::mounted_dirs(&s, id).len() as u32))
    }

    fn thin_usage(&self, id: ThinId) -> Result<ThinUsage> {
        let s = self.sim();
        if !s.active.contains_key(&id) {
            return Err(Error::NotFound {
                what: self.thin_name(id),
                hint: Hint(None),
            });
        }
        let mapped = s.thins.get(&id).map_or(0, |t| t.mapped);
        Ok(ThinUsage {
            mapped: units::bytes_to_sectors(mapped),
            highest: None,
        })
    }

    fn read_active(&self, id: ThinId) -> Result<Option<ThinReading>> {
        let s = self.sim();
        let Some(&(minor, _)) = s.active.get(&id) else {
            return Ok(None);
        };
        let mapped = s.thins.get(&id).map_or(0, |t| t.mapped);
        Ok(Some(ThinReading {
            device: Device { major: 253, minor },
            devnode: PathBuf::from(format!("/dev/sim/dm-{minor}")),
            open_count: Self::mounted_dirs(&s, id).len() as u32,
            usage: ThinUsage {
                mapped: units::bytes_to_sectors(mapped),
                highest: None,
            },
        }))
    }

    fn mapping_usage(&self, _what: Count) -> Result<MappingUsage> {
        let mut s = self.sim();
        s.mapping_reads += 1;
        const BLOCK: u64 = 64 * 1024;
        Ok(MappingUsage {
            transaction_id: 0,
            data_block_size: (BLOCK / 512) as u32,
            devices: s
                .thins
                .iter()
                .map(|(id, t)| {
                    (
                        id.get(),
                        DeviceBlocks {
                            mapped: t.mapped.div_ceil(BLOCK),
                            exclusive: t.own.div_ceil(BLOCK),
                            owned: t.own.div_ceil(BLOCK),
                        },
                    )
                })
                .collect(),
            nodes_read: s.thins.len() as u64,
            reads: 1,
        })
    }

    fn mkfs(&self, fs: FsType, dev: &Path, _extra: &[String]) -> Result<()> {
        self.step("mkfs", dev.display().to_string(), |s| {
            let id = Self::dev_of(s, dev)?;
            let size = Self::active_bytes(s, id);
            let t = s.thins.get_mut(&id).expect("active devices exist");
            t.fs = Some(fs);
            t.lost_found = fs == FsType::Ext4;
            t.mapped = MKFS_BYTES;
            t.own = MKFS_BYTES;
            t.fs_size = size;
            Ok(())
        })
    }

    fn grow_unmounted(&self, _fs: FsType, dev: &Path) -> Result<()> {
        self.step("grow_unmounted", dev.display().to_string(), |s| {
            let id = Self::dev_of(s, dev)?;
            Self::grow_fs(s, id);
            Ok(())
        })
    }

    fn remove_lost_found(&self, _fs: FsType, dev: &Path) -> Result<bool> {
        self.step("remove_lost_found", dev.display().to_string(), |s| {
            let id = Self::dev_of(s, dev)?;
            let t = s.thins.get_mut(&id).expect("active devices exist");
            if t.fs.is_none() {
                return Err(Error::invalid(
                    format!("{}", dev.display()),
                    "no filesystem on it",
                ));
            }
            Ok(std::mem::take(&mut t.lost_found))
        })
    }

    fn grow_mounted(&self, _fs: FsType, dev: &Path, dir: &Path) -> Result<()> {
        self.step("grow_mounted", dev.display().to_string(), |s| {
            let id = Self::dev_of(s, dev)?;
            if s.mounts.get(dir) != Some(&id) {
                return Err(Error::invalid(
                    format!("{}", dir.display()),
                    "the device is not mounted there",
                ));
            }
            Self::grow_fs(s, id);
            Ok(())
        })
    }

    fn discard(&self, dev: &Path) -> Result<()> {
        self.step("discard", dev.display().to_string(), |s| {
            let id = Self::dev_of(s, dev)?;
            let dirs = Self::mounted_dirs(s, id);
            if !dirs.is_empty() {
                return Err(self.busy(id, &dirs));
            }
            if let Some(t) = s.thins.get_mut(&id) {
                t.mapped = 0;
                t.own = 0;
            }
            Ok(())
        })
    }

    fn used_inodes(&self, _fs: FsType, dev: &Path) -> Result<u64> {
        let s = self.sim();
        Self::dev_of(&s, dev).map(|_| 11)
    }

    fn used_inodes_at(&self, dir: &Path) -> Result<u64> {
        match self.sim().mounts.contains_key(dir) {
            true => Ok(11),
            false => Err(Error::io(
                "statvfs",
                dir,
                std::io::Error::from_raw_os_error(libc::ENOENT),
            )),
        }
    }

    fn mount(&self, dev: &Path, dir: &Path, _fs: FsType, _options: &[String]) -> Result<()> {
        self.step("mount", dir.display().to_string(), |s| {
            let id = Self::dev_of(s, dev)?;
            let Some(t) = s.thins.get(&id).filter(|t| t.fs.is_some()) else {
                return Err(Error::invalid(
                    format!("{}", dev.display()),
                    "no filesystem on it",
                ));
            };
            let size = Self::active_bytes(s, id);
            if t.fs_size > size {
                return Err(Error::invalid(
                    format!("{}", dev.display()),
                    format!(
                        "its filesystem ({} bytes) is larger than the device ({size} bytes)",
                        t.fs_size
                    ),
                ));
            }
            s.mounts.insert(dir.to_path_buf(), id);
            Ok(())
        })
    }

    fn umount(&self, dir: &Path) -> Result<()> {
        self.step("umount", dir.display().to_string(), |s| {
            if let Some(id) = s.mounts.remove(dir) {
                if s.deferred.contains(&id) && Self::mounted_dirs(s, id).is_empty() {
                    s.deferred.remove(&id);
                    s.active.remove(&id);
                }
            }
            Ok(())
        })
    }

    fn is_mounted(&self, dir: &Path) -> Result<bool> {
        Ok(self.sim().mounts.contains_key(dir))
    }

    fn mounts_of(&self, device: Device) -> Result<Vec<PathBuf>> {
        let s = self.sim();
        Ok(s.mounts
            .iter()
            .filter(|(_, id)| s.active.get(id).is_some_and(|(m, _)| *m == device.minor))
            .map(|(p, _)| p.clone())
            .collect())
    }

    fn syncfs(&self, dir: &Path) -> Result<()> {
        self.step("syncfs", dir.display().to_string(), |_| Ok(()))
    }

    fn stale_temp_mounts(&self) -> Result<Vec<PathBuf>> {
        Ok(Vec::new())
    }

    fn remove_temp_mount(&self, dir: &Path) -> Result<()> {
        self.umount(dir)
    }

    fn data_bytes(&self) -> Result<u64> {
        Ok(self.sim().data_total)
    }

    fn grow(&self, data_bytes: u64, meta_bytes: Option<u64>) -> Result<()> {
        self.step("grow", data_bytes.to_string(), |s| {
            s.data_total = s.data_total.max(data_bytes);
            if let Some(m) = meta_bytes {
                s.meta_total = s.meta_total.max(m);
            }
            Ok(())
        })
    }

    fn set_low_water_mark(&self, _blocks: DataBlocks) -> Result<()> {
        Ok(())
    }

    fn lvm(&self) -> Option<&LvmPool> {
        None
    }

    fn kernel(&self) -> Option<&ThinPool> {
        None
    }
}
