//! containerd's own snapshotter test suite, unmodified, against `thinsnap serve`: the Go
//! test program in tests/containerd-testsuite (built by vagrant/test from Debian's
//! containerd 1.6.20 sources, `THINSNAP_GO_SUITE`) runs
//! `github.com/containerd/containerd/snapshots/testsuite` through containerd's proxy
//! snapshotter on thinsnap's socket, one daemon with the default configuration per case,
//! once with ext4 and once with xfs; and restarts a socket-activated thinsnap 5 times under
//! a client dialled as containerd dials proxy plugins. The Go program's own result lines
//! (`--- PASS: TestSnapshotterSuite/Basic`, ...) are printed as it runs.

mod common;

use std::{path::PathBuf, process::Command};

/// The Go test program, and the release build of thinsnap it drives.
fn programs() -> (PathBuf, PathBuf) {
    common::require_dm();
    let need = |var: &str, what: &str| -> PathBuf {
        let p = std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{var} must name {what} (vagrant/test builds and sets it)"));
        assert!(p.is_file(), "{var}: {} does not exist", p.display());
        p
    };
    (
        need(
            "THINSNAP_GO_SUITE",
            "the Go test program of tests/containerd-testsuite",
        ),
        need("THINSNAP_RELEASE_BIN", "thinsnap's release build"),
    )
}

/// Runs the Go test program's tests matching `run` with `env`; panics unless they pass.
fn go_test(run: &str, env: &[(&str, &str)]) {
    let (suite, thinsnap) = programs();
    let status = Command::new(&suite)
        .args(["-test.v", "-test.timeout", "40m", "-test.run", run])
        .env("THINSNAP_BIN", &thinsnap)
        .envs(env.iter().copied())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{} -test.run {run}: {status}",
        suite.display()
    );
}

#[test]
fn loop_containerd_testsuite_ext4() {
    go_test("^TestSnapshotterSuite$", &[("THINSNAP_FS", "ext4")]);
}

#[test]
fn loop_containerd_testsuite_xfs() {
    go_test("^TestSnapshotterSuite$", &[("THINSNAP_FS", "xfs")]);
}

#[test]
fn loop_restarts_unnoticed_by_containerds_client() {
    go_test("^TestRestartsUnnoticed$", &[]);
}
