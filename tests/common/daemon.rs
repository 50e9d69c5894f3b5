//! A `thinsnap serve` process on its own loopback pool and socket, with a containerd
//! Snapshots API client (containerd's own Rust bindings), for tests of the service.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use containerd_client::services::v1::snapshots::{snapshots_client::SnapshotsClient, *};
use containerd_client::types::Mount;
use thinpool::PoolName;
use tonic::transport::Channel;

use super::{assert_nothing_left, mounts_under, require_dm, scratch_dir, unique_pool_name};

/// The snapshotter name tests send (thinsnap serves one pool and ignores it).
pub const SNAPSHOTTER: &str = "thinsnap";

/// A running daemon; stopped, its pool destroyed and checked for leftovers on drop.
pub struct Daemon {
    child: Option<Child>,
    /// Extra environment for the next `spawn` (e.g. THINSNAP_FAILPOINT).
    pub env: Vec<(String, String)>,
    /// Whether the pool is the daemon's own loopback pool, destroyed and checked on drop.
    pub owns_pool: bool,
    /// Why this test leaves the store and pool disagreeing on purpose (None: on drop,
    /// `thinsnap check` must find them in agreement before anything is cleaned up).
    pub unclean: Option<&'static str>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pool: PoolName,
    /// The listening socket this test holds as systemd's thinsnap.socket would, passed to
    /// every start (socket activation; see [`Daemon::start_activated`]).
    pub held: Option<std::os::unix::net::UnixListener>,
    /// The thinsnap binary `serve` runs.
    pub bin: PathBuf,
}

/// Configuration of a test daemon: 1 GiB snapshots, plus top-level lines `extra` (where
/// `{dir}` stands for the test's directory), and a pool section: `pool` lines (default: a
/// loopback pool of 4 GiB data, 64 MiB metadata).
pub fn test_config(dir: &Path, name: &PoolName, extra: &str, pool: Option<&str>) -> String {
    let extra = extra.replace("{dir}", &dir.display().to_string());
    let pool = pool.unwrap_or("[pool.loopback]\ndata_size = \"4G\"\nmetadata_size = \"64M\"");
    let size = if extra.contains("default_size") {
        ""
    } else {
        "default_size = \"1G\""
    };
    format!(
        "state_dir = \"{dir}/state\"\nsocket = \"{dir}/thinsnap.sock\"\nruntime_dir = \"{dir}/run\"\n{size}\n{extra}\n[pool]\nname = \"{name}\"\n{pool}\n",
        dir = dir.display()
    )
}

impl Daemon {
    /// Starts a daemon with the test configuration.
    pub fn start() -> Daemon {
        Self::start_with("")
    }

    /// Starts a daemon with top-level configuration lines `extra` added.
    pub fn start_with(extra: &str) -> Daemon {
        Self::start_custom(extra, None)
    }

