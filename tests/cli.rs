//! The storage admin's CLI against a running daemon on real dm: listings as tables and
//! JSON, tree, info, mount/umount for inspection, rm refusals, gc, pool status/check/
//! destroy, configuration, completions and man pages.

mod common;

use common::daemon::Daemon;

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(out: std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn loop_snapshot_listings_tree_info_and_json() {
    let d = Daemon::start();
    ok(d.cli(&["snapshot", "prepare", "base-a", "--label", "team=storage"]));
    ok(d.cli(&["snapshot", "commit", "base", "base-a"]));
    ok(d.cli(&["snapshot", "prepare", "c1", "base"]));
    ok(d.cli(&["snapshot", "view", "v1", "base"]));

    let list = ok(d.cli(&["snapshot", "list"]));
    let lines: Vec<&str> = list.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("KIND") && lines[0].contains("PARENT"),
        "{list}"
    );
    assert_eq!(lines.len(), 4, "{list}");
    let col = lines[0].find("KIND").unwrap();
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.len() > col && &l[col..col + 1] != " "),
        "aligned:\n{list}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["snapshot", "list", "--json"]))).unwrap();
    let names: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["base", "c1", "v1"]);
    let filtered = ok(d.cli(&["snapshot", "list", "--filter", "kind==committed"]));
    assert_eq!(filtered.lines().count(), 2, "{filtered}");

    let tree = ok(d.cli(&["snapshot", "tree"]));
    assert_eq!(tree, "base (committed)\n├── c1 (active)\n└── v1 (view)\n");
    let tree: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["snapshot", "tree", "--json"]))).unwrap();
    assert_eq!(tree[0]["children"].as_array().unwrap().len(), 2);

    let info: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["snapshot", "info", "c1", "--json"]))).unwrap();
    assert_eq!(info["kind"], "active");
    assert_eq!(info["parent"], "base");
    assert!(info["mounts"][0]["source"]
        .as_str()
        .unwrap()
        .starts_with("/dev/dm-"));
    let info = ok(d.cli(&["snapshot", "info", "base"]));
    assert!(info.contains("kind     committed"), "{info}");

    let usage: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["snapshot", "usage", "--json"]))).unwrap();
    assert_eq!(usage.as_array().unwrap().len(), 3);

    let labels = ok(d.cli(&["snapshot", "label", "c1", "a=1", "b=2"]));
    assert_eq!(labels, "a=1\nb=2\n");
    let labels = ok(d.cli(&["snapshot", "label", "c1", "a="]));
    assert_eq!(labels, "b=2\n", "an empty value removes the label");

    let err = fails(d.cli(&["snapshot", "info", "missing"]));
    assert!(
        err.contains("\"missing\" does not exist") && err.contains("NotFound"),
        "{err}"
    );
}

#[test]
fn loop_mount_for_inspection_and_rm_refusals() {
    let d = Daemon::start();
    ok(d.cli(&["snapshot", "prepare", "a"]));
    let m = d.dir.path().join("inspect");
    std::fs::create_dir_all(&m).unwrap();
    let path = m.to_str().unwrap();
    ok(d.cli(&["snapshot", "mount", "a", path]));
    std::fs::write(m.join("f"), b"written through an inspection mount").unwrap();

    // Mounted: rm refuses, and nothing changes.
    let err = fails(d.cli(&["snapshot", "rm", "a"]));
    assert!(
        err.contains("in use") && err.contains("FailedPrecondition"),
        "{err}"
    );
    ok(d.cli(&["snapshot", "umount", path]));
    ok(d.cli(&["snapshot", "commit", "a1", "a"]));

    // A committed snapshot mounts read-only through a temporary view.
    ok(d.cli(&["snapshot", "mount", "a1", path]));
    assert_eq!(
        std::fs::read(m.join("f")).unwrap(),
        b"written through an inspection mount"
    );
    assert!(std::fs::write(m.join("g"), b"x").is_err(), "read-only");
    let views = ok(d.cli(&["snapshot", "list", "--filter", "kind==view"]));
    assert_eq!(views.lines().count(), 2, "one temporary view: {views}");
    ok(d.cli(&["snapshot", "umount", path]));
    let views = ok(d.cli(&["snapshot", "list", "--filter", "kind==view"]));
    assert_eq!(views.lines().count(), 1, "the view is gone: {views}");

    // Children: rm refuses with a clear message.
    ok(d.cli(&["snapshot", "prepare", "child", "a1"]));
    let err = fails(d.cli(&["snapshot", "rm", "a1"]));
    assert!(err.contains("has children"), "{err}");
    ok(d.cli(&["snapshot", "rm", "child", "a1"]));
    assert_eq!(ok(d.cli(&["snapshot", "list"])).lines().count(), 1);
}

