//! The Docker volume plugin (issue #8), driven through its HTTP API on the plugin socket as
//! Docker drives it: every endpoint, errors, size and filesystem options, volumes that
//! survive restarts (mounted ones stay mounted in the same boot; mount ids of an earlier
//! boot are dropped), clones that see their origin's data and then diverge, crash points
//! of Create, Remove, Mount and Unmount, and nothing leaked.

mod common;

use std::os::unix::process::ExitStatusExt;

use common::{
    daemon::Daemon,
    volume::{fs_type, is_mounted, CONFIG},
};
use serde_json::json;

const DATA: &str = "data.bin";

fn start() -> Daemon {
    Daemon::start_with(CONFIG)
}

fn output(o: &std::process::Output) -> String {
    format!(
        "{:?}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Stops the daemon, asserts `thinsnap check` finds nothing to do, starts it again.
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
        out.status.success() && text.contains("store and pool agree"),
        "thinsnap check: {}",
        output(&out)
    );
    d.spawn();
}

/// Thin devices in the pool (from its metadata).
fn thin_devices(d: &Daemon) -> u64 {
    let out = d.cli(&["pool", "status", "--json"]);
    assert!(out.status.success(), "{}", output(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["thin_devices"].as_u64().unwrap()
}

/// After every volume was unmounted and removed: no mount under the mount directory, no
/// thin device active, only the base devices (`bases`) left in the pool.
fn assert_released(d: &Daemon, bases: u64) {
    assert_eq!(
        common::mounts_under(&d.dir.path().join("volumes")),
        Vec::<std::path::PathBuf>::new(),
        "volume mounts left"
    );
    let devices: Vec<String> = common::dm_devices_of(&d.pool)
        .into_iter()
        .filter(|n| !n.ends_with("-pool"))
        .collect();
    assert_eq!(devices, Vec::<String>::new(), "thin devices left active");
    assert_eq!(thin_devices(d), bases, "thin devices left in the pool");
    assert!(d.plugin().list().is_empty());
}

#[test]
fn loop_volume_plugin_activates_and_answers_the_protocol() {
    let d = start();
    let p = d.plugin();
    let a = p.post("Plugin.Activate", &json!({})).unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.body, json!({"Implements": ["VolumeDriver"]}));
    assert_eq!(a.header("content-type"), Some(common::volume::MEDIA));
    // Docker sends Activate with an empty body too.
    let a = p.raw("POST", "/Plugin.Activate", b"").unwrap();
    assert_eq!(a.body["Implements"], json!(["VolumeDriver"]));
    let caps = p.ok("VolumeDriver.Capabilities", &json!({}));
    assert_eq!(caps["Capabilities"], json!({"Scope": "local"}));
    assert_eq!(p.ok("VolumeDriver.List", &json!({}))["Volumes"], json!([]));

    // Not the protocol: unknown methods, other verbs, malformed bodies.
    let (status, err) = p.fails("VolumeDriver.Update", &json!({"Name": "x"}));
    assert_eq!(status, 404);
    assert!(err.contains("no method /VolumeDriver.Update"), "{err}");
    let a = p.raw("GET", "/VolumeDriver.List", b"").unwrap();
    assert_eq!(a.status, 405, "{a:?}");
    let a = p
        .raw("POST", "/VolumeDriver.Create", b"{\"Name\": ")
        .unwrap();
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.err().contains("not the JSON"), "{a:?}");
    let (status, err) = p.fails(
        "VolumeDriver.Create",
        &json!({"Name": "v", "Opts": {"size": 5}}),
    );
    assert_eq!(status, 400);
    assert!(err.contains("strings"), "{err}");

    // Several requests on one connection, as Docker's client keeps it alive.
    let mut s = p.session().unwrap();
    for _ in 0..3 {
        let a = s.post("VolumeDriver.Capabilities", &json!({})).unwrap();
        assert_eq!(a.status, 200);
    }
    let a = s
        .post(
            "VolumeDriver.Create",
            &json!({"Name": "kept", "Opts": null}),
        )
        .unwrap();
    assert_eq!((a.status, a.err()), (200, ""), "{a:?}");
    let a = s
        .post("VolumeDriver.Remove", &json!({"Name": "kept"}))
        .unwrap();
    assert_eq!((a.status, a.err()), (200, ""), "{a:?}");
    assert_released(&d, 1);
}

