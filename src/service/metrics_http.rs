//! The Prometheus endpoint (`[metrics] listen`): `GET /metrics` over HTTP/1.1 with hyper,
//! one request per connection. What a scraper, or anyone who reaches the port, can make it
//! do is bounded: at most [`MAX_CONNECTIONS`] at once (more wait in the listen backlog),
//! [`DEADLINE`] for a whole connection, and a text rendered at most once a second
//! ([`Metrics::render_cached`]) from a pool status that does not make the kernel commit the
//! pool's metadata.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{body::Bytes, Method, Request, Response, StatusCode};
use thinsnap_core::Engine;
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// The longest a connection may take, from accept to its last byte.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, snap: Arc<Engine>, metrics: Arc<Metrics>) {
    serve_with(listener, snap, metrics, MAX_CONNECTIONS, DEADLINE).await
}

async fn serve_with(
    listener: TcpListener,
    snap: Arc<Engine>,
    metrics: Arc<Metrics>,
    max_connections: usize,
    deadline: Duration,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: try again later, not in a tight loop.
                warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let (snap, metrics) = (snap.clone(), metrics.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| answer(req, snap.clone(), metrics.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(deadline, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("metrics connection: {e}"),
                Err(_) => debug!("metrics connection: closed after {deadline:?}"),
            }
            drop(permit);
        });
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    snap: Arc<Engine>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let (status, body) = if req.method() == Method::GET && path == "/metrics" {
        match tokio::task::spawn_blocking(move || metrics.render_cached(&snap)).await {
            Ok(text) => (StatusCode::OK, text),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("rendering the metrics failed: {e}\n"),
            ),
        }
    } else {
        (
            StatusCode::NOT_FOUND,
            "thinsnap serves only GET /metrics here\n".to_string(),
        )
    };
    Ok(Response::builder()
        .status(status)
        .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn engine() -> (tempfile::TempDir, Arc<Engine>) {
        let dir = tempfile::tempdir().unwrap();
        let config = thinsnap_core::config::Config::parse(&format!(
            "state_dir = \"{}\"\n[pool]\nname = \"sim\"",
            dir.path().display()
        ))
        .unwrap();
        let pool = thinsnap_core::engine::sim::SimPool::new("sim");
        let e = Engine::with_pool(config, Box::new(pool)).unwrap();
        (dir, Arc::new(e))
    }

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn slow_clients_cannot_hold_it_and_other_paths_are_404() {
        let (_dir, snap) = engine();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let server = tokio::spawn(serve_with(l, snap, metrics, 2, Duration::from_millis(300)));
        // Two clients that connect and never send take every slot, until their deadline
        // (300 ms after the server accepted them, so after `started`, whatever the load).
        let started = std::time::Instant::now();
        let idle: Vec<_> = futures_connect(addr, 2).await;
        let reply = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("thinsnap_pool_up"), "{reply}");
        assert!(
            started.elapsed() >= Duration::from_millis(295),
            "served only once a slot freed: after {:?}",
            started.elapsed()
        );
        let reply = get(addr, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
        drop(idle);
        server.abort();
    }

    async fn futures_connect(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept them first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        v
    }
}
