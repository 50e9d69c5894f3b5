//! A client of the daemon's Snapshots API on its unix socket, for the CLI: the CLI never
//! opens the store or the pool behind a running daemon's back.

use std::{collections::HashMap, path::Path};

use anyhow::{Context, Result};
use tonic::transport::{Channel, Endpoint};

use super::api::{
    admin::{
        admin_client::AdminClient, GcRequest, GcResponse, MetricsRequest, ResizeVolumeRequest,
        ResizeVolumeResponse, SnapshotUsage, SnapshotUsageRequest,
    },
    snapshots::snapshots_client::SnapshotsClient,
    snapshots::*,
    Mount,
};

/// The snapshotter name sent with requests (thinsnap serves one pool).
pub const SNAPSHOTTER: &str = "thinsnap";

/// A blocking client: each call runs on a private single-threaded runtime.
pub struct Client {
    rt: tokio::runtime::Runtime,
    inner: SnapshotsClient<Channel>,
    admin: AdminClient<Channel>,
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

impl Client {
    /// Connects to the daemon at `socket`.
    ///
    /// # Errors
    /// When nothing listens there: says to start `thinsnap serve`.
    pub fn connect(socket: &Path) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]")?
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .with_context(|| {
                format!(
                    "cannot reach thinsnap at {}: is `thinsnap serve` running (`systemctl status thinsnap`)?",
                    socket.display()
                )
            })?;
        Ok(Client {
            rt,
            inner: SnapshotsClient::new(channel.clone()),
            admin: AdminClient::new(channel),
        })
    }

    /// Prepare (`view` false) or View.
    pub fn create(
        &mut self,
        view: bool,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let (key, parent) = (key.to_string(), parent.to_string());
        let inner = &mut self.inner;
        self.rt
            .block_on(async {
                if view {
                    let r = ViewSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key,
                        parent,
                        labels,
                    };
                    inner.view(r).await.map(|r| r.into_inner().mounts)
                } else {
                    let r = PrepareSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key,
                        parent,
                        labels,
                    };
                    inner.prepare(r).await.map(|r| r.into_inner().mounts)
                }
            })
            .map_err(status)
    }

    /// Commit.
    pub fn commit(&mut self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        let r = CommitSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            name: name.into(),
            key: key.into(),
            labels,
            parent: String::new(),
        };
        self.rt
            .block_on(self.inner.commit(r))
            .map(|_| ())
            .map_err(status)
    }

    /// Mounts.
    pub fn mounts(&mut self, key: &str) -> Result<Vec<Mount>> {
        let r = MountsRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        self.rt
            .block_on(self.inner.mounts(r))
            .map(|r| r.into_inner().mounts)
            .map_err(status)
    }

    /// Remove.
    pub fn remove(&mut self, key: &str) -> Result<()> {
        let r = RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        self.rt
            .block_on(self.inner.remove(r))
            .map(|_| ())
            .map_err(status)
    }

    /// Stat.
    pub fn stat(&mut self, key: &str) -> Result<Info> {
        let r = StatSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        self.rt
            .block_on(self.inner.stat(r))
            .map_err(status)?
            .into_inner()
            .info
            .context("the daemon sent no info")
    }

    /// Update labels (`paths` as in containerd's field mask).
    pub fn update(
        &mut self,
        key: &str,
        labels: HashMap<String, String>,
        paths: Vec<String>,
    ) -> Result<Info> {
        let r = UpdateSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            info: Some(Info {
                name: key.into(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        self.rt
            .block_on(self.inner.update(r))
            .map_err(status)?
            .into_inner()
            .info
            .context("the daemon sent no info")
    }

    /// List (Walk) with containerd filters.
    pub fn list(&mut self, filters: Vec<String>) -> Result<Vec<Info>> {
        let r = ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters,
        };
        let inner = &mut self.inner;
        self.rt
            .block_on(async {
                let mut stream = inner.list(r).await?.into_inner();
                let mut out = Vec::new();
                while let Some(batch) = stream.message().await? {
                    out.extend(batch.info);
                }
                Ok::<_, tonic::Status>(out)
            })
            .map_err(status)
    }

    /// Usage: (bytes, inodes).
    pub fn usage(&mut self, key: &str) -> Result<(i64, i64)> {
        let r = UsageRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        let u = self
            .rt
            .block_on(self.inner.usage(r))
            .map_err(status)?
            .into_inner();
        Ok((u.size, u.inodes))
    }

    /// Exclusive bytes, mapped bytes and inodes of snapshots `keys`, in that order.
    pub fn snapshot_usage(&mut self, keys: &[String]) -> Result<Vec<SnapshotUsage>> {
        let r = SnapshotUsageRequest {
            keys: keys.to_vec(),
        };
        self.rt
            .block_on(self.admin.snapshot_usage(r))
            .map(|r| r.into_inner().usage)
            .map_err(status)
    }

    /// thinsnap's garbage collection.
    pub fn gc(&mut self, dry_run: bool) -> Result<GcResponse> {
        self.rt
            .block_on(self.admin.gc(GcRequest { dry_run }))
            .map(|r| r.into_inner())
            .map_err(status)
    }

    /// Grows Docker volume `name` to `size` (as people type sizes).
    pub fn resize_volume(&mut self, name: &str, size: &str) -> Result<ResizeVolumeResponse> {
        let r = ResizeVolumeRequest {
            name: name.into(),
            size: size.into(),
        };
        self.rt
            .block_on(self.admin.resize_volume(r))
            .map(|r| r.into_inner())
            .map_err(status)
    }

    /// The daemon's metrics, in Prometheus text format.
    pub fn metrics(&mut self) -> Result<String> {
        self.rt
            .block_on(self.admin.metrics(MetricsRequest {}))
            .map(|r| r.into_inner().text)
            .map_err(status)
    }

    /// Cleanup.
    pub fn cleanup(&mut self) -> Result<()> {
        let r = CleanupRequest {
            snapshotter: SNAPSHOTTER.into(),
        };
        self.rt
            .block_on(self.inner.cleanup(r))
            .map(|_| ())
            .map_err(status)
    }
}