#[test]
fn loop_gc_collects_pending_removals_and_reports_them() {
    let d = Daemon::start_with("async_remove = true");
    ok(d.cli(&["snapshot", "prepare", "a"]));
    let m = d.dir.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    ok(d.cli(&["snapshot", "mount", "a", m.to_str().unwrap()]));
    common::write_pattern(&m.join("big"), 64 << 20, 1);
    ok(d.cli(&["snapshot", "umount", m.to_str().unwrap()]));
    ok(d.cli(&["snapshot", "rm", "a"]));

    let dry = ok(d.cli(&["gc", "--dry-run"]));
    assert!(
        dry.contains("would: reclaim the device of removed snapshot \"a\""),
        "{dry}"
    );
    let again = ok(d.cli(&["gc", "--dry-run", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(
        v["actions"].as_array().unwrap().len(),
        1,
        "dry run changed nothing: {again}"
    );

    let done: serde_json::Value = serde_json::from_str(&ok(d.cli(&["gc", "--json"]))).unwrap();
    assert_eq!(done["actions"].as_array().unwrap().len(), 1, "{done}");
    assert!(done["freed_bytes"].as_u64().unwrap() >= 64 << 20, "{done}");
    assert_eq!(ok(d.cli(&["gc"])), "nothing to collect\n");
}

#[test]
fn loop_pool_status_check_and_destroy_refusal() {
    let mut d = Daemon::start();
    ok(d.cli(&["snapshot", "prepare", "a"]));
    let st: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["pool", "status", "--json"]))).unwrap();
    assert_eq!(st["mode"], "rw");
    assert_eq!(st["data_total_bytes"], 4u64 << 30);
    assert_eq!(st["thin_devices"], 2, "the base device and a");
    // thinsnap does not advance the pool's transaction id (docs/architecture.md).
    assert_eq!(st["transaction_id"], 0, "{st}");
    let text = ok(d.cli(&["pool", "status"]));
    assert!(
        text.contains("mode            rw") && text.contains("thin devices    2"),
        "{text}"
    );

    let check = ok(d.cli(&["pool", "check"]));
    assert!(check.contains("metadata is consistent"), "{check}");
    // A metadata backup of the live pool: both thin devices, the pool's transaction id.
    let xml = d.dir.path().join("pool-metadata.xml");
    let out = ok(d.cli(&["pool", "backup", xml.to_str().unwrap()]));
    assert!(out.contains("metadata written to"), "{out}");
    let dump = std::fs::read_to_string(&xml).unwrap();
    assert_eq!(dump.matches("<device dev_id=").count(), 2, "{dump}");
    assert!(
        dump.contains(&format!("transaction=\"{}\"", st["transaction_id"])),
        "{dump}"
    );

    // destroy refuses while the daemon runs, and while snapshots exist.
    let err = fails(d.cli(&["pool", "destroy"]));
    assert!(err.contains("another thinsnap process holds"), "{err}");
    assert!(d.stop().unwrap().success());
    let err = fails(d.cli(&["pool", "destroy"]));
    assert!(
        err.contains("records 1 snapshot") && err.contains("--force"),
        "{err}"
    );
    let check = ok(d.cli(&["check"]));
    assert!(
        check.contains("store and pool agree: 1 snapshot(s)"),
        "{check}"
    );
    // Drop destroys it with --force and checks that nothing is left.
}

#[test]
fn loop_config_completions_and_man_pages() {
    let d = Daemon::start();
    let default = ok(d.cli(&["config", "default"]));
    assert!(default.contains("state_dir = \"/var/lib/thinsnap\""));
    let check = ok(d.cli(&["config", "check"]));
    assert!(check.contains("valid"), "{check}");
    let snippet = ok(d.cli(&["config", "containerd"]));
    assert!(
        snippet.contains(&d.socket.display().to_string()),
        "{snippet}"
    );
    let bad = d.dir.path().join("bad.toml");
    std::fs::write(&bad, "[pool]\nsource = \"nfs\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinsnap"))
        .args(["--config", bad.to_str().unwrap(), "config", "check"])
        .output()
        .unwrap();
    let err = fails(out);
    assert!(err.contains("pool.source") && err.contains("nfs"), "{err}");

    let bash = ok(d.cli(&["completions", "bash"]));
    assert!(
        bash.contains("_thinsnap()") && bash.contains("snapshot"),
        "bash completion"
    );
    let man = d.dir.path().join("man");
    ok(d.cli(&["man", man.to_str().unwrap()]));
    for page in [
        "thinsnap.1",
        "thinsnap-serve.1",
        "thinsnap-snapshot-list.1",
        "thinsnap-pool-status.1",
        "thinsnap-gc.1",
    ] {
        let text =
            std::fs::read_to_string(man.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
}
