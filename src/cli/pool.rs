//! `thinsnap pool ...`: create, status, grow, destroy.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use thinpool::{units, ThinPool};

use thinsnap_core::{config::Config, pool_admin, state::StateLock};

/// `thinsnap pool ...`
#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Create (or activate) the configured pool.
    Create,
    /// Show the pool's space, mode and transaction id.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Grow the pool's data space (and optionally its metadata space) online.
    Grow {
        /// New data size, e.g. 200G, or +50G to add.
        data: String,
        /// New metadata size, e.g. 4G.
        #[arg(long)]
        metadata: Option<String>,
    },
    /// Check the pool's metadata with thin_check (on a metadata snapshot of the live pool).
    Check,
    /// Back up the pool's metadata (thin_dump XML of a metadata snapshot; the pool stays
    /// live). Restore with thin_restore; back up the store with it (see docs/operations.md).
    Backup {
        /// The XML file to write.
        file: std::path::PathBuf,
    },
    /// Repair a pool the kernel made read-only or flagged needs_check (after an I/O or
    /// metadata error): with thinsnap stopped and no container using the pool, check (and
    /// if needed rebuild) its metadata and activate it again.
    Repair,
    /// Deactivate the pool and delete its storage (loopback files or LVM volume).
    Destroy {
        /// Destroy even if the metadata store records snapshots.
        #[arg(long)]
        force: bool,
    },
}

fn open(config: &Config) -> Result<ThinPool> {
    pool_admin::open_pool(config).with_context(|| format!("cannot open pool {}", config.pool_name))
}

/// Runs a pool command.
pub fn run(config: &Config, cmd: &PoolCmd) -> Result<ExitCode> {
    match cmd {
        PoolCmd::Create => {
            let pool = open(config)?;
            println!(
                "pool {} is active: {}",
                config.pool_name,
                pool.describe_source()
            );
        }
        PoolCmd::Status { json } => status(config, *json)?,
        PoolCmd::Grow { data, metadata } => grow(config, data, metadata.as_deref())?,
        PoolCmd::Backup { file } => {
            let pool = open(config)?;
            pool.backup_metadata(file)?;
            println!(
                "pool {}: metadata written to {} (transaction id {})",
                config.pool_name,
                file.display(),
                pool.status()?.transaction_id
            );
        }
        PoolCmd::Check => return check(config),
        PoolCmd::Repair => {
            let _lock = StateLock::acquire(&config.lock_path())?;
            let r = pool_admin::repair_pool(config)?;
            print!("{}", r.report);
            let show = |(mode, check): (thinpool::PoolMode, bool)| {
                format!("{mode}{}", if check { " (needs_check)" } else { "" })
            };
            println!(
                "pool {}: {} -> {}; start thinsnap again to re-activate active snapshots",
                config.pool_name,
                show(r.before),
                show(r.after)
            );
        }
        PoolCmd::Destroy { force } => {
            let _lock = StateLock::acquire(&config.lock_path())?;
            pool_admin::destroy_pool(config, *force)?;
            println!("pool {} destroyed", config.pool_name);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `thinsnap pool status [--json]`.
fn status(config: &Config, json: bool) -> Result<()> {
    let pool = open(config)?;
    let st = pool.status()?;
    // Counting needs a metadata snapshot, which a read-only pool cannot take.
    let n = pool.thin_ids().map(|ids| ids.len()).ok();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "pool": config.pool_name.as_str(),
                "source": pool.describe_source(),
                "data_used_bytes": st.data_used_bytes(),
                "data_total_bytes": st.data_total_bytes(),
                "metadata_used_bytes": st.meta_used_bytes(),
                "metadata_total_bytes": st.meta_total_bytes(),
                "block_size_bytes": units::sectors_to_bytes(st.block_size),
                "transaction_id": st.transaction_id,
                "mode": st.mode.to_string(),
                "needs_check": st.needs_check,
                "low_water_mark_blocks": st.low_water_mark.0,
                "thin_devices": n,
                "active_thin_devices": pool.active_thins()?.len(),
            })
        );
        return Ok(());
    }
    let share = |used: u64, total: u64| {
        format!(
            "{} / {} ({:.1}%)",
            units::format_size(used),
            units::format_size(total),
            used as f64 / total.max(1) as f64 * 100.0
        )
    };
    println!("pool            {}", config.pool_name);
    println!("source          {}", pool.describe_source());
    println!(
        "data            {}",
        share(st.data_used_bytes(), st.data_total_bytes())
    );
    println!(
        "metadata        {}",
        share(st.meta_used_bytes(), st.meta_total_bytes())
    );
    let block = units::sectors_to_bytes(st.block_size);
    println!("block size      {}", units::format_size(block));
    let check = if st.needs_check { " (needs_check)" } else { "" };
    println!("mode            {}{check}", st.mode);
    println!("transaction id  {}", st.transaction_id);
    println!(
        "low-water mark  {} blocks ({})",
        st.low_water_mark.0,
        units::format_size(st.low_water_mark.0 * block)
    );
    match n {
        Some(n) => println!("thin devices    {n}"),
        None => println!("thin devices    unknown (the pool is not writable)"),
    }
    Ok(())
}

/// `thinsnap pool grow DATA [--metadata SIZE]`: DATA is a size or `+SIZE` to add.
fn grow(config: &Config, data: &str, metadata: Option<&str>) -> Result<()> {
    let pool = open(config)?;
    let cur = pool.data_bytes()?;
    let new = match data.strip_prefix('+') {
        Some("0") => cur,
        Some(add) => cur + units::parse_size(add)?,
        None => units::parse_size(data)?,
    };
    let meta = metadata.map(units::parse_size).transpose()?;
    pool.grow(new, meta)?;
    println!(
        "pool {} data: {} -> {}",
        config.pool_name,
        units::format_size(cur),
        units::format_size(pool.data_bytes()?)
    );
    Ok(())
}

/// `thinsnap pool check`: exit 1 when the metadata is not consistent.
fn check(config: &Config) -> Result<ExitCode> {
    let pool = open(config)?;
    match pool.check_metadata() {
        Ok(report) => {
            print!("{report}");
            println!("pool {}: metadata is consistent", config.pool_name);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("pool {}: metadata check FAILED: {e}", config.pool_name);
            eprintln!("stop thinsnap and containerd, deactivate the pool, and repair it with `thinsnap pool repair` (see docs/operations.md)");
            Ok(ExitCode::from(1))
        }
    }
}
