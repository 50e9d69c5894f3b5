//! Docker volumes over the same pool and store as snapshots: each volume is a thin device
//! of its own, a snapshot of the base device of its filesystem (or, with `from`, of another
//! volume), grown to its size. It is mounted at `<mount_dir>/<name>` while Docker mount ids
//! hold it, and its device is active only then. Every operation follows the snapshots'
//! protocol: record the intent, change the kernel, record the result; startup recovery
//! ([`recover`]) finishes or rolls back what a crash interrupted.

mod create;
mod mount;
mod reconcile;
mod remove;
mod resize;

pub use resize::Resized;

use std::{
    collections::BTreeMap,
    hash::{DefaultHasher, Hash, Hasher},
    path::PathBuf,
    sync::MutexGuard,
};

use thinpool::{units, ActiveThin, FsType};

use super::Engine;
use crate::error::{Error, Result};
use crate::store::{State, Volume};

/// Option: the volume's size, e.g. `5G` (`docker volume create -o size=5G`).
pub const OPT_SIZE: &str = "size";
/// Option: the volume's filesystem, `ext4` or `xfs`.
pub const OPT_FS: &str = "fs";
/// Option: the volume to clone (a thin snapshot of it, taken now).
pub const OPT_FROM: &str = "from";
/// Longest accepted volume name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Checks a volume name the way Docker checks local volume names: letters, digits, `_`,
/// `.` and `-`, starting with a letter or digit. Names become directory names.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} {name:?} is not valid: use 1 to {MAX_NAME_LEN} letters, digits, '_', '.' or '-', starting with a letter or digit"
        )))
    }
}

/// The options of a Create, checked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Requested size in bytes (rounded up to a MiB).
    pub size: Option<u64>,
    /// Requested filesystem.
    pub fs: Option<FsType>,
    /// Volume to clone.
    pub from: Option<String>,
}

impl Options {
    /// Parses Docker's `Opts`. Unknown options are an error that names them.
    ///
    /// # Errors
    /// InvalidArgument for unknown options and bad values.
    pub fn parse(opts: &BTreeMap<String, String>) -> Result<Options> {
        let unknown: Vec<&str> = opts
            .keys()
            .map(String::as_str)
            .filter(|k| ![OPT_SIZE, OPT_FS, OPT_FROM].contains(k))
            .collect();
        if !unknown.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "unknown volume option(s) {}: thinsnap volumes take {OPT_SIZE} (e.g. -o size=5G), {OPT_FS} (ext4 or xfs) and {OPT_FROM} (a volume to clone)",
                unknown.join(", ")
            )));
        }
        let size = opts
            .get(OPT_SIZE)
            .map(|v| parse_volume_size(&format!("option {OPT_SIZE}={v}"), v))
            .transpose()?;
        let fs = opts
            .get(OPT_FS)
            .map(|v| {
                v.parse::<FsType>().map_err(|_| {
                    Error::InvalidArgument(format!("option {OPT_FS}={v}: use ext4 or xfs"))
                })
            })
            .transpose()?;
        let from = opts.get(OPT_FROM).cloned();
        if let Some(f) = &from {
            validate_name("volume to clone (option from)", f)?;
        }
        Ok(Options { size, fs, from })
    }
}

/// A volume's size as people type it (see [`units::parse_size`]), rounded up to a MiB;
/// `what` names it in the error.
///
/// # Errors
/// InvalidArgument saying what is wrong.
pub(crate) fn parse_volume_size(what: &str, text: &str) -> Result<u64> {
    units::parse_size(text)
        .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?
        .div_ceil(units::MIB)
        .checked_mul(units::MIB)
        .ok_or_else(|| Error::InvalidArgument(format!("{what}: far too large")))
}

