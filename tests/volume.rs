//! The Docker volume plugin (issue #8), driven through its HTTP API on the plugin socket as
//! Docker drives it: every endpoint, errors, size and filesystem options, volumes that
//! survive restarts (mounted ones stay mounted in the same boot; mount ids of an earlier
//! boot are dropped), clones that see their origin's data and then diverge, volumes
//! smaller than the base device (a filesystem of their own), resizes online and offline,
//! xfs on a full pool failing its writers instead of hanging them, crash points of Create,
//! Remove, Mount, Unmount and Resize, and nothing leaked.

mod common;

use std::os::unix::process::ExitStatusExt;

use common::{
    daemon::Daemon,
    volume::{device_bytes, fs_type, is_mounted, xfs_enospc_retries, CONFIG},
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
        (
            json!({"size": "8M"}),
            400,
            "smaller than the smallest ext4 filesystem, 16 MiB",
        ),
        (
            json!({"size": "200M", "fs": "xfs"}),
            400,
            "smaller than the smallest xfs filesystem, 300 MiB",
        ),
        (json!({"size": "0"}), 400, "more than zero"),
        (json!({"size": "-1G"}), 400, "cannot be negative"),
        (json!({"size": "1000T"}), 400, "largest size allowed"),
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

/// A small volume case: name, options, size, filesystem, least share of it `df` shows.
type Small<'a> = (&'a str, &'a [(&'a str, &'a str)], u64, &'a str, f64);

/// Volumes smaller than the base device (1G here): each a thin device with a filesystem
/// of its own, exactly the size asked, without lost+found; clones of them, at their size
/// and larger, carry the data. No base device is made for them.
#[test]
fn loop_volume_smaller_than_the_base_has_a_filesystem_of_its_own() {
    let d = start();
    let p = d.plugin();
    // name, options, size, filesystem, the least share of it df may show (what the
    // filesystem keeps for itself: ext4 its inode tables and journal, xfs its 64 MiB log).
    let cases: [Small; 3] = [
        ("s200", &[("size", "200M")], 200 << 20, "ext4", 0.85),
        ("s16", &[("size", "16m")], 16 << 20, "ext4", 0.75),
        (
            "x300",
            &[("size", "300MiB"), ("fs", "xfs")],
            300 << 20,
            "xfs",
            0.75,
        ),
    ];
    let mut sums = Vec::new();
    for (name, opts, size, fs, share) in cases {
        p.create(name, opts);
        let st = p.get(name)["Status"].clone();
        assert_eq!(st["size_bytes"], size, "{name}: {st}");
        let mp = p.mount(name, "c");
        assert_eq!(fs_type(&mp), fs, "{name}");
        assert_eq!(device_bytes(st["device"].as_str().unwrap()), size, "{name}");
        let df = common::fs_size(&mp);
        println!(
            "{name}: df size {df} of {size} ({:.1}%)",
            df as f64 * 100.0 / size as f64
        );
        assert!(
            df <= size && df as f64 >= size as f64 * share,
            "{name}: df shows {df} of {size}"
        );
        let names: Vec<_> = std::fs::read_dir(&mp).unwrap().collect();
        assert!(names.is_empty(), "{name}: a new volume is empty: {names:?}");
        if fs == "xfs" {
            assert_eq!(xfs_enospc_retries(&mp), "0", "{name}");
        }
        sums.push(common::write_pattern(&mp.join(DATA), 4 << 20, size));
        p.unmount(name, "c");
    }
    assert_eq!(thin_devices(&d), 3, "a device each, and no base device");

    // Clones of the 200M volume: at its size, and grown to 1G.
    p.create("c200", &[("from", "s200")]);
    p.create("c1g", &[("from", "s200"), ("size", "1G")]);
    for (name, size) in [("c200", 200u64 << 20), ("c1g", 1 << 30)] {
        assert_eq!(p.get(name)["Status"]["size_bytes"], size, "{name}");
        let mp = p.mount(name, "c");
        assert_eq!(common::sha256_file(&mp.join(DATA)), sums[0], "{name}");
        let df = common::fs_size(&mp);
        assert!(df <= size && df as f64 > size as f64 * 0.85, "{name}: {df}");
        p.unmount(name, "c");
    }
    // And of the xfs one (nouuid: beside its origin).
    p.create("cx", &[("from", "x300")]);
    let mo = p.mount("x300", "c");
    let mc = p.mount("cx", "c");
    assert_eq!(common::sha256_file(&mc.join(DATA)), sums[2]);
    assert_eq!(common::sha256_file(&mo.join(DATA)), sums[2]);
    p.unmount("cx", "c");
    p.unmount("x300", "c");
    for n in ["s200", "s16", "x300", "c200", "c1g", "cx"] {
        p.remove(n);
    }
    assert_released(&d, 0);
}