#[test]
fn loop_volume_lifecycle_through_every_endpoint() {
    let d = start();
    let p = d.plugin();
    p.create("data", &[]);
    assert_eq!(p.list(), vec!["data"]);
    let v = p.get("data");
    assert_eq!(v["Name"], "data");
    assert_eq!(v["Mountpoint"], "", "not mounted yet");
    assert!(v["CreatedAt"].as_str().unwrap().ends_with('Z'), "{v}");
    let st = &v["Status"];
    assert_eq!(st["size_bytes"], 1u64 << 30, "the default size: {v}");
    assert_eq!(st["filesystem"], "ext4");
    assert_eq!(st["mounts"], 0);
    assert!(
        st["device"].as_str().unwrap().starts_with("thinsnap-"),
        "{v}"
    );
    assert_eq!(p.path("data"), "");
    // Only the base device: a volume's device is active only while it is mounted.
    assert_eq!(common::dm_devices_of(&d.pool).len(), 1);

    let mp = p.mount("data", "c1");
    assert_eq!(mp, d.dir.path().join("volumes/data"));
    assert!(is_mounted(&mp));
    assert_eq!(fs_type(&mp), "ext4");
    assert_eq!(p.path("data"), mp.display().to_string());
    std::fs::write(mp.join("hello"), b"hello").unwrap();
    let v = p.get("data");
    assert_eq!(v["Mountpoint"], mp.display().to_string());
    assert_eq!(v["Status"]["mounts"], 1);
    assert!(v["Status"]["used_bytes"].as_u64().unwrap() > 0, "{v}");

    // A second container, and the same id again: one mount, two ids.
    assert_eq!(p.mount("data", "c2"), mp);
    assert_eq!(p.mount("data", "c2"), mp);
    assert_eq!(p.get("data")["Status"]["mounts"], 2);
    assert_eq!(common::mounts_under(&d.dir.path().join("volumes")).len(), 1);
    p.unmount("data", "c1");
    assert!(is_mounted(&mp), "c2 still uses it");
    assert_eq!(std::fs::read(mp.join("hello")).unwrap(), b"hello");
    // An id the volume does not hold (e.g. from before a reboot) is not an error.
    p.unmount("data", "never-mounted");
    assert!(is_mounted(&mp));
    p.unmount("data", "c2");
    assert!(
        !is_mounted(&mp) && !mp.exists(),
        "unmounted and its directory gone"
    );
    assert_eq!(p.path("data"), "");
    assert_eq!(
        common::dm_devices_of(&d.pool).len(),
        1,
        "device deactivated"
    );

    // Mounted again: the data is there.
    let mp = p.mount("data", "c3");
    assert_eq!(std::fs::read(mp.join("hello")).unwrap(), b"hello");
    // Unmounted behind thinsnap's back: the next Mount mounts it again rather than hand
    // out the empty directory.
    thinpool::fs::umount(&mp).unwrap();
    assert_eq!(p.mount("data", "c4"), mp);
    assert!(is_mounted(&mp));
    assert_eq!(std::fs::read(mp.join("hello")).unwrap(), b"hello");
    p.unmount("data", "c3");
    p.unmount("data", "c4");
    assert!(!is_mounted(&mp));
    p.remove("data");
    assert!(!p.exists("data"));
    let (status, err) = p.fails("VolumeDriver.Get", &json!({"Name": "data"}));
    assert_eq!(status, 404);
    assert!(err.contains("does not exist"), "{err}");
    assert_released(&d, 1);
}

