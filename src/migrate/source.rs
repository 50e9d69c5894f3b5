//! Docker's thin pool: where it is (loopback files, an LVM thin pool, another dm pool),
//! the thinsnap configuration that reaches it, what it holds (read without changing it),
//! and Docker's devices on it that are still active.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use thinpool::{
    dm, loopback, metadata, names,
    units::{self, Sectors},
    LvmPool, PoolName, PoolOptions, Source, ThinPool,
};
use thinpool::{Device, DmNameBuf};

use super::{docker::Layout, plan::PoolView};
use thinsnap_core::config::Config;

/// Docker's pool, and how thinsnap takes it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerPool {
    /// Docker's sparse files `<root>/devicemapper/devicemapper/{data,metadata}`: thinsnap
    /// activates the pool from them under its own name (`thinsnap-<pool>-pool`), as it does
    /// for its own loopback pools, so it comes back after a reboot without Docker.
    Loopback {
        /// The directory holding `data` and `metadata`.
        dir: PathBuf,
        /// Docker's name for the pool device.
        dm_name: String,
    },
    /// An LVM thin pool (Docker's direct-lvm `docker/thinpool`): adopted as an LVM pool,
    /// which LVM activates at boot.
    Lvm {
        /// Volume group.
        vg: String,
        /// Thin-pool logical volume.
        lv: String,
        /// Its dm name.
        dm_name: String,
    },
    /// Another active thin pool Docker was given (`dm.thinpooldev`): adopted by name.
    Existing {
        /// Its dm name.
        dm_name: String,
    },
}

/// Splits an LVM dm name (`vg-lv`, hyphens inside names doubled) into VG and LV.
pub fn split_lvm_name(name: &str) -> Option<(String, String)> {
    let name = name.strip_suffix("-tpool").unwrap_or(name);
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'-' {
            if b.get(i + 1) == Some(&b'-') {
                i += 2;
                continue;
            }
            let (vg, lv) = (&name[..i], &name[i + 1..]);
            if vg.is_empty() || lv.is_empty() {
                return None;
            }
            return Some((vg.replace("--", "-"), lv.replace("--", "-")));
        }
        i += 1;
    }
    None
}

fn dm_name(s: &str) -> Result<DmNameBuf> {
    DmNameBuf::new(s.to_string()).map_err(|_| anyhow::anyhow!("{s:?} is not a dm name"))
}

impl DockerPool {
    /// Finds the pool Docker used for `layout`: `thinpooldev` if given (Docker's
    /// `dm.thinpooldev`), else its direct-lvm pool, else its loopback files.
    ///
    /// # Errors
    /// When none of these exists, or the named pool is not an active thin pool.
    pub fn find(layout: &Layout, thinpooldev: Option<&str>) -> Result<DockerPool> {
        let named = thinpooldev
            .map(|n| n.strip_prefix("/dev/mapper/").unwrap_or(n).to_string())
            .or_else(|| layout.direct_lvm.then(|| "docker-thinpool".to_string()));
        if let Some(name) = named {
            let info = dm::info(&dm_name(&name)?)?.with_context(|| {
                format!("Docker's pool {name} is not active: activate it (an LVM pool with `lvchange -ay VG/LV`) and run again")
            })?;
            let (_, ty, _) = dm::table(&dm_name(&name)?)?;
            if ty != "thin-pool" {
                bail!("dm device {name} is a {ty} device, not Docker's thin pool: pass the pool with --thinpooldev");
            }
            let lvm = info
                .uuid()
                .map(|u| u.to_string().starts_with("LVM-"))
                .unwrap_or(false);
            return Ok(match split_lvm_name(&name).filter(|_| lvm) {
                Some((vg, lv)) => DockerPool::Lvm {
                    vg,
                    lv,
                    dm_name: name,
                },
                None => DockerPool::Existing { dm_name: name },
            });
        }
        match &layout.loop_files {
            Some((data, _)) => Ok(DockerPool::Loopback {
                dir: data.parent().expect("a file in a directory").to_path_buf(),
                dm_name: layout.loop_pool_name(),
            }),
            None => bail!(
                "{} has no loopback files (devicemapper/data, devicemapper/metadata) and no direct-lvm setup: Docker used a thin pool of its own (storage option dm.thinpooldev); pass its name with --thinpooldev",
                layout.home.display()
            ),
        }
    }

