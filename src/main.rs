//! thinsnap's command line: parse, then dispatch to the library.

use clap::Parser;
use thinsnap::cli;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    cli::init_logging(cli.log_filter());
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("thinsnap: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
