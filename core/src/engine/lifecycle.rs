//! The one device lifecycle every owner of a thin device shares (snapshots, base devices,
//! volumes), after containerd's devmapper `transition`: commit the intent (a record in a
//! trying state), change the kernel, commit the result. A failure rolls back what was done;
//! a crash leaves the trying record, which recovery finishes or rolls back.
//!
//! | step | create | remove | grow |
//! |---|---|---|---|
//! | 1. store | record `Creating` with a fresh thin id | record `Removing` | record the new size, grow pending |
//! | 2. kernel | `create_thin` or `create_snap`, then the owner's steps | discard; deactivate; `delete` | an active device's table at the new size; grow its filesystem |
//! | 3. store | record `Ready` | record deleted, id freed | grow done |
//!
//! A grow cannot be rolled back (filesystems do not shrink): once its intent is recorded,
//! every activation uses the new size, so the device is never smaller than its filesystem,
//! and recovery finishes it.

use thinpool::{RemoveMode, ThinId};
use tracing::warn;

use super::{lock, Engine};
use crate::{
    error::{Error, Result},
    failpoint::hit as fp,
    store::{Base, Device, Owner, Record, State, StoreResult, Tombstone, Volume, WriteTx},
};

/// The crash points of creating one kind of device.
pub(super) struct CreatePoints {
    /// After the intent is committed.
    pub intent: &'static str,
    /// After the pool message.
    pub message: &'static str,
    /// After the record is Ready.
    pub ready: &'static str,
    /// After a rollback's `delete` message.
    pub undo: &'static str,
}

/// The crash points of removing one kind of device.
pub(super) struct RemovePoints {
    /// After the record is marked Removing.
    pub mark: &'static str,
    /// After the device's blocks are discarded.
    pub discard: &'static str,
    /// After the device is deactivated.
    pub deactivate: &'static str,
    /// After the `delete` message.
    pub delete: &'static str,
    /// After the record is deleted.
    pub forget: &'static str,
}

/// The crash points of growing one kind of device.
pub(super) struct GrowPoints {
    /// After the intent (the new size, the grow pending) is committed.
    pub intent: &'static str,
    /// After the device has its new size (an active one's table reloaded).
    pub reload: &'static str,
    /// After its filesystem was grown.
    pub grow: &'static str,
    /// After the record says the grow is done.
    pub done: &'static str,
}

/// A record that owns a thin device.
pub(super) trait Owned: Clone {
    /// Its device.
    fn device(&self) -> &Device;
    /// Its device, to change.
    fn device_mut(&mut self) -> &mut Device;
    /// Who it is, in the thin-id table and in messages.
    fn owner(&self) -> Owner;
    /// Writes the record (and its thin id's owner).
    fn put(&self, tx: &mut WriteTx) -> StoreResult<()>;
    /// Deletes the record and frees its thin id.
    fn forget(&self, tx: &mut WriteTx) -> StoreResult<()>;
    /// Writes the record over the stored one that differs only in its device's state (a
    /// create's intent becoming Ready); [`Owned::put`] unless an owner knows a cheaper way.
    fn settle(&self, tx: &mut WriteTx) -> StoreResult<()> {
        self.put(tx)
    }
    /// Lets go of the device before it is rolled back or removed (a volume unmounts its
    /// directory); nothing by default.
    fn release(&self, _engine: &Engine) -> Result<()> {
        Ok(())
    }
}

/// A record whose device is created through the lifecycle.
pub(super) trait Creatable: Owned {
    /// Crash points of its create.
    const CREATE: CreatePoints;
    /// Whether a create interrupted after its device was made is finished by recovery
    /// ([`Creatable::finish_create`]) rather than rolled back; its Ready record is then
    /// committed without waiting for the disk (one durable commit per create).
    const FINISH: bool = false;
    /// Finishes an interrupted create whose device exists (when [`Creatable::FINISH`]).
    fn finish_create(&self, engine: &Engine) -> Result<()> {
        let _ = engine;
        unreachable!("only owners with FINISH are finished")
    }
}

/// A record whose device can be removed (bases are only rolled back).
pub(super) trait Removable: Owned {
    /// Crash points of its removal.
    const REMOVE: RemovePoints;
    /// Whether discarding the device's blocks before its delete can give anything back:
    /// yes, unless it is known to have provisioned no block of its own.
    fn worth_discarding(&self, engine: &Engine) -> bool {
        let _ = engine;
        true
    }
}

/// A record whose device (and the filesystem on it) can grow.
pub(super) trait Growable: Owned {
    /// Crash points of its grow.
    const GROW: GrowPoints;
    /// The size before a grow that is not finished, if one is pending.
    fn grow_pending(&self) -> Option<u64>;
    /// Records (Some: the size before) or clears a pending grow.
    fn set_grow_pending(&mut self, from: Option<u64>);
    /// Grows the filesystem to fill the device, whose size is already the new one where
    /// it is active; growing a filesystem that fills its device already changes nothing.
    fn grow_fs(&self, engine: &Engine) -> Result<()>;
}