    /// Docker's dm name of the pool device.
    pub fn dm_name(&self) -> &str {
        match self {
            DockerPool::Loopback { dm_name, .. }
            | DockerPool::Lvm { dm_name, .. }
            | DockerPool::Existing { dm_name } => dm_name,
        }
    }

    /// A description for reports.
    pub fn describe(&self) -> String {
        match self {
            DockerPool::Loopback { dir, dm_name } => {
                format!(
                    "loopback files in {} (Docker's pool device {dm_name})",
                    dir.display()
                )
            }
            DockerPool::Lvm { vg, lv, .. } => format!("LVM thin pool {vg}/{lv}"),
            DockerPool::Existing { dm_name } => format!("thin pool {dm_name}"),
        }
    }

    /// The pool source thinsnap's configuration needs (sizes of new loopback files are
    /// kept from `config`; they are not used for existing files).
    pub fn source(&self, config: &Config) -> Source {
        match self {
            DockerPool::Loopback { dir, .. } => {
                let (data_size, meta_size) = match &config.pool_source {
                    Source::Loopback {
                        data_size,
                        meta_size,
                        ..
                    } => (*data_size, *meta_size),
                    _ => (100 * units::GIB, 2 * units::GIB),
                };
                Source::Loopback {
                    dir: dir.clone(),
                    data_size,
                    meta_size,
                }
            }
            DockerPool::Lvm { vg, lv, .. } => Source::Lvm(LvmPool::new(vg, lv)),
            DockerPool::Existing { dm_name } => Source::Existing {
                dm_name: dm_name.clone(),
            },
        }
    }

    /// Whether `config` reaches this pool: same source (and, for loopback files, the pool's
    /// data block size, which a new pool device must repeat).
    pub fn fits(&self, config: &Config, block_size: Sectors) -> bool {
        let same = |a: &Path, b: &Path| {
            a == b
                || fs::canonicalize(a)
                    .ok()
                    .is_some_and(|a| Some(a) == fs::canonicalize(b).ok())
        };
        match (&config.pool_source, self) {
            (Source::Loopback { dir: a, .. }, DockerPool::Loopback { dir: b, .. }) => {
                same(a, b) && config.pool_options.block_size == block_size
            }
            (Source::Lvm(p), DockerPool::Lvm { vg, lv, .. }) => {
                &p.vg == vg && &p.lv == lv && p.devices.is_empty()
            }
            (Source::Existing { dm_name: a }, DockerPool::Existing { dm_name: b }) => a == b,
            _ => false,
        }
    }

    /// The configuration lines that make thinsnap use this pool.
    pub fn config_lines(
        &self,
        pool: &PoolName,
        block_size: Sectors,
        fs: thinpool::FsType,
    ) -> String {
        let mut out = format!("filesystem = \"{fs}\"\n\n[pool]\nname = \"{pool}\"\n");
        match self {
            DockerPool::Loopback { dir, .. } => {
                let kib = units::sectors_to_bytes(block_size) / units::KIB;
                out.push_str(&format!(
                    "source = \"loopback\"\nblock_size = \"{kib}K\"\n\n[pool.loopback]\ndir = {:?}\n",
                    dir.display().to_string()
                ));
            }
            DockerPool::Lvm { vg, lv, .. } => out.push_str(&format!(
                "source = \"lvm\"\n\n[pool.lvm]\nvg = {vg:?}\nlv = {lv:?}\n"
            )),
            DockerPool::Existing { dm_name } => out.push_str(&format!(
                "source = \"existing\"\n\n[pool.existing]\ndm_name = {dm_name:?}\n"
            )),
        }
        out
    }
}

