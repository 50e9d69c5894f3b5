//! VolumeDriver.Create: a new volume. One at least as large as the base device of its
//! filesystem is a thin snapshot of it, grown to its size; a smaller one gets a thin device
//! and a filesystem of its own (mkfs, since filesystems cannot shrink); with `from`, a
//! thin snapshot of another volume (consistent: see [`Engine::create_volume`]), grown to
//! its size.
//!
//! Why not a base per size class: measured in the VM (docs/docker.md, "Volume sizes"),
//! mkfs of a filesystem smaller than the 10 GiB base takes at most what mkfs of the base
//! takes (ext4: 1.5 s at 1 GiB, 11 s at 10 GiB; xfs: about 5 s at any size), while a volume
//! grown from a smaller class keeps that class's geometry (1 KiB ext4 blocks below 512 MiB,
//! xfs allocation groups sized for the class) and every class would be a device of its own
//! in the pool forever.

use std::collections::BTreeMap;

use thinpool::{units, FsType, RemoveMode};
use tracing::{info, instrument};

use super::{validate_name, Options};
use crate::{
    engine::Engine,
    error::{Error, Result},
    failpoint::hit as fp,
    store::{Device, Owner, State, Volume},
};

/// What a new volume starts from.
enum Start {
    /// A thin snapshot of `device`: the base device of its filesystem, or `volume`, the
    /// volume to clone.
    Snapshot {
        device: Device,
        volume: Option<Volume>,
    },
    /// A fresh thin device with a filesystem of its own (smaller than the base device).
    Fresh(FsType),
}

impl Start {
    fn fs(&self) -> FsType {
        match self {
            Start::Snapshot { device, .. } => device.fs,
            Start::Fresh(fs) => *fs,
        }
    }
}

impl Engine {
    /// Creates volume `name` with Docker's `opts` (`size`, `fs`, `from`).
    ///
    /// A clone (`from`) of a mounted volume is consistent: its filesystem is flushed with
    /// `syncfs(2)` first, and the kernel freezes it (dm suspend with lockfs, i.e.
    /// `freeze_bdev`) while the snapshot message runs, so the clone is a clean filesystem
    /// with everything written to the origin before the Create.
    ///
    /// # Errors
    /// InvalidArgument for a bad name or options (naming unknown ones), a size smaller than
    /// the origin's or than the filesystem's minimum; AlreadyExists if the volume exists;
    /// NotFound if `from` does not; ResourceExhausted if the pool is too full.
    #[instrument(level = "info", skip(self, opts), fields(name))]
    pub fn create_volume(&self, name: &str, opts: BTreeMap<String, String>) -> Result<Volume> {
        validate_name("volume name", name)?;
        let o = Options::parse(&opts)?;
        if o.from.as_deref() == Some(name) {
            return Err(Error::InvalidArgument(format!(
                "volume {name:?} cannot be cloned from itself"
            )));
        }
        let mut names = vec![name];
        names.extend(o.from.as_deref());
        let _g = self.lock_volumes(&names);
        let _live = self.live(Owner::Volume(name.to_string()));
        if let Some(v) = self.store.read()?.volume(name)? {
            return Err(exists(name, v.device.state));
        }
        if let Some(s) = o.size {
            self.check_size(s, &format!("volume {name:?}'s option size"))?;
        }
        let (start, size) = self.volume_start(&o)?;
        if let Start::Snapshot {
            volume: Some(src), ..
        } = &start
        {
            if !src.mounts.is_empty() {
                // Flush the mounted origin's dirty data now, so the freeze inside the
                // snapshot's suspend has little left to write and is short.
                self.pool.syncfs(&self.volume_dir(&src.name))?;
            }
        }
        let origin = match &start {
            Start::Snapshot { device, .. } => Some(device.thin_id),
            Start::Fresh(_) => None,
        };
        let (v, ()) = self.create_device(
            |_| Ok(()),
            |id| {
                Volume::new(
                    name,
                    Device::creating(id, size, start.fs()),
                    o.from.clone(),
                    opts.clone(),
                )
            },
            origin,
            |v| match &start {
                Start::Snapshot { device, .. } => self.grow_new_volume(v, device.size),
                Start::Fresh(_) => self.format_new_volume(v),
            },
        )?;
        let how = match start {
            Start::Snapshot {
                volume: Some(_), ..
            } => "clone",
            Start::Snapshot { volume: None, .. } => "snapshot of the base device",
            Start::Fresh(_) => "own filesystem",
        };
        info!(volume = name, thin_id = %v.device.thin_id, size = %units::format_size(v.device.size), fs = %v.device.fs, from = ?v.origin, how, "created volume");
        Ok(v)
    }

