//! A real Docker 20.10 on its devicemapper graph driver: Debian 12's `docker.io` (dockerd and
//! docker, which the VM's tools disk has in [`BIN_DIR`]), with its data root where the test
//! says, its exec root, socket and CLI configuration in /run, its containers' cgroup its own,
//! on a containerd 1.6 of its own ([`Containerd::start_plain`], the guest's containerd and
//! runc, as Debian's docker.service uses the system containerd; dockerd's own managed
//! containerd does not start within its 10 s under emulation). No udev in the guest: `DM_DISABLE_UDEV=1` (libdevmapper makes
//! the /dev/mapper nodes itself) and `dm.override_udev_sync_check=true`. No networking of its
//! own (no iptables, no bridge). On drop a dockerd still running is stopped, and what a
//! dockerd that did not stop cleanly left behind (its dm devices, loop devices, mounts) is
//! removed.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::json;

use super::{
    containerd::{root_is_rootfs, Containerd},
    loops_under, mounts_under,
};

/// Where the VM's tools disk has Docker 20.10's dockerd and docker (vagrant/vm).
pub const BIN_DIR: &str = "/opt/tools/docker-20.10/bin";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A dockerd 20.10 with `"storage-driver": "devicemapper"`.
pub struct DockerdDm {
    child: Option<Child>,
    /// The containerd it runs containers on; stopped after dockerd.
    containerd: Option<Containerd>,
    /// Its data root (`/var/lib/docker` on a real install).
    pub root: PathBuf,
    /// Exec root, socket, pid file, log and CLI configuration: the sockets dockerd makes
    /// under its exec root must have short paths.
    pub run: tempfile::TempDir,
    pub socket: PathBuf,
    /// The cgroup (v2) every container of this dockerd runs under: `cgroup-parent`.
    pub cgroup: String,
    /// Whether dockerd stopped by itself, cleanly, and took its devices down: then Drop
    /// leaves everything under `root` alone (it may be thinsnap's by then).
    stopped: bool,
}

/// The prefix of Docker's dm names for a data root: `docker-<major>:<minor>-<inode>` of its
/// `devicemapper` directory.
pub fn dm_prefix(root: &Path) -> String {
    let st = std::fs::metadata(root.join("devicemapper")).unwrap();
    let dev = st.dev();
    let (major, minor) = ((dev >> 8) & 0xfff, (dev & 0xff) | ((dev >> 12) & 0xfff00));
    format!("docker-{major}:{minor}-{}", st.ino())
}

/// Panics, saying how to get them, unless this process has real device-mapper and Docker
/// 20.10 is in [`BIN_DIR`] (the VM's tools disk).
pub fn require() {
    super::require_dm();
    if !Path::new(BIN_DIR).join("dockerd").is_file() || !Path::new(BIN_DIR).join("docker").is_file()
    {
        panic!(
            "this test needs Docker 20.10 with its devicemapper driver (Debian 12's docker.io) \
             in {BIN_DIR}, which the VM's tools disk has: run it in the VM, \
             `vagrant/test --test docker_migrate`; see docs/vm.md."
        );
    }
}

