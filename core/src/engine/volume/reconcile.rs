//! Startup reconciliation of volumes: interrupted creates are rolled back and removals
//! finished; mounts follow the records. A volume whose mount ids were recorded in this boot
//! is mounted (thinsnap restarted under running containers: it normally still is); mount
//! ids of an earlier boot are dropped (no container survived the reboot, and Docker mounts
//! the volume again when it starts one); a mount no id holds (a crash between Mount's
//! mount and its record, or Unmount's record and its unmount) is unmounted. A resize a
//! crash interrupted is finished.

use thinpool::RemoveMode;

use super::boot_id;
use crate::{
    engine::{
        recover::{KernelView, Pass},
        Engine,
    },
    error::Result,
    store::{State, Volume},
};

impl Engine {
    /// Reconciles every volume record with the kernel (at startup, `check` and `repair`).
    /// While serving (`gc`) volumes are left alone: their operations may be in flight.
    pub(in crate::engine) fn reconcile_volumes(
        &self,
        pass: &mut Pass,
        view: &KernelView,
    ) -> Result<()> {
        if !pass.startup {
            return Ok(());
        }
        let boot = boot_id();
        for v in self.store.read()?.volumes()? {
            let finish = || self.finish_remove(&v);
            if pass.settle(&v, view, Some(&finish)) {
                self.reconcile_mounts(pass, view, &v, &boot)?;
                self.reconcile_resize(pass, &v.name)?;
            }
        }
        Ok(())
    }

    /// A resize a crash interrupted is finished (its device already has the new size in
    /// the record; the filesystem may not fill it yet), after the volume's mounts follow
    /// its record, so it grows online where containers have it mounted.
    fn reconcile_resize(&self, pass: &mut Pass, name: &str) -> Result<()> {
        // Read again: reconciling the mounts may have changed the record.
        let Some(v) = self.store.read()?.volume(name)? else {
            return Ok(());
        };
        let Some(from) = v.resize_from else {
            return Ok(());
        };
        pass.act(
            format!(
                "finish the interrupted resize of volume {name:?} from {} to {}",
                thinpool::units::format_size(from),
                thinpool::units::format_size(v.device.size)
            ),
            &|| self.finish_grow(&v).map(|_| ()),
        );
        Ok(())
    }

    /// A Ready volume's mounts follow its record: ids of an earlier boot are dropped, a
    /// volume with ids of this boot is mounted, one without ids is not.
    fn reconcile_mounts(
        &self,
        pass: &mut Pass,
        view: &KernelView,
        v: &Volume,
        boot: &str,
    ) -> Result<()> {
        debug_assert_eq!(v.device.state, State::Ready);
        let name = &v.name;
        let dir = self.volume_dir(name);
        let mounted = self.pool.is_mounted(&dir)?;
        let stale = !v.mounts.is_empty() && v.boot_id != boot;
        if stale {
            pass.act(
                format!(
                    "forget {} mount(s) of volume {name:?} recorded before a reboot",
                    v.mounts.len()
                ),
                &|| {
                    let mut tx = self.store.write()?;
                    let mut fresh = v.clone();
                    fresh.mounts.clear();
                    fresh.boot_id = boot.to_string();
                    tx.put_volume(&fresh)?;
                    tx.commit()?;
                    Ok(())
                },
            );
        }
        let want = !v.mounts.is_empty() && !stale;
        if want && !mounted {
            pass.act(
                format!(
                    "mount volume {name:?} at {} for its {} container mount(s)",
                    dir.display(),
                    v.mounts.len()
                ),
                &|| self.mount_volume_dir(v).map(|_| ()),
            );
        } else if !want && mounted {
            pass.act(
                format!(
                    "unmount volume {name:?} from {}: no container mount is recorded",
                    dir.display()
                ),
                &|| self.release_volume_dir(v),
            );
        } else if !want && view.active.contains_key(&v.device.thin_id) {
            pass.act(
                format!("deactivate the device of unmounted volume {name:?}"),
                &|| Ok(self.deactivate(v.device.thin_id, RemoveMode::Now)?),
            );
        }
        Ok(())
    }
}
