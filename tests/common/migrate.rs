//! What the tests of `thinsnap migrate docker-devicemapper` share: the CLI on a
//! configuration, the migration's crash points, and a fingerprint of Docker's files.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::Path,
    process::{Command, Output},
};

/// The migration's crash points (THINSNAP_FAILPOINT), in the order a run reaches them.
pub const CRASH_POINTS: [&str; 5] = [
    "migrate.after-deactivate",
    "migrate.after-delete",
    "migrate.after-record",
    "migrate.after-stage",
    "migrate.after-flatten",
];

/// Whether a run killed at `point` had recorded the migration in the store already.
pub fn recorded_at(point: &str) -> bool {
    !matches!(point, "migrate.after-deactivate" | "migrate.after-delete")
}

/// `thinsnap --config CONFIG ARGS...`.
pub fn thinsnap(config: &Path, args: &[&str]) -> Output {
    thinsnap_env(config, args, &[])
}

/// `thinsnap --config CONFIG ARGS...` with extra environment (THINSNAP_FAILPOINT).
pub fn thinsnap_env(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thinsnap"))
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `thinsnap migrate docker-devicemapper --root ROOT [--dry-run] EXTRA...`.
pub fn migrate(config: &Path, root: &Path, dry_run: bool, extra: &[&str]) -> Output {
    let mut args = vec![
        "migrate",
        "docker-devicemapper",
        "--root",
        root.to_str().unwrap(),
    ];
    if dry_run {
        args.push("--dry-run");
    }
    args.extend(extra);
    thinsnap(config, &args)
}

/// The standard output of a command that must succeed.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The standard error of a command that must fail.
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// `thinsnap serve` on `config` must exit at once with an error; returns its stderr.
pub fn serve_refuses(config: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinsnap"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                !status.success(),
                "serve started on an unfinished migration"
            );
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return err;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("serve did not refuse to start on an unfinished migration");
}

/// Every file under Docker's data root `root` with its content's hash (the loopback pool's
/// large, sparse data file by size and mtime): what a dry run must not change. Without
/// `inactive_pool`, the pool's files are only listed: a live pool writes them by itself.
pub fn root_files(root: &Path, inactive_pool: bool) -> BTreeMap<String, String> {
    fn walk(dir: &Path, base: &Path, meta: bool, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.insert(format!("{rel}/"), String::new());
                walk(&p, base, meta, out);
            } else if m.is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.insert(rel, format!("-> {}", target.display()));
            } else if rel.starts_with("devicemapper/devicemapper/") && !meta {
                out.insert(rel, String::new());
            } else if rel.ends_with("devicemapper/data") {
                out.insert(
                    rel,
                    format!("size {} mtime {}.{}", m.len(), m.mtime(), m.mtime_nsec()),
                );
            } else if rel.ends_with("devicemapper/metadata") {
                out.insert(rel, sparse_sha256(&p));
            } else if m.is_file() {
                out.insert(rel, super::sha256_file(&p));
            } else {
                out.insert(rel, format!("mode {:o}", m.mode()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, inactive_pool, &mut out);
    out
}

/// The extents of `file` that hold data (`SEEK_DATA`/`SEEK_HOLE`): offset and length.
pub fn data_extents(file: &std::fs::File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let len = file.metadata().unwrap().len() as i64;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < len {
        // SAFETY: lseek on an open descriptor; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after pos
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(
            hole > data,
            "lseek SEEK_HOLE: {}",
            std::io::Error::last_os_error()
        );
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    out
}

/// sha256 of a sparse file's size and data extents (offset and bytes), reading only those.
pub fn sparse_sha256(path: &Path) -> String {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    h.update(f.metadata().unwrap().len().to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for (off, len) in data_extents(&f) {
        h.update(off.to_le_bytes());
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], off + done).unwrap();
            h.update(&buf[..n]);
            done += n as u64;
        }
    }
    format!("{:x}", h.finalize())
}
