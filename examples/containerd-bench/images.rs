//! The benchmark's images, built offline: a busybox image (one gzip layer: the guest's
//! static busybox and its applets) and the ~200 MB, 20,000-file image `thinsnap bench
//! import` generates; each snapshotter and round gets its own copy with unique content,
//! so every import writes its blobs and unpacks its layers afresh. And `ctr` timed on them.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use thinsnap::bench::import::{generate, ImportBench};

use crate::setup::{root_is_rootfs, Containerd};

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The guest's static busybox (the host's on a Vagrant VM).
fn busybox() -> Result<PathBuf> {
    ["/busybox/bin/busybox", "/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("no static busybox at /busybox/bin/busybox (the VM guest's) or /bin/busybox")
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

/// Writes an OCI archive of a one-layer busybox image named `name` to `path`; `unique`
/// goes into /etc/bench-id, so each copy has its own layer. Returns the archive's size.
pub fn busybox_image(path: &Path, name: &str, unique: &str) -> Result<u64> {
    let bb_path = busybox()?;
    let bb = std::fs::read(&bb_path)?;
    let list = Command::new(&bb_path).arg("--list").output()?;
    let mut b = tar::Builder::new(Vec::new());
    for d in ["bin/", "etc/", "tmp/", "proc/", "sys/", "dev/"] {
        let mode = if d == "tmp/" { 0o1777 } else { 0o755 };
        b.append_data(
            &mut header(tar::EntryType::Directory, mode, 0),
            d,
            std::io::empty(),
        )?;
    }
    b.append_data(
        &mut header(tar::EntryType::Regular, 0o755, bb.len() as u64),
        "bin/busybox",
        &bb[..],
    )?;
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
        }
    }
    let id = format!("{unique}\n");
    b.append_data(
        &mut header(tar::EntryType::Regular, 0o644, id.len() as u64),
        "etc/bench-id",
        id.as_bytes(),
    )?;
    let layer = b.into_inner()?;
    let diff_id = digest(&layer);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer)?;
    let gz = gz.finish()?;

    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut blob = |media_type: &str, data: Vec<u8>| {
        let d = digest(&data);
        let desc = json!({"mediaType": media_type, "digest": d, "size": data.len()});
        blobs.push((format!("blobs/sha256/{}", &d[7..]), data));
        desc
    };
    let layer_desc = blob("application/vnd.oci.image.layer.v1.tar+gzip", gz);
    let config = json!({"architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}});
    let config_desc = blob(
        "application/vnd.oci.image.config.v1+json",
        serde_json::to_vec(&config)?,
    );
    let manifest_type = "application/vnd.oci.image.manifest.v1+json";
    let manifest = json!({"schemaVersion": 2, "mediaType": manifest_type,
        "config": config_desc, "layers": [layer_desc]});
    let mut m = blob(manifest_type, serde_json::to_vec(&manifest)?);
    m["annotations"] = json!({"io.containerd.image.name": name});
    let index = json!({"schemaVersion": 2, "manifests": [m]});

    let mut a = tar::Builder::new(std::fs::File::create(path)?);
    let mut add = |n: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        a.append_data(&mut h, n, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    for (n, data) in &blobs {
        add(n, data)?;
    }
    add("index.json", &serde_json::to_vec(&index)?)?;
    a.into_inner()?.sync_all()?;
    Ok(std::fs::metadata(path)?.len())
}

/// Generates the large image named `name` in `dir` (as `thinsnap bench import` does);
/// returns the archive and its uncompressed layer bytes.
pub fn large_image(
    dir: &Path,
    name: &str,
    mb: u64,
    files: u32,
    seed: u64,
) -> Result<(PathBuf, u64)> {
    std::fs::create_dir_all(dir)?;
    let opts = ImportBench {
        size_mb: mb,
        files,
        layers: 3,
        tar: PathBuf::new(),
        dir: None,
    };
    let (archive, tars, total) = generate(dir, &opts, seed, name)?;
    for t in tars {
        std::fs::remove_file(t)?;
    }
    Ok((archive, total))
}

/// `ctr images import --snapshotter SNAPSHOTTER ARCHIVE` (which unpacks every layer onto
/// the snapshotter), timed from process start to exit, after a sync so that earlier
/// writes are not flushed during it. Returns seconds.
pub fn import(c: &Containerd, snapshotter: &str, archive: &Path, name: &str) -> Result<f64> {
    nix::unistd::sync();
    let t = Instant::now();
    let out = c.ok(&[
        "images",
        "import",
        "--snapshotter",
        snapshotter,
        archive.to_str().context("archive path")?,
    ])?;
    let secs = t.elapsed().as_secs_f64();
    if !out.contains("unpacking") || !out.contains(name) {
        bail!("ctr images import of {name} did not unpack it: {out}");
    }
    Ok(secs)
}

/// `ctr run --rm --snapshotter SNAPSHOTTER IMAGE ID true` (with `--no-pivot` in the
/// initramfs guest), timed from process start to exit after a sync. Returns seconds.
pub fn run(c: &Containerd, snapshotter: &str, image: &str, id: &str) -> Result<f64> {
    let mut args = vec!["run", "--rm", "--snapshotter", snapshotter];
    if root_is_rootfs() {
        args.push("--no-pivot");
    }
    args.extend([image, id, "true"]);
    nix::unistd::sync();
    let t = Instant::now();
    c.ok(&args)?;
    Ok(t.elapsed().as_secs_f64())
}
