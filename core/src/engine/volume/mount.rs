//! VolumeDriver.Mount and Unmount: a volume is mounted at `<mount_dir>/<name>` while at
//! least one Docker mount id holds it. The ids are recorded with the boot they belong to.
//!
//! Mount changes the kernel first and records the id after; Unmount records first and
//! changes the kernel after. A crash between the two leaves a mount no id holds, which
//! startup recovery unmounts: either way the result is what Docker was told (an error for
//! the interrupted Mount, the volume released for the interrupted Unmount).

use std::path::PathBuf;

use crate::failpoint::hit as fp;
use tracing::{debug, info, instrument};

use super::{boot_id, validate_name};
use crate::{
    engine::Engine,
    error::{Error, Result},
};

/// Longest accepted Docker mount id, in bytes.
const MAX_MOUNT_ID_LEN: usize = 1024;

impl Engine {
    /// Mounts volume `name` for Docker mount id `id` (a container's use of it) and returns
    /// its mountpoint. Mounting an id again is harmless.
    ///
    /// # Errors
    /// NotFound if the volume does not exist; kernel errors (with `dmesg` as the hint)
    /// when its filesystem cannot be mounted.
    #[instrument(level = "info", skip(self), fields(name, id))]
    pub fn mount_volume(&self, name: &str, id: &str) -> Result<PathBuf> {
        validate_name("volume name", name)?;
        if id.len() > MAX_MOUNT_ID_LEN {
            return Err(Error::InvalidArgument(format!(
                "mount id is {} bytes long; the limit is {MAX_MOUNT_ID_LEN}",
                id.len()
            )));
        }
        let _g = self.lock_volumes(&[name]);
        let mut v = self.volume(name)?;
        let dir = self.volume_dir(name);
        let boot = boot_id();
        // Mounted already for other ids, unless someone unmounted it behind our back:
        // then mount it again rather than hand out an empty directory on the host.
        let first = v.mounts.is_empty() || !self.pool.is_mounted(&dir)?;
        if first {
            self.mount_volume_dir(&v)?;
            fp("volume-mount.after-mount");
            info!(volume = name, dir = %dir.display(), "mounted volume");
        }
        if v.mounts.insert(id.to_string()) || v.boot_id != boot {
            v.boot_id = boot;
            let recorded = (|| -> Result<()> {
                let mut tx = self.store.write()?;
                tx.put_volume(&v)?;
                tx.commit()?;
                Ok(())
            })();
            if let Err(e) = recorded {
                if first {
                    let _ = self.release_volume_dir(&v);
                }
                return Err(e);
            }
        }
        Ok(dir)
    }

    /// Releases Docker mount id `id` of volume `name`; the last one unmounts the volume and
    /// deactivates its device. An id the volume does not hold (e.g. one from before a
    /// reboot) is not an error.
    ///
    /// # Errors
    /// NotFound if the volume does not exist; FailedPrecondition when the last id goes but
    /// files on the volume are still in use (then the id stays recorded).
    #[instrument(level = "info", skip(self), fields(name, id))]
    pub fn unmount_volume(&self, name: &str, id: &str) -> Result<()> {
        validate_name("volume name", name)?;
        let _g = self.lock_volumes(&[name]);
        let before = self.volume(name)?;
        if !before.mounts.contains(id) {
            debug!(
                volume = name,
                id, "unmount of a mount id the volume does not hold"
            );
            return Ok(());
        }
        let mut after = before.clone();
        after.mounts.remove(id);
        {
            let mut tx = self.store.write()?;
            tx.put_volume(&after)?;
            tx.commit()?;
        }
        if !after.mounts.is_empty() {
            return Ok(());
        }
        fp("volume-unmount.after-record");
        if let Err(e) = self.release_volume_dir(&after) {
            // Still in use: the id stays, as if this Unmount had not happened.
            let mut tx = self.store.write()?;
            tx.put_volume(&before)?;
            tx.commit()?;
            return Err(e);
        }
        info!(volume = name, "unmounted volume");
        Ok(())
    }

    /// Where volume `name` is mounted, if containers hold it mounted.
    ///
    /// # Errors
    /// NotFound if the volume does not exist.
    pub fn volume_path(&self, name: &str) -> Result<Option<PathBuf>> {
        let v = self.volume(name)?;
        Ok(self.volume_mountpoint(&v))
    }
}
