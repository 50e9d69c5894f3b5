//! The process's one device-mapper context and one function per dm verb, each with a
//! tracing span, errors carrying the device, the operation and the kernel's errno.

use std::{
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use devicemapper::{
    errors, DevId, Device, DeviceInfo, DmError, DmFlags, DmName, DmNameBuf, DmOptions, DmUuid, DM,
};
use nix::{errno::Errno, sys::stat};
use tracing::{debug, instrument};

use crate::error::{Error, Result};

/// One dm target line: start sector, length in sectors, target type, parameters.
pub type TableLine = (u64, u64, String, String);

static DM_CONTEXT: OnceLock<std::result::Result<DM, DmError>> = OnceLock::new();

/// The device-mapper context, opened on first use.
///
/// # Errors
/// [`Error::Dm`] when `/dev/mapper/control` cannot be opened (no dm_mod, not root).
pub fn get() -> Result<&'static DM> {
    DM_CONTEXT
        .get_or_init(DM::new)
        .as_ref()
        .map_err(|e| Error::from_dm("/dev/mapper/control", "open", e.clone()))
}

fn errno_of(err: &DmError) -> Option<Errno> {
    match err {
        DmError::Core(errors::Error::Ioctl(_, _, _, e)) => Some(**e),
        _ => None,
    }
}

/// Information on device `name`, or `None` when the kernel has no such device.
///
/// # Errors
/// [`Error::Dm`] for any failure other than "no such device".
pub fn info(name: &DmName) -> Result<Option<DeviceInfo>> {
    match get()?.device_info(&DevId::Name(name)) {
        Ok(info) => Ok(Some(info)),
        Err(e) if errno_of(&e) == Some(Errno::ENXIO) => Ok(None),
        Err(e) => Err(Error::from_dm(name.to_string(), "device_info", e)),
    }
}

/// Creates device `name`, loads `table` and resumes it; removes it again if any step fails.
///
/// # Errors
/// [`Error::AlreadyExists`] if `name` exists; [`Error::Dm`] for kernel errors.
#[instrument(level = "debug", skip(uuid, table), fields(device = %name))]
pub fn create(name: &DmName, uuid: Option<&DmUuid>, table: &[TableLine]) -> Result<DeviceInfo> {
    let dm = get()?;
    let id = DevId::Name(name);
    let made = tracing::debug_span!("device_create")
        .in_scope(|| dm.device_create(name, uuid, DmOptions::default()));
    if let Err(e) = made {
        if errno_of(&e) == Some(Errno::EBUSY) {
            return Err(Error::AlreadyExists {
                what: format!("dm device {name}"),
            });
        }
        return Err(Error::from_dm(name.to_string(), "device_create", e));
    }
    let loaded = tracing::debug_span!("table_load")
        .in_scope(|| dm.table_load(&id, table, DmOptions::default()))
        .map_err(|e| Error::from_dm(name.to_string(), "table_load", e))
        .and_then(|_| {
            tracing::debug_span!("resume")
                .in_scope(|| dm.device_suspend(&id, DmOptions::default()))
                .map_err(|e| Error::from_dm(name.to_string(), "resume", e))
        });
    match loaded {
        Ok(info) => {
            debug!(dev = %info.device(), "created");
            Ok(info)
        }
        Err(e) => {
            let undo = dm
                .device_remove(&id, DmOptions::default())
                .map(|_| ())
                .map_err(|e| Error::from_dm(name.to_string(), "device_remove", e));
            Err(Error::with_rollback(e, undo))
        }
    }
}

/// Loads a new table into device `name` and resumes it, making the new table live.
///
/// # Errors
/// [`Error::Dm`] when the kernel rejects the table or the resume.
#[instrument(level = "debug", skip(table), fields(device = %name))]
pub fn reload(name: &DmName, table: &[TableLine]) -> Result<()> {
    let dm = get()?;
    let id = DevId::Name(name);
    dm.table_load(&id, table, DmOptions::default())
        .map_err(|e| Error::from_dm(name.to_string(), "table_load", e))?;
    dm.device_suspend(&id, DmOptions::default())
        .map_err(|e| Error::from_dm(name.to_string(), "resume", e))?;
    Ok(())
}

