//! Operations in flight, by owner: while a request changes an owner's device, garbage
//! collection and Cleanup leave that owner's records alone (a Removing record may be a
//! removal in progress, not one a crash interrupted).

use super::{lock, Engine};
use crate::store::Owner;

/// Holds an owner live until dropped.
pub(super) struct Live<'a> {
    engine: &'a Engine,
    owner: Owner,
}

impl Engine {
    /// Marks `owner`'s operation in flight until the guard is dropped (requests: several
    /// may be in flight for one owner; the store decides which of them succeeds).
    pub(super) fn live(&self, owner: Owner) -> Live<'_> {
        *lock(&self.live).entry(owner.clone()).or_default() += 1;
        Live {
            engine: self,
            owner,
        }
    }

    /// Marks `owner` in flight for background work (gc, Cleanup), unless a request (or
    /// other background work) already is: then None, and the caller leaves it alone.
    pub(super) fn claim(&self, owner: Owner) -> Option<Live<'_>> {
        let mut live = lock(&self.live);
        if live.contains_key(&owner) {
            return None;
        }
        live.insert(owner.clone(), 1);
        Some(Live {
            engine: self,
            owner,
        })
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        let mut live = lock(&self.engine.live);
        if let Some(n) = live.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.owner);
            }
        }
    }
}
