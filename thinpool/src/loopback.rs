//! Loop devices over sparse files: attach (reusing an existing attachment of the same
//! file, so a restarted daemon re-adopts it), grow, detach. Direct I/O is enabled where
//! the backing filesystem allows it, so the pool's data is not cached twice.

use std::{
    fs,
    path::{Path, PathBuf},
};

use devicemapper::Device;
use loopdev::{LoopControl, LoopDevice};
use tracing::{debug, instrument, warn};

use crate::{
    dm,
    error::{Error, Result},
};

/// A loop device attached to a backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopFile {
    /// The backing file.
    pub file: PathBuf,
    /// The loop device node, e.g. `/dev/loop3`.
    pub dev_path: PathBuf,
    /// The loop device's number.
    pub device: Device,
}

/// Creates a sparse file of `size` bytes at `path` (which must not exist), mode 0600.
///
/// # Errors
/// [`Error::AlreadyExists`] when `path` exists; [`Error::Io`] on failure.
pub fn create_sparse(path: &Path, size: u64) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::AlreadyExists {
                    what: format!("file {}", path.display()),
                }
            } else {
                Error::io("create", path, e)
            }
        })?;
    f.set_len(size).map_err(|e| Error::io("resize", path, e))?;
    f.sync_all().map_err(|e| Error::io("sync", path, e))
}

/// The loop device `file` is attached to, if any (from `/sys/block/loop*/loop/backing_file`).
///
/// # Errors
/// [`Error::Io`] when `file` cannot be resolved.
pub fn find_attached(file: &Path) -> Result<Option<LoopFile>> {
    let file = fs::canonicalize(file).map_err(|e| Error::io("resolve", file, e))?;
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Ok(None);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(backing.trim_end()) == file {
            let dev_path = PathBuf::from("/dev").join(&name);
            let device = read_dev(&entry.path().join("dev"))?;
            return Ok(Some(LoopFile {
                file,
                dev_path,
                device,
            }));
        }
    }
    Ok(None)
}

fn read_dev(path: &Path) -> Result<Device> {
    let s = fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    dm::parse_device(s.trim())
}

/// Attaches `file` to a free loop device, or returns its existing attachment.
///
/// Direct I/O is turned on when `direct_io` is set and the backing filesystem supports it.
///
/// # Errors
/// [`Error::Io`] when no loop device can be had (is the `loop` module loaded?).
#[instrument(level = "debug", fields(file = %file.display()))]
pub fn attach(file: &Path, direct_io: bool) -> Result<LoopFile> {
    if let Some(existing) = find_attached(file)? {
        debug!(dev = %existing.dev_path.display(), "already attached");
        return Ok(existing);
    }
    let ctl = LoopControl::open().map_err(|e| {
        Error::io(
            "open",
            "/dev/loop-control",
            std::io::Error::other(format!("{e} (is the loop module loaded?)")),
        )
    })?;
    // Another process may take the free device between next_free and attach: retry.
    let mut last = None;
    for _ in 0..8 {
        let ld = ctl
            .next_free()
            .map_err(|e| Error::io("find a free loop device for", file, e))?;
        match ld.with().autoclear(false).attach(file) {
            Ok(()) => return finish_attach(file, &ld, direct_io),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
            Err(e) => return Err(Error::io("attach loop device to", file, e)),
        }
    }
    Err(Error::io(
        "attach loop device to",
        file,
        last.unwrap_or_else(|| std::io::Error::other("no free loop device")),
    ))
}

fn finish_attach(file: &Path, ld: &LoopDevice, direct_io: bool) -> Result<LoopFile> {
    let dev_path = ld
        .path()
        .ok_or_else(|| Error::invalid("loop device", "has no path"))?;
    if direct_io {
        if let Err(e) = ld.set_direct_io(true) {
            warn!(file = %file.display(), error = %e, "direct I/O unavailable on this filesystem; using buffered I/O");
        }
    }
    let device = Device {
        major: ld.major().map_err(|e| Error::io("stat", &dev_path, e))?,
        minor: ld.minor().map_err(|e| Error::io("stat", &dev_path, e))?,
    };
    let file = fs::canonicalize(file).map_err(|e| Error::io("resolve", file, e))?;
    debug!(dev = %dev_path.display(), "attached");
    Ok(LoopFile {
        file,
        dev_path,
        device,
    })
}

impl LoopFile {
    /// Extends the backing file to `size` bytes and tells the loop device its new capacity.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `size` would shrink the file; [`Error::Io`] on failure.
    #[instrument(level = "debug", skip(self), fields(dev = %self.dev_path.display()))]
    pub fn grow(&self, size: u64) -> Result<()> {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&self.file)
            .map_err(|e| Error::io("open", &self.file, e))?;
        let cur = f
            .metadata()
            .map_err(|e| Error::io("stat", &self.file, e))?
            .len();
        if size < cur {
            return Err(Error::invalid(
                format!("new size of {}", self.file.display()),
                format!(
                    "{size} bytes is smaller than the current {cur} bytes; pools cannot shrink"
                ),
            ));
        }
        f.set_len(size)
            .map_err(|e| Error::io("resize", &self.file, e))?;
        f.sync_all().map_err(|e| Error::io("sync", &self.file, e))?;
        LoopDevice::open(&self.dev_path)
            .and_then(|ld| ld.set_capacity())
            .map_err(|e| Error::io("set capacity of", &self.dev_path, e))
    }

    /// Size of the backing file in bytes.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be read.
    pub fn size(&self) -> Result<u64> {
        fs::metadata(&self.file)
            .map(|m| m.len())
            .map_err(|e| Error::io("stat", &self.file, e))
    }

    /// Detaches the loop device. Already detached is not an error.
    ///
    /// # Errors
    /// [`Error::Io`] when the device is still in use.
    #[instrument(level = "debug", skip(self), fields(dev = %self.dev_path.display()))]
    pub fn detach(&self) -> Result<()> {
        match LoopDevice::open(&self.dev_path).and_then(|ld| ld.detach()) {
            Ok(()) => Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::ENXIO)
                    || e.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            Err(e) => Err(Error::io("detach", &self.dev_path, e)),
        }
    }
}
