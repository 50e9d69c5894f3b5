//! Base devices: the empty filesystem of each filesystem type that snapshots (and volumes)
//! of that type start from, made and formatted on first use.

use thinpool::{units, FsType, RemoveMode};
use tracing::info;

use super::{lock, Engine};
use crate::{
    error::Result,
    failpoint::hit as fp,
    store::{Base, Device, Owner, State},
};

impl Engine {
    /// The base device of filesystem `fs` (snapshots use the configured one, volumes may
    /// ask for another), created and formatted on first use. `mkfs_options` apply to the
    /// configured filesystem only: they are options of its mkfs.
    pub(super) fn ensure_base(&self, fs: FsType) -> Result<Base> {
        if let Some(b) = self.store.read()?.base(fs)? {
            if b.device.state == State::Ready {
                return Ok(b);
            }
        }
        let _g = lock(&self.base_lock);
        let _live = self.live(Owner::Base(fs));
        let leftover = self.store.read()?.base(fs)?;
        match leftover {
            Some(b) if b.device.state == State::Ready => return Ok(b),
            Some(b) => self.undo_create(&b)?,
            None => {}
        }
        let extra: &[String] = if fs == self.config.filesystem {
            &self.config.mkfs_options
        } else {
            &[]
        };
        let (base, ()) = self.create_device(
            |_| Ok(()),
            |id| Base {
                device: Device::creating(id, self.config.default_size, fs),
                lost_found_removed: true,
            },
            None,
            |b| {
                let id = b.device.thin_id;
                let dev = self.activate_device(id, b.device.size)?;
                self.pool.mkfs(fs, &dev.devnode, extra)?;
                fp("base.after-mkfs");
                // A container's root holds what its image holds: nothing of mkfs's.
                self.pool.remove_lost_found(fs, &dev.devnode)?;
                self.deactivate(id, RemoveMode::Now)?;
                Ok(())
            },
        )?;
        info!(fs = %fs, thin_id = %base.device.thin_id, size = %units::format_size(base.device.size), "formatted base device");
        Ok(base)
    }

    /// Removes `lost+found` from a base device made before bases were tidied (at start-up:
    /// snapshots made from it already keep theirs, which may hold an image's own files).
    pub(super) fn remove_base_lost_found(&self, base: &Base) -> Result<()> {
        let _g = lock(&self.base_lock);
        let _live = self.live(base.owner());
        let id = base.device.thin_id;
        let dev = self.activate_device(id, base.device.size)?;
        let removed = self.pool.remove_lost_found(base.device.fs, &dev.devnode);
        self.deactivate(id, RemoveMode::Now)?;
        removed?;
        let mut tidy = base.clone();
        tidy.lost_found_removed = true;
        let mut tx = self.store.write()?;
        tx.put_base(&tidy)?;
        tx.commit()?;
        Ok(())
    }
}
