//! `thinsnap serve`: containerd's Snapshots API on a unix socket, over the snapshotter, and
//! (with `[volumes] socket`) Docker's volume plugin protocol on another ([`volume`]).
//! Each request runs on tokio's blocking pool inside a tracing span with its key and
//! duration.

pub mod api;
pub mod client;
pub mod plugin_client;
mod status;
pub mod volume;

use std::{
    collections::BTreeMap,
    path::Path,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, info_span, warn, Instrument};

use api::snapshots::{
    snapshots_server::{Snapshots, SnapshotsServer},
    *,
};
pub use status::to_status;

use crate::{
    metrics::Metrics,
    snapshotter::{self, Snapshotter},
    store::{Kind as StoreKind, Record},
};

/// The gRPC service over one snapshotter.
#[derive(Clone)]
pub struct Service {
    snap: Arc<Snapshotter>,
    metrics: Arc<Metrics>,
}

impl Service {
    /// A service for `snap`, counting requests in `metrics`.
    pub fn new(snap: Arc<Snapshotter>, metrics: Arc<Metrics>) -> Service {
        Service { snap, metrics }
    }

    /// Runs `f` on the blocking pool in a span named `method` with `key`, logging its
    /// duration and any error.
    async fn call<T, F>(&self, method: &'static str, key: &str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshotter) -> snapshotter::Result<T> + Send + 'static,
    {
        let snap = self.snap.clone();
        let metrics = self.metrics.clone();
        let span = info_span!("request", method, key = %key);
        async move {
            let start = Instant::now();
            let res = tokio::task::spawn_blocking(move || f(&snap))
                .await
                .map_err(|e| Status::internal(format!("{method} panicked: {e}")))
                .and_then(|r| {
                    r.map_err(|e| (to_status(&e), e)).map_err(|(status, e)| {
                        if status.code() == tonic::Code::Internal {
                            warn!(code = ?status.code(), "{e}");
                        } else {
                            debug!(code = ?status.code(), "{e}");
                        }
                        status
                    })
                });
            let secs = start.elapsed().as_secs_f64();
            let code = res.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
            metrics.observe(method, code, secs);
            debug!(ms = secs * 1000.0, ?code, "done");
            res
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

fn mounts(m: Vec<snapshotter::Mount>) -> Vec<api::Mount> {
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
            size: u.bytes as i64,
            inodes: u.inodes as i64,
        }))
    }

    async fn cleanup(&self, _req: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        self.call("cleanup", "", |s| s.cleanup().map(|_| ()))
            .await?;
        Ok(Response::new(()))
    }
}

/// Holds the state directory's lock file: one daemon (or one writing CLI) at a time.
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    /// Takes the lock at `path` without waiting.
    ///
    /// # Errors
    /// When another process holds it: names the lock and what to do.
    pub fn acquire(path: &Path) -> Result<StateLock> {
        use std::os::fd::AsRawFd;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            anyhow::bail!(
                "another thinsnap process holds {} (is `thinsnap serve` running? `systemctl status thinsnap`); stop it first or use its socket",
                path.display()
            );
        }
        Ok(StateLock { _file: file })
    }
}

async fn shutdown_signal(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
) {
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: finishing in-flight requests, then exiting"),
        _ = int.recv() => info!("SIGINT: finishing in-flight requests, then exiting"),
    }
}

/// Listens on the unix socket `socket` (mode 0660), replacing a stale one.
fn bind_unix(socket: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => info!(socket = %socket.display(), "removed stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot remove stale socket {}", socket.display()))
        }
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("cannot set the mode of {}", socket.display()))?;
    }
    Ok(listener)
}