impl Creatable for Record {
    const CREATE: CreatePoints = CreatePoints {
        intent: "create.after-intent",
        message: "create.after-message",
        ready: "create.after-ready",
        undo: "undo-create.after-message",
    };
    const FINISH: bool = true;
    fn finish_create(&self, engine: &Engine) -> Result<()> {
        engine.finish_snapshot_create(self)
    }
}

impl Owned for Record {
    fn device(&self) -> &Device {
        &self.device
    }
    fn device_mut(&mut self) -> &mut Device {
        &mut self.device
    }
    fn owner(&self) -> Owner {
        Record::owner(self)
    }
    fn put(&self, tx: &mut WriteTx) -> StoreResult<()> {
        tx.put(self)
    }
    fn forget(&self, tx: &mut WriteTx) -> StoreResult<()> {
        tx.delete(&self.key, true).map(|_| ())
    }
    fn settle(&self, tx: &mut WriteTx) -> StoreResult<()> {
        tx.settle(self)
    }
}

impl Removable for Record {
    const REMOVE: RemovePoints = RemovePoints {
        mark: "remove.after-mark",
        discard: "remove.after-discard",
        deactivate: "remove.after-deactivate",
        delete: "remove.after-message",
        forget: "remove.after-store",
    };
}

impl Creatable for Base {
    const CREATE: CreatePoints = CreatePoints {
        intent: "base.after-intent",
        message: "base.after-message",
        ready: "base.after-ready",
        undo: "undo-base.after-message",
    };
}

impl Owned for Base {
    fn device(&self) -> &Device {
        &self.device
    }
    fn device_mut(&mut self) -> &mut Device {
        &mut self.device
    }
    fn owner(&self) -> Owner {
        Base::owner(self)
    }
    fn put(&self, tx: &mut WriteTx) -> StoreResult<()> {
        tx.put_base(self)
    }
    fn forget(&self, tx: &mut WriteTx) -> StoreResult<()> {
        tx.delete_base(self.device.fs).map(|_| ())
    }
}

impl Creatable for Volume {
    const CREATE: CreatePoints = CreatePoints {
        intent: "volume.after-intent",
        message: "volume.after-message",
        ready: "volume.after-ready",
        undo: "undo-volume.after-message",
    };
}

impl Owned for Volume {
    fn device(&self) -> &Device {
        &self.device
    }
    fn device_mut(&mut self) -> &mut Device {
        &mut self.device
    }
    fn owner(&self) -> Owner {
        Volume::owner(self)
    }
    fn put(&self, tx: &mut WriteTx) -> StoreResult<()> {
        tx.put_volume(self)
    }
    fn forget(&self, tx: &mut WriteTx) -> StoreResult<()> {
        tx.delete_volume(&self.name).map(|_| ())
    }
    fn release(&self, engine: &Engine) -> Result<()> {
        engine.unmount_volume_dir(self)
    }
}

impl Owned for Tombstone {
    fn device(&self) -> &Device {
        &self.device
    }
    fn device_mut(&mut self) -> &mut Device {
        &mut self.device
    }
    fn owner(&self) -> Owner {
        Tombstone::owner(self)
    }
    fn put(&self, tx: &mut WriteTx) -> StoreResult<()> {
        // Tombstones are made by `WriteTx::bury` only; nothing changes them after.
        let _ = tx;
        Ok(())
    }
    fn forget(&self, tx: &mut WriteTx) -> StoreResult<()> {
        tx.delete_tombstone(self.device.thin_id)
    }
}

/// A removed snapshot's device goes the way a snapshot's went: the same crash points.
impl Removable for Tombstone {
    const REMOVE: RemovePoints = <Record as Removable>::REMOVE;
    /// A device that never wrote a block of its own (a layer containerd never unpacked
    /// into, a view, a chain's intermediate snapshot) maps only blocks its parent still
    /// holds: discarding them would free nothing, yet costs an activation, the kernel
    /// unsharing its mapping tree, and a deactivation. A reading of the mapping trees made
    /// after it was removed (it cannot change since) tells.
    fn worth_discarding(&self, engine: &Engine) -> bool {
        engine.owns_blocks(self.device.thin_id, self.removed_ns)
    }
}

impl Growable for Volume {
    const GROW: GrowPoints = GrowPoints {
        intent: "volume-resize.after-intent",
        reload: "volume-resize.after-reload",
        grow: "volume-resize.after-grow",
        done: "volume-resize.after-ready",
    };
    fn grow_pending(&self) -> Option<u64> {
        self.resize_from
    }
    fn set_grow_pending(&mut self, from: Option<u64>) {
        self.resize_from = from;
    }
    fn grow_fs(&self, engine: &Engine) -> Result<()> {
        engine.grow_volume_fs(self)
    }
}

