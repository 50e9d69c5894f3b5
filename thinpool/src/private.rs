//! Private files and directories: what holds pool data or metadata is root's alone
//! (directories 0700, files 0600), whatever the umask. Made so when created, and made so
//! again, with a log line, when found readable by others (a pool or state directory of an
//! earlier version, or one restored from a backup).

use std::{
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::Path,
};

use tracing::warn;

use crate::error::{Error, Result};

/// Creates directory `path` (and missing parents) mode 0700; an existing one is made
/// private (see [`restrict`]).
///
/// # Errors
/// [`Error::Io`] when it cannot be made or changed.
pub fn create_dir(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| Error::io("create directory", path, e))?;
    restrict(path).map(|_| ())
}

/// Takes group and other permissions away from `path` (a directory or file; a symlink is
/// left alone), logging what it was. Returns whether it changed anything.
///
/// # Errors
/// [`Error::Io`] when it cannot be read or changed.
pub fn restrict(path: &Path) -> Result<bool> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io("stat", path, e))?;
    let mode = meta.mode() & 0o7777;
    if meta.file_type().is_symlink() || mode & 0o077 == 0 {
        return Ok(false);
    }
    let private = mode & 0o700;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(private))
        .map_err(|e| Error::io("change the mode of", path, e))?;
    warn!(path = %path.display(), was = format!("{mode:04o}"), now = format!("{private:04o}"), "made private: it was open to other users");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_and_files_become_private() {
        let t = std::env::temp_dir().join(format!("thinpool-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        let d = t.join("a/b");
        create_dir(&d).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700, "an existing directory is corrected");
        let f = d.join("data");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(restrict(&f).unwrap());
        assert_eq!(mode(&f), 0o600);
        assert!(!restrict(&f).unwrap(), "once");
        std::fs::remove_dir_all(&t).unwrap();
    }
}
