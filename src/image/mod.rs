//! Image import and export: an image archive (OCI layout or `docker save`) becomes a chain
//! of committed snapshots named by containerd's chain ids, and a snapshot becomes a tar of
//! its flattened filesystem, both through a [`Backend`] (the daemon's socket for the CLI).
//!
//! Import, for each layer bottom first: a committed snapshot named by the layer's chain id
//! is reused; otherwise the layer is prepared on its parent, mounted privately, applied
//! ([`apply`]), verified against its diff id, unmounted and committed under its chain id.
//! Any failure unmounts and removes that layer's active snapshot; layers committed before
//! it are complete and stay, so running the import again resumes where it stopped.

pub mod apply;
pub mod archive;
pub mod digest;
pub mod error;
pub mod export;
#[cfg(test)]
mod hostile;
pub(crate) mod mount;
mod readahead;
mod verify;
mod writeback;

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    fmt,
    io::Write,
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Instant,
};

pub use archive::{Compression, Format};
pub use digest::Digest;
pub use error::{BackendError, Error, Result};
pub use export::ExportStats;

pub use thinsnap_core::labels::{EXPORTING_LABEL, IMAGE_LABEL, IMPORTING_LABEL};
use thinsnap_core::process;

use crate::service::{api::Mount, client::Client};
use archive::Archive;
use mount::TempMount;
use thinpool::{failpoint::hit as fp, MountDir};

/// The kind of a snapshot, as the snapshotter reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A read-only view.
    View,
    /// A writable snapshot.
    Active,
    /// A committed snapshot (a layer).
    Committed,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::View => "a view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        })
    }
}

/// A mount the snapshotter returns: one block device with its filesystem and options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Filesystem type (`ext4`, `xfs`).
    pub fs_type: String,
    /// The device.
    pub source: String,
    /// Mount options.
    pub options: Vec<String>,
}

