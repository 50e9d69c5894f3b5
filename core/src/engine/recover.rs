//! Reconciliation of the store with the pool, at every start (`thinsnap repair` too;
//! `thinsnap check` only reports) and while serving (`thinsnap gc`, which leaves records in
//! flight alone). One pass for every owner of a thin device: records in a trying state are
//! finished or rolled back through the device lifecycle; then what each kind of owner needs
//! beyond that (active snapshots re-activated, abandoned imports removed, volume mounts
//! brought in line with their records); then thin ids no record owns. One report line per
//! action.

use std::collections::{BTreeMap, BTreeSet};

use thinpool::{RemoveMode, ThinId};
use tracing::{info, warn};

use super::{
    abandoned,
    lifecycle::{Creatable, Owned},
    lock, Engine,
};
use crate::{
    error::Result,
    store::{Kind, Owner, Record, State, META_JOB_PENDING},
};

/// What reconciliation found and (when applying) did, one line per action.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Actions taken, or that would be taken.
    pub actions: Vec<String>,
    /// Problems that need a person (e.g. a record whose thin device is gone).
    pub problems: Vec<String>,
    /// What was seen and is fine as it is (e.g. another tool's thin devices in a shared
    /// pool).
    pub notes: Vec<String>,
}

impl Report {
    /// Whether the store and the pool agree.
    pub fn is_clean(&self) -> bool {
        self.actions.is_empty() && self.problems.is_empty()
    }
}

/// The thin ids the pool's metadata holds, and its active thin devices by id.
pub(super) struct KernelView {
    pub in_pool: BTreeSet<ThinId>,
    pub active: BTreeMap<ThinId, String>,
}

/// One reconciliation pass.
pub(super) struct Pass<'a> {
    pub engine: &'a Engine,
    /// Change things (else only report).
    pub apply: bool,
    /// At start-up, with nothing in flight (else `gc` while serving).
    pub startup: bool,
    pub report: Report,
    /// While serving: Ready owners whose device the first look at the pool did not show
    /// (made since, perhaps), with the problem to report if a second look agrees.
    pub suspects: Vec<(Owner, ThinId, String)>,
}

impl Pass<'_> {
    /// Performs (with `apply`) or only lists one action, reporting it as done or, when it
    /// fails, as a problem.
    pub fn act(&mut self, line: String, f: &dyn Fn() -> Result<()>) {
        if !self.apply {
            self.report.actions.push(line);
            return;
        }
        match f() {
            Ok(()) => {
                info!("recovery: {line}");
                self.report.actions.push(line);
            }
            Err(e) => {
                warn!("recovery: {line} failed: {e}");
                self.report.problems.push(format!("{line} failed: {e}"));
            }
        }
    }

    /// A problem for a person.
    pub fn problem(&mut self, line: String) {
        self.report.problems.push(line);
    }

    /// The device lifecycle's part, the same for every owner: an interrupted create is
    /// rolled back (at start-up only: while serving it may be in flight), an interrupted
    /// removal finished, a device gone from the pool reported. Returns whether `rec` is
    /// Ready with its device in the pool.
    pub(super) fn settle<R: Creatable>(
        &mut self,
        rec: &R,
        view: &KernelView,
        finish: Option<&dyn Fn() -> Result<()>>,
    ) -> bool {
        // While serving, an owner whose operation is in flight is that operation's to
        // finish (its record may be Creating or Removing on purpose).
        let Some(_live) = self.engine.claim(rec.owner()) else {
            return false;
        };
        let d = *rec.device();
        match d.state {
            // A snapshot whose device was made is finished (its Ready record may have been
            // the non-durable commit a crash lost, after the client got its mounts).
            State::Creating if self.startup && R::FINISH && view.in_pool.contains(&d.thin_id) => {
                self.act(
                    format!(
                        "finish interrupted create of {} (thin id {})",
                        rec.owner(),
                        d.thin_id
                    ),
                    &|| rec.finish_create(self.engine),
                );
                false
            }
            State::Creating if self.startup => {
                self.act(
                    format!(
                        "roll back interrupted create of {} (thin id {})",
                        rec.owner(),
                        d.thin_id
                    ),
                    &|| self.engine.undo_create(rec),
                );
                false
            }
            State::Creating => false,
            State::Removing => {
                if let Some(finish) = finish {
                    self.act(
                        format!(
                            "finish interrupted removal of {} (thin id {})",
                            rec.owner(),
                            d.thin_id
                        ),
                        finish,
                    );
                }
                false
            }
            State::Ready if !view.in_pool.contains(&d.thin_id) => {
                let line = format!(
                    "{} records thin id {} but the pool has no such device: {}",
                    rec.owner(),
                    d.thin_id,
                    lost_hint(rec)
                );
                if self.startup {
                    self.problem(line);
                } else {
                    self.suspects.push((rec.owner(), d.thin_id, line));
                }
                false
            }
            State::Ready => true,
        }
    }
}

