//! Startup reconciliation of volumes: interrupted creates are rolled back and removals
//! finished; mounts follow the records. A volume whose mount ids were recorded in this boot
//! is mounted (thinsnap restarted under running containers: it normally still is); mount
//! ids of an earlier boot are dropped (no container survived the reboot, and Docker mounts
//! the volume again when it starts one); a mount no id holds (a crash between Mount's
//! mount and its record, or Unmount's record and its unmount) is unmounted.

use std::collections::{BTreeMap, BTreeSet};

use thinpool::{RemoveMode, ThinId};

use super::boot_id;
use crate::{
    snapshotter::{recover::run_action, Report, Result, Snapshotter},
    store::State,
};

impl Snapshotter {
    /// Reconciles every volume record with the kernel (at startup, `check` and `repair`).
    /// While serving (`gc`) volumes are left alone: their operations may be in flight.
    pub(in crate::snapshotter) fn reconcile_volumes(
        &self,
        apply: bool,
        startup: bool,
        report: &mut Report,
        in_pool: &BTreeSet<u32>,
        active: &BTreeMap<u32, String>,
    ) -> Result<()> {
        if !startup {
            return Ok(());
        }
        let boot = boot_id();
        let mut act = |line: String, f: &dyn Fn() -> Result<()>| run_action(apply, report, line, f);
        let mut problems = Vec::new();
        for v in self.store.read()?.volumes()? {
            let name = &v.name;
            let dir = self.volume_dir(name);
            let mounted = thinpool::fs::is_mounted(&dir)?;
            match v.state {
                State::Creating => act(
                    format!(
                        "roll back interrupted create of volume {name:?} (thin id {})",
                        v.thin_id
                    ),
                    &|| self.undo_volume_create(&v),
                ),
                State::Removing => act(
                    format!(
                        "finish interrupted removal of volume {name:?} (thin id {})",
                        v.thin_id
                    ),
                    &|| {
                        thinpool::fs::umount(&dir)?;
                        self.finish_volume_remove(&v)
                    },
                ),
                State::Ready if !in_pool.contains(&v.thin_id) => problems.push(format!(
                    "volume {name:?} records thin id {} but the pool has no such device: its data is lost; remove it with `docker volume rm {name}`",
                    v.thin_id
                )),
                State::Ready => {
                    let stale = !v.mounts.is_empty() && v.boot_id != boot;
                    if stale {
                        act(
                            format!(
                                "forget {} mount(s) of volume {name:?} recorded before a reboot",
                                v.mounts.len()
                            ),
                            &|| {
                                let mut tx = self.store.write()?;
                                let mut fresh = v.clone();
                                fresh.mounts.clear();
                                fresh.boot_id = boot.clone();
                                tx.put_volume(&fresh)?;
                                tx.commit()?;
                                Ok(())
                            },
                        );
                    }
                    let want = !v.mounts.is_empty() && !stale;
                    if want && !mounted {
                        act(
                            format!(
                                "mount volume {name:?} at {} for its {} container mount(s)",
                                dir.display(),
                                v.mounts.len()
                            ),
                            &|| self.mount_volume_dir(&v).map(|_| ()),
                        );
                    } else if !want && mounted {
                        act(
                            format!(
                                "unmount volume {name:?} from {}: no container mount is recorded",
                                dir.display()
                            ),
                            &|| self.release_volume_dir(&v),
                        );
                    } else if !want && active.contains_key(&v.thin_id) {
                        act(
                            format!("deactivate the device of unmounted volume {name:?}"),
                            &|| Ok(self.deactivate(ThinId::new(v.thin_id)?, RemoveMode::Now)?),
                        );
                    }
                }
            }
        }
        report.problems.extend(problems);
        Ok(())
    }
}