/// The kernel boot this process runs in (`/proc/sys/kernel/random/boot_id`); mount ids
/// recorded in another boot are stale. Tests built with `failpoints` may pretend a reboot
/// with `THINSNAP_TEST_BOOT_ID`.
pub(crate) fn boot_id() -> String {
    #[cfg(feature = "failpoints")]
    if let Ok(id) = std::env::var("THINSNAP_TEST_BOOT_ID") {
        return id;
    }
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Engine {
    /// Where volume `name` is mounted while containers use it: `<mount_dir>/<name>`.
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.config.volumes.mount_dir.join(name)
    }

    /// The record of a volume that exists (state Ready).
    ///
    /// # Errors
    /// InvalidArgument for a bad name; NotFound when there is no such volume.
    pub fn volume(&self, name: &str) -> Result<Volume> {
        validate_name("volume name", name)?;
        match self.store.read()?.volume(name)? {
            Some(v) if v.device.state == State::Ready => Ok(v),
            _ => Err(Error::NotFound(format!("volume {name:?} does not exist"))),
        }
    }

    /// Every volume that exists, by name.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn volumes(&self) -> Result<Vec<Volume>> {
        Ok(self
            .store
            .read()?
            .volumes()?
            .into_iter()
            .filter(|v| v.device.state == State::Ready)
            .collect())
    }

    /// Where a volume is mounted, if containers hold it mounted.
    pub fn volume_mountpoint(&self, v: &Volume) -> Option<PathBuf> {
        (!v.mounts.is_empty()).then(|| self.volume_dir(&v.name))
    }

    /// Bytes mapped by a mounted volume's device (None while it is not active).
    pub fn volume_usage(&self, v: &Volume) -> Option<u64> {
        let id = v.device.thin_id;
        if !self.pool.is_active(id).ok()? {
            return None;
        }
        let u = self.pool.thin_usage(id).ok()?;
        Some(units::sectors_to_bytes(u.mapped))
    }

    /// Locks the volumes `names` (striped, in stripe order, so two callers cannot deadlock).
    fn lock_volumes(&self, names: &[&str]) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = names
            .iter()
            .map(|n| {
                let mut h = DefaultHasher::new();
                n.hash(&mut h);
                h.finish() as usize % self.volume_locks.len()
            })
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
            .into_iter()
            .map(|i| {
                self.volume_locks[i]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
            })
            .collect()
    }

    /// Mount options of a volume: the configured ones plus what its filesystem needs.
    fn volume_mount_options(&self, fs: FsType) -> Vec<String> {
        let mut o = self.config.volumes.mount_options.clone();
        o.extend(fs.required_options().iter().map(|s| s.to_string()));
        o
    }

    /// Creates the mount directory `<mount_dir>/<name>`; `mount_dir` itself is made
    /// root-only (0700), as containers see volumes through Docker's bind mounts anyway.
    fn make_volume_dir(&self, name: &str) -> Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        let root = &self.config.volumes.mount_dir;
        if !root.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(|e| thinpool::Error::io("create volume directory", root, e))?;
        }
        let dir = self.volume_dir(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
            Err(e) => Err(thinpool::Error::io("create volume mountpoint", &dir, e).into()),
        }
    }

    /// Activates volume `v`'s device and mounts it at its directory.
    fn mount_volume_dir(&self, v: &Volume) -> Result<ActiveThin> {
        let fs = v.device.fs;
        let dev = self.activate_device(v.device.thin_id, v.device.size)?;
        let dir = self.make_volume_dir(&v.name)?;
        if let Err(e) = self
            .pool
            .mount(&dev.devnode, &dir, fs, &self.volume_mount_options(fs))
        {
            let _ = std::fs::remove_dir(&dir);
            let _ = self.deactivate(dev.id, thinpool::RemoveMode::Now);
            return Err(e.into());
        }
        Ok(dev)
    }

    /// Unmounts volume `v`'s directory (if mounted) and removes it.
    ///
    /// # Errors
    /// FailedPrecondition while files on it are in use (then nothing changed).
    pub(super) fn unmount_volume_dir(&self, v: &Volume) -> Result<()> {
        let dir = self.volume_dir(&v.name);
        self.pool.umount(&dir).map_err(|e| match e {
            thinpool::Error::Busy { detail, .. } => Error::FailedPrecondition(format!(
                "cannot unmount volume {:?} from {}: {detail}",
                v.name,
                dir.display()
            )),
            e => Error::Pool(e),
        })?;
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }

    /// Unmounts volume `v`'s directory (if mounted), removes it and deactivates the
    /// device (deferred if something else still holds it open; a device that cannot be
    /// deactivated at all is left to startup recovery).
    ///
    /// # Errors
    /// As [`Engine::unmount_volume_dir`].
    fn release_volume_dir(&self, v: &Volume) -> Result<()> {
        self.unmount_volume_dir(v)?;
        let id = v.device.thin_id;
        if let Err(e) = self.deactivate(id, thinpool::RemoveMode::Now) {
            tracing::warn!(volume = %v.name, error = %e, "volume device still open; removing it when released");
            if let Err(e) = self.deactivate(id, thinpool::RemoveMode::Deferred) {
                tracing::warn!(volume = %v.name, error = %e, "cannot deactivate the volume's device; the next start will");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_are_checked_like_docker() {
        for good in ["a", "data", "my-vol_1.2", "0abc"] {
            assert!(validate_name("volume name", good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "-x", "a/b", "a b", "_x", &"x".repeat(256)] {
            let e = validate_name("volume name", bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}");
        }
    }

    #[test]
    fn options_parse_and_unknown_ones_are_named() {
        assert_eq!(Options::parse(&opts(&[])).unwrap(), Options::default());
        let o = Options::parse(&opts(&[("size", "5G"), ("fs", "xfs"), ("from", "src")])).unwrap();
        assert_eq!(o.size, Some(5 * units::GIB));
        assert_eq!(o.fs, Some(FsType::Xfs));
        assert_eq!(o.from.as_deref(), Some("src"));
        assert_eq!(
            Options::parse(&opts(&[("size", "1000K")])).unwrap().size,
            Some(units::MIB),
            "rounded up to a MiB"
        );
        for (text, bytes) in [
            ("1G", units::GIB),
            ("1GB", units::GIB),
            ("1GiB", units::GIB),
            ("512m", 512 * units::MIB),
            ("200M", 200 * units::MIB),
            ("50G", 50 * units::GIB),
        ] {
            let o = Options::parse(&opts(&[("size", text)])).unwrap();
            assert_eq!(o.size, Some(bytes), "size={text}");
        }
        for (text, why) in [
            ("0", "more than zero"),
            ("-1G", "cannot be negative"),
            ("1X", "unknown unit"),
        ] {
            let e = Options::parse(&opts(&[("size", text)])).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.contains(&format!("option size={text}")) && m.contains(why)),
                "size={text}: {e}"
            );
        }
        let e = Options::parse(&opts(&[("sise", "5G"), ("type", "x")])).unwrap_err();
        assert!(e.to_string().contains("sise, type"), "{e}");
        for (k, v) in [("size", "lots"), ("fs", "btrfs"), ("from", "../etc")] {
            let e = Options::parse(&opts(&[(k, v)])).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{k}={v}: {e}");
        }
    }
}