    /// What a new volume starts from, and its size: a clone of `from`, at least its size;
    /// else a snapshot of the base device of its filesystem when it is at least as large
    /// as the base, or a filesystem of its own when it is smaller (at least the
    /// filesystem's minimum). The base device is made on first use, only when needed.
    fn volume_start(&self, o: &Options) -> Result<(Start, u64)> {
        let Some(from) = &o.from else {
            return self.new_volume_start(o);
        };
        let src = self.volume(from).map_err(|e| match e {
            Error::NotFound(_) => Error::NotFound(format!(
                "volume {from:?} to clone (option from) does not exist"
            )),
            e => e,
        })?;
        let fs: FsType = src.device.fs;
        if o.fs.is_some_and(|f| f != fs) {
            return Err(Error::InvalidArgument(format!(
                "option fs={} differs from the filesystem of volume {from:?} ({fs}): a clone keeps its origin's filesystem",
                o.fs.unwrap_or_default()
            )));
        }
        let origin = src.device.size;
        let size = o.size.unwrap_or(origin);
        if size < origin {
            return Err(Error::InvalidArgument(format!(
                "option size={} is smaller than volume {from:?} ({}) it starts from: filesystems cannot shrink; ask for at least {}",
                units::format_size(size),
                units::format_size(origin),
                units::format_size(origin)
            )));
        }
        let device = src.device;
        Ok((
            Start::Snapshot {
                device,
                volume: Some(src),
            },
            size,
        ))
    }

    /// A volume that is not a clone: see [`Engine::volume_start`].
    fn new_volume_start(&self, o: &Options) -> Result<(Start, u64)> {
        let fs = o.fs.unwrap_or(self.config.volumes.filesystem);
        let size = o.size.unwrap_or(self.config.volumes.default_size);
        let min = fs.min_size();
        if size < min {
            return Err(Error::InvalidArgument(format!(
                "size {} is smaller than the smallest {fs} filesystem, {}: ask for at least size={}M",
                units::format_size(size),
                units::format_size(min),
                min / units::MIB
            )));
        }
        let base = self
            .store
            .read()?
            .base(fs)?
            .filter(|b| b.device.state == State::Ready);
        let base_size = base
            .as_ref()
            .map_or(self.config.default_size, |b| b.device.size);
        if size < base_size {
            return Ok((Start::Fresh(fs), size));
        }
        let device = match base {
            Some(b) => b.device,
            None => self.ensure_base(fs)?.device,
        };
        let start = Start::Snapshot {
            device,
            volume: None,
        };
        Ok((start, size.max(device.size)))
    }

    /// Grows a new volume larger than its origin (of `origin_size` bytes) online, at the
    /// volume's own mountpoint (which recovery knows to unmount if a crash leaves it). The
    /// device is left inactive (it is activated when mounted).
    fn grow_new_volume(&self, v: &Volume, origin_size: u64) -> Result<()> {
        if v.device.size <= origin_size {
            return Ok(());
        }
        let dev = self.mount_volume_dir(v)?;
        let grown = self
            .pool
            .grow_mounted(v.device.fs, &dev.devnode, &self.volume_dir(&v.name));
        fp("volume.after-grow");
        let released = self.release_volume_dir(v);
        grown?;
        released
    }

    /// Makes a new volume's own filesystem on its fresh device, without mkfs.ext4's
    /// `lost+found` (a volume holds what containers put there: an empty one is empty, as
    /// the volumes made from the base device are). `mkfs_options` apply when the volume's
    /// filesystem is the configured one, as for the base device. The device is left
    /// inactive.
    fn format_new_volume(&self, v: &Volume) -> Result<()> {
        let fs = v.device.fs;
        let extra: &[String] = if fs == self.config.filesystem {
            &self.config.mkfs_options
        } else {
            &[]
        };
        let id = v.device.thin_id;
        let dev = self.activate_device(id, v.device.size)?;
        self.pool.mkfs(fs, &dev.devnode, extra)?;
        fp("volume.after-mkfs");
        self.pool.remove_lost_found(fs, &dev.devnode)?;
        self.deactivate(id, RemoveMode::Now)?;
        Ok(())
    }
}

/// The error for a Create of a volume that has a record already.
fn exists(name: &str, state: State) -> Error {
    Error::AlreadyExists(match state {
        State::Ready => format!("volume {name:?} already exists"),
        State::Creating => format!("volume {name:?} is being created"),
        State::Removing => format!("volume {name:?} is being removed: retry when it is gone"),
    })
}
