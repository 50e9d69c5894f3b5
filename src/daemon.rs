//! `thinsnap serve`: the daemon's composition root. It takes the sockets systemd passed (or
//! binds its own), opens the engine and reconciles it, then serves containerd's Snapshots
//! API and thinsnap's admin API ([`service`]), Docker's volume plugin, the metrics endpoint
//! and the pool's autogrow watcher, until SIGTERM or SIGINT. In-flight requests finish
//! first; active snapshots stay active, and volumes mounted, for running containers.
//!
//! With a socket from systemd (`thinsnap.socket`), connections are answered the moment the
//! process starts and their requests wait until the engine is up: a client reconnecting
//! across a restart finishes its handshake within containerd's first reconnect deadline
//! (one second: containerd dials proxy plugins with gRPC's default back-off and no minimum
//! connect timeout), so containerd never sees the restart. The socket stays with systemd on
//! exit. Without one, thinsnap binds its socket once it is ready and removes it on exit.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use tokio::{net::UnixListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use thinsnap_core::{config::Config, state::StateLock, Engine};

use crate::{
    metrics::Metrics,
    service::{self, ready, systemd, Admin, Service},
};

/// Runs `thinsnap serve` with `config`.
///
/// # Errors
/// When the pool, the store or a socket cannot be opened, or reconciliation fails.
pub fn run(config: &Config) -> Result<ExitCode> {
    info!(
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        "starting"
    );
    // Before any thread starts, and before any program runs: they must not inherit them.
    let activated = systemd::take_listeners()?;
    let _lock = StateLock::acquire(&config.lock_path())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let cfg = config.clone();
    runtime.block_on(serve(config, activated, move || open_engine(cfg)))?;
    Ok(ExitCode::SUCCESS)
}

/// Opens the pool and the store and reconciles them.
fn open_engine(config: Config) -> Result<Engine> {
    let snap = Engine::open(config).context("cannot open the pool")?;
    if let Some(why) = snap.unfinished_job()? {
        anyhow::bail!("not serving: {why}");
    }
    let report = snap
        .recover(true)
        .context("startup reconciliation failed")?;
    for p in &report.problems {
        warn!("reconciliation: {p}");
    }
    for n in &report.notes {
        info!("reconciliation: {n}");
    }
    info!(
        actions = report.actions.len(),
        problems = report.problems.len(),
        "reconciled store and pool"
    );
    Ok(snap)
}

/// A listening socket: passed by systemd (which keeps it: left alone on exit), or bound
/// here (removed on exit).
struct Listener {
    listener: UnixListener,
    /// The path to remove on exit, when bound here.
    bound: Option<PathBuf>,
}

impl Listener {
    /// The socket systemd passed, or a new one bound at `path`; `what` names it in errors.
    fn open(
        passed: Option<std::os::unix::net::UnixListener>,
        path: &Path,
        what: &str,
    ) -> Result<Listener> {
        let Some(l) = passed else {
            return Ok(Listener {
                listener: bind_unix(path).with_context(|| what.to_string())?,
                bound: Some(path.to_path_buf()),
            });
        };
        match systemd::local_path(&l) {
            Some(p) if p == path => {}
            p => {
                warn!(configured = %path.display(), passed = ?p, "{what}: systemd passed a socket at another path than the configuration's; clients must use the one systemd listens on")
            }
        }
        l.set_nonblocking(true)
            .context("cannot use the socket systemd passed")?;
        Ok(Listener {
            listener: UnixListener::from_std(l).context("cannot use the socket systemd passed")?,
            bound: None,
        })
    }
}

/// Listens on the unix socket `socket` (mode 0660), replacing a stale one. The mode is set
/// between bind and listen, so no client can connect before it holds.
fn bind_unix(socket: &Path) -> Result<UnixListener> {
    use nix::sys::socket::{self as sock, AddressFamily, SockFlag, SockType, UnixAddr};
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
    let fd = sock::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .context("cannot create a unix socket")?;
    let addr =
        UnixAddr::new(socket).with_context(|| format!("bad socket path {}", socket.display()))?;
    use std::os::fd::AsRawFd;
    sock::bind(fd.as_raw_fd(), &addr)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", socket.display()))?;
    sock::listen(&fd, sock::Backlog::new(1024).expect("a valid backlog"))
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
        .with_context(|| format!("cannot listen on {}", socket.display()))
}

/// Waits for SIGTERM or SIGINT, tells systemd, and sets `stop`.
async fn stop_on_signal(stop: watch::Sender<bool>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: finishing in-flight requests, then exiting"),
            _ = int.recv() => info!("SIGINT: finishing in-flight requests, then exiting"),
        }
        systemd::notify("STOPPING=1");
        let _ = stop.send(true);
    });
    Ok(())
}

