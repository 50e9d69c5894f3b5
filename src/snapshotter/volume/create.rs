//! VolumeDriver.Create: a new volume as a thin snapshot of its filesystem's base device or,
//! with `from`, of another volume (consistent: see [`Snapshotter::create_volume`]), grown
//! to its size.

use std::collections::BTreeMap;

use thinpool::{failpoint::hit as fp, units, FsType, RemoveMode, ThinId};
use tracing::{info, instrument, warn};

use super::{validate_name, Options};
use crate::{
    snapshotter::{Error, Result, Snapshotter},
    store::{State, Volume},
};

/// What a new volume is a snapshot of.
struct Origin {
    thin_id: ThinId,
    size: u64,
    fs: FsType,
    /// The origin volume, for clones.
    volume: Option<Volume>,
}

impl Snapshotter {
    /// Creates volume `name` with Docker's `opts` (`size`, `fs`, `from`).
    ///
    /// A clone (`from`) of a mounted volume is consistent: its filesystem is flushed with
    /// `syncfs(2)` first, and the kernel freezes it (dm suspend with lockfs, i.e.
    /// `freeze_bdev`) while the snapshot message runs, so the clone is a clean filesystem
    /// with everything written to the origin before the Create.
    ///
    /// # Errors
    /// InvalidArgument for a bad name or options (naming unknown ones), or a size smaller
    /// than the origin's; AlreadyExists if the volume exists; NotFound if `from` does not;
    /// ResourceExhausted if the pool is too full.
    #[instrument(level = "info", skip(self, opts), fields(name))]
    pub fn create_volume(&self, name: &str, opts: BTreeMap<String, String>) -> Result<Volume> {
        validate_name("volume name", name)?;
        let o = Options::parse(&opts)?;
        if o.from.as_deref() == Some(name) {
            return Err(Error::InvalidArgument(format!(
                "volume {name:?} cannot be cloned from itself"
            )));
        }
        let mut names = vec![name];
        names.extend(o.from.as_deref());
        let _g = self.lock_volumes(&names);
        if let Some(v) = self.store.read()?.volume(name)? {
            return Err(Error::AlreadyExists(match v.state {
                State::Ready => format!("volume {name:?} already exists"),
                State::Creating => format!("volume {name:?} is being created"),
                State::Removing => {
                    format!("volume {name:?} is being removed: retry when it is gone")
                }
            }));
        }
        let origin = match &o.from {
            Some(from) => {
                let src = self.volume(from).map_err(|e| match e {
                    Error::NotFound(_) => Error::NotFound(format!(
                        "volume {from:?} to clone (option from) does not exist"
                    )),
                    e => e,
                })?;
                let fs: FsType = src.fs.parse().unwrap_or_default();
                if o.fs.is_some_and(|f| f != fs) {
                    return Err(Error::InvalidArgument(format!(
                        "option fs={} differs from the filesystem of volume {from:?} ({fs}): a clone keeps its origin's filesystem",
                        o.fs.unwrap_or_default()
                    )));
                }
                Origin {
                    thin_id: ThinId::new(src.thin_id)?,
                    size: src.size,
                    fs,
                    volume: Some(src),
                }
            }
            None => {
                let fs = o.fs.unwrap_or(self.config.volumes.filesystem);
                let base = self.ensure_base(fs)?;
                Origin {
                    thin_id: ThinId::new(base.thin_id)?,
                    size: base.size,
                    fs,
                    volume: None,
                }
            }
        };
        let size = match o.size {
            Some(s) if s < origin.size => {
                let of = match &o.from {
                    Some(f) => format!("volume {f:?}"),
                    None => format!("the {} base filesystem", origin.fs),
                };
                return Err(Error::InvalidArgument(format!(
                    "option size={} is smaller than {of} ({}) it starts from: filesystems cannot shrink; ask for at least {}",
                    units::format_size(s),
                    units::format_size(origin.size),
                    units::format_size(origin.size)
                )));
            }
            Some(s) => s,
            None if o.from.is_some() => origin.size,
            None => self.config.volumes.default_size.max(origin.size),
        };
        self.check_space()?;

        // Intent: the record in state Creating, with a fresh thin id.
        let record = {
            let mut tx = self.store.write()?;
            let id = tx.allocate_id()?;
            let v = Volume::new(name, id, size, origin.fs.as_str(), o.from.clone(), opts);
            tx.put_volume(&v)?;
            tx.commit()?;
            v
        };
        fp("volume.after-intent");
        match self.materialize_volume(&record, &origin) {
            Ok(v) => {
                info!(volume = name, thin_id = v.thin_id, size = %units::format_size(v.size), fs = %v.fs, from = ?v.origin, "created volume");
                Ok(v)
            }
            Err(e) => {
                if let Err(undo) = self.undo_volume_create(&record) {
                    warn!(volume = name, error = %undo, "rolling back a failed volume create failed; startup recovery will finish it");
                }
                Err(e)
            }
        }
    }

    /// The kernel part of a create: snapshot the origin, grow the filesystem if larger,
    /// mark the record ready. The device is left inactive (it is activated when mounted).
    fn materialize_volume(&self, v: &Volume, origin: &Origin) -> Result<Volume> {
        let id = ThinId::new(v.thin_id)?;
        if let Some(src) = origin.volume.as_ref().filter(|s| !s.mounts.is_empty()) {
            // Flush the mounted origin's dirty data now, so the freeze inside the snapshot's
            // suspend has little left to write and is short.
            syncfs(&self.volume_dir(&src.name))?;
        }
        let txn = self.pool_change("volume.after-message", |p| {
            p.create_snapshot(id, origin.thin_id)
        })?;
        fp("volume.after-txn");
        if v.size > origin.size {
            // Grown online at the volume's own mountpoint, which recovery knows to unmount
            // if a crash leaves it.
            let dev = self.mount_volume_dir(v)?;
            let grown =
                thinpool::fs::grow_mounted(origin.fs, &dev.devnode, &self.volume_dir(&v.name));
            fp("volume.after-grow");
            let released = self.release_volume_dir(v);
            grown?;
            released?;
        }
        let mut done = v.clone();
        done.state = State::Ready;
        done.txn = txn;
        let mut tx = self.store.write()?;
        tx.put_volume(&done)?;
        tx.set_meta("pool_txn", txn)?;
        tx.commit()?;
        fp("volume.after-ready");
        Ok(done)
    }

    /// Rolls back a volume create: unmount what growing it mounted, deactivate and delete
    /// its thin device, delete its record.
    pub(super) fn undo_volume_create(&self, v: &Volume) -> Result<()> {
        let dir = self.volume_dir(&v.name);
        thinpool::fs::umount(&dir)?;
        let _ = std::fs::remove_dir(&dir);
        let id = ThinId::new(v.thin_id)?;
        self.deactivate(id, RemoveMode::Now)?;
        let txn = self.pool_change("undo-volume.after-message", |p| p.delete_thin(id))?;
        let mut tx = self.store.write()?;
        tx.delete_volume(&v.name)?;
        tx.set_meta("pool_txn", txn)?;
        tx.commit()?;
        Ok(())
    }
}

/// Flushes the filesystem mounted at `dir` (`syncfs(2)`).
fn syncfs(dir: &std::path::Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).map_err(|e| thinpool::Error::io("open", dir, e))?;
    // SAFETY: syncfs on a file descriptor we own.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(thinpool::Error::io("syncfs", dir, std::io::Error::last_os_error()).into());
    }
    Ok(())
}
