//! Filesystems on thin devices: mkfs (ext4 or xfs), mount and unmount with options split
//! into flags and data, and growing a filesystem after its device grew.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags},
};
use tracing::instrument;

use crate::{
    cmd,
    error::{Error, Result},
};

/// A filesystem thinsnap can put on a thin device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FsType {
    /// ext4 (the default).
    #[default]
    Ext4,
    /// xfs; snapshots must be mounted with `nouuid`.
    Xfs,
}

impl FsType {
    /// The kernel's name for the filesystem.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// Formats `dev`; `extra` options go to mkfs as they are.
    ///
    /// # Errors
    /// [`Error::Command`] when mkfs fails.
    #[instrument(level = "debug", skip(extra), fields(dev = %dev.display(), fs = self.as_str()))]
    pub fn mkfs(self, dev: &Path, extra: &[String]) -> Result<()> {
        match self {
            FsType::Ext4 => cmd::mkfs_ext4(dev, extra),
            FsType::Xfs => cmd::mkfs_xfs(dev, extra),
        }
    }

    /// Options every mount of a snapshot needs: `nouuid` for xfs, since all snapshots of a
    /// base device share its filesystem uuid.
    pub fn required_options(self) -> &'static [&'static str] {
        match self {
            FsType::Ext4 => &[],
            FsType::Xfs => &["nouuid"],
        }
    }

    /// The smallest filesystem of this type thinsnap makes: 16 MiB of ext4 (mkfs.ext4 makes
    /// smaller ones, with journals too small to be of use), 300 MiB of xfs (mkfs.xfs refuses
    /// less since xfsprogs 5.19).
    pub fn min_size(self) -> u64 {
        match self {
            FsType::Ext4 => 16 << 20,
            FsType::Xfs => 300 << 20,
        }
    }

    /// The programs this filesystem needs.
    pub fn programs(self) -> &'static [&'static str] {
        match self {
            FsType::Ext4 => &[cmd::MKFS_EXT4, cmd::RESIZE2FS],
            FsType::Xfs => &[cmd::MKFS_XFS, cmd::XFS_GROWFS],
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsType {
    type Err = Error;
    fn from_str(s: &str) -> Result<FsType> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            _ => Err(Error::invalid(
                format!("filesystem {s:?}"),
                "use \"ext4\" or \"xfs\"",
            )),
        }
    }
}

