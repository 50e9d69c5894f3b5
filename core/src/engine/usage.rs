//! Usage: the bytes only a snapshot's device maps (its exclusive usage, what containerd's
//! Usage answers), the bytes it maps in all, and the inodes its filesystem uses.
//!
//! Exclusive usage is the data blocks the snapshot's device provisioned itself
//! ([`thinpool::DeviceBlocks::owned`]). For an active snapshot or a view (which have no
//! children) those are exactly the blocks no other device maps, `thin_ls`'s
//! EXCLUSIVE_BLOCKS. For a committed snapshot they are its exclusive blocks as of its
//! commit, what the layer added to its parent, and they stay that: once children share a
//! layer's blocks, thin_ls counts none of them as the layer's (nor as the children's),
//! and a sum over an image's layers would count nothing of the image. containerd's CRI
//! plugin reads a committed snapshot's usage once and keeps it, as containerd's own
//! snapshotters keep it fixed. The blocks no other device maps now are reported beside it
//! (`exclusive_now_bytes`): what removing the snapshot alone would free.
//!
//! Both byte figures come from one reading of the pool's data-mapping trees
//! ([`thinpool::ThinPool::mapping_usage`]), which costs one metadata read per distinct
//! btree node. The engine keeps the last reading for [`USAGE_MAX_AGE`] and answers every
//! Usage call in that time from it: containerd's CRI plugin asks for every snapshot in
//! turn, and a reading serves them all. A snapshot newer than the reading makes a new one.
//!
//! Inodes of a committed snapshot are the ones recorded at commit (its filesystem no longer
//! changes).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use thinpool::{Count, MappingUsage, ThinId};
use tracing::{debug, warn};

use super::{lock, Engine};
use crate::{
    error::{Error, Result},
    store::Kind,
    time::now_ns,
};

/// How old a reading of the mapping trees may get before a Usage call starts a new one.
pub const USAGE_MAX_AGE: Duration = Duration::from_secs(1);

/// What a snapshot uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotUsage {
    /// Bytes of data blocks this snapshot's device provisioned itself: only it maps them
    /// while it has no children; for a committed snapshot, its exclusive bytes as of its
    /// commit. containerd's Usage `size`.
    pub exclusive_bytes: u64,
    /// Bytes of data blocks no other device maps now: what removing this snapshot alone
    /// would free (`thin_ls`'s EXCLUSIVE_BLOCKS). Less than `exclusive_bytes` for a
    /// committed snapshot whose children share its blocks. Only from
    /// [`Engine::usage_now`]; 0 from [`Engine::usage`].
    pub exclusive_now_bytes: u64,
    /// Bytes of every data block the device maps, those it shares with its parent, its
    /// children and siblings included.
    pub mapped_bytes: u64,
    /// Inodes in use in its filesystem.
    pub inodes: u64,
}

/// The last reading of the pool's mapping trees (when it started, what it found), and
/// whether a new one is being made in the background.
#[derive(Default)]
pub(super) struct MappingCache {
    state: Arc<Mutex<CacheState>>,
    /// Serializes the readings callers wait for.
    reading: Mutex<()>,
}

#[derive(Default)]
struct CacheState {
    /// The reading, when it started (for its age, and as wall-clock nanoseconds to compare
    /// with commit times).
    scan: Option<(Instant, u128, Arc<MappingUsage>)>,
    refreshing: bool,
}

impl Engine {
    /// containerd's Usage, with the mapped bytes beside the exclusive ones, from the last
    /// reading of the pool's mapping trees. A reading older than [`USAGE_MAX_AGE`] still
    /// answers, and a new one starts in the background: calls never wait for a reading,
    /// except the first about a snapshot that no reading has seen yet, or about a committed
    /// snapshot whose commit no reading has seen (its figure is final, and containerd's
    /// CRI plugin keeps the first it gets).
    ///
    /// # Errors
    /// NotFound if `key` does not exist; a pool error when its metadata cannot be read
    /// (e.g. another tool holds the pool's metadata snapshot).
    pub fn usage(&self, key: &str) -> Result<SnapshotUsage> {
        let r = self.ready(key)?;
        // A committed snapshot's figure is read once and kept by containerd's CRI plugin:
        // it must come from a reading that started after the commit.
        let since = match r.kind {
            Kind::Committed => r.created_ns,
            _ => 0,
        };
        let scan = self.cached_mapping(r.device.thin_id, since)?;
        self.usage_from(&r, &scan)
    }

    /// The usage of `keys` from a new reading of the mapping trees made for this call,
    /// with the blocks no other device maps now: for people (`thinsnap snapshot usage`).
    ///
    /// # Errors
    /// As [`Engine::usage`], for the first key that fails.
    pub fn usage_now(&self, keys: &[String]) -> Result<Vec<SnapshotUsage>> {
        let records = keys
            .iter()
            .map(|k| self.ready(k))
            .collect::<Result<Vec<_>>>()?;
        let scan = {
            let _g = lock(&self.mapping.reading);
            self.read_mapping(Count::Exclusive)?
        };
        records.iter().map(|r| self.usage_from(r, &scan)).collect()
    }

