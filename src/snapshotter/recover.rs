//! Startup reconciliation: compares the store with the pool's thin ids and active devices,
//! finishes or rolls back half-done operations, deletes thin devices nobody records,
//! re-activates what active snapshots need, removes what killed imports and exports left
//! ([`abandoned`]), brings Docker volumes' mounts in line with their records
//! ([`super::volume`]), and reports one line per action.

use std::collections::{BTreeMap, BTreeSet};

use thinpool::{RemoveMode, ThinId};
use tracing::{info, warn};

use super::{abandoned, Error, Result, Snapshotter};
use crate::store::{Kind, Record, State};

/// What reconciliation found and (when applying) did, one line per action.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Actions taken, or that would be taken.
    pub actions: Vec<String>,
    /// Problems that need a person (e.g. a record whose thin device is gone).
    pub problems: Vec<String>,
}

impl Report {
    /// Whether the store and the pool agree.
    pub fn is_clean(&self) -> bool {
        self.actions.is_empty() && self.problems.is_empty()
    }
}

/// Performs (with `apply`) or only lists one reconciliation action, reporting it as done
/// or, when it fails, as a problem.
pub(super) fn run_action(
    apply: bool,
    report: &mut Report,
    line: String,
    f: &dyn Fn() -> Result<()>,
) {
    if apply {
        match f() {
            Ok(()) => {
                info!("recovery: {line}");
                report.actions.push(line);
            }
            Err(e) => {
                warn!("recovery: {line} failed: {e}");
                report.problems.push(format!("{line} failed: {e}"));
            }
        }
    } else {
        report.actions.push(line);
    }
}

impl Snapshotter {
    /// Reconciles the store with the pool. With `apply`, fixes what it finds; without,
    /// only reports (`thinsnap check`).
    ///
    /// # Errors
    /// When the pool's metadata or the store cannot be read; failures of individual
    /// repairs are reported as problems instead.
    pub fn recover(&self, apply: bool) -> Result<Report> {
        self.reconcile(apply, true)
    }

    /// Garbage collection while serving: finishes pending removals, deletes thin devices
    /// no record owns, removes stale devices. Unlike startup recovery it leaves records in
    /// a trying state alone (they may be in flight). Returns the report and the data bytes
    /// freed in the pool.
    ///
    /// # Errors
    /// As [`Snapshotter::recover`].
    pub fn gc(&self, dry_run: bool) -> Result<(Report, u64)> {
        let before = self.pool.status()?.data_used_bytes();
        let report = self.reconcile(!dry_run, false)?;
        let after = self.pool.status()?.data_used_bytes();
        Ok((report, before.saturating_sub(after)))
    }

    /// The thin ids the pool's metadata holds, and the pool's active thin devices by id.
    fn kernel_view(&self) -> Result<(BTreeSet<u32>, BTreeMap<u32, String>)> {
        let in_pool = self.pool.thin_ids()?.into_iter().map(ThinId::get).collect();
        let active = self
            .pool
            .active_thins()?
            .into_iter()
            .map(|(id, name, _)| (id.get(), name.to_string()))
            .collect();
        Ok((in_pool, active))
    }