/// `thinsnap volume resize` (the admin API): a mounted ext4 volume and a mounted xfs one
/// grow online under their mounts, an unmounted one grows too; the data stays; shrinking
/// and unknown volumes are refused and change nothing.
#[test]
fn loop_volume_resize_online_and_offline() {
    let mut d = start();
    let p = d.plugin();
    p.create("m", &[]);
    p.create("x", &[("size", "300M"), ("fs", "xfs")]);
    p.create("u", &[("size", "200M")]);
    let mm = p.mount("m", "c");
    let mx = p.mount("x", "c");
    let mu = p.mount("u", "c");
    let sums: Vec<String> = [&mm, &mx, &mu]
        .iter()
        .enumerate()
        .map(|(i, m)| common::write_pattern(&m.join(DATA), 4 << 20, i as u64))
        .collect();
    p.unmount("u", "c");
    let mut resized = Vec::new();
    for (name, size, bytes, shown) in [
        ("m", "3G", 3u64 << 30, "m: 1 GiB -> 3 GiB"),
        ("x", "1GiB", 1 << 30, "x: 300 MiB -> 1 GiB"),
        ("u", "2GB", 2 << 30, "u: 200 MiB -> 2 GiB"),
    ] {
        let out = d.cli_ok(&["volume", "resize", name, size]);
        assert_eq!(out.trim(), shown);
        let st = p.get(name)["Status"].clone();
        assert_eq!(st["size_bytes"], bytes, "{name}: {st}");
        assert!(st.get("resize_pending_from_bytes").is_none(), "{st}");
        resized.push((name, bytes, st["device"].as_str().unwrap().to_string()));
    }
    // Online: the same mounts, bigger, with their data.
    for (mp, (name, bytes, dev), sum) in [
        (&mm, resized[0].clone(), &sums[0]),
        (&mx, resized[1].clone(), &sums[1]),
    ] {
        assert_eq!(p.path(name), mp.display().to_string());
        assert_eq!(device_bytes(&dev), bytes, "{name}");
        let df = common::fs_size(mp);
        assert!(
            df <= bytes && df as f64 > bytes as f64 * 0.9,
            "{name}: df {df}"
        );
        assert_eq!(&common::sha256_file(&mp.join(DATA)), sum, "{name}");
    }
    assert_eq!(xfs_enospc_retries(&mx), "0");
    // Offline: left unmounted and inactive, grown when mounted.
    assert_eq!(p.path("u"), "");
    let mu = p.mount("u", "c");
    assert!(common::fs_size(&mu) as f64 > (2u64 << 30) as f64 * 0.9);
    assert_eq!(common::sha256_file(&mu.join(DATA)), sums[2]);

    for (args, why) in [
        (["volume", "resize", "m", "2G"], "cannot shrink to 2 GiB"),
        (["volume", "resize", "m", "0"], "more than zero"),
        (
            ["volume", "resize", "nope", "5G"],
            "volume \"nope\" does not exist",
        ),
    ] {
        let out = d.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{args:?}: {}",
            output(&out)
        );
    }
    let out = d.cli_ok(&["volume", "resize", "m", "3G"]);
    assert_eq!(out.trim(), "m: 3 GiB (already that size)");
    assert_eq!(p.get("m")["Status"]["size_bytes"], 3u64 << 30);
    for n in ["m", "x", "u"] {
        p.unmount(n, "c");
    }
    assert_check_clean(&mut d);
    let p = d.plugin();
    for n in ["m", "x", "u"] {
        p.remove(n);
    }
    assert_released(&d, 1);
}

