//! LVM thin pools ("direct-lvm"): create one on block devices (PV, VG, thin-pool LV with an
//! autoextend profile) or adopt an existing `VG/LV`. LVM's tools manage LVM's metadata;
//! thin devices inside the pool are still created through dm messages.

use std::path::PathBuf;

use tracing::{info, instrument};

use crate::{
    cmd, dm,
    error::{Error, Hint, Result},
    names,
    options::PoolOptions,
    units::{self, GIB, MIB},
};

/// Name of the LVM metadata profile thinsnap installs for its pools.
pub const PROFILE: &str = "thinsnap-thinpool";
const PROFILE_DIR: &str = "/etc/lvm/profile";

/// An LVM thin pool `vg/lv`, and how to create it if it does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvmPool {
    /// Volume group.
    pub vg: String,
    /// Thin-pool logical volume.
    pub lv: String,
    /// Block devices to create the volume group on when it does not exist. Empty: the
    /// pool must already exist (or the VG must, with free space for a new pool).
    pub devices: Vec<PathBuf>,
    /// Share of the volume group's space for pool data, in percent (metadata and LVM's spare
    /// metadata volume take about 1% each).
    pub data_percent: u8,
    /// Metadata size in bytes; `None`: 1% of the volume group, at least 64 MiB, at most 16 GiB.
    pub meta_size: Option<u64>,
    /// Autoextend threshold and step, in percent, written to the pool's LVM profile
    /// (LVM's dmeventd grows the pool when it is this full).
    pub autoextend: Option<(u8, u8)>,
}

impl LvmPool {
    /// An LVM pool `vg/lv` with default creation settings.
    pub fn new(vg: &str, lv: &str) -> LvmPool {
        LvmPool {
            vg: vg.into(),
            lv: lv.into(),
            devices: Vec::new(),
            data_percent: 95,
            meta_size: None,
            autoextend: Some((80, 20)),
        }
    }

    fn path(&self) -> String {
        format!("{}/{}", self.vg, self.lv)
    }

