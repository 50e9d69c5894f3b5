//! Docker's volume plugin protocol over HTTP/1.1 on its own unix socket (`[volumes]
//! socket`): every request is `POST /<Method>` with a JSON body, every answer JSON with
//! `Err` ("" on success). Each request runs on tokio's blocking pool like the gRPC ones,
//! in a span with its method and volume name, and is counted in the same metrics.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::{Bytes, Incoming},
    Method, Request, Response, StatusCode,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tracing::{debug, info, info_span, warn, Instrument};

use thinsnap_core::{self as core, store::Volume, time::rfc3339, Engine, ErrorKind};

use crate::metrics::Metrics;

/// The media type of the plugin protocol's requests and answers.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";
/// Largest request body accepted, in bytes.
const MAX_BODY: usize = 1 << 20;

/// A request body: the fields any method uses (absent ones are empty).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Body {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Opts")]
    opts: Option<BTreeMap<String, String>>,
    #[serde(rename = "ID")]
    id: String,
}

/// The methods of the protocol, as `&'static str` for spans and metrics.
fn method(path: &str) -> Option<&'static str> {
    Some(match path {
        "/Plugin.Activate" => "Plugin.Activate",
        "/VolumeDriver.Create" => "VolumeDriver.Create",
        "/VolumeDriver.Remove" => "VolumeDriver.Remove",
        "/VolumeDriver.Mount" => "VolumeDriver.Mount",
        "/VolumeDriver.Unmount" => "VolumeDriver.Unmount",
        "/VolumeDriver.Path" => "VolumeDriver.Path",
        "/VolumeDriver.Get" => "VolumeDriver.Get",
        "/VolumeDriver.List" => "VolumeDriver.List",
        "/VolumeDriver.Capabilities" => "VolumeDriver.Capabilities",
        _ => return None,
    })
}

/// A JSON answer with HTTP status `status`.
fn answer(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

/// An error answer: `{"Err": msg}` with the HTTP status that fits the error's kind
/// (Docker reads `Err` from any non-200 answer). The one mapping of engine errors to HTTP.
fn error(kind: ErrorKind, msg: &str) -> Response<Full<Bytes>> {
    let status = match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::AlreadyExists | ErrorKind::FailedPrecondition => StatusCode::CONFLICT,
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    answer(status, &json!({ "Err": msg }))
}

/// A volume as Docker's Get and List show it; `status` adds the Status map (Get only).
pub fn volume_json(snap: &Engine, v: &Volume, status: bool) -> Value {
    let mountpoint = snap
        .volume_mountpoint(v)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut out = json!({
        "Name": v.name,
        "Mountpoint": mountpoint,
        "CreatedAt": rfc3339(v.created_ns),
    });
    if status {
        let mut s = json!({
            "size": thinpool::units::format_size(v.device.size),
            "size_bytes": v.device.size,
            "filesystem": v.device.fs.as_str(),
            "thin_id": v.device.thin_id.get(),
            "device": snap.device_name(v.device.thin_id),
            "mounts": v.mounts.len(),
        });
        if let Some(o) = &v.origin {
            s["from"] = json!(o);
        }
        if let Some(from) = v.resize_from {
            // An interrupted resize: the device is `size`, its filesystem may not be yet.
            s["resize_pending_from_bytes"] = json!(from);
        }
        if let Some(u) = snap.volume_usage(v) {
            s["used_bytes"] = json!(u);
        }
        out["Status"] = s;
    }
    out
}

/// Runs one method with `body` on the blocking pool.
fn dispatch(snap: &Engine, method: &str, body: Body) -> core::Result<Value> {
    let name = body.name.as_str();
    Ok(match method {
        "Plugin.Activate" => json!({ "Implements": ["VolumeDriver"] }),
        "VolumeDriver.Capabilities" => json!({ "Capabilities": { "Scope": "local" }, "Err": "" }),
        "VolumeDriver.Create" => {
            snap.create_volume(name, body.opts.unwrap_or_default())?;
            json!({ "Err": "" })
        }
        "VolumeDriver.Remove" => {
            snap.remove_volume(name)?;
            json!({ "Err": "" })
        }
        "VolumeDriver.Mount" => {
            let p = snap.mount_volume(name, &body.id)?;
            json!({ "Mountpoint": p.display().to_string(), "Err": "" })
        }
        "VolumeDriver.Unmount" => {
            snap.unmount_volume(name, &body.id)?;
            json!({ "Err": "" })
        }
        "VolumeDriver.Path" => {
            let p = snap.volume_path(name)?;
            json!({ "Mountpoint": p.map(|p| p.display().to_string()).unwrap_or_default(), "Err": "" })
        }
        "VolumeDriver.Get" => {
            let v = snap.volume(name)?;
            json!({ "Volume": volume_json(snap, &v, true), "Err": "" })
        }
        "VolumeDriver.List" => {
            let vols: Vec<Value> = snap
                .volumes()?
                .iter()
                .map(|v| volume_json(snap, v, false))
                .collect();
            json!({ "Volumes": vols, "Err": "" })
        }
        _ => unreachable!("methods are checked before dispatch"),
    })
}

/// Counts requests in flight, so a stopping daemon can let them finish.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(n: &Arc<AtomicUsize>) -> InFlight {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    req: Request<Incoming>,
    snap: Arc<Engine>,
    metrics: Arc<Metrics>,
    inflight: Arc<AtomicUsize>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let _inflight = InFlight::new(&inflight);
    let path = req.uri().path().to_string();
    let Some(m) = method(&path) else {
        return Ok(error(
            ErrorKind::NotFound,
            &format!("thinsnap's volume plugin has no method {path}: it implements Plugin.Activate and VolumeDriver.{{Create,Remove,Mount,Unmount,Path,Get,List,Capabilities}}"),
        ));
    };
    if req.method() != Method::POST {
        let r = answer(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({ "Err": format!("{path} takes POST, not {}", req.method()) }),
        );
        return Ok(r);
    }
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(error(
                ErrorKind::InvalidArgument,
                &format!("cannot read the request body (at most {MAX_BODY} bytes): {e}"),
            ))
        }
    };
    let body: Body = if bytes.iter().all(u8::is_ascii_whitespace) {
        Body::default()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(b) => b,
            Err(e) => {
                return Ok(error(
                    ErrorKind::InvalidArgument,
                    &format!("{m}: the request body is not the JSON the protocol defines ({e}); option values are strings"),
                ))
            }
        }
    };
    let span = info_span!("volume request", method = m, name = %body.name);
    async move {
        let start = Instant::now();
        let res = tokio::task::spawn_blocking(move || dispatch(&snap, m, body))
            .await
            .unwrap_or_else(|e| Err(core::Error::Internal(format!("{m} panicked: {e}"))));
        let secs = start.elapsed().as_secs_f64();
        let r = match res {
            Ok(v) => {
                metrics.observe(m, None, secs);
                answer(StatusCode::OK, &v)
            }
            Err(e) => {
                let kind = e.kind();
                if kind == ErrorKind::Internal {
                    warn!(?kind, "{e}");
                } else {
                    debug!(?kind, "{e}");
                }
                metrics.observe(m, Some(kind), secs);
                error(kind, &e.to_string())
            }
        };
        debug!(ms = secs * 1000.0, "done");
        Ok(r)
    }
    .instrument(span)
    .await
}

