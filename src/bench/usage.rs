//! `thinsnap bench usage`: Usage latency over gRPC with many snapshots, each of which
//! wrote to its filesystem (so every one has mapping-tree nodes of its own, the costly case
//! for the exclusive-usage reader), against a daemon started for the purpose.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{scratch, summarize};
use crate::service::client::Client;

/// Options of the Usage benchmark.
#[derive(Debug, clap::Args)]
pub struct UsageBench {
    /// Committed snapshots to create, each a child of one base that wrote a small file.
    #[arg(long, default_value_t = 1000)]
    pub snapshots: u32,
    /// Concurrent clients while creating them.
    #[arg(long, default_value_t = 2)]
    pub fill_clients: u32,
    /// Directory for the benchmark daemon's state and pool (removed afterwards).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

/// Prepare, mount, write 64 KiB, unmount, commit.
fn layer(c: &mut Client, mnt: &Path, key: &str, parent: &str) -> Result<()> {
    let active = format!("{key}-active");
    let m = c.create(false, &active, parent, Default::default())?;
    let m = m.first().context("no mount")?;
    std::fs::create_dir_all(mnt)?;
    let fs: thinpool::FsType = m.r#type.parse()?;
    thinpool::fs::mount(Path::new(&m.source), mnt, fs, &m.options)?;
    let wrote = std::fs::write(mnt.join(key), vec![1u8; 64 << 10]);
    thinpool::fs::umount(mnt)?;
    wrote?;
    c.commit(key, &active, Default::default())?;
    Ok(())
}

/// Runs the benchmark.
pub fn run(opts: &UsageBench) -> Result<std::process::ExitCode> {
    let dir = opts.dir.clone().unwrap_or_else(scratch).join("usage");
    let _ = std::fs::remove_dir_all(&dir);
    let (daemon, socket) = super::snapshots::Daemon::start(&dir)?;
    let result = (|| -> Result<()> {
        let mut c = Client::connect(&socket)?;
        layer(&mut c, &dir.join("mnt-base"), "base", "")?;
        let t = Instant::now();
        let clients = opts.fill_clients.max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..clients)
                .map(|n| {
                    let (socket, dir) = (&socket, &dir);
                    s.spawn(move || -> Result<()> {
                        let mut c = Client::connect(socket)?;
                        let mnt = dir.join(format!("mnt-{n}"));
                        let mut i = n;
                        while i < opts.snapshots {
                            layer(&mut c, &mnt, &format!("s{i}"), "base")?;
                            i += clients;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("fill thread"))
        })?;
        eprintln!(
            "  (creating {} written snapshots took {:.1} s)",
            opts.snapshots,
            t.elapsed().as_secs_f64()
        );
        let keys: Vec<String> = (0..opts.snapshots).map(|i| format!("s{i}")).collect();
        // Cold: the first call after the cached reading expired reads the mapping trees.
        let mut cold = Vec::new();
        for k in keys.iter().take(5) {
            std::thread::sleep(thinsnap_core::engine::USAGE_MAX_AGE + Duration::from_millis(100));
            let t = Instant::now();
            c.usage(k)?;
            cold.push(t.elapsed());
        }
        // Every snapshot in turn, as containerd's CRI plugin asks every 10 s.
        let mut warm = Vec::new();
        let t = Instant::now();
        for k in &keys {
            let s = Instant::now();
            let (bytes, _) = c.usage(k)?;
            warm.push(s.elapsed());
            anyhow::ensure!(
                bytes > 0,
                "snapshot {k} wrote 64 KiB yet has no exclusive bytes"
            );
        }
        let all = t.elapsed();
        let max = warm.iter().max().copied().unwrap_or_default();
        let (sc, sw) = (summarize(&mut cold), summarize(&mut warm));
        println!(
            "Usage over gRPC with {} written snapshots (ms)",
            opts.snapshots
        );
        println!(
            "  reading the mapping trees (cold call): p50 {:.1}, max {:.1}",
            sc.p50, sc.p99
        );
        println!(
            "  every snapshot in turn: p50 {:.2}, p99 {:.2}, max {:.1}; all {} in {:.0}",
            sw.p50,
            sw.p99,
            max.as_secs_f64() * 1000.0,
            keys.len(),
            all.as_secs_f64() * 1000.0
        );
        Ok(())
    })();
    let stopped = daemon.stop();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    stopped?;
    Ok(std::process::ExitCode::SUCCESS)
}