/// xfs on a pool that runs out of space: the writer gets ENOSPC within 60 s of its last
/// write that reached the pool, and xfs, set to give up on metadata writes the pool
/// refuses (`xfs_nospace_max_retries = 0`), shuts itself down so a writer of metadata
/// fails too instead of writing on into memory for a pool that never gets space (the
/// kernel's default retries forever). Unmount does not hang; after `thinsnap pool grow`
/// the volume mounts again and takes writes.
#[test]
fn loop_volume_xfs_on_a_full_pool_fails_writers_then_recovers_after_pool_grow() {
    let d = Daemon::start_custom(
        CONFIG,
        Some("[pool.loopback]\ndata_size = \"256M\"\nmetadata_size = \"64M\""),
    );
    let p = d.plugin();
    // Smaller than the base device: a filesystem of its own, whose log mkfs wrote (a
    // snapshot of the base would share its log blocks with the base, and the first log
    // write the full pool refuses shuts xfs down whatever the setting).
    p.create("x", &[("fs", "xfs"), ("size", "512M")]);
    let mp = p.mount("x", "c");
    assert_eq!(xfs_enospc_retries(&mp), "0");

    let dir = mp.clone();
    let data = run_bounded("the data writer", 600, move || fill_until_error(&dir));
    let (err, since_last_ok) = data;
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "the writer fails with ENOSPC: {err}"
    );
    assert!(
        since_last_ok <= std::time::Duration::from_secs(60),
        "the writer failed {since_last_ok:?} after its last write that reached the pool"
    );
    let status = d.cli_json(&["pool", "status", "--json"]);
    assert_eq!(status["mode"], "out-of-space", "{status}");

    // Metadata work on the full pool: small files, each needing inode and directory
    // blocks that xfs writes back later, from its log push every 30 s (xfssyncd_centisecs).
    // xfs retries a refused write-back once, at the next push, then gives up and shuts
    // down: within two pushes. With the kernel's default (`xfs_nospace_max_retries = -1`)
    // this writer went on for 120 s without an error, xfs retrying all along (measured).
    // A fast writer (about 4,600 files a second in the VM) may fill the 512 MiB filesystem
    // first, in about 11 s: then it stops with ENOSPC from xfs itself.
    let dir = mp.clone();
    let (err, took) = run_bounded("the metadata writer", 120, move || {
        let start = std::time::Instant::now();
        let err = (0u64..)
            .find_map(|n| {
                let sub = dir.join(format!("d{}", n / 1000));
                let made = match n % 1000 {
                    0 => std::fs::create_dir(&sub),
                    _ => Ok(()),
                };
                made.and_then(|()| std::fs::write(sub.join(format!("f{n}")), b"small"))
                    .err()
            })
            .unwrap();
        (err, start.elapsed())
    });
    println!("metadata writer: {err} after {took:?}");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EIO | libc::ENOSPC)),
        "{err}"
    );

    // Unmount does not hang; grow the pool; the volume mounts (xfs replays its log) and
    // takes writes again.
    run_bounded("Unmount", 120, {
        let p = d.plugin();
        move || p.unmount("x", "c")
    });
    d.cli_ok(&["pool", "grow", "1G"]);
    let mp = p.mount("x", "c2");
    let status = d.cli_json(&["pool", "status", "--json"]);
    assert_eq!(
        status["mode"], "rw",
        "the grown pool takes writes again: {status}"
    );
    // The metadata writer's files are in the filesystem (its log replayed them); when the
    // writer filled the filesystem before xfs shut down, it is full: make room.
    for e in std::fs::read_dir(&mp).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with('d') {
            std::fs::remove_dir_all(e.path()).unwrap();
        }
    }
    let sum = common::write_pattern(&mp.join("after-grow"), 8 << 20, 9);
    std::fs::File::open(mp.join("after-grow"))
        .unwrap()
        .sync_all()
        .unwrap();
    assert_eq!(common::sha256_file(&mp.join("after-grow")), sum);
    p.unmount("x", "c2");
    p.remove("x");
    assert_released(&d, 0);
}

/// Runs `f` on a thread of its own; panics if it takes longer than `secs` (a hang).
fn run_bounded<T: Send + 'static>(
    what: &str,
    secs: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs} s: it hangs"))
}

