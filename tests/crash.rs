//! Crash safety: for each named failpoint of Prepare (and the base device it formats),
//! Commit, Remove, pool grow and image import, the process is killed with SIGKILL at that
//! point (the `failpoints` build, `THINSNAP_FAILPOINT`), restarted, and then:
//! - `thinsnap check` finds the store and the pool in agreement (no thin id the store does
//!   not know, no record without its device, no half-done operation left);
//! - every committed snapshot's data is intact (checksums through a view);
//! - the interrupted operation is either fully done or fully absent, and usable either way;
//! - no dm device is left beyond the pool and what active snapshots need.
//!
//! An import runs in the CLI process: killed midway, it leaves its active snapshot and its
//! private mount; `thinsnap gc` (or the daemon's next start) must remove both, and the
//! import run again must complete from the layers already committed.

mod common;

use std::os::unix::process::ExitStatusExt;

use common::{
    daemon::{Daemon, Labels, Mounted},
    image::{oci_archive, Layer, Z},
};
use tonic::Code;

const DATA: &str = "data.bin";

#[derive(Clone, Copy, Debug)]
enum Op {
    /// The first Prepare of a fresh pool: formats the base device.
    PrepareFirst,
    /// Prepare of a child of a committed snapshot, with a size label (grows the fs).
    Prepare,
    /// Commit of an active snapshot with data.
    Commit,
    /// Remove of a committed leaf snapshot.
    Remove,
    /// `thinsnap pool grow` (CLI process, daemon stopped).
    Grow,
    /// `thinsnap image import` killed at a point of its own, then recovered this way.
    ImportKilled(Recovery),
    /// `thinsnap image import` while the daemon is killed at one of its points.
    ImportDaemonKilled,
    /// `thinsnap image export` killed at a point of its own, then `thinsnap gc`.
    ExportKilled,
}

/// How an interrupted import is cleaned up.
#[derive(Clone, Copy, Debug)]
enum Recovery {
    /// `thinsnap gc` while the daemon runs.
    Gc,
    /// The daemon's next start.
    Restart,
}

fn size_labels() -> Labels {
    [(
        "containerd.io/snapshot/thinsnap.size".to_string(),
        "2G".to_string(),
    )]
    .into()
}

/// Writes a checksummed file into a new active snapshot `key` of `parent`.
async fn write_layer(
    d: &Daemon,
    c: &mut common::daemon::Client,
    key: &str,
    parent: &str,
    seed: u64,
) -> String {
    let m = c.prepare(key, parent).await.unwrap();
    let mnt = Mounted::new(d.dir.path(), key, &m);
    let sum = common::write_pattern(&mnt.path.join(DATA), 2 << 20, seed);
    drop(mnt);
    sum
}

/// Checks a committed snapshot's data through a temporary view.
async fn assert_committed_data(d: &Daemon, c: &mut common::daemon::Client, name: &str, sum: &str) {
    let view = format!("check-{name}");
    let m = c.view(&view, name).await.unwrap();
    let mnt = Mounted::new(d.dir.path(), &view, &m);
    assert_eq!(
        common::sha256_file(&mnt.path.join(DATA)),
        sum,
        "data of {name}"
    );
    drop(mnt);
    c.remove(&view).await.unwrap();
}

/// Stops the daemon, runs `thinsnap check`, and starts it again.
fn assert_check_clean(d: &mut Daemon) {
    let status = d.stop().unwrap();
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(d.log()).unwrap()
    );
    let out = d.cli(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "thinsnap check after recovery:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("store and pool agree"), "{text}");
    d.spawn();
}

/// dm devices of the pool beyond the pool itself equal the active snapshots and views,
/// once removed snapshots' devices are reclaimed (containerd's Cleanup waits for that).
async fn assert_no_extra_devices(d: &Daemon, c: &mut common::daemon::Client) {
    c.cleanup().await.unwrap();
    let live = c.list(&["kind==active", "kind==view"]).await.unwrap().len();
    let devices: Vec<String> = common::dm_devices_of(&d.pool)
        .into_iter()
        .filter(|n| !n.ends_with("-pool"))
        .collect();
    assert_eq!(
        devices.len(),
        live,
        "devices {devices:?} vs {live} active snapshots/views"
    );
}

