//! A read-only OCI distribution registry on 127.0.0.1 over plain HTTP, serving the images a
//! test gives it, so that pulls run in a guest without a network: `GET`/`HEAD` of `/v2/`, of
//! manifests by tag or digest and of blobs, each answered on a connection of its own
//! (`Connection: close`). Pulls are what reach containerd's pull unpacker (the path CRI and
//! dockerd's containerd image store take, unlike `ctr images import`), which asks a
//! snapshotter for layers it may have already.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use serde_json::{json, Value};

use super::image::{digest, OCI_MANIFEST};

/// One image: its manifest and every blob it names (config and layers).
pub struct Image {
    pub name: String,
    pub tag: String,
    pub manifest: Vec<u8>,
    pub blobs: Vec<Vec<u8>>,
}

impl Image {
    /// The image of a `docker save` archive of Docker before 25 (`manifest.json`,
    /// `<id>/layer.tar`, `<config>.json`) as an OCI image with uncompressed layers: the
    /// layers' digests are their diff ids, so containerd gets the chain ids Docker had.
    pub fn from_docker_save(archive: &Path, name: &str, tag: &str) -> Image {
        let mut files = std::collections::BTreeMap::new();
        let mut a = tar::Archive::new(std::fs::File::open(archive).unwrap());
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            files.insert(path, data);
        }
        let manifest: Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        let m = &manifest[0];
        let config = files[m["Config"].as_str().unwrap()].clone();
        let layers: Vec<Vec<u8>> = m["Layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| files[l.as_str().unwrap()].clone())
            .collect();
        let desc = |mt: &str, data: &[u8]| json!({"mediaType": mt, "digest": digest(data), "size": data.len()});
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc("application/vnd.oci.image.config.v1+json", &config),
            "layers": layers.iter().map(|l| desc("application/vnd.oci.image.layer.v1.tar", l)).collect::<Vec<_>>(),
        }))
        .unwrap();
        let mut blobs = vec![config];
        blobs.extend(layers);
        Image {
            name: name.into(),
            tag: tag.into(),
            manifest,
            blobs,
        }
    }
}

/// A running registry; stopped on drop.
pub struct Registry {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn respond(
    stream: &mut TcpStream,
    head_only: bool,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let _ = stream.write_all(out.as_bytes());
    if !head_only {
        let _ = stream.write_all(body);
    }
    let _ = stream.flush();
}

fn serve_one(mut stream: TcpStream, images: &[Image]) {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
        if req[0] == 0x16 {
            // A TLS handshake (dockerd tries HTTPS first): a plain HTTP answer is what
            // makes its client fall back to HTTP, as from any plain-HTTP registry.
            let _ = stream.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n");
            return;
        }
        if req.len() > 64 << 10 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&req);
    let mut first = text.lines().next().unwrap_or("").split(' ');
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let head = method == "HEAD";
    let api = (
        "Docker-Distribution-API-Version",
        "registry/2.0".to_string(),
    );
    let path = path.split('?').next().unwrap_or("");
    if path == "/v2/" || path == "/v2" {
        return respond(
            &mut stream,
            head,
            "200 OK",
            &[api, ("Content-Type", "application/json".into())],
            b"{}",
        );
    }
    let not_found = |stream: &mut TcpStream, code: &str| {
        let body = format!(r#"{{"errors":[{{"code":"{code}","message":"not here"}}]}}"#);
        respond(
            stream,
            head,
            "404 Not Found",
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        )
    };
    let Some(rest) = path.strip_prefix("/v2/") else {
        return not_found(&mut stream, "NAME_UNKNOWN");
    };
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        let found = images
            .iter()
            .find(|i| i.name == name && (i.tag == reference || digest(&i.manifest) == reference));
        return match found {
            Some(i) => respond(
                &mut stream,
                head,
                "200 OK",
                &[
                    api,
                    ("Content-Type", OCI_MANIFEST.into()),
                    ("Docker-Content-Digest", digest(&i.manifest)),
                ],
                &i.manifest,
            ),
            None => not_found(&mut stream, "MANIFEST_UNKNOWN"),
        };
    }
    if let Some((name, d)) = rest.rsplit_once("/blobs/") {
        let blob = images
            .iter()
            .filter(|i| i.name == name)
            .flat_map(|i| i.blobs.iter())
            .find(|b| digest(b) == d);
        return match blob {
            Some(b) => respond(
                &mut stream,
                head,
                "200 OK",
                &[
                    api,
                    ("Content-Type", "application/octet-stream".into()),
                    ("Docker-Content-Digest", d.to_string()),
                ],
                b,
            ),
            None => not_found(&mut stream, "BLOB_UNKNOWN"),
        };
    }
    not_found(&mut stream, "UNSUPPORTED")
}

impl Registry {
    /// Serves `images` on a free port of 127.0.0.1.
    pub fn serve(images: Vec<Image>) -> Registry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let images = Arc::new(images);
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let images = images.clone();
                        stream.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || serve_one(stream, &images));
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        });
        Registry {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// The reference of image `name:tag` here.
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/{name}:{tag}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