    fn usage_from(&self, r: &crate::store::Record, scan: &MappingUsage) -> Result<SnapshotUsage> {
        let id = r.device.thin_id;
        let Some(blocks) = scan.devices.get(&id.get()) else {
            // Removed since we read the record, or the metadata lost the device.
            self.ready(&r.key)?;
            return Err(Error::Internal(format!(
                "thin device {id} of snapshot {:?} is missing from the pool's metadata: \
                 run `thinsnap check`",
                r.key
            )));
        };
        let inodes = match (r.kind, r.usage) {
            (Kind::Committed, u) => u.map_or(0, |u| u.inodes),
            _ => self.measure(r)?.inodes,
        };
        Ok(SnapshotUsage {
            exclusive_bytes: scan.bytes(blocks.owned),
            exclusive_now_bytes: scan.bytes(blocks.exclusive),
            mapped_bytes: scan.bytes(blocks.mapped),
            inodes,
        })
    }

    /// A reading that has thin device `id` and started after `since` (wall-clock ns): the
    /// last one (refreshed in the background when older than [`USAGE_MAX_AGE`]), or, when
    /// it does not fit, a new one made now.
    fn cached_mapping(&self, id: ThinId, since: u128) -> Result<Arc<MappingUsage>> {
        let fits = |started: u128, scan: &MappingUsage| {
            started > since && scan.devices.contains_key(&id.get())
        };
        {
            let mut st = lock(&self.mapping.state);
            if let Some((at, started, scan)) = &st.scan {
                if fits(*started, scan) {
                    let scan = scan.clone();
                    if at.elapsed() >= USAGE_MAX_AGE && !st.refreshing {
                        st.refreshing = true;
                        self.refresh_in_background();
                    }
                    return Ok(scan);
                }
            }
        }
        let _g = lock(&self.mapping.reading);
        // Someone else's reading may have found it meanwhile.
        if let Some((_, started, scan)) = &lock(&self.mapping.state).scan {
            if fits(*started, scan) {
                return Ok(scan.clone());
            }
        }
        self.read_mapping(Count::Owned)
    }

    /// Whether thin device `id` provisioned any block of its own, by a reading of the
    /// mapping trees that started after `since` (wall-clock ns). True when no reading can
    /// tell (the device is missing from it, or the metadata cannot be read).
    pub(super) fn owns_blocks(&self, id: ThinId, since: u128) -> bool {
        match self.cached_mapping(id, since) {
            Ok(scan) => scan.devices.get(&id.get()).is_none_or(|b| b.owned > 0),
            Err(e) => {
                debug!(%id, error = %e, "cannot tell whether the device owns blocks");
                true
            }
        }
    }

    /// Reads the mapping trees now and keeps the reading (unless a newer one is kept).
    fn read_mapping(&self, what: Count) -> Result<Arc<MappingUsage>> {
        let (start, started, scan) = read(&*self.pool, what)?;
        let scan = Arc::new(scan);
        keep(&self.mapping.state, start, started, scan.clone());
        Ok(scan)
    }

    fn refresh_in_background(&self) {
        let (pool, state) = (self.pool.clone(), self.mapping.state.clone());
        let spawned = std::thread::Builder::new()
            .name("usage-reader".into())
            .spawn(move || {
                let r = read(&*pool, Count::Owned);
                match r {
                    Ok((start, started, scan)) => keep(&state, start, started, Arc::new(scan)),
                    Err(e) => warn!(error = %e, "reading the pool's mapping trees failed"),
                }
                lock(&state).refreshing = false;
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start a thread to read the pool's mapping trees");
            lock(&self.mapping.state).refreshing = false;
        }
    }

    /// Drops the kept reading (after changes whose effect a caller wants to see now).
    pub fn forget_usage(&self) {
        lock(&self.mapping.state).scan = None;
    }
}

/// One reading of `pool`'s mapping trees, with the time it started (monotonic, and as
/// wall-clock nanoseconds).
fn read(pool: &dyn super::Pool, what: Count) -> Result<(Instant, u128, MappingUsage)> {
    let start = Instant::now();
    let started = now_ns();
    let scan = pool.mapping_usage(what)?;
    debug!(
        devices = scan.devices.len(),
        nodes = scan.nodes_read,
        reads = scan.reads,
        ms = start.elapsed().as_millis() as u64,
        "read the pool's mapping trees"
    );
    Ok((start, started, scan))
}

/// Keeps `scan`, started at `start`, unless the kept one started later.
fn keep(state: &Mutex<CacheState>, start: Instant, started: u128, scan: Arc<MappingUsage>) {
    let mut st = lock(state);
    if st.scan.as_ref().is_none_or(|(at, _, _)| *at <= start) {
        st.scan = Some((start, started, scan));
    }
}