async fn crash_at(point: &str, op: Op) {
    crash_then_recover(point, op, None).await
}

/// Crashes `op` at `point`; with `recovery_point`, the next start's recovery is killed
/// there too (recovery itself crashing), and the start after that must finish the job.
async fn crash_then_recover(point: &str, op: Op, recovery_point: Option<&str>) {
    match op {
        Op::ImportKilled(_) | Op::ImportDaemonKilled => return import_crash_at(point, op).await,
        Op::ExportKilled => return export_crash_at(point).await,
        _ => {}
    }
    let mut d = Daemon::start();
    let mut c = d.client().await;
    let mut committed = Vec::new();
    if !matches!(op, Op::PrepareFirst) {
        let sum = write_layer(&d, &mut c, "l1-active", "", 1).await;
        c.commit("l1", "l1-active").await.unwrap();
        committed.push(("l1".to_string(), sum));
        let sum = write_layer(&d, &mut c, "l2-active", "l1", 2).await;
        c.commit("l2", "l2-active").await.unwrap();
        committed.push(("l2".to_string(), sum));
        if matches!(op, Op::Commit) {
            write_layer(&d, &mut c, "active", "l2", 3).await;
        }
    }
    let status = d.stop().unwrap();
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(d.log()).unwrap()
    );

    // The operation, killed at `point`.
    let mut acked_remove = false;
    let grow_to = 6u64 << 30;
    if let Op::Grow = op {
        let out = d.cli_env(
            &["pool", "grow", "6G", "--metadata", "128M"],
            &[("THINSNAP_FAILPOINT", point)],
        );
        assert_eq!(
            out.status.signal(),
            Some(9),
            "failpoint {point} must kill `pool grow`: {out:?}"
        );
        d.spawn();
    } else {
        d.spawn_with_failpoint(point);
        let mut c = d.client().await;
        let res = match op {
            Op::PrepareFirst => c.prepare("first", "").await.map(|_| ()),
            Op::Prepare => c.prepare_with("new", "l2", size_labels()).await.map(|_| ()),
            Op::Commit => c.commit("committed", "active").await,
            // The name leaves in one commit; the device goes in the background, where the
            // later crash points are: Cleanup waits for that reclamation.
            Op::Remove => match c.remove("l2").await {
                Ok(()) => {
                    acked_remove = true;
                    c.cleanup().await
                }
                Err(e) => Err(e),
            },
            _ => unreachable!(),
        };
        let err = res.expect_err("the daemon dies at the failpoint");
        assert!(
            matches!(
                err.code(),
                Code::Unavailable | Code::Unknown | Code::Internal
            ),
            "{err}"
        );
        let status = d.wait_exit();
        assert_eq!(
            status.signal(),
            Some(9),
            "failpoint {point} must be reached"
        );
        if let Some(again) = recovery_point {
            d.recover_dying_at(again);
        }
        d.spawn();
    }

    // After recovery.
    assert_check_clean(&mut d);
    let mut c = d.client().await;
    for (name, sum) in &committed {
        if matches!(op, Op::Remove) && name == "l2" && c.stat(name).await.is_err() {
            continue; // removed: fully done
        }
        assert_committed_data(&d, &mut c, name, sum).await;
    }
    match op {
        Op::PrepareFirst => {
            match c.stat("first").await {
                Ok(i) => {
                    assert_eq!(i.kind, 2);
                    let m = c.mounts("first").await.unwrap();
                    let mnt = Mounted::new(d.dir.path(), "first", &m);
                    std::fs::write(mnt.path.join("x"), b"x").unwrap();
                }
                Err(e) => assert_eq!(e.code(), Code::NotFound),
            }
            // Either way a new snapshot gets a working base filesystem.
            let m = c.prepare("second", "").await.unwrap();
            let mnt = Mounted::new(d.dir.path(), "second", &m);
            std::fs::write(mnt.path.join("y"), b"y").unwrap();
        }
        Op::Prepare => match c.stat("new").await {
            Ok(i) => {
                assert_eq!((i.kind, i.parent.as_str()), (2, "l2"));
                let m = c.mounts("new").await.unwrap();
                let mnt = Mounted::new(d.dir.path(), "new", &m);
                assert_eq!(common::sha256_file(&mnt.path.join(DATA)), committed[1].1);
                assert!(common::fs_size(&mnt.path) > 3 << 29, "grown to 2G");
            }
            Err(e) => {
                assert_eq!(e.code(), Code::NotFound);
                // Absent: preparing it again works.
                c.prepare_with("new", "l2", size_labels()).await.unwrap();
            }
        },
        Op::Commit => {
            let active = c.stat("active").await;
            let done = c.stat("committed").await;
            match (active, done) {
                (Ok(a), Err(e)) => {
                    assert_eq!(
                        (a.kind, e.code()),
                        (2, Code::NotFound),
                        "not committed: still active"
                    );
                    let m = c.mounts("active").await.unwrap();
                    drop(Mounted::new(d.dir.path(), "active", &m));
                    c.commit("committed", "active").await.unwrap();
                }
                (Err(e), Ok(i)) => assert_eq!((e.code(), i.kind), (Code::NotFound, 3), "committed"),
                (a, b) => panic!("half-committed: active {a:?}, committed {b:?}"),
            }
            let m = c.view("check-commit", "committed").await.unwrap();
            let mnt = Mounted::new(d.dir.path(), "check-commit", &m);
            assert!(mnt.path.join(DATA).exists());
        }
        Op::Remove => match c.stat("l2").await {
            Ok(i) => {
                assert!(
                    !acked_remove,
                    "Remove was acknowledged, yet l2 is back: {i:?}"
                );
                assert_eq!(i.kind, 3, "not removed: intact and removable");
                c.remove("l2").await.unwrap();
            }
            Err(e) => assert_eq!(e.code(), Code::NotFound),
        },
        Op::Grow => {
            let out = d.cli(&["pool", "status", "--json"]);
            assert!(
                out.status.success(),
                "pool status: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let total = v["data_total_bytes"].as_u64().unwrap();
            assert!(
                total == 4 << 30 || total == grow_to,
                "data size {total}: neither old nor new"
            );
            if point != "grow.after-metadata-file" {
                assert_eq!(
                    total, grow_to,
                    "the files were extended: the next open finishes the grow"
                );
            }
            write_layer(&d, &mut c, "after-grow", "l2", 9).await;
        }
        Op::ImportKilled(_) | Op::ImportDaemonKilled | Op::ExportKilled => unreachable!(),
    }
    assert_no_extra_devices(&d, &mut c).await;
}