/// The pool's transaction id, thin ids and data block size, read without changing it:
/// from a metadata snapshot of an active pool, or from the metadata file of a loopback
/// pool that is not active.
///
/// # Errors
/// When the pool cannot be found or its metadata read.
pub fn view(dp: &DockerPool, pool_name: &PoolName) -> Result<(PoolView, Sectors)> {
    let adopt = |name: &str| {
        ThinPool::open(
            pool_name,
            &Source::Existing {
                dm_name: name.to_string(),
            },
            &PoolOptions::default(),
        )
    };
    let live = |pool: &ThinPool| -> Result<(PoolView, Sectors)> {
        let view = PoolView {
            transaction_id: pool.transaction_id()?,
            thin_ids: pool.thin_ids()?.into_iter().map(|i| i.get()).collect(),
        };
        Ok((view, pool.block_size()))
    };
    match dp {
        DockerPool::Lvm { dm_name, .. } | DockerPool::Existing { dm_name } => {
            live(&adopt(dm_name)?)
        }
        DockerPool::Loopback { dir, dm_name } => {
            let ours = names::pool_names(pool_name).0;
            let docker_active = dm::info(&self::dm_name(dm_name)?)?.is_some();
            let ours_active = dm::info(&ours)?.is_some();
            let meta_file = dir.join("metadata");
            match (docker_active, ours_active) {
                (true, true) => bail!(
                    "both Docker's pool {dm_name} and thinsnap's {} are active: deactivate the one that does not map {}",
                    &*ours,
                    dir.display()
                ),
                (true, false) => live(&adopt(dm_name)?),
                (false, true) => {
                    // An interrupted migration activated it: make sure it maps Docker's files.
                    let pool = adopt(&ours.to_string())?;
                    let meta_dev = dm::device_of(&pool.metadata_devnode()?)?;
                    let attached = loopback::find_attached(&meta_file)?.map(|l| l.device);
                    if attached != Some(meta_dev) {
                        bail!(
                            "thinsnap's pool {} is active but does not map {}: it is another pool; choose another `pool.name`",
                            &*ours,
                            meta_file.display()
                        );
                    }
                    live(&pool)
                }
                (false, false) => {
                    let sb = metadata::read_superblock(&meta_file, 0).with_context(|| {
                        format!("cannot read Docker's pool metadata {}", meta_file.display())
                    })?;
                    let view = PoolView {
                        transaction_id: sb.transaction_id,
                        thin_ids: sb.thin_ids,
                    };
                    Ok((view, Sectors(u64::from(sb.data_block_size))))
                }
            }
        }
    }
}

/// An active dm device of Docker's.
#[derive(Debug, Clone)]
pub struct ActiveDevice {
    /// Its dm name.
    pub name: DmNameBuf,
    /// Whether it is a thin device (else the pool).
    pub thin: bool,
    /// Times it is open.
    pub open_count: i32,
    /// Where it is mounted.
    pub mounts: Vec<PathBuf>,
}

/// Docker's active dm devices: its names (`<prefix>-...`), and thin devices on its pool
/// named like Docker's.
///
/// # Errors
/// When dm cannot be queried.
pub fn active_devices(layout: &Layout, dp: &DockerPool) -> Result<Vec<ActiveDevice>> {
    let pool_dev: Option<Device> = dm::info(&dm_name(dp.dm_name())?)?.map(|i| i.device());
    let mut out = Vec::new();
    for (name, dev) in dm::list()? {
        let n = name.to_string();
        let docker_named = n.starts_with(&format!("{}-", layout.prefix));
        let Ok((_, ty, params)) = dm::table(&name) else {
            continue;
        };
        let on_pool = ty == "thin"
            && pool_dev.is_some_and(|p| {
                params.split_whitespace().next() == Some(&format!("{}:{}", p.major, p.minor))
            });
        // Docker names its thin devices `<prefix>-<hash>`; one on the pool named `docker-...`
        // with another prefix is Docker's too (its root moved). Other users' thin devices
        // of a shared pool (LVM's thin volumes) are left alone.
        if !(docker_named || on_pool && n.starts_with("docker-")) {
            continue;
        }
        let Some(info) = dm::info(&name)? else {
            continue;
        };
        out.push(ActiveDevice {
            thin: ty == "thin",
            open_count: info.open_count(),
            mounts: thinpool::fs::mounts_of(dev).unwrap_or_default(),
            name,
        });
    }
    Ok(out)
}

