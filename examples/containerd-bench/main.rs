//! containerd-bench: containerd 1.6's built-in `devmapper` snapshotter (on its own dm
//! thin-pool), thinsnap (as proxy snapshotter) and `overlayfs`, side by side in one
//! containerd in one boot of the VM guest: `ctr images import` of a small and a ~200 MB
//! image, `ctr run --rm` of a trivial command, and Prepare/Commit/View/Remove latency
//! through containerd's own Snapshots API with only a base snapshot and with 1,000
//! committed snapshots present; then containerd's and thinsnap's RSS. Prints tables with
//! ratios to devmapper. Run it with `vagrant/bench-containerd`; see docs/benchmarks.md.

mod api;
mod images;
mod report;
mod setup;
mod thinsnap_log;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Parser};

use api::Api;
use setup::{Containerd, DevmapperPool, PoolSpec, Thinsnap, DEVMAPPER, THINSNAP};

/// Benchmark containerd's devmapper snapshotter, thinsnap and overlayfs in one containerd.
#[derive(Debug, Parser)]
struct Args {
    /// The thinsnap binary; default: `thinsnap` in the directory above this example's.
    #[arg(long)]
    thinsnap: Option<PathBuf>,
    /// Prepare/Commit/View/Remove cycles measured per snapshotter and phase.
    #[arg(long, default_value_t = 200)]
    iterations: u32,
    /// Committed snapshots present (per snapshotter) in the second phase.
    #[arg(long, default_value_t = 1000)]
    committed: u32,
    /// Concurrent clients per snapshotter while filling to --committed.
    #[arg(long, default_value_t = 2)]
    fill_clients: u32,
    /// Uncompressed size of the large image, in MB.
    #[arg(long, default_value_t = 200)]
    image_mb: u64,
    /// Files in the large image.
    #[arg(long, default_value_t = 20_000)]
    image_files: u32,
    /// Imports of each image per snapshotter (each of a new copy; the order of the
    /// snapshotters is reversed every other round).
    #[arg(long, default_value_t = 2)]
    import_rounds: u32,
    /// `ctr run --rm` runs per snapshotter.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Data size of each pool.
    #[arg(long, default_value = "32G")]
    data_size: String,
    /// Metadata size of each pool.
    #[arg(long, default_value = "1G")]
    metadata_size: String,
    /// Size of every snapshot's device: thinsnap's default_size and devmapper's
    /// base_image_size.
    #[arg(long, default_value = "10G")]
    base_size: String,
    /// Whether both pools zero newly provisioned blocks (thinsnap's default; containerd's
    /// docs create their pool with skip_block_zeroing).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    zero_new_blocks: bool,
    /// dmsetup, for the devmapper snapshotter's pool (and on containerd's PATH for it).
    #[arg(long, default_value = "/opt/dmsetup/dmsetup")]
    dmsetup: PathBuf,
    /// Snapshotters to compare.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "devmapper,thinsnap,overlayfs"
    )]
    snapshotters: Vec<String>,
    /// Working directory (removed first); default: `$THINSNAP_SCRATCH/containerd-bench`
    /// (the VM's scratch disk), else /var/tmp/containerd-bench.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// A timed operation through containerd's Snapshots API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Prepare,
    Commit,
    View,
    Remove,
    Gc,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Prepare, Op::Commit, Op::View, Op::Remove, Op::Gc];
}

/// Samples of one phase: by snapshotter and operation.
pub struct Phase {
    /// What was present: "base only" or "1,000 committed".
    pub name: String,
    pub samples: HashMap<(String, Op), Vec<Duration>>,
    /// What thinsnap's log says about the phase: its own time per request and per step.
    pub thinsnap: thinsnap_log::LogTimes,
}

/// Samples by snapshotter.
pub type BySnapshotter = HashMap<String, Vec<f64>>;

/// Timings of the image part, in seconds, by snapshotter.
#[derive(Default)]
pub struct ImageTimes {
    pub small: BySnapshotter,
    pub large: BySnapshotter,
    pub run: BySnapshotter,
    pub small_mb: f64,
    pub large_mb: f64,
    pub large_files: u32,
    /// For each import and run on thinsnap: what (as "busybox import" ...), its seconds,
    /// and what thinsnap's log says about that time.
    pub thinsnap_share: Vec<(String, f64, thinsnap_log::LogTimes)>,
}