/// Threads that reclaim removed snapshots' devices in the background.
const RECLAIM_WORKERS: usize = 2;

/// How long a stopping daemon, still serving, lets reclamation finish what was queued when
/// it was asked to stop.
const RECLAIM_DRAIN: Duration = Duration::from_secs(10);

/// After `stop` is set, how long the gRPC server waits for a moment with no request in
/// flight before it sends its clients GOAWAY.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// After the GOAWAY, how long the server waits for its clients to close their connections
/// before it closes them itself (once nothing is in flight). containerd closes at once; a
/// client that does not read its connection would otherwise keep thinsnap from exiting.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The GOAWAY's moment, as the server's shutdown signal reaches it: `stop` set, then
/// reclamation quiesced (bounded), then a moment with nothing in flight (bounded).
async fn goaway(
    mut stop: watch::Receiver<bool>,
    mut quiesced: watch::Receiver<bool>,
    metrics: &Metrics,
) {
    let _ = stop.wait_for(|s| *s).await;
    let _ = tokio::time::timeout(
        RECLAIM_DRAIN + Duration::from_secs(5),
        quiesced.wait_for(|q| *q),
    )
    .await;
    metrics
        .idle_until(tokio::time::Instant::now() + IDLE_WAIT)
        .await;
}

/// Waits for the gRPC server to finish. [`CLOSE_WAIT`] after its GOAWAY (`goaway` set by
/// the server), with nothing in flight, connections still open are closed by stopping it.
async fn finish_serving(
    mut server: JoinHandle<Result<()>>,
    mut goaway: watch::Receiver<bool>,
    metrics: &Metrics,
) -> Result<Result<()>> {
    let closing = async {
        if goaway.wait_for(|g| *g).await.is_err() {
            // The server ended, and the select below has its result.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(CLOSE_WAIT).await;
        while metrics.in_flight() > 0 {
            metrics
                .idle_until(tokio::time::Instant::now() + Duration::from_secs(1))
                .await;
        }
    };
    tokio::select! {
        served = &mut server => served.context("gRPC server panicked"),
        () = closing => {
            warn!("clients kept their connections open {CLOSE_WAIT:?} after GOAWAY; closing them");
            server.abort();
            Ok(Ok(()))
        }
    }
}

/// Serves containerd's Snapshots API and the admin API on `listener` until `stop` is set.
///
/// A client reconnects the moment it gets GOAWAY, and containerd gives that reconnection
/// one second to complete its handshake with the next thinsnap. So everything slow about
/// stopping happens before the GOAWAY, while requests are still served: the background
/// reclamation stops (`quiesced`), then the server waits (at most [`IDLE_WAIT`]) for a
/// moment with nothing in flight. After the GOAWAY only a flush is left, and the second is
/// the restart's. The receiver returned is set once the GOAWAY is sent.
fn grpc(
    listener: UnixListener,
    ready: ready::Ready,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    quiesced: watch::Receiver<bool>,
) -> (JoinHandle<Result<()>>, watch::Receiver<bool>) {
    let (sent, goaway_sent) = watch::channel(false);
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(
                service::api::snapshots::snapshots_server::SnapshotsServer::new(Service::new(
                    ready.clone(),
                    metrics.clone(),
                )),
            )
            .add_service(service::api::admin::admin_server::AdminServer::new(
                Admin::new(ready, metrics.clone()),
            ))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async move {
                    goaway(stop, quiesced, &metrics).await;
                    let _ = sent.send(true);
                },
            )
            .await
            .context("gRPC server failed")
    });
    (task, goaway_sent)
}

