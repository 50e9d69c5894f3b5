//! `thinsnap bench import`: image import throughput through a running daemon, against
//! GNU tar extracting the same uncompressed layers onto a fresh snapshot of that daemon.

use std::{
    fs::File,
    io::{BufWriter, Read, Write},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use thinsnap_core::config::Config;

use crate::{
    image::{self, mount::TempMount, Backend, Digest},
    service::client::Client,
};

/// Options of the image import benchmark.
#[derive(Debug, clap::Args)]
pub struct ImportBench {
    /// Uncompressed size of the generated image, in MB.
    #[arg(long, default_value_t = 200)]
    pub size_mb: u64,
    /// Files in the generated image, spread over its layers.
    #[arg(long, default_value_t = 20_000)]
    pub files: u32,
    /// Layers of the generated image.
    #[arg(long, default_value_t = 3)]
    pub layers: u32,
    /// The tar to compare with (GNU tar; busybox tar works too).
    #[arg(long, default_value = "/usr/bin/tar")]
    pub tar: PathBuf,
    /// Directory for the generated image (removed afterwards); default:
    /// `$THINSNAP_SCRATCH/thinsnap-bench-import`, else /var/tmp.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// xorshift64*: fast, deterministic filler.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// File sizes of a mixed workload (most files small, a few large), scaled to `total`.
fn sizes(rng: &mut Rng, files: u32, total: u64) -> Vec<u64> {
    let raw: Vec<u64> = (0..files)
        .map(|_| match rng.below(100) {
            0..=69 => rng.below(4 << 10),
            70..=97 => (4 << 10) + rng.below(28 << 10),
            _ => (32 << 10) + rng.below(480 << 10),
        })
        .collect();
    let sum: u64 = raw.iter().sum::<u64>().max(1);
    raw.iter()
        .map(|s| (*s as u128 * total as u128 / sum as u128) as u64)
        .collect()
}

/// Writes layer tar `path` with `sizes` files; returns its diff id and size.
fn write_layer(path: &Path, layer: u32, sizes: &[u64], rng: &mut Rng) -> Result<(Digest, u64)> {
    let mut b = tar::Builder::new(BufWriter::with_capacity(1 << 20, File::create(path)?));
    let mut buf = Vec::new();
    let mut dir_header = tar::Header::new_gnu();
    dir_header.set_entry_type(tar::EntryType::Directory);
    dir_header.set_mode(0o755);
    dir_header.set_mtime(1_700_000_000);
    dir_header.set_size(0);
    dir_header.set_uid(0);
    dir_header.set_gid(0);
    for (i, size) in sizes.iter().enumerate() {
        if i % 100 == 0 {
            let mut h = dir_header.clone();
            b.append_data(&mut h, format!("l{layer}/d{}/", i / 100), std::io::empty())?;
        }
        buf.resize(*size as usize, 0);
        rng.fill(&mut buf);
        let mut h = tar::Header::new_gnu();
        h.set_size(*size);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, format!("l{layer}/d{}/f{i}", i / 100), &buf[..])?;
    }
    b.into_inner()?.flush()?;
    let mut f = File::open(path)?;
    let mut h = image::digest::Hashing::new(&mut f);
    std::io::copy(&mut h, &mut std::io::sink())?;
    let (d, n) = h.finish();
    Ok((d, n))
}

/// Appends file `name` with the content of `src` (or `data`) to the archive.
fn add<W: Write>(b: &mut tar::Builder<W>, name: &str, size: u64, data: impl Read) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, name, data)?;
    Ok(())
}

fn blob<W: Write>(b: &mut tar::Builder<W>, data: &[u8]) -> Result<serde_json::Value> {
    let d = Digest::of(data);
    add(
        b,
        &format!("blobs/sha256/{}", d.hex()),
        data.len() as u64,
        data,
    )?;
    Ok(json!({"digest": d.as_str(), "size": data.len()}))
}

/// Generates the benchmark image in `dir`: `opts.layers` uncompressed layer tars of
/// `opts.files` files and `opts.size_mb` MB in all, and an OCI archive of them,
/// `dir/image.tar`, whose manifest is named `name` (containerd's `io.containerd.image.name`
/// annotation, which `ctr images import` needs). `seed` decides the content, so a new seed
/// gives new chain ids. Returns the archive, the layer tars and their total size in bytes.
///
/// # Errors
/// When a file in `dir` cannot be written.
pub fn generate(
    dir: &Path,
    opts: &ImportBench,
    seed: u64,
    name: &str,
) -> Result<(PathBuf, Vec<PathBuf>, u64)> {
    let mut rng = Rng(seed | 1);
    let layers = opts.layers.max(1);
    let per = opts.files / layers;
    let mut tars = Vec::new();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut total = 0;
    for l in 0..layers {
        let path = dir.join(format!("layer{l}.tar"));
        let sz = sizes(&mut rng, per, opts.size_mb * 1_000_000 / u64::from(layers));
        let (d, n) = write_layer(&path, l, &sz, &mut rng)?;
        descs.push(
            json!({"mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": d.as_str(), "size": n}),
        );
        diff_ids.push(d.as_str().to_string());
        tars.push(path);
        total += n;
    }
    let archive = dir.join("image.tar");
    let mut b = tar::Builder::new(BufWriter::with_capacity(1 << 20, File::create(&archive)?));
    add(
        &mut b,
        "oci-layout",
        30,
        &br#"{"imageLayoutVersion":"1.0.0"}"#[..],
    )?;
    for (t, d) in tars.iter().zip(&diff_ids) {
        let f = File::open(t)?;
        let n = f.metadata()?.len();
        add(
            &mut b,
            &format!("blobs/sha256/{}", &d["sha256:".len()..]),
            n,
            f,
        )?;
    }
    let config = json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let mut c = blob(&mut b, &serde_json::to_vec(&config)?)?;
    c["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let manifest = json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": c, "layers": descs});
    let mut m = blob(&mut b, &serde_json::to_vec(&manifest)?)?;
    m["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    m["annotations"] = json!({"io.containerd.image.name": name});
    let index = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [m]}))?;
    add(&mut b, "index.json", index.len() as u64, &index[..])?;
    b.into_inner()?.flush()?;
    Ok((archive, tars, total))
}