/// Writes 1 MiB blocks into a new file under `dir`, syncing every 4 MiB, until a write or
/// sync fails (or 4 GiB are written: then it panics); returns the error and the time since
/// the last sync that succeeded.
fn fill_until_error(dir: &std::path::Path) -> (std::io::Error, std::time::Duration) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("fill")).unwrap();
    let block = vec![0x5au8; 1 << 20];
    let mut last_ok = std::time::Instant::now();
    for n in 1..=4096u64 {
        let res = f
            .write_all(&block)
            .and_then(|()| if n % 4 == 0 { f.sync_data() } else { Ok(()) });
        match res {
            Ok(()) if n % 4 == 0 => last_ok = std::time::Instant::now(),
            Ok(()) => {}
            Err(e) => return (e, last_ok.elapsed()),
        }
    }
    panic!("4 GiB written to a 256 MiB pool without an error");
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
    // Its device is reclaimed in the background: Cleanup waits for that, as containerd's
    // garbage collection does.
    c.cleanup().await.unwrap();
    assert_released(&d, 1);
}

/// What a crash test interrupts.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// Create `clone` from the mounted `origin`, grown to 2G.
    Create,
    /// Create `small`, 200M: a filesystem of its own.
    CreateSmall,
    /// Resize the mounted `origin` from 1G to 2G (`thinsnap volume resize`).
    Resize,
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
    crash_then_recover(point, op, None)
}