/// Serves the plugin protocol on `listener` until `stop` changes, then waits (up to two
/// minutes) for requests in flight to finish.
pub async fn serve(
    listener: UnixListener,
    snap: Arc<Engine>,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let inflight = Arc::new(AtomicUsize::new(0));
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.changed() => break,
        };
        let stream = match conn {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("volume plugin socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (snap, metrics, inflight) = (snap.clone(), metrics.clone(), inflight.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                handle(req, snap.clone(), metrics.clone(), inflight.clone())
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                debug!("volume plugin connection: {e}");
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    info!("volume plugin stopped");
}

/// Whether `path` is where Docker looks for plugins (so `-d thinsnap` finds it by name).
pub fn docker_discoverable(path: &Path) -> bool {
    path.parent() == Some(Path::new("/run/docker/plugins"))
        || path.parent() == Some(Path::new("/etc/docker/plugins"))
        || path.parent() == Some(Path::new("/usr/lib/docker/plugins"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_protocol_method_is_known() {
        for m in [
            "Plugin.Activate",
            "VolumeDriver.Create",
            "VolumeDriver.Remove",
            "VolumeDriver.Mount",
            "VolumeDriver.Unmount",
            "VolumeDriver.Path",
            "VolumeDriver.Get",
            "VolumeDriver.List",
            "VolumeDriver.Capabilities",
        ] {
            assert_eq!(method(&format!("/{m}")), Some(m));
        }
        assert_eq!(method("/VolumeDriver.Update"), None);
        assert_eq!(method("/"), None);
    }

    #[test]
    fn bodies_parse_with_absent_fields() {
        let b: Body = serde_json::from_str(r#"{"Name":"v","Opts":null}"#).unwrap();
        assert_eq!((b.name.as_str(), b.opts, b.id.as_str()), ("v", None, ""));
        let b: Body =
            serde_json::from_str(r#"{"Name":"v","Opts":{"size":"5G"},"ID":"abc"}"#).unwrap();
        assert_eq!(b.opts.unwrap()["size"], "5G");
        assert_eq!(b.id, "abc");
        assert!(serde_json::from_str::<Body>(r#"{"Name":"v","Opts":{"size":5}}"#).is_err());
    }

    #[test]
    fn errors_carry_err_and_a_fitting_status() {
        let r = error(ErrorKind::NotFound, "volume \"x\" does not exist");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[hyper::header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(
            error(ErrorKind::FailedPrecondition, "").status(),
            StatusCode::CONFLICT
        );
        assert_eq!(
            error(ErrorKind::Internal, "").status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn docker_plugin_directories() {
        assert!(docker_discoverable(Path::new(
            "/run/docker/plugins/thinsnap.sock"
        )));
        assert!(!docker_discoverable(Path::new("/tmp/x/thinsnap.sock")));
    }
}