#[test]
fn loop_volume_errors_are_clear_and_change_nothing() {
    let d = start();
    let p = d.plugin();
    p.create("a", &[]);

    let (status, err) = p.fails("VolumeDriver.Create", &json!({"Name": "a"}));
    assert_eq!(status, 409);
    assert!(err.contains("\"a\" already exists"), "{err}");
    for m in [
        "VolumeDriver.Get",
        "VolumeDriver.Path",
        "VolumeDriver.Remove",
        "VolumeDriver.Mount",
        "VolumeDriver.Unmount",
    ] {
        let (status, err) = p.fails(m, &json!({"Name": "nope", "ID": "c"}));
        assert_eq!(status, 404, "{m}");
        assert!(err.contains("volume \"nope\" does not exist"), "{m}: {err}");
    }
    for (opts, status, want) in [
        (
            json!({"sise": "5G", "type": "x"}),
            400,
            "unknown volume option(s) sise, type",
        ),
        (json!({"size": "lots"}), 400, "option size=lots"),
        (
            json!({"fs": "btrfs"}),
            400,
            "option fs=btrfs: use ext4 or xfs",
        ),
        (json!({"size": "100M"}), 400, "filesystems cannot shrink"),
        (
            json!({"from": "nope"}),
            404,
            "volume \"nope\" to clone (option from) does not exist",
        ),
        (
            json!({"from": "a", "fs": "xfs"}),
            400,
            "a clone keeps its origin's filesystem",
        ),
        (
            json!({"from": "a", "size": "512M"}),
            400,
            "smaller than volume \"a\"",
        ),
    ] {
        let (s, err) = p.fails("VolumeDriver.Create", &json!({"Name": "b", "Opts": opts}));
        assert_eq!(s, status, "{opts}: {err}");
        assert!(err.contains(want), "{opts}: {err}");
    }
    for bad in ["", "../x", "a/b", "-x", ".hidden"] {
        let (s, err) = p.fails("VolumeDriver.Create", &json!({ "Name": bad }));
        assert_eq!(s, 400, "{bad:?}: {err}");
        assert!(err.contains("is not valid"), "{bad:?}: {err}");
    }
    let (s, err) = p.fails(
        "VolumeDriver.Create",
        &json!({"Name": "a2", "Opts": {"from": "a2"}}),
    );
    assert_eq!(s, 400, "{err}");

    // Remove while mounted is refused, and nothing changes.
    let mp = p.mount("a", "c1");
    std::fs::write(mp.join("f"), b"f").unwrap();
    let (s, err) = p.fails("VolumeDriver.Remove", &json!({"Name": "a"}));
    assert_eq!(s, 409);
    assert!(
        err.contains("is mounted at") && err.contains("stop and remove the containers"),
        "{err}"
    );
    assert_eq!(std::fs::read(mp.join("f")).unwrap(), b"f");
    // Unmount while a process holds a file on it: refused, the id stays.
    let held = std::fs::File::open(mp.join("f")).unwrap();
    let (s, err) = p.fails("VolumeDriver.Unmount", &json!({"Name": "a", "ID": "c1"}));
    assert_eq!(s, 409);
    assert!(err.contains("in use"), "{err}");
    assert_eq!(p.get("a")["Status"]["mounts"], 1);
    drop(held);
    p.unmount("a", "c1");
    assert_eq!(
        p.list(),
        vec!["a"],
        "none of the failed creates left a volume"
    );
    p.remove("a");
    assert_released(&d, 1);
}

