//! The state directory's lock: one daemon, or one CLI command that writes the store, at a
//! time.

use std::path::{Path, PathBuf};

/// Why the lock cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("another thinsnap process holds {0} (is `thinsnap serve` running? `systemctl status thinsnap`); stop it first or use its socket")]
    Held(PathBuf),
    /// The lock file (or its directory) cannot be created or opened.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Holds the state directory's lock file (`flock`) until dropped.
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    /// Takes the lock at `path` without waiting.
    ///
    /// # Errors
    /// [`LockError::Held`] when another process holds it.
    pub fn acquire(path: &Path) -> Result<StateLock, LockError> {
        use std::os::fd::AsRawFd;
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| LockError::Io { what, path, source }
        };
        if let Some(dir) = path.parent() {
            // The state directory: root's alone.
            thinpool::private::create_dir(dir)
                .map_err(|e| io("create", dir)(std::io::Error::other(e)))?;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(io("open lock file", path))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(LockError::Held(path.to_path_buf()));
        }
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/thinsnap.lock");
        let held = StateLock::acquire(&p).unwrap();
        let e = StateLock::acquire(&p).err().unwrap();
        assert!(e.to_string().contains("stop it first"), "{e}");
        drop(held);
        StateLock::acquire(&p).unwrap();
    }
}
