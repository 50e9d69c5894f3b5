//! The benchmark's three parties: a thinsnap daemon on its loopback pool, a dm thin-pool of
//! the same size and table for containerd's devmapper snapshotter (made with dmsetup, as
//! containerd's docs do), and one containerd that serves devmapper, thinsnap (as a proxy
//! snapshotter) and overlayfs side by side.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use thinpool::loopback::{self, LoopFile};

/// The snapshotter name containerd knows thinsnap by.
pub const THINSNAP: &str = "thinsnap";
/// containerd's built-in device-mapper snapshotter.
pub const DEVMAPPER: &str = "devmapper";

/// `/proc/PID/status` field `name` (VmRSS, VmHWM) in KiB; 0 when unreadable.
pub fn status_kib(pid: u32, name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// `name` on PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn check(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for_socket(socket: &Path, child: &mut Child, log: &Path, what: &str) -> Result<()> {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status}; see {}", log.display());
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("{what} did not listen within 120 s; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while matches!(child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sizes and pool options both pools share.
pub struct PoolSpec {
    /// Data file size in bytes.
    pub data_size: u64,
    /// Metadata file size in bytes.
    pub metadata_size: u64,
    /// Thin device (filesystem) size: thinsnap's default_size, devmapper's base_image_size.
    pub base_size: u64,
    /// Whether the pools zero newly provisioned blocks.
    pub zero_new_blocks: bool,
}

/// A `thinsnap serve` on a loopback pool of its own, logging each request's duration.
pub struct Thinsnap {
    child: Child,
    bin: PathBuf,
    config: PathBuf,
    /// Its socket.
    pub socket: PathBuf,
    /// Its log (stderr), with a `done ms=...` line per request.
    pub log: PathBuf,
    /// Its pool's dm name.
    pub pool_dm_name: String,
}

impl Thinsnap {
    /// Starts `bin serve` with its state under `dir` and waits until it listens.
    pub fn start(bin: &Path, dir: &Path, spec: &PoolSpec) -> Result<Thinsnap> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("thinsnap.sock");
        let config = dir.join("config.toml");
        let pool = "cbench";
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{d}/state\"\nsocket = \"{s}\"\ndefault_size = \"{base}\"\n\
                 [pool]\nname = \"{pool}\"\nzero_new_blocks = {zero}\n\
                 [pool.loopback]\ndata_size = \"{data}\"\nmetadata_size = \"{meta}\"\n",
                d = dir.display(),
                s = socket.display(),
                base = spec.base_size,
                zero = spec.zero_new_blocks,
                data = spec.data_size,
                meta = spec.metadata_size,
            ),
        )?;
        let log = dir.join("thinsnap.log");
        let err = File::create(&log)?;
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            // Each request's duration (`done ms=`) is logged at debug by thinsnap::service;
            // with THINSNAP_LOG_SPANS each step's too (the thinpool spans are at debug).
            .args([
                "--log",
                "info,thinsnap::service=debug,thinpool=debug",
                "serve",
            ])
            .env("THINSNAP_LOG_SPANS", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(err.try_clone()?)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        wait_for_socket(&socket, &mut child, &log, "thinsnap serve")?;
        Ok(Thinsnap {
            child,
            bin: bin.to_path_buf(),
            config,
            socket,
            log,
            pool_dm_name: format!("thinsnap-{pool}-pool"),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the daemon and destroys its pool.
    pub fn stop(mut self) -> Result<()> {
        terminate(&mut self.child);
        check(
            "thinsnap pool destroy",
            Command::new(&self.bin)
                .arg("--config")
                .arg(&self.config)
                .args(["pool", "destroy", "--force"])
                .output()?,
        )?;
        Ok(())
    }
}

/// A dm thin-pool for containerd's devmapper snapshotter, on two loop files of the same
/// sizes as thinsnap's, with the table of thinsnap's pool (same block size, low water mark
/// and features).
pub struct DevmapperPool {
    /// Its dm name (the snapshotter's `pool_name`).
    pub name: String,
    dmsetup: PathBuf,
    loops: Vec<LoopFile>,
}

/// Runs dmsetup without udev: libdevmapper then makes the /dev/mapper nodes itself.
pub fn dmsetup(dmsetup: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(dmsetup)
        .args(args)
        .env("DM_DISABLE_UDEV", "1")
        .output()
        .with_context(|| format!("cannot run {}", dmsetup.display()))?;
    check(&format!("dmsetup {}", args.join(" ")), out)
}

impl DevmapperPool {
    /// Creates the pool `name` on files in `dir`, copying the table of dm device
    /// `like` (thinsnap's pool) except its devices.
    pub fn create(
        dmsetup_bin: &Path,
        dir: &Path,
        name: &str,
        like: &str,
        spec: &PoolSpec,
    ) -> Result<DevmapperPool> {
        std::fs::create_dir_all(dir)?;
        let meta_file = dir.join("metadata");
        let data_file = dir.join("data");
        loopback::create_sparse(&meta_file, spec.metadata_size)?;
        loopback::create_sparse(&data_file, spec.data_size)?;
        let meta = loopback::attach(&meta_file, true)?;
        let data = loopback::attach(&data_file, true)?;
        let mut pool = DevmapperPool {
            name: name.to_string(),
            dmsetup: dmsetup_bin.to_path_buf(),
            loops: vec![meta.clone(), data.clone()],
        };
        // "0 <len> thin-pool <meta> <data> <block> <low water> <n> <features...>"
        let table = dmsetup(dmsetup_bin, &["table", like])?;
        let mut f: Vec<String> = table.split_whitespace().map(String::from).collect();
        if f.len() < 8 || f[2] != "thin-pool" {
            bail!("{like} is not a thin-pool: {table}");
        }
        f[3] = meta.dev_path.display().to_string();
        f[4] = data.dev_path.display().to_string();
        let table = f.join(" ");
        eprintln!("devmapper pool {name}: {table}");
        if let Err(e) = dmsetup(dmsetup_bin, &["create", name, "--table", &table]) {
            pool.loops.retain(|l| l.detach().is_err());
            return Err(e);
        }
        if !Path::new("/dev/mapper").join(name).exists() {
            bail!("dmsetup created {name} but not /dev/mapper/{name}");
        }
        Ok(pool)
    }

    /// Removes every device of the pool (`<name>-snap-*`), the pool, and its loop devices.
    pub fn destroy(self) -> Result<()> {
        let ls = dmsetup(&self.dmsetup, &["ls"]).unwrap_or_default();
        let prefix = format!("{}-snap-", self.name);
        for dev in ls
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&prefix))
        {
            if let Err(e) = dmsetup(&self.dmsetup, &["remove", "--force", dev]) {
                eprintln!("containerd-bench: {e:#}");
            }
        }
        dmsetup(&self.dmsetup, &["remove", &self.name])?;
        for l in &self.loops {
            l.detach()?;
        }
        Ok(())
    }
}

/// Whether / is the initramfs's rootfs, which pivot_root(2) cannot leave: runc then needs
/// `ctr run --no-pivot` (as in tests/common/containerd.rs).
pub fn root_is_rootfs() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some("/"))
        .any(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("rootfs "))
        })
}