/// Splits mount options into kernel mount flags and the filesystem's data string.
///
/// Generic options such as `ro` or `noatime` are flags; passing them as data makes the
/// filesystem fail with EINVAL. Everything else (`nouuid`, `discard`, ...) is data.
pub fn split_options<S: AsRef<str>>(options: &[S]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for opt in options.iter().map(AsRef::as_ref) {
        match opt {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "suid" => flags &= !MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "dev" => flags &= !MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "exec" => flags &= !MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "async" => flags &= !MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "atime" => flags &= !MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "diratime" => flags &= !MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "norelatime" => flags &= !MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "lazytime" => flags |= MsFlags::MS_LAZYTIME,
            "silent" => flags |= MsFlags::MS_SILENT,
            "defaults" | "" => {}
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Mounts the filesystem `fs` on `dev` at `target` with `options` (see [`split_options`]).
///
/// # Errors
/// [`Error::Io`] with the kernel's errno (see `dmesg` for the filesystem's reason).
#[instrument(level = "debug", skip(options), fields(dev = %dev.display(), target = %target.display()))]
pub fn mount<S: AsRef<str>>(dev: &Path, target: &Path, fs: FsType, options: &[S]) -> Result<()> {
    let (flags, data) = split_options(options);
    nix::mount::mount(
        Some(dev),
        target,
        Some(fs.as_str()),
        flags,
        if data.is_empty() { None } else { Some(data.as_str()) },
    )
    .map_err(|e| {
        Error::io(
            "mount",
            target,
            std::io::Error::other(format!(
                "mounting {} ({fs}, options {:?}) failed: {e}; see `dmesg` for the filesystem's reason",
                dev.display(),
                options.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(",")
            )),
        )
    })
}

/// The kernel's name of block device `dev` (`dm-3`), by which `/sys/fs/<fs>/` names the
/// filesystem mounted on it.
///
/// # Errors
/// [`Error::Io`] when `dev` is not a block device the kernel knows.
pub fn kernel_name(dev: &Path) -> Result<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(dev).map_err(|e| Error::io("stat", dev, e))?;
    if !meta.file_type().is_block_device() {
        return Err(Error::invalid(
            dev.display().to_string(),
            "not a block device",
        ));
    }
    let rdev = meta.rdev();
    let link = format!(
        "/sys/dev/block/{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    let target = std::fs::read_link(&link).map_err(|e| Error::io("read link", &link, e))?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| Error::invalid(link, "no device name in the link"))
}

/// Sets how many times xfs on `dev` (mounted) retries a metadata write the device refused
/// with ENOSPC before it shuts the filesystem down: `max_retries` is -1 (forever, the
/// kernel's default), 0 (never: a thin pool out of space makes writers fail at once instead
/// of waiting for space that may never come) or a count. Returns false, changing nothing,
/// on a kernel without xfs's error configuration (before 4.7).
///
/// # Errors
/// [`Error::Io`] when the setting cannot be written.
pub fn set_xfs_enospc_retries(dev: &Path, max_retries: i32) -> Result<bool> {
    let knob = PathBuf::from(format!(
        "/sys/fs/xfs/{}/error/metadata/ENOSPC/max_retries",
        kernel_name(dev)?
    ));
    if !knob.exists() {
        return Ok(false);
    }
    std::fs::write(&knob, max_retries.to_string()).map_err(|e| Error::io("write", &knob, e))?;
    Ok(true)
}

/// After a mount of `fs` on `dev`: for xfs with `xfs_enospc_retries`, sets them (see
/// [`set_xfs_enospc_retries`]); a kernel without the setting is logged, not an error.
///
/// # Errors
/// As [`set_xfs_enospc_retries`].
pub fn configure_mounted(fs: FsType, dev: &Path, xfs_enospc_retries: Option<i32>) -> Result<()> {
    let (FsType::Xfs, Some(n)) = (fs, xfs_enospc_retries) else {
        return Ok(());
    };
    if !set_xfs_enospc_retries(dev, n)? {
        tracing::warn!(dev = %dev.display(), "this kernel has no xfs error configuration: xfs retries metadata writes on a full pool as it does by default");
    }
    Ok(())
}

/// Unmounts `target`. Not being mounted is not an error.
///
/// # Errors
/// [`Error::Busy`] while files on it are open; [`Error::Io`] otherwise.
#[instrument(level = "debug", fields(target = %target.display()))]
pub fn umount(target: &Path) -> Result<()> {
    match nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EBUSY) => Err(Error::Busy {
            device: target.display().to_string(),
            detail:
                "files on it are in use: stop the processes using it (see `fuser -m`), then retry"
                    .into(),
        }),
        Err(e) => Err(Error::io("umount", target, e.into())),
    }
}

/// Grows the filesystem on `dev`, mounted at `mountpoint`, to fill its device.
///
/// # Errors
/// [`Error::Command`] when the grow tool fails.
#[instrument(level = "debug", fields(dev = %dev.display(), fs = fs.as_str()))]
pub fn grow_mounted(fs: FsType, dev: &Path, mountpoint: &Path) -> Result<()> {
    match fs {
        FsType::Ext4 => cmd::resize2fs(dev),
        FsType::Xfs => cmd::xfs_growfs(mountpoint),
    }
}

/// Grows the unmounted filesystem on `dev` by mounting it for a moment in the private
/// mount directory `mounts`, growing it online and unmounting it again.
///
/// # Errors
/// [`Error::Io`] or [`Error::Command`] when any step fails; the temporary mount is removed.
pub fn grow_unmounted(fs: FsType, dev: &Path, mounts: &crate::MountDir) -> Result<()> {
    mounts.with_mount(
        "grow",
        dev,
        fs,
        fs.required_options(),
        "create.after-grow-mount",
        |dir| grow_mounted(fs, dev, dir),
    )
}

/// Removes the empty `lost+found` directory mkfs made in the unmounted filesystem on
/// `dev`, mounting it for a moment in the private mount directory `mounts`. Returns
/// whether there was one (one that holds anything is left alone).
///
/// # Errors
/// [`Error::Io`] when a step fails; the temporary mount is removed.
pub fn remove_lost_found(fs: FsType, dev: &Path, mounts: &crate::MountDir) -> Result<bool> {
    mounts.with_mount(
        "lost-found",
        dev,
        fs,
        fs.required_options(),
        "base.after-tidy-mount",
        crate::mountdir::remove_lost_found,
    )
}

/// Inodes in use in the unmounted filesystem on `dev`, read from its superblock (the
/// counters a clean unmount wrote).
///
/// # Errors
/// [`Error::Io`] when the device cannot be read; [`Error::Invalid`] when it holds no such
/// filesystem.
pub fn used_inodes(fs: FsType, dev: &Path) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dev).map_err(|e| Error::io("open", dev, e))?;
    let mut sb = [0u8; 1024];
    match fs {
        FsType::Ext4 => {
            f.read_exact_at(&mut sb, 1024)
                .map_err(|e| Error::io("read superblock of", dev, e))?;
            if u16::from_le_bytes([sb[56], sb[57]]) != 0xEF53 {
                return Err(Error::invalid(
                    dev.display().to_string(),
                    "no ext4 superblock",
                ));
            }
            let le =
                |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().expect("4 bytes")) as u64;
            Ok(le(0).saturating_sub(le(16)))
        }
        FsType::Xfs => {
            f.read_exact_at(&mut sb[..512], 0)
                .map_err(|e| Error::io("read superblock of", dev, e))?;
            if &sb[0..4] != b"XFSB" {
                return Err(Error::invalid(
                    dev.display().to_string(),
                    "no xfs superblock",
                ));
            }
            let be = |o: usize| u64::from_be_bytes(sb[o..o + 8].try_into().expect("8 bytes"));
            Ok(be(128).saturating_sub(be(136)))
        }
    }
}

