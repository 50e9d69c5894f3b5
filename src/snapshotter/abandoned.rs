//! Temporary snapshots of imports and exports whose process is gone. `image import` and
//! `image export` run in their own process (the CLI): one killed midway leaves its active
//! snapshot or view behind, and the private mount it worked through. Reconciliation (at
//! start-up, `thinsnap gc`, `thinsnap repair`) unmounts that mount and removes the snapshot;
//! `thinsnap check` reports it.

use tracing::info;

use super::{Result, Snapshotter};
use crate::{
    image::{owner, EXPORTING_LABEL, IMPORTING_LABEL},
    store::{Kind, Record},
};

/// An import's or export's snapshot whose process is gone.
pub(super) struct Abandoned {
    /// `import` or `export`: what the temporary mount directory is named for.
    pub purpose: &'static str,
    /// The process that made it.
    pub pid: Option<u32>,
}

/// Whether `r` is the temporary snapshot of an import or export whose process is gone.
pub(super) fn abandoned(r: &Record) -> Option<Abandoned> {
    if r.kind == Kind::Committed {
        return None;
    }
    [(IMPORTING_LABEL, "import"), (EXPORTING_LABEL, "export")]
        .into_iter()
        .find_map(|(label, purpose)| {
            let tag = r.labels.get(label)?;
            (!owner::alive(tag)).then(|| Abandoned {
                purpose,
                pid: owner::pid(tag),
            })
        })
}

impl Snapshotter {
    /// Unmounts the private mounts of `r`'s device that its gone process left (the
    /// directories `thinsnap-<purpose>-<pid>-*` it made), then removes the snapshot. Any
    /// other mount of the device is left alone, and the removal then fails as in use.
    pub(super) fn remove_abandoned(&self, r: &Record, a: &Abandoned, active: bool) -> Result<()> {
        if let (true, Some(pid)) = (active, a.pid) {
            let dev = self.activate(r)?;
            let prefix = format!("thinsnap-{}-{pid}-", a.purpose);
            for mp in thinpool::fs::mounts_of(dev.device)? {
                let ours = mp
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix));
                if ours {
                    thinpool::fs::umount(&mp)?;
                    let _ = std::fs::remove_dir(&mp);
                    info!(key = %r.key, mount = %mp.display(), "unmounted the abandoned mount");
                }
            }
        }
        self.remove_record(&r.key, false)
    }
}