/// Everything measured.
pub struct Results {
    pub snapshotters: Vec<String>,
    pub images: ImageTimes,
    pub phases: Vec<Phase>,
    /// (VmRSS, VmHWM) in KiB.
    pub containerd_rss: (u64, u64),
    pub thinsnap_rss: (u64, u64),
    /// Cost of one `dmsetup info` process, p50 ms.
    pub dmsetup_ms: Option<f64>,
    pub fill_secs: BTreeMap<String, f64>,
    pub committed: u32,
    /// Seconds containerd's garbage collection took to remove a chain of
    /// [`GC_CHAIN`] committed snapshots (an image's layers) once nothing referenced it.
    pub gc_chain: BTreeMap<String, f64>,
}

/// Committed snapshots in the chain whose garbage collection is timed.
pub const GC_CHAIN: u32 = 100;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn size(s: &str) -> Result<u64> {
    thinpool::units::parse_size(s).with_context(|| format!("bad size {s:?}"))
}

fn run(args: &Args) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("containerd-bench runs containerd and device-mapper: run it as root, in the VM (vagrant/bench-containerd)");
    }
    let thinsnap_bin = match &args.thinsnap {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("no directory above this binary's")?
            .join("thinsnap"),
    };
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::var_os("THINSNAP_SCRATCH")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"))
            .join("containerd-bench")
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let spec = PoolSpec {
        data_size: size(&args.data_size)?,
        metadata_size: size(&args.metadata_size)?,
        base_size: size(&args.base_size)?,
        zero_new_blocks: args.zero_new_blocks,
    };
    let mut snapshotters = args.snapshotters.clone();
    let want_devmapper = snapshotters.iter().any(|s| s == DEVMAPPER);

    let thinsnap = Thinsnap::start(&thinsnap_bin, &dir.join("thinsnap"), &spec)?;
    let pool = if want_devmapper {
        match DevmapperPool::create(
            &args.dmsetup,
            &dir.join("devmapper-pool"),
            "cbench-devmapper-pool",
            &thinsnap.pool_dm_name,
            &spec,
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("containerd-bench: no pool for devmapper, comparing without it: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let dmsetup_dir = args.dmsetup.parent().unwrap_or(Path::new("/"));
    let containerd = match Containerd::start(
        &dir.join("containerd"),
        pool.as_ref().map(|p| p.name.as_str()),
        &thinsnap.socket,
        &spec,
        dmsetup_dir,
    ) {
        Ok(c) => c,
        Err(e) => {
            let _ = thinsnap.stop();
            if let Some(p) = pool {
                let _ = p.destroy();
            }
            return Err(e);
        }
    };
    if want_devmapper {
        let status = containerd.plugin_status(DEVMAPPER).unwrap_or_default();
        if status != "ok" {
            eprintln!(
                "containerd-bench: containerd's devmapper snapshotter is {status:?}, comparing without it:\n{}",
                containerd.log_lines("devmapper")
            );
            snapshotters.retain(|s| s != DEVMAPPER);
        }
    }

    let result = measure(args, &snapshotters, &containerd, &thinsnap, pool.as_ref());

    containerd.stop();
    if let Err(e) = thinsnap.stop() {
        eprintln!("containerd-bench: {e:#}");
    }
    if let Some(p) = pool {
        if let Err(e) = p.destroy() {
            eprintln!("containerd-bench: cannot remove the devmapper pool: {e:#}");
        }
    }
    let results = result?;
    report::print(&results);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn measure(
    args: &Args,
    snapshotters: &[String],
    containerd: &Containerd,
    thinsnap: &Thinsnap,
    pool: Option<&DevmapperPool>,
) -> Result<Results> {
    let mut api = Api::connect(&containerd.socket, &containerd.namespace)?;
    api.create_lease()?;
    // thinsnap formats its base device at its first Prepare without a parent, once per
    // pool: not part of any timing. (devmapper formats a new device at every such
    // Prepare, which the imports measure.)
    for sn in snapshotters {
        api.create(sn, false, "warm-up", "")?;
        api.remove(sn, "warm-up")?;
    }
    api.gc()?;
    let images = image_part(args, snapshotters, containerd, thinsnap, &mut api)?;

    eprintln!("== Snapshots API: a committed base per snapshotter");
    for sn in snapshotters {
        api.create(sn, false, "base-a", "")?;
        api.commit(sn, "base", "base-a")?;
    }
    let mut phases = vec![api_phase(
        &mut api,
        snapshotters,
        args.iterations,
        "p0",
        "base only".into(),
        thinsnap,
    )?];
    eprintln!(
        "== filling to {} committed snapshots per snapshotter",
        args.committed
    );
    let fill_secs = fill(
        &containerd.socket,
        &containerd.namespace,
        snapshotters,
        args.committed,
        args.fill_clients,
    )?;
    phases.push(api_phase(
        &mut api,
        snapshotters,
        args.iterations,
        "p1",
        format!("{} committed", report::thousands(args.committed)),
        thinsnap,
    )?);

    let gc_chain = gc_phase(&mut api, snapshotters, GC_CHAIN)?;

    let dmsetup_ms = pool.map(|p| {
        let mut v = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let _ = setup::dmsetup(&args.dmsetup, &["info", &p.name]);
            v.push(t.elapsed());
        }
        thinsnap::bench::summarize(&mut v).p50
    });
    let rss = |pid| {
        (
            setup::status_kib(pid, "VmRSS"),
            setup::status_kib(pid, "VmHWM"),
        )
    };
    Ok(Results {
        snapshotters: snapshotters.to_vec(),
        images,
        phases,
        containerd_rss: rss(containerd.pid()),
        thinsnap_rss: rss(thinsnap.pid()),
        dmsetup_ms,
        fill_secs,
        committed: args.committed,
        gc_chain,
    })
}

/// For each snapshotter: a chain of `n` committed snapshots on the base (as an image's
/// layers are), then containerd's records of them removed (as `ctr images rm` leaves
/// them to the collector), then one synchronous garbage collection, timed: containerd
/// removes each from the snapshotter and calls its Cleanup.
fn gc_phase(api: &mut Api, snapshotters: &[String], n: u32) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for sn in snapshotters {
        eprintln!("== garbage collection of a chain of {n} committed snapshots on {sn}");
        let mut parent = "base".to_string();
        let mut chain = Vec::new();
        for i in 0..n {
            let (a, c) = (format!("chain-{i}-a"), format!("chain-{i}"));
            api.create(sn, false, &a, &parent)?;
            api.commit(sn, &c, &a)?;
            chain.push(c.clone());
            parent = c;
        }
        for c in chain.iter().rev() {
            api.remove(sn, c)?;
        }
        let secs = api.gc()?.as_secs_f64();
        eprintln!("  {sn}: {secs:.2} s");
        out.insert(sn.clone(), secs);
    }
    Ok(out)
}

/// Imports and `ctr run`, before the API phases fill the pools.
fn image_part(
    args: &Args,
    snapshotters: &[String],
    c: &Containerd,
    thinsnap: &Thinsnap,
    api: &mut Api,
) -> Result<ImageTimes> {
    let dir = c.socket.parent().unwrap().with_file_name("images");
    std::fs::create_dir_all(&dir)?;
    let mut t = ImageTimes {
        large_files: args.image_files / 3 * 3,
        ..Default::default()
    };
    let seed0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let mut run_image: HashMap<String, String> = HashMap::new();
    for round in 0..args.import_rounds {
        let mut order = snapshotters.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for sn in &order {
            let name = format!("cbench.local/busybox-{sn}:r{round}");
            let path = dir.join(format!("busybox-{sn}-{round}.tar"));
            let bytes = images::busybox_image(&path, &name, &format!("{sn} {round} {seed0}"))?;
            t.small_mb = bytes as f64 / 1e6;
            let from = thinsnap_log::len(&thinsnap.log);
            let secs = images::import(c, sn, &path, &name)?;
            eprintln!("import busybox ({:.1} MB) on {sn}: {secs:.2} s", t.small_mb);
            if sn == THINSNAP {
                let log = thinsnap_log::read(&thinsnap.log, from);
                t.thinsnap_share.push(("busybox import".into(), secs, log));
            }
            t.small.entry(sn.clone()).or_default().push(secs);
            run_image.entry(sn.clone()).or_insert(name);
            std::fs::remove_file(&path)?;
        }
        for (k, sn) in order.iter().enumerate() {
            let name = format!("cbench.local/large-{sn}:r{round}");
            let sub = dir.join(format!("large-{sn}-{round}"));
            let seed = seed0 ^ (u64::from(round) << 32) ^ (k as u64 + 1);
            let (archive, bytes) =
                images::large_image(&sub, &name, args.image_mb, args.image_files, seed)?;
            t.large_mb = bytes as f64 / 1e6;
            let from = thinsnap_log::len(&thinsnap.log);
            let secs = images::import(c, sn, &archive, &name)?;
            eprintln!("import large ({:.1} MB) on {sn}: {secs:.2} s", t.large_mb);
            if sn == THINSNAP {
                let log = thinsnap_log::read(&thinsnap.log, from);
                t.thinsnap_share.push(("large import".into(), secs, log));
            }
            t.large.entry(sn.clone()).or_default().push(secs);
            std::fs::remove_dir_all(&sub)?;
        }
    }
    for r in 0..args.runs {
        for sn in snapshotters {
            let id = format!("cbench-{sn}-{r}");
            let from = thinsnap_log::len(&thinsnap.log);
            let secs = images::run(c, sn, &run_image[sn], &id)?;
            eprintln!("ctr run --rm on {sn}: {secs:.2} s");
            if sn == THINSNAP {
                let log = thinsnap_log::read(&thinsnap.log, from);
                t.thinsnap_share.push(("ctr run".into(), secs, log));
            }
            t.run.entry(sn.clone()).or_default().push(secs);
            // The container's snapshot goes at the next garbage collection: now, untimed,
            // so that it does not run during the next measurement.
            api.gc()?;
        }
    }
    Ok(t)
}

/// `iterations` rounds of, for each snapshotter in turn: Prepare on the committed base,
/// Commit, View of the committed snapshot, Remove of the view and of the committed
/// snapshot, and the garbage collection that removes them from the snapshotter.
fn api_phase(
    api: &mut Api,
    snapshotters: &[String],
    iterations: u32,
    tag: &str,
    name: String,
    thinsnap: &Thinsnap,
) -> Result<Phase> {
    eprintln!("== Snapshots API, {name}: {iterations} cycles per snapshotter");
    let from = thinsnap_log::len(&thinsnap.log);
    let mut samples: HashMap<(String, Op), Vec<Duration>> = HashMap::new();
    let start = Instant::now();
    for i in 0..iterations {
        for sn in snapshotters {
            let (a, c, v) = (
                format!("{tag}-{i}-a"),
                format!("{tag}-{i}"),
                format!("{tag}-{i}-v"),
            );
            let mut push = |op, d| samples.entry((sn.clone(), op)).or_default().push(d);
            push(Op::Prepare, api.create(sn, false, &a, "base")?);
            push(Op::Commit, api.commit(sn, &c, &a)?);
            push(Op::View, api.create(sn, true, &v, &c)?);
            push(Op::Remove, api.remove(sn, &v)?);
            push(Op::Remove, api.remove(sn, &c)?);
            push(Op::Gc, api.gc()?);
        }
        if (i + 1) % 50 == 0 {
            eprintln!(
                "  {} cycles in {:.0} s",
                i + 1,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let has_thinsnap = snapshotters.iter().any(|s| s == THINSNAP);
    Ok(Phase {
        name,
        samples,
        thinsnap: if has_thinsnap {
            thinsnap_log::read(&thinsnap.log, from)
        } else {
            Default::default()
        },
    })
}

/// Prepare + Commit of `fill-<j>` on the base until each snapshotter has `to` of them,
/// `clients` connections per snapshotter, all snapshotters at once. Returns each
/// snapshotter's time.
fn fill(
    socket: &Path,
    namespace: &str,
    snapshotters: &[String],
    to: u32,
    clients: u32,
) -> Result<BTreeMap<String, f64>> {
    let clients = clients.max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = snapshotters
            .iter()
            .flat_map(|sn| (0..clients).map(move |c| (sn, c)))
            .map(|(sn, c)| {
                s.spawn(move || -> Result<(String, f64)> {
                    let t = Instant::now();
                    let mut api = Api::connect(socket, namespace)?;
                    let mut j = c;
                    while j < to {
                        api.create(sn, false, &format!("fill-{j}-a"), "base")?;
                        api.commit(sn, &format!("fill-{j}"), &format!("fill-{j}-a"))?;
                        j += clients;
                    }
                    Ok((sn.clone(), t.elapsed().as_secs_f64()))
                })
            })
            .collect();
        let mut secs: BTreeMap<String, f64> = BTreeMap::new();
        for h in handles {
            let (sn, t) = h.join().expect("fill thread")?;
            let e = secs.entry(sn).or_default();
            *e = e.max(t);
        }
        for (sn, t) in &secs {
            eprintln!("  {sn}: filled in {t:.0} s");
        }
        Ok(secs)
    })
}