/// What import and export need of a snapshotter: containerd's Snapshots API, narrowly.
pub trait Backend {
    /// The kind of snapshot `key`, or None if there is none.
    ///
    /// # Errors
    /// When the snapshotter cannot be asked.
    fn kind(&mut self, key: &str) -> std::result::Result<Option<Kind>, BackendError>;
    /// Prepare: a new active snapshot `key` on committed `parent` ("" for none).
    ///
    /// # Errors
    /// As the snapshotter reports.
    fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> std::result::Result<Vec<MountSpec>, BackendError>;
    /// View: a new read-only snapshot `key` of committed `parent`.
    ///
    /// # Errors
    /// As the snapshotter reports.
    fn view(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> std::result::Result<Vec<MountSpec>, BackendError>;
    /// Mounts of active snapshot or view `key`.
    ///
    /// # Errors
    /// As the snapshotter reports.
    fn mounts(&mut self, key: &str) -> std::result::Result<Vec<MountSpec>, BackendError>;
    /// Commit active snapshot `key` as `name`.
    ///
    /// # Errors
    /// As the snapshotter reports.
    fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> std::result::Result<(), BackendError>;
    /// Remove snapshot `key`.
    ///
    /// # Errors
    /// As the snapshotter reports.
    fn remove(&mut self, key: &str) -> std::result::Result<(), BackendError>;
}

fn specs(mounts: Vec<Mount>) -> Vec<MountSpec> {
    mounts
        .into_iter()
        .map(|m| MountSpec {
            fs_type: m.r#type,
            source: m.source,
            options: m.options,
        })
        .collect()
}

impl Backend for Client {
    fn kind(&mut self, key: &str) -> std::result::Result<Option<Kind>, BackendError> {
        let filter = format!(
            "name==\"{}\"",
            key.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let found = self.list(vec![filter])?;
        Ok(found
            .into_iter()
            .find(|i| i.name == key)
            .map(|i| match i.kind {
                1 => Kind::View,
                2 => Kind::Active,
                _ => Kind::Committed,
            }))
    }

    fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> std::result::Result<Vec<MountSpec>, BackendError> {
        Ok(specs(self.create(false, key, parent, labels)?))
    }

    fn view(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> std::result::Result<Vec<MountSpec>, BackendError> {
        Ok(specs(self.create(true, key, parent, labels)?))
    }

    fn mounts(&mut self, key: &str) -> std::result::Result<Vec<MountSpec>, BackendError> {
        Ok(specs(Client::mounts(self, key)?))
    }

    fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> std::result::Result<(), BackendError> {
        Ok(Client::commit(self, name, key, labels)?)
    }

    fn remove(&mut self, key: &str) -> std::result::Result<(), BackendError> {
        Ok(Client::remove(self, key)?)
    }
}

/// Where an import or export reports how far it got, and learns whether to stop.
pub trait Progress {
    /// A step begins: `what`, going through `total` bytes.
    fn start(&mut self, what: &str, total: u64) {
        let _ = (what, total);
    }
    /// `bytes` more of the current step are done.
    fn advance(&mut self, bytes: u64) {
        let _ = bytes;
    }
    /// The current step is done; `summary` says how it went.
    fn done(&mut self, summary: &str) {
        let _ = summary;
    }
    /// Whether to stop now (e.g. after SIGINT); checked between tar entries.
    fn cancelled(&self) -> bool {
        false
    }
}

/// A [`Progress`] that reports nothing and never cancels.
pub struct Quiet;

impl Progress for Quiet {}

/// What happened to one layer.
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// Its chain id: the committed snapshot's name.
    pub chain_id: Digest,
    /// Digest of its uncompressed tar.
    pub diff_id: Digest,
    /// Whether the snapshot already existed (nothing was done).
    pub skipped: bool,
    /// Size of the blob in the archive.
    pub blob_bytes: u64,
    /// Size of the uncompressed tar applied (0 when skipped).
    pub tar_bytes: u64,
    /// Regular files written.
    pub files: u64,
    /// The blob's compression (None when skipped).
    pub compression: Option<Compression>,
    /// Seconds spent on it.
    pub seconds: f64,
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The image name recorded in the [`IMAGE_LABEL`] label.
    pub image: String,
    /// The archive's format.
    pub format: Format,
    /// Digest of the image configuration (docker's image id).
    pub config: Digest,
    /// Every layer, bottom first.
    pub layers: Vec<LayerReport>,
    /// Seconds for the whole import.
    pub seconds: f64,
}

impl ImportReport {
    /// The top layer's chain id: the snapshot to prepare containers on (None for an image
    /// without layers).
    pub fn top(&self) -> Option<&Digest> {
        self.layers.last().map(|l| &l.chain_id)
    }

    /// Layers imported now.
    pub fn imported(&self) -> usize {
        self.layers.iter().filter(|l| !l.skipped).count()
    }

    /// Layers that already existed.
    pub fn skipped(&self) -> usize {
        self.layers.iter().filter(|l| l.skipped).count()
    }

    /// Uncompressed bytes applied.
    pub fn tar_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.tar_bytes).sum()
    }
}

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Creates `path`, which must not exist (nor be a symlink someone planted), mode 0600.
fn create_new_private(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("create", path, e))
}