#[test]
fn loop_volume_size_and_xfs_options() {
    let d = start();
    let p = d.plugin();
    p.create("big", &[("size", "2G")]);
    p.create("x", &[("fs", "xfs"), ("size", "1536M")]);
    assert_eq!(p.get("big")["Status"]["size_bytes"], 2u64 << 30);
    let x = p.get("x");
    assert_eq!(x["Status"]["filesystem"], "xfs");
    assert_eq!(x["Status"]["size_bytes"], 1536u64 << 20);

    let big = p.mount("big", "c");
    assert_eq!(fs_type(&big), "ext4");
    assert!(
        common::fs_size(&big) > 3 << 29,
        "grown to 2G: {}",
        common::fs_size(&big)
    );
    let mx = p.mount("x", "c");
    assert_eq!(fs_type(&mx), "xfs");
    let size = common::fs_size(&mx);
    assert!(
        size > 5 << 28 && size <= 1536 << 20,
        "grown to 1.5G: {size}"
    );
    let sum = common::write_pattern(&mx.join(DATA), 8 << 20, 7);
    p.unmount("x", "c");
    let mx = p.mount("x", "c");
    assert_eq!(common::sha256_file(&mx.join(DATA)), sum);

    // A clone of the mounted xfs volume mounts beside it (nouuid).
    p.create("x2", &[("from", "x")]);
    let mx2 = p.mount("x2", "c");
    assert_eq!(fs_type(&mx2), "xfs");
    assert_eq!(common::sha256_file(&mx2.join(DATA)), sum);
    for (n, id) in [("big", "c"), ("x", "c"), ("x2", "c")] {
        p.unmount(n, id);
    }
    for n in ["big", "x", "x2"] {
        p.remove(n);
    }
    assert_released(&d, 2);
}

#[test]
fn loop_volume_clone_sees_origin_data_then_diverges() {
    let d = start();
    let p = d.plugin();
    p.create("origin", &[]);
    let mo = p.mount("origin", "c1");
    let sum = common::write_pattern(&mo.join(DATA), 4 << 20, 1);
    // Written but not synced: the clone must still see it (syncfs, then the kernel's
    // freeze around the snapshot).
    std::fs::write(mo.join("unsynced"), b"written just before the clone").unwrap();

    p.create("clone", &[("from", "origin")]);
    let c = p.get("clone");
    assert_eq!(c["Status"]["from"], "origin");
    assert_eq!(c["Status"]["size_bytes"], 1u64 << 30, "the origin's size");
    let mc = p.mount("clone", "c2");
    assert_eq!(common::sha256_file(&mc.join(DATA)), sum);
    assert_eq!(
        std::fs::read(mc.join("unsynced")).unwrap(),
        b"written just before the clone"
    );

    // Later writes diverge both ways.
    std::fs::write(mo.join("after"), b"origin").unwrap();
    std::fs::write(mc.join("after"), b"clone").unwrap();
    std::fs::remove_file(mc.join(DATA)).unwrap();
    assert_eq!(std::fs::read(mo.join("after")).unwrap(), b"origin");
    assert_eq!(std::fs::read(mc.join("after")).unwrap(), b"clone");
    assert_eq!(common::sha256_file(&mo.join(DATA)), sum);

    // A clone of an unmounted volume, larger than its origin.
    p.unmount("clone", "c2");
    p.create("clone2", &[("from", "clone"), ("size", "2G")]);
    let m2 = p.mount("clone2", "c3");
    assert!(common::fs_size(&m2) > 3 << 29, "grown to 2G");
    assert_eq!(std::fs::read(m2.join("after")).unwrap(), b"clone");
    assert!(!m2.join(DATA).exists());
    p.unmount("clone2", "c3");

    // The origin can go while its clones stay: they are independent thin devices.
    p.unmount("origin", "c1");
    p.remove("origin");
    let mc = p.mount("clone", "c2");
    assert_eq!(std::fs::read(mc.join("after")).unwrap(), b"clone");
    p.unmount("clone", "c2");
    p.remove("clone");
    p.remove("clone2");
    assert_released(&d, 1);
}