/// A three-layer image: many files, a 4 MiB file, a file the second layer deletes.
fn crash_image(dir: &std::path::Path) -> (std::path::PathBuf, Vec<String>) {
    let mut l1 = Layer::new();
    l1.dir("d", 0o755, (0, 0));
    for i in 0..20 {
        l1.file(
            &format!("d/f{i}"),
            format!("file {i}").as_bytes(),
            0o644,
            (0, 0),
        );
    }
    l1.file("gone", b"deleted by layer 2", 0o644, (0, 0));
    l1.file("big", &big(), 0o644, (0, 0));
    let l1 = l1.finish();
    let l2 = Layer::new()
        .file(".wh.gone", b"", 0o644, (0, 0))
        .file("d/b", b"b", 0o644, (0, 0))
        .finish();
    let l3 = Layer::new().file("top", b"top", 0o600, (0, 0)).finish();
    let (archive, chain) = oci_archive(
        &[(&l1, Z::Gzip), (&l2, Z::Tar), (&l3, Z::Zstd)],
        "crash:1",
        false,
    );
    let path = dir.join("image.tar");
    archive.write(&path);
    (path, chain)
}

fn big() -> Vec<u8> {
    (0..4u32 << 20).map(|i| (i % 251) as u8).collect()
}

fn output(o: &std::process::Output) -> String {
    format!(
        "{:?}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn import_crash_at(point: &str, op: Op) {
    let mut d = Daemon::start();
    let (archive, chain) = crash_image(d.dir.path());
    let args = ["image", "import", archive.to_str().unwrap()];
    let mut c = d.client().await;
    // An unrelated committed snapshot, to check nothing else is touched.
    let sum = write_layer(&d, &mut c, "other-active", "", 5).await;
    c.commit("other", "other-active").await.unwrap();

    let recovery = match op {
        Op::ImportKilled(recovery) => {
            let out = d.cli_env(&args, &[("THINSNAP_FAILPOINT", point)]);
            assert_eq!(
                out.status.signal(),
                Some(9),
                "failpoint {point} must kill the import: {}",
                output(&out)
            );
            // What the killed import left: an active snapshot, and a mount while filling it.
            let active = c.list(&["kind==active"]).await.unwrap();
            let mounted = !common::mounts_under(&d.dir.path().join("run/mnt")).is_empty();
            match point {
                "import.after-commit" => assert!(active.is_empty() && !mounted, "{active:?}"),
                "import.after-mount" | "import.after-entries" | "import.after-apply" => {
                    assert!(active.len() == 1 && mounted, "{active:?}")
                }
                _ => assert!(active.len() == 1 && !mounted, "{active:?}"),
            }
            recovery
        }
        _ => {
            d.stop();
            d.spawn_with_failpoint(point);
            let out = d.cli(&args);
            assert!(!out.status.success(), "{}", output(&out));
            assert_eq!(
                d.wait_exit().signal(),
                Some(9),
                "failpoint {point} must be reached"
            );
            d.spawn();
            Recovery::Restart
        }
    };
    match recovery {
        Recovery::Gc => {
            let out = d.cli(&["gc"]);
            assert!(out.status.success(), "{}", output(&out));
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                text.contains("of an import abandoned by process"),
                point != "import.after-commit",
                "{text}"
            );
        }
        Recovery::Restart => {
            d.stop();
            d.spawn();
        }
    }

    // Nothing left of the interrupted import; what was committed stays.
    assert_eq!(common::private_mounts(d.dir.path()), Vec::<String>::new());
    assert_check_clean(&mut d);
    let mut c = d.client().await;
    assert_eq!(c.list(&["kind==active"]).await.unwrap().len(), 0);
    assert_no_extra_devices(&d, &mut c).await;
    assert_committed_data(&d, &mut c, "other", &sum).await;
    let present: Vec<bool> = {
        let mut v = vec![];
        for id in &chain {
            v.push(c.stat(id).await.is_ok_and(|i| i.kind == 3));
        }
        v
    };
    assert!(
        present.windows(2).all(|w| w[0] || !w[1]),
        "committed layers {present:?} are not a prefix of the chain"
    );

    // Importing again completes from there.
    let out = d.cli(&args);
    assert!(out.status.success(), "{}", output(&out));
    let done = present.iter().filter(|p| **p).count();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(
            "{} layers imported, {done} already present",
            3 - done
        )),
        "{}",
        output(&out)
    );
    let m = c.view("check-image", &chain[2]).await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "check-image", &m);
    assert!(!mnt.path.join("gone").exists(), "whiteout applied");
    assert_eq!(std::fs::read(mnt.path.join("top")).unwrap(), b"top");
    assert_eq!(std::fs::read(mnt.path.join("d/b")).unwrap(), b"b");
    assert_eq!(std::fs::read(mnt.path.join("d/f19")).unwrap(), b"file 19");
    assert_eq!(std::fs::read(mnt.path.join("big")).unwrap(), big());
    drop(mnt);
    c.remove("check-image").await.unwrap();
    assert_no_extra_devices(&d, &mut c).await;
}