/// Serves `snap` on the unix socket `socket` (and the volume plugin on its own socket,
/// when configured) until SIGTERM or SIGINT; in-flight requests finish first. Active
/// snapshots stay active, and volumes mounted, for running containers.
///
/// # Errors
/// When a socket cannot be created.
pub async fn serve(snap: Arc<Snapshotter>, socket: &Path) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    // Handlers first: once the socket exists, a SIGTERM must mean a graceful stop.
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The plugin socket before containerd's: once that answers, both do.
    let volumes = match snap.config().volumes.socket.clone() {
        Some(path) => {
            let listener = bind_unix(&path).context("volume plugin (`volumes.socket`)")?;
            if !volume::docker_discoverable(&path) {
                warn!(socket = %path.display(), "Docker finds plugins by their socket in /run/docker/plugins; for this path write /etc/docker/plugins/thinsnap.spec containing unix://{}", path.display());
            }
            info!(socket = %path.display(), mount_dir = %snap.config().volumes.mount_dir.display(), "serving Docker's volume plugin protocol");
            let task = tokio::spawn(volume::serve(
                listener,
                snap.clone(),
                metrics.clone(),
                stop_rx,
            ));
            Some((path, task))
        }
        None => None,
    };
    let listener = bind_unix(socket)?;
    if snap.config().async_remove {
        let s = snap.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let s = s.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.cleanup()).await {
                    warn!("background cleanup: {e}");
                }
            }
        });
    }
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if let Some(addr) = snap.config().metrics_listen {
        let http = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for metrics (`metrics.listen`)"))?;
        info!(%addr, "serving Prometheus metrics at /metrics");
        tokio::spawn(http_metrics(http, snap.clone(), metrics.clone()));
    }
    crate::autogrow::spawn(snap.clone(), metrics.clone());
    info!(socket = %socket.display(), started, "serving containerd's Snapshots API");
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service::new(
            snap.clone(),
            metrics.clone(),
        )))
        .add_service(api::admin::admin_server::AdminServer::new(Admin {
            snap,
            metrics,
        }))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async move {
                shutdown_signal(term, int).await;
                let _ = stop_tx.send(true);
            },
        )
        .await
        .context("gRPC server failed")?;
    let _ = std::fs::remove_file(socket);
    if let Some((path, task)) = volumes {
        let _ = task.await;
        let _ = std::fs::remove_file(path);
    }
    info!("stopped");
    Ok(())
}

/// thinsnap's admin API over the same snapshotter.
#[derive(Clone)]
pub struct Admin {
    snap: Arc<Snapshotter>,
    metrics: Arc<Metrics>,
}

#[tonic::async_trait]
impl api::admin::admin_server::Admin for Admin {
    async fn gc(
        &self,
        req: Request<api::admin::GcRequest>,
    ) -> Result<Response<api::admin::GcResponse>, Status> {
        let dry_run = req.into_inner().dry_run;
        let snap = self.snap.clone();
        let (report, freed) = tokio::task::spawn_blocking(move || snap.gc(dry_run))
            .instrument(info_span!("request", method = "gc"))
            .await
            .map_err(|e| Status::internal(format!("gc panicked: {e}")))?
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(api::admin::GcResponse {
            actions: report.actions,
            problems: report.problems,
            freed_bytes: freed,
        }))
    }

    async fn metrics(
        &self,
        _req: Request<api::admin::MetricsRequest>,
    ) -> Result<Response<api::admin::MetricsResponse>, Status> {
        let (snap, metrics) = (self.snap.clone(), self.metrics.clone());
        let text = tokio::task::spawn_blocking(move || metrics.render(&snap))
            .await
            .map_err(|e| Status::internal(format!("metrics panicked: {e}")))?;
        Ok(Response::new(api::admin::MetricsResponse { text }))
    }
}

/// Answers HTTP requests on `listener`: `GET /metrics` with the Prometheus text, anything
/// else 404. One request per connection.
async fn http_metrics(
    listener: tokio::net::TcpListener,
    snap: Arc<Snapshotter>,
    metrics: Arc<Metrics>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let (snap, metrics) = (snap.clone(), metrics.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (the request line is all that matters).
            while n < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(k)) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, body) =
                if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
                    let text = tokio::task::spawn_blocking(move || metrics.render(&snap))
                        .await
                        .unwrap_or_default();
                    ("200 OK", text)
                } else {
                    (
                        "404 Not Found",
                        "thinsnap serves only GET /metrics here\n".to_string(),
                    )
                };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
