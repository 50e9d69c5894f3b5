//! Temporary mounts in a private directory. Whatever mounts a device for a moment (to grow
//! its filesystem, tidy a fresh one, fill or read it) does so only here: a directory of
//! mode 0700 owned by this process's user, never a symlink, in which each mount gets a new
//! directory `<purpose>-<pid>-<n>` made with `mkdir` (so nothing planted can be reused), is
//! mounted `nosuid,nodev,noexec`, and is unmounted and removed when done. A process killed
//! in between leaves its directory behind; [`MountDir::stale`] finds those of processes
//! that are gone, and [`MountDir::remove`] cleans them up.

use std::{
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use nix::errno::Errno;
use tracing::instrument;

use crate::{
    error::{Error, Result},
    fs::{self, FsType},
};

/// Options every temporary mount gets: nothing on it can run or act as a device.
pub const PRIVATE_OPTIONS: [&str; 3] = ["nosuid", "nodev", "noexec"];

/// The private directory of temporary mounts.
#[derive(Debug, Clone)]
pub struct MountDir {
    root: PathBuf,
    /// For xfs mounts: metadata write retries on ENOSPC (see
    /// [`fs::set_xfs_enospc_retries`]); None leaves the kernel's default.
    xfs_enospc_retries: Option<i32>,
}

impl MountDir {
    /// Opens `root` as the private mount directory, creating it (and its parents) if
    /// missing. An existing `root` must be a real directory owned by this user; group and
    /// other permissions are taken away.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be made; [`Error::Invalid`] when `root` is a symlink,
    /// not a directory, or owned by someone else.
    pub fn open(root: &Path) -> Result<MountDir> {
        if let Some(parent) = root.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("create", root, e)),
        }
        let meta = std::fs::symlink_metadata(root).map_err(|e| Error::io("stat", root, e))?;
        let refuse = |why: &str| {
            Err(Error::invalid(
                format!("private mount directory {}", root.display()),
                format!("{why}: remove it, it is made again (mode 0700) on the next start"),
            ))
        };
        if meta.file_type().is_symlink() || !meta.is_dir() {
            return refuse("it is not a directory");
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return refuse("it is owned by another user");
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io("chmod", root, e))?;
        }
        Ok(MountDir {
            root: root.to_path_buf(),
            xfs_enospc_retries: None,
        })
    }

    /// The same directory, whose xfs mounts retry metadata writes refused with ENOSPC
    /// `max_retries` times (see [`fs::set_xfs_enospc_retries`]).
    pub fn with_xfs_enospc_retries(mut self, max_retries: Option<i32>) -> MountDir {
        self.xfs_enospc_retries = max_retries;
        self
    }

    /// What xfs mounts here retry on ENOSPC (None: the kernel's default).
    pub fn xfs_enospc_retries(&self) -> Option<i32> {
        self.xfs_enospc_retries
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Makes a new empty directory for a mount named for `purpose` (letters and `-`),
    /// which the caller mounts, unmounts and removes (see [`MountDir::remove`]).
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be made.
    pub fn create(&self, purpose: &str) -> Result<PathBuf> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = self
                .root
                .join(format!("{purpose}-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(dir),
                // Left by an earlier process of the same pid: never reused.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("create mount point", &dir, e)),
            }
        }
    }

    /// Mounts `dev` (filesystem `fs`, `options` plus [`PRIVATE_OPTIONS`]) at a new
    /// directory named for `purpose`, runs `f` on it, then unmounts it and removes the
    /// directory, whatever `f` returned. An xfs mount gets this directory's ENOSPC retries
    /// first. `point` is a crash point right after the mount.
    ///
    /// # Errors
    /// [`Error::Io`] when a step fails; `f`'s error first.
    #[instrument(level = "debug", skip(self, options, f), fields(dev = %dev.display()))]
    pub fn with_mount<T>(
        &self,
        purpose: &str,
        dev: &Path,
        fs: FsType,
        options: &[&str],
        point: &'static str,
        f: impl FnOnce(&Path) -> Result<T>,
    ) -> Result<T> {
        let dir = self.create(purpose)?;
        let mut all: Vec<&str> = options.to_vec();
        all.extend(PRIVATE_OPTIONS);
        if let Err(e) = fs::mount(dev, &dir, fs, &all) {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
        crate::failpoint::hit(point);
        let res = fs::configure_mounted(fs, dev, self.xfs_enospc_retries).and_then(|()| f(&dir));
        let removed = self.remove(&dir);
        let out = res?;
        removed?;
        Ok(out)
    }

    /// Unmounts `dir` (one of this directory's) if it is mounted, and removes it.
    ///
    /// # Errors
    /// [`Error::Busy`] while files on it are open; [`Error::Io`] otherwise.
    pub fn remove(&self, dir: &Path) -> Result<()> {
        if fs::is_mounted(dir)? {
            fs::umount(dir)?;
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove mount point", dir, e)),
        }
    }

    /// Directories of processes that are gone (killed between mount and unmount), mounted
    /// or not.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be read.
    pub fn stale(&self) -> Result<Vec<PathBuf>> {
        let entries =
            std::fs::read_dir(&self.root).map_err(|e| Error::io("read", &self.root, e))?;
        let me = std::process::id();
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(|e| Error::io("read", &self.root, e))?;
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(owner_pid) else {
                continue;
            };
            // Alive means kill(pid, 0) succeeds or is refused (EPERM).
            let alive = pid == me
                || !matches!(
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None),
                    Err(Errno::ESRCH)
                );
            if !alive {
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// The process whose mount `dir` is, if it is one of this directory's.
    pub fn owner_of(&self, dir: &Path) -> Option<u32> {
        if dir.parent() != Some(self.root.as_path()) {
            return None;
        }
        dir.file_name().and_then(|n| n.to_str()).and_then(owner_pid)
    }
}

/// The pid in a mount directory's name `<purpose>-<pid>-<n>`.
fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.rsplitn(3, '-');
    let _n: u64 = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next().filter(|p| !p.is_empty())?;
    Some(pid)
}

