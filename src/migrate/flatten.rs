//! Makes a Docker device's `rootfs/` directory the root of its filesystem, in place.
//!
//! Docker's driver mounted each device at `mnt/<id>` and gave containers `mnt/<id>/rootfs`;
//! beside it the filesystem holds Docker's `id` file (and ext4's `lost+found`). containerd
//! mounts a snapshot's device as the container's root and cannot mount a subdirectory of a
//! block device, so every adopted filesystem is rearranged once: `id` is removed and each
//! entry of `rootfs/` is renamed one level up. Renames are metadata-only (no data is
//! copied) and each is atomic, so the work is done in two idempotent steps, each recorded in
//! the store when it completes:
//!
//! 1. [`stage`]: check that the top level holds only what Docker puts there, remove `id`,
//!    and rename `rootfs` to [`STAGING`] (so an image's own `/rootfs` cannot be mistaken
//!    for Docker's once moved up);
//! 2. [`move_up`]: rename every entry of [`STAGING`] to the top level (the filesystem's
//!    own empty `lost+found` gives way to an image's), then remove [`STAGING`].
//!
//! After a crash either step is simply run again: it continues where it stopped.

use std::{
    ffi::{OsStr, OsString},
    fs::{self, File},
    path::Path,
};

use anyhow::{bail, Context, Result};
use nix::{
    fcntl::{renameat2, RenameFlags},
    unistd::{unlinkat, UnlinkatFlags},
};

/// The staging directory `rootfs/` is renamed to before its entries move up.
pub const STAGING: &str = ".thinsnap-docker-rootfs";
/// Docker's file naming the layer.
const ID: &str = "id";
/// Docker's directory holding the container root.
const ROOTFS: &str = "rootfs";
/// ext4's directory for fsck.
const LOST_FOUND: &str = "lost+found";

/// Where a filesystem is in its migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Step {
    /// [`stage`] is next.
    Stage,
    /// [`move_up`] is next.
    Move,
    /// Only its usage is to be measured (a device with no Docker layout).
    Measure,
}

fn is_empty_dir(path: &Path) -> Result<bool> {
    Ok(fs::read_dir(path)
        .with_context(|| format!("cannot list {}", path.display()))?
        .next()
        .is_none())
}