/// Runs the benchmark against the daemon of `config`.
pub fn run(config: &Config, opts: &ImportBench) -> Result<ExitCode> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("bench import mounts snapshots: run it as root");
    }
    let tar = [opts.tar.clone(), PathBuf::from("/busybox/bin/tar")]
        .into_iter()
        .find(|t| t.is_file())
        .with_context(|| format!("no tar to compare with at {}", opts.tar.display()))?;
    let mut client = Client::connect(&config.socket)?;
    let dir = opts
        .dir
        .clone()
        .unwrap_or_else(|| super::scratch().with_file_name("thinsnap-bench-import"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dirs = config.temp_mounts()?;
    let result = bench(&mut client, &dirs, &dir, &tar, opts);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    Ok(ExitCode::SUCCESS)
}

fn bench(
    client: &mut Client,
    dirs: &thinpool::MountDir,
    dir: &Path,
    tar: &Path,
    opts: &ImportBench,
) -> Result<()> {
    // A seed of this run, so the chain ids are new and nothing is skipped.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let t = Instant::now();
    let (archive, tars, total) = generate(dir, opts, seed, "thinsnap.bench/import:latest")?;
    let mb = total as f64 / 1e6;
    println!(
        "image: {} uncompressed layers, {} files, {mb:.1} MB (generated in {:.1} s)",
        tars.len(),
        opts.files / opts.layers.max(1) * opts.layers.max(1),
        t.elapsed().as_secs_f64()
    );
    nix::unistd::sync();
    // The first Prepare of a pool formats its base device: not part of either timing.
    let warm = format!("bench-warm-{}", std::process::id());
    client
        .prepare(&warm, "", Default::default())
        .map_err(|e| anyhow::anyhow!("cannot prepare {warm}: {e}"))?;
    client.remove(&warm)?;

    let report = image::import(
        client,
        dirs,
        &archive,
        Some("thinsnap-bench"),
        &mut image::Quiet,
    )?;
    let import_s = report.seconds;
    let mut chain: Vec<String> = report
        .layers
        .iter()
        .map(|l| l.chain_id.to_string())
        .collect();

    let key = format!("bench-tar-{}", std::process::id());
    let t = Instant::now();
    let mounts = client
        .prepare(&key, "", Default::default())
        .map_err(|e| anyhow::anyhow!("cannot prepare {key}: {e}"))?;
    let extracted = (|| -> Result<()> {
        let mnt = TempMount::new(dirs, "bench", mounts.first().context("no mount")?, &[])?;
        for t in &tars {
            let out = Command::new(tar)
                .arg("-xf")
                .arg(t)
                .arg("-C")
                .arg(mnt.path())
                .output()
                .with_context(|| format!("cannot run {}", tar.display()))?;
            if !out.status.success() {
                bail!(
                    "{} -xf {}: {}",
                    tar.display(),
                    t.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        mnt.unmount()?;
        Ok(())
    })();
    let tar_s = t.elapsed().as_secs_f64();
    let removed = client.remove(&key);
    chain.reverse();
    for c in &chain {
        if let Err(e) = client.remove(c) {
            eprintln!("thinsnap: cannot remove {c}: {e}");
        }
    }
    extracted?;
    removed.map_err(|e| anyhow::anyhow!("cannot remove {key}: {e}"))?;

    println!("{:<44} {:>8} {:>9}", "", "seconds", "MB/s");
    println!(
        "{:<44} {import_s:>8.2} {:>9.1}",
        "thinsnap image import (verify+apply+commit)",
        mb / import_s
    );
    println!(
        "{:<44} {tar_s:>8.2} {:>9.1}",
        format!("{} -x onto a fresh snapshot", tar.display()),
        mb / tar_s
    );
    let layers_s: f64 = report.layers.iter().map(|l| l.seconds).sum();
    println!(
        "  of the import: {layers_s:.2} s preparing, applying, checking diff ids and \
         committing layers; {:.2} s verifying blob digests and looking up layers",
        import_s - layers_s
    );
    println!("import / tar: {:.2}x the time", import_s / tar_s);
    Ok(())
}