/// What to do about an owner whose device is gone from the pool.
fn lost_hint<R: Owned>(rec: &R) -> String {
    match rec.owner() {
        Owner::Snapshot(_) => "its data is lost; remove it with `thinsnap snapshot rm`".into(),
        Owner::Base(_) => "new snapshots will get a fresh one after `thinsnap repair`".into(),
        Owner::Volume(n) => {
            format!("its data is lost; remove it with `docker volume rm {n}`")
        }
        Owner::Reclaim(_) => "nothing is lost: it was removed already".into(),
    }
}

impl Engine {
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
    /// As [`Engine::recover`].
    pub fn gc(&self, dry_run: bool) -> Result<(Report, u64)> {
        let before = self.pool.status()?.data_used_bytes();
        let mut report = self.reconcile(!dry_run, false)?;
        // Removed snapshots' devices not reclaimed yet are collected now.
        let reclaimed = if dry_run {
            self.store
                .read()?
                .tombstones()?
                .into_iter()
                .map(|t| t.was)
                .collect()
        } else {
            self.reclaim_all()?
        };
        for key in reclaimed {
            report
                .actions
                .push(format!("reclaim the device of removed snapshot {key:?}"));
        }
        let after = self.pool.status()?.data_used_bytes();
        Ok((report, before.saturating_sub(after)))
    }

    fn kernel_view(&self) -> Result<KernelView> {
        Ok(KernelView {
            in_pool: self.pool.thin_ids()?,
            active: self
                .pool
                .active_thins()?
                .into_iter()
                .map(|(id, name, _)| (id, name))
                .collect(),
        })
    }

    fn reconcile(&self, apply: bool, startup: bool) -> Result<Report> {
        let mut pass = Pass {
            engine: self,
            apply,
            startup,
            report: Report::default(),
            suspects: Vec::new(),
        };
        if let Some(why) = self.unfinished_job()? {
            pass.problem(why);
        }
        let view = self.kernel_view()?;
        // A process killed while it had a device mounted for a moment (growing a new
        // snapshot's filesystem, tidying a base device, an import or export) left the
        // mount, and its device open: remove it first, so rolling back can proceed.
        for dir in self.pool.stale_temp_mounts()? {
            pass.act(
                format!(
                    "remove temporary mount {} (its process is gone)",
                    dir.display()
                ),
                &|| Ok(self.pool.remove_temp_mount(&dir)?),
            );
        }
        for b in self.store.read()?.bases()? {
            let ready = pass.settle(&b, &view, None);
            if ready && pass.apply && pass.startup && !b.lost_found_removed {
                pass.act(
                    format!(
                        "remove lost+found from the {} base device (thin id {}), made by an earlier version",
                        b.device.fs, b.device.thin_id
                    ),
                    &|| self.remove_base_lost_found(&b),
                );
            }
        }
        self.reconcile_snapshots(&mut pass, &view)?;
        self.reconcile_volumes(&mut pass, &view)?;
        let buried = self.store.read()?.tombstone_count()?;
        if buried > 0 {
            pass.report.notes.push(format!(
                "{buried} removed snapshot(s)' devices wait to be reclaimed (in the background, by Cleanup, or `thinsnap gc`)"
            ));
        }
        if startup {
            // Removals above changed the pool: look again, or their ids would look orphaned.
            let view = if apply && !pass.report.actions.is_empty() {
                self.kernel_view()?
            } else {
                view
            };
            self.reconcile_orphans(&mut pass, &view, false)?;
        } else {
            // While serving, requests change the pool between the looks: only what two
            // looks agree on, around the store's, is reported.
            self.reconcile_orphans(&mut pass, &view, true)?;
        }
        Ok(pass.report)
    }

    /// Whether `owner` still records thin id `id`, Ready.
    fn still_ready(&self, owner: &Owner, id: ThinId) -> Result<bool> {
        let r = self.store.read()?;
        let device = match owner {
            Owner::Snapshot(k) => r.get(k)?.map(|x| x.device),
            Owner::Base(fs) => r.base(*fs)?.map(|x| x.device),
            Owner::Volume(n) => r.volume(n)?.map(|x| x.device),
            Owner::Reclaim(id) => r.tombstone(*id)?.map(|x| x.device),
        };
        Ok(device.is_some_and(|d| d.thin_id == id && d.state == State::Ready))
    }

