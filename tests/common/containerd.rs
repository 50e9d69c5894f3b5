//! A containerd of the test's own (root, state, socket and namespace in a scratch
//! directory) with a test daemon registered as its proxy snapshotter `thinsnap`, driven
//! with `ctr`; on drop its containers, shims and mounts are gone.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use super::{daemon::Daemon, mounts_under, scratch_dir};

/// The programs running containers takes: containerd 1.6, its client, its runc shim, runc.
pub const PROGRAMS: [&str; 4] = ["containerd", "ctr", "containerd-shim-runc-v2", "runc"];

/// The name containerd knows the test daemon by (`--snapshotter thinsnap`).
pub const SNAPSHOTTER: &str = "thinsnap";

/// `name` on PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether / is the initramfs's rootfs, which pivot_root(2) cannot leave (EINVAL): runc
/// then has to move the container's root over / and chroot (`ctr run --no-pivot`).
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

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running containerd.
pub struct Containerd {
    child: Option<Child>,
    ctr: PathBuf,
    /// PATH containerd runs with: its programs' directories first.
    pub path: std::ffi::OsString,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    /// The containerd namespace the test works in: `thinsnap-test-<pid>-<n>`, or CRI's
    /// `k8s.io`.
    pub namespace: String,
    /// The cgroup (under /sys/fs/cgroup) the containers' cgroups are in: the namespace's
    /// for `ctr`, the pods' parent for CRI.
    pub cgroup: String,
}

/// containerd's CRI plugin, for [`Containerd::start_cri`].
pub struct Cri {
    /// The pause image the plugin starts pod sandboxes from (imported by the test).
    pub sandbox_image: String,
}

/// The namespace containerd's CRI plugin keeps its images and containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";

impl Containerd {
    /// Starts containerd with `daemon` as its proxy snapshotter and waits until it answers.
    /// Panics, saying how to get them, when the programs are missing.
    pub fn start(daemon: &Daemon) -> Containerd {
        Self::start_with(Some(&daemon.socket), None)
    }

    /// Starts containerd with no proxy snapshotter (for a dockerd with a graphdriver of its
    /// own, which uses containerd only to run containers).
    pub fn start_plain() -> Containerd {
        Self::start_with(None, None)
    }

    /// Starts containerd with its CRI plugin serving kubelet's API on its socket, with
    /// thinsnap as the pods' snapshotter, and no CNI (pods use the node's network).
    pub fn start_cri(daemon: &Daemon, cri: &Cri) -> Containerd {
        Self::start_with(Some(&daemon.socket), Some(cri))
    }

    fn start_with(proxy: Option<&Path>, cri: Option<&Cri>) -> Containerd {
        let found: Vec<Option<PathBuf>> = PROGRAMS.iter().map(|p| find_program(p)).collect();
        let missing: Vec<&str> = PROGRAMS
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(p, _)| *p)
            .collect();
        if !missing.is_empty() {
            panic!(
                "this test needs containerd 1.6 and runc, but {} are not on PATH.\n\
                 Run it in the VM, whose guest has them in /opt/tools/bin: \
                 `vagrant/test --test containerd`;\n\
                 on a Debian 12 host: `apt-get install containerd runc`. See docs/vm.md.",
                missing.join(", ")
            );
        }
        let found: Vec<PathBuf> = found.into_iter().flatten().collect();
        // The shim and runc are found on containerd's PATH.
        let mut dirs: Vec<PathBuf> = found
            .iter()
            .map(|p| p.parent().unwrap().to_path_buf())
            .collect();
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        dirs.dedup();
        let path = std::env::join_paths(dirs).unwrap();

