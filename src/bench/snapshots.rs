//! `thinsnap bench snapshots`: Prepare / Commit / Remove latency over gRPC at several
//! numbers of existing snapshots, against a daemon started for the purpose with thinsnap's
//! default configuration (only its directories and pool name changed), beside the kernel's
//! floor for each, measured in the same run on a loopback pool of the same sizes filled to
//! the same number of thin devices: Prepare's floor is `create_snap` + activate, Commit's a
//! deactivate, Remove's a deactivate + `delete`. Each removal's background reclamation is
//! waited for (Cleanup) outside the timed request, so it does not slow the next cycle. The
//! floor is timed in a block of its own after the API's cycles: a floor cycle beside each
//! API cycle was tried, and made each Prepare pay for the floor pool's teardown just
//! before it (1.60x against 1.42x in one boot).

use std::{
    path::Path,
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{scratch, summarize, SnapshotsBench};
use crate::service::client::Client;

/// A `thinsnap serve` on a loopback pool of its own, destroyed by [`Daemon::stop`].
pub(super) struct Daemon {
    child: Child,
    config: std::path::PathBuf,
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
}

impl Daemon {
    pub(super) fn start(dir: &Path) -> Result<(Daemon, std::path::PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("bench.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{0}/state\"\nsocket = \"{1}\"\nruntime_dir = \"{0}/run\"\n[pool]\nname = \"benchsnap\"\n",
                dir.display(),
                socket.display()
            ),
        )?;
        let child = Self::spawn(dir, &config, &socket)?;
        Ok((
            Daemon {
                child,
                config,
                dir: dir.to_path_buf(),
                socket: socket.clone(),
            },
            socket,
        ))
    }

    /// Starts `thinsnap serve` and waits until its socket answers.
    fn spawn(dir: &Path, config: &Path, socket: &Path) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .arg("--config")
            .arg(config)
            .args(["--log", "warn", "serve"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start thinsnap serve")?;
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if start.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the benchmark daemon did not start; see {}",
                    dir.join("daemon.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(child)
    }

    /// Stops the daemon and starts it again; returns how long the new one took to answer
    /// (opening the pool and reconciling every record first).
    fn restart(&mut self) -> Result<Duration> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait()?;
        let t = Instant::now();
        self.child = Self::spawn(&self.dir, &self.config, &self.socket)?;
        Ok(t.elapsed())
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    }

    pub(super) fn stop(mut self) -> Result<()> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait()?;
        let out = Command::new(std::env::current_exe()?)
            .arg("--config")
            .arg(&self.config)
            .args(["pool", "destroy", "--force"])
            .output()?;
        if !out.status.success() {
            bail!(
                "pool destroy failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// The kernel's floor: a loopback pool of the daemon's default sizes, thin devices of its
/// default size.
struct Floor {
    pool: thinpool::ThinPool,
    dir: std::path::PathBuf,
    devices: u32,
}

/// p50 of the floor of each request, in ms.
struct FloorP50 {
    prepare: f64,
    commit: f64,
    remove: f64,
}

impl Floor {
    fn open(dir: &Path) -> Result<Floor> {
        let d = thinsnap_core::config::Config::default();
        let thinpool::Source::Loopback {
            data_size,
            meta_size,
            ..
        } = d.pool_source
        else {
            bail!("the default pool is a loopback pool");
        };
        let source = thinpool::Source::Loopback {
            dir: dir.to_path_buf(),
            data_size,
            meta_size,
        };
        let pool = thinpool::ThinPool::open(
            &thinpool::PoolName::new("benchfloor")?,
            &source,
            &d.pool_options,
        )?;
        pool.create_thin(thinpool::ThinId::new(1)?)?;
        Ok(Floor {
            pool,
            dir: dir.to_path_buf(),
            devices: 1,
        })
    }

    /// Fills the pool to `count` thin devices, then times `iterations` cycles.
    fn measure(&mut self, count: u32, iterations: u32) -> Result<FloorP50> {
        use thinpool::{RemoveMode, ThinId};
        while self.devices < count {
            self.devices += 1;
            self.pool.create_thin(ThinId::new(self.devices)?)?;
        }
        let size = thinpool::units::bytes_to_sectors(
            thinsnap_core::config::Config::default().default_size,
        );
        let (origin, id) = (ThinId::new(1)?, ThinId::new(ThinId::MAX)?);
        let (mut p, mut c, mut r) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..iterations {
            let t0 = Instant::now();
            self.pool.create_snapshot(id, origin)?;
            self.pool.activate(id, size)?;
            let t1 = Instant::now();
            self.pool.deactivate(id, RemoveMode::Now)?;
            let t2 = Instant::now();
            self.pool.delete_thin(id)?;
            let t3 = Instant::now();
            p.push(t1 - t0);
            c.push(t2 - t1);
            r.push(t3 - t1);
        }
        Ok(FloorP50 {
            prepare: summarize(&mut p).p50,
            commit: summarize(&mut c).p50,
            remove: summarize(&mut r).p50,
        })
    }

    fn destroy(self) -> Result<()> {
        for (id, _, _) in self.pool.active_thins().unwrap_or_default() {
            let _ = self.pool.deactivate(id, thinpool::RemoveMode::Now);
        }
        self.pool.destroy()?;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

fn fill(socket: &Path, from: u32, to: u32, clients: u32) -> Result<()> {
    let clients = clients.max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || -> Result<()> {
                    let mut client = Client::connect(socket)?;
                    let mut i = from + c;
                    while i < to {
                        let key = format!("fill-active-{i}");
                        client.create(false, &key, "base", Default::default())?;
                        client.commit(&format!("fill-{i}"), &key, Default::default())?;
                        i += clients;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("fill thread"))
    })
}

/// Runs the benchmark.
pub fn run(opts: &SnapshotsBench) -> Result<ExitCode> {
    let dir = opts.dir.clone().unwrap_or_else(scratch).join("snapshots");
    let _ = std::fs::remove_dir_all(&dir);
    let (mut daemon, socket) = Daemon::start(&dir)?;
    let mut floor = Floor::open(&dir.join("floor"))?;
    let result = (|| -> Result<()> {
        let mut c = Client::connect(&socket)?;
        c.create(false, "base-active", "", Default::default())?;
        c.commit("base", "base-active", Default::default())?;
        println!(
            "Snapshots API over gRPC, {} cycles per count (ms; x: p50 / the kernel's floor p50)",
            opts.iterations
        );
        println!(
            "{:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>7} {:>9} {:>9} {:>7} {:>10}",
            "snapshots",
            "prep p50",
            "prep p99",
            "x floor",
            "comm p50",
            "comm p99",
            "x floor",
            "rm p50",
            "rm p99",
            "x floor",
            "RSS MiB"
        );
        let mut existing = 1u32;
        let mut first: Option<[f64; 3]> = None;
        let mut last = [0.0; 3];
        for &count in &opts.counts {
            let t = Instant::now();
            if existing < count {
                fill(&socket, existing, count, opts.fill_clients)?;
                existing = count;
            }
            eprintln!(
                "  (filling to {count} snapshots took {:.1} s)",
                t.elapsed().as_secs_f64()
            );
            let (mut p, mut cm, mut r, mut st) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for i in 0..opts.iterations {
                let key = format!("bench-{count}-{i}");
                let name = format!("{key}-c");
                let t = Instant::now();
                c.create(false, &key, "base", Default::default())?;
                p.push(t.elapsed());
                let t = Instant::now();
                c.commit(&name, &key, Default::default())?;
                cm.push(t.elapsed());
                // A round trip that does no kernel work: what the API itself costs.
                let t = Instant::now();
                c.stat(&name)?;
                st.push(t.elapsed());
                let t = Instant::now();
                c.remove(&name)?;
                r.push(t.elapsed());
                c.cleanup()?;
            }
            let f = floor.measure(count, opts.iterations.min(100))?;
            let (sp, sc, sr) = (summarize(&mut p), summarize(&mut cm), summarize(&mut r));
            println!(
                "{:>9} {:>9.1} {:>9.1} {:>6.2}x {:>9.1} {:>9.1} {:>6.2}x {:>9.1} {:>9.1} {:>6.2}x {:>10.1}",
                count,
                sp.p50,
                sp.p99,
                sp.p50 / f.prepare,
                sc.p50,
                sc.p99,
                sc.p50 / f.commit,
                sr.p50,
                sr.p99,
                sr.p50 / f.remove,
                daemon.rss_kib() as f64 / 1024.0
            );
            println!(
                "{:>9} floor p50: prepare (create_snap + activate) {:.1}, commit (deactivate) {:.1}, remove (deactivate + delete) {:.1}; a Stat round trip {:.1}",
                "", f.prepare, f.commit, f.remove, summarize(&mut st).p50
            );
            // The client lets go of its connection first: it drives the connection only in
            // its calls, so it would never answer the stopping daemon's GOAWAY, and the
            // daemon waits for its clients to close before it exits.
            drop(c);
            let ready = daemon.restart()?;
            c = Client::connect(&socket)?;
            println!(
                "{:>9} restart: ready {:.2} s after it was started, RSS {:.1} MiB",
                "",
                ready.as_secs_f64(),
                daemon.rss_kib() as f64 / 1024.0
            );
            first.get_or_insert([sp.p50, sc.p50, sr.p50]);
            last = [sp.p50, sc.p50, sr.p50];
        }
        if let Some(f) = first {
            println!(
                "p50 at {} / at {}: prepare {:.2}x, commit {:.2}x, remove {:.2}x (target: at most 1.2x)",
                opts.counts.last().unwrap_or(&0),
                opts.counts.first().unwrap_or(&0),
                last[0] / f[0],
                last[1] / f[1],
                last[2] / f[2]
            );
        }
        Ok(())
    })();
    let stopped = daemon.stop();
    let floored = floor.destroy();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    stopped?;
    floored?;
    Ok(ExitCode::SUCCESS)
}
