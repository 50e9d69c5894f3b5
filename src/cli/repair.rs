//! `thinsnap check` and `thinsnap repair`: reconciliation of the store with the pool.

use std::process::ExitCode;

use anyhow::{Context, Result};

use thinsnap_core::{config::Config, state::StateLock, Engine};

/// Reports (or with `apply`, performs) reconciliation; exits 1 when `check` finds work.
pub fn run(config: &Config, apply: bool) -> Result<ExitCode> {
    let _lock = StateLock::acquire(&config.lock_path())?;
    let snap = Engine::open(config.clone()).context("cannot open the pool")?;
    let report = snap.recover(apply)?;
    let verb = if apply { "done" } else { "needed" };
    for a in &report.actions {
        println!("{verb}: {a}");
    }
    if apply {
        // Removed snapshots' devices the daemon did not get to.
        let n = snap.cleanup()?;
        if n > 0 {
            println!("done: reclaimed {n} removed snapshot(s)' devices");
        }
    }
    for p in &report.problems {
        println!("problem: {p}");
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    if report.is_clean() {
        println!(
            "store and pool agree: {} snapshot(s), {} volume(s), nothing to do",
            snap.records()?.len(),
            snap.volumes()?.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if apply && report.problems.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    Ok(ExitCode::from(1))
}
