//! `thinsnap bench ...`: benchmarks on real device-mapper. Each prints a table of
//! latencies and the ratios that the project's targets are stated in, measured in one run.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

pub mod import;
mod snapshots;
mod usage;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use thinpool::{
    units::{bytes_to_sectors, GIB, MIB},
    PoolName, PoolOptions, RemoveMode, Source, ThinId, ThinPool,
};

/// `thinsnap bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Time create_snap + activate + deactivate + delete of a thin device with 10, 1,000 and
    /// 10,000 thin devices in the pool, through ioctls and (for comparison) through dmsetup.
    Thin {
        /// Numbers of existing thin devices to measure at.
        #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
        counts: Vec<u32>,
        /// Cycles measured at each count.
        #[arg(long, default_value_t = 50)]
        iterations: u32,
        /// dmsetup to compare with (skipped when absent).
        #[arg(long, default_value = "/opt/dmsetup/dmsetup")]
        dmsetup: PathBuf,
        /// Directory for the benchmark's loopback pool (removed afterwards); default:
        /// `$THINSNAP_SCRATCH/thinsnap-bench` (the VM's scratch disk), else /var/tmp.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Prepare / Commit / Remove latency (p50, p99) over gRPC against a `thinsnap serve`
    /// started for the purpose, with 10, 1,000 and 10,000 committed snapshots present, and
    /// the daemon's RSS.
    Snapshots(SnapshotsBench),
    /// Usage latency over gRPC with 1,000 committed snapshots that each wrote a file: the
    /// call that reads the pool's mapping trees, and every snapshot's call in turn.
    Usage(usage::UsageBench),
    /// Import a generated ~200 MB, ~20,000-file image through the running daemon (global
    /// --config) and compare with tar extracting the same layers onto a fresh snapshot.
    Import(import::ImportBench),
}

/// Options of the Snapshots API benchmark.
#[derive(Debug, clap::Args)]
pub struct SnapshotsBench {
    /// Numbers of existing committed snapshots to measure at.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    pub counts: Vec<u32>,
    /// Prepare/Commit/Remove cycles measured at each count.
    #[arg(long, default_value_t = 200)]
    pub iterations: u32,
    /// Concurrent clients while filling the pool with snapshots.
    #[arg(long, default_value_t = 4)]
    pub fill_clients: u32,
    /// Directory for the benchmark daemon's state and pool (removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Latency summary of one series, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
}

/// Summarizes `samples`.
pub fn summarize(samples: &mut [Duration]) -> Summary {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let n = samples.len().max(1);
    let at = |q: f64| ms(samples[((n as f64 * q).ceil() as usize).clamp(1, n) - 1]);
    Summary {
        p50: at(0.50),
        p99: at(0.99),
        mean: samples.iter().map(|d| ms(*d)).sum::<f64>() / n as f64,
    }
}

/// Runs a benchmark.
pub fn run(cmd: &BenchCmd) -> Result<ExitCode> {
    match cmd {
        BenchCmd::Thin {
            counts,
            iterations,
            dmsetup,
            dir,
        } => bench_thin(
            counts,
            *iterations,
            dmsetup,
            &dir.clone().unwrap_or_else(scratch),
        ),
        BenchCmd::Snapshots(opts) => crate::bench::snapshots::run(opts),
        BenchCmd::Usage(opts) => usage::run(opts),
        // Needs the configuration: the CLI dispatches it (crate::cli::run).
        BenchCmd::Import(_) => bail!("`bench import` runs through the thinsnap CLI"),
    }
}

/// Default directory for a benchmark's files: on the VM's scratch disk when there is one.
pub fn scratch() -> PathBuf {
    std::env::var_os("THINSNAP_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
        .join("thinsnap-bench")
}

struct Steps {
    snap: Vec<Duration>,
    activate: Vec<Duration>,
    deactivate: Vec<Duration>,
    delete: Vec<Duration>,
    total: Vec<Duration>,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            snap: vec![],
            activate: vec![],
            deactivate: vec![],
            delete: vec![],
            total: vec![],
        }
    }
}

fn timed<T>(v: &mut Vec<Duration>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    let r = f()?;
    v.push(t.elapsed());
    Ok(r)
}

