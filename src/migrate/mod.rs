//! `thinsnap migrate docker-devicemapper`: takes over the thin pool and thin devices of
//! Docker's removed devicemapper storage driver as thinsnap snapshots, without copying data.
//!
//! 1. Read Docker's files ([`docker`]) and the pool's thin ids without changing anything
//!    ([`source::view`]); build the [`plan`] (the same for `--dry-run` and the real run).
//! 2. Refuse while dockerd runs or a device of Docker's is open or mounted; check (or
//!    write) thinsnap's configuration for the pool.
//! 3. Deactivate Docker's devices (and its loopback pool device); open the pool as
//!    thinsnap's; do what Docker's next start would have done (roll back its open
//!    transaction, delete devices it marked deleted). These steps are idempotent: after a
//!    crash the next run derives the same plan and repeats them harmlessly.
//! 4. One store transaction records every snapshot (thin id = Docker's device id), the
//!    base device, a next thin id above every id Docker or the pool used, and a job listing
//!    the filesystems still to flatten. From here the job drives a resumed run, and
//!    `thinsnap serve` refuses to start until it is finished.
//! 5. Each filesystem's `rootfs/` becomes its root ([`flatten`]), each step recorded in the
//!    job; container snapshots are activated; the job is marked finished.

pub mod docker;
pub mod flatten;
pub mod plan;
pub mod source;

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use thinpool::{failpoint::hit as fp, units, FsType, RemoveMode, ThinId};

use self::{
    docker::Layout,
    flatten::Step,
    plan::{Adopt, Plan, Role},
    source::DockerPool,
};
use thinsnap_core::{
    config::Config,
    labels::{KEEP_LABEL, REF_LABEL},
    state::StateLock,
    store::{Base, Device, Kind, Record, State, Store, Usage},
    Engine,
};

/// The job's name in the store.
pub const JOB: &str = "docker-devicemapper";
/// The note left in Docker's driver directory once its pool belongs to thinsnap.
pub const NOTE: &str = "MIGRATED-TO-THINSNAP";

/// What to migrate.
#[derive(Debug, Clone)]
pub struct Options {
    /// Docker's data root (`/var/lib/docker`).
    pub root: PathBuf,
    /// Only print the plan.
    pub dry_run: bool,
    /// Docker's `dm.thinpooldev`, when it used a pool of its own.
    pub thinpooldev: Option<String>,
    /// Docker's filesystem, when its metadata does not record it.
    pub filesystem: Option<FsType>,
}

/// The migration's progress, recorded in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    root: PathBuf,
    finished: bool,
    /// Thin id → what is left to do on its filesystem.
    pending: BTreeMap<u32, Pending>,
    /// What was adopted, printed when the job finishes (also after a resumed run).
    report: Vec<String>,
    /// Problems found along the way.
    problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    key: String,
    step: Step,
    /// An image layer or container: a failure stops the migration. Other devices' failures
    /// are reported and they stay as they are.
    must_work: bool,
}