#[test]
fn loop_volume_data_and_mounts_survive_a_restart() {
    let mut d = start();
    let p = d.plugin();
    p.create("cold", &[]);
    p.create("hot", &[("size", "2G")]);
    let m = p.mount("cold", "c0");
    let cold = common::write_pattern(&m.join(DATA), 4 << 20, 3);
    p.unmount("cold", "c0");
    let hot_dir = p.mount("hot", "running");
    let hot = common::write_pattern(&hot_dir.join(DATA), 4 << 20, 4);

    // A restart under a running container: its volume stays mounted and usable.
    assert!(d.stop().unwrap().success());
    assert!(
        is_mounted(&hot_dir),
        "stopping thinsnap leaves volumes mounted"
    );
    let out = d.cli(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("0 snapshot(s), 2 volume(s)"),
        "{}",
        output(&out)
    );
    d.spawn();
    let p = d.plugin();
    assert_eq!(p.list(), vec!["cold", "hot"]);
    assert_eq!(p.path("hot"), hot_dir.display().to_string());
    assert_eq!(common::sha256_file(&hot_dir.join(DATA)), hot);
    std::fs::write(hot_dir.join("more"), b"more").unwrap();
    assert_eq!(p.path("cold"), "");
    let m = p.mount("cold", "c1");
    assert_eq!(common::sha256_file(&m.join(DATA)), cold);
    p.unmount("cold", "c1");

    // The record is the truth: a mount lost while thinsnap was down (same boot) is made
    // again at start.
    assert!(d.stop().unwrap().success());
    thinpool::fs::umount(&hot_dir).unwrap();
    let out = d.cli(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("needed: mount volume \"hot\"") && text.contains("1 container mount(s)"),
        "{}",
        output(&out)
    );
    d.spawn();
    assert!(is_mounted(&hot_dir));
    assert_eq!(std::fs::read(hot_dir.join("more")).unwrap(), b"more");
    // Docker's Unmount, after the restarts, releases it.
    let p = d.plugin();
    p.unmount("hot", "running");
    assert!(!is_mounted(&hot_dir));
    assert_check_clean(&mut d);
    let p = d.plugin();
    p.remove("cold");
    p.remove("hot");
    assert_released(&d, 1);
}

