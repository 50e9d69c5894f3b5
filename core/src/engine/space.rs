//! The free-space check before new devices: running containers keep room to write.

use thinpool::units;

use super::Engine;
use crate::error::{Error, Result};

impl Engine {
    /// Refuses new devices while free data or metadata space is under `min_free_space`,
    /// or while the kernel reports the pool unwritable; the error says how to get space.
    pub(super) fn check_space(&self) -> Result<()> {
        let st = tracing::debug_span!("check_space").in_scope(|| self.pool.check_writable())?;
        let min = self.config.min_free_space;
        let data_free = 1.0 - st.data_fraction();
        let meta_free = 1.0 - st.meta_fraction();
        if data_free >= min && meta_free >= min {
            return Ok(());
        }
        let (what, used, total) = if data_free < min {
            ("data", st.data_used_bytes(), st.data_total_bytes())
        } else {
            ("metadata", st.meta_used_bytes(), st.meta_total_bytes())
        };
        let a = &self.config.autogrow;
        let max = if what == "data" {
            a.max_data_size
        } else {
            a.max_metadata_size
        };
        let fix = if a.enabled && total >= max {
            format!("the pool reached its autogrow maximum (pool.autogrow.max_{what}_size = {}): raise it, grow the pool with `thinsnap pool grow`, or remove unused snapshots", units::format_size(max))
        } else if a.enabled {
            "autogrow is growing the pool: retry shortly, or grow it with `thinsnap pool grow`"
                .to_string()
        } else {
            "grow it with `thinsnap pool grow`, or remove unused snapshots".to_string()
        };
        Err(Error::ResourceExhausted(format!(
            "pool {} has too little free {what} space for a new snapshot ({} of {} used; at least {:.0}% must stay free): {fix}",
            self.config.pool_name,
            units::format_size(used),
            units::format_size(total),
            min * 100.0
        )))
    }

    /// Refuses a device size beyond the configured maximum (`max_size`, or the pool's data
    /// size times `overcommit`): `what` names where it was asked for.
    pub(super) fn check_size(&self, bytes: u64, what: &str) -> Result<()> {
        let (max, why) = match self.config.max_size {
            Some(m) => (m, "`max_size`".to_string()),
            None => {
                let data = self.pool.data_bytes()?;
                (
                    data.saturating_mul(self.config.overcommit),
                    format!(
                        "the pool's data size {} times `overcommit` = {}",
                        units::format_size(data),
                        self.config.overcommit
                    ),
                )
            }
        };
        if bytes > max {
            return Err(Error::InvalidArgument(format!(
                "{what} asks for {}, more than the largest size allowed, {} ({why}): ask for less, or raise `max_size` or `overcommit` in thinsnap's configuration",
                units::format_size(bytes),
                units::format_size(max)
            )));
        }
        Ok(())
    }
}
