//! Applying one layer's tar stream onto a mounted snapshot: every file type, ownership,
//! modes, times and xattrs, OCI whiteouts, and the rules that keep a malicious layer
//! inside the snapshot.
//!
//! Safety rules, checked for every entry before it touches anything:
//! - names must be relative and must not contain `..` components;
//! - the parent directory is resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
//!   | RESOLVE_NO_XDEV)` from the snapshot's root: symlinks are followed as if the snapshot
//!   were `/` (an absolute symlink such as Debian's `/var/run -> /run`, or `..` at the top,
//!   stays inside the snapshot, as with containerd), so no path can leave the root;
//! - the final component is created, replaced or removed with `*at` calls that do not
//!   follow symlinks (a symlink entry's target may point anywhere: it is stored, never
//!   followed while extracting);
//! - hard link targets obey the same rules and must already exist;
//! - device nodes are made only when running as root.
//!
//! The first refused or failed entry stops the layer; the caller discards the snapshot.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    fs::File,
    io::{self, Read},
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::FileExt},
    },
    path::Path,
    rc::Rc,
};

use nix::{
    errno::Errno,
    fcntl::{AtFlags, OFlag},
    sys::{
        stat::{self, Mode, SFlag},
        time::TimeSpec,
    },
    unistd::{self, Gid, Uid, UnlinkatFlags},
};

use super::error::{Error, Result};

/// What applying a layer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Tar entries processed (whiteouts included).
    pub entries: u64,
    /// Regular files written.
    pub files: u64,
    /// Bytes of regular file content written (holes included).
    pub bytes: u64,
    /// Whiteouts (deletions and opaque directories) applied.
    pub whiteouts: u64,
}

/// Prefix of an OCI whiteout file's name.
pub const WHITEOUT: &[u8] = b".wh.";
/// Name of an OCI opaque-directory marker.
pub const OPAQUE: &[u8] = b".wh..wh..opq";

const BLOCK: usize = 4096;

/// Applies the layer tar `stream` onto the directory `root` (a mounted snapshot), checking
/// `cancelled` between entries.
///
/// # Errors
/// [`Error::Unsafe`] for an entry that breaks a safety rule (see the module docs),
/// [`Error::Apply`] when the filesystem refuses an entry, [`Error::LayerFormat`] for a
/// malformed or truncated stream, [`Error::Interrupted`] when cancelled. Entries before the
/// failing one have been applied: discard the snapshot.
pub fn apply_layer<R: Read>(
    root: &Path,
    stream: R,
    cancelled: &dyn Fn() -> bool,
) -> Result<ApplyStats> {
    let root_fd = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("open", root, e.into()))?;
    let space = nix::sys::statvfs::fstatvfs(&root_fd)
        .map(|s| s.blocks().saturating_mul(s.fragment_size()))
        .unwrap_or(u64::MAX);
    let mut a = Applier {
        root: root_fd,
        privileged: Uid::effective().is_root(),
        ours: HashSet::new(),
        dirs: HashMap::new(),
        buf: vec![0u8; 1 << 20],
        stats: ApplyStats::default(),
        cache: None,
        euid: Uid::effective().as_raw(),
        egid: Gid::effective().as_raw(),
        umask: current_umask(),
        space,
    };
    let mut tar = tar::Archive::new(Forward::new(stream));
    let entries = tar.entries_with_seek().map_err(|e| Error::LayerFormat {
        what: format!("is not a tar stream: {e}"),
    })?;
    for entry in entries {
        if cancelled() {
            return Err(Error::Interrupted);
        }
        let mut entry = entry.map_err(|e| Error::LayerFormat {
            what: format!(
                "tar stream is malformed after {} entries: {e}",
                a.stats.entries
            ),
        })?;
        a.entry(&mut entry, cancelled)?;
        a.stats.entries += 1;
    }
    a.finish_dirs()?;
    Ok(a.stats)
}

/// A stream that can seek forward by reading: the tar crate then skips what is left of an
/// entry (its padding, data nobody read) by seeking; it otherwise reads it into a 32 KiB
/// buffer that it zeroes first, for every entry, even when there is nothing to skip.
struct Forward<R> {
    inner: R,
    pos: u64,
    skip: Vec<u8>,
}

impl<R: Read> Forward<R> {
    fn new(inner: R) -> Forward<R> {
        Forward {
            inner,
            pos: 0,
            skip: Vec::new(),
        }
    }
}

impl<R: Read> Read for Forward<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read> io::Seek for Forward<R> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let mut amt = match to {
            io::SeekFrom::Current(d) if d >= 0 => d as u64,
            io::SeekFrom::Start(p) if p >= self.pos => p - self.pos,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a layer stream only seeks forward",
                ))
            }
        };
        while amt > 0 {
            if self.skip.is_empty() {
                self.skip = vec![0u8; 32 << 10];
            }
            let want = amt.min(self.skip.len() as u64) as usize;
            let n = match self.inner.read(&mut self.skip[..want]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "unexpected EOF during skip",
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.pos += n as u64;
            amt -= n as u64;
        }
        Ok(self.pos)
    }
}

