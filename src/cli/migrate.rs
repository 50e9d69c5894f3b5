//! `thinsnap migrate ...`: take over another storage driver's devices.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::Subcommand;

use crate::migrate::{self, Options};

/// `thinsnap migrate ...`
#[derive(Debug, Subcommand)]
pub enum MigrateCmd {
    /// Take over the thin pool and devices of Docker's devicemapper storage driver as
    /// thinsnap snapshots, without copying data: image layers become committed snapshots
    /// named by chain id, containers active snapshots. Stop Docker first; run with
    /// --dry-run to see the plan. Resumes after an interruption when run again.
    DockerDevicemapper {
        /// Docker's data root (dockerd's --data-root).
        #[arg(long, default_value = "/var/lib/docker")]
        root: PathBuf,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The thin pool Docker was given with `--storage-opt dm.thinpooldev=...` (its
        /// direct-lvm and loopback pools are found by themselves).
        #[arg(long, value_name = "DM_NAME")]
        thinpooldev: Option<String>,
        /// Docker's filesystem (ext4 or xfs), only needed when its metadata does not say.
        #[arg(long)]
        filesystem: Option<thinpool::FsType>,
    },
}

/// Runs a migrate command with the configuration file at `config`.
pub fn run(config: &std::path::Path, cmd: &MigrateCmd) -> Result<ExitCode> {
    match cmd {
        MigrateCmd::DockerDevicemapper {
            root,
            dry_run,
            thinpooldev,
            filesystem,
        } => {
            let opts = Options {
                root: root.clone(),
                dry_run: *dry_run,
                thinpooldev: thinpooldev.clone(),
                filesystem: *filesystem,
            };
            migrate::run(config, &opts, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
