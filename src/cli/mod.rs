//! The command line: `thinsnap <noun> <verb>`, one small file per noun.

mod gc;
mod image;
mod pool;
mod repair;
mod snapshot;
mod status;
mod table;

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing::info;

use crate::{
    config::{self, Config},
    service::{self, StateLock},
    snapshotter::Snapshotter,
};

/// Block-level thin-provisioning snapshots for containerd, on device-mapper thin pools.
#[derive(Debug, Parser)]
#[command(name = "thinsnap", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "THINSNAP_CONFIG", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Log filter (error, warn, info, debug, trace, or tracing's directives); default:
    /// info for `serve`, warn for other commands.
    #[arg(long, global = true, env = "THINSNAP_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve containerd's Snapshots API on the configured unix socket.
    Serve,
    /// Show, explain and check the configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Manage the thin pool.
    #[command(subcommand)]
    Pool(pool::PoolCmd),
    /// Inspect and manage snapshots through the running daemon.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    /// Report what startup reconciliation would change, without changing anything.
    Check,
    /// Reconcile the store with the pool: finish or roll back interrupted operations,
    /// delete orphaned thin devices, re-activate what active snapshots need.
    Repair,
    /// Import and export images
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Remove what containerd no longer references: finish pending removals, delete thin
    /// devices no snapshot records, remove stale devices; prints what it freed.
    Gc {
        /// Only report what would be done.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// How the running daemon is doing: pool space and mode, snapshots, pool grows,
    /// requests and errors (the figures its metrics endpoint serves).
    Status {
        /// Print the daemon's metrics in Prometheus text format instead.
        #[arg(long)]
        metrics: bool,
    },
    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (thinsnap.1 and one per subcommand) into a directory.
    Man {
        /// Output directory.
        dir: PathBuf,
    },
    /// Benchmarks (run them on real device-mapper, e.g. in `vagrant/vm`).
    #[command(subcommand)]
    Bench(crate::bench::BenchCmd),
}

/// `thinsnap config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the full default configuration file, every key documented.
    Default,
    /// Print the containerd `proxy_plugins` snippet for this configuration.
    Containerd,
    /// Validate the configuration file and print the result.
    Check,
}

/// Sets up logging to stderr with `filter`. With `THINSNAP_LOG_SPANS=1` in the environment,
/// the end of every span the filter admits is logged too, with the time spent in it
/// (`close time.busy=... time.idle=...`): a profile of each request, step by step down to
/// the device-mapper ioctls.
pub fn init_logging(filter: &str) {
    use tracing_subscriber::fmt::format::FmtSpan;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let spans = if std::env::var_os("THINSNAP_LOG_SPANS").is_some_and(|v| v == "1") {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(spans)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

impl Cli {
    /// The log filter: as given, else info for the daemon and warn for the CLI.
    pub fn log_filter(&self) -> &str {
        match (&self.log, &self.command) {
            (Some(l), _) => l,
            (None, Command::Serve) => "info",
            (None, _) => "warn",
        }
    }

    /// The configuration named on the command line (defaults if the default file is absent).
    pub fn load_config(&self) -> Result<Config> {
        let explicit = self.config.as_os_str() != config::DEFAULT_PATH;
        Config::load(&self.config, explicit)
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Config(ConfigCmd::Default) => {
            print!("{}", config::DEFAULT_TOML);
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCmd::Containerd) => {
            print!("{}", config::containerd_snippet(&cli.load_config()?.socket));
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCmd::Check) => {
            let c = cli.load_config()?;
            println!("{}: valid", cli.config.display());
            print!("{c}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve => serve(&cli.load_config()?),
        Command::Pool(cmd) => pool::run(&cli.load_config()?, cmd),
        Command::Snapshot(cmd) => snapshot::run(&cli.load_config()?, cmd),
        Command::Check => repair::run(&cli.load_config()?, false),
        Command::Repair => repair::run(&cli.load_config()?, true),
        Command::Image(cmd) => image::run(&cli.load_config()?, cmd),
        Command::Bench(crate::bench::BenchCmd::Import(opts)) => {
            crate::bench::import::run(&cli.load_config()?, opts)
        }
        Command::Gc { dry_run, json } => gc::run(&cli.load_config()?, *dry_run, *json),
        Command::Status { metrics } => status::run(&cli.load_config()?, *metrics),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "thinsnap", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write man pages to {}", dir.display()))?;
            println!("man pages written to {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(cmd) => crate::bench::run(cmd),
    }
}

fn serve(config: &Config) -> Result<ExitCode> {
    let _lock = StateLock::acquire(&config.lock_path())?;
    let socket = config.socket.clone();
    let snap = Snapshotter::open(config.clone()).context("cannot open the pool")?;
    let report = snap
        .recover(true)
        .context("startup reconciliation failed")?;
    for p in &report.problems {
        tracing::warn!("reconciliation: {p}");
    }
    info!(
        actions = report.actions.len(),
        problems = report.problems.len(),
        "reconciled store and pool"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(service::serve(Arc::new(snap), &socket))?;
    Ok(ExitCode::SUCCESS)
}