/// Normalizes a layer entry's name into components joined by `/` (empty for the root),
/// refusing absolute names and `..` components.
///
/// # Errors
/// Why the name is refused.
pub fn clean_path(raw: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
    if raw.is_empty() {
        return Err("empty name");
    }
    if raw.starts_with(b"/") {
        return Err("absolute path: layer entries must be relative to the layer's root");
    }
    if raw.contains(&0) {
        return Err("NUL byte in the name");
    }
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("`..` component: layer entries must not climb out of the layer"),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// (parent, last component) of a cleaned path; the root's last component is empty.
fn split_last(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|b| *b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + name.len() + 1);
    p.extend_from_slice(dir);
    if !dir.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn cstr(b: &[u8]) -> CString {
    // Names from clean_path never hold NUL; tar link names may, and are checked.
    CString::new(b).unwrap_or_default()
}

/// The kernel's `struct open_how` (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dirfd, path, flags, resolve)`.
fn openat2(dirfd: &OwnedFd, path: &[u8], flags: OFlag, resolve: u64) -> io::Result<OwnedFd> {
    let path = CString::new(if path.is_empty() { b"." } else { path })
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let how = OpenHow {
        flags: (flags | OFlag::O_CLOEXEC).bits() as u64,
        mode: 0,
        resolve,
    };
    for _ in 0..64 {
        // SAFETY: openat2 reads `how` (of the size passed) and the NUL-terminated path;
        // it returns a new descriptor or -1.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if r >= 0 {
            // SAFETY: a descriptor the kernel just returned, owned by nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as i32) });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // A concurrent rename somewhere on the filesystem: the kernel asks to retry.
            Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
            Some(libc::ENOSYS) => {
                return Err(io::Error::other(
                    "openat2 is not available: thinsnap needs Linux 5.6 or later to apply layers safely",
                ))
            }
            _ => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

const RESOLVE: u64 = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn fstatat_nofollow(dir: &OwnedFd, name: &[u8]) -> io::Result<Option<libc::stat>> {
    match stat::fstatat(dir, cstr(name).as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Names in the directory open at `dir`.
fn list(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
        out.push(e?.file_name().as_bytes().to_vec());
    }
    Ok(out)
}

/// Removes `name` in `dir`, whatever it is, never following symlinks.
fn remove_any(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    match fstatat_nofollow(dir, name)? {
        None => Ok(()),
        Some(st) if is_dir(&st) => remove_tree(dir, name),
        Some(_) => Ok(unistd::unlinkat(
            dir,
            cstr(name).as_c_str(),
            UnlinkatFlags::NoRemoveDir,
        )?),
    }
}

/// Removes directory `name` in `dir` and everything in it.
fn remove_tree(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    let sub = nix::fcntl::openat(
        dir,
        cstr(name).as_c_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    for child in list(&sub)? {
        remove_any(&sub, &child)?;
    }
    unistd::unlinkat(dir, cstr(name).as_c_str(), UnlinkatFlags::RemoveDir)?;
    Ok(())
}

/// The process's umask, from /proc/self/status (umask(2) can only read it by changing
/// it, for every thread at once); None when it cannot be read.
fn current_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let v = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(v.trim(), 8).ok()
}

/// Whether directory `dir` has a default ACL, which (instead of the umask) limits the mode
/// of files made in it; true when that cannot be told.
fn has_default_acl(dir: &OwnedFd) -> bool {
    let path = cstr(format!("/proc/self/fd/{}", dir.as_raw_fd()).as_bytes());
    // SAFETY: a NUL-terminated path and name; a null buffer of size 0 asks for the size.
    let r = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"system.posix_acl_default".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    r >= 0
        || !matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP)
        )
}

fn is_zero(b: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64.
    let (head, mid, tail) = unsafe { b.align_to::<u64>() };
    head.iter().all(|x| *x == 0) && mid.iter().all(|x| *x == 0) && tail.iter().all(|x| *x == 0)
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Parses a PAX time (`1700000000.5`, `-1.25`) into a TimeSpec.
fn pax_time(v: &str) -> Option<TimeSpec> {
    let (neg, v) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (s, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: i64 = s.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: i64 = digits.parse().ok()?;
    Some(if neg {
        if nanos == 0 {
            TimeSpec::new(-secs, 0)
        } else {
            TimeSpec::new(-secs - 1, 1_000_000_000 - nanos)
        }
    } else {
        TimeSpec::new(secs, nanos)
    })
}

/// Metadata of an entry.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    atime: TimeSpec,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

#[derive(Clone, Copy)]
struct DirMeta {
    mode: u32,
    atime: TimeSpec,
    mtime: TimeSpec,
}

struct Applier {
    root: OwnedFd,
    privileged: bool,
    /// Paths this layer created or replaced: what an opaque marker keeps.
    ours: HashSet<Vec<u8>>,
    /// Directory modes and times, applied after their contents.
    dirs: HashMap<Vec<u8>, DirMeta>,
    buf: Vec<u8>,
    stats: ApplyStats,
    /// The parent directory of the last regular file, its path, the group new files in
    /// it get, and whether they get exactly the mode they are created with: runs of files
    /// in one directory resolve it once. Dropped by every entry that could replace a
    /// directory.
    cache: Option<(Vec<u8>, Rc<OwnedFd>, u32, bool)>,
    euid: u32,
    egid: u32,
    /// The process's umask, if known.
    umask: Option<u32>,
    /// Bytes the filesystem holds: no file of a layer can be larger.
    space: u64,
}

impl Applier {
    fn fail(entry: &str, op: impl Into<String>) -> impl FnOnce(io::Error) -> Error + '_ {
        let op = op.into();
        move |source| Error::Apply {
            entry: entry.to_string(),
            op,
            source,
        }
    }

    /// Records that this layer made `rel` and, implicitly, its parent directories.
    fn mark(&mut self, rel: &[u8]) {
        let mut p = rel;
        while !p.is_empty() && self.ours.insert(p.to_vec()) {
            p = split_last(p).0;
        }
    }

    /// Opens directory `rel` (resolved beneath the root) with `flags`.
    fn open_dir(&self, rel: &[u8], flags: OFlag) -> io::Result<OwnedFd> {
        openat2(&self.root, rel, flags | OFlag::O_DIRECTORY, RESOLVE)
    }

    /// The error for directory `rel` failing to resolve.
    fn resolve_error(entry: &str, rel: &[u8], what: &str, e: io::Error) -> Error {
        let shown = if rel.is_empty() {
            ".".into()
        } else {
            show(rel)
        };
        match e.raw_os_error() {
            Some(libc::EXDEV) => Error::Unsafe {
                entry: entry.to_string(),
                why: format!(
                    "{what} {shown} resolves outside the snapshot (through an absolute symlink \
                     or a symlink with `..` leading out)"
                ),
            },
            Some(libc::ELOOP) => Error::Unsafe {
                entry: entry.to_string(),
                why: format!("{what} {shown} goes through too many or magic symlinks"),
            },
            Some(libc::ENOTDIR) => Error::Apply {
                entry: entry.to_string(),
                op: format!("open {what} {shown}: one of its components is not a directory"),
                source: e,
            },
            _ => Error::Apply {
                entry: entry.to_string(),
                op: format!("open {what} {shown}"),
                source: e,
            },
        }
    }

    /// Opens the parent directory `rel`, creating missing components (mode 0755).
    fn parent(&mut self, entry: &str, rel: &[u8]) -> Result<OwnedFd> {
        let flags = OFlag::O_PATH;
        match self.open_dir(rel, flags) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(Self::resolve_error(entry, rel, "parent directory", e)),
        }
        let mut fd = self
            .open_dir(b"", flags)
            .map_err(Self::fail(entry, "open the snapshot's root"))?;
        let mut prefix: Vec<u8> = Vec::new();
        for comp in rel.split(|b| *b == b'/') {
            prefix = join(&prefix, comp);
            match self.open_dir(&prefix, flags) {
                Ok(next) => fd = next,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let fail = |e: Errno| {
                        Self::fail(entry, format!("create directory {}", show(&prefix)))(e.into())
                    };
                    let name = cstr(comp);
                    stat::mkdirat(&fd, name.as_c_str(), Mode::from_bits_truncate(0o755))
                        .map_err(fail)?;
                    // Directories a layer implies are 0755 (as containerd makes them),
                    // whatever the umask took away (ours is 0077).
                    if self.umask.is_none_or(|u| u & 0o755 != 0) {
                        stat::fchmodat(
                            &fd,
                            name.as_c_str(),
                            Mode::from_bits_truncate(0o755),
                            stat::FchmodatFlags::FollowSymlink,
                        )
                        .map_err(fail)?;
                    }
                    self.mark(&prefix);
                    fd = self
                        .open_dir(&prefix, flags)
                        .map_err(|e| Self::resolve_error(entry, &prefix, "parent directory", e))?;
                }
                Err(e) => return Err(Self::resolve_error(entry, &prefix, "parent directory", e)),
            }
        }
        Ok(fd)
    }

    /// The parent directory of a regular file (see `cache`), the group new files in it
    /// get, and whether they get exactly the mode they are created with (minus the umask).
    fn file_parent(&mut self, entry: &str, rel: &[u8]) -> Result<(Rc<OwnedFd>, u32, bool)> {
        if let Some((p, fd, gid, plain)) = &self.cache {
            if p == rel {
                return Ok((fd.clone(), *gid, *plain));
            }
        }
        let fd = self.parent(entry, rel)?;
        let st =
            stat::fstat(&fd).map_err(|e| Self::fail(entry, "look up its directory")(e.into()))?;
        let gid = if st.st_mode & libc::S_ISGID != 0 {
            st.st_gid
        } else {
            self.egid
        };
        let plain = !has_default_acl(&fd);
        let fd = Rc::new(fd);
        self.cache = Some((rel.to_vec(), fd.clone(), gid, plain));
        Ok((fd, gid, plain))
    }

    /// Makes room for a new `name` in `dir`: removes what is there, except a directory
    /// when `keep_dir`. Returns whether a directory was kept.
    fn make_room(dir: &OwnedFd, name: &[u8], keep_dir: bool) -> io::Result<bool> {
        match fstatat_nofollow(dir, name)? {
            None => Ok(false),
            Some(st) if is_dir(&st) => {
                if keep_dir {
                    Ok(true)
                } else {
                    remove_tree(dir, name)?;
                    Ok(false)
                }
            }
            Some(_) => {
                unistd::unlinkat(dir, cstr(name).as_c_str(), UnlinkatFlags::NoRemoveDir)?;
                Ok(false)
            }
        }
    }

    fn meta<R: Read>(entry: &mut tar::Entry<'_, R>, shown: &str) -> Result<Meta> {
        let bad = |what: &str, e: io::Error| Error::LayerFormat {
            what: format!("entry {shown:?}: bad {what} in its header: {e}"),
        };
        let h = entry.header();
        let mode = h.mode().map_err(|e| bad("mode", e))? & 0o7777;
        let uid = h.uid().map_err(|e| bad("uid", e))?;
        let gid = h.gid().map_err(|e| bad("gid", e))?;
        let (uid, gid) = match (u32::try_from(uid), u32::try_from(gid)) {
            (Ok(u), Ok(g)) => (u, g),
            _ => {
                return Err(Error::LayerFormat {
                    what: format!("entry {shown:?}: owner {uid}:{gid} is out of range"),
                })
            }
        };
        let mtime = TimeSpec::new(h.mtime().map_err(|e| bad("mtime", e))? as i64, 0);
        let mut m = Meta {
            mode,
            uid,
            gid,
            atime: mtime,
            mtime,
            xattrs: Vec::new(),
        };
        let mut atime = None;
        if let Some(pax) = entry
            .pax_extensions()
            .map_err(|e| bad("PAX extension", e))?
        {
            for ext in pax {
                let ext = ext.map_err(|e| bad("PAX extension", e))?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    let name = CString::new(name).map_err(|_| Error::LayerFormat {
                        what: format!("entry {shown:?}: xattr name with a NUL byte"),
                    })?;
                    m.xattrs.push((name, ext.value_bytes().to_vec()));
                } else if key == b"mtime" || key == b"atime" {
                    let t =
                        ext.value()
                            .ok()
                            .and_then(pax_time)
                            .ok_or_else(|| Error::LayerFormat {
                                what: format!(
                                    "entry {shown:?}: bad PAX {} {:?}",
                                    show(key),
                                    show(ext.value_bytes())
                                ),
                            })?;
                    if key == b"mtime" {
                        m.mtime = t;
                    } else {
                        atime = Some(t);
                    }
                }
            }
        }
        m.atime = atime.unwrap_or(m.mtime);
        Ok(m)
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let shown = show(&raw);
        let rel = clean_path(&raw).map_err(|why| Error::Unsafe {
            entry: shown.clone(),
            why: why.into(),
        })?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let (parent, name) = split_last(&rel);
        use tar::EntryType as T;
        let regular = matches!(kind, T::Regular | T::Continuous | T::GNUSparse);
        if !regular || name.starts_with(WHITEOUT) {
            self.cache = None;
        }
        if let Some(target) = name.strip_prefix(WHITEOUT) {
            return self.whiteout(&shown, parent, target);
        }
        let meta = Self::meta(entry, &shown)?;
        match kind {
            T::Directory => return self.dir(&shown, &rel, &meta),
            _ if rel.is_empty() => {
                return Err(Error::Unsafe {
                    entry: shown,
                    why: "a non-directory entry would replace the snapshot's root".into(),
                })
            }
            _ => {}
        }
        let (dir, new_gid, plain) = if regular {
            self.file_parent(&shown, parent)?
        } else {
            (Rc::new(self.parent(&shown, parent)?), 0, false)
        };
        let cname = cstr(name);
        let fail = |op: &str| Self::fail(&shown, op.to_string());
        match kind {
            T::Regular | T::Continuous | T::GNUSparse => {
                // A sparse entry declares its size apart from the data it carries: one larger
                // than the filesystem is refused before anything is read.
                let declared = entry
                    .header()
                    .as_gnu()
                    .filter(|_| kind == T::GNUSparse)
                    .and_then(|g| g.real_size().ok());
                if let Some(size) = declared.filter(|s| *s > self.space) {
                    return Err(Error::LayerFormat {
                        what: format!(
                            "entry {shown:?}: a sparse file of {size} bytes is larger than the whole filesystem ({} bytes)",
                            self.space
                        ),
                    });
                }
                // New files are ours, with the directory's group if it is setgid.
                let chown = self.privileged && (meta.uid != self.euid || meta.gid != new_gid);
                // Made with their mode when nothing would change it afterwards: no owner
                // to set (a chown clears setuid and setgid, so those are set after it), no
                // special bits, nothing the umask takes away, no default ACL deciding
                // instead. Else made 0600 and given their mode once owned.
                let exact = !chown
                    && meta.mode & 0o7000 == 0
                    && plain
                    && self.umask.is_some_and(|u| meta.mode & u == 0);
                let create_mode = if exact { meta.mode } else { 0o600 };
                let create = || {
                    nix::fcntl::openat(
                        &dir,
                        cname.as_c_str(),
                        OFlag::O_WRONLY
                            | OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(create_mode),
                    )
                };
                let fd = match create() {
                    Ok(fd) => fd,
                    Err(Errno::EEXIST) => {
                        // What is there may be a directory the cached parent lies in.
                        self.cache = None;
                        Self::make_room(&dir, name, false)
                            .map_err(fail("replace what is there"))?;
                        create().map_err(|e| fail("create the file")(e.into()))?
                    }
                    Err(e) => return Err(fail("create the file")(e.into())),
                };
                let file = File::from(fd);
                let expected = entry.size();
                let sparse = kind == T::GNUSparse;
                let written = match self.write_data(&file, entry, cancelled) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        return Err(Error::Interrupted)
                    }
                    Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
                        return Err(Error::LayerFormat {
                            what: format!("entry {shown:?}: {e}"),
                        })
                    }
                    Err(e) => return Err(fail("write the file")(e)),
                };
                if !sparse && written != expected {
                    return Err(Error::LayerFormat {
                        what: format!(
                            "is truncated: entry {shown:?} declares {expected} bytes but the stream \
                             ends after {written}"
                        ),
                    });
                }
                self.stats.files += 1;
                self.stats.bytes += written;
                if chown {
                    unistd::fchown(&file, Some(Uid::from(meta.uid)), Some(Gid::from(meta.gid)))
                        .map_err(|e| fail("set the owner")(e.into()))?;
                }
                if !exact {
                    stat::fchmod(&file, Mode::from_bits_truncate(meta.mode))
                        .map_err(|e| fail("set the mode")(e.into()))?;
                }
                Self::fd_xattrs(&file, &meta, &shown)?;
                stat::futimens(&file, &meta.atime, &meta.mtime)
                    .map_err(|e| fail("set the times")(e.into()))?;
            }
            T::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| Error::LayerFormat {
                    what: format!("entry {shown:?}: a symlink without a target"),
                })?;
                let target = CString::new(target.into_owned()).map_err(|_| Error::LayerFormat {
                    what: format!("entry {shown:?}: symlink target with a NUL byte"),
                })?;
                Self::make_room(&dir, name, false).map_err(fail("replace what is there"))?;
                unistd::symlinkat(target.as_c_str(), &dir, cname.as_c_str())
                    .map_err(|e| fail("create the symlink")(e.into()))?;
                self.finish_node(&dir, name, &meta, &shown, false)?;
            }
            T::Link => self.hard_link(entry, &shown, &rel, &dir, name)?,
            T::Char | T::Block | T::Fifo => {
                let (sflag, what) = match kind {
                    T::Char => (SFlag::S_IFCHR, "character device"),
                    T::Block => (SFlag::S_IFBLK, "block device"),
                    _ => (SFlag::S_IFIFO, "fifo"),
                };
                if kind != T::Fifo && !self.privileged {
                    return Err(Error::Apply {
                        entry: shown,
                        op: format!("create a {what}"),
                        source: io::Error::other(
                            "device nodes can only be created when running as root",
                        ),
                    });
                }
                let h = entry.header();
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                Self::make_room(&dir, name, false).map_err(fail("replace what is there"))?;
                stat::mknodat(
                    &dir,
                    cname.as_c_str(),
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    libc::makedev(major, minor),
                )
                .map_err(|e| fail(&format!("create the {what}"))(e.into()))?;
                self.finish_node(&dir, name, &meta, &shown, true)?;
            }
            other => {
                return Err(Error::LayerFormat {
                    what: format!("entry {shown:?}: unsupported tar entry type {other:?}"),
                })
            }
        }
        self.mark(&rel);
        Ok(())
    }

    /// Owner, mode (unless a symlink), xattrs and times of a node made by name in `dir`.
    fn finish_node(
        &self,
        dir: &OwnedFd,
        name: &[u8],
        meta: &Meta,
        shown: &str,
        chmod: bool,
    ) -> Result<()> {
        let cname = cstr(name);
        let fail = |op: &'static str| Self::fail(shown, op);
        if self.privileged {
            unistd::fchownat(
                dir,
                cname.as_c_str(),
                Some(Uid::from(meta.uid)),
                Some(Gid::from(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| fail("set the owner")(e.into()))?;
        }
        if chmod {
            // Not a symlink (we just made it), so following is harmless.
            stat::fchmodat(
                dir,
                cname.as_c_str(),
                Mode::from_bits_truncate(meta.mode),
                stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| fail("set the mode")(e.into()))?;
        }
        if !meta.xattrs.is_empty() {
            // The directory by its descriptor, the node by name, never followed.
            let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
            path.extend_from_slice(name);
            let path = cstr(&path);
            for (k, v) in &meta.xattrs {
                // SAFETY: valid NUL-terminated strings and a buffer of the given length.
                let r = unsafe {
                    libc::lsetxattr(path.as_ptr(), k.as_ptr(), v.as_ptr().cast(), v.len(), 0)
                };
                if r != 0 {
                    return Err(Self::xattr_error(shown, k, io::Error::last_os_error()));
                }
            }
        }
        stat::utimensat(
            dir,
            cname.as_c_str(),
            &meta.atime,
            &meta.mtime,
            stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| fail("set the times")(e.into()))?;
        Ok(())
    }

    fn xattr_error(shown: &str, k: &CString, e: io::Error) -> Error {
        Error::Apply {
            entry: shown.to_string(),
            op: format!(
                "set xattr {} (the snapshot's filesystem must support it)",
                k.to_string_lossy()
            ),
            source: e,
        }
    }

    fn fd_xattrs(fd: &impl AsFd, meta: &Meta, shown: &str) -> Result<()> {
        for (k, v) in &meta.xattrs {
            // SAFETY: an open descriptor, a NUL-terminated name, a buffer of that length.
            let r = unsafe {
                libc::fsetxattr(
                    fd.as_fd().as_raw_fd(),
                    k.as_ptr(),
                    v.as_ptr().cast(),
                    v.len(),
                    0,
                )
            };
            if r != 0 {
                return Err(Self::xattr_error(shown, k, io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// Writes a file's content, leaving all-zero blocks as holes (thin pools then store
    /// nothing for them). Returns the bytes read.
    fn write_data(
        &mut self,
        file: &File,
        r: &mut dyn Read,
        cancelled: &dyn Fn() -> bool,
    ) -> io::Result<u64> {
        let mut off = 0u64;
        let mut end_written = 0u64;
        loop {
            let n = read_full(r, &mut self.buf)?;
            if n == 0 {
                break;
            }
            // A sparse entry may declare any size for a few bytes of data: never more than
            // the filesystem holds, and the import can be stopped inside it.
            if off + n as u64 > self.space {
                return Err(io::Error::new(
                    io::ErrorKind::FileTooLarge,
                    format!(
                        "the file is larger than the whole filesystem ({} bytes)",
                        self.space
                    ),
                ));
            }
            if off % (64 << 20) == 0 && off > 0 && cancelled() {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let data = &self.buf[..n];
            let mut run: Option<usize> = None;
            for (i, block) in data.chunks(BLOCK).enumerate() {
                let start = i * BLOCK;
                if is_zero(block) {
                    if let Some(s) = run.take() {
                        file.write_all_at(&data[s..start], off + s as u64)?;
                        end_written = off + start as u64;
                    }
                } else if run.is_none() {
                    run = Some(start);
                }
            }
            if let Some(s) = run {
                file.write_all_at(&data[s..], off + s as u64)?;
                end_written = off + n as u64;
            }
            off += n as u64;
        }
        if end_written < off {
            file.set_len(off)?;
        }
        Ok(off)
    }

    fn dir(&mut self, shown: &str, rel: &[u8], meta: &Meta) -> Result<()> {
        let fail = |op: &'static str| Self::fail(shown, op);
        let fd = if rel.is_empty() {
            self.open_dir(b"", OFlag::O_RDONLY)
                .map_err(fail("open the snapshot's root"))?
        } else {
            let (parent, name) = split_last(rel);
            let pdir = self.parent(shown, parent)?;
            let cname = cstr(name);
            if !Self::make_room(&pdir, name, true).map_err(fail("replace what is there"))? {
                stat::mkdirat(&pdir, cname.as_c_str(), Mode::from_bits_truncate(0o700))
                    .map_err(|e| fail("create the directory")(e.into()))?;
            }
            nix::fcntl::openat(
                &pdir,
                cname.as_c_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| fail("open the directory")(e.into()))?
        };
        if self.privileged {
            unistd::fchown(&fd, Some(Uid::from(meta.uid)), Some(Gid::from(meta.gid)))
                .map_err(|e| fail("set the owner")(e.into()))?;
        }
        Self::fd_xattrs(&fd, meta, shown)?;
        self.dirs.insert(
            rel.to_vec(),
            DirMeta {
                mode: meta.mode,
                atime: meta.atime,
                mtime: meta.mtime,
            },
        );
        self.mark(rel);
        Ok(())
    }

    fn hard_link<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        shown: &str,
        rel: &[u8],
        dir: &OwnedFd,
        name: &[u8],
    ) -> Result<()> {
        let raw = entry
            .link_name_bytes()
            .ok_or_else(|| Error::LayerFormat {
                what: format!("entry {shown:?}: a hard link without a target"),
            })?
            .into_owned();
        let target = clean_path(&raw).map_err(|why| Error::Unsafe {
            entry: shown.to_string(),
            why: format!("hard link target {:?}: {why}", show(&raw)),
        })?;
        if target.is_empty() {
            return Err(Error::Unsafe {
                entry: shown.to_string(),
                why: "a hard link to the snapshot's root".into(),
            });
        }
        if target == rel {
            return Ok(());
        }
        let (tparent, tname) = split_last(&target);
        let tdir = self.open_dir(tparent, OFlag::O_PATH).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                Error::Apply {
                    entry: shown.to_string(),
                    op: format!(
                        "link to {}: it is in neither this layer nor those below",
                        show(&target)
                    ),
                    source: e,
                }
            } else {
                Self::resolve_error(shown, tparent, "hard link target's directory", e)
            }
        })?;
        let fail = |op: String| Self::fail(shown, op);
        let st = fstatat_nofollow(&tdir, tname)
            .map_err(fail(format!("look up hard link target {}", show(&target))))?
            .ok_or_else(|| Error::Apply {
                entry: shown.to_string(),
                op: format!(
                    "link to {}: it is in neither this layer nor those below",
                    show(&target)
                ),
                source: io::Error::from_raw_os_error(libc::ENOENT),
            })?;
        if is_dir(&st) {
            return Err(Error::Unsafe {
                entry: shown.to_string(),
                why: format!("a hard link to directory {}", show(&target)),
            });
        }
        if let Some(cur) = fstatat_nofollow(dir, name).map_err(fail("look up the link".into()))? {
            if cur.st_dev == st.st_dev && cur.st_ino == st.st_ino {
                return Ok(());
            }
        }
        Self::make_room(dir, name, false).map_err(fail("replace what is there".into()))?;
        // No AT_SYMLINK_FOLLOW: a symlink target is linked itself, never followed.
        unistd::linkat(
            &tdir,
            cstr(tname).as_c_str(),
            dir,
            cstr(name).as_c_str(),
            AtFlags::empty(),
        )
        .map_err(|e| fail(format!("link to {}", show(&target)))(e.into()))?;
        Ok(())
    }

    /// `.wh.NAME` deletes NAME from the layers below; `.wh..wh..opq` hides everything
    /// below in its directory.
    fn whiteout(&mut self, shown: &str, parent: &[u8], target: &[u8]) -> Result<()> {
        self.stats.whiteouts += 1;
        if target == &OPAQUE[WHITEOUT.len()..] {
            self.parent(shown, parent)?;
            self.mark(parent);
            return self.clear_lower(shown, parent);
        }
        if target.starts_with(WHITEOUT) {
            // Other `.wh..wh.` names are aufs bookkeeping, meaningless here.
            tracing::debug!(entry = shown, "ignoring aufs metadata");
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(Error::Unsafe {
                entry: shown.to_string(),
                why: "a whiteout of no name, `.` or `..`".into(),
            });
        }
        let dir = match self.open_dir(parent, OFlag::O_PATH) {
            Ok(d) => d,
            // Nothing below to delete.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                return Ok(())
            }
            Err(e) => return Err(Self::resolve_error(shown, parent, "directory", e)),
        };
        let path = join(parent, target);
        if self.ours.contains(&path) {
            // Whiteouts only hide what is below; what this layer made stays, and a
            // directory of this layer only loses what came from below.
            let st = fstatat_nofollow(&dir, target).map_err(Self::fail(shown, "look up"))?;
            if st.is_some_and(|s| is_dir(&s)) {
                return self.clear_lower(shown, &path);
            }
            return Ok(());
        }
        remove_any(&dir, target).map_err(Self::fail(shown, format!("delete {}", show(&path))))
    }

    /// Removes every child of directory `rel` that this layer did not make, recursing
    /// into the directories it did.
    fn clear_lower(&mut self, shown: &str, rel: &[u8]) -> Result<()> {
        let dir = self
            .open_dir(rel, OFlag::O_RDONLY)
            .map_err(|e| Self::resolve_error(shown, rel, "directory", e))?;
        let names = list(&dir).map_err(Self::fail(shown, format!("list {}", show(rel))))?;
        for name in names {
            let child = join(rel, &name);
            if !self.ours.contains(&child) {
                remove_any(&dir, &name)
                    .map_err(Self::fail(shown, format!("delete {}", show(&child))))?;
            } else if fstatat_nofollow(&dir, &name)
                .map_err(Self::fail(shown, "look up"))?
                .is_some_and(|s| is_dir(&s))
            {
                self.clear_lower(shown, &child)?;
            }
        }
        Ok(())
    }

    /// Applies directory modes and times, deepest first, now that their contents exist.
    fn finish_dirs(&mut self) -> Result<()> {
        let mut dirs: Vec<(Vec<u8>, DirMeta)> = self.dirs.drain().collect();
        dirs.sort_by_key(|(p, _)| {
            (
                std::cmp::Reverse(
                    p.iter().filter(|b| **b == b'/').count() + usize::from(!p.is_empty()),
                ),
                p.clone(),
            )
        });
        for (rel, m) in dirs {
            let shown = if rel.is_empty() {
                ".".into()
            } else {
                show(&rel)
            };
            let fd = match self.open_dir(&rel, OFlag::O_RDONLY | OFlag::O_NOFOLLOW) {
                Ok(fd) => fd,
                // Replaced or deleted later in the layer.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(Self::resolve_error(&shown, &rel, "directory", e)),
            };
            stat::fchmod(&fd, Mode::from_bits_truncate(m.mode))
                .map_err(|e| Self::fail(&shown, "set the mode")(e.into()))?;
            stat::futimens(&fd, &m.atime, &m.mtime)
                .map_err(|e| Self::fail(&shown, "set the times")(e.into()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A tar built entry by entry; names are written raw, so bad ones can be made.
    struct Tar(tar::Builder<Vec<u8>>);

    fn header(kind: tar::EntryType, name: &str, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let slot = &mut h.as_old_mut().name;
        slot[..name.len()].copy_from_slice(name.as_bytes());
        h
    }

    impl Tar {
        fn new() -> Tar {
            Tar(tar::Builder::new(Vec::new()))
        }
        fn append(&mut self, mut h: tar::Header, data: &[u8]) -> &mut Tar {
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn file(&mut self, name: &str, data: &[u8], mode: u32) -> &mut Tar {
            self.append(
                header(tar::EntryType::Regular, name, mode, data.len() as u64),
                data,
            )
        }
        fn dir(&mut self, name: &str, mode: u32) -> &mut Tar {
            self.append(header(tar::EntryType::Directory, name, mode, 0), b"")
        }
        fn link(&mut self, kind: tar::EntryType, name: &str, target: &str) -> &mut Tar {
            let mut h = header(kind, name, 0o777, 0);
            h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
            self.append(h, b"")
        }
        fn symlink(&mut self, name: &str, target: &str) -> &mut Tar {
            self.link(tar::EntryType::Symlink, name, target)
        }
        fn hard(&mut self, name: &str, target: &str) -> &mut Tar {
            self.link(tar::EntryType::Link, name, target)
        }
        fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Tar {
            self.0
                .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
                .unwrap();
            self
        }
        fn bytes(&mut self) -> Vec<u8> {
            std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()))
                .into_inner()
                .unwrap()
        }
    }

    fn apply(root: &Path, t: &mut Tar) -> Result<ApplyStats> {
        apply_layer(root, &t.bytes()[..], &|| false)
    }

    fn tmp() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("thinsnap-apply-")
            .tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap()
    }

    #[test]
    fn paths_are_cleaned_or_refused() {
        assert_eq!(clean_path(b"./a//b/./c/").unwrap(), b"a/b/c");
        assert_eq!(clean_path(b"./").unwrap(), b"");
        assert_eq!(clean_path(b"a").unwrap(), b"a");
        assert!(clean_path(b"/etc/passwd").unwrap_err().contains("absolute"));
        assert!(clean_path(b"../x").unwrap_err().contains(".."));
        assert!(clean_path(b"a/../../x").unwrap_err().contains(".."));
        assert!(clean_path(b"a/..").unwrap_err().contains(".."));
        assert!(clean_path(b"").is_err());
        assert!(clean_path(b"a\0b").is_err());
        // `..` inside a longer name is just a name.
        assert_eq!(clean_path(b"a/..b/c..").unwrap(), b"a/..b/c..");
        assert_eq!(split_last(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_last(b"c"), (&b""[..], &b"c"[..]));
    }

    #[test]
    fn streams_seek_forward_only_by_reading() {
        use std::io::{Seek, SeekFrom};
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut f = Forward::new(&data[..]);
        let mut b = [0u8; 3];
        f.read_exact(&mut b).unwrap();
        assert_eq!(f.stream_position().unwrap(), 3);
        assert_eq!(f.seek(SeekFrom::Current(70_000)).unwrap(), 70_003);
        f.read_exact(&mut b).unwrap();
        assert_eq!(b, [data[70_003], data[70_004], data[70_005]]);
        assert_eq!(f.seek(SeekFrom::Start(70_010)).unwrap(), 70_010);
        assert!(f.seek(SeekFrom::Current(-1)).is_err());
        assert!(f.seek(SeekFrom::Start(0)).is_err());
        let e = f.seek(SeekFrom::Current(50_000)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn pax_times() {
        assert_eq!(pax_time("12"), Some(TimeSpec::new(12, 0)));
        assert_eq!(pax_time("12.5"), Some(TimeSpec::new(12, 500_000_000)));
        assert_eq!(
            pax_time("1.123456789123"),
            Some(TimeSpec::new(1, 123_456_789))
        );
        assert_eq!(pax_time("-1.25"), Some(TimeSpec::new(-2, 750_000_000)));
        assert_eq!(pax_time("x"), None);
        assert_eq!(pax_time("1.2x"), None);
    }

    #[test]
    fn files_links_modes_times_xattrs() {
        let d = tmp();
        let root = d.path();
        let big: Vec<u8> = (0..3 * BLOCK + 7)
            .map(|i| if i < BLOCK { 0 } else { (i % 251) as u8 })
            .collect();
        let mut t = Tar::new();
        t.dir("./", 0o755)
            .dir("ro/", 0o555)
            .file("ro/inside", b"x", 0o644)
            .file("implicit/parent/file", b"deep", 0o640)
            .file("big", &big, 0o4755)
            .file("zeros", &[0u8; 3 * BLOCK], 0o600)
            .symlink("abs", "/etc/shadow")
            .symlink("rel", "big")
            .hard("hard", "big")
            .dir("sticky/", 0o1777)
            .pax(&[
                ("SCHILY.xattr.user.k", b"v\0bin"),
                ("mtime", b"1600000000.25"),
            ])
            .file("xattr", b"x", 0o600)
            .append(header(tar::EntryType::Fifo, "fifo", 0o620, 0), b"");
        let s = apply(root, &mut t).unwrap();
        assert_eq!(s.files, 5);
        assert_eq!(
            std::fs::read(root.join("implicit/parent/file")).unwrap(),
            b"deep"
        );
        assert_eq!(
            std::fs::metadata(root.join("implicit")).unwrap().mode() & 0o7777,
            0o755
        );
        assert_eq!(std::fs::read(root.join("big")).unwrap(), big);
        let zeros = std::fs::metadata(root.join("zeros")).unwrap();
        assert_eq!(zeros.len(), 3 * BLOCK as u64);
        assert_eq!(zeros.blocks(), 0, "all-zero content is left as a hole");
        let m = std::fs::metadata(root.join("big")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o4755);
        assert_eq!(m.mtime(), 1_600_000_000);
        assert_eq!(m.nlink(), 2);
        assert_eq!(std::fs::metadata(root.join("hard")).unwrap().ino(), m.ino());
        assert_eq!(
            std::fs::read_link(root.join("abs")).unwrap(),
            Path::new("/etc/shadow")
        );
        assert_eq!(
            std::fs::read_link(root.join("rel")).unwrap(),
            Path::new("big")
        );
        let ro = std::fs::metadata(root.join("ro")).unwrap();
        assert_eq!(ro.mode() & 0o7777, 0o555, "set after its contents");
        assert_eq!(ro.mtime(), 1_600_000_000, "not changed by its contents");
        assert_eq!(
            std::fs::metadata(root.join("sticky")).unwrap().mode() & 0o7777,
            0o1777
        );
        let x = std::fs::metadata(root.join("xattr")).unwrap();
        assert_eq!((x.mtime(), x.mtime_nsec()), (1_600_000_000, 250_000_000));
        let mut buf = [0u8; 16];
        let p = CString::new(root.join("xattr").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid strings and buffer.
        let n = unsafe {
            libc::getxattr(
                p.as_ptr(),
                c"user.k".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(&buf[..n as usize], b"v\0bin");
        let f = std::fs::symlink_metadata(root.join("fifo")).unwrap();
        assert_eq!(f.mode() & libc::S_IFMT, libc::S_IFIFO);
        assert_eq!(f.mode() & 0o7777, 0o620);
        assert_eq!(
            std::fs::metadata(root).unwrap().permissions().mode() & 0o7777,
            0o755
        );
    }

    #[test]
    fn file_modes_are_exact_whatever_the_umask_or_a_default_acl() {
        let d = tmp();
        let root = d.path();
        // A default ACL granting only the owner: files made in that directory would get
        // their mode masked by it, not by the umask.
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm) in [(0x01u16, 7u16), (0x04, 0), (0x20, 0)] {
            acl.extend_from_slice(&tag.to_le_bytes());
            acl.extend_from_slice(&perm.to_le_bytes());
            acl.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        let modes = [
            0o644, 0o666, 0o777, 0o755, 0o000, 0o400, 0o4755, 0o2755, 0o1644, 0o6777,
        ];
        let mut t = Tar::new();
        t.pax(&[("SCHILY.xattr.system.posix_acl_default", &acl)])
            .dir("acl/", 0o755);
        for m in modes {
            t.file(&format!("plain/{m:o}"), b"x", m)
                .file(&format!("acl/{m:o}"), b"x", m);
        }
        apply(root, &mut t).unwrap();
        for dir in ["plain", "acl"] {
            for m in modes {
                let p = root.join(format!("{dir}/{m:o}"));
                let got = std::fs::metadata(&p).unwrap().mode() & 0o7777;
                assert_eq!(got, m, "{}: {got:o}", p.display());
            }
        }
    }

    #[test]
    fn whiteouts_and_opaque_directories() {
        let d = tmp();
        let root = d.path();
        let mut lower = Tar::new();
        lower
            .file("gone", b"1", 0o644)
            .file("dir/gone/deep", b"1", 0o644)
            .file("opq/lower-file", b"1", 0o644)
            .file("opq/sub/lower", b"1", 0o644)
            .file("keep", b"1", 0o644);
        apply(root, &mut lower).unwrap();
        let mut upper = Tar::new();
        upper
            .file(".wh.gone", b"", 0o644)
            .file("dir/.wh.gone", b"", 0o644)
            .file("opq/early", b"same layer, before the marker", 0o644)
            .file("opq/sub/mine", b"2", 0o644)
            .file("opq/.wh..wh..opq", b"", 0o644)
            .file("opq/late", b"after the marker", 0o644)
            .file("new/.wh.nothing-there", b"", 0o644)
            .file(".wh..wh.plnk", b"", 0o644);
        let s = apply(root, &mut upper).unwrap();
        assert_eq!(s.whiteouts, 5);
        assert!(!root.join("gone").exists());
        assert!(root.join("dir").is_dir());
        assert!(!root.join("dir/gone").exists());
        assert!(root.join("keep").exists());
        assert!(!root.join("opq/lower-file").exists());
        assert!(!root.join("opq/sub/lower").exists(), "opaque is recursive");
        assert!(root.join("opq/sub/mine").exists());
        assert!(root.join("opq/early").exists());
        assert!(root.join("opq/late").exists());
        assert!(!root.join("new").exists(), "a whiteout creates nothing");
        let names: Vec<_> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            !names.iter().any(|n| n.as_bytes().starts_with(b".wh.")),
            "{names:?}"
        );
    }

    #[test]
    fn replacing_never_follows_lower_symlinks() {
        let d = tmp();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("target"), b"precious").unwrap();
        let mut lower = Tar::new();
        lower
            .symlink("f", outside.join("target").to_str().unwrap())
            .dir("d/", 0o755)
            .file("d/x", b"1", 0o644);
        apply(&root, &mut lower).unwrap();
        let mut upper = Tar::new();
        upper
            .file("f", b"replaced", 0o644)
            .file("d", b"a file replaces a directory", 0o644);
        apply(&root, &mut upper).unwrap();
        assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"precious");
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"replaced");
        assert!(root.join("d").is_file());
    }

    fn refused(root: &Path, t: &mut Tar) -> String {
        match apply(root, t) {
            Err(e @ Error::Unsafe { .. }) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn escapes_are_refused_or_scoped_to_the_root() {
        let d = tmp();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"precious").unwrap();
        let out = outside.to_str().unwrap();

        let e = refused(&root, Tar::new().file("../x", b"x", 0o644));
        assert!(e.contains("`..`"), "{e}");
        let e = refused(&root, Tar::new().file("/x", b"x", 0o644));
        assert!(e.contains("absolute"), "{e}");
        let e = refused(&root, Tar::new().hard("h", "../outside/victim"));
        assert!(e.contains("hard link target"), "{e}");
        let e = refused(&root, Tar::new().hard("h3", "/etc/passwd"));
        assert!(e.contains("absolute"), "{e}");
        // Symlinked parents resolve as if the snapshot were `/` (as containerd does): an
        // absolute symlink or one with `..` leading out lands inside the root, or nowhere.
        let _ = apply(&root, Tar::new().symlink("a", out).file("a/x", b"x", 0o644));
        let _ = apply(
            &root,
            Tar::new()
                .symlink("b", "../outside")
                .file("b/x", b"x", 0o644),
        );
        let _ = apply(
            &root,
            Tar::new()
                .symlink("w", out)
                .file("w/.wh.victim", b"", 0o644),
        );
        let _ = apply(&root, Tar::new().symlink("s", out).hard("h2", "s/victim"));
        apply(
            &root,
            Tar::new()
                .dir("etc/", 0o755)
                .symlink("c", "/")
                .file("c/etc/x", b"x", 0o644),
        )
        .unwrap();
        assert_eq!(
            std::fs::read(root.join("etc/x")).unwrap(),
            b"x",
            "c/etc/x is the snapshot's /etc/x"
        );
        assert!(!outside.join("x").exists());
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"precious");
        assert_eq!(
            std::fs::metadata(outside.join("victim")).unwrap().nlink(),
            1
        );
        // Relative symlinks that stay inside are followed for parents.
        apply(
            &root,
            Tar::new()
                .dir("usr/lib/", 0o755)
                .symlink("lib", "usr/lib")
                .file("lib/libx.so", b"x", 0o644),
        )
        .unwrap();
        assert!(root.join("usr/lib/libx.so").is_file());
    }

    #[test]
    fn a_sparse_entry_larger_than_the_filesystem_is_refused_at_once() {
        let d = tmp();
        let mut h = tar::Header::new_gnu();
        h.set_path("huge").unwrap();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(512);
        {
            let g = h.as_gnu_mut().unwrap();
            let petabyte: u64 = 1 << 50;
            // GNU's base-256 form, for numbers beyond 11 octal digits.
            let octal = |v: u64, out: &mut [u8; 12]| {
                *out = [0; 12];
                out[0] = 0x80;
                out[4..].copy_from_slice(&v.to_be_bytes());
            };
            octal(petabyte - 512, &mut g.sparse[0].offset);
            octal(512, &mut g.sparse[0].numbytes);
            octal(petabyte, &mut g.realsize);
        }
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &[1u8; 512][..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let e = apply_layer(d.path(), &bytes[..], &|| false).unwrap_err();
        assert!(
            e.to_string().contains("larger than the whole filesystem"),
            "{e}"
        );
        assert!(!d.path().join("huge").exists());
    }

    #[test]
    fn truncated_and_cancelled_streams_fail() {
        let d = tmp();
        let mut t = Tar::new();
        t.file("f", &[7u8; 10_000], 0o644);
        let bytes = t.bytes();
        let e = apply_layer(d.path(), &bytes[..5_000], &|| false).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = apply_layer(d.path(), &bytes[..], &|| true).unwrap_err();
        assert!(matches!(e, Error::Interrupted), "{e}");
    }
}
