//! Writing the flattened filesystem of a mounted snapshot as one tar: every file type,
//! owners, modes (setuid, setgid, sticky included), modification times (nanoseconds in
//! PAX `mtime` records), xattrs (PAX `SCHILY.xattr.*` records) and hard links (found by
//! device and inode), in a deterministic order: each directory before its contents, names
//! sorted bytewise.
//!
//! Left out, on purpose:
//! - `lost+found` at the root when it is what `mkfs.ext4` makes there (an empty directory
//!   owned by root with mode 0700): it belongs to the filesystem, not the image. One that
//!   holds anything, or differs, is exported like any directory.
//! - `security.selinux` xattrs: labels of this host, not of the image.
//! - sockets, which tar cannot hold (skipped with a warning).
//!
//! The tree is walked by directory descriptors, never by paths: every entry is reached as
//! `/proc/self/fd/<directory fd>/<name>` (the directory by its open descriptor, then one
//! component that is never followed), directories are opened `O_DIRECTORY|O_NOFOLLOW`,
//! files `O_NOFOLLOW`, and each opened object must be the one that was stat'ed. A running
//! container that swaps a directory for a symlink (to `/`, say) while its snapshot is
//! exported gets a symlink in the tar, or an error, never files from outside the snapshot.

use std::{
    collections::HashMap,
    ffi::{CString, OsStr},
    fs::{self, File, Metadata},
    io::{self, Read, Write},
    os::unix::{
        ffi::OsStrExt,
        fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    },
    path::Path,
};

use super::error::{Error, Result};

/// What an export wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Tar entries written (the root directory `./` included).
    pub entries: u64,
    /// Bytes of regular file content.
    pub bytes: u64,
}

/// xattrs not exported.
const SKIPPED_XATTRS: &[&[u8]] = &[b"security.selinux"];

/// Writes the tree at `root` to `out` as a tar, checking `cancelled` between entries.
///
/// # Errors
/// [`Error::Io`] when a file cannot be read or the output written; [`Error::Interrupted`]
/// when cancelled.
pub fn write_tar<W: Write>(
    root: &Path,
    out: W,
    cancelled: &dyn Fn() -> bool,
) -> Result<ExportStats> {
    let mut w = Writer {
        tar: tar::Builder::new(out),
        links: HashMap::new(),
        stats: ExportStats::default(),
        cancelled,
    };
    let dir = open_dir(root).map_err(|e| Error::io("open", root, e))?;
    let md = dir.metadata().map_err(|e| Error::io("stat", root, e))?;
    w.add(&Entry::root(&dir, root), b"./", &md)?;
    w.walk(&dir, root, &[], true)?;
    w.tar
        .into_inner()
        .and_then(|mut o| o.flush())
        .map_err(|e| Error::io("write", "the output", e))?;
    Ok(w.stats)
}

/// Whether `path` (at the root) is the `lost+found` mkfs.ext4 made: empty, root's, 0700.
fn is_mkfs_lost_found(path: &Path, md: &Metadata) -> bool {
    md.is_dir()
        && md.uid() == 0
        && md.gid() == 0
        && md.mode() & 0o7777 == 0o700
        && fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
}

/// Opens directory `path` without following a symlink in its last component.
fn open_dir(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
}

/// One entry of the tree: `/proc/self/fd/<dir fd>/<name>`, which reaches the entry through
/// the open directory (never by its path from the root), and its path for messages.
struct Entry {
    at: std::path::PathBuf,
    shown: std::path::PathBuf,
}

impl Entry {
    fn root(dir: &File, root: &Path) -> Entry {
        use std::os::fd::AsRawFd;
        Entry {
            // "." so that the xattrs read are the directory's, not the fd link's.
            at: format!("/proc/self/fd/{}/.", dir.as_raw_fd()).into(),
            shown: root.to_path_buf(),
        }
    }

    fn child(dir: &File, shown_dir: &Path, name: &[u8]) -> Entry {
        use std::os::fd::AsRawFd;
        let name = OsStr::from_bytes(name);
        Entry {
            at: Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name),
            shown: shown_dir.join(name),
        }
    }
}