/// Imports the image in the archive at `archive_path` (`reference` names it, and chooses
/// among several); see the module docs.
///
/// # Errors
/// [`Error::Archive`] or [`Error::Integrity`] before anything is created, when the archive
/// is unusable; [`Error::Layer`] when a layer fails (its cause inside, and how many layers
/// below it were committed and stay); [`Error::Backend`] when the snapshotter cannot be
/// asked.
pub fn import(
    backend: &mut dyn Backend,
    mounts: &MountDir,
    archive_path: &Path,
    reference: Option<&str>,
    progress: &mut dyn Progress,
) -> Result<ImportReport> {
    let started = Instant::now();
    let archive = Archive::open(archive_path)?;
    let image = archive.image(reference)?;
    let name = reference
        .map(str::to_string)
        .or_else(|| image.name.clone())
        .unwrap_or_else(|| {
            archive_path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    // What is there already.
    let mut missing = vec![false; image.layers.len()];
    for (i, l) in image.layers.iter().enumerate() {
        let kind = backend
            .kind(l.chain_id.as_str())
            .map_err(|e| Error::backend(format!("cannot look up snapshot {}", l.chain_id), e))?;
        match kind {
            Some(Kind::Committed) => {}
            None => missing[i] = true,
            Some(k) => {
                return Err(Error::backend(
                    format!("cannot import layer {}/{}", i + 1, image.layers.len()),
                    format!(
                        "a snapshot named {} exists but is {k}, not committed: remove it \
                         (`thinsnap snapshot rm {}`) and import again",
                        l.chain_id, l.chain_id
                    ),
                ))
            }
        }
    }
    // Every blob to import matches its digest before anything is created.
    let to_verify: Vec<&archive::Layer> = image
        .layers
        .iter()
        .zip(&missing)
        .filter(|(l, m)| **m && l.digest.is_some())
        .map(|(l, _)| l)
        .collect();
    if !to_verify.is_empty() {
        progress.start(
            &format!("verifying {} layer blobs", to_verify.len()),
            to_verify.iter().map(|l| l.size).sum(),
        );
        verify::verify_blobs(&archive, &to_verify, progress)?;
        progress.done("layer blobs match their digests");
    }
    let total = image.layers.len();
    let mut reports = Vec::with_capacity(total);
    let mut committed = 0;
    for (i, layer) in image.layers.iter().enumerate() {
        let parent = if i == 0 {
            ""
        } else {
            image.layers[i - 1].chain_id.as_str()
        };
        if !missing[i] {
            progress.done(&format!(
                "layer {}/{total} {} already present",
                i + 1,
                layer.chain_id.short()
            ));
            reports.push(LayerReport {
                chain_id: layer.chain_id.clone(),
                diff_id: layer.diff_id.clone(),
                skipped: true,
                blob_bytes: layer.size,
                tar_bytes: 0,
                files: 0,
                compression: None,
                seconds: 0.0,
            });
            continue;
        }
        progress.start(
            &format!("layer {}/{total} {}", i + 1, layer.chain_id.short()),
            layer.size,
        );
        match import_layer(backend, mounts, &archive, layer, parent, &name, progress) {
            Ok(r) => {
                progress.done(&format!(
                    "layer {}/{total} {} imported: {} files, {:.1} MB ({}) in {:.1} s",
                    i + 1,
                    layer.chain_id.short(),
                    r.files,
                    r.tar_bytes as f64 / 1e6,
                    r.compression.map_or("tar", Compression::as_str),
                    r.seconds
                ));
                committed += 1;
                reports.push(r);
            }
            Err(LayerFailure { error, cleanup }) => {
                return Err(Error::Layer {
                    index: i + 1,
                    total,
                    chain_id: layer.chain_id.clone(),
                    committed,
                    cleanup,
                    source: error,
                })
            }
        }
    }
    Ok(ImportReport {
        image: name,
        format: image.format,
        config: image.config,
        layers: reports,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Why a layer was not imported, and (when removing its unfinished snapshot failed too)
/// what is left and how to remove it.
struct LayerFailure {
    error: Box<Error>,
    cleanup: Option<String>,
}

/// Imports one layer.
fn import_layer(
    backend: &mut dyn Backend,
    dirs: &MountDir,
    archive: &Archive,
    layer: &archive::Layer,
    parent: &str,
    image: &str,
    progress: &mut dyn Progress,
) -> std::result::Result<LayerReport, LayerFailure> {
    let started = Instant::now();
    let key = format!(
        "import-{}-{:08x}-{}",
        std::process::id(),
        mount::random(),
        layer.chain_id.short()
    );
    let mounts = backend
        .prepare(
            &key,
            parent,
            labels(&[(IMPORTING_LABEL, &process::current())]),
        )
        .map_err(|e| {
            let on = if parent.is_empty() {
                "an empty filesystem".to_string()
            } else {
                parent.to_string()
            };
            LayerFailure {
                error: Box::new(Error::backend(
                    format!("cannot prepare snapshot {key} on {on}"),
                    e,
                )),
                cleanup: None,
            }
        })?;
    fp("import.after-prepare");
    let filled = fill(dirs, archive, layer, &mounts, progress);
    let done = filled.and_then(|r| {
        backend
            .commit(
                layer.chain_id.as_str(),
                &key,
                labels(&[(IMAGE_LABEL, image)]),
            )
            .map_err(|e| {
                Error::backend(
                    format!("cannot commit snapshot {key} as {}", layer.chain_id),
                    e,
                )
            })
            .map(|()| r)
    });
    fp("import.after-commit");
    match done {
        Ok((stats, tar_bytes, compression)) => Ok(LayerReport {
            chain_id: layer.chain_id.clone(),
            diff_id: layer.diff_id.clone(),
            skipped: false,
            blob_bytes: layer.size,
            tar_bytes,
            files: stats.files,
            compression: Some(compression),
            seconds: started.elapsed().as_secs_f64(),
        }),
        Err(e) => {
            let cleanup = backend.remove(&key).err().map(|r| {
                format!(
                    "its unfinished snapshot {key} could not be removed ({r}): remove it with \
                     `thinsnap snapshot rm {key}`"
                )
            });
            Err(LayerFailure {
                error: Box::new(e),
                cleanup,
            })
        }
    }
}

/// Mounts the prepared snapshot, applies the layer, checks its diff id, unmounts. The blob
/// is read, decompressed and hashed on a thread of its own ([`readahead`]), ahead of the
/// applying; what is applied is written back on another ([`writeback`]), meanwhile.
fn fill(
    dirs: &MountDir,
    archive: &Archive,
    layer: &archive::Layer,
    mounts: &[MountSpec],
    progress: &mut dyn Progress,
) -> Result<(apply::ApplyStats, u64, Compression)> {
    let m = mounts.first().ok_or_else(|| {
        Error::backend(
            "cannot mount the prepared snapshot",
            "the snapshotter returned no mount",
        )
    })?;
    let mnt = TempMount::new(dirs, "import", m, &[])?;
    fp("import.after-mount");
    // Blob bytes read (by the read-ahead thread), and how many of them were reported.
    let read = AtomicU64::new(0);
    let reported = Cell::new(0u64);
    let report = |progress: &mut dyn Progress| {
        let now = read.load(Ordering::Relaxed);
        if now > reported.get() {
            progress.advance(now - reported.get());
            reported.set(now);
        }
    };
    let mut count = |n| {
        read.fetch_add(n, Ordering::Relaxed);
    };
    let stream = archive.layer(layer, &mut count)?;
    let compression = stream.compression();
    // Uncompressed bytes handed to the applier, and whether to stop writing back.
    let (applied, stop) = (AtomicU64::new(0), AtomicBool::new(false));
    let (stats, bytes) = std::thread::scope(|s| -> Result<_> {
        let flusher = writeback::spawn(s, mnt.path(), &applied, &stop)?;
        let mut ahead = readahead::spawn(s, stream, &applied);
        let entries = Cell::new(0u64);
        let progress = RefCell::new(&mut *progress);
        let stats = apply::apply_layer(mnt.path(), &mut ahead, &|| {
            entries.set(entries.get() + 1);
            if entries.get() == 3 {
                fp("import.after-entries");
            }
            let mut p = progress.borrow_mut();
            report(&mut **p);
            p.cancelled()
        })?;
        let (stream, rest) = ahead.finish();
        rest.map_err(|e| stream.read_error(e))?;
        let bytes = stream.finish()?;
        flusher.finish()?;
        Ok((stats, bytes))
    })?;
    report(progress);
    fp("import.after-apply");
    mnt.unmount()?;
    fp("import.after-unmount");
    Ok((stats, bytes, compression))
}

/// Writes the flattened filesystem of snapshot `key` to `out` as a tar (`-` for standard
/// output). A committed snapshot is read through a temporary view, removed afterwards; an
/// active snapshot or view is mounted as it is (read-only when possible). The file appears
/// only when complete.
///
/// # Errors
/// [`Error::Backend`] when the snapshot does not exist or the snapshotter refuses;
/// [`Error::Mount`], [`Error::Io`] otherwise.
pub fn export(
    backend: &mut dyn Backend,
    dirs: &MountDir,
    key: &str,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<ExportStats> {
    let kind = backend
        .kind(key)
        .map_err(|e| Error::backend(format!("cannot look up snapshot {key}"), e))?
        .ok_or_else(|| {
            Error::backend(
                format!("cannot export snapshot {key}"),
                "it does not exist (see `thinsnap snapshot list`)",
            )
        })?;
    let (mounts, view) = if kind == Kind::Committed {
        let view = format!("export-{}-{:08x}", std::process::id(), mount::random());
        let m = backend
            .view(
                &view,
                key,
                labels(&[(EXPORTING_LABEL, &process::current())]),
            )
            .map_err(|e| Error::backend(format!("cannot make a view of {key}"), e))?;
        (m, Some(view))
    } else {
        let m = backend
            .mounts(key)
            .map_err(|e| Error::backend(format!("cannot get the mounts of {key}"), e))?;
        (m, None)
    };
    let res = write_out(dirs, &mounts, out, progress);
    if let Some(view) = view {
        if let Err(e) = backend.remove(&view) {
            let e = Error::backend(
                format!(
                    "cannot remove the temporary view {view}: remove it with `thinsnap snapshot \
                     rm {view}`"
                ),
                e,
            );
            return res.and(Err(e));
        }
    }
    res
}

fn write_out(
    dirs: &MountDir,
    mounts: &[MountSpec],
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<ExportStats> {
    let m = mounts.first().ok_or_else(|| {
        Error::backend(
            "cannot mount the snapshot",
            "the snapshotter returned no mount",
        )
    })?;
    // An active snapshot mounted read-write elsewhere cannot be mounted read-only again
    // (same superblock): then it is mounted as it is.
    let mnt = match TempMount::new(dirs, "export", m, &["ro"]) {
        Ok(mnt) => mnt,
        Err(_) if !m.options.iter().any(|o| o == "ro") => {
            tracing::warn!("exporting an active snapshot in use: changes made meanwhile may or may not be included");
            TempMount::new(dirs, "export", m, &[])?
        }
        Err(e) => return Err(e),
    };
    fp("export.after-mount");
    progress.start("exporting", 0);
    let cancelled = || progress.cancelled();
    let stats = if out == Path::new("-") {
        let stdout = std::io::stdout();
        let w = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
        export::write_tar(mnt.path(), w, &cancelled)?
    } else {
        let name = out
            .file_name()
            .ok_or_else(|| Error::io("write", out, std::io::ErrorKind::InvalidInput.into()))?;
        let partial = out.with_file_name(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = create_new_private(&partial)?;
        let written = (|| {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
            let stats = export::write_tar(mnt.path(), &mut w, &cancelled)?;
            w.flush().map_err(|e| Error::io("write", &partial, e))?;
            drop(w);
            file.sync_all()
                .map_err(|e| Error::io("sync", &partial, e))?;
            std::fs::rename(&partial, out).map_err(|e| Error::io("rename into place", out, e))?;
            Ok(stats)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        written?
    };
    mnt.unmount()?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partial_export_file_is_new_and_never_a_planted_symlink() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let planted = d.path().join(".out.tar.partial-1");
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        assert!(create_new_private(&planted).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let fresh = d.path().join("fresh");
        create_new_private(&fresh).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o600);
        assert!(create_new_private(&fresh).is_err(), "never reused");
    }
}
