//! thinsnap's command line: parse, then dispatch to the library.

use clap::Parser;
use thinsnap::cli;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    if !matches!(cli.command, cli::Command::Serve) {
        // Like other command-line tools, end quietly when the reader of our output goes
        // away (`thinsnap snapshot list | head`). The daemon keeps Rust's default (ignored).
        // SAFETY: setting a signal disposition before any threads exist.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // Private by default: whatever thinsnap creates (pool files, the store, sockets before
    // their mode is set, exported images, backups) is root's alone unless it says otherwise.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    cli::init_logging(cli.log_filter());
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("thinsnap: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
