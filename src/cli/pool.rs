//! `thinsnap pool ...`: create, status, grow, destroy.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use thinpool::{units, ThinPool};

use crate::{config::Config, service::StateLock};

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
    ThinPool::open(&config.pool_name, &config.pool_source, &config.pool_options)
        .with_context(|| format!("cannot open pool {}", config.pool_name))
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
        PoolCmd::Status { json } => {
            let pool = open(config)?;
            let st = pool.status()?;
            // Counting needs a metadata snapshot, which a read-only pool cannot take.
            let n = pool.thin_ids().map(|ids| ids.len()).ok();
            if *json {
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
            } else {
                println!("pool            {}", config.pool_name);
                println!("source          {}", pool.describe_source());
                println!(
                    "data            {} / {} ({:.1}%)",
                    units::format_size(st.data_used_bytes()),
                    units::format_size(st.data_total_bytes()),
                    st.data_fraction() * 100.0
                );
                println!(
                    "metadata        {} / {} ({:.1}%)",
                    units::format_size(st.meta_used_bytes()),
                    units::format_size(st.meta_total_bytes()),
                    st.meta_fraction() * 100.0
                );
                println!(
                    "block size      {}",
                    units::format_size(units::sectors_to_bytes(st.block_size))
                );
                println!(
                    "mode            {}{}",
                    st.mode,
                    if st.needs_check { " (needs_check)" } else { "" }
                );
                println!("transaction id  {}", st.transaction_id);
                println!(
                    "low-water mark  {} blocks ({})",
                    st.low_water_mark.0,
                    units::format_size(
                        st.low_water_mark.0 * units::sectors_to_bytes(st.block_size)
                    )
                );
                match n {
                    Some(n) => println!("thin devices    {n}"),
                    None => println!("thin devices    unknown (the pool is not writable)"),
                }
            }
        }
        PoolCmd::Grow { data, metadata } => {
            let pool = open(config)?;
            let cur = pool.data_bytes()?;
            let new = match data.strip_prefix('+') {
                Some("0") => cur,
                Some(add) => cur + units::parse_size(add)?,
                None => units::parse_size(data)?,
            };
            let meta = metadata.as_deref().map(units::parse_size).transpose()?;
            pool.grow(new, meta)?;
            println!(
                "pool {} data: {} -> {}",
                config.pool_name,
                units::format_size(cur),
                units::format_size(pool.data_bytes()?)
            );
        }
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
        PoolCmd::Check => {
            let pool = open(config)?;
            match pool.check_metadata() {
                Ok(report) => {
                    print!("{report}");
                    println!("pool {}: metadata is consistent", config.pool_name);
                }
                Err(e) => {
                    eprintln!("pool {}: metadata check FAILED: {e}", config.pool_name);
                    eprintln!("stop thinsnap and containerd, deactivate the pool, and repair it with thin_repair (see docs/operations.md)");
                    return Ok(ExitCode::from(1));
                }
            }
        }
        PoolCmd::Repair => {
            let _lock = StateLock::acquire(&config.lock_path())?;
            let pool = open(config)?;
            let before = pool.status()?;
            // Devices only active for active snapshots go; the daemon re-activates them.
            for (id, name, dev) in pool.active_thins()? {
                let mounts = thinpool::fs::mounts_of(dev)?;
                if !mounts.is_empty() {
                    bail!(
                        "{} is mounted at {}: stop the containers using the pool first",
                        &*name,
                        mounts[0].display()
                    );
                }
                pool.deactivate(id, thinpool::RemoveMode::Now)?;
            }
            let (pool, report) = pool.repair()?;
            print!("{report}");
            let after = pool.status()?;
            println!(
                "pool {}: {}{} -> {}{}; start thinsnap again to re-activate active snapshots",
                config.pool_name,
                before.mode,
                if before.needs_check {
                    " (needs_check)"
                } else {
                    ""
                },
                after.mode,
                if after.needs_check {
                    " (needs_check)"
                } else {
                    ""
                }
            );
        }
        PoolCmd::Destroy { force } => {
            let _lock = StateLock::acquire(&config.lock_path())?;
            let store_path = config.store_path();
            if store_path.exists() {
                let store = crate::store::Store::open(&store_path, config.pool_name.as_str())?;
                let n = store.read()?.all()?.len();
                let v = store.read()?.volumes()?.len();
                drop(store);
                if (n > 0 || v > 0) && !force {
                    bail!("the store records {n} snapshot(s) and {v} volume(s) in pool {}: remove them first, or pass --force to destroy them all", config.pool_name);
                }
            }
            let pool = open(config)?;
            for (id, _, _) in pool.active_thins()? {
                pool.deactivate(id, thinpool::RemoveMode::Now)?;
            }
            pool.destroy()?;
            if store_path.exists() {
                std::fs::remove_file(&store_path)
                    .with_context(|| format!("cannot remove {}", store_path.display()))?;
            }
            println!("pool {} destroyed", config.pool_name);
        }
    }
    Ok(ExitCode::SUCCESS)
}
