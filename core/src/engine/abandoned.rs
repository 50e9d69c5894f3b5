//! Temporary snapshots of imports and exports whose process is gone. `image import` and
//! `image export` run in their own process (the CLI): one killed midway leaves its active
//! snapshot or view behind, and the private mount it worked through. Reconciliation (at
//! start-up, `thinsnap gc`, `thinsnap repair`) removes that mount with every temporary
//! mount of a gone process, then the snapshot; `thinsnap check` reports both.

use super::Engine;
use crate::error::Result;
use crate::{
    labels::{EXPORTING_LABEL, IMPORTING_LABEL},
    process,
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
            (!process::alive(tag)).then(|| Abandoned {
                purpose,
                pid: process::pid(tag),
            })
        })
}

impl Engine {
    /// Removes the snapshot of a gone import or export. The private mount its process
    /// worked through was removed earlier in the same pass (with every temporary mount of a
    /// gone process); any other mount of the device is left alone, and the removal then
    /// fails as in use.
    pub(super) fn remove_abandoned(&self, r: &Record) -> Result<()> {
        self.remove(&r.key)
    }
}
