//! Which process owns the temporary snapshot of an import or export, so that the daemon can
//! tell one in progress from one abandoned by a process that was killed midway.
//!
//! The owner is recorded in the snapshot's [`IMPORTING_LABEL`](crate::labels::IMPORTING_LABEL) or
//! [`EXPORTING_LABEL`](crate::labels::EXPORTING_LABEL) as `PID:START`, the process id and its start
//! time in clock ticks since boot (`/proc/PID/stat`), so a recycled process id is not
//! mistaken for the owner.

use std::path::Path;

/// The label value naming this process.
pub fn current() -> String {
    let pid = std::process::id();
    match start_time(pid) {
        Some(start) => format!("{pid}:{start}"),
        None => pid.to_string(),
    }
}

/// Whether the process named by label value `tag` still runs. A value that names no
/// process id counts as running: it was not written by thinsnap, so it is left alone.
pub fn alive(tag: &str) -> bool {
    let (pid, start) = match tag.split_once(':') {
        Some((p, s)) => (p, s.parse::<u64>().ok()),
        None => (tag, None),
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return true;
    };
    match (start_time(pid), start) {
        (None, _) => false,
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
    }
}

/// The process id in label value `tag`, if it has one.
pub fn pid(tag: &str) -> Option<u32> {
    tag.split(':').next()?.parse().ok()
}

/// Start time of process `pid` in clock ticks since boot, or None if it does not exist.
fn start_time(pid: u32) -> Option<u64> {
    let stat =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: fields after it
    // start at the last ')'. starttime is field 22, the 20th after the name.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_dead_one_is_not() {
        let me = current();
        assert!(me.contains(':'), "{me}");
        assert!(alive(&me));
        assert_eq!(pid(&me), Some(std::process::id()));
        // Same pid, another start time: a recycled pid.
        assert!(!alive(&format!("{}:1", std::process::id())));
        // A child, while it runs and after it has been reaped.
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let tag = format!("{}:{}", child.id(), start_time(child.id()).unwrap());
        assert!(alive(&tag));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!alive(&tag));
        assert!(!alive(&child.id().to_string()));
        // Not a pid: not ours to judge.
        assert!(alive("someone-else"));
    }
}
