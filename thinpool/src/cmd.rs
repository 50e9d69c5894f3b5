//! Every external program the crate runs, one constant each, found in fixed system
//! directories (never `$PATH`). Device-mapper itself is driven by ioctls, not programs:
//! these are the filesystem tools, LVM, and thin-provisioning-tools for checks.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use tracing::{debug, instrument};

use crate::error::{Error, Hint, Result};

/// ext4 formatter.
pub const MKFS_EXT4: &str = "mkfs.ext4";
/// xfs formatter.
pub const MKFS_XFS: &str = "mkfs.xfs";
/// ext4 resizer.
pub const RESIZE2FS: &str = "resize2fs";
/// xfs grower (works on a mounted filesystem).
pub const XFS_GROWFS: &str = "xfs_growfs";
/// Thin-pool metadata checker.
pub const THIN_CHECK: &str = "thin_check";
/// Thin-pool metadata repairer.
pub const THIN_REPAIR: &str = "thin_repair";
/// Thin-pool metadata dumper (XML).
pub const THIN_DUMP: &str = "thin_dump";
/// LVM's multi-call binary.
pub const LVM: &str = "lvm";

const SEARCH_DIRS: [&str; 5] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"];

/// Finds `program` in the system directories.
///
/// # Errors
/// [`Error::NotFound`] with the Debian package to install.
pub fn find(program: &str) -> Result<PathBuf> {
    SEARCH_DIRS
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::NotFound {
            what: format!("program {program}"),
            hint: Hint(Some(match program {
                MKFS_EXT4 | RESIZE2FS => "install e2fsprogs",
                MKFS_XFS | XFS_GROWFS => "install xfsprogs",
                THIN_CHECK | THIN_REPAIR | THIN_DUMP => "install thin-provisioning-tools",
                LVM => "install lvm2",
                _ => "install it",
            })),
        })
}

/// Checks that the programs a configuration needs are installed.
///
/// # Errors
/// [`Error::NotFound`] for the first one missing.
pub fn verify_executables(programs: &[&str]) -> Result<()> {
    programs.iter().try_for_each(|p| find(p).map(|_| ()))
}

/// Runs `program` with `args`, returning its output when it exits 0.
///
/// # Errors
/// [`Error::NotFound`] when it is not installed; [`Error::Command`] with its stderr when it
/// fails.
#[instrument(level = "debug", skip(args), fields(program))]
pub fn run<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let path = find(program)?;
    let mut cmd = Command::new(&path);
    cmd.args(args)
        .stdin(Stdio::null())
        .env("DM_DISABLE_UDEV", "1")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .env("LC_ALL", "C");
    let line = format!(
        "{} {}",
        program,
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    debug!(command = %line, "running");
    let out = cmd.output().map_err(|e| Error::io("run", &path, e))?;
    if out.status.success() {
        return Ok(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let tail: Vec<&str> = text.lines().rev().take(8).collect();
    Err(Error::Command {
        command: line,
        status: out.status.to_string(),
        stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    })
}

/// Formats `dev` as ext4 without lazy initialisation, so the first mount is not slowed by
/// background zeroing; `extra` options are passed through.
///
/// # Errors
/// [`Error::Command`] when mkfs fails.
pub fn mkfs_ext4(dev: &Path, extra: &[String]) -> Result<()> {
    let mut args: Vec<String> = vec![
        "-q".into(),
        "-F".into(),
        "-E".into(),
        "lazy_itable_init=0,lazy_journal_init=0,nodiscard".into(),
    ];
    args.extend(extra.iter().cloned());
    args.push(dev.display().to_string());
    run(MKFS_EXT4, args).map(|_| ())
}

/// Formats `dev` as xfs; `extra` options are passed through.
///
/// # Errors
/// [`Error::Command`] when mkfs fails.
pub fn mkfs_xfs(dev: &Path, extra: &[String]) -> Result<()> {
    let mut args: Vec<String> = vec!["-q".into(), "-f".into(), "-K".into()];
    args.extend(extra.iter().cloned());
    args.push(dev.display().to_string());
    run(MKFS_XFS, args).map(|_| ())
}

/// Grows the ext4 filesystem on `dev` to fill the device (online if mounted).
///
/// # Errors
/// [`Error::Command`] when resize2fs fails.
pub fn resize2fs(dev: &Path) -> Result<()> {
    run(RESIZE2FS, [dev.as_os_str()]).map(|_| ())
}

/// Grows the mounted xfs filesystem at `mountpoint` to fill its device.
///
/// # Errors
/// [`Error::Command`] when xfs_growfs fails.
pub fn xfs_growfs(mountpoint: &Path) -> Result<()> {
    run(XFS_GROWFS, [mountpoint.as_os_str()]).map(|_| ())
}

/// Runs `thin_check` on the metadata device `meta` and returns its report.
///
/// With `metadata_snap`, checks the metadata snapshot of a live pool.
///
/// # Errors
/// [`Error::Command`] with thin_check's report when it finds damage.
pub fn thin_check(meta: &Path, metadata_snap: bool) -> Result<String> {
    let mut args = vec![meta.display().to_string()];
    if metadata_snap {
        args.insert(0, "--metadata-snap".into());
    }
    let out = run(THIN_CHECK, args)?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Checks the metadata of an inactive pool on `meta` and, when it is sound, clears the
/// `needs_check` flag the kernel set after an I/O error.
///
/// # Errors
/// [`Error::Command`] with thin_check's findings when the metadata is damaged.
pub fn thin_check_clear(meta: &Path) -> Result<String> {
    let out = run(
        THIN_CHECK,
        [OsStr::new("--clear-needs-check-flag"), meta.as_os_str()],
    )?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Rebuilds damaged metadata from `from` into the (larger or equal, zeroed) device `to`.
///
/// # Errors
/// [`Error::Command`] when thin_repair cannot salvage it.
pub fn thin_repair(from: &Path, to: &Path) -> Result<()> {
    run(
        THIN_REPAIR,
        [
            OsStr::new("-i"),
            from.as_os_str(),
            OsStr::new("-o"),
            to.as_os_str(),
        ],
    )
    .map(|_| ())
}

/// Dumps the metadata snapshot of a live pool on `meta` as XML into `out` (thin_restore
/// reads it back).
///
/// # Errors
/// [`Error::Command`] when thin_dump fails.
pub fn thin_dump_snapshot(meta: &Path, out: &Path) -> Result<()> {
    run(
        THIN_DUMP,
        [
            OsStr::new("--metadata-snap"),
            OsStr::new("-o"),
            out.as_os_str(),
            meta.as_os_str(),
        ],
    )
    .map(|_| ())
}

/// Runs an `lvm` subcommand (e.g. `["lvcreate", ...]`) and returns its standard output.
///
/// # Errors
/// [`Error::Command`] with lvm's message when it fails.
pub fn lvm(args: &[&str]) -> Result<String> {
    let out = run(LVM, args)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