    /// Snapshots: the lifecycle, then imports and exports abandoned by their process, and
    /// the devices active snapshots and views need (after a reboot).
    fn reconcile_snapshots(&self, pass: &mut Pass, view: &KernelView) -> Result<()> {
        // Removals left to Cleanup (async_remove) stay for it at start-up.
        let defer_removals = pass.startup && pass.apply && self.config.async_remove;
        for r in self.store.read()?.all()? {
            if let (State::Ready, Some(a)) = (r.device.state, abandoned::abandoned(&r)) {
                pass.act(
                    format!(
                        "remove snapshot {:?} of an {} abandoned by process {} (gone)",
                        r.key,
                        a.purpose,
                        a.pid.map_or("?".into(), |p| p.to_string())
                    ),
                    &|| self.remove_abandoned(&r),
                );
                continue;
            }
            let finish = || self.finish_remove(&r);
            let ready = pass.settle(
                &r,
                view,
                (!defer_removals).then_some(&finish as &dyn Fn() -> Result<()>),
            );
            if ready
                && r.kind == Kind::Committed
                && view.active.contains_key(&r.device.thin_id)
                && self.pool.open_count(r.device.thin_id)? == Some(0)
            {
                // A Commit's rename reached the store before its deactivation finished (a
                // device still open is one whose removal the kernel defers until then).
                pass.act(
                    format!(
                        "deactivate committed snapshot {:?}'s device (thin id {})",
                        r.key, r.device.thin_id
                    ),
                    &|| match self.claim(r.owner()) {
                        Some(_live) => Ok(self.deactivate(r.device.thin_id, RemoveMode::Now)?),
                        None => Ok(()),
                    },
                );
            }
            if ready
                && pass.startup
                && r.kind != Kind::Committed
                && !view.active.contains_key(&r.device.thin_id)
            {
                pass.act(
                    format!(
                        "re-activate {} snapshot {:?} (thin id {})",
                        r.kind.as_str(),
                        r.key,
                        r.device.thin_id
                    ),
                    &|| self.activate(&r).map(|_| ()),
                );
            }
        }
        Ok(())
    }

    /// Thin ids in the pool that no record owns are another tool's (thinsnap records the
    /// intent before it creates a device, so it leaks none): reported, never deleted, and
    /// never allocated. Active devices named as thinsnap's whose id the pool no longer
    /// holds are dead mappings: removed.
    fn reconcile_orphans(&self, pass: &mut Pass, view: &KernelView, serving: bool) -> Result<()> {
        let known: BTreeSet<ThinId> = self
            .store
            .read()?
            .thin_ids()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        // While serving, an id created or deleted since the first look is not another
        // tool's: only ids both looks show (around the store's read) are.
        let second = if serving {
            Some(self.kernel_view()?)
        } else {
            None
        };
        let in_pool: BTreeSet<ThinId> = match &second {
            Some(v) => view.in_pool.intersection(&v.in_pool).copied().collect(),
            None => view.in_pool.clone(),
        };
        if let Some(v) = &second {
            for (owner, id, line) in std::mem::take(&mut pass.suspects) {
                if !v.in_pool.contains(&id) && self.still_ready(&owner, id)? {
                    pass.problem(line);
                }
            }
        }
        let foreign: BTreeSet<ThinId> = in_pool.difference(&known).copied().collect();
        if !foreign.is_empty() {
            let ids: Vec<String> = foreign.iter().map(ToString::to_string).collect();
            pass.report.notes.push(format!(
                "thin id(s) {} in the pool are not thinsnap's (no record owns them): left alone",
                ids.join(", ")
            ));
        }
        lock(&self.foreign).extend(foreign);
        for (id, name) in &view.active {
            if !known.contains(id) && !view.in_pool.contains(id) {
                pass.act(format!("remove stale device {name}"), &|| {
                    Ok(self.pool.deactivate(*id, RemoveMode::Now)?)
                });
            }
        }
        Ok(())
    }

    /// Why the store is not ready to serve, if a job that must finish first (a migration)
    /// is unfinished.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn unfinished_job(&self) -> Result<Option<String>> {
        Ok((self.store.read()?.meta(META_JOB_PENDING)? != 0).then(|| {
            "a migration from Docker's devicemapper driver is unfinished: run `thinsnap migrate docker-devicemapper` again to finish it".to_string()
        }))
    }

    /// Snapshots in the store, for diagnostics.
    pub fn records(&self) -> Result<Vec<Record>> {
        Ok(self.store.read()?.all()?)
    }
}
