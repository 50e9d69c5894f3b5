//! A client of the daemon's Docker volume plugin socket, for the CLI (`thinsnap volume`):
//! one HTTP/1.1 POST per connection, JSON in and out, as Docker sends them.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::volume::CONTENT_TYPE;

/// A client of the plugin socket.
pub struct PluginClient {
    socket: PathBuf,
}

impl PluginClient {
    /// A client of the plugin at `socket`.
    pub fn new(socket: &Path) -> PluginClient {
        PluginClient {
            socket: socket.to_path_buf(),
        }
    }

    /// Calls `method` (e.g. `VolumeDriver.List`) with `body` and returns the answer.
    ///
    /// # Errors
    /// When the daemon cannot be reached, or answers with an error (its `Err`).
    pub fn call(&self, method: &str, body: &Value) -> Result<Value> {
        let mut s = UnixStream::connect(&self.socket).with_context(|| {
            format!(
                "cannot reach thinsnap's volume plugin at {}: is `thinsnap serve` running with `[volumes] socket` set?",
                self.socket.display()
            )
        })?;
        s.set_read_timeout(Some(Duration::from_secs(600)))?;
        let body = body.to_string();
        write!(
            s,
            "POST /{method} HTTP/1.1\r\nHost: thinsnap\r\nContent-Type: {CONTENT_TYPE}\r\nAccept: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .with_context(|| format!("reading the answer to {method}"))?;
        let text = String::from_utf8_lossy(&raw);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            bail!("{method}: the plugin's answer has no HTTP head: {text:?}");
        };
        let status = head.split_whitespace().nth(1).unwrap_or("");
        let v: Value = serde_json::from_str(body)
            .with_context(|| format!("{method}: HTTP {status}, not JSON: {body:?}"))?;
        match v.get("Err").and_then(Value::as_str) {
            Some(e) if !e.is_empty() => bail!("{e}"),
            _ if status != "200" => bail!("{method}: HTTP {status}: {body}"),
            _ => Ok(v),
        }
    }
}
