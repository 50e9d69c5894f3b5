//! `thinsnap gc`: garbage collection through the running daemon, or in-process (under the
//! state lock) when none runs.

use std::process::ExitCode;

use anyhow::{Context, Result};
use thinpool::units::format_size;

use thinsnap_core::{config::Config, state::StateLock, Engine};

use crate::service::client::Client;

/// Runs gc and prints what it freed (or would free).
pub fn run(config: &Config, dry_run: bool, json: bool) -> Result<ExitCode> {
    let (actions, problems, notes, freed) = match Client::connect(&config.socket) {
        Ok(mut c) => {
            let r = c.gc(dry_run)?;
            (r.actions, r.problems, r.notes, r.freed_bytes)
        }
        Err(_) if config.socket.exists() && StateLock::acquire(&config.lock_path()).is_err() => {
            anyhow::bail!(
                "the daemon holds {} but does not answer on {}: check `systemctl status thinsnap`",
                config.lock_path().display(),
                config.socket.display()
            )
        }
        Err(_) => {
            let _lock = StateLock::acquire(&config.lock_path())?;
            let snap = Engine::open(config.clone()).context("cannot open the pool")?;
            let (r, freed) = snap.gc(dry_run)?;
            (r.actions, r.problems, r.notes, freed)
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"dry_run": dry_run, "actions": actions, "problems": problems, "notes": notes, "freed_bytes": freed})
        );
    } else {
        let verb = if dry_run { "would" } else { "did" };
        for a in &actions {
            println!("{verb}: {a}");
        }
        for p in &problems {
            println!("problem: {p}");
        }
        for n in &notes {
            println!("note: {n}");
        }
        if actions.is_empty() {
            println!("nothing to collect");
        } else if !dry_run {
            println!("freed {} of pool data space", format_size(freed));
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