/// Discards every block of block device `dev` (BLKDISCARD), so a thin device's blocks
/// are unmapped and, with discard passdown, returned to the pool's data device. The device
/// is opened exclusively, so a mounted or otherwise open device is never discarded.
///
/// # Errors
/// [`Error::Busy`] when the device is open elsewhere; [`Error::Io`] when it refuses.
pub fn discard(dev: &Path) -> Result<()> {
    use std::os::{fd::AsRawFd, unix::fs::OpenOptionsExt};
    nix::ioctl_write_ptr_bad!(blkdiscard, 0x1277, [u64; 2]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(dev)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => Error::Busy {
                device: dev.display().to_string(),
                detail: "it is mounted or open: unmount it first".into(),
            },
            _ => Error::io("open", dev, e),
        })?;
    let len = crate::dm::block_size_bytes(dev)?;
    let range = [0u64, len];
    // SAFETY: BLKDISCARD reads a [u64; 2] (start, length) from the pointer.
    unsafe { blkdiscard(f.as_raw_fd(), &range) }
        .map_err(|e| Error::io("discard", dev, e.into()))?;
    Ok(())
}

/// Whether `path` is a mount point (listed in `/proc/self/mountinfo`).
///
/// # Errors
/// [`Error::Io`] when mountinfo cannot be read.
pub fn is_mounted(path: &Path) -> Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read", "/proc/self/mountinfo", e))?;
    let want = path.to_string_lossy();
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape_mountinfo(mp) == want))
}

/// Mount points of block device `dev` (`major:minor`), from `/proc/self/mountinfo`.
///
/// # Errors
/// [`Error::Io`] when mountinfo cannot be read.
pub fn mounts_of(dev: devicemapper::Device) -> Result<Vec<std::path::PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read", "/proc/self/mountinfo", e))?;
    let want = format!("{}:{}", dev.major, dev.minor);
    Ok(info
        .lines()
        .filter(|l| l.split(' ').nth(2) == Some(want.as_str()))
        .filter_map(|l| l.split(' ').nth(4))
        .map(|mp| unescape_mountinfo(mp).into())
        .collect())
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_data_are_split() {
        let (flags, data) = split_options(&["ro", "noatime", "nouuid", "discard"]);
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOATIME));
        assert_eq!(data, "nouuid,discard");
        let (flags, data) = split_options::<&str>(&[]);
        assert!(flags.is_empty());
        assert!(data.is_empty());
    }

    #[test]
    fn later_options_win() {
        let (flags, _) = split_options(&["ro", "rw"]);
        assert!(!flags.contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn fs_types_parse() {
        assert_eq!("xfs".parse::<FsType>().unwrap(), FsType::Xfs);
        assert!("btrfs".parse::<FsType>().is_err());
        assert_eq!(FsType::Xfs.required_options(), &["nouuid"]);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