async fn serve(
    config: &Config,
    activated: systemd::Activated,
    open: impl FnOnce() -> Result<Engine> + Send + 'static,
) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    // Handlers first: once a socket answers, a SIGTERM must mean a graceful stop.
    let (stop_tx, stop) = watch::channel(false);
    stop_on_signal(stop_tx).await?;
    let (quiesce_tx, quiesced) = watch::channel(false);
    let (starter, gate) = ready::gate();
    let passed = activated.snapshots.is_some();
    let early = match activated.snapshots {
        Some(l) => {
            let l = Listener::open(Some(l), &config.socket, "containerd's socket (`socket`)")?;
            info!("answering on the socket systemd passed; requests wait for the engine");
            Some((
                grpc(
                    l.listener,
                    gate.clone(),
                    metrics.clone(),
                    stop.clone(),
                    quiesced.clone(),
                ),
                l.bound,
            ))
        }
        None => None,
    };
    let snap = match tokio::task::spawn_blocking(open).await {
        Ok(Ok(e)) => Arc::new(e),
        Ok(Err(e)) => {
            starter.failed(format!("thinsnap failed to start: {e:#}"));
            return Err(e);
        }
        Err(e) => anyhow::bail!("opening the engine panicked: {e}"),
    };
    // Removed snapshots' devices are reclaimed on two threads beside the requests (and
    // what a crash left is queued now, not done during start-up).
    if !snap.config().async_remove {
        snap.start_reclaiming(RECLAIM_WORKERS)?;
    }
    starter.up(snap.clone());
    // Asked to stop, reclamation finishes what it has (the server still serving), then the
    // server may say GOAWAY.
    let quiesce = {
        let (s, mut stop) = (snap.clone(), stop.clone());
        tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            let _ = tokio::task::spawn_blocking(move || s.stop_reclaiming(RECLAIM_DRAIN)).await;
            let _ = quiesce_tx.send(true);
        })
    };
    // The plugin socket before containerd's: once that answers, both do.
    let volumes = match (snap.config().volumes.socket.clone(), activated.volumes) {
        (Some(path), passed) => {
            let l = Listener::open(passed, &path, "volume plugin (`volumes.socket`)")?;
            if !service::volume::docker_discoverable(&path) {
                warn!(socket = %path.display(), "Docker finds plugins by their socket in /run/docker/plugins; for this path write /etc/docker/plugins/thinsnap.spec containing unix://{}", path.display());
            }
            info!(socket = %path.display(), mount_dir = %snap.config().volumes.mount_dir.display(), "serving Docker's volume plugin protocol");
            let task = tokio::spawn(service::volume::serve(
                l.listener,
                snap.clone(),
                metrics.clone(),
                stop.clone(),
            ));
            Some((task, l.bound))
        }
        (None, Some(_)) => {
            anyhow::bail!("systemd passed a socket for the volume plugin, but `volumes.socket` is empty: set it to that socket's path, or remove it from the socket unit")
        }
        (None, None) => None,
    };
    start_background(&snap, &metrics).await?;
    let ((server, goaway_sent), bound) = match early {
        Some(s) => s,
        None => {
            let l = Listener::open(None, &config.socket, "containerd's socket (`socket`)")?;
            (
                grpc(l.listener, gate, metrics.clone(), stop.clone(), quiesced),
                l.bound,
            )
        }
    };
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    info!(socket = %config.socket.display(), started, from_systemd = passed, "serving containerd's Snapshots API");
    systemd::notify("READY=1");
    let served = finish_serving(server, goaway_sent, &metrics).await?;
    // Reclamation stopped before the GOAWAY (what is still queued is the next start's),
    // unless the server ended on an error of its own.
    if *stop.borrow() {
        let _ = quiesce.await;
    } else {
        quiesce.abort();
    }
    // Ready records of Prepare are committed without waiting for the disk; the engine is
    // not dropped (background threads hold it), so make them durable now.
    if let Err(e) = snap.flush() {
        warn!("cannot make the last store commits durable: {e}; the next start redoes them");
    }
    if let Some(p) = bound {
        let _ = std::fs::remove_file(p);
    }
    if let Some((task, bound)) = volumes {
        let _ = task.await;
        if let Some(p) = bound {
            let _ = std::fs::remove_file(p);
        }
    }
    served?;
    info!("stopped");
    Ok(())
}

/// The work that runs beside the requests: background removal, metrics, autogrow.
async fn start_background(snap: &Arc<Engine>, metrics: &Arc<Metrics>) -> Result<()> {
    // Every minute: with async_remove, what Cleanup has not reclaimed yet; otherwise the
    // devices that were busy when the workers got to them.
    let s = snap.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            let s = s.clone();
            let res = tokio::task::spawn_blocking(move || match s.config().async_remove {
                true => s.cleanup().map(|_| ()),
                false => s.queue_tombstones(),
            })
            .await;
            if let Ok(Err(e)) = res {
                warn!("background reclamation: {e}");
            }
        }
    });
    if let Some(addr) = snap.config().metrics_listen {
        let http = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for metrics (`metrics.listen`)"))?;
        info!(%addr, "serving Prometheus metrics at /metrics");
        tokio::spawn(service::metrics_http::serve(
            http,
            snap.clone(),
            metrics.clone(),
        ));
    }
    crate::autogrow::spawn(snap.clone(), metrics.clone());
    Ok(())
}