impl Removable for Volume {
    const REMOVE: RemovePoints = RemovePoints {
        mark: "volume-remove.after-mark",
        discard: "volume-remove.after-discard",
        deactivate: "volume-remove.after-deactivate",
        delete: "volume-remove.after-message",
        forget: "volume-remove.after-store",
    };
}

impl Engine {
    /// Creates a device: commits the intent (`make`'s record for a fresh thin id, after
    /// `check` passed in the same transaction, while the pool's free space is checked),
    /// creates the thin device (a snapshot of `origin`, or empty), runs `then` on it, and
    /// commits the record Ready. Any failure rolls back; a crash leaves the Creating record
    /// for recovery.
    ///
    /// An id the pool turns out to hold already (another tool's device on a shared pool)
    /// is never touched: the intent is dropped, the id is remembered as foreign, and the
    /// create starts again with another.
    pub(super) fn create_device<R: Creatable, T>(
        &self,
        check: impl Fn(&WriteTx) -> Result<()>,
        make: impl Fn(ThinId) -> R,
        origin: Option<ThinId>,
        then: impl FnOnce(&R) -> Result<T>,
    ) -> Result<(R, T)> {
        let mut tries = 0;
        let rec = loop {
            let rec = if tries == 0 {
                self.intend_with_space(&check, &make)?
            } else {
                self.intend(&check, &make)?
            };
            let id = rec.device().thin_id;
            match self.pool_change(R::CREATE.message, |p| match origin {
                // Under the origin's lock: a Commit may still be deactivating it.
                Some(o) => {
                    let _g = self.id_lock(o);
                    p.create_snapshot(id, o)
                }
                None => p.create_thin(id),
            }) {
                Ok(()) => break rec,
                Err(Error::Pool(thinpool::Error::AlreadyExists { .. })) if tries < 8 => {
                    warn!(%id, "thin id in use by something else in the pool: left alone, taking another");
                    lock(&self.foreign).insert(id);
                    let mut tx = self.store.write()?;
                    rec.forget(&mut tx)?;
                    tx.commit()?;
                    tries += 1;
                }
                Err(e) => {
                    self.roll_back(&rec);
                    return Err(e);
                }
            }
        };
        let made = then(&rec).and_then(|t| {
            let mut done = rec.clone();
            done.device_mut().state = State::Ready;
            let mut tx = self.store.write()?;
            if R::FINISH {
                tx.without_waiting_for_the_disk()?;
            }
            done.settle(&mut tx)?;
            tx.commit()?;
            fp(R::CREATE.ready);
            Ok((done, t))
        });
        if made.is_err() {
            self.roll_back(&rec);
        }
        made
    }

    /// [`Engine::intend`] with the free-space check ([`Engine::check_space`]) running
    /// alongside its durable commit: both pass before the kernel is changed, and a refused
    /// check drops the intent again (recovery does, after a crash in between).
    fn intend_with_space<R: Creatable>(
        &self,
        check: &impl Fn(&WriteTx) -> Result<()>,
        make: &impl Fn(ThinId) -> R,
    ) -> Result<R> {
        let (intent, space) = std::thread::scope(|s| {
            let space = s.spawn(|| self.check_space());
            let intent = self.intend(check, make);
            let space = space
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (intent, space)
        });
        let rec = intent?;
        if let Err(e) = space {
            let mut tx = self.store.write()?;
            rec.forget(&mut tx)?;
            tx.commit()?;
            return Err(e);
        }
        Ok(rec)
    }

    /// The intent of a create: `make`'s record for a fresh thin id (one the pool does not
    /// hold), committed Creating after `check` passed in the same transaction.
    fn intend<R: Creatable>(
        &self,
        check: &impl Fn(&WriteTx) -> Result<()>,
        make: &impl Fn(ThinId) -> R,
    ) -> Result<R> {
        let mut tx = self.store.write()?;
        check(&tx)?;
        let foreign = lock(&self.foreign).clone();
        let id = tx.allocate_id(|id| foreign.contains(&id))?;
        let rec = make(id);
        rec.put(&mut tx)?;
        tx.commit()?;
        fp(R::CREATE.intent);
        Ok(rec)
    }

    /// Rolls back a failed create, leaving it to recovery if that fails too.
    fn roll_back<R: Creatable>(&self, rec: &R) {
        if let Err(undo) = self.undo_create(rec) {
            warn!(owner = %rec.owner(), error = %undo, "rolling back a failed create failed; recovery will finish it");
        }
    }

