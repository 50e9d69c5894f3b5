//! containerd 1.6 end to end on thinsnap, in the VM: `ctr` imports an OCI image (unpacked
//! onto thin snapshots, whiteouts and opaque directories applied), runs containers on it,
//! lists and measures the snapshots as thinsnap does, garbage-collects every device, and
//! keeps a running container across a thinsnap restart.

mod common;

use std::{collections::HashMap, path::Path};

use common::{
    containerd::{Containerd, SNAPSHOTTER},
    daemon::Daemon,
    image::{busybox_layers, oci_archive_with, presence, LOOK, Z},
};
use serde_json::{json, Value};

const IMAGE: &str = "thinsnap.test/busybox:e2e";

/// A three-layer busybox image in `dir`; returns its path and the layers' chain ids.
///
/// 1. busybox and its applets in /bin (gzip);
/// 2. /data/{keep,gone,changed}.txt and /opq/{old.txt,olddir/f} (plain tar);
/// 3. a whiteout of /data/gone.txt, a new /data/changed.txt, and /opq made opaque with a
///    new /opq/new.txt (zstd).
fn busybox_image(dir: &Path) -> (std::path::PathBuf, Vec<String>) {
    let [l1, l2, l3] = busybox_layers(&["sh", "ls", "cat", "echo", "sleep", "test", "tr"]);
    let runtime = json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"});
    let (archive, chain) = oci_archive_with(
        &[(&l1, Z::Gzip), (&l2, Z::Tar), (&l3, Z::Zstd)],
        IMAGE,
        false,
        Some(&runtime),
    );
    let path = dir.join("busybox-oci.tar");
    archive.write(&path);
    (path, chain)
}

/// Imports the busybox image onto thinsnap; returns its chain ids.
fn import(c: &Containerd) -> Vec<String> {
    let (archive, chain) = busybox_image(c.dir.path());
    let out = c.ok(&[
        "images",
        "import",
        "--snapshotter",
        SNAPSHOTTER,
        archive.to_str().unwrap(),
    ]);
    assert!(out.contains(IMAGE), "import: {out}");
    chain
}

/// containerd's key of a thinsnap snapshot name: containerd names its snapshots
/// `<namespace>/<n>/<key>` in the snapshotter.
fn key_of<'a>(c: &Containerd, name: &'a str) -> &'a str {
    let mut parts = name.splitn(3, '/');
    assert_eq!(parts.next(), Some(c.namespace.as_str()), "{name}");
    assert!(parts.next().unwrap().parse::<u64>().is_ok(), "{name}");
    parts.next().unwrap()
}

/// A snapshot as (containerd's key, parent key, kind in lower case).
type Row = (String, String, String);

/// Every snapshot as `ctr snapshots ls` shows it, sorted.
fn ctr_snapshots(c: &Containerd) -> Vec<Row> {
    let out = c.ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
    let mut rows: Vec<Row> = out
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                [key, kind] => (key.into(), String::new(), kind.to_lowercase()),
                [key, parent, kind] => (key.into(), parent.into(), kind.to_lowercase()),
                _ => panic!("ctr snapshots ls: {out}"),
            }
        })
        .collect();
    rows.sort();
    rows
}

/// The same as thinsnap lists them (`thinsnap snapshot list --json`), with containerd's
/// prefixes taken off; also the thinsnap names by key.
fn thinsnap_snapshots(c: &Containerd, d: &Daemon) -> (Vec<Row>, HashMap<String, String>) {
    let list = d.cli_json(&["snapshot", "list", "--json"]);
    let mut names = HashMap::new();
    let mut rows: Vec<Row> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let name = s["name"].as_str().unwrap();
            let parent = s["parent"].as_str().unwrap_or("");
            let key = key_of(c, name).to_string();
            names.insert(key.clone(), name.to_string());
            let parent = if parent.is_empty() {
                String::new()
            } else {
                key_of(c, parent).to_string()
            };
            (key, parent, s["kind"].as_str().unwrap().to_string())
        })
        .collect();
    rows.sort();
    (rows, names)
}