#[test]
fn loop_volume_mount_ids_of_an_earlier_boot_are_dropped() {
    let mut d = start();
    let p = d.plugin();
    p.create("v", &[]);
    let mp = p.mount("v", "before-reboot");
    std::fs::write(mp.join("f"), b"kept").unwrap();
    assert!(d.stop().unwrap().success());
    // What a reboot leaves: nothing mounted, no thin device active.
    thinpool::fs::umount(&mp).unwrap();
    for name in common::dm_devices_of(&d.pool) {
        if !name.ends_with("-pool") {
            let n = devicemapper::DmNameBuf::new(name).unwrap();
            thinpool::dm::remove(&n, thinpool::RemoveMode::Now).unwrap();
        }
    }
    let boot = [("THINSNAP_TEST_BOOT_ID", "after-reboot")];
    let out = d.cli_env(&["check"], &boot);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("needed: forget 1 mount(s) of volume \"v\" recorded before a reboot")
            && !text.contains("needed: mount"),
        "{}",
        output(&out)
    );
    d.env = vec![(boot[0].0.into(), boot[0].1.into())];
    d.spawn();
    let p = d.plugin();
    assert_eq!(p.path("v"), "", "no container survived the reboot");
    assert!(!is_mounted(&mp));
    assert_eq!(p.get("v")["Status"]["mounts"], 0);
    // Docker mounts it again when it starts the container (same mount id).
    let mp = p.mount("v", "before-reboot");
    assert_eq!(std::fs::read(mp.join("f")).unwrap(), b"kept");
    p.unmount("v", "before-reboot");
    p.remove("v");
    assert_released(&d, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_volume_names_do_not_meet_snapshots_and_the_cli_sees_both() {
    let mut d = start();
    let p = d.plugin();
    let mut c = d.client().await;
    // A snapshot and a volume of the same name: separate tables.
    c.prepare("data", "").await.unwrap();
    p.create("data", &[]);
    let m = p.mount("data", "c");
    std::fs::write(m.join("f"), b"volume").unwrap();
    assert_eq!(c.names().await.unwrap(), vec!["data"]);
    let snaps: serde_json::Value =
        serde_json::from_slice(&d.cli(&["snapshot", "list", "--json"]).stdout).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");

    // The CLI, through the plugin socket.
    let out = d.cli(&[
        "volume",
        "create",
        "cli",
        "-o",
        "size=2G",
        "-o",
        "from=data",
    ]);
    assert!(out.status.success(), "{}", output(&out));
    let out = d.cli(&["volume", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.starts_with("NAME")
            && text.contains("cli ")
            && text.contains("2 GiB"),
        "{}",
        output(&out)
    );
    let out = d.cli(&["volume", "info", "cli", "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["Status"]["from"], "data", "{info}");
    let out = d.cli(&["volume", "rm", "data"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is mounted at"),
        "{}",
        output(&out)
    );
    let out = d.cli(&["volume", "rm", "missing"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        output(&out)
    );

    // gc does not take volumes' thin devices for orphans.
    let out = d.cli(&["gc"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "nothing to collect\n",
        "{}",
        output(&out)
    );
    assert_eq!(std::fs::read(m.join("f")).unwrap(), b"volume");
    drop(c);
    assert_check_clean(&mut d);
    let out = d.cli(&["check"]);
    assert!(!out.status.success(), "the daemon holds the state lock");
    let p = d.plugin();
    p.unmount("data", "c");
    let out = d.cli(&["volume", "rm", "data", "cli"]);
    assert!(out.status.success(), "{}", output(&out));
    let mut c = d.client().await;
    c.remove("data").await.unwrap();
    assert_released(&d, 1);
}

/// What a crash test interrupts.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// Create `clone` from the mounted `origin`, grown to 2G.
    Create,
    /// Remove the unmounted `victim`.
    Remove,
    /// Mount `target` (first mount id).
    Mount,
    /// Unmount `held` (its last mount id).
    Unmount,
}

/// Kills the daemon at `point` during `op`, restarts it, and checks that the store and the
/// pool agree, the operation is done or undone (and usable either way), the mounted origin
/// kept its data and its mount, and nothing is left at the end.
fn crash_at(point: &str, op: Op) {
    let mut d = start();
    let p = d.plugin();
    p.create("origin", &[]);
    let mo = p.mount("origin", "running");
    let sum = common::write_pattern(&mo.join(DATA), 2 << 20, 1);
    match op {
        Op::Create => {}
        Op::Remove => {
            p.create("victim", &[]);
            let m = p.mount("victim", "c");
            common::write_pattern(&m.join(DATA), 2 << 20, 2);
            p.unmount("victim", "c");
        }
        Op::Mount => p.create("target", &[]),
        Op::Unmount => {
            p.create("held", &[]);
            p.mount("held", "h1");
        }
    }
    assert!(d.stop().unwrap().success());

    d.spawn_with_failpoint(point);
    let p = d.plugin();
    let res = match op {
        Op::Create => p.post(
            "VolumeDriver.Create",
            &json!({"Name": "clone", "Opts": {"from": "origin", "size": "2G"}}),
        ),
        Op::Remove => p.post("VolumeDriver.Remove", &json!({"Name": "victim"})),
        Op::Mount => p.post("VolumeDriver.Mount", &json!({"Name": "target", "ID": "m1"})),
        Op::Unmount => p.post("VolumeDriver.Unmount", &json!({"Name": "held", "ID": "h1"})),
    };
    assert!(
        res.is_err(),
        "the daemon dies at {point} before answering: {res:?}"
    );
    assert_eq!(
        d.wait_exit().signal(),
        Some(9),
        "failpoint {point} must be reached"
    );
    d.spawn();

    assert_check_clean(&mut d);
    let p = d.plugin();
    assert_eq!(
        p.path("origin"),
        mo.display().to_string(),
        "origin still mounted"
    );
    assert_eq!(common::sha256_file(&mo.join(DATA)), sum);
    match op {
        Op::Create => {
            if p.exists("clone") {
                let m = p.mount("clone", "c");
                assert_eq!(common::sha256_file(&m.join(DATA)), sum);
                assert!(common::fs_size(&m) > 3 << 29, "grown to 2G");
                p.unmount("clone", "c");
            } else {
                p.create("clone", &[("from", "origin"), ("size", "2G")]);
            }
            p.remove("clone");
        }
        Op::Remove => {
            if p.exists("victim") {
                p.remove("victim");
            }
        }
        Op::Mount => {
            let dir = d.dir.path().join("volumes/target");
            assert_eq!(p.path("target"), "", "the interrupted Mount is undone");
            assert!(!is_mounted(&dir));
            p.mount("target", "m1");
            p.unmount("target", "m1");
            p.remove("target");
        }
        Op::Unmount => {
            let dir = d.dir.path().join("volumes/held");
            assert_eq!(p.path("held"), "", "the interrupted Unmount is finished");
            assert!(!is_mounted(&dir));
            p.remove("held");
        }
    }
    p.unmount("origin", "running");
    p.remove("origin");
    assert_released(&d, 1);
}

macro_rules! crash_tests {
    ($($name:ident: $point:literal, $op:expr;)*) => {
        $(
            #[test]
            fn $name() {
                crash_at($point, $op);
            }
        )*

        /// Every volume failpoint compiled into thinsnap has a crash test here, or is listed
        /// as not reachable from the outside.
        #[test]
        fn volume_crash_tests_cover_every_volume_failpoint() {
            let tested: Vec<&str> = vec![$($point),*];
            let unreachable = ["undo-volume.after-message"];
            let sources = [
                include_str!("../src/snapshotter/volume/mod.rs"),
                include_str!("../src/snapshotter/volume/create.rs"),
                include_str!("../src/snapshotter/volume/mount.rs"),
                include_str!("../src/snapshotter/volume/remove.rs"),
                include_str!("../src/snapshotter/volume/recover.rs"),
            ];
            let mut found = std::collections::BTreeSet::new();
            for text in sources {
                for part in text.split('"').skip(1).step_by(2) {
                    if part.contains(".after-") && !part.contains(' ') {
                        found.insert(part.to_string());
                    }
                }
            }
            assert!(found.len() >= 12, "found only {found:?}");
            for p in &found {
                assert!(tested.contains(&p.as_str()) || unreachable.contains(&p.as_str()), "failpoint {p} has no crash test");
            }
        }
    };
}

crash_tests! {
    loop_crash_volume_create_after_intent: "volume.after-intent", Op::Create;
    loop_crash_volume_create_after_message: "volume.after-message", Op::Create;
    loop_crash_volume_create_after_txn: "volume.after-txn", Op::Create;
    loop_crash_volume_create_after_grow: "volume.after-grow", Op::Create;
    loop_crash_volume_create_after_ready: "volume.after-ready", Op::Create;
    loop_crash_volume_remove_after_mark: "volume-remove.after-mark", Op::Remove;
    loop_crash_volume_remove_after_discard: "volume-remove.after-discard", Op::Remove;
    loop_crash_volume_remove_after_message: "volume-remove.after-message", Op::Remove;
    loop_crash_volume_remove_after_txn: "volume-remove.after-txn", Op::Remove;
    loop_crash_volume_remove_after_store: "volume-remove.after-store", Op::Remove;
    loop_crash_volume_mount_after_mount: "volume-mount.after-mount", Op::Mount;
    loop_crash_volume_unmount_after_record: "volume-unmount.after-record", Op::Unmount;
}