/// Why the migration must not touch Docker's devices now, if it must not: dockerd runs,
/// or a device of Docker's is open or mounted.
///
/// # Errors
/// When dm or /proc cannot be read.
pub fn busy(layout: &Layout, devices: &[ActiveDevice]) -> Result<Option<String>> {
    let mut why = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.trim() == "dockerd" {
                why.push(format!(
                    "dockerd is running (pid {})",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    let pool_holders = devices.iter().filter(|d| d.thin).count() as i32;
    for d in devices {
        if d.thin && (d.open_count > 0 || !d.mounts.is_empty()) {
            let at = if d.mounts.is_empty() {
                String::new()
            } else {
                format!(
                    ", mounted at {}",
                    d.mounts
                        .iter()
                        .map(|m| m.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            why.push(format!(
                "Docker's device {} is in use (open {} time(s){at})",
                &*d.name, d.open_count
            ));
        } else if !d.thin && d.open_count > pool_holders {
            why.push(format!(
                "Docker's pool {} is held by something other than its thin devices (open {} time(s))",
                &*d.name, d.open_count
            ));
        }
    }
    let mnt = layout.home.join("mnt");
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for mp in info.lines().filter_map(|l| l.split(' ').nth(4)) {
        if Path::new(mp).starts_with(&mnt) && !why.iter().any(|w| w.contains(mp)) {
            why.push(format!("{mp} is mounted"));
        }
    }
    Ok((!why.is_empty()).then(|| {
        format!(
            "{}: stop Docker and its containers first (`systemctl stop docker docker.socket`) and unmount what is mounted; nothing was changed",
            why.join("; ")
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvm_names_split() {
        assert_eq!(
            split_lvm_name("docker-thinpool"),
            Some(("docker".into(), "thinpool".into()))
        );
        assert_eq!(
            split_lvm_name("my--vg-thin--pool-tpool"),
            Some(("my-vg".into(), "thin-pool".into()))
        );
        assert_eq!(split_lvm_name("nodash"), None);
    }

    #[test]
    fn the_config_lines_parse_and_fit() {
        let dp = DockerPool::Loopback {
            dir: "/var/lib/docker/devicemapper/devicemapper".into(),
            dm_name: "docker-8:1-2-pool".into(),
        };
        let lines = dp.config_lines(
            &PoolName::new("default").unwrap(),
            Sectors(1024),
            thinpool::FsType::Xfs,
        );
        let c = Config::parse(&lines).unwrap();
        assert!(dp.fits(&c, Sectors(1024)), "{lines}");
        assert!(!dp.fits(&c, Sectors(128)), "another block size");
        assert_eq!(c.filesystem, thinpool::FsType::Xfs);
        assert!(!dp.fits(&Config::default(), Sectors(128)));

        let lvm = DockerPool::Lvm {
            vg: "docker".into(),
            lv: "thinpool".into(),
            dm_name: "docker-thinpool".into(),
        };
        let c = Config::parse(&lvm.config_lines(
            &PoolName::new("p").unwrap(),
            Sectors(1024),
            thinpool::FsType::Ext4,
        ))
        .unwrap();
        assert!(lvm.fits(&c, Sectors(1)));
        assert_eq!(lvm.source(&c), c.pool_source);

        let ex = DockerPool::Existing {
            dm_name: "mypool".into(),
        };
        let c = Config::parse(&ex.config_lines(
            &PoolName::new("p").unwrap(),
            Sectors(128),
            thinpool::FsType::Ext4,
        ))
        .unwrap();
        assert!(ex.fits(&c, Sectors(1)));
    }
}