/// Suspends device `name`: I/O is queued, and the device is flushed.
///
/// # Errors
/// [`Error::Dm`] on failure.
#[instrument(level = "debug", fields(device = %name))]
pub fn suspend(name: &DmName) -> Result<()> {
    get()?
        .device_suspend(
            &DevId::Name(name),
            DmOptions::default().set_flags(DmFlags::DM_SUSPEND),
        )
        .map(|_| ())
        .map_err(|e| Error::from_dm(name.to_string(), "suspend", e))
}

/// Resumes a suspended device `name`.
///
/// # Errors
/// [`Error::Dm`] on failure.
#[instrument(level = "debug", fields(device = %name))]
pub fn resume(name: &DmName) -> Result<()> {
    get()?
        .device_suspend(&DevId::Name(name), DmOptions::default())
        .map(|_| ())
        .map_err(|e| Error::from_dm(name.to_string(), "resume", e))
}

/// How [`remove`] treats a device that is still open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RemoveMode {
    /// Fail with [`Error::Busy`] (after the kernel-side retries) while the device is open.
    #[default]
    Now,
    /// Let the kernel remove the device when its last opener closes it.
    Deferred,
}

/// Removes device `name`. A device that does not exist is not an error.
///
/// # Errors
/// [`Error::Busy`] while the device is open (mounted, or held by a process) in
/// [`RemoveMode::Now`]; [`Error::Dm`] for other failures.
#[instrument(level = "debug", fields(device = %name))]
pub fn remove(name: &DmName, mode: RemoveMode) -> Result<()> {
    let dm = get()?;
    let opts = match mode {
        RemoveMode::Now => DmOptions::default(),
        RemoveMode::Deferred => DmOptions::default().set_flags(DmFlags::DM_DEFERRED_REMOVE),
    };
    match dm.device_remove(&DevId::Name(name), opts) {
        Ok(_) => Ok(()),
        Err(e) if errno_of(&e) == Some(Errno::ENXIO) => Ok(()),
        Err(e) if errno_of(&e) == Some(Errno::EBUSY) => {
            let opens = info(name)?.map(|i| i.open_count()).unwrap_or(0);
            Err(Error::Busy {
                device: name.to_string(),
                detail: format!(
                    "it is open {opens} time(s): unmount it (see `findmnt`) or stop the process holding it, then retry"
                ),
            })
        }
        Err(e) => Err(Error::from_dm(name.to_string(), "device_remove", e)),
    }
}

/// Sends `msg` to the target of device `name` (e.g. `create_thin 5` to a thin-pool).
///
/// # Errors
/// [`Error::Dm`] with the kernel's errno when the target rejects the message.
#[instrument(level = "debug", fields(device = %name))]
pub fn message(name: &DmName, op: &'static str, msg: &str) -> Result<Option<String>> {
    get()?
        .target_msg(&DevId::Name(name), None, msg)
        .map(|(_, out)| out)
        .map_err(|e| Error::from_dm(name.to_string(), op, e))
}

/// The status line of the single target of device `name`: (target type, status). Without
/// `flush` the target is asked not to flush first (`DM_NOFLUSH`: a thin pool then skips its
/// metadata commit).
///
/// # Errors
/// [`Error::NotFound`] when the device does not exist; [`Error::Dm`] otherwise.
pub fn status(name: &DmName, flush: bool) -> Result<(String, String)> {
    let opts = if flush {
        DmOptions::default()
    } else {
        DmOptions::default().set_flags(DmFlags::DM_NOFLUSH)
    };
    single_line(name, opts, "table_status").map(|(_, ty, line)| (ty, line))
}

