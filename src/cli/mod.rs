//! The command line: `thinsnap <noun> <verb>`, one small file per noun.

mod gc;
mod image;
mod migrate;
mod pool;
mod repair;
mod snapshot;
mod status;
mod table;
mod volume;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use thinsnap_core::config::{self, Config};

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
    /// re-activate what active snapshots need; thin devices no record owns are left alone.
    Repair,
    /// Import and export images
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Docker volumes, through the running daemon's volume plugin socket.
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Take over another storage driver's devices (Docker's devicemapper driver).
    #[command(subcommand)]
    Migrate(migrate::MigrateCmd),
    /// Remove what containerd no longer references: finish pending removals and remove
    /// stale devices; prints what it freed.
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
        Ok(Config::load(&self.config, explicit)?)
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
        Command::Serve => crate::daemon::run(&cli.load_config()?),
        Command::Pool(cmd) => pool::run(&cli.load_config()?, cmd),
        Command::Snapshot(cmd) => snapshot::run(&cli.load_config()?, cmd),
        Command::Check => repair::run(&cli.load_config()?, false),
        Command::Repair => repair::run(&cli.load_config()?, true),
        Command::Image(cmd) => image::run(&cli.load_config()?, cmd),
        Command::Volume(cmd) => volume::run(&cli.load_config()?, cmd),
        Command::Migrate(cmd) => migrate::run(&cli.config, cmd),
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;

    /// Every `thinsnap ...` command in a shell block of the README and docs/ parses with
    /// this CLI, so the docs cannot drift from its syntax (the VM demo and the tests run
    /// them).
    #[test]
    fn every_documented_command_parses() {
        let docs = [
            ("README.md", include_str!("../../README.md")),
            (
                "docs/containerd.md",
                include_str!("../../docs/containerd.md"),
            ),
            (
                "docs/operations.md",
                include_str!("../../docs/operations.md"),
            ),
            ("docs/images.md", include_str!("../../docs/images.md")),
            (
                "docs/reliability.md",
                include_str!("../../docs/reliability.md"),
            ),
            (
                "docs/architecture.md",
                include_str!("../../docs/architecture.md"),
            ),
            (
                "docs/benchmarks.md",
                include_str!("../../docs/benchmarks.md"),
            ),
            ("docs/vm.md", include_str!("../../docs/vm.md")),
            ("docs/docker.md", include_str!("../../docs/docker.md")),
        ];
        let mut checked = 0;
        let mut bad = Vec::new();
        for (file, text) in docs {
            let mut in_shell = false;
            for line in text.lines() {
                let t = line.trim();
                if t.starts_with("```") {
                    in_shell = !in_shell && matches!(t, "```sh" | "```bash" | "```console");
                    continue;
                }
                if !in_shell {
                    // Inline code: `thinsnap ...` spans.
                    for span in t.split('`').skip(1).step_by(2) {
                        if let Some(rest) = span.strip_prefix("thinsnap ") {
                            let args: Vec<String> = std::iter::once("thinsnap".to_string())
                                .chain(placeholders(rest).split_whitespace().map(str::to_string))
                                .collect();
                            checked += 1;
                            if let Err(e) = Cli::try_parse_from(&args) {
                                if !matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | clap::error::ErrorKind::MissingRequiredArgument | clap::error::ErrorKind::MissingSubcommand) {
                                    bad.push(format!("{file}: `{}`: {}", args.join(" "), e.kind()));
                                }
                            }
                        }
                    }
                    continue;
                }
                if t.starts_with('#') {
                    continue;
                }
                // Each command of the line: placeholders (`<chain id>`) become a word, then
                // split at shell operators, drop comments.
                let code = placeholders(t.split(" #").next().unwrap_or(""));
                for cmd in code.split(['|', ';', '&', '>', '<', '(', ')']) {
                    let words: Vec<&str> = cmd.split_whitespace().collect();
                    let Some(pos) = words.iter().position(|w| {
                        *w == "thinsnap"
                            || *w == "$T"
                            || (w.ends_with("/thinsnap") && !w.contains('='))
                    }) else {
                        continue;
                    };
                    if words[..pos].iter().any(|w| !matches!(*w, "sudo" | "exec")) {
                        continue; // an argument of another command (e.g. `install ... thinsnap`)
                    }
                    let args: Vec<String> = std::iter::once("thinsnap".to_string())
                        .chain(
                            words[pos + 1..]
                                .iter()
                                .map(|w| w.trim_matches(['\'', '"']).to_string()),
                        )
                        .collect();
                    checked += 1;
                    if let Err(e) = Cli::try_parse_from(&args) {
                        if !matches!(
                            e.kind(),
                            clap::error::ErrorKind::DisplayHelp
                                | clap::error::ErrorKind::DisplayVersion
                        ) {
                            bad.push(format!("{file}: `{}`: {}", args.join(" "), e.kind()));
                        }
                    }
                }
            }
        }
        assert!(
            bad.is_empty(),
            "documented commands that do not parse:\n{}",
            bad.join("\n")
        );
        assert!(checked >= 60, "only {checked} documented commands found");
    }

    /// Replaces `<...>` placeholders (those starting with a letter) with `X`.
    fn placeholders(s: &str) -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('<') {
            let after = &rest[i + 1..];
            match after.find('>') {
                Some(j) if after.starts_with(|c: char| c.is_ascii_alphabetic()) => {
                    out.push_str(&rest[..i]);
                    out.push('X');
                    rest = &after[j + 1..];
                }
                _ => {
                    out.push_str(&rest[..=i]);
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }
}
