//! A dockerd of the test's own on a test containerd ([`super::containerd`]) whose proxy
//! snapshotter `thinsnap` is a test daemon: the containerd image store
//! (`"features": {"containerd-snapshotter": true}`) with `"storage-driver": "thinsnap"`, no
//! networking of its own (no iptables, no bridge), its data root, exec root, socket,
//! containers' cgroup and CLI configuration its own; driven with the `docker` CLI. On drop
//! its containers are killed and removed and it is stopped.

use std::{
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::json;

use super::{
    containerd::{find_program, root_is_rootfs, Containerd, SNAPSHOTTER},
    daemon::Daemon,
    mounts_under, scratch_dir,
};

/// The programs: Docker 26's daemon and CLI (Debian 13's `docker.io` and `docker-cli`).
pub const PROGRAMS: [&str; 2] = ["dockerd", "docker"];

/// Where dockerd finds the volume plugin `thinsnap` by itself: the socket docs/docker.md
/// configures. dockerd has no setting for its plugin directories, so the tests use it too.
pub const PLUGIN_SOCKET: &str = "/run/docker/plugins/thinsnap.sock";

/// Daemon configuration lines that serve the volume plugin on [`PLUGIN_SOCKET`], with the
/// volumes' mounts in the test's directory (see [`super::daemon::test_config`]).
pub const VOLUMES_CONFIG: &str =
    "[volumes]\nsocket = \"/run/docker/plugins/thinsnap.sock\"\nmount_dir = \"{dir}/volumes\"\n";

/// A test daemon that also serves the volume plugin where dockerd looks for it. Panics
/// when something else already answers there (a thinsnap of the host's own).
pub fn daemon() -> Daemon {
    daemon_with_pool(None)
}

/// [`daemon`] with the pool lines `pool` (see [`super::daemon::test_config`]).
pub fn daemon_with_pool(pool: Option<&str>) -> Daemon {
    if UnixStream::connect(PLUGIN_SOCKET).is_ok() {
        panic!(
            "a volume plugin already listens at {PLUGIN_SOCKET}; this test serves its own \
             there. Run it in the VM: `vagrant/test --test docker`."
        );
    }
    Daemon::start_custom(VOLUMES_CONFIG, pool)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running dockerd.
pub struct Dockerd {
    child: Option<Child>,
    docker: PathBuf,
    path: std::ffi::OsString,
    /// Data root, daemon.json, log and the CLI's configuration.
    pub dir: tempfile::TempDir,
    /// Exec root and API socket, in /run: the sockets dockerd makes under its exec root
    /// must have short paths.
    pub run: tempfile::TempDir,
    pub socket: PathBuf,
    /// The cgroup (v2) every container of this dockerd runs under: `cgroup-parent`.
    pub cgroup: String,
}

impl Dockerd {
    /// Starts dockerd on `containerd` with `"storage-driver": "thinsnap"` and waits until
    /// it answers. Panics, saying how to get them, when the programs are missing.
    pub fn start(containerd: &Containerd) -> Dockerd {
        Self::try_start(containerd, SNAPSHOTTER).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts dockerd with `"storage-driver": driver`; returns its log when it exits
    /// before it answers.
    pub fn try_start(containerd: &Containerd, driver: &str) -> Result<Dockerd, String> {
        let found: Vec<Option<PathBuf>> = PROGRAMS.iter().map(|p| find_program(p)).collect();
        let missing: Vec<&str> = PROGRAMS
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(p, _)| *p)
            .collect();
        if !missing.is_empty() {
            panic!(
                "this test needs Docker 26 (dockerd and docker, from Debian 13's docker.io and \
                 docker-cli), but {} are not on PATH.\n\
                 Run it in the VM, whose guest has them in /opt/tools/bin: \
                 `vagrant/test --test docker`; see docs/docker.md and docs/vm.md.",
                missing.join(", ")
            );
        }
        let found: Vec<PathBuf> = found.into_iter().flatten().collect();
        let dir = scratch_dir();
        let run = tempfile::Builder::new()
            .prefix("thinsnap-test-")
            .tempdir_in("/run")
            .unwrap();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let cgroup = format!("thinsnap-test-{}-{n}-docker", std::process::id());
        let config = dir.path().join("daemon.json");
        // What docs/docker.md configures, plus what a machine without networking needs.
        let daemon_json = json!({
            "features": {"containerd-snapshotter": true},
            "storage-driver": driver,
            "iptables": false,
            "ip6tables": false,
            "bridge": "none",
            "cgroup-parent": format!("/{cgroup}"),
        });
        std::fs::write(&config, serde_json::to_vec_pretty(&daemon_json).unwrap()).unwrap();
        let socket = run.path().join("docker.sock");
        let log = std::fs::File::create(dir.path().join("dockerd.log")).unwrap();
        let mut cmd = Command::new(&found[0]);
        cmd.arg("--config-file")
            .arg(&config)
            .arg("--containerd")
            .arg(&containerd.socket)
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(run.path().join("exec"))
            .arg("--pidfile")
            .arg(run.path().join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .env("PATH", &containerd.path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if root_is_rootfs() {
            // The initramfs's / cannot be left with pivot_root(2): runc moves the
            // container's root over it and chroots (what `ctr run --no-pivot` does).
            cmd.env("DOCKER_RAMDISK", "true");
        }
        let child = cmd.spawn().unwrap();
        let mut d = Dockerd {
            child: Some(child),
            docker: found[1].clone(),
            path: containerd.path.clone(),
            dir,
            run,
            socket,
            cgroup,
        };
        let start = Instant::now();
        loop {
            if d.socket.exists() && d.docker(&["version"]).status.success() {
                return Ok(d);
            }
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                d.child = None;
                return Err(format!("dockerd exited with {status}:\n{}", d.log_tail()));
            }
            if start.elapsed() > Duration::from_secs(120) {
                return Err(format!(
                    "dockerd did not answer within 120 s:\n{}",
                    d.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last lines of dockerd's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Runs the docker CLI on this dockerd.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new(&self.docker)
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env("PATH", &self.path)
            .env("DOCKER_CONFIG", self.dir.path().join("cli"))
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

    /// `docker run --network none ARGS...` (no network: the VM guest has none to give);
    /// returns its output.
    pub fn run(&self, args: &[&str]) -> String {
        let mut all = vec!["run", "--network", "none"];
        all.extend(args);
        self.ok(&all)
    }

    /// Kills every process of this dockerd's containers (cgroup v2's cgroup.kill) and waits
    /// until they are gone.
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

impl Drop for Dockerd {
    fn drop(&mut self) {
        // Containers first, so that dockerd removes them with their snapshots and
        // releases their volumes.
        self.kill_containers();
        if let Some(mut child) = self.child.take() {
            let ids = String::from_utf8_lossy(&self.docker(&["ps", "-aq"]).stdout).into_owned();
            for id in ids.split_whitespace() {
                let _ = self.docker(&["rm", "-f", id]);
            }
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(30)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in [self.dir.path(), self.run.path()] {
            for m in mounts_under(dir).into_iter().rev() {
                let _ = thinpool::fs::umount(&m);
            }
        }
        let cg = Path::new("/sys/fs/cgroup").join(&self.cgroup);
        for e in std::fs::read_dir(&cg).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&cg);
    }
}