    fn reconcile(&self, apply: bool, startup: bool) -> Result<Report> {
        let mut report = Report::default();
        if let Some(why) = self.unfinished_job()? {
            report.problems.push(why);
        }
        let records = self.store.read()?.all()?;
        let bases = self.store.read()?.bases()?;
        let (in_pool, active) = self.kernel_view()?;
        let act = |report: &mut Report, line: String, f: &dyn Fn() -> Result<()>| {
            run_action(apply, report, line, f)
        };

        for b in &bases {
            if b.state != State::Ready && !startup {
                continue;
            }
            if b.state != State::Ready {
                act(
                    &mut report,
                    format!(
                        "roll back half-made {} base device (thin id {})",
                        b.fs, b.thin_id
                    ),
                    &|| self.undo_base(b),
                );
            } else if !in_pool.contains(&b.thin_id) {
                report.problems.push(format!("base device {} (thin id {}) is missing from the pool; new snapshots will get a fresh one after `thinsnap repair`", b.fs, b.thin_id));
            }
        }
        for r in &records {
            if let (State::Ready, Some(a)) = (r.state, abandoned::abandoned(r)) {
                act(
                    &mut report,
                    format!(
                        "remove snapshot {:?} of an {} abandoned by process {} (gone)",
                        r.key,
                        a.purpose,
                        a.pid.map_or("?".into(), |p| p.to_string())
                    ),
                    &|| self.remove_abandoned(r, &a, active.contains_key(&r.thin_id)),
                );
                continue;
            }
            match r.state {
                State::Creating if !startup => {}
                State::Creating => act(
                    &mut report,
                    format!("roll back interrupted create of snapshot {:?} (thin id {})", r.key, r.thin_id),
                    &|| self.undo_create(r),
                ),
                State::Removing if !startup || !self.config.async_remove || !apply => act(
                    &mut report,
                    format!("finish interrupted removal of snapshot {:?} (thin id {})", r.key, r.thin_id),
                    &|| self.finish_remove(r),
                ),
                State::Removing => {}
                State::Ready if !in_pool.contains(&r.thin_id) => report.problems.push(format!(
                    "snapshot {:?} records thin id {} but the pool has no such device: its data is lost; remove it with `thinsnap snapshot rm`",
                    r.key, r.thin_id
                )),
                State::Ready if startup && r.kind != Kind::Committed && !active.contains_key(&r.thin_id) => act(
                    &mut report,
                    format!("re-activate {} snapshot {:?} (thin id {})", r.kind.as_str(), r.key, r.thin_id),
                    &|| self.activate(r).map(|_| ()),
                ),
                State::Ready => {}
            }
        }

        self.reconcile_volumes(apply, startup, &mut report, &in_pool, &active)?;

        // Thin ids in the pool that no record owns: leaks of operations that crashed before
        // their record was written. Only ids thinsnap allocated (below its next id) are ours.
        let known: BTreeSet<u32> = self
            .store
            .read()?
            .thin_ids()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        // Removals above changed the pool: look again, or their ids would look orphaned.
        let (in_pool, active) = if apply && !report.actions.is_empty() {
            self.kernel_view()?
        } else {
            (in_pool, active)
        };
        let next = self.store.read()?.meta("next_thin_id")? as u32;
        let wrapped = known.iter().any(|&id| id >= next);
        for &id in in_pool.difference(&known) {
            if id < next || wrapped {
                act(
                    &mut report,
                    format!("delete orphaned thin id {id} (no snapshot records it)"),
                    &|| {
                        let tid = ThinId::new(id)?;
                        self.pool_change("recover.after-message", |p| p.delete_thin(tid))
                            .map(|_| ())
                    },
                );
            } else {
                report.problems.push(format!(
                    "thin id {id} in the pool was not created by thinsnap; left alone (is the pool shared with another tool?)"
                ));
            }
        }
        // Active devices of ours whose id nobody records and the pool no longer holds.
        for (id, name) in &active {
            if !known.contains(id) && !in_pool.contains(id) {
                act(&mut report, format!("remove stale device {name}"), &|| {
                    self.pool
                        .deactivate(ThinId::new(*id)?, RemoveMode::Now)
                        .map_err(Error::Pool)
                });
            }
        }
        if apply && startup {
            let txn = *self.lock_txn();
            let mut tx = self.store.write()?;
            tx.set_meta("pool_txn", txn)?;
            tx.commit()?;
        }
        Ok(report)
    }

    /// Why the store is not ready to serve, if a job that must finish first (a migration)
    /// is unfinished.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn unfinished_job(&self) -> Result<Option<String>> {
        Ok((self.store.read()?.meta(crate::store::META_JOB_PENDING)? != 0).then(|| {
            "a migration from Docker's devicemapper driver is unfinished: run `thinsnap migrate docker-devicemapper` again to finish it".to_string()
        }))
    }

    /// Snapshots in the store, for diagnostics.
    pub fn records(&self) -> Result<Vec<Record>> {
        Ok(self.store.read()?.all()?)
    }
}
