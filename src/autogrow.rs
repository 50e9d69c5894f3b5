//! The pool watcher: grows the pool by itself (`[pool.autogrow]`). It wakes on the
//! kernel's dm events (the pool crossing its low-water mark, which it sets at the
//! configured threshold; running out of space; changing mode) and every `check_interval`,
//! and when free data or metadata space is under the threshold grows that device by its
//! step, up to its maximum. Every grow is logged and counted ([`Metrics`]); at the maximum
//! it says so once, and new snapshots are then refused by the free-space check (with a
//! message naming the maximum) while running containers keep the space that is left.

use std::sync::Arc;

use thinpool::{units, PoolMode, PoolStatus};
use tracing::{info, info_span, warn};

use thinsnap_core::{config::Autogrow, Engine};

use crate::metrics::{Grown, Metrics};

/// What one check did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Check {
    /// New data size, if the data device was grown.
    pub data: Option<u64>,
    /// New metadata size, if the metadata device was grown.
    pub metadata: Option<u64>,
    /// A device needs to grow but is at its maximum.
    pub at_max: bool,
}

/// Starts the watcher thread when `[pool.autogrow] enabled`; returns whether it runs.
pub fn spawn(snap: Arc<Engine>, metrics: Arc<Metrics>) -> bool {
    let cfg = snap.config().autogrow.clone();
    if !cfg.enabled {
        return false;
    }
    if let Some(lvm) = snap.pool_lvm() {
        match lvm.metadata_profile() {
            Ok(Some(p)) if p == thinpool::lvm::PROFILE => {
                info!(
                    "pool autogrow: LVM autoextends {}/{} itself (its profile {p} sets \
                     thin_pool_autoextend_threshold, with dmeventd monitoring it): thinsnap \
                     leaves growing to LVM",
                    lvm.vg, lvm.lv
                );
                return false;
            }
            Ok(_) => {}
            Err(e) => warn!("pool autogrow: cannot read the LVM profile of the pool: {e}"),
        }
    }
    let res = std::thread::Builder::new()
        .name("autogrow".into())
        .spawn(move || run(&snap, &metrics, &cfg));
    if let Err(e) = res {
        warn!("pool autogrow: cannot start its thread: {e}");
        return false;
    }
    true
}

fn run(snap: &Engine, metrics: &Metrics, cfg: &Autogrow) {
    let _span = info_span!("autogrow", pool = %snap.config().pool_name).entered();
    info!(
        threshold = format!("{:.0}%", cfg.threshold * 100.0),
        data_step = %units::format_size(cfg.data_step),
        max_data_size = %units::format_size(cfg.max_data_size),
        "pool autogrow on"
    );
    let waiter = thinpool::dm::EventWaiter::new()
        .map_err(|e| {
            warn!(
                "pool autogrow: no dm events ({e}); checking every {:?} only",
                cfg.check_interval
            )
        })
        .ok();
    let mut was_at_max = false;
    let mut lwm_set = false;
    loop {
        match check(snap, metrics, cfg, !lwm_set) {
            Ok(c) => {
                lwm_set = true;
                if c.at_max && !was_at_max {
                    warn!(
                        "pool autogrow: the pool is at its maximum (pool.autogrow.max_data_size \
                         {}, max_metadata_size {}) and under {:.0}% free: new snapshots will be \
                         refused once free space drops under min_free_space; raise the maximum, \
                         grow the pool by hand (`thinsnap pool grow`) or remove snapshots",
                        units::format_size(cfg.max_data_size),
                        units::format_size(cfg.max_metadata_size),
                        cfg.threshold * 100.0
                    );
                }
                was_at_max = c.at_max;
            }
            Err(e) => {
                metrics.grow_failed();
                warn!("pool autogrow: {e}");
            }
        }
        match &waiter {
            Some(w) => {
                if let Err(e) = w.wait(cfg.check_interval) {
                    warn!("pool autogrow: waiting for dm events failed: {e}");
                    std::thread::sleep(cfg.check_interval);
                }
            }
            None => std::thread::sleep(cfg.check_interval),
        }
    }
}

/// The size a device grows to when its free share is under the threshold: one step more,
/// capped at the maximum; None when it is not under the threshold or already at the
/// maximum (the bool says which).
fn target(free: f64, cur: u64, step: u64, max: u64, threshold: f64) -> (Option<u64>, bool) {
    if free >= threshold {
        return (None, false);
    }
    let to = cur.saturating_add(step).min(max);
    if to > cur {
        (Some(to), false)
    } else {
        (None, true)
    }
}

/// Checks the pool once and grows what is under the threshold; with `set_lwm` (or after a
/// grow) points the kernel's low-water mark at the threshold.
///
/// # Errors
/// When the pool's status cannot be read or the grow fails.
pub fn check(
    snap: &Engine,
    metrics: &Metrics,
    cfg: &Autogrow,
    set_lwm: bool,
) -> anyhow::Result<Check> {
    let st: PoolStatus = snap.pool_status(true)?;
    if matches!(st.mode, PoolMode::ReadOnly | PoolMode::Failed) || st.needs_check {
        // Growing cannot help; `thinsnap pool status` and the requests' errors say why.
        return Ok(Check::default());
    }
    let data_total = snap.pool_data_bytes()?;
    let (data, data_max) = target(
        1.0 - st.data_fraction(),
        data_total,
        cfg.data_step,
        cfg.max_data_size,
        cfg.threshold,
    );
    let (metadata, meta_max) = target(
        1.0 - st.meta_fraction(),
        st.meta_total_bytes(),
        cfg.metadata_step,
        cfg.max_metadata_size,
        cfg.threshold,
    );
    if data.is_some() || metadata.is_some() {
        snap.grow_pool(data.unwrap_or(data_total), metadata)?;
        let after = snap.pool_status(true)?;
        if data.is_some() {
            metrics.grew(Grown::Data);
        }
        if metadata.is_some() {
            metrics.grew(Grown::Metadata);
        }
        info!(
            data = %format!("{} -> {}", units::format_size(st.data_total_bytes()), units::format_size(after.data_total_bytes())),
            metadata = %format!("{} -> {}", units::format_size(st.meta_total_bytes()), units::format_size(after.meta_total_bytes())),
            data_used = format!("{:.1}%", st.data_fraction() * 100.0),
            metadata_used = format!("{:.1}%", st.meta_fraction() * 100.0),
            "pool autogrow: grew the pool"
        );
    }
    if set_lwm || data.is_some() {
        let blocks = (snap.pool_data_bytes()? as f64 * cfg.threshold) as u64
            / units::sectors_to_bytes(st.block_size).max(1);
        snap.set_low_water_mark(thinpool::DataBlocks(blocks))?;
    }
    Ok(Check {
        data,
        metadata,
        at_max: data_max || meta_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_a_step_up_to_the_maximum() {
        let g = 1u64 << 30;
        assert_eq!(target(0.5, 4 * g, g, 8 * g, 0.2), (None, false));
        assert_eq!(target(0.1, 4 * g, g, 8 * g, 0.2), (Some(5 * g), false));
        assert_eq!(target(0.1, 7 * g + 1, g, 8 * g, 0.2), (Some(8 * g), false));
        assert_eq!(target(0.1, 8 * g, g, 8 * g, 0.2), (None, true));
    }
}