impl DockerdDm {
    /// Starts dockerd on data root `root` with `"storage-opts": opts` after
    /// `dm.override_udev_sync_check=true`, and waits until it answers (its first start makes
    /// the pool and formats the base device: tens of seconds under emulation). Panics, saying
    /// how to get it, when Docker 20.10 is not there.
    pub fn start(root: &Path, opts: &[&str]) -> DockerdDm {
        require();
        let dockerd = Path::new(BIN_DIR).join("dockerd");
        let run = tempfile::Builder::new()
            .prefix("thinsnap-test-")
            .tempdir_in("/run")
            .unwrap();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let cgroup = format!("thinsnap-test-{}-{n}-docker20", std::process::id());
        let mut storage_opts = vec!["dm.override_udev_sync_check=true"];
        storage_opts.extend(opts);
        // The daemon.json of docs/docker.md's devicemapper setups, plus what a machine
        // without networking needs.
        let daemon_json = json!({
            "storage-driver": "devicemapper",
            "storage-opts": storage_opts,
            "iptables": false,
            "ip-masq": false,
            "bridge": "none",
            "cgroup-parent": format!("/{cgroup}"),
        });
        let config = run.path().join("daemon.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&daemon_json).unwrap()).unwrap();
        let socket = run.path().join("docker.sock");
        let log = std::fs::File::create(run.path().join("dockerd.log")).unwrap();
        let containerd = Containerd::start_plain();
        let mut cmd = Command::new(&dockerd);
        cmd.arg("--config-file")
            .arg(&config)
            .arg("--containerd")
            .arg(&containerd.socket)
            .arg("--data-root")
            .arg(root)
            .arg("--exec-root")
            .arg(run.path().join("exec"))
            .arg("--pidfile")
            .arg(run.path().join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .env("DM_DISABLE_UDEV", "1")
            .env("PATH", &containerd.path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if root_is_rootfs() {
            // The initramfs's / cannot be left with pivot_root(2) (docs/vm.md).
            cmd.env("DOCKER_RAMDISK", "true");
        }
        let mut d = DockerdDm {
            child: Some(cmd.spawn().unwrap()),
            containerd: Some(containerd),
            root: root.to_path_buf(),
            run,
            socket,
            cgroup,
            stopped: false,
        };
        let start = Instant::now();
        loop {
            if d.socket.exists() && d.docker(&["version"]).status.success() {
                return d;
            }
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                d.child = None;
                panic!("dockerd 20.10 exited with {status}:\n{}", d.log_tail());
            }
            if start.elapsed() > Duration::from_secs(300) {
                panic!(
                    "dockerd 20.10 did not answer within 300 s:\n{}",
                    d.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The last lines of dockerd's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.run.path().join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// dockerd's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Runs the docker CLI (20.10) on this dockerd.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new(Path::new(BIN_DIR).join("docker"))
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env("DOCKER_CONFIG", self.run.path().join("cli"))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs the docker CLI and returns its standard output; panics with its output and
    /// dockerd's log when it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {} failed ({}):\n{}{}\ndockerd's log:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The prefix of this dockerd's dm names.
    pub fn prefix(&self) -> String {
        dm_prefix(&self.root)
    }

    /// Names of the active dm devices that are Docker's (its prefix).
    pub fn active_devices(&self) -> Vec<String> {
        let prefix = format!("{}-", self.prefix());
        thinpool::dm::list()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n.to_string())
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }

    /// `systemctl stop docker`: SIGTERM, and dockerd must exit successfully within 120 s,
    /// having unmounted and deactivated every device of its own (a loopback pool with its
    /// loop devices; a `dm.thinpooldev` pool is not its own and stays).
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("dockerd is running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dockerd did not stop within 120 s:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            status.success(),
            "dockerd exit: {status}\n{}",
            self.log_tail()
        );
        assert_eq!(
            mounts_under(&self.root),
            Vec::<PathBuf>::new(),
            "dockerd left mounts"
        );
        let active = self.active_devices();
        let loops = loops_under(&self.root);
        assert!(
            active.is_empty() && loops.is_empty(),
            "dockerd left dm devices {active:?} and loop devices {loops:?}"
        );
        self.stopped = true;
        self.containerd = None;
    }

    /// Kills every process of this dockerd's containers (cgroup v2's cgroup.kill).
    fn kill_containers(&self) {
        let cg = Path::new("/sys/fs/cgroup").join(&self.cgroup);
        if !cg.exists() {
            return;
        }
        let _ = std::fs::write(cg.join("cgroup.kill"), "1");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let events = std::fs::read_to_string(cg.join("cgroup.events")).unwrap_or_default();
            if !events.contains("populated 1") {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for DockerdDm {
    fn drop(&mut self) {
        self.kill_containers();
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(60)
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.containerd = None;
        let cg = Path::new("/sys/fs/cgroup").join(&self.cgroup);
        for e in std::fs::read_dir(&cg).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&cg);
        for m in mounts_under(self.run.path()).into_iter().rev() {
            let _ = thinpool::fs::umount(&m);
        }
        if self.stopped || std::env::var_os("THINSNAP_KEEP_TEST_DEVICES").is_some() {
            return;
        }
        // A dockerd that did not stop cleanly: its mounts, thin devices, pool, loop devices.
        for m in mounts_under(&self.root).into_iter().rev() {
            let _ = thinpool::fs::umount(&m);
        }
        if !self.root.join("devicemapper").exists() {
            return;
        }
        let pool = format!("{}-pool", self.prefix());
        let mut names = self.active_devices();
        names.sort_by_key(|n| *n == pool);
        for n in names {
            let _ = thinpool::dm::remove(
                &thinpool::DmNameBuf::new(n).unwrap(),
                thinpool::RemoveMode::Now,
            );
        }
        for l in loops_under(&self.root) {
            let _ = Command::new("losetup")
                .args(["-d", &format!("/dev/{l}")])
                .status();
        }
    }
}