async fn export_crash_at(point: &str) {
    let mut d = Daemon::start();
    let mut c = d.client().await;
    let sum = write_layer(&d, &mut c, "l1-active", "", 1).await;
    c.commit("l1", "l1-active").await.unwrap();
    let out_file = d.dir.path().join("l1.tar");
    let out = d.cli_env(
        &["image", "export", "l1", out_file.to_str().unwrap()],
        &[("THINSNAP_FAILPOINT", point)],
    );
    assert_eq!(out.status.signal(), Some(9), "{}", output(&out));
    // What the killed export left: its view, mounted.
    assert_eq!(c.list(&["kind==view"]).await.unwrap().len(), 1);
    assert_eq!(common::private_mounts(d.dir.path()).len(), 1);

    let out = d.cli(&["gc"]);
    assert!(out.status.success(), "{}", output(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("of an export abandoned by process"), "{text}");
    assert_eq!(common::private_mounts(d.dir.path()), Vec::<String>::new());
    assert!(!out_file.exists());
    assert_check_clean(&mut d);
    let mut c = d.client().await;
    assert_eq!(c.list(&["kind==view"]).await.unwrap().len(), 0);
    assert_no_extra_devices(&d, &mut c).await;
    assert_committed_data(&d, &mut c, "l1", &sum).await;
    let out = d.cli(&["image", "export", "l1", out_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", output(&out));
    assert!(out_file.metadata().unwrap().len() > 2 << 20);
}

macro_rules! crash_tests {
    ($($name:ident: $point:literal, $op:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                crash_at($point, $op).await;
            }
        )*

    };
}

/// Recovery killed while it undoes or finishes what a crash left.
macro_rules! recovery_crash_tests {
    ($($name:ident: $point:literal, $op:expr, $again:literal;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                crash_then_recover($point, $op, Some($again)).await;
            }
        )*
    };
}

recovery_crash_tests! {
    loop_crash_recovery_undo_create: "create.after-intent", Op::Prepare, "undo-create.after-message";
    loop_crash_recovery_undo_base: "base.after-mkfs", Op::PrepareFirst, "undo-base.after-message";
    loop_crash_recovery_finish_remove: "remove.after-mark", Op::Remove, "remove.after-deactivate";
}

crash_tests! {
    loop_crash_base_after_intent: "base.after-intent", Op::PrepareFirst;
    loop_crash_base_after_message: "base.after-message", Op::PrepareFirst;
    loop_crash_base_after_mkfs: "base.after-mkfs", Op::PrepareFirst;
    loop_crash_base_after_tidy_mount: "base.after-tidy-mount", Op::PrepareFirst;
    loop_crash_base_after_ready: "base.after-ready", Op::PrepareFirst;
    loop_crash_create_after_intent: "create.after-intent", Op::Prepare;
    loop_crash_create_after_message: "create.after-message", Op::Prepare;
    loop_crash_create_after_activate: "create.after-activate", Op::Prepare;
    loop_crash_create_after_grow_mount: "create.after-grow-mount", Op::Prepare;
    loop_crash_create_after_grow: "create.after-grow", Op::Prepare;
    loop_crash_create_after_ready: "create.after-ready", Op::Prepare;
    loop_crash_commit_after_measure: "commit.after-measure", Op::Commit;
    loop_crash_commit_after_deactivate: "commit.after-deactivate", Op::Commit;
    loop_crash_commit_after_store: "commit.after-store", Op::Commit;
    loop_crash_remove_after_mark: "remove.after-mark", Op::Remove;
    loop_crash_remove_after_discard: "remove.after-discard", Op::Remove;
    loop_crash_remove_after_deactivate: "remove.after-deactivate", Op::Remove;
    loop_crash_remove_after_message: "remove.after-message", Op::Remove;
    loop_crash_remove_after_store: "remove.after-store", Op::Remove;
    loop_crash_grow_after_metadata_file: "grow.after-metadata-file", Op::Grow;
    loop_crash_grow_after_data_file: "grow.after-data-file", Op::Grow;
    loop_crash_grow_after_reload: "grow.after-reload", Op::Grow;
    loop_crash_import_after_prepare: "import.after-prepare", Op::ImportKilled(Recovery::Gc);
    loop_crash_import_after_mount: "import.after-mount", Op::ImportKilled(Recovery::Gc);
    loop_crash_import_after_entries: "import.after-entries", Op::ImportKilled(Recovery::Gc);
    loop_crash_import_after_entries_restart: "import.after-entries", Op::ImportKilled(Recovery::Restart);
    loop_crash_import_after_apply: "import.after-apply", Op::ImportKilled(Recovery::Gc);
    loop_crash_import_after_unmount: "import.after-unmount", Op::ImportKilled(Recovery::Restart);
    loop_crash_import_after_commit: "import.after-commit", Op::ImportKilled(Recovery::Gc);
    loop_crash_import_daemon_create_after_ready: "create.after-ready", Op::ImportDaemonKilled;
    loop_crash_import_daemon_commit_after_store: "commit.after-store", Op::ImportDaemonKilled;
    loop_crash_export_after_mount: "export.after-mount", Op::ExportKilled;
}
