//! `thinsnap image import` and `thinsnap image export`: image archives into committed
//! snapshots and snapshots out as tars, through the running daemon's socket.

use std::{
    io::IsTerminal,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use thinsnap_core::config::Config;

use crate::{
    image::{self, Progress},
    service::client::Client,
};

/// `thinsnap image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Import an image archive (`docker save` or an OCI image layout tar) as one committed
    /// snapshot per layer, named by containerd's chain ids; layers already present are
    /// reused.
    Import {
        /// The archive.
        file: PathBuf,
        /// Image name recorded on the layers (label containerd.io/snapshot/thinsnap.image);
        /// also chooses among several images in one archive. Default: the name the archive
        /// records, else the file name.
        #[arg(long = "ref")]
        reference: Option<String>,
    },
    /// Export the flattened filesystem of a snapshot (committed, active or view) as a tar.
    Export {
        /// Snapshot key, e.g. the top chain id an import printed.
        snapshot: String,
        /// Output file (`-` for standard output); written under a temporary name and
        /// renamed into place when complete.
        file: PathBuf,
    },
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // A second signal: the user insists.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) }
    }
}

/// Makes SIGINT, SIGTERM and SIGHUP ask the import or export to stop cleanly (a second one
/// exits at once).
fn catch_signals() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only touches an atomic and calls _exit.
        unsafe { sigaction(s, &action) }.context("cannot install signal handlers")?;
    }
    Ok(())
}

/// Progress on standard error: a bar on a terminal, log lines otherwise.
struct Reporter {
    bar: Option<ProgressBar>,
    tty: bool,
}

impl Reporter {
    fn new() -> Reporter {
        Reporter {
            bar: None,
            tty: std::io::stderr().is_terminal(),
        }
    }
}

impl Progress for Reporter {
    fn start(&mut self, what: &str, total: u64) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if self.tty {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = if total > 0 {
                ProgressStyle::with_template(
                    "{msg:32} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta}",
                )
            } else {
                ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            };
            if let Ok(s) = style {
                b.set_style(s.progress_chars("=> "));
            }
            b.set_message(what.to_string());
            b.enable_steady_tick(Duration::from_millis(200));
            self.bar = Some(b);
        } else if total > 0 {
            eprintln!("thinsnap: {what} ({:.1} MB)", total as f64 / 1e6);
        } else {
            eprintln!("thinsnap: {what}");
        }
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    fn done(&mut self, summary: &str) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        eprintln!("thinsnap: {summary}");
    }

    fn cancelled(&self) -> bool {
        INTERRUPTED.load(Ordering::SeqCst)
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Runs an image command against the daemon.
pub fn run(config: &Config, cmd: &ImageCmd) -> Result<ExitCode> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("image import and export mount snapshots: run them as root");
    }
    let mut client = Client::connect(&config.socket)?;
    let dirs = config
        .temp_mounts()
        .context("cannot open the private mount directory")?;
    catch_signals()?;
    let mut progress = Reporter::new();
    match cmd {
        ImageCmd::Import { file, reference } => {
            let r = image::import(
                &mut client,
                &dirs,
                file,
                reference.as_deref(),
                &mut progress,
            )
            .context("import failed")?;
            let bytes = r.tar_bytes();
            println!(
                "imported {} ({}, config {}): {} layers imported, {} already present; {:.1} MB \
                 in {:.1} s ({:.1} MB/s)",
                r.image,
                r.format,
                r.config.short(),
                r.imported(),
                r.skipped(),
                bytes as f64 / 1e6,
                r.seconds,
                bytes as f64 / 1e6 / r.seconds.max(1e-9)
            );
            match r.top() {
                Some(top) => println!("top snapshot: {top}"),
                None => println!("the image has no layers"),
            }
        }
        ImageCmd::Export { snapshot, file } => {
            let started = Instant::now();
            let s = image::export(&mut client, &dirs, snapshot, file, &mut progress)
                .context("export failed")?;
            let secs = started.elapsed().as_secs_f64();
            let line = format!(
                "exported {snapshot} to {}: {} entries, {:.1} MB of file data in {secs:.1} s \
                 ({:.1} MB/s)",
                file.display(),
                s.entries,
                s.bytes as f64 / 1e6,
                s.bytes as f64 / 1e6 / secs.max(1e-9)
            );
            if file.as_os_str() == "-" {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