fn dmsetup_run(dmsetup: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(dmsetup)
        .args(args)
        .env("DM_DISABLE_UDEV", "1")
        .output()
        .with_context(|| format!("cannot run {}", dmsetup.display()))?;
    if !out.status.success() {
        bail!(
            "dmsetup {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn bench_thin(counts: &[u32], iterations: u32, dmsetup: &Path, dir: &Path) -> Result<ExitCode> {
    let name = PoolName::new("bench")?;
    let _ = std::fs::remove_dir_all(dir);
    let source = Source::Loopback {
        dir: dir.to_path_buf(),
        data_size: 16 * GIB,
        meta_size: 256 * MIB,
    };
    let pool = ThinPool::open(&name, &source, &PoolOptions::default())?;
    let result = (|| -> Result<()> {
        let origin = ThinId::new(0)?;
        pool.create_thin(origin)?;
        let size = bytes_to_sectors(GIB);
        let scratch = ThinId::new(ThinId::MAX)?;
        let scratch_name = pool.thin_name(scratch).to_string();
        let pool_dev = format!("{}:{}", pool.device().major, pool.device().minor);
        let with_dmsetup = dmsetup.is_file();
        let mut existing = 1u32;
        println!("thin device cycle: create_snap + activate + deactivate + delete, {iterations} iterations each");
        println!(
            "{:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>12}",
            "devices",
            "snap p50",
            "act p50",
            "deact p50",
            "del p50",
            "cycle p50",
            "cycle p99",
            "dmsetup p50",
            "ioctl/dmsetup"
        );
        let mut first: Option<f64> = None;
        let mut last = 0.0;
        for &count in counts {
            let t = Instant::now();
            while existing < count {
                pool.create_thin(ThinId::new(existing)?)?;
                existing += 1;
            }
            let fill = t.elapsed();
            let mut s = Steps::new();
            for _ in 0..iterations {
                let t = Instant::now();
                timed(&mut s.snap, || Ok(pool.create_snapshot(scratch, origin)?))?;
                timed(&mut s.activate, || Ok(pool.activate(scratch, size)?))?;
                timed(&mut s.deactivate, || {
                    Ok(pool.deactivate(scratch, RemoveMode::Now)?)
                })?;
                timed(&mut s.delete, || Ok(pool.delete_thin(scratch)?))?;
                s.total.push(t.elapsed());
            }
            let mut dm = Vec::new();
            if with_dmsetup {
                let pool_name = pool.dm_name().to_string();
                let table = format!("0 {} thin {pool_dev} {}", size.0, scratch);
                for _ in 0..iterations.min(20) {
                    let t = Instant::now();
                    dmsetup_run(
                        dmsetup,
                        &[
                            "message",
                            &pool_name,
                            "0",
                            &format!("create_snap {scratch} {origin}"),
                        ],
                    )?;
                    dmsetup_run(dmsetup, &["create", &scratch_name, "--table", &table])?;
                    dmsetup_run(dmsetup, &["remove", &scratch_name])?;
                    dmsetup_run(
                        dmsetup,
                        &["message", &pool_name, "0", &format!("delete {scratch}")],
                    )?;
                    dm.push(t.elapsed());
                }
            }
            let cycle = summarize(&mut s.total);
            let dm_p50 = (!dm.is_empty()).then(|| summarize(&mut dm).p50);
            println!(
                "{:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>12} {:>12}",
                count,
                summarize(&mut s.snap).p50,
                summarize(&mut s.activate).p50,
                summarize(&mut s.deactivate).p50,
                summarize(&mut s.delete).p50,
                cycle.p50,
                cycle.p99,
                dm_p50.map_or("-".into(), |v| format!("{v:.1}")),
                dm_p50.map_or("-".into(), |v| format!("{:.2}x", cycle.p50 / v)),
            );
            eprintln!(
                "  (filling to {count} devices took {:.1} s)",
                fill.as_secs_f64()
            );
            first.get_or_insert(cycle.p50);
            last = cycle.p50;
        }
        if let Some(f) = first {
            println!(
                "cycle p50 at {} devices / at {} devices: {:.2}x (target: at most 1.5x)",
                counts.last().unwrap_or(&0),
                counts.first().unwrap_or(&0),
                last / f
            );
        }
        Ok(())
    })();
    // Remove every id and the pool, whatever happened.
    for (id, _, _) in pool.active_thins().unwrap_or_default() {
        let _ = pool.deactivate(id, RemoveMode::Now);
    }
    let destroyed = pool.destroy();
    let _ = std::fs::remove_dir_all(dir);
    result?;
    destroyed?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = summarize(&mut v);
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p99, 99.0);
        assert!((s.mean - 50.5).abs() < 1e-9);
    }
}
