//! A small client of containerd's own Snapshots and Leases APIs on containerd's socket:
//! every request names its snapshotter, so devmapper, thinsnap and overlayfs all go through
//! the same containerd path (its metadata store, then the snapshotter). Blocking calls on
//! a private runtime, each timed around its round trip.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use containerd_client::{
    services::v1::{
        leases_client::LeasesClient,
        snapshots::{
            snapshots_client::SnapshotsClient, CommitSnapshotRequest, PrepareSnapshotRequest,
            RemoveSnapshotRequest, ViewSnapshotRequest,
        },
        CreateRequest, DeleteRequest,
    },
    tonic::{transport::Channel, Request},
};

/// The lease every benchmark snapshot is created under, so that containerd's garbage
/// collector keeps them (an active snapshot without a lease or a container is garbage).
pub const LEASE: &str = "containerd-bench";

/// A connection to containerd, in one namespace.
pub struct Api {
    rt: tokio::runtime::Runtime,
    snaps: SnapshotsClient<Channel>,
    leases: LeasesClient<Channel>,
    namespace: String,
    gcs: u64,
}

impl Api {
    /// Connects to containerd at `socket`, working in `namespace` under [`LEASE`].
    pub fn connect(socket: &Path, namespace: &str) -> Result<Api> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let channel = rt
            .block_on(containerd_client::connect(socket))
            .with_context(|| format!("cannot connect to containerd at {}", socket.display()))?;
        Ok(Api {
            rt,
            snaps: SnapshotsClient::new(channel.clone()),
            leases: LeasesClient::new(channel),
            namespace: namespace.into(),
            gcs: 0,
        })
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert("containerd-namespace", self.namespace.parse().unwrap());
        md.insert("containerd-lease", LEASE.parse().unwrap());
        r
    }

    /// Creates the bench's lease.
    pub fn create_lease(&mut self) -> Result<()> {
        let r = self.req(CreateRequest {
            id: LEASE.into(),
            labels: HashMap::new(),
        });
        self.rt
            .block_on(self.leases.create(r))
            .map_err(|e| anyhow!("lease create: {}", e.message()))?;
        Ok(())
    }

    /// Prepare (`view` false) or View of `key` on `parent` in `snapshotter`; returns the
    /// round trip's duration.
    pub fn create(
        &mut self,
        snapshotter: &str,
        view: bool,
        key: &str,
        parent: &str,
    ) -> Result<Duration> {
        let t = Instant::now();
        let res = if view {
            let r = self.req(ViewSnapshotRequest {
                snapshotter: snapshotter.into(),
                key: key.into(),
                parent: parent.into(),
                labels: HashMap::new(),
            });
            self.rt.block_on(self.snaps.view(r)).map(|_| ())
        } else {
            let r = self.req(PrepareSnapshotRequest {
                snapshotter: snapshotter.into(),
                key: key.into(),
                parent: parent.into(),
                labels: HashMap::new(),
            });
            self.rt.block_on(self.snaps.prepare(r)).map(|_| ())
        };
        let d = t.elapsed();
        let op = if view { "view" } else { "prepare" };
        res.map_err(|e| anyhow!("{snapshotter}: {op} {key}: {}", e.message()))?;
        Ok(d)
    }

    /// Commit of active `key` as `name`.
    pub fn commit(&mut self, snapshotter: &str, name: &str, key: &str) -> Result<Duration> {
        let r = self.req(CommitSnapshotRequest {
            snapshotter: snapshotter.into(),
            name: name.into(),
            key: key.into(),
            labels: HashMap::new(),
        });
        let t = Instant::now();
        let res = self.rt.block_on(self.snaps.commit(r));
        let d = t.elapsed();
        res.map_err(|e| anyhow!("{snapshotter}: commit {key} as {name}: {}", e.message()))?;
        Ok(d)
    }

    /// Remove of `key`: containerd deletes its record; the snapshotter removes the snapshot
    /// at the next garbage collection ([`Api::gc`]).
    pub fn remove(&mut self, snapshotter: &str, key: &str) -> Result<Duration> {
        let r = self.req(RemoveSnapshotRequest {
            snapshotter: snapshotter.into(),
            key: key.into(),
        });
        let t = Instant::now();
        let res = self.rt.block_on(self.snaps.remove(r));
        let d = t.elapsed();
        res.map_err(|e| anyhow!("{snapshotter}: remove {key}: {}", e.message()))?;
        Ok(d)
    }

    /// A synchronous garbage collection (deleting an empty lease with `sync`, as `ctr leases
    /// rm --sync` does): containerd marks and sweeps its metadata, then has each
    /// snapshotter with removed snapshots walk its snapshots and remove the unreferenced
    /// ones. Returns the duration of the delete call.
    pub fn gc(&mut self) -> Result<Duration> {
        self.gcs += 1;
        let id = format!("containerd-bench-gc-{}", self.gcs);
        let r = self.req(CreateRequest {
            id: id.clone(),
            labels: HashMap::new(),
        });
        self.rt
            .block_on(self.leases.create(r))
            .map_err(|e| anyhow!("lease create: {}", e.message()))?;
        let r = self.req(DeleteRequest { id, sync: true });
        let t = Instant::now();
        let res = self.rt.block_on(self.leases.delete(r));
        let d = t.elapsed();
        res.map_err(|e| anyhow!("lease delete --sync (gc): {}", e.message()))?;
        Ok(d)
    }
}