        let dir = scratch_dir();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("containerd.toml");
        let d = dir.path().display();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let (namespace, cgroup) = match cri {
            None => {
                let ns = format!("thinsnap-test-{}-{n}", std::process::id());
                (ns.clone(), ns)
            }
            Some(_) => (
                CRI_NAMESPACE.to_string(),
                format!("thinsnap-cri-{}-{n}", std::process::id()),
            ),
        };
        // The snapshotters this kernel lacks; CRI, unless asked for, would look for CNI.
        let mut disabled = vec![
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.zfs",
        ];
        let cri_section = match cri {
            None => {
                disabled.insert(0, "io.containerd.grpc.v1.cri");
                String::new()
            }
            // Kubernetes' defaults but for what a test needs: snapshotter thinsnap, its own
            // sandbox image, stats every second (kubelet's default period is 10 s), CNI
            // directories of its own that stay empty (host-network pods need no CNI), and
            // runc without pivot_root where / is the initramfs.
            Some(cri) => format!(
                r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  stats_collect_period = 1
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{SNAPSHOTTER}"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        NoPivotRoot = {no_pivot}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/net.d"
"#,
                image = cri.sandbox_image,
                no_pivot = root_is_rootfs(),
            ),
        };
        let disabled: Vec<String> = disabled.iter().map(|p| format!("{p:?}")).collect();
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [{disabled}]

[grpc]
  address = "{d}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
{proxy}{cri_section}"#,
                disabled = disabled.join(", "),
                proxy = match proxy {
                    Some(sock) => format!(
                        "\n[proxy_plugins.{SNAPSHOTTER}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                        sock.display()
                    ),
                    None => String::new(),
                }
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new(&found[0])
            .arg("--config")
            .arg(&config)
            .arg("--log-level")
            .arg("debug")
            .env("PATH", &path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut c = Containerd {
            child: Some(child),
            ctr: found[1].clone(),
            path,
            config,
            socket,
            namespace,
            cgroup,
            dir,
        };
        let start = Instant::now();
        loop {
            if c.socket.exists() && c.ctr(&["version"]).status.success() {
                return c;
            }
            if let Some(status) = c.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd exited with {status}:\n{}", c.log_tail());
            }
            if start.elapsed() > Duration::from_secs(120) {
                panic!("containerd did not answer within 120 s:\n{}", c.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of containerd's log.
    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Runs `ctr` on this containerd, in the test's namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", &self.namespace, "--timeout", "300s"])
            .args(args)
            .env("PATH", &self.path)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs `ctr` and returns its standard output; panics with its output and containerd's
    /// log when it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {} failed ({}):\n{}{}\ncontainerd's log:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `ctr run --rm` of `image` on thinsnap as container `id`, running `sh -c script`;
    /// returns its output.
    pub fn run(&self, image: &str, id: &str, script: &str) -> String {
        let mut args = vec!["run", "--rm", "--snapshotter", SNAPSHOTTER];
        if root_is_rootfs() {
            args.push("--no-pivot");
        }
        args.extend([image, id, "sh", "-c", script]);
        self.ok(&args)
    }

    /// `ctr run -d` of `image` on thinsnap as container `id`, running `args`, in the
    /// background.
    pub fn run_detached(&self, image: &str, id: &str, cmd: &[&str]) {
        let mut args = vec!["run", "-d", "--snapshotter", SNAPSHOTTER];
        if root_is_rootfs() {
            args.push("--no-pivot");
        }
        args.extend([image, id]);
        args.extend(cmd);
        self.ok(&args);
    }

    /// Kills every process of the containers (cgroup v2's cgroup.kill on the cgroup ctr
    /// or the pods put them in) and waits until they are gone.
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

    /// Processes whose command line names this containerd's socket: its shims.
    fn shims(&self) -> Vec<i32> {
        let needle = self.socket.as_os_str().as_encoded_bytes();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if cmdline.windows(needle.len()).any(|w| w == needle)
                && Some(pid) != self.child.as_ref().map(|c| c.id() as i32)
            {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers first, so that containerd and the shims can delete them and unmount
        // their root filesystems.
        self.kill_containers();
        if self.child.is_some() {
            let tasks =
                String::from_utf8_lossy(&self.ctr(&["tasks", "ls", "-q"]).stdout).into_owned();
            for id in tasks.split_whitespace() {
                let _ = self.ctr(&["tasks", "delete", "-f", id]);
            }
            let containers =
                String::from_utf8_lossy(&self.ctr(&["containers", "ls", "-q"]).stdout).into_owned();
            for id in containers.split_whitespace() {
                let _ = self.ctr(&["containers", "delete", id]);
            }
        }
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in self.shims() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let start = Instant::now();
        while !self.shims().is_empty() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for m in mounts_under(self.dir.path()).into_iter().rev() {
            let _ = thinpool::fs::umount(&m);
        }
        // The containers' cgroups, then the namespace's (or the pods').
        let cg = Path::new("/sys/fs/cgroup").join(&self.cgroup);
        for e in std::fs::read_dir(&cg).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&cg);
    }
}