/// Runs the migration (or with `dry_run`, prints its plan), with thinsnap's configuration
/// at `config_path` (written there if absent), printing progress to `out`.
///
/// # Errors
/// When Docker's storage cannot be read, the configuration does not fit the pool, Docker
/// still uses its devices, or a step fails; each error says what to do.
pub fn run(config_path: &Path, opts: &Options, out: &mut dyn Write) -> Result<()> {
    let config_exists = config_path.exists();
    let config = if config_exists {
        Config::load(config_path, true)?
    } else {
        Config::default()
    };
    let root = std::path::absolute(&opts.root)
        .with_context(|| format!("bad --root {}", opts.root.display()))?;
    // Keeps the daemon (and other writers) out for the whole run.
    let _lock = if opts.dry_run {
        None
    } else {
        Some(StateLock::acquire(&config.lock_path())?)
    };

    if config.store_path().exists() {
        if let Some(job) = read_job(&config)? {
            if job.root != root {
                bail!(
                    "thinsnap's store {} records a migration from {}, not {}: run it with --root {}",
                    config.store_path().display(),
                    job.root.display(),
                    root.display(),
                    job.root.display()
                );
            }
            if job.finished {
                writeln!(out, "{} was migrated already:", root.display())?;
                print_lines(out, &job)?;
                return Ok(());
            }
            if opts.dry_run {
                writeln!(out, "a migration from {} is unfinished; run without --dry-run to finish it. Nothing was changed (--dry-run).", root.display())?;
                return Ok(());
            }
            writeln!(
                out,
                "resuming the unfinished migration from {}",
                root.display()
            )?;
            let snap = Engine::open(config).context("cannot open the pool")?;
            return finish(&snap, job, out);
        }
    }

    let layout = Layout::read(&root)?;
    for w in &layout.warnings {
        writeln!(out, "warning: {w}")?;
    }
    let dp = DockerPool::find(&layout, opts.thinpooldev.as_deref())?;
    let docker_fs: FsType = match (layout.base_filesystem(), opts.filesystem) {
        (Some(fs), _) => fs.parse().with_context(|| {
            format!("Docker's deviceset-metadata names filesystem {fs:?}, which thinsnap does not support")
        })?,
        (None, Some(fs)) => fs,
        (None, None) => bail!("Docker's metadata does not record its filesystem (BaseDeviceFilesystem; Docker before 1.10): pass it with --filesystem ext4|xfs"),
    };
    let (view, block_size) = source::view(&dp, &config.pool_name)?;
    // A configuration the migration writes names Docker's filesystem (`config_lines`), so
    // Docker's base device becomes thinsnap's base device: the plan shown must say so too.
    let target_fs = if config_exists {
        config.filesystem
    } else {
        docker_fs
    };
    let plan = plan::build(&layout, &view, docker_fs, target_fs)?;

    writeln!(out, "Docker's devicemapper storage in {}:", root.display())?;
    writeln!(
        out,
        "  pool: {}, transaction id {}, {} thin device(s), blocks of {}",
        dp.describe(),
        view.transaction_id,
        view.thin_ids.len(),
        units::format_size(units::sectors_to_bytes(block_size))
    )?;
    writeln!(
        out,
        "  filesystem {docker_fs}; {} device(s), {} image layer(s), {} container(s) in Docker's metadata",
        layout.devices.len(),
        layout.layers.len(),
        layout.mounts.len()
    )?;
    let lines = dp.config_lines(&config.pool_name, block_size, docker_fs);
    let fits = dp.fits(&config, block_size);
    let config_note = if fits {
        format!(
            "thinsnap configuration {}: uses this pool",
            config_path.display()
        )
    } else if !config_exists {
        format!(
            "thinsnap configuration {}: {} with\n{}",
            config_path.display(),
            if opts.dry_run {
                "would be written"
            } else {
                "to be written"
            },
            indent(&lines)
        )
    } else {
        format!(
            "thinsnap configuration {} does not use this pool: set these keys in it (or name a new file with --config, which the migration writes)\n{}",
            config_path.display(),
            indent(&lines)
        )
    };
    let devices = source::active_devices(&layout, &dp)?;
    let mut busy = source::busy(&layout, &devices)?;
    if config.store_path().exists() {
        let store = Store::open(&config.store_path(), config.pool_name.as_str())?;
        let r = store.read()?;
        let n = r.all()?.len() + r.bases()?.len();
        if n > 0 {
            busy = Some(format!(
                "thinsnap's store {} already records {n} snapshot(s) or base device(s): migrate into a fresh state_dir (a configuration with another `state_dir`, and another `pool.name`)",
                config.store_path().display()
            ));
        }
    }
    writeln!(out, "plan:")?;
    write!(out, "{plan}")?;
    writeln!(out, "{config_note}")?;
    if opts.dry_run {
        if let Some(why) = &busy {
            writeln!(out, "the migration would refuse now: {why}")?;
        }
        writeln!(out, "dry run: nothing was changed")?;
        return Ok(());
    }
    if config_exists && !fits {
        bail!("{config_note}");
    }
    if let Some(why) = busy {
        bail!(why);
    }
    if !config_exists {
        write_config(config_path, &root, &lines)?;
        writeln!(out, "wrote {}", config_path.display())?;
    }
    let config = if config_exists {
        config
    } else {
        Config::load(config_path, true)?
    };

    // Docker's devices go; its pool becomes thinsnap's.
    for d in devices.iter().filter(|d| d.thin) {
        thinpool::dm::remove(&d.name, RemoveMode::Now)
            .with_context(|| format!("cannot deactivate Docker's device {}", &*d.name))?;
    }
    if let DockerPool::Loopback { dm_name, .. } = &dp {
        if let Some(pool) = devices
            .iter()
            .find(|d| !d.thin && &d.name.to_string() == dm_name)
        {
            thinpool::dm::remove(&pool.name, RemoveMode::Now)
                .with_context(|| format!("cannot deactivate Docker's pool {dm_name}"))?;
        }
    }
    fp("migrate.after-deactivate");
    let snap = Engine::open(config.clone()).context("cannot open the pool")?;
    let pv = snap.pool_view()?;
    let view = plan::PoolView {
        transaction_id: pv.transaction_id,
        thin_ids: pv.thin_ids.into_iter().map(ThinId::get).collect(),
    };
    let plan = plan::build(&layout, &view, docker_fs, config.filesystem)?;
    for d in plan.deletes.iter().filter(|d| d.in_pool) {
        snap.delete_unadopted(ThinId::new(d.thin_id)?)
            .with_context(|| format!("cannot delete thin id {} ({})", d.thin_id, d.why))?;
        writeln!(out, "deleted thin id {}: {}", d.thin_id, d.why)?;
    }
    fp("migrate.after-delete");
    let job = record(&snap, &root, &plan)?;
    fp("migrate.after-record");
    writeln!(
        out,
        "recorded {} snapshot(s){} in {}",
        plan.snapshots.len(),
        if plan.base.is_some() {
            " and the base device"
        } else {
            ""
        },
        config.store_path().display()
    )?;
    finish(&snap, job, out)
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("    {l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn print_lines(out: &mut dyn Write, job: &Job) -> Result<()> {
    for l in &job.report {
        writeln!(out, "  {l}")?;
    }
    for p in &job.problems {
        writeln!(out, "  problem: {p}")?;
    }
    Ok(())
}

fn read_job(config: &Config) -> Result<Option<Job>> {
    let store = Store::open(&config.store_path(), config.pool_name.as_str())?;
    let raw = store.read()?.job(JOB)?;
    raw.map(|b| serde_json::from_slice(&b).context("the store's migration record is unreadable"))
        .transpose()
}

fn write_config(path: &Path, root: &Path, lines: &str) -> Result<()> {
    let text = format!(
        "# Written by `thinsnap migrate docker-devicemapper --root {}`: thinsnap serves the\n# thin pool and devices of Docker's devicemapper storage driver. Every other key has its\n# default (`thinsnap config default` lists them all).\n{lines}",
        root.display()
    );
    Config::parse(&text).context("the migration made an invalid configuration (a bug)")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("toml.partial");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::File::open(&tmp).and_then(|f| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn to_record(a: &Adopt) -> Result<Record> {
    let mut labels = BTreeMap::new();
    if let Some(h) = &a.docker_hash {
        let h = if h.is_empty() { "base" } else { h };
        labels.insert(plan::DOCKER_DEVICE_LABEL.to_string(), h.to_string());
    }
    if a.role == Role::Layer {
        // How containerd finds a layer a snapshotter already has: its pull unpacker's
        // Prepare carries this label, and on AlreadyExists containerd looks for a committed
        // snapshot with the same label and parent; without it the pull fails (NotFound).
        labels.insert(REF_LABEL.to_string(), a.key.clone());
    }
    // containerd knows none of them: its garbage collector would remove them all.
    labels.insert(KEEP_LABEL.to_string(), JOB.to_string());
    let mut device = Device::creating(ThinId::new(a.thin_id)?, a.size, a.fs);
    device.state = State::Ready;
    Ok(Record::new(
        &a.key,
        a.kind,
        a.parent.clone(),
        labels,
        device,
    ))
}

fn summary(plan: &Plan) -> Vec<String> {
    let count = |role: Role| plan.snapshots.iter().filter(|a| a.role == role).count();
    let mut lines = vec![format!(
        "{} image layer(s) as committed snapshots named by chain id, {} container(s) as active snapshots `docker/container/<id>` on their committed `-init` layers",
        count(Role::Layer),
        count(Role::Container)
    )];
    match &plan.base {
        Some(b) => lines.push(format!(
            "Docker's base device (thin id {}) as thinsnap's {} base device",
            b.thin_id, b.fs
        )),
        None => lines.push("no base device adopted: thinsnap makes one when it needs it".into()),
    }
    for a in plan
        .snapshots
        .iter()
        .filter(|a| matches!(a.role, Role::Orphan | Role::Leaked))
    {
        lines.push(format!("{} (thin id {}): {}", a.key, a.thin_id, a.note));
    }
    for d in &plan.deletes {
        lines.push(format!(
            "{} thin id {}: {}",
            if d.in_pool {
                "deleted"
            } else {
                "already gone:"
            },
            d.thin_id,
            d.why
        ));
    }
    lines.push(format!(
        "{} filesystem(s) have their rootfs/ as their root now; the next thin id is {}",
        plan.flattens(),
        plan.next_thin_id
    ));
    lines
}

/// The store transaction that makes the plan thinsnap's: every record, the base device,
/// the next thin id and the job.
fn record(snap: &Engine, root: &Path, plan: &Plan) -> Result<Job> {
    let mut job = Job {
        root: root.to_path_buf(),
        finished: false,
        pending: BTreeMap::new(),
        report: summary(plan),
        problems: plan.problems.clone(),
    };
    let base = plan
        .base
        .as_ref()
        .map(|b| to_record(b).map(|r| Base::new(r.device)))
        .transpose()?;
    let mut records = Vec::with_capacity(plan.snapshots.len());
    for a in &plan.snapshots {
        records.push(to_record(a)?);
        job.pending.insert(
            a.thin_id,
            Pending {
                key: a.key.clone(),
                step: if a.flatten {
                    Step::Stage
                } else {
                    Step::Measure
                },
                must_work: matches!(a.role, Role::Layer | Role::Init | Role::Container),
            },
        );
    }
    snap.adopt(
        base.as_ref(),
        &records,
        plan.next_thin_id,
        JOB,
        &serde_json::to_vec(&job)?,
    )?;
    Ok(job)
}

fn save(snap: &Engine, job: &Job, record: Option<&Record>) -> Result<()> {
    snap.save_job(JOB, &serde_json::to_vec(job)?, job.finished, record)?;
    Ok(())
}

/// Flattens and measures every pending filesystem, activates the container snapshots and
/// marks the job finished.
fn finish(snap: &Engine, mut job: Job, out: &mut dyn Write) -> Result<()> {
    // A run killed while a filesystem was mounted left that mount behind.
    let dirs = snap.config().temp_mounts()?;
    for stale in dirs.stale()? {
        dirs.remove(&stale)?;
    }
    let total = job.pending.len();
    let ids: Vec<u32> = job.pending.keys().copied().collect();
    for (n, id) in ids.into_iter().enumerate() {
        let p = job.pending[&id].clone();
        let mut rec = snap
            .snapshot_record(&p.key)?
            .with_context(|| format!("the store lost snapshot {:?} during the migration", p.key))?;
        let res = process(snap, &rec, p.step, &dirs, &mut || {
            if let Some(e) = job.pending.get_mut(&id) {
                e.step = Step::Move;
            }
            save(snap, &job, None)?;
            fp("migrate.after-stage");
            Ok(())
        });
        match res {
            Ok(usage) => {
                fp("migrate.after-flatten");
                if rec.kind == Kind::Committed {
                    rec.usage = Some(usage);
                }
                job.pending.remove(&id);
                save(snap, &job, Some(&rec))?;
                if p.step != Step::Measure {
                    writeln!(out, "[{}/{total}] {}: rootfs/ is its root", n + 1, p.key)?;
                }
            }
            Err(e) if !p.must_work => {
                let why = format!("{} (thin id {id}) was adopted as it is: {e:#}", p.key);
                writeln!(out, "problem: {why}")?;
                job.problems.push(why);
                job.pending.remove(&id);
                save(snap, &job, None)?;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "cannot make the rootfs/ of {} (thin id {id}) its root; fix the cause and run the migration again to continue",
                    p.key
                )));
            }
        }
    }
    snap.activate_actives()?;
    job.finished = true;
    save(snap, &job, None)?;
    let note = job.root.join("devicemapper").join(NOTE);
    let text = format!(
        "This storage of Docker's devicemapper driver was migrated to thinsnap (pool {:?}).\nIts thin pool and devices belong to thinsnap now: do not start Docker's devicemapper\ndriver on it again. See thinsnap's docs/docker.md.\n",
        snap.config().pool_name.as_str()
    );
    if let Err(e) = std::fs::write(&note, text) {
        writeln!(out, "warning: cannot write {}: {e}", note.display())?;
    }
    writeln!(out, "migrated {}:", job.root.display())?;
    print_lines(out, &job)?;
    writeln!(
        out,
        "start thinsnap (`systemctl start thinsnap`); `thinsnap snapshot tree` shows what was adopted"
    )?;
    Ok(())
}