    /// Starts a daemon with top-level lines `extra` and pool lines `pool` (see
    /// [`test_config`]). A pool that is not a loopback pool is not destroyed on drop.
    pub fn start_custom(extra: &str, pool_lines: Option<&str>) -> Daemon {
        require_dm();
        let dir = scratch_dir();
        let pool = unique_pool_name();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, test_config(dir.path(), &pool, extra, pool_lines)).unwrap();
        let mut d = Daemon {
            child: None,
            env: Vec::new(),
            owns_pool: pool_lines.is_none_or(|p| !p.contains("source")),
            unclean: None,
            socket: dir.path().join("thinsnap.sock"),
            config,
            pool,
            dir,
            held: None,
            bin: env!("CARGO_BIN_EXE_thinsnap").into(),
        };
        d.spawn();
        d
    }

    /// Starts the release build of `thinsnap serve` (`THINSNAP_RELEASE_BIN`, which
    /// vagrant/test sets) on a listening socket this test holds and passes to every start,
    /// as systemd's thinsnap.socket does (`LISTEN_FDS`), waiting for its `READY=1` as
    /// `Type=notify` does. The release build, as users run it: under emulation the debug
    /// build's exec alone takes half of the second containerd allows a reconnection.
    #[allow(dead_code)]
    pub fn start_activated() -> Daemon {
        require_dm();
        let bin = std::env::var_os("THINSNAP_RELEASE_BIN").unwrap_or_else(|| {
            panic!("THINSNAP_RELEASE_BIN must name thinsnap's release build (vagrant/test sets it; `cargo build --release`)")
        });
        let dir = scratch_dir();
        let pool = unique_pool_name();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, test_config(dir.path(), &pool, "", None)).unwrap();
        let socket = dir.path().join("thinsnap.sock");
        let held = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let mut d = Daemon {
            child: None,
            env: Vec::new(),
            owns_pool: true,
            unclean: None,
            socket,
            config,
            pool,
            dir,
            held: Some(held),
            bin: bin.into(),
        };
        d.spawn();
        d
    }

    /// Starts a daemon on the configuration `dir/config.toml` someone else wrote (socket
    /// `dir/thinsnap.sock`, pool `pool`, e.g. a migrated loopback pool); like the daemon's
    /// own pool, it is destroyed and checked for leftovers on drop.
    pub fn start_in(dir: tempfile::TempDir, pool: PoolName) -> Daemon {
        require_dm();
        let mut d = Daemon {
            child: None,
            env: Vec::new(),
            owns_pool: true,
            unclean: None,
            socket: dir.path().join("thinsnap.sock"),
            config: dir.path().join("config.toml"),
            pool,
            dir,
            held: None,
            bin: env!("CARGO_BIN_EXE_thinsnap").into(),
        };
        d.spawn();
        d
    }

    /// The log file of the daemon's standard error.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// Runs the thinsnap CLI with this daemon's configuration.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_env(args, &[])
    }

    /// Runs the thinsnap CLI and returns its standard output; panics with its output when
    /// it fails.
    #[allow(dead_code)]
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "thinsnap {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the thinsnap CLI (a `--json` command) and parses its output.
    #[allow(dead_code)]
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(args)).unwrap()
    }

    /// Thin devices in the daemon's pool (`thinsnap pool status --json`).
    #[allow(dead_code)]
    pub fn thin_devices(&self) -> u64 {
        self.cli_json(&["pool", "status", "--json"])["thin_devices"]
            .as_u64()
            .unwrap()
    }

    /// Runs the thinsnap CLI with this daemon's configuration and extra environment
    /// (e.g. THINSNAP_FAILPOINT).
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_thinsnap"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }

    /// Starts the daemon process and waits until its socket answers (or, on a held
    /// socket, until it says `READY=1`).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let notify = self.held.as_ref().map(|_| {
            let path = self.dir.path().join("notify");
            let _ = std::fs::remove_file(&path);
            (std::os::unix::net::UnixDatagram::bind(&path).unwrap(), path)
        });
        let mut cmd = match &self.held {
            None => Command::new(&self.bin),
            Some(held) => {
                // systemd sets LISTEN_PID to the pid it execs: the shell's, which exec keeps.
                let mut cmd = Command::new("sh");
                cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\""])
                    .arg(&self.bin);
                let fd = std::os::fd::AsRawFd::as_raw_fd(held);
                // SAFETY: dup2 and fcntl are async-signal-safe; the child gets the held
                // socket as fd 3, without close-on-exec.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                        if fd == 3 {
                            let flags = libc::fcntl(3, libc::F_GETFD);
                            libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                        } else if libc::dup2(fd, 3) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                cmd
            }
        };
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--log")
            .arg(filter)
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some((_, path)) = &notify {
            cmd.env("NOTIFY_SOCKET", path);
        }
        self.child = Some(cmd.spawn().unwrap());
        let start = Instant::now();
        if let Some((rx, _)) = &notify {
            rx.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
        }
        loop {
            let ready = match &notify {
                None => std::os::unix::net::UnixStream::connect(&self.socket).is_ok(),
                Some((rx, _)) => {
                    let mut buf = [0u8; 512];
                    rx.recv(&mut buf).is_ok_and(|n| {
                        String::from_utf8_lossy(&buf[..n])
                            .lines()
                            .any(|l| l == "READY=1")
                    })
                }
            };
            if ready {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "thinsnap serve exited with {status}:\n{}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            if start.elapsed() > Duration::from_secs(120) {
                panic!(
                    "thinsnap serve was not ready within 120 s:\n{}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            if notify.is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts the daemon with `THINSNAP_FAILPOINT=point` (it kills itself there), without
    /// waiting for it beyond its socket.
    pub fn spawn_with_failpoint(&mut self, point: &str) {
        self.env = vec![("THINSNAP_FAILPOINT".into(), point.into())];
        self.spawn();
        self.env.clear();
    }

    /// Waits for the daemon to exit by itself (e.g. at a failpoint) and returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        child.wait().unwrap()
    }

    /// Starts the daemon with `THINSNAP_FAILPOINT=point` where its start-up recovery must
    /// kill it (recovery itself crashing), and checks that it did, within 120 s.
    pub fn recover_dying_at(&mut self, point: &str) {
        assert!(self.child.is_none(), "the daemon is running");
        self.env = vec![("THINSNAP_FAILPOINT".into(), point.into())];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_thinsnap"))
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.env.clear();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!(
                    "start-up recovery did not reach {point} within 120 s:\n{}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "start-up recovery must be killed at {point}: {status}\n{}",
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    /// Stops the daemon with SIGTERM and waits; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        Some(child.wait().unwrap())
    }

    /// Kills the daemon with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// A client of the daemon's Docker volume plugin socket, `{dir}/volume.sock` (start the
    /// daemon with [`super::volume::CONFIG`]).
    pub fn plugin(&self) -> super::volume::Plugin {
        super::volume::Plugin {
            socket: self.dir.path().join("volume.sock"),
        }
    }

    /// A containerd Snapshots API client on the daemon's socket.
    pub async fn client(&self) -> Client {
        let channel = containerd_client::connect(&self.socket).await.unwrap();
        Client {
            inner: SnapshotsClient::new(channel),
        }
    }
}

impl Daemon {
    /// What the test left, checked before anything is cleaned up: the store and the pool
    /// agree (`thinsnap check`: nothing half done, no stale device, no record without its
    /// device) and nothing is left in the private mount directory.
    fn assert_left_clean(&self) {
        let out = self.cli(&["check"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("store and pool agree"),
            "the test left the store and pool disagreeing (set `unclean` if on purpose):\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let private = super::private_mounts(self.dir.path());
        assert!(private.is_empty(), "private mounts left: {private:?}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let stopped = self.stop();
        if std::env::var_os("THINSNAP_KEEP_TEST_DEVICES").is_some() {
            return;
        }
        if !std::thread::panicking() && self.unclean.is_none() {
            self.assert_left_clean();
        }
        for m in mounts_under(self.dir.path()).into_iter().rev() {
            let _ = thinpool::fs::umount(&m);
        }
        if !self.owns_pool {
            // Someone else's pool: deactivate our devices, leave the pool to its owner.
            for name in super::dm_devices_of(&self.pool) {
                let n = devicemapper::DmNameBuf::new(name).unwrap();
                let _ = thinpool::dm::remove(&n, thinpool::RemoveMode::Now);
            }
            return;
        }
        let out = self.cli(&["pool", "destroy", "--force"]);
        if !std::thread::panicking() {
            if let Some(s) = stopped {
                assert!(
                    s.success(),
                    "daemon exit: {s}\n{}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            assert!(
                out.status.success(),
                "pool destroy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_nothing_left(&self.pool, self.dir.path());
        }
    }
}

/// Thin wrapper over containerd's generated client with the snapshotter name filled in.
pub struct Client {
    pub inner: SnapshotsClient<Channel>,
}

pub type Labels = std::collections::HashMap<String, String>;

/// Labels from key/value pairs.
pub fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Client {
    pub async fn prepare(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
        self.prepare_with(key, parent, Labels::new()).await
    }

    pub async fn prepare_with(
        &mut self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, tonic::Status> {
        let r = self
            .inner
            .prepare(PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
                parent: parent.into(),
                labels,
            })
            .await?;
        Ok(r.into_inner().mounts)
    }

    pub async fn view(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
        self.view_with(key, parent, Labels::new()).await
    }

    pub async fn view_with(
        &mut self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, tonic::Status> {
        let r = self
            .inner
            .view(ViewSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
                parent: parent.into(),
                labels,
            })
            .await?;
        Ok(r.into_inner().mounts)
    }

    pub async fn mounts(&mut self, key: &str) -> Result<Vec<Mount>, tonic::Status> {
        let r = self
            .inner
            .mounts(MountsRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            })
            .await?;
        Ok(r.into_inner().mounts)
    }

    pub async fn commit(&mut self, name: &str, key: &str) -> Result<(), tonic::Status> {
        self.commit_with(name, key, Labels::new()).await
    }

    pub async fn commit_with(
        &mut self,
        name: &str,
        key: &str,
        labels: Labels,
    ) -> Result<(), tonic::Status> {
        self.inner
            .commit(CommitSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                name: name.into(),
                key: key.into(),
                labels,
            })
            .await?;
        Ok(())
    }

    pub async fn remove(&mut self, key: &str) -> Result<(), tonic::Status> {
        self.inner
            .remove(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn stat(&mut self, key: &str) -> Result<Info, tonic::Status> {
        let r = self
            .inner
            .stat(StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            })
            .await?;
        Ok(r.into_inner().info.unwrap())
    }

    pub async fn update(
        &mut self,
        key: &str,
        labels: Labels,
        paths: &[&str],
    ) -> Result<Info, tonic::Status> {
        let r = self
            .inner
            .update(UpdateSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                info: Some(Info {
                    name: key.into(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: paths.iter().map(|s| s.to_string()).collect(),
                }),
            })
            .await?;
        Ok(r.into_inner().info.unwrap())
    }

    pub async fn list(&mut self, filters: &[&str]) -> Result<Vec<Info>, tonic::Status> {
        let mut stream = self
            .inner
            .list(ListSnapshotsRequest {
                snapshotter: SNAPSHOTTER.into(),
                filters: filters.iter().map(|s| s.to_string()).collect(),
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.message().await? {
            out.extend(batch.info);
        }
        Ok(out)
    }

    /// Names of every snapshot, sorted.
    pub async fn names(&mut self) -> Result<Vec<String>, tonic::Status> {
        let mut n: Vec<String> = self.list(&[]).await?.into_iter().map(|i| i.name).collect();
        n.sort();
        Ok(n)
    }

    pub async fn usage(&mut self, key: &str) -> Result<UsageResponse, tonic::Status> {
        Ok(self
            .inner
            .usage(UsageRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            })
            .await?
            .into_inner())
    }

    pub async fn cleanup(&mut self) -> Result<(), tonic::Status> {
        self.inner
            .cleanup(CleanupRequest {
                snapshotter: SNAPSHOTTER.into(),
            })
            .await?;
        Ok(())
    }
}

/// A snapshot mounted where a test can look at it; unmounted on drop.
pub struct Mounted {
    pub path: PathBuf,
}

impl Mounted {
    /// Mounts `mounts` (one block device mount, as thinsnap returns) at a fresh directory
    /// under `dir`.
    pub fn new(dir: &Path, name: &str, mounts: &[Mount]) -> Mounted {
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        let m = &mounts[0];
        assert!(m.source.starts_with("/dev/dm-"), "{m:?}");
        let path = dir.join("mnt").join(name.replace('/', "_"));
        std::fs::create_dir_all(&path).unwrap();
        let fs: thinpool::FsType = m.r#type.parse().unwrap();
        thinpool::fs::mount(Path::new(&m.source), &path, fs, &m.options).unwrap();
        Mounted { path }
    }

    /// Unmounts now.
    pub fn unmount(self) {}
}

impl Drop for Mounted {
    fn drop(&mut self) {
        thinpool::fs::umount(&self.path).unwrap();
    }
}
