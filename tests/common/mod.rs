//! Shared fixtures of the real device-mapper tests: a check that dm is there (failing loudly
//! with the command to use when it is not), unique pools that clean up after themselves,
//! and leak checks for dm devices, loop devices and mounts.
#![allow(dead_code)]

pub mod containerd;
pub mod daemon;
pub mod docker;
pub mod dockerd;
pub mod dockerd_dm;
pub mod image;
pub mod migrate;
pub mod registry;
pub mod tree;
pub mod volume;

use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use thinpool::{
    units::{GIB, MIB},
    PoolName, PoolOptions, RemoveMode, Source, ThinPool,
};

/// Panics with instructions unless this process can use device-mapper thin pools.
pub fn require_dm() {
    let why = if !nix::unistd::Uid::effective().is_root() {
        Some("it must run as root".to_string())
    } else if !Path::new("/dev/mapper/control").exists() {
        Some("/dev/mapper/control does not exist (no dm_mod in this kernel)".to_string())
    } else if let Err(e) = thinpool::dm::get() {
        Some(e.to_string())
    } else {
        None
    };
    if let Some(why) = why {
        panic!(
            "this test needs real device-mapper and {why}.\n\
             Run the whole suite in the VM with `vagrant/test`, or this test with\n\
             `vagrant/test -- --test <file> <name>`; see docs/vm.md."
        );
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique pool name for this test process: `t<pid>_<n>`.
pub fn unique_pool_name() -> PoolName {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    PoolName::new(&format!("t{}_{n}", std::process::id())).unwrap()
}

/// Where tests keep their files: on the VM's scratch disk (`THINSNAP_SCRATCH`), so loop
/// files sit on a real block device; elsewhere /var/tmp.
pub fn scratch_dir() -> tempfile::TempDir {
    let base = std::env::var_os("THINSNAP_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    tempfile::Builder::new()
        .prefix("thinsnap-test-")
        .tempdir_in(base)
        .unwrap()
}

/// A loopback pool in its own directory; on drop, unmounts what tests mounted under the
/// directory, deactivates the pool's thin devices, tears the pool down, and asserts that
/// nothing is left (unless THINSNAP_KEEP_TEST_DEVICES=1).
pub struct TestPool {
    pub pool: Option<ThinPool>,
    pub name: PoolName,
    pub dir: tempfile::TempDir,
}

impl TestPool {
    /// A fresh loopback pool with `data` bytes of data space and 64 MiB of metadata.
    pub fn new(data: u64) -> TestPool {
        Self::with_options(data, PoolOptions::default())
    }

    /// A fresh loopback pool with `opts`.
    pub fn with_options(data: u64, opts: PoolOptions) -> TestPool {
        require_dm();
        let dir = scratch_dir();
        let name = unique_pool_name();
        let source = Source::Loopback {
            dir: dir.path().join("pool"),
            data_size: data,
            meta_size: 64 * MIB,
        };
        let pool = ThinPool::open(&name, &source, &opts).expect("open loopback pool");
        TestPool {
            pool: Some(pool),
            name,
            dir,
        }
    }

    /// A fresh 2 GiB loopback pool.
    pub fn small() -> TestPool {
        Self::new(2 * GIB)
    }

    pub fn pool(&self) -> &ThinPool {
        self.pool.as_ref().unwrap()
    }

    /// A new empty directory under the pool's directory, for mount points.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("mnt").join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        if std::env::var_os("THINSNAP_KEEP_TEST_DEVICES").is_some() {
            let _ = self.pool.take().map(std::mem::forget);
            return;
        }
        for m in mounts_under(self.dir.path()).into_iter().rev() {
            let _ = thinpool::fs::umount(&m);
        }
        if let Some(pool) = self.pool.take() {
            for (id, _, _) in pool.active_thins().unwrap_or_default() {
                let _ = pool.deactivate(id, RemoveMode::Now);
            }
            let res = pool.teardown();
            if !std::thread::panicking() {
                res.expect("pool teardown");
                assert_nothing_left(&self.name, self.dir.path());
            }
        }
    }
}

/// Mount points at or under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// What is left in the private mount directory of the daemon in test directory `dir`
/// (`<dir>/run/mnt`, where every temporary mount goes: grows, base tidying, imports,
/// exports): its entries, mounted or not.
pub fn private_mounts(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir.join("run/mnt")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    }
}

/// dm devices whose names start with `thinsnap-<pool>-`.
pub fn dm_devices_of(pool: &PoolName) -> Vec<String> {
    let prefix = format!("thinsnap-{pool}-");
    thinpool::dm::list()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n.to_string())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Loop devices whose backing file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) {
            if Path::new(b.trim()).starts_with(dir) {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// Asserts that no dm device of `pool`, loop device over `dir` or mount under `dir` is left.
pub fn assert_nothing_left(pool: &PoolName, dir: &Path) {
    assert_eq!(
        dm_devices_of(pool),
        Vec::<String>::new(),
        "dm devices left behind"
    );
    assert_eq!(
        loops_under(dir),
        Vec::<String>::new(),
        "loop devices left behind"
    );
    assert_eq!(
        mounts_under(dir),
        Vec::<PathBuf>::new(),
        "mounts left behind"
    );
}

/// Writes `len` bytes of a pattern seeded by `seed` to `path` and returns its sha256.
pub fn write_pattern(path: &Path, len: usize, seed: u64) -> String {
    let mut data = vec![0u8; len];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    let mut f = fs::File::create(path).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    sha256(&data)
}

/// sha256 of the file at `path`.
pub fn sha256_file(path: &Path) -> String {
    let mut data = Vec::new();
    fs::File::open(path)
        .unwrap()
        .read_to_end(&mut data)
        .unwrap();
    sha256(&data)
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

/// Writes `len` bytes to block device `dev` at `offset` with direct I/O, in 1 MiB writes,
/// returning the first error.
pub fn write_direct(dev: &Path, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const CHUNK: usize = 1 << 20;
    let mut storage = vec![0u8; CHUNK + 4096];
    let start = storage.as_ptr().align_offset(4096);
    let buf = &mut storage[start..start + CHUNK];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    let mut done = 0;
    while done < len {
        f.write_all_at(buf, offset + done)?;
        done += 1 << 20;
    }
    Ok(())
}

/// Free bytes of the filesystem mounted at `path`.
pub fn fs_size(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    s.blocks() as u64 * s.fragment_size() as u64
}