/// Asserts that ctr's `snapshots ls`, `info` and `usage` agree with thinsnap's `snapshot
/// list`, `info` and `usage`; returns the snapshots.
fn assert_snapshots_agree(c: &Containerd, d: &Daemon) -> Vec<Row> {
    let ctr = ctr_snapshots(c);
    let (ts, names) = thinsnap_snapshots(c, d);
    assert_eq!(ctr, ts, "ctr snapshots ls vs thinsnap snapshot list");

    for (key, parent, kind) in &ctr {
        let info: Value =
            serde_json::from_str(&c.ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "info", key]))
                .unwrap();
        assert_eq!(info["Name"], key.as_str(), "{info}");
        assert_eq!(
            info["Kind"].as_str().unwrap().to_lowercase(),
            *kind,
            "{info}"
        );
        assert_eq!(info["Parent"].as_str().unwrap_or(""), parent, "{info}");
        let tinfo = d.cli_json(&["snapshot", "info", &names[key], "--json"]);
        assert_eq!(tinfo["kind"], kind.as_str(), "{tinfo}");
    }

    // Usage: containerd passes thinsnap's answer through: its exclusive bytes, from the last
    // reading of the pool's mapping trees (at most a second or so old), while `thinsnap
    // snapshot usage` reads them for the call. So ctr's figure can only be smaller: a
    // running container's writes grow its own; a committed snapshot's is fixed at commit,
    // and so are its inodes.
    let usage = c.ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "usage", "-b"]);
    let ctr_usage: HashMap<String, (u64, u64)> = usage
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].into(), (f[1].parse().unwrap(), f[2].parse().unwrap()))
        })
        .collect();
    let ts_usage: HashMap<String, (u64, u64)> = d
        .cli_json(&["snapshot", "usage", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let key = key_of(c, u["name"].as_str().unwrap()).to_string();
            (
                key,
                (
                    u["exclusive_bytes"].as_u64().unwrap(),
                    u["inodes"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(ctr_usage.len(), ctr.len(), "{usage}");
    for (key, _, kind) in &ctr {
        let (c_bytes, c_inodes) = ctr_usage[key];
        let (t_bytes, t_inodes) = ts_usage[key];
        assert!(t_bytes > 0 && c_inodes > 0, "{key} ({kind}): {usage}");
        assert!(
            c_bytes <= t_bytes && c_inodes == t_inodes,
            "usage of {key}: ctr {c_bytes} {c_inodes}, thinsnap {t_bytes} {t_inodes}"
        );
    }
    ctr
}

#[test]
fn loop_containerd_runs_an_image_unpacked_on_thinsnap() {
    let d = Daemon::start();
    let c = Containerd::start(&d);
    let chain = import(&c);

    // Unpacked: one committed snapshot per layer, named by its chain id, each on the one
    // below.
    let snaps = assert_snapshots_agree(&c, &d);
    let mut want: Vec<Row> = chain
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let parent = if i == 0 {
                String::new()
            } else {
                chain[i - 1].clone()
            };
            (id.clone(), parent, "committed".to_string())
        })
        .collect();
    want.sort();
    assert_eq!(snaps, want, "the image's layers");

    // A running container's active snapshot: listed, described and measured alike.
    // (Before the containers below: containerd removes a deleted container's snapshot
    // from the snapshotter only when it collects garbage.)
    c.run_detached(IMAGE, "long", &["sleep", "600"]);
    let snaps = assert_snapshots_agree(&c, &d);
    assert!(
        snaps.contains(&("long".into(), chain[2].clone(), "active".into())),
        "{snaps:?}"
    );

    // A container sees the layers merged: whiteout and opaque directory applied.
    let out = c.run(
        IMAGE,
        "c1",
        &format!(
            "{LOOK}; echo written-by-c1 > /data/written; echo \"written: $(cat /data/written)\""
        ),
    );
    assert_eq!(
        presence(&out),
        [
            "present data/keep.txt",
            "absent data/gone.txt",
            "present data/changed.txt",
            "absent opq/old.txt",
            "absent opq/olddir",
            "present opq/new.txt",
            "absent data/written",
        ],
        "{out}"
    );
    assert!(out.contains("changed: layer 3\n"), "{out}");
    assert!(out.contains("opq: new.txt \n"), "{out}");
    assert!(out.contains("written: written-by-c1\n"), "{out}");

    // Its write is its own: not in a second container, not in the image's top layer.
    let out = c.run(IMAGE, "c2", LOOK);
    assert!(presence(&out).contains(&"absent data/written"), "{out}");
    let (_, names) = thinsnap_snapshots(&c, &d);
    let top = &names[chain.last().unwrap()];
    let m = d.dir.path().join("inspect");
    std::fs::create_dir_all(&m).unwrap();
    d.cli_ok(&["snapshot", "mount", top, m.to_str().unwrap()]);
    let in_image = (
        m.join("data/keep.txt").exists(),
        m.join("data/written").exists(),
    );
    d.cli_ok(&["snapshot", "umount", m.to_str().unwrap()]);
    assert_eq!(
        in_image,
        (true, false),
        "the top layer has keep.txt, not the write"
    );
}

#[test]
fn loop_containerd_gc_removes_every_snapshot_device() {
    let d = Daemon::start();
    let before = d.thin_devices();
    let c = Containerd::start(&d);
    import(&c);
    c.run(IMAGE, "once", "echo hello > /hello");
    c.run_detached(IMAGE, "kept", &["sleep", "600"]);
    c.ok(&["tasks", "kill", "-s", "SIGKILL", "kept"]);
    let start = std::time::Instant::now();
    while !c.ok(&["tasks", "ls"]).contains("STOPPED") {
        assert!(start.elapsed().as_secs() < 60, "{}", c.ok(&["tasks", "ls"]));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    c.ok(&["tasks", "delete", "kept"]);
    c.ok(&["containers", "delete", "kept"]);
    assert!(
        d.thin_devices() > before,
        "the image and containers used devices"
    );

    // Removing the image with --sync runs containerd's garbage collector, which removes
    // every snapshot through thinsnap's Remove.
    c.ok(&["images", "rm", "--sync", IMAGE]);
    assert_eq!(ctr_snapshots(&c), vec![], "containerd has no snapshot left");
    let list = d.cli_json(&["snapshot", "list", "--json"]);
    assert_eq!(list, json!([]), "thinsnap has no snapshot left");
    // The base device (the empty filesystem every layer starts from) stays for the next one.
    assert_eq!(d.thin_devices(), before + 1, "only the base device is left");
}

/// A restart without socket activation (thinsnap started by hand): a running container
/// keeps its filesystem and writes to it while thinsnap is down, containerd reconnects
/// by itself after its back-off, and the new thinsnap knows every snapshot.
#[test]
fn loop_containerd_container_survives_a_thinsnap_restart() {
    let mut d = Daemon::start();
    let c = Containerd::start(&d);
    import(&c);
    c.run_detached(IMAGE, "long", &["sleep", "600"]);
    let out = c.ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "long",
        "sh",
        "-c",
        "echo before > /state; cat /data/keep.txt",
    ]);
    assert_eq!(out, "kept from layer 2\n");

    assert!(d.stop().unwrap().success(), "thinsnap stops cleanly");
    d.spawn();

    // The running container still has its filesystem, and writes to it.
    let out = c.ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "e2",
        "long",
        "sh",
        "-c",
        "echo after >> /state; cat /state /data/keep.txt",
    ]);
    assert_eq!(out, "before\nafter\nkept from layer 2\n");
    // Without socket activation containerd's connection to thinsnap is in its reconnect
    // back-off (at most 3 s between attempts) for a while: it comes back by itself.
    wait_for_reconnect(&c);
    // The new daemon knows the same snapshots as containerd, and serves a new container.
    let snaps = assert_snapshots_agree(&c, &d);
    assert!(
        snaps.iter().any(|s| s.0 == "long" && s.2 == "active"),
        "{snaps:?}"
    );
    let out = c.run(IMAGE, "after-restart", "cat /data/changed.txt");
    assert_eq!(out, "layer 3\n");
}