/// Activates one adopted device, runs its pending step(s), measures it and deactivates it.
fn process(
    snap: &Engine,
    rec: &Record,
    step: Step,
    dirs: &thinpool::MountDir,
    staged: &mut dyn FnMut() -> Result<()>,
) -> Result<Usage> {
    let fs = rec.device.fs;
    let (inodes, bytes) = snap.with_adopted_device(rec, |dev| -> Result<u64> {
        if step == Step::Measure {
            return Ok(thinpool::fs::used_inodes(fs, &dev.devnode).unwrap_or(0));
        }
        let mnt = dirs.create("migrate")?;
        let mut options = fs.required_options().to_vec();
        options.extend(thinpool::mountdir::PRIVATE_OPTIONS);
        if let Err(e) = thinpool::fs::mount(&dev.devnode, &mnt, fs, &options) {
            let _ = dirs.remove(&mnt);
            return Err(e.into());
        }
        let flattened = (|| -> Result<u64> {
            if step == Step::Stage {
                flatten::stage(&mnt)?;
                staged()?;
            }
            flatten::move_up(&mnt)?;
            let st = nix::sys::statvfs::statvfs(&mnt)?;
            Ok(st.files().saturating_sub(st.files_free()))
        })();
        let unmounted = dirs.remove(&mnt);
        let inodes = flattened?;
        unmounted?;
        Ok(inodes)
    })?;
    Ok(Usage { bytes, inodes })
}