/// The names in `dir`, as they are (an image's file names need not be UTF-8).
fn names(dir: &Path) -> Result<Vec<OsString>> {
    let mut n: Vec<OsString> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    n.sort();
    Ok(n)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// Step 1 on the filesystem mounted at `root`: checks the layout, removes Docker's `id`
/// file and renames `rootfs` to [`STAGING`]. A filesystem Docker never mounted (no
/// `rootfs`) is left as it is.
///
/// # Errors
/// When the top level holds something Docker does not put there (nothing is changed then),
/// or a rename fails.
pub fn stage(root: &Path) -> Result<()> {
    let top = names(root)?;
    let rootfs = root.join(ROOTFS);
    let staging = root.join(STAGING);
    for n in &top {
        if ![ID, ROOTFS, LOST_FOUND, STAGING]
            .iter()
            .any(|k| OsStr::new(k) == n.as_os_str())
        {
            bail!("its filesystem has {n:?} beside Docker's rootfs/ (Docker keeps only id, rootfs and lost+found there): move it into rootfs/ or out of the way, then run the migration again");
        }
    }
    let has = |n: &str| top.iter().any(|t| t.as_os_str() == OsStr::new(n));
    if has(STAGING) {
        if has(ROOTFS) {
            bail!("its filesystem has both rootfs/ and {STAGING}/ at the top: it was changed by something else since the migration began; look at it with `thinsnap snapshot mount`");
        }
        return Ok(()); // staged before a crash
    }
    if has(ROOTFS) {
        let meta = fs::symlink_metadata(&rootfs)
            .with_context(|| format!("cannot stat {}", rootfs.display()))?;
        if !meta.is_dir() {
            bail!("its rootfs is not a directory");
        }
        if rootfs.join(STAGING).symlink_metadata().is_ok() {
            bail!("its rootfs/ holds an entry named {STAGING}, which the migration itself needs: rename it, then run the migration again");
        }
        if has(LOST_FOUND)
            && rootfs.join(LOST_FOUND).symlink_metadata().is_ok()
            && !is_empty_dir(&root.join(LOST_FOUND))?
        {
            bail!("both its lost+found/ (not empty: fsck put files there) and rootfs/lost+found exist: empty the top-level lost+found/, then run the migration again");
        }
    }
    let dir = File::open(root).with_context(|| format!("cannot open {}", root.display()))?;
    if has(ID) {
        unlinkat(&dir, ID, UnlinkatFlags::NoRemoveDir)
            .with_context(|| format!("cannot remove Docker's {}", root.join(ID).display()))?;
    }
    if has(ROOTFS) {
        renameat2(&dir, ROOTFS, &dir, STAGING, RenameFlags::RENAME_NOREPLACE).with_context(
            || {
                format!(
                    "cannot rename {} to {}",
                    rootfs.display(),
                    staging.display()
                )
            },
        )?;
    }
    sync_dir(root)
}

/// Step 2 on the filesystem mounted at `root`: moves every entry of [`STAGING`] to the top
/// level and removes [`STAGING`]. Returns how many entries it moved.
///
/// # Errors
/// When an entry cannot be moved (nothing is overwritten).
pub fn move_up(root: &Path) -> Result<usize> {
    let staging = root.join(STAGING);
    if staging.symlink_metadata().is_err() {
        return Ok(0); // done before a crash, or nothing was staged
    }
    let top = File::open(root).with_context(|| format!("cannot open {}", root.display()))?;
    let from =
        File::open(&staging).with_context(|| format!("cannot open {}", staging.display()))?;
    let mut moved = 0;
    for n in names(&staging)? {
        let there = root.join(&n);
        if there.symlink_metadata().is_ok() {
            if n == LOST_FOUND && there.is_dir() && is_empty_dir(&there)? {
                unlinkat(&top, LOST_FOUND, UnlinkatFlags::RemoveDir)
                    .with_context(|| format!("cannot remove {}", there.display()))?;
            } else {
                bail!(
                    "cannot move {n:?} up from rootfs/: {} exists",
                    there.display()
                );
            }
        }
        renameat2(
            &from,
            n.as_os_str(),
            &top,
            n.as_os_str(),
            RenameFlags::RENAME_NOREPLACE,
        )
        .with_context(|| format!("cannot move {} up", staging.join(&n).display()))?;
        moved += 1;
    }
    drop(from);
    unlinkat(&top, STAGING, UnlinkatFlags::RemoveDir)
        .with_context(|| format!("cannot remove {}", staging.display()))?;
    sync_dir(root)?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docker_fs(d: &Path) {
        fs::create_dir_all(d.join("lost+found")).unwrap();
        fs::write(d.join("id"), "abc").unwrap();
        fs::create_dir_all(d.join("rootfs/etc")).unwrap();
        fs::write(d.join("rootfs/etc/hostname"), "box").unwrap();
        fs::write(d.join("rootfs/id"), "the image's own /id").unwrap();
        fs::create_dir_all(d.join("rootfs/rootfs")).unwrap();
        fs::write(d.join("rootfs/rootfs/x"), "the image's own /rootfs/x").unwrap();
    }

    fn tree(d: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for n in names(d).unwrap() {
            let p = d.join(&n);
            let n = n.to_string_lossy();
            if p.is_dir() {
                out.push(format!("{n}/"));
                out.extend(tree(&p).into_iter().map(|c| format!("{n}/{c}")));
            } else {
                out.push(format!("{n}={}", fs::read_to_string(&p).unwrap()));
            }
        }
        out
    }

    #[test]
    fn rootfs_becomes_the_root() {
        let d = tempfile::tempdir().unwrap();
        docker_fs(d.path());
        stage(d.path()).unwrap();
        assert_eq!(move_up(d.path()).unwrap(), 3);
        assert_eq!(
            tree(d.path()),
            vec![
                "etc/",
                "etc/hostname=box",
                "id=the image's own /id",
                "lost+found/",
                "rootfs/",
                "rootfs/x=the image's own /rootfs/x"
            ]
        );
    }

    #[test]
    fn every_step_can_run_again() {
        let d = tempfile::tempdir().unwrap();
        docker_fs(d.path());
        stage(d.path()).unwrap();
        stage(d.path()).unwrap();
        // A crash in the middle of moving: one entry moved already.
        fs::rename(d.path().join(STAGING).join("etc"), d.path().join("etc")).unwrap();
        move_up(d.path()).unwrap();
        let done = tree(d.path());
        assert_eq!(move_up(d.path()).unwrap(), 0);
        assert_eq!(tree(d.path()), done);
        assert!(done.contains(&"etc/hostname=box".to_string()));
    }

    #[test]
    fn an_image_lost_and_found_replaces_the_empty_one() {
        let d = tempfile::tempdir().unwrap();
        docker_fs(d.path());
        fs::create_dir_all(d.path().join("rootfs/lost+found/keep")).unwrap();
        stage(d.path()).unwrap();
        move_up(d.path()).unwrap();
        assert!(d.path().join("lost+found/keep").is_dir());

        let d = tempfile::tempdir().unwrap();
        docker_fs(d.path());
        fs::create_dir_all(d.path().join("rootfs/lost+found")).unwrap();
        fs::write(d.path().join("lost+found/#123"), "fsck found this").unwrap();
        let e = stage(d.path()).unwrap_err();
        assert!(e.to_string().contains("lost+found"), "{e}");
        assert!(d.path().join("id").exists(), "nothing changed");
    }

    #[test]
    fn unexpected_entries_stop_it_before_any_change() {
        let d = tempfile::tempdir().unwrap();
        docker_fs(d.path());
        fs::write(d.path().join("stray"), "").unwrap();
        let e = stage(d.path()).unwrap_err();
        assert!(e.to_string().contains("\"stray\""), "{e}");
        assert!(d.path().join("id").exists() && d.path().join("rootfs").exists());
    }

    #[test]
    fn names_that_are_not_utf8_move_up_as_they_are() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        docker_fs(d.path());
        let odd = OsStr::from_bytes(b"caf\xe9");
        fs::write(d.path().join("rootfs").join(odd), "latin-1").unwrap();
        stage(d.path()).unwrap();
        assert_eq!(move_up(d.path()).unwrap(), 4);
        assert_eq!(fs::read_to_string(d.path().join(odd)).unwrap(), "latin-1");
    }

    #[test]
    fn a_filesystem_docker_never_mounted_is_left_alone() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("lost+found")).unwrap();
        stage(d.path()).unwrap();
        assert_eq!(move_up(d.path()).unwrap(), 0);
        assert_eq!(tree(d.path()), vec!["lost+found/"]);
    }
}
