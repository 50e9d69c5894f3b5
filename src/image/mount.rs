//! Private temporary mount points for the snapshots an import fills or an export reads: a
//! fresh directory in thinsnap's private mount directory (`<runtime_dir>/mnt`, mode 0700),
//! mounted nosuid,nodev,noexec, unmounted and removed when done (or dropped).

use std::path::{Path, PathBuf};

use thinpool::{FsType, MountDir};

use super::{
    error::{Error, Result},
    MountSpec,
};

/// A snapshot mounted at a private temporary directory.
pub struct TempMount {
    dir: PathBuf,
    mounted: bool,
}

/// A random 32-bit number (from the standard library's per-process hash keys and the clock).
pub(crate) fn random() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

impl TempMount {
    /// Mounts `m` at a new directory of `dirs` named for `purpose`, with `extra` options
    /// (e.g. `ro`) and always nosuid,nodev,noexec.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be made; [`Error::Mount`] when mounting
    /// fails (the directory is removed again).
    pub fn new(dirs: &MountDir, purpose: &str, m: &MountSpec, extra: &[&str]) -> Result<TempMount> {
        let fs: FsType = m.fs_type.parse().map_err(|e| Error::Mount {
            op: format!("the snapshotter returned a {} mount", m.fs_type),
            source: e,
        })?;
        let dir = dirs.create(purpose).map_err(|e| Error::Mount {
            op: "cannot make a private mount point".into(),
            source: e,
        })?;
        let mut options = m.options.clone();
        for o in extra.iter().chain(&thinpool::mountdir::PRIVATE_OPTIONS) {
            if !options.iter().any(|x| x == o) {
                options.push((*o).to_string());
            }
        }
        if let Err(e) = thinpool::fs::mount(Path::new(&m.source), &dir, fs, &options) {
            let _ = std::fs::remove_dir(&dir);
            return Err(Error::Mount {
                op: format!("cannot mount {} at {}", m.source, dir.display()),
                source: e,
            });
        }
        Ok(TempMount { dir, mounted: true })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Unmounts (writing everything back) and removes the directory.
    ///
    /// # Errors
    /// [`Error::Mount`] when it cannot be unmounted (then it stays mounted).
    pub fn unmount(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if self.mounted {
            thinpool::fs::umount(&self.dir).map_err(|e| Error::Mount {
                op: format!("cannot unmount {}", self.dir.display()),
                source: e,
            })?;
            self.mounted = false;
            let _ = std::fs::remove_dir(&self.dir);
        }
        Ok(())
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!("{e}: unmount it by hand (`umount {}`)", self.dir.display());
        }
    }
}