/// Removes the empty `lost+found` directory mkfs made at the root of the filesystem
/// mounted at `root`. Returns whether there was one; one that holds anything is left.
///
/// # Errors
/// [`Error::Io`] when it cannot be removed.
pub fn remove_lost_found(root: &Path) -> Result<bool> {
    let dir = root.join("lost+found");
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => match std::fs::remove_dir(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(false),
            Err(e) => Err(Error::io("remove", dir, e)),
        },
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("stat", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_pid() {
        assert_eq!(owner_pid("grow-123-0"), Some(123));
        assert_eq!(owner_pid("lost-found-7-12"), Some(7));
        assert_eq!(owner_pid("123-0"), None);
        assert_eq!(owner_pid("grow-x-0"), None);
        assert_eq!(owner_pid("grow"), None);
    }

    #[test]
    fn the_directory_is_private_and_never_a_symlink() {
        let t = tempfile_dir();
        let root = t.join("mnt");
        let d = MountDir::open(&root).unwrap();
        assert_eq!(
            std::fs::metadata(&root).unwrap().mode() & 0o777,
            0o700,
            "made 0700"
        );
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        MountDir::open(&root).unwrap();
        assert_eq!(std::fs::metadata(&root).unwrap().mode() & 0o777, 0o700);

        let a = d.create("grow").unwrap();
        let b = d.create("grow").unwrap();
        assert_ne!(a, b);
        assert_eq!(d.owner_of(&a), Some(std::process::id()));
        assert!(d.stale().unwrap().is_empty(), "our own are not stale");
        // A dead process's directory (pid 0x7fffffff is never alive) is stale.
        let dead = root.join("grow-2147483646-0");
        std::fs::create_dir(&dead).unwrap();
        assert_eq!(d.stale().unwrap(), vec![dead.clone()]);
        d.remove(&dead).unwrap();
        assert!(d.stale().unwrap().is_empty());

        let link = t.join("link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        assert!(MountDir::open(&link).is_err(), "a symlink is refused");
        std::fs::remove_dir(&a).unwrap();
        std::fs::remove_dir(&b).unwrap();
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn lost_found_goes_only_when_empty() {
        let t = tempfile_dir();
        assert!(!remove_lost_found(&t).unwrap());
        std::fs::create_dir(t.join("lost+found")).unwrap();
        assert!(remove_lost_found(&t).unwrap());
        std::fs::create_dir(t.join("lost+found")).unwrap();
        std::fs::write(t.join("lost+found/#12"), b"x").unwrap();
        assert!(!remove_lost_found(&t).unwrap());
        std::fs::remove_dir_all(&t).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "thinpool-mountdir-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
