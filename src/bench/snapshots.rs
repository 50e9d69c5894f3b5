//! `thinsnap bench snapshots`: Prepare / Commit / Remove latency over gRPC at several
//! numbers of existing snapshots, against a daemon started for the purpose.

use std::{
    path::Path,
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{scratch, summarize, SnapshotsBench};
use crate::service::client::Client;

struct Daemon {
    child: Child,
    config: std::path::PathBuf,
}

impl Daemon {
    fn start(dir: &Path) -> Result<(Daemon, std::path::PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("bench.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{0}/state\"\nsocket = \"{1}\"\ndefault_size = \"1G\"\n[pool]\nname = \"benchsnap\"\n[pool.loopback]\ndata_size = \"64G\"\nmetadata_size = \"1G\"\n",
                dir.display(),
                socket.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("daemon.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .arg("--config")
            .arg(&config)
            .args(["--log", "warn", "serve"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start thinsnap serve")?;
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if start.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the benchmark daemon did not start; see {}",
                    dir.join("daemon.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((Daemon { child, config }, socket))
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

    fn stop(mut self) -> Result<()> {
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
    let (daemon, socket) = Daemon::start(&dir)?;
    let result = (|| -> Result<()> {
        let mut c = Client::connect(&socket)?;
        c.create(false, "base-active", "", Default::default())?;
        c.commit("base", "base-active", Default::default())?;
        println!(
            "Snapshots API over gRPC, {} cycles per count (ms)",
            opts.iterations
        );
        println!(
            "{:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            "snapshots",
            "prep p50",
            "prep p99",
            "comm p50",
            "comm p99",
            "rm p50",
            "rm p99",
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
            let (mut p, mut cm, mut r) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..opts.iterations {
                let key = format!("bench-{count}-{i}");
                let name = format!("{key}-c");
                let t = Instant::now();
                c.create(false, &key, "base", Default::default())?;
                p.push(t.elapsed());
                let t = Instant::now();
                c.commit(&name, &key, Default::default())?;
                cm.push(t.elapsed());
                let t = Instant::now();
                c.remove(&name)?;
                r.push(t.elapsed());
            }
            let (sp, sc, sr) = (summarize(&mut p), summarize(&mut cm), summarize(&mut r));
            println!(
                "{:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1}",
                count,
                sp.p50,
                sp.p99,
                sc.p50,
                sc.p99,
                sr.p50,
                sr.p99,
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
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    stopped?;
    Ok(ExitCode::SUCCESS)
}
