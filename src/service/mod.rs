//! `thinsnap serve`: containerd's Snapshots API on a unix socket, over the snapshotter, and
//! (with `[volumes] socket`) Docker's volume plugin protocol on another ([`volume`]).
//! Each request runs on tokio's blocking pool inside a tracing span with its key and
//! duration.

pub mod api;
pub mod client;
pub mod metrics_http;
pub mod plugin_client;
pub mod ready;
mod status;
pub mod systemd;
pub mod volume;

use std::{collections::BTreeMap, pin::Pin, sync::Arc, time::Instant};

use anyhow::Result;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info_span, warn, Instrument};

use api::snapshots::{snapshots_server::Snapshots, *};
pub use status::to_status;

use thinsnap_core::{
    self as core,
    store::{Kind as StoreKind, Record},
    Engine, ErrorKind,
};

use crate::metrics::Metrics;
pub use ready::Ready;

/// The gRPC service over one snapshotter.
#[derive(Clone)]
pub struct Service {
    ready: Ready,
    metrics: Arc<Metrics>,
}

impl Service {
    /// A service for the engine `ready` gives, counting requests in `metrics`.
    pub fn new(ready: Ready, metrics: Arc<Metrics>) -> Service {
        Service { ready, metrics }
    }

    /// Runs `f` on the blocking pool in a span named `method` with `key`, logging its
    /// duration and any error.
    async fn call<T, F>(&self, method: &'static str, key: &str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Engine) -> core::Result<T> + Send + 'static,
    {
        let ready = self.ready.clone();
        let metrics = self.metrics.clone();
        let span = info_span!("request", method, key = %key);
        async move {
            let _flight = metrics.begin();
            let snap = ready.engine().await?;
            let start = Instant::now();
            let res = tokio::task::spawn_blocking(move || f(&snap))
                .await
                .unwrap_or_else(|e| Err(core::Error::Internal(format!("{method} panicked: {e}"))));
            let secs = start.elapsed().as_secs_f64();
            let kind = res.as_ref().err().map(core::Error::kind);
            metrics.observe(method, kind, secs);
            match &res {
                Err(e) if kind == Some(ErrorKind::Internal) => warn!(?kind, "{e}"),
                Err(e) => debug!(?kind, "{e}"),
                Ok(_) => {}
            }
            debug!(ms = secs * 1000.0, ?kind, "done");
            res.map_err(|e| to_status(&e))
        }
        .instrument(span)
        .await
    }
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn timestamp(ns: u128) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
    }
}

/// Converts a store record to containerd's Info.
pub fn info(r: &Record) -> Info {
    Info {
        name: r.key.clone(),
        parent: r.parent.clone().unwrap_or_default(),
        kind: match r.kind {
            StoreKind::Active => Kind::Active,
            StoreKind::View => Kind::View,
            StoreKind::Committed => Kind::Committed,
        } as i32,
        created_at: Some(timestamp(r.created_ns)),
        updated_at: Some(timestamp(r.updated_ns)),
        labels: r.labels.clone().into_iter().collect(),
    }
}