/// Crashes `op` at `point`; with `recovery_point`, the next start's recovery is killed
/// there too, and the start after that must finish the job.
fn crash_then_recover(point: &str, op: Op, recovery_point: Option<&str>) {
    let mut d = start();
    let p = d.plugin();
    p.create("origin", &[]);
    let mo = p.mount("origin", "running");
    let sum = common::write_pattern(&mo.join(DATA), 2 << 20, 1);
    match op {
        Op::Create | Op::CreateSmall | Op::Resize => {}
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
        Op::CreateSmall => p.post(
            "VolumeDriver.Create",
            &json!({"Name": "small", "Opts": {"size": "200M"}}),
        ),
        Op::Resize => {
            let out = d.cli(&["volume", "resize", "origin", "2G"]);
            match out.status.success() {
                true => Ok(common::volume::Answer {
                    status: 200,
                    headers: Vec::new(),
                    body: json!({"resized": output(&out)}),
                }),
                false => Err(std::io::Error::other(output(&out))),
            }
        }
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
    if let Some(again) = recovery_point {
        d.recover_dying_at(again);
    }
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
        Op::CreateSmall => {
            if p.exists("small") {
                let dev = p.get("small")["Status"]["device"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let m = p.mount("small", "c");
                assert_eq!(device_bytes(&dev), 200 << 20);
                assert!(std::fs::read_dir(&m).unwrap().next().is_none(), "empty");
                p.unmount("small", "c");
            } else {
                p.create("small", &[("size", "200M")]);
            }
            p.remove("small");
        }
        Op::Resize => {
            let st = p.get("origin")["Status"].clone();
            if st["size_bytes"] != 2u64 << 30 {
                assert_eq!(st["size_bytes"], 1u64 << 30, "{st}");
                d.cli_ok(&["volume", "resize", "origin", "2G"]);
            }
            let st = p.get("origin")["Status"].clone();
            assert!(
                st.get("resize_pending_from_bytes").is_none(),
                "finished: {st}"
            );
            let dev = st["device"].as_str().unwrap();
            assert_eq!(device_bytes(dev), 2 << 30);
            assert!(common::fs_size(&mo) > 3 << 29, "grown to 2G online");
        }
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

    };
}

/// Recovery killed while it rolls back an interrupted create (the clone's grow mount
/// unmounted, its device deleted) or finishes a removal.
#[test]
fn loop_crash_recovery_undo_volume() {
    crash_then_recover(
        "volume.after-grow",
        Op::Create,
        Some("undo-volume.after-message"),
    );
}

/// Recovery killed while it finishes an interrupted resize (after the device has its new
/// size), and the next start finishes it.
#[test]
fn loop_crash_recovery_finish_volume_resize() {
    crash_then_recover(
        "volume-resize.after-intent",
        Op::Resize,
        Some("volume-resize.after-reload"),
    );
}

#[test]
fn loop_crash_recovery_finish_volume_remove() {
    crash_then_recover(
        "volume-remove.after-mark",
        Op::Remove,
        Some("volume-remove.after-message"),
    );
}

crash_tests! {
    loop_crash_volume_create_after_intent: "volume.after-intent", Op::Create;
    loop_crash_volume_create_after_message: "volume.after-message", Op::Create;
    loop_crash_volume_create_after_grow: "volume.after-grow", Op::Create;
    loop_crash_volume_create_after_ready: "volume.after-ready", Op::Create;
    loop_crash_volume_create_after_mkfs: "volume.after-mkfs", Op::CreateSmall;
    loop_crash_volume_resize_after_intent: "volume-resize.after-intent", Op::Resize;
    loop_crash_volume_resize_after_reload: "volume-resize.after-reload", Op::Resize;
    loop_crash_volume_resize_after_grow: "volume-resize.after-grow", Op::Resize;
    loop_crash_volume_resize_after_ready: "volume-resize.after-ready", Op::Resize;
    loop_crash_volume_remove_after_mark: "volume-remove.after-mark", Op::Remove;
    loop_crash_volume_remove_after_discard: "volume-remove.after-discard", Op::Remove;
    loop_crash_volume_remove_after_deactivate: "volume-remove.after-deactivate", Op::Remove;
    loop_crash_volume_remove_after_message: "volume-remove.after-message", Op::Remove;
    loop_crash_volume_remove_after_store: "volume-remove.after-store", Op::Remove;
    loop_crash_volume_mount_after_mount: "volume-mount.after-mount", Op::Mount;
    loop_crash_volume_unmount_after_record: "volume-unmount.after-record", Op::Unmount;
}

/// The measurement behind the choice of how volumes smaller than the base device are made
/// (docs/docker.md, "Volume sizes"): mkfs of ext4 and xfs on a thin device at 200 MiB (xfs:
/// 300 MiB), 1, 10 and 100 GiB, and a snapshot of a formatted device grown online, with
/// the time each takes and the pool space it maps. Prints; asserts nothing but success.
/// `vagrant/test --no-unit --test volume -- --ignored measure --nocapture`.
#[test]
#[ignore = "a measurement, run by hand"]
fn loop_zz_measure_mkfs_and_grow() {
    use std::time::Instant;
    use thinpool::{
        units::{bytes_to_sectors, format_size, sectors_to_bytes, GIB, MIB},
        FsType, RemoveMode, ThinId,
    };
    let t = common::TestPool::new(400 * GIB);
    let pool = t.pool();
    let mapped = |id| format_size(sectors_to_bytes(pool.thin_usage(id).unwrap().mapped));
    let mut next = 0;
    let mut id = move || {
        next += 1;
        ThinId::new(next).unwrap()
    };
    for fs in [FsType::Ext4, FsType::Xfs] {
        let small = if fs == FsType::Ext4 {
            200 * MIB
        } else {
            300 * MIB
        };
        for size in [small, GIB, 10 * GIB, 100 * GIB] {
            let i = id();
            pool.create_thin(i).unwrap();
            let dev = pool.activate(i, bytes_to_sectors(size)).unwrap();
            let start = Instant::now();
            fs.mkfs(&dev.devnode, &[]).unwrap();
            let secs = start.elapsed().as_secs_f64();
            println!(
                "mkfs {fs} {}: {secs:.2} s, maps {}",
                format_size(size),
                mapped(i)
            );
            pool.delete_thin(i).unwrap();
        }
        for (from, to) in [(10 * GIB, 100 * GIB), (GIB, 10 * GIB), (small, 10 * GIB)] {
            let base = id();
            pool.create_thin(base).unwrap();
            let dev = pool.activate(base, bytes_to_sectors(from)).unwrap();
            fs.mkfs(&dev.devnode, &[]).unwrap();
            pool.deactivate(base, RemoveMode::Now).unwrap();
            let snap = id();
            let start = Instant::now();
            pool.create_snapshot(snap, base).unwrap();
            let dev = pool.activate(snap, bytes_to_sectors(to)).unwrap();
            let m = t.mountpoint(&format!("grow-{snap}"));
            thinpool::fs::mount(&dev.devnode, &m, fs, fs.required_options()).unwrap();
            thinpool::fs::grow_mounted(fs, &dev.devnode, &m).unwrap();
            let secs = start.elapsed().as_secs_f64();
            let df = common::fs_size(&m);
            thinpool::fs::umount(&m).unwrap();
            println!(
                "snapshot of {fs} {} grown to {}: {secs:.2} s, maps {} of its own, df {}",
                format_size(from),
                format_size(to),
                mapped(snap),
                format_size(df)
            );
            pool.delete_thin(snap).unwrap();
            pool.delete_thin(base).unwrap();
        }
    }
}