/// One containerd with the devmapper snapshotter on its own pool, thinsnap as proxy
/// snapshotter `thinsnap`, and its built-in overlayfs.
pub struct Containerd {
    child: Child,
    ctr: PathBuf,
    path: std::ffi::OsString,
    /// Its gRPC socket.
    pub socket: PathBuf,
    /// Its log.
    pub log: PathBuf,
    /// The namespace everything runs in.
    pub namespace: String,
}

impl Containerd {
    /// Starts containerd with its root, state and socket under `dir`.
    pub fn start(
        dir: &Path,
        devmapper_pool: Option<&str>,
        thinsnap_socket: &Path,
        spec: &PoolSpec,
        dmsetup_dir: &Path,
    ) -> Result<Containerd> {
        let containerd = find_program("containerd").context(
            "containerd is not on PATH: run this in the VM (vagrant/bench-containerd), \
             whose guest has containerd 1.6 in /opt/tools/bin",
        )?;
        let ctr = find_program("ctr").context("ctr is not on PATH")?;
        std::fs::create_dir_all(dir)?;
        let d = dir.display();
        let mut disabled = vec![
            "io.containerd.grpc.v1.cri",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
        ];
        let devmapper = match devmapper_pool {
            Some(pool) => format!(
                r#"
[plugins."io.containerd.snapshotter.v1.devmapper"]
  root_path = "{d}/devmapper"
  pool_name = "{pool}"
  base_image_size = "{base}B"
  async_remove = false
  discard_blocks = true
  fs_type = "ext4"
"#,
                base = spec.base_size
            ),
            None => {
                disabled.push("io.containerd.snapshotter.v1.devmapper");
                String::new()
            }
        };
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = {disabled:?}

[grpc]
  address = "{d}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
{devmapper}
[proxy_plugins.{THINSNAP}]
  type = "snapshot"
  address = "{sock}"
"#,
                sock = thinsnap_socket.display()
            ),
        )?;
        // The shim and runc are found on containerd's PATH, and so are the devmapper
        // snapshotter's dmsetup, blkdiscard and mkfs.ext4.
        let mut dirs = vec![
            dmsetup_dir.to_path_buf(),
            containerd.parent().unwrap().to_path_buf(),
        ];
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let path = std::env::join_paths(dirs)?;
        let log = dir.join("containerd.log");
        let out = File::create(&log)?;
        let mut child = Command::new(&containerd)
            .arg("--config")
            .arg(&config)
            .args(["--log-level", "info"])
            .env("PATH", &path)
            // No udev in the guest: libdevmapper (in the snapshotter's dmsetup processes)
            // creates and removes the /dev/mapper nodes itself instead of waiting for udev.
            .env("DM_DISABLE_UDEV", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("cannot start containerd")?;
        let socket = dir.join("containerd.sock");
        wait_for_socket(&socket, &mut child, &log, "containerd")?;
        let c = Containerd {
            child,
            ctr,
            path,
            socket,
            log,
            namespace: "cbench".into(),
        };
        // The socket exists before every plugin has loaded.
        let start = Instant::now();
        while !c.ctr(&["version"])?.status.success() {
            if start.elapsed() > Duration::from_secs(120) {
                bail!("containerd does not answer; see {}", c.log.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(c)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `ctr` on this containerd in the bench's namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", &self.namespace, "--timeout", "3600s"])
            .args(args)
            .env("PATH", &self.path)
            .stdin(Stdio::null())
            .output()
            .context("cannot run ctr")
    }

    /// Runs `ctr` and returns its standard output, or an error with its output.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        check(&format!("ctr {}", args.join(" ")), self.ctr(args)?)
    }

    /// Status of snapshotter plugin `name` in `ctr plugins ls` ("ok", "error", "skip").
    pub fn plugin_status(&self, name: &str) -> Result<String> {
        let out = self.ok(&["plugins", "ls"])?;
        Ok(out
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() >= 4 && f[0] == "io.containerd.snapshotter.v1" && f[1] == name)
            .map(|f| f[3].to_string())
            .unwrap_or_else(|| "absent".into()))
    }

    /// Lines of its log that mention `what`.
    pub fn log_lines(&self, what: &str) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(what))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops containerd.
    pub fn stop(mut self) {
        terminate(&mut self.child);
    }
}
