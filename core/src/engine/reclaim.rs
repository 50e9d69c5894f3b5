//! Reclamation of removed snapshots' devices in the background. Remove takes a snapshot out
//! of the namespace in one store commit (its record becomes a [`Tombstone`] that keeps its
//! thin id; the key is free again at once) and returns; reclaiming the device (discard its
//! blocks when `discard_on_remove`, deactivate, `delete`) is the tombstone's to finish, on a
//! few worker threads ([`Engine::start_reclaiming`]), by Cleanup (which waits for it), by gc,
//! or after a crash by the next start. Each reclamation goes through the device lifecycle's
//! removal steps and crash points (`remove.after-discard`, ...), and a device that is busy
//! after all (mounted again by someone) is left for later.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::{atomic::Ordering, Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use thinpool::ThinId;
use tracing::{info, warn};

use super::{lock, Engine};
use crate::{
    error::{Error, Result},
    store::Owner,
};

/// The reclamation queue and the devices being reclaimed.
#[derive(Default)]
pub(super) struct Reclaimer {
    state: Mutex<Queue>,
    /// Signalled when work is queued, a device is done, or the workers are to stop.
    changed: Condvar,
    /// Worker threads running.
    pub workers: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<ThinId>,
    /// Being reclaimed now (by a worker, Cleanup or gc).
    busy: BTreeSet<ThinId>,
    stop: bool,
}

/// Holds one device's reclamation; others wanting it wait until it is dropped.
struct Turn<'a> {
    r: &'a Reclaimer,
    id: ThinId,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        lock(&self.r.state).busy.remove(&self.id);
        self.r.changed.notify_all();
    }
}

impl Reclaimer {
    /// Waits until no one else reclaims `id`, then takes it.
    fn turn(&self, id: ThinId) -> Turn<'_> {
        let mut q = lock(&self.state);
        while q.busy.contains(&id) {
            q = self.changed.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        q.busy.insert(id);
        Turn { r: self, id }
    }

    fn push(&self, id: ThinId) {
        let mut q = lock(&self.state);
        if !q.waiting.contains(&id) && !q.busy.contains(&id) {
            q.waiting.push_back(id);
            self.changed.notify_all();
        }
    }

    /// The next device to reclaim, or None when the workers are to stop.
    fn next(&self) -> Option<ThinId> {
        let mut q = lock(&self.state);
        loop {
            if q.stop {
                return None;
            }
            if let Some(id) = q.waiting.pop_front() {
                return Some(id);
            }
            q = self.changed.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits for a change of the queue, at most until `deadline` (and 200 ms).
    fn wait_until<'a>(
        &'a self,
        q: MutexGuard<'a, Queue>,
        deadline: Instant,
    ) -> MutexGuard<'a, Queue> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.changed
            .wait_timeout(q, left.min(Duration::from_millis(200)))
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0)
    }

    /// Devices queued or being reclaimed.
    fn outstanding(&self) -> usize {
        let q = lock(&self.state);
        q.waiting.len() + q.busy.len()
    }
}

impl Engine {
    /// Starts `workers` threads that reclaim removed snapshots' devices as they are
    /// removed, and queues every tombstone already in the store (a crash's, or Cleanup's
    /// with `async_remove`).
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn start_reclaiming(self: &Arc<Self>, workers: usize) -> Result<()> {
        for n in 0..workers {
            let e = self.clone();
            std::thread::Builder::new()
                .name(format!("reclaim-{n}"))
                .spawn(move || {
                    while let Some(id) = e.reclaimer.next() {
                        if let Err(err) = e.reclaim(id) {
                            warn!(%id, "reclaiming a removed snapshot's device failed: {err}; Cleanup, gc or the next start retries");
                        }
                    }
                    e.reclaimer.workers.fetch_sub(1, Ordering::AcqRel);
                    e.reclaimer.changed.notify_all();
                })
                .map_err(|err| Error::Internal(format!("cannot start a reclaim thread: {err}")))?;
            self.reclaimer.workers.fetch_add(1, Ordering::AcqRel);
        }
        self.queue_tombstones()
    }

    /// Queues every tombstone for the workers.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn queue_tombstones(&self) -> Result<()> {
        for t in self.store.read()?.tombstones()? {
            self.reclaimer.push(t.device.thin_id);
        }
        Ok(())
    }

    /// Stops the workers: waits (up to `limit`) until what was queued or being reclaimed
    /// when it was called is done, then lets no worker take another device and waits (up
    /// to the same `limit`) for those still busy. Devices removed after the call, and what
    /// the limit left, stay in the store for the next start. A daemon calls this while it
    /// still serves, so the wait is not time its clients find it gone.
    pub fn stop_reclaiming(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut q = lock(&self.reclaimer.state);
        let before: BTreeSet<ThinId> = q.waiting.iter().chain(q.busy.iter()).copied().collect();
        while before
            .iter()
            .any(|id| q.busy.contains(id) || q.waiting.contains(id))
            && Instant::now() < deadline
        {
            q = self.reclaimer.wait_until(q, deadline);
        }
        q.stop = true;
        self.reclaimer.changed.notify_all();
        while !q.busy.is_empty() && Instant::now() < deadline {
            q = self.reclaimer.wait_until(q, deadline);
        }
        let left = q.waiting.len() + q.busy.len();
        drop(q);
        if left > 0 {
            info!(
                left,
                "stopping with removed snapshots' devices still to reclaim: the next start finishes them"
            );
        }
    }

    /// Makes every store commit so far durable (see [`crate::store::Store::flush`]): the last
    /// thing a stopping daemon does.
    ///
    /// # Errors
    /// When the store cannot be written.
    pub fn flush(&self) -> Result<()> {
        Ok(self.store.flush()?)
    }

    /// Removed snapshots' devices queued or being reclaimed now (the store's tombstones
    /// are the durable count: [`Engine::counts`]).
    pub fn reclaiming(&self) -> usize {
        self.reclaimer.outstanding()
    }

    /// Hands the tombstone of device `id` to the workers, or reclaims it now when there
    /// are none (the CLI, tests), unless `async_remove` leaves it to Cleanup.
    pub(super) fn reclaim_later(&self, id: ThinId) -> Result<()> {
        if self.reclaimer.workers.load(Ordering::Acquire) > 0 {
            self.reclaimer.push(id);
            Ok(())
        } else if self.config.async_remove {
            Ok(())
        } else {
            self.reclaim(id).map(|_| ())
        }
    }

    /// Reclaims the device of tombstone `id` (waiting if someone else is at it): discard,
    /// deactivate, delete, forget. Returns whether it is gone; a device busy after all is
    /// left (false) for a later try.
    pub(super) fn reclaim(&self, id: ThinId) -> Result<bool> {
        let _turn = self.reclaimer.turn(id);
        let _live = self.live(Owner::Reclaim(id));
        let Some(t) = self.store.read()?.tombstone(id)? else {
            return Ok(true);
        };
        match self.finish_remove(&t) {
            Ok(()) => Ok(true),
            Err(Error::FailedPrecondition(msg)) => {
                warn!(key = %t.was, %id, "{msg}; it is reclaimed later");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Reclaims every tombstone now (waiting for those the workers are at); returns the
    /// keys the reclaimed devices had.
    pub(super) fn reclaim_all(&self) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for t in self.store.read()?.tombstones()? {
            if self.reclaim(t.device.thin_id)? {
                done.push(t.was);
            }
        }
        Ok(done)
    }
}