/// The live table of the single target of device `name`: (length, target type, parameters).
///
/// # Errors
/// [`Error::NotFound`] when the device does not exist; [`Error::Invalid`] when it has no
/// live table; [`Error::Dm`] otherwise.
pub fn table(name: &DmName) -> Result<(u64, String, String)> {
    live_table(name)?
        .ok_or_else(|| Error::invalid(format!("dm device {name}"), "it has no table loaded"))
}

/// Like [`table`], but `None` for a device that exists without a live table: what a
/// process leaves behind when it dies between creating a device and resuming its table.
///
/// # Errors
/// [`Error::NotFound`] when the device does not exist; [`Error::Dm`] otherwise.
pub fn live_table(name: &DmName) -> Result<Option<(u64, String, String)>> {
    let (_, lines) = get()?
        .table_status(
            &DevId::Name(name),
            DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
        )
        .map_err(|e| not_found_or(name, "table", e))?;
    Ok(lines
        .into_iter()
        .next()
        .map(|(_, len, ty, params)| (len, ty, params)))
}

/// The info of device `name` and the status of its single target: (info, type, status).
fn single_line(
    name: &DmName,
    opts: DmOptions,
    op: &'static str,
) -> Result<(DeviceInfo, String, String)> {
    let (info, lines) = get()?
        .table_status(&DevId::Name(name), opts)
        .map_err(|e| not_found_or(name, op, e))?;
    match lines.into_iter().next() {
        Some((_, _, ty, params)) => Ok((info, ty, params)),
        None => Err(Error::invalid(
            format!("dm device {name}"),
            "it has no table loaded",
        )),
    }
}

fn not_found_or(name: &DmName, op: &'static str, e: DmError) -> Error {
    if errno_of(&e) == Some(Errno::ENXIO) {
        Error::NotFound {
            what: format!("dm device {name}"),
            hint: crate::error::Hint(None),
        }
    } else {
        Error::from_dm(name.to_string(), op, e)
    }
}

/// Every dm device in the kernel, with its device number.
///
/// # Errors
/// [`Error::Dm`] on failure.
pub fn list() -> Result<Vec<(DmNameBuf, Device)>> {
    Ok(get()?
        .list_devices()
        .map_err(|e| Error::from_dm("(all)", "list_devices", e))?
        .into_iter()
        .map(|(name, dev, _)| (name, dev))
        .collect())
}

/// The `/dev` node of block device `dev`, created with mknod if devtmpfs did not make it.
///
/// Device-mapper devices are `/dev/dm-<minor>`; other devices are named by the kernel in
/// `/sys/dev/block/<major>:<minor>/uevent`. No udev is needed.
///
/// # Errors
/// [`Error::Io`] when the node can neither be found nor made.
pub fn devnode(dev: Device) -> Result<PathBuf> {
    let uevent = PathBuf::from(format!("/sys/dev/block/{}:{}/uevent", dev.major, dev.minor));
    let name = std::fs::read_to_string(&uevent)
        .map_err(|e| Error::io("read", &uevent, e))?
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string))
        .ok_or_else(|| Error::invalid(uevent.display().to_string(), "no DEVNAME"))?;
    let path = Path::new("/dev").join(name);
    ensure_node(&path, dev)?;
    Ok(path)
}

/// The node of dm device `dev`, `/dev/dm-<minor>` (the kernel names every dm disk so),
/// made if missing: [`devnode`] without reading sysfs, for devices known to be dm's.
///
/// # Errors
/// [`Error::Invalid`] when the path exists as something else; [`Error::Io`] when it cannot
/// be made.
pub fn dm_devnode(dev: Device) -> Result<PathBuf> {
    let path = PathBuf::from(format!("/dev/dm-{}", dev.minor));
    ensure_node(&path, dev)?;
    Ok(path)
}

