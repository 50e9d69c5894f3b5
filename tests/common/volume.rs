//! A client of thinsnap's Docker volume plugin socket for the tests: raw HTTP/1.1 over the
//! unix socket as Docker's plugin client speaks it (POST, JSON body with Content-Length,
//! keep-alive), reading answers by their Content-Length. Independent of thinsnap's own
//! client (`src/service/plugin_client.rs`).

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{json, Value};

/// Daemon configuration lines that turn the plugin on, socket and mounts in the test's
/// directory (see [`super::daemon::test_config`]).
pub const CONFIG: &str =
    "[volumes]\nsocket = \"{dir}/volume.sock\"\nmount_dir = \"{dir}/volumes\"\n";

/// Docker's plugin media type.
pub const MEDIA: &str = "application/vnd.docker.plugins.v1+json";

/// An answer: HTTP status, headers (lowercase names) and JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Answer {
    /// The `Err` field ("" on success).
    pub fn err(&self) -> &str {
        self.body["Err"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The plugin socket.
pub struct Plugin {
    pub socket: PathBuf,
}

/// One connection, for several requests in a row (keep-alive).
pub struct Session {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// Writes one request.
fn send(w: &mut UnixStream, verb: &str, path: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        w,
        "{verb} {path} HTTP/1.1\r\nHost: plugin\r\nUser-Agent: Go-http-client/1.1\r\nAccept: {MEDIA}\r\nContent-Type: {MEDIA}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    w.write_all(body)?;
    w.flush()
}

/// Reads one answer: status line, headers, then exactly Content-Length bytes of body.
fn receive(r: &mut BufReader<UnixStream>) -> std::io::Result<Answer> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| bad(format!("header {h:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| bad(format!("no Content-Length in {headers:?}")))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let body = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("body {:?}: {e}", String::from_utf8_lossy(&body))))?;
    Ok(Answer {
        status,
        headers,
        body,
    })
}

impl Session {
    /// POSTs `body` to `/<method>` and reads the answer.
    pub fn post(&mut self, method: &str, body: &Value) -> std::io::Result<Answer> {
        send(
            &mut self.writer,
            "POST",
            &format!("/{method}"),
            body.to_string().as_bytes(),
        )?;
        receive(&mut self.reader)
    }
}

impl Plugin {
    /// A new connection.
    pub fn session(&self) -> std::io::Result<Session> {
        let s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(600)))?;
        Ok(Session {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Sends `verb /path` with a raw body on a new connection and reads the answer.
    pub fn raw(&self, verb: &str, path: &str, body: &[u8]) -> std::io::Result<Answer> {
        let mut s = self.session()?;
        send(&mut s.writer, verb, path, body)?;
        receive(&mut s.reader)
    }

    /// POSTs `body` to `/<method>` on a new connection.
    pub fn post(&self, method: &str, body: &Value) -> std::io::Result<Answer> {
        self.session()?.post(method, body)
    }

    /// Calls `method`, which must succeed (200, empty `Err`); returns the body.
    pub fn ok(&self, method: &str, body: &Value) -> Value {
        let a = self.post(method, body).unwrap();
        assert!(
            a.status == 200 && a.err().is_empty(),
            "{method} {body}: {a:?}"
        );
        a.body
    }

    /// Calls `method`, which must fail; returns the HTTP status and `Err`.
    pub fn fails(&self, method: &str, body: &Value) -> (u16, String) {
        let a = self.post(method, body).unwrap();
        assert!(
            a.status != 200 && !a.err().is_empty(),
            "{method} {body} must fail: {a:?}"
        );
        (a.status, a.err().to_string())
    }

    pub fn create(&self, name: &str, opts: &[(&str, &str)]) {
        let opts: serde_json::Map<String, Value> = opts
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        self.ok("VolumeDriver.Create", &json!({"Name": name, "Opts": opts}));
    }

    pub fn remove(&self, name: &str) {
        self.ok("VolumeDriver.Remove", &json!({ "Name": name }));
    }

    /// Mounts `name` for mount id `id`; returns the mountpoint.
    pub fn mount(&self, name: &str, id: &str) -> PathBuf {
        let b = self.ok("VolumeDriver.Mount", &json!({"Name": name, "ID": id}));
        PathBuf::from(b["Mountpoint"].as_str().unwrap())
    }

    pub fn unmount(&self, name: &str, id: &str) {
        self.ok("VolumeDriver.Unmount", &json!({"Name": name, "ID": id}));
    }

    /// The mountpoint Path reports ("" while not mounted).
    pub fn path(&self, name: &str) -> String {
        self.ok("VolumeDriver.Path", &json!({ "Name": name }))["Mountpoint"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Get's `Volume`.
    pub fn get(&self, name: &str) -> Value {
        self.ok("VolumeDriver.Get", &json!({ "Name": name }))["Volume"].clone()
    }

    /// Whether Get finds `name` (a 404 with an error means no).
    pub fn exists(&self, name: &str) -> bool {
        let a = self
            .post("VolumeDriver.Get", &json!({ "Name": name }))
            .unwrap();
        match a.status {
            200 => true,
            404 => false,
            _ => panic!("Get {name}: {a:?}"),
        }
    }

    /// Names List reports, sorted.
    pub fn list(&self) -> Vec<String> {
        let b = self.ok("VolumeDriver.List", &json!({}));
        let mut n: Vec<String> = b["Volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["Name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    }
}

/// Whether `path` is a mount point.
pub fn is_mounted(path: &Path) -> bool {
    thinpool::fs::is_mounted(path).unwrap()
}

/// The filesystem type mounted at `path`, from mountinfo.
pub fn fs_type(path: &Path) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_string_lossy();
    info.lines()
        .find(|l| l.split(' ').nth(4) == Some(want.as_ref()))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_default()
        .to_string()
}

/// The size in bytes of the active thin device named `dm_name` (the kernel's block device).
pub fn device_bytes(dm_name: &str) -> u64 {
    let name = devicemapper::DmName::new(dm_name).unwrap();
    let info = thinpool::dm::info(name)
        .unwrap()
        .unwrap_or_else(|| panic!("{dm_name} is not active"));
    thinpool::dm::block_size_bytes(&thinpool::dm::devnode(info.device()).unwrap()).unwrap()
}

/// The block device mounted at `path` (`/dev/dm-N`), from mountinfo.
pub fn source_of(path: &Path) -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_string_lossy();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(want.as_ref()))
        .unwrap_or_else(|| panic!("{} is not mounted", path.display()));
    let rest = line.split(" - ").nth(1).unwrap();
    PathBuf::from(rest.split(' ').nth(1).unwrap())
}

/// The xfs ENOSPC retries of the filesystem mounted at `path`
/// (`/sys/fs/xfs/<dev>/error/metadata/ENOSPC/max_retries`).
pub fn xfs_enospc_retries(path: &Path) -> String {
    let name = thinpool::fs::kernel_name(&source_of(path)).unwrap();
    std::fs::read_to_string(format!(
        "/sys/fs/xfs/{name}/error/metadata/ENOSPC/max_retries"
    ))
    .unwrap()
    .trim()
    .to_string()
}