    /// Rolls back a create: releases the device, deactivates and deletes it (an absent id
    /// is fine), and deletes the record.
    pub(super) fn undo_create<R: Creatable>(&self, rec: &R) -> Result<()> {
        rec.release(self)?;
        let id = rec.device().thin_id;
        self.deactivate(id, RemoveMode::Now)?;
        self.pool_change(R::CREATE.undo, |p| p.delete_thin(id))?;
        let mut tx = self.store.write()?;
        rec.forget(&mut tx)?;
        tx.commit()?;
        Ok(())
    }

    /// Grows `rec`'s device to `size` bytes: commits the intent (the record at the new
    /// size with the old one as its pending grow), then finishes it
    /// ([`Engine::finish_grow`]). A failure after the intent leaves the grow pending for
    /// the same request again or for recovery: nothing is lost, as the device is already
    /// at least as large as its filesystem.
    pub(super) fn grow_device<R: Growable>(&self, rec: &R, size: u64) -> Result<R> {
        let mut intent = rec.clone();
        let from = rec.grow_pending().unwrap_or(rec.device().size);
        intent.device_mut().size = size;
        intent.set_grow_pending(Some(from));
        let mut tx = self.store.write()?;
        intent.put(&mut tx)?;
        tx.commit()?;
        fp(R::GROW.intent);
        self.finish_grow(&intent)
    }

    /// Finishes a pending grow of `rec` (whose record has the new size): gives an active
    /// device its new size, grows the filesystem, and records the grow done. Running it
    /// again after a crash anywhere in it is harmless.
    pub(super) fn finish_grow<R: Growable>(&self, rec: &R) -> Result<R> {
        let d = *rec.device();
        if self.pool.is_active(d.thin_id)? {
            // An active device of another size has its table reloaded.
            self.activate_device(d.thin_id, d.size)?;
        }
        fp(R::GROW.reload);
        rec.grow_fs(self)?;
        fp(R::GROW.grow);
        let mut done = rec.clone();
        done.set_grow_pending(None);
        let mut tx = self.store.write()?;
        done.put(&mut tx)?;
        tx.commit()?;
        fp(R::GROW.done);
        Ok(done)
    }

    /// Removes a device: marks its record Removing (`load` reads it in the same
    /// transaction and may refuse), then, unless `only_mark`, finishes the removal. A
    /// device still in use puts the record back as it was, so nothing changed.
    pub(super) fn remove_device<R: Removable>(
        &self,
        load: impl FnOnce(&WriteTx) -> Result<R>,
        only_mark: bool,
    ) -> Result<()> {
        let (marked, before) = {
            let mut tx = self.store.write()?;
            let before = load(&tx)?;
            let mut marked = before.clone();
            marked.device_mut().state = State::Removing;
            marked.put(&mut tx)?;
            tx.commit()?;
            (marked, before)
        };
        fp(R::REMOVE.mark);
        if only_mark {
            return Ok(());
        }
        match self.finish_remove(&marked) {
            Err(Error::FailedPrecondition(msg)) => {
                let mut tx = self.store.write()?;
                before.put(&mut tx)?;
                tx.commit()?;
                Err(Error::FailedPrecondition(msg))
            }
            r => r,
        }
    }

    /// Finishes the removal of a record marked Removing: releases the device, discards its
    /// blocks (when configured), deactivates and deletes it, deletes the record.
    pub(super) fn finish_remove<R: Removable>(&self, rec: &R) -> Result<()> {
        let d = *rec.device();
        let busy = |detail: String| {
            Error::FailedPrecondition(format!(
                "cannot remove {}: its device {} is in use ({detail})",
                rec.owner(),
                self.pool.thin_name(d.thin_id)
            ))
        };
        rec.release(self)?;
        if self.config.discard_on_remove && rec.worth_discarding(self) {
            match self.activate_device(d.thin_id, d.size) {
                Ok(dev) => match self.pool.discard(&dev.devnode) {
                    Ok(()) => {}
                    Err(thinpool::Error::Busy { detail, .. }) => return Err(busy(detail)),
                    Err(e) => {
                        warn!(owner = %rec.owner(), error = %e, "discard failed; the blocks are still freed in the pool")
                    }
                },
                Err(e) => warn!(owner = %rec.owner(), error = %e, "cannot activate for discard"),
            }
        }
        if self.config.discard_on_remove {
            // After the discard step, whether it discarded or found nothing to.
            fp(R::REMOVE.discard);
        }
        self.deactivate(d.thin_id, RemoveMode::Now)
            .map_err(|e| match e {
                thinpool::Error::Busy { detail, .. } => busy(detail),
                e => Error::Pool(e),
            })?;
        fp(R::REMOVE.deactivate);
        self.pool_change(R::REMOVE.delete, |p| p.delete_thin(d.thin_id))?;
        let mut tx = self.store.write()?;
        rec.forget(&mut tx)?;
        tx.commit()?;
        fp(R::REMOVE.forget);
        Ok(())
    }
}