/// The status of device `name` (without flushing) with its info: None when it does not
/// exist. One ioctl.
///
/// # Errors
/// [`Error::Invalid`] when it has no table loaded; [`Error::Dm`] otherwise.
pub fn status_with_info(name: &DmName) -> Result<Option<(DeviceInfo, String, String)>> {
    let opts = DmOptions::default().set_flags(DmFlags::DM_NOFLUSH);
    match single_line(name, opts, "table_status") {
        Err(Error::NotFound { .. }) => Ok(None),
        r => r.map(Some),
    }
}

fn ensure_node(path: &Path, dev: Device) -> Result<()> {
    let want = nix::sys::stat::makedev(dev.major.into(), dev.minor.into());
    match std::fs::metadata(path) {
        Ok(m)
            if m.file_type().is_block_device() && {
                use std::os::unix::fs::MetadataExt;
                m.rdev() == want
            } =>
        {
            Ok(())
        }
        Ok(_) => Err(Error::invalid(
            path.display().to_string(),
            format!("exists but is not block device {dev}"),
        )),
        Err(_) => stat::mknod(
            path,
            stat::SFlag::S_IFBLK,
            stat::Mode::from_bits_truncate(0o600),
            want,
        )
        .map_err(|e| Error::io("mknod", path, e.into())),
    }
}

/// Parses `major:minor`.
///
/// # Errors
/// [`Error::Invalid`] when `s` is not of that form.
pub fn parse_device(s: &str) -> Result<Device> {
    let bad = || Error::invalid(format!("device number {s:?}"), "expected major:minor");
    let (ma, mi) = s.split_once(':').ok_or_else(bad)?;
    Ok(Device {
        major: ma.parse().map_err(|_| bad())?,
        minor: mi.parse().map_err(|_| bad())?,
    })
}

/// The device number of the block device at `path`.
///
/// # Errors
/// [`Error::Io`] when `path` cannot be read; [`Error::Invalid`] when it is no block device.
pub fn device_of(path: &Path) -> Result<Device> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
    if !m.file_type().is_block_device() {
        return Err(Error::invalid(
            path.display().to_string(),
            "not a block device",
        ));
    }
    let rdev = m.rdev();
    Ok(Device {
        major: stat::major(rdev) as u32,
        minor: stat::minor(rdev) as u32,
    })
}

/// Size in bytes of the block device at `path`.
///
/// # Errors
/// [`Error::Io`] when it cannot be opened.
pub fn block_size_bytes(path: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    f.seek(SeekFrom::End(0))
        .map_err(|e| Error::io("seek", path, e))
}

/// Waits for device-mapper events (a pool crossing its low-water mark, running out of
/// space, changing mode), through a dm context of its own whose file becomes readable
/// after any dm event once armed (`DM_DEV_ARM_POLL`). Events are not per device: a wake-up
/// says "look again", not which device changed.
pub struct EventWaiter {
    dm: DM,
}

impl EventWaiter {
    /// A waiter, armed: events from now on wake [`EventWaiter::wait`].
    ///
    /// # Errors
    /// [`Error::Dm`] when `/dev/mapper/control` cannot be opened or armed.
    pub fn new() -> Result<EventWaiter> {
        let dm = DM::new().map_err(|e| Error::from_dm("/dev/mapper/control", "open", e))?;
        dm.arm_poll()
            .map_err(|e| Error::from_dm("/dev/mapper/control", "arm poll", e))?;
        Ok(EventWaiter { dm })
    }

    /// Waits up to `timeout` for an event since the last wake-up; returns whether one came,
    /// and re-arms.
    ///
    /// # Errors
    /// [`Error::Dm`] when polling or re-arming fails.
    pub fn wait(&self, timeout: std::time::Duration) -> Result<bool> {
        use std::os::fd::AsFd;
        let mut fds = [nix::poll::PollFd::new(
            self.dm.file().as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let n = match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(Error::io("poll", "/dev/mapper/control", e.into())),
        };
        if n > 0 {
            self.dm
                .arm_poll()
                .map_err(|e| Error::from_dm("/dev/mapper/control", "arm poll", e))?;
        }
        Ok(n > 0)
    }
}