fn mounts(m: Vec<core::engine::Mount>) -> Vec<api::Mount> {
    m.into_iter()
        .map(|m| api::Mount {
            r#type: m.fs,
            source: m.source.display().to_string(),
            target: String::new(),
            options: m.options,
        })
        .collect()
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        let m = self
            .call("prepare", &key, move |s| {
                s.prepare(&r.key, &r.parent, labels(r.labels))
            })
            .await?;
        Ok(Response::new(PrepareSnapshotResponse { mounts: mounts(m) }))
    }

    async fn view(
        &self,
        req: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        let m = self
            .call("view", &key, move |s| {
                s.view(&r.key, &r.parent, labels(r.labels))
            })
            .await?;
        Ok(Response::new(ViewSnapshotResponse { mounts: mounts(m) }))
    }

    async fn mounts(
        &self,
        req: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        let m = self.call("mounts", &key, move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(&self, req: Request<CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        if !r.parent.is_empty() {
            return Err(Status::unimplemented(
                "commit with a new parent (rebase) is not supported by thinsnap",
            ));
        }
        self.call("commit", &key, move |s| {
            s.commit(&r.name, &r.key, labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, req: Request<RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        self.call("remove", &key, move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        let rec = self.call("stat", &key, move |s| s.stat(&r.key)).await?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(info(&rec)),
        }))
    }

    async fn update(
        &self,
        req: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("update needs the snapshot's info"))?;
        let key = i.name.clone();
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let rec = self
            .call("update", &key, move |s| {
                s.update(&i.name, labels(i.labels), &paths)
            })
            .await?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(info(&rec)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let records = self.call("list", "", move |s| s.walk(&r.filters)).await?;
        let batches: Vec<Result<ListSnapshotsResponse, Status>> = records
            .chunks(100)
            .map(|c| {
                Ok(ListSnapshotsResponse {
                    info: c.iter().map(info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        let u = self.call("usage", &key, move |s| s.usage(&r.key)).await?;
        Ok(Response::new(UsageResponse {
            size: u.exclusive_bytes as i64,
            inodes: u.inodes as i64,
        }))
    }

    async fn cleanup(&self, _req: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        self.call("cleanup", "", |s| s.cleanup().map(|_| ()))
            .await?;
        Ok(Response::new(()))
    }
}

/// thinsnap's admin API over the same snapshotter.
#[derive(Clone)]
pub struct Admin {
    ready: Ready,
    metrics: Arc<Metrics>,
}

impl Admin {
    /// The admin API on the engine `ready` gives.
    pub fn new(ready: Ready, metrics: Arc<Metrics>) -> Admin {
        Admin { ready, metrics }
    }
}

#[tonic::async_trait]
impl api::admin::admin_server::Admin for Admin {
    async fn gc(
        &self,
        req: Request<api::admin::GcRequest>,
    ) -> Result<Response<api::admin::GcResponse>, Status> {
        let dry_run = req.into_inner().dry_run;
        let snap = self.ready.engine().await?;
        let (report, freed) = tokio::task::spawn_blocking(move || snap.gc(dry_run))
            .instrument(info_span!("request", method = "gc"))
            .await
            .map_err(|e| Status::internal(format!("gc panicked: {e}")))?
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(api::admin::GcResponse {
            actions: report.actions,
            problems: report.problems,
            notes: report.notes,
            freed_bytes: freed,
        }))
    }

    async fn resize_volume(
        &self,
        req: Request<api::admin::ResizeVolumeRequest>,
    ) -> Result<Response<api::admin::ResizeVolumeResponse>, Status> {
        let r = req.into_inner();
        let snap = self.ready.engine().await?;
        let start = Instant::now();
        let span = info_span!("request", method = "resize_volume", name = %r.name);
        let res = tokio::task::spawn_blocking(move || snap.resize_volume(&r.name, &r.size))
            .instrument(span)
            .await
            .unwrap_or_else(|e| Err(core::Error::Internal(format!("resize panicked: {e}"))));
        let kind = res.as_ref().err().map(core::Error::kind);
        self.metrics
            .observe("resize_volume", kind, start.elapsed().as_secs_f64());
        let done = res.map_err(|e| to_status(&e))?;
        Ok(Response::new(api::admin::ResizeVolumeResponse {
            size_bytes: done.volume.device.size,
            previous_size_bytes: done.previous,
        }))
    }

    async fn metrics(
        &self,
        _req: Request<api::admin::MetricsRequest>,
    ) -> Result<Response<api::admin::MetricsResponse>, Status> {
        let (snap, metrics) = (self.ready.engine().await?, self.metrics.clone());
        let text = tokio::task::spawn_blocking(move || metrics.render_cached(&snap))
            .await
            .map_err(|e| Status::internal(format!("metrics panicked: {e}")))?;
        Ok(Response::new(api::admin::MetricsResponse { text }))
    }

    async fn snapshot_usage(
        &self,
        req: Request<api::admin::SnapshotUsageRequest>,
    ) -> Result<Response<api::admin::SnapshotUsageResponse>, Status> {
        let keys = req.into_inner().keys;
        let snap = self.ready.engine().await?;
        let usage = tokio::task::spawn_blocking(move || {
            snap.usage_now(&keys).map(|u| {
                keys.into_iter()
                    .zip(u)
                    .map(|(key, u)| api::admin::SnapshotUsage {
                        key,
                        exclusive_bytes: u.exclusive_bytes,
                        mapped_bytes: u.mapped_bytes,
                        inodes: u.inodes,
                        exclusive_now_bytes: u.exclusive_now_bytes,
                    })
                    .collect::<Vec<_>>()
            })
        })
        .instrument(info_span!("request", method = "snapshot_usage"))
        .await
        .map_err(|e| Status::internal(format!("usage panicked: {e}")))?
        .map_err(|e| to_status(&e))?;
        Ok(Response::new(api::admin::SnapshotUsageResponse { usage }))
    }
}