    fn segtype(&self) -> Result<Option<String>> {
        match cmd::lvm(&["lvs", "--noheadings", "-o", "segtype", &self.path()]) {
            Ok(out) => Ok(Some(out.trim().to_string())),
            Err(Error::Command { stderr, .. })
                if stderr.contains("not found") || stderr.contains("Failed to find") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The LVM metadata profile attached to the pool's LV, if any (LVM autoextends a pool
    /// whose profile sets `thin_pool_autoextend_threshold` under 100, as [`PROFILE`] does).
    ///
    /// # Errors
    /// [`Error::Command`] when `lvs` fails.
    pub fn metadata_profile(&self) -> Result<Option<String>> {
        let out = cmd::lvm(&[
            "lvs",
            "--noheadings",
            "-o",
            "lv_metadata_profile",
            &self.path(),
        ])?;
        let p = out.trim();
        Ok((!p.is_empty()).then(|| p.to_string()))
    }

    fn vg_exists(&self) -> Result<bool> {
        match cmd::lvm(&["vgs", "--noheadings", "-o", "vg_name", &self.vg]) {
            Ok(_) => Ok(true),
            Err(Error::Command { stderr, .. }) if stderr.contains("not found") => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn vg_bytes(&self) -> Result<u64> {
        let out = cmd::lvm(&[
            "vgs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_size",
            &self.vg,
        ])?;
        out.trim()
            .parse()
            .map_err(|_| Error::invalid(format!("size of VG {}", self.vg), out.trim().to_string()))
    }

    fn write_profile(&self) -> Result<()> {
        let Some((threshold, percent)) = self.autoextend else {
            return Ok(());
        };
        let dir = std::path::Path::new(PROFILE_DIR);
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
        let path = dir.join(format!("{PROFILE}.profile"));
        let text = format!(
            "# Written by thinsnap: grow thin pools when they are {threshold}% full, by {percent}%.\nactivation {{\n\tthin_pool_autoextend_threshold = {threshold}\n\tthin_pool_autoextend_percent = {percent}\n}}\n"
        );
        std::fs::write(&path, text).map_err(|e| Error::io("write", &path, e))
    }

    #[instrument(level = "info", skip(self, opts), fields(pool = %self.path()))]
    fn create(&self, opts: &PoolOptions) -> Result<()> {
        if !self.vg_exists()? {
            if self.devices.is_empty() {
                return Err(Error::NotFound {
                    what: format!("LVM volume group {}", self.vg),
                    hint: Hint(Some(
                        "create it, or name the block devices to create it on (pool.lvm.devices)",
                    )),
                });
            }
            let devs: Vec<String> = self
                .devices
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            let mut args = vec!["pvcreate", "-y"];
            args.extend(devs.iter().map(String::as_str));
            cmd::lvm(&args)?;
            let mut args = vec!["vgcreate", self.vg.as_str()];
            args.extend(devs.iter().map(String::as_str));
            cmd::lvm(&args)?;
            info!(vg = %self.vg, devices = ?devs, "created volume group");
        }
        self.write_profile()?;
        let meta = self
            .meta_size
            .unwrap_or_else(|| (self.vg_bytes().unwrap_or(0) / 100).clamp(64 * MIB, 16 * GIB));
        let meta_arg = format!("{}b", meta / MIB * MIB);
        let chunk = format!("{}k", units::sectors_to_bytes(opts.block_size) / 1024);
        let percent = format!("{}%VG", self.data_percent.clamp(1, 97));
        let zero = if opts.zero_new_blocks { "y" } else { "n" };
        let full = if opts.error_if_no_space { "y" } else { "n" };
        let discards = if opts.discard_passdown {
            "passdown"
        } else {
            "nopassdown"
        };
        let mut args = vec![
            "lvcreate",
            "--yes",
            "--type",
            "thin-pool",
            "-l",
            &percent,
            "--poolmetadatasize",
            &meta_arg,
            "--chunksize",
            &chunk,
            "--zero",
            zero,
            "--discards",
            discards,
            "-n",
            &self.lv,
        ];
        if self.autoextend.is_some() {
            args.extend(["--metadataprofile", PROFILE]);
        }
        args.push(&self.vg);
        cmd::lvm(&args)?;
        // lvcreate does not take --errorwhenfull for thin pools; lvchange does.
        cmd::lvm(&["lvchange", "--errorwhenfull", full, &self.path()])?;
        info!(metadata = %units::format_size(meta), "created LVM thin pool");
        Ok(())
    }

    /// Creates the pool if needed, activates it, and returns the dm name of its thin-pool
    /// device.
    pub(crate) fn open(&self, opts: &PoolOptions) -> Result<String> {
        match self.segtype()? {
            Some(t) if t == "thin-pool" => {}
            Some(t) => {
                return Err(Error::invalid(
                    format!("LVM volume {}", self.path()),
                    format!("it is a {t} volume, not a thin-pool"),
                ))
            }
            None => self.create(opts)?,
        }
        cmd::lvm(&["lvchange", "-ay", &self.path()])?;
        let base = names::lvm_dm_name(&self.vg, &self.lv);
        for candidate in [format!("{base}-tpool"), base.clone()] {
            let Ok(name) = devicemapper::DmNameBuf::new(candidate.clone()) else {
                continue;
            };
            if dm::info(&name)?.is_some() && dm::table(&name)?.1 == "thin-pool" {
                return Ok(candidate);
            }
        }
        Err(Error::NotFound {
            what: format!("active thin-pool device of {}", self.path()),
            hint: Hint(Some("`lvchange -ay` did not activate it; see `lvs -a`")),
        })
    }

    fn lv_bytes(&self, lv: &str) -> Result<u64> {
        let out = cmd::lvm(&[
            "lvs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "lv_size",
            &format!("{}/{lv}", self.vg),
        ])?;
        out.trim().parse().map_err(|_| {
            Error::invalid(format!("size of {}/{lv}", self.vg), out.trim().to_string())
        })
    }

    /// Extends the pool's data to `data_bytes` and its metadata to `meta_bytes`.
    pub(crate) fn grow(&self, data_bytes: u64, meta_bytes: Option<u64>) -> Result<()> {
        let cur = self.lv_bytes(&self.lv)?;
        if data_bytes < cur {
            return Err(Error::invalid(
                format!("new data size {}", units::format_size(data_bytes)),
                format!(
                    "the pool already has {}; pools cannot shrink",
                    units::format_size(cur)
                ),
            ));
        }
        if data_bytes > cur {
            cmd::lvm(&["lvextend", "-L", &format!("{data_bytes}b"), &self.path()])?;
        }
        if let Some(m) = meta_bytes {
            let cur = self.lv_bytes(&format!("[{}_tmeta]", self.lv)).unwrap_or(0);
            if m > cur {
                cmd::lvm(&[
                    "lvextend",
                    "--poolmetadatasize",
                    &format!("{m}b"),
                    &self.path(),
                ])?;
            }
        }
        info!(pool = %self.path(), data = %units::format_size(data_bytes), "grew LVM thin pool");
        Ok(())
    }

    /// Removes the thin-pool logical volume (the volume group and PVs stay).
    pub(crate) fn remove(&self) -> Result<()> {
        cmd::lvm(&["lvremove", "-y", &self.path()]).map(|_| ())
    }
}