/// Fails unless `opened` is the object `md` describes (it was not swapped in between).
fn same_object(opened: &File, md: &Metadata, shown: &Path) -> Result<()> {
    let now = opened.metadata().map_err(|e| Error::io("stat", shown, e))?;
    if (now.dev(), now.ino()) != (md.dev(), md.ino()) {
        return Err(Error::io(
            "export",
            shown,
            io::Error::other("it was replaced while it was exported (export a committed snapshot, or stop the container)"),
        ));
    }
    Ok(())
}

/// The xattrs of `path` (not following a symlink), sorted by name.
fn xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut names = vec![0u8; 1024];
    let len = loop {
        // SAFETY: a NUL-terminated path and a buffer of the given length.
        let r = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(vec![]),
            _ => return Err(e),
        }
    };
    let mut out = Vec::new();
    for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if SKIPPED_XATTRS.contains(&name) {
            continue;
        }
        let cname = CString::new(name).expect("split on NUL");
        let mut value = vec![0u8; 256];
        loop {
            // SAFETY: NUL-terminated strings and a buffer of the given length.
            let r = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cname.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            if r >= 0 {
                value.truncate(r as usize);
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) => value.resize(value.len() * 4, 0),
                _ => return Err(e),
            }
        }
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

/// Reads exactly `left` bytes, failing if the file is shorter (it changed underneath).
struct Exact {
    file: File,
    left: u64,
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being exported",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

struct Writer<'c, W: Write> {
    tar: tar::Builder<W>,
    /// (device, inode) of files with several links → the name first written.
    links: HashMap<(u64, u64), Vec<u8>>,
    stats: ExportStats,
    cancelled: &'c dyn Fn() -> bool,
}

