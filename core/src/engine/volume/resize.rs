//! `thinsnap volume resize`: a volume grows, online if containers have it mounted, through
//! the device lifecycle's grow (the new size recorded first, then the device and its
//! filesystem grown, then the grow recorded done; recovery finishes one a crash
//! interrupted). Filesystems cannot shrink, so neither can volumes.

use thinpool::units;
use tracing::{info, instrument};

use super::{parse_volume_size, validate_name};
use crate::{
    engine::Engine,
    error::{Error, Result},
    store::{Owner, Volume},
};

/// What a resize did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resized {
    /// The volume as it is now.
    pub volume: Volume,
    /// Its size before, in bytes.
    pub previous: u64,
}

impl Engine {
    /// Grows volume `name` to `size` (as people type sizes, rounded up to a MiB), online
    /// when it is mounted. The size it has already is no change (unless an earlier resize
    /// to it was interrupted: that one is finished).
    ///
    /// # Errors
    /// InvalidArgument for a bad name or size, or one smaller than the volume (volumes
    /// cannot shrink) or beyond the largest allowed; NotFound if the volume does not exist;
    /// Unavailable or ResourceExhausted when the pool cannot take writes; kernel and tool
    /// errors when growing fails (then the resize stays pending: asking again, or the next
    /// start, finishes it).
    #[instrument(level = "info", skip(self), fields(name, size))]
    pub fn resize_volume(&self, name: &str, size: &str) -> Result<Resized> {
        validate_name("volume name", name)?;
        let size = parse_volume_size(&format!("size {size}"), size)?;
        let _g = self.lock_volumes(&[name]);
        let _live = self.live(Owner::Volume(name.to_string()));
        let v = self.volume(name)?;
        let previous = v.resize_from.unwrap_or(v.device.size);
        if size < v.device.size {
            return Err(Error::InvalidArgument(format!(
                "volume {name:?} is {} and cannot shrink to {}: filesystems cannot shrink; ask for {} or more, or copy its data to a new smaller volume",
                units::format_size(v.device.size),
                units::format_size(size),
                units::format_size(v.device.size)
            )));
        }
        if size == v.device.size && v.resize_from.is_none() {
            return Ok(Resized {
                volume: v,
                previous,
            });
        }
        self.check_size(size, &format!("the resize of volume {name:?}"))?;
        self.pool.check_writable()?;
        let volume = if size == v.device.size {
            self.finish_grow(&v)?
        } else {
            self.grow_device(&v, size)?
        };
        info!(volume = name, from = %units::format_size(previous), to = %units::format_size(size), mounted = !volume.mounts.is_empty(), "resized volume");
        Ok(Resized { volume, previous })
    }

    /// Grows volume `v`'s filesystem to fill its device (already at its new size where
    /// active): online where it is mounted, else mounted for the moment at its own
    /// mountpoint (which recovery knows to unmount if a crash leaves it) and left inactive.
    pub(in crate::engine) fn grow_volume_fs(&self, v: &Volume) -> Result<()> {
        let dir = self.volume_dir(&v.name);
        let fs = v.device.fs;
        if self.pool.is_mounted(&dir)? {
            // Active already: returned as it is.
            let dev = self.activate_device(v.device.thin_id, v.device.size)?;
            return Ok(self.pool.grow_mounted(fs, &dev.devnode, &dir)?);
        }
        let dev = self.mount_volume_dir(v)?;
        let grown = self.pool.grow_mounted(fs, &dev.devnode, &dir);
        let released = self.release_volume_dir(v);
        grown?;
        released
    }
}