/// Waits (up to 30 s) until thinsnap lists what containerd lists: `ctr run --rm` removes
/// its container's snapshot from containerd's metadata at once, and containerd's garbage
/// collector removes it from thinsnap in the background, a moment later.
fn wait_for_gc(c: &Containerd, d: &Daemon) {
    let start = std::time::Instant::now();
    loop {
        let (ctr, ts) = (ctr_snapshots(c), thinsnap_snapshots(c, d).0);
        if ctr == ts {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "containerd's gc did not remove thinsnap's snapshots within 30 s:\nctr {ctr:?}\nthinsnap {ts:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Waits until containerd's requests reach thinsnap again after a restart without socket
/// activation (docs/operations.md): within 15 s, failing only with connection errors.
fn wait_for_reconnect(c: &Containerd) {
    let start = std::time::Instant::now();
    loop {
        let out = c.ctr(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
        if out.status.success() {
            eprintln!("containerd reconnected after {:?}", start.elapsed());
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("connection refused") || err.contains("no such file"),
            "not a connection error: {err}"
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "containerd did not reconnect to thinsnap within 15 s: {err}\n{}",
            c.log_tail()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// With its socket held as systemd's thinsnap.socket holds it, thinsnap restarts and
/// containerd never notices: right after each of 5 restarts, containerd's first requests
/// to it (`ctr snapshots ls`, then a whole `ctr run --rm`) succeed and see the same
/// snapshots. Without socket activation, the socket is gone while thinsnap restarts and
/// containerd's connection falls into its reconnect back-off (docs/operations.md).
#[test]
fn loop_containerd_never_notices_a_socket_activated_restart() {
    let mut d = Daemon::start_activated();
    let c = Containerd::start(&d);
    import(&c);
    let before = ctr_snapshots(&c);
    for i in 1..=5 {
        assert!(d.stop().unwrap().success(), "thinsnap stops cleanly");
        d.spawn();
        assert_eq!(ctr_snapshots(&c), before, "restart {i}: ctr snapshots ls");
        let out = c.run(
            IMAGE,
            &format!("after-restart-{i}"),
            "cat /data/changed.txt",
        );
        assert_eq!(out, "layer 3\n", "restart {i}");
    }
    wait_for_gc(&c, &d);
    assert_snapshots_agree(&c, &d);
}