impl<W: Write> Writer<'_, W> {
    fn walk(&mut self, dir: &File, shown: &Path, rel: &[u8], at_root: bool) -> Result<()> {
        let here = Entry::root(dir, shown);
        let mut names: Vec<Vec<u8>> = fs::read_dir(&here.at)
            .map_err(|e| Error::io("list", shown, e))?
            .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
            .collect::<io::Result<_>>()
            .map_err(|e| Error::io("list", shown, e))?;
        names.sort();
        for name in names {
            if (self.cancelled)() {
                return Err(Error::Interrupted);
            }
            let entry = Entry::child(dir, shown, &name);
            let md = match fs::symlink_metadata(&entry.at) {
                Ok(md) => md,
                // Removed since it was listed (a running container's snapshot).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", &entry.shown, e)),
            };
            if at_root && name == b"lost+found" && is_mkfs_lost_found(&entry.at, &md) {
                continue;
            }
            let mut child = rel.to_vec();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(&name);
            self.add(&entry, &child, &md)?;
            if md.is_dir() {
                let sub = open_dir(&entry.at).map_err(|e| Error::io("open", &entry.shown, e))?;
                same_object(&sub, &md, &entry.shown)?;
                self.walk(&sub, &entry.shown, &child, false)?;
            }
        }
        Ok(())
    }

    fn add(&mut self, entry: &Entry, name: &[u8], md: &Metadata) -> Result<()> {
        let (path, shown) = (entry.at.as_path(), entry.shown.as_path());
        let ft = md.file_type();
        let io_err = |e| Error::io("export", shown, e);
        if ft.is_socket() {
            tracing::warn!(path = %shown.display(), "skipping a socket: tar cannot hold it");
            return Ok(());
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(md.mode() & 0o7777);
        h.set_uid(u64::from(md.uid()));
        h.set_gid(u64::from(md.gid()));
        h.set_mtime(md.mtime().max(0) as u64);
        h.set_size(0);
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if md.mtime_nsec() != 0 || md.mtime() < 0 {
            pax.push((
                "mtime".into(),
                format!("{}.{:09}", md.mtime(), md.mtime_nsec()).into_bytes(),
            ));
        }
        for (k, v) in xattrs(path).map_err(|e| Error::io("read xattrs of", shown, e))? {
            pax.push((format!("SCHILY.xattr.{}", String::from_utf8_lossy(&k)), v));
        }
        let name_path = Path::new(OsStr::from_bytes(name));
        let hard_link = if !ft.is_dir() && md.nlink() > 1 {
            match self.links.get(&(md.dev(), md.ino())) {
                Some(first) => Some(first.clone()),
                None => {
                    self.links.insert((md.dev(), md.ino()), name.to_vec());
                    None
                }
            }
        } else {
            None
        };
        if !pax.is_empty() && hard_link.is_none() {
            self.tar
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(io_err)?;
        }
        if let Some(first) = hard_link {
            h.set_entry_type(tar::EntryType::Link);
            self.tar
                .append_link(&mut h, name_path, Path::new(OsStr::from_bytes(&first)))
                .map_err(io_err)?;
        } else if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            let mut n = name.to_vec();
            if !n.ends_with(b"/") {
                n.push(b'/');
            }
            self.tar
                .append_data(&mut h, Path::new(OsStr::from_bytes(&n)), io::empty())
                .map_err(io_err)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(path).map_err(io_err)?;
            h.set_entry_type(tar::EntryType::Symlink);
            self.tar
                .append_link(&mut h, name_path, &target)
                .map_err(io_err)?;
        } else if ft.is_file() {
            let file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(io_err)?;
            same_object(&file, md, shown)?;
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(md.len());
            self.tar
                .append_data(
                    &mut h,
                    name_path,
                    Exact {
                        file,
                        left: md.len(),
                    },
                )
                .map_err(io_err)?;
            self.stats.bytes += md.len();
        } else {
            let kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            };
            h.set_entry_type(kind);
            if kind != tar::EntryType::Fifo {
                let rdev = md.rdev();
                h.set_device_major(libc::major(rdev)).map_err(io_err)?;
                h.set_device_minor(libc::minor(rdev)).map_err(io_err)?;
            }
            self.tar
                .append_data(&mut h, name_path, io::empty())
                .map_err(io_err)?;
        }
        self.stats.entries += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        collections::BTreeMap,
        os::unix::fs::{symlink, PermissionsExt},
    };

    /// Everything export and import must keep, per path.
    fn tree(root: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut inodes: HashMap<u64, String> = HashMap::new();
        fn walk(
            root: &Path,
            dir: &Path,
            out: &mut BTreeMap<String, String>,
            inodes: &mut HashMap<u64, String>,
        ) {
            let mut names: Vec<_> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            for p in names {
                let md = fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let ft = md.file_type();
                let what = if ft.is_dir() {
                    "dir".to_string()
                } else if ft.is_symlink() {
                    format!("-> {}", fs::read_link(&p).unwrap().display())
                } else if ft.is_file() {
                    format!("file {:?}", fs::read(&p).unwrap())
                } else {
                    format!("special {:o} {}", md.mode() & libc::S_IFMT, md.rdev())
                };
                let link = if !ft.is_dir() && md.nlink() > 1 {
                    inodes.entry(md.ino()).or_insert(rel.clone()).clone()
                } else {
                    String::new()
                };
                let mtime = if ft.is_dir() {
                    String::new()
                } else {
                    format!("{}.{}", md.mtime(), md.mtime_nsec())
                };
                out.insert(
                    rel,
                    format!(
                        "{what} mode {:o} {}:{} {mtime} link {link} xattrs {:?}",
                        md.mode() & 0o7777,
                        md.uid(),
                        md.gid(),
                        xattrs(&p).unwrap()
                    ),
                );
                if ft.is_dir() {
                    walk(root, &p, out, inodes);
                }
            }
        }
        walk(root, root, &mut out, &mut inodes);
        out
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_never_exports_what_is_outside() {
        use std::sync::{
            atomic::{AtomicBool, AtomicU64, Ordering},
            Arc,
        };
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        fs::create_dir_all(root.join("dir")).unwrap();
        fs::create_dir(&outside).unwrap();
        // The same names inside and outside: a walk that goes by path reads the host's
        // file whenever `dir` is a symlink at that moment.
        for i in 0..500 {
            fs::write(root.join(format!("dir/f{i:03}")), b"inside").unwrap();
            fs::write(outside.join(format!("f{i:03}")), b"SECRET").unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        // What a container does to its own snapshot while it is exported.
        let swapper = {
            let (root, outside, stop, swaps) =
                (root.clone(), outside.clone(), stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    fs::rename(root.join("dir"), root.join("dir.real")).unwrap();
                    symlink(&outside, root.join("dir")).unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(300));
                    fs::remove_file(root.join("dir")).unwrap();
                    fs::rename(root.join("dir.real"), root.join("dir")).unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(300));
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let (mut ok, mut failed) = (0, 0);
        let started = std::time::Instant::now();
        while ok < 50 && started.elapsed().as_secs() < 20 {
            let mut out = Vec::new();
            match write_tar(&root, &mut out, &|| false) {
                Ok(_) => {
                    ok += 1;
                    let leaked = out.windows(6).any(|w| w == b"SECRET");
                    assert!(!leaked, "a host file's content is in the export");
                }
                Err(_) => failed += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        assert!(swaps.load(Ordering::Relaxed) > 50, "the race ran");
        assert!(ok > 0, "{failed} exports failed, none succeeded");
    }

    #[test]
    fn export_then_apply_round_trips() {
        let d = tempfile::Builder::new()
            .prefix("thinsnap-export-")
            .tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let a = d.path().join("a");
        fs::create_dir_all(a.join("dir/sub")).unwrap();
        fs::create_dir(a.join("lost+found")).unwrap();
        fs::set_permissions(a.join("lost+found"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(a.join("dir/sub/file"), b"hello").unwrap();
        fs::hard_link(a.join("dir/sub/file"), a.join("hard")).unwrap();
        symlink("/nowhere/at/all", a.join("dangling")).unwrap();
        let long = "n".repeat(150);
        fs::write(a.join(&long), b"long name").unwrap();
        symlink("l".repeat(200), a.join("longlink")).unwrap();
        nix::unistd::mkfifo(
            &a.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .unwrap();
        fs::set_permissions(a.join("dir"), fs::Permissions::from_mode(0o2751)).unwrap();
        fs::set_permissions(a.join(&long), fs::Permissions::from_mode(0o4711)).unwrap();
        let p = CString::new(a.join("hard").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid strings and buffer.
        let r = unsafe {
            libc::setxattr(
                p.as_ptr(),
                c"user.x".as_ptr(),
                b"1\x002".as_ptr().cast(),
                3,
                0,
            )
        };
        assert_eq!(r, 0);
        let f = File::options().write(true).open(a.join("hard")).unwrap();
        f.set_times(fs::FileTimes::new().set_modified(
            std::time::UNIX_EPOCH + std::time::Duration::new(1_500_000_000, 123_456_789),
        ))
        .unwrap();
        if nix::unistd::Uid::effective().is_root() {
            nix::unistd::chown(
                &a.join("dir/sub/file"),
                Some(nix::unistd::Uid::from(1234)),
                Some(nix::unistd::Gid::from(5678)),
            )
            .unwrap();
        }
        fs::set_permissions(&a, fs::Permissions::from_mode(0o751)).unwrap();

        let mut first = Vec::new();
        let s = write_tar(&a, &mut first, &|| false).unwrap();
        let mut second = Vec::new();
        write_tar(&a, &mut second, &|| false).unwrap();
        assert_eq!(first, second, "the same tree gives the same bytes");
        assert_eq!(s.bytes, 5 + 9);

        let b = d.path().join("b");
        fs::create_dir(&b).unwrap();
        crate::image::apply::apply_layer(&b, &first[..], &|| false).unwrap();
        let mut expected = tree(&a);
        if nix::unistd::Uid::effective().is_root() {
            // Only root's own 0700 lost+found is mkfs's.
            expected.remove("lost+found");
        }
        assert_eq!(tree(&b), expected);
        assert_eq!(
            fs::metadata(&b).unwrap().mode() & 0o7777,
            0o751,
            "the root's mode travels as ./"
        );

        // A lost+found with something in it is data.
        fs::write(a.join("lost+found/#12"), b"recovered").unwrap();
        let mut t = Vec::new();
        write_tar(&a, &mut t, &|| false).unwrap();
        let names: Vec<String> = tar::Archive::new(&t[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"lost+found/#12".to_string()), "{names:?}");
        assert_eq!(names[0], "./");
    }
}
