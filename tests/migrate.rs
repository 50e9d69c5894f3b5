//! `thinsnap migrate docker-devicemapper` on Docker devicemapper storage the test builds
//! itself (tests/common/docker.rs, as Docker's driver builds it, checked against a real
//! Docker 20.10 by tests/docker_migrate.rs), kept only for what a real dockerd does not
//! produce on demand: the state a dockerd killed in the middle of creating a device leaves
//! (its transaction open, the device made in the pool, the pool's transaction id not
//! moved), a device marked for deferred deletion, a thin id no metadata of Docker's
//! records, and all that with `dm.fs=ext4` and `dm.blocksize=128K` (the real installs use
//! Docker's defaults, xfs and 64 KiB). Docker's open transaction is rolled back and its
//! pending deletions done, also when the migration is killed while doing them; leaked thin
//! ids are adopted, not deleted.

mod common;

use std::{fs, path::Path, process::Command};

use common::{
    daemon::{Daemon, Mounted},
    docker::{hex_id, DockerDm},
    migrate::{ok, recorded_at, thinsnap, thinsnap_env, CRASH_POINTS},
    *,
};
use thinpool::units::GIB;

/// thinsnap's configuration for the migrated pool: a test state directory and socket in
/// `dir`, Docker's loopback files as the pool.
fn write_config(dir: &Path, docker: &DockerDm, pool: &thinpool::PoolName) -> std::path::PathBuf {
    let kib = docker.block_size * 512 / 1024;
    let lines = format!(
        "source = \"loopback\"\nblock_size = \"{kib}K\"\n[pool.loopback]\ndir = \"{}\"",
        docker.home.join("devicemapper").display()
    );
    let config = dir.join("config.toml");
    fs::write(
        &config,
        common::daemon::test_config(dir, pool, "", Some(&lines)),
    )
    .unwrap();
    config
}

fn migrate(config: &Path, docker: &DockerDm, dry_run: bool) -> std::process::Output {
    common::migrate::migrate(config, &docker.root, dry_run, &[])
}

/// Files and directories under `root`, relative, directories with a trailing slash.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if p.is_dir() && !p.is_symlink() {
                out.push(format!("{rel}/"));
                walk(&p, root, out);
            } else {
                out.push(rel);
            }
        }
    }
    walk(root, root, &mut out);
    out.sort();
    out
}

fn e2fsck(dev: &str) {
    let out = Command::new("e2fsck").args(["-fn", dev]).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck {dev}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Docker's storage after `docker pull` of a two-layer image and `docker create` of a
/// container that wrote a file: base (thin id 1), layers (2, 3), the container's init (4)
/// and read-write (5) devices.
struct Built {
    docker: DockerDm,
    l1: String,
    l2: String,
    cid: String,
    hello: String,
}

fn build_docker(dir: &Path) -> Built {
    let mut docker = DockerDm::new(dir, 128, GIB);
    let mut hello = String::new();
    let l1 = docker.add_layer(None, "debian", |r| {
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::create_dir_all(r.join("bin")).unwrap();
        fs::write(r.join("etc/os-release"), "PRETTY_NAME=\"Debian 12\"\n").unwrap();
        fs::write(r.join("etc/remove-me"), "deleted by the next layer").unwrap();
        hello = write_pattern(&r.join("bin/hello"), 1 << 20, 7);
    });
    let l2 = docker.add_layer(Some(&l1), "app", |r| {
        fs::remove_file(r.join("etc/remove-me")).unwrap();
        fs::create_dir_all(r.join("app")).unwrap();
        fs::write(r.join("app/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        // An image may have its own /rootfs and /id: they must survive as they are.
        fs::create_dir_all(r.join("rootfs")).unwrap();
        fs::write(r.join("rootfs/inside"), "the image's /rootfs/inside").unwrap();
        fs::write(r.join("id"), "the image's /id").unwrap();
    });
    let cid = hex_id("container one");
    docker.add_container(&cid, &l2, |r| {
        fs::create_dir_all(r.join("data")).unwrap();
        fs::write(r.join("data/state"), "written by the container").unwrap();
    });
    Built {
        docker,
        l1,
        l2,
        cid,
        hello,
    }
}

/// dockerd dies in createRegisterSnapDevice: its transaction is open, the snapshot of
/// `origin` made and registered, the pool's transaction id not moved yet. Returns the
/// open transaction id.
fn crash_mid_create(docker: &mut DockerDm, origin: &str) -> u64 {
    let half = hex_id("half-made");
    let id = docker.next_device_id();
    let open = docker.open_transaction(&half, id);
    let origin = docker.devices[origin].id;
    docker.message(&format!("create_snap {id} {origin}"));
    docker.save_device(&half, id, GIB, open, false, false);
    open
}

/// What the migrated snapshots must hold, seen through the daemon.
async fn check_migrated(d: &Daemon, b: &Built) {
    let mut c = d.client().await;
    let m = c.view("look", &b.l2).await.unwrap();
    e2fsck(&m[0].source);
    let v = Mounted::new(d.dir.path(), "look", &m);
    assert_eq!(
        tree(&v.path),
        vec![
            "app/",
            "app/run.sh",
            "bin/",
            "bin/hello",
            "etc/",
            "etc/os-release",
            "id",
            "lost+found/",
            "rootfs/",
            "rootfs/inside"
        ]
    );
    assert_eq!(sha256_file(&v.path.join("bin/hello")), b.hello);
    assert_eq!(
        fs::read_to_string(v.path.join("id")).unwrap(),
        "the image's /id"
    );
    drop(v);
    let m = c
        .mounts(&format!("docker/container/{}", b.cid))
        .await
        .unwrap();
    let w = Mounted::new(d.dir.path(), "ctr", &m);
    assert_eq!(
        fs::read_to_string(w.path.join("data/state")).unwrap(),
        "written by the container"
    );
    assert!(w.path.join(".dockerenv").exists() && w.path.join("etc/hostname").exists());
    assert!(w.path.join("app/run.sh").exists() && !w.path.join("etc/remove-me").exists());
    drop(w);
    c.remove("look").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_migrate_rolls_back_docker_open_transaction() {
    let dir = scratch_dir();
    // 128 KiB blocks (dm.blocksize): the pool device thinsnap makes must repeat them.
    let mut docker = DockerDm::new(dir.path(), 256, GIB);
    let l1 = docker.add_layer(None, "alpine", |r| {
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/alpine-release"), "3.19\n").unwrap();
    });
    // A layer Docker removed while it was busy (deferred deletion).
    let gone = hex_id("deferred");
    docker.create_register(&gone, Some(""));
    let g = docker.devices[&gone].clone();
    docker.save_device(&gone, g.id, g.size, 0, false, true);
    let origin = docker.layer_cache_id(&l1);
    let open = crash_mid_create(&mut docker, &origin);
    // And a thin id nobody recorded (another tool's, or a crash of an older Docker).
    docker.message("create_thin 40");
    docker.stop(false); // the crash leaves the pool active
    let state = docker.pool_state();
    assert_eq!(state.1, vec![1, 2, 3, 4, 40]);

    let pool = unique_pool_name();
    let config = write_config(dir.path(), &docker, &pool);
    let files = docker.files(false);
    let dry = ok(migrate(&config, &docker, true));
    println!("{dry}");
    for want in [
        format!(
            "delete thin id 4: roll back Docker's open transaction {open} (the pool is at {})",
            state.0
        ),
        format!("delete thin id 3: Docker's device {gone} is marked deleted"),
        "committed docker/leaked/thin-40 (thin id 40".to_string(),
        "next thin id 41".to_string(),
    ] {
        assert!(dry.contains(&want), "{want:?} missing from:\n{dry}");
    }
    assert_eq!(docker.files(false), files);
    assert_eq!(docker.pool_state(), state, "the dry run changed the pool");
    assert!(docker.active().contains(&docker.pool.to_string()));

    let done = ok(migrate(&config, &docker, false));
    println!("{done}");
    docker.migrated = true;
    assert!(done.contains("deleted thin id 4"), "{done}");
    assert!(done.contains("docker/leaked/thin-40"), "{done}");
    assert!(docker.active().is_empty(), "{:?}", docker.active());
    ok(thinsnap(&config, &["check"]));

    let d = Daemon::start_in(dir, pool);
    let mut c = d.client().await;
    let names = c.names().await.unwrap();
    assert_eq!(names, vec!["docker/leaked/thin-40".to_string(), l1.clone()]);
    let v = Mounted::new(d.dir.path(), "v", &c.view("v", &l1).await.unwrap());
    assert_eq!(
        fs::read_to_string(v.path.join("etc/alpine-release")).unwrap(),
        "3.19\n"
    );
    drop(v);
    // New thin ids come after every id Docker used.
    c.prepare("p", &l1).await.unwrap();
    let xml = d.dir.path().join("pool.xml");
    ok(d.cli(&["pool", "backup", xml.to_str().unwrap()]));
    let ids: Vec<u32> = fs::read_to_string(&xml)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("<device dev_id=\""))
        .map(|l| l.split('"').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 40, 41, 42], "the view and p got 41 and 42");
    ok(d.cli(&["snapshot", "rm", "docker/leaked/thin-40", "p", "v"]));
    let st: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["pool", "status", "--json"]))).unwrap();
    assert_eq!(st["thin_devices"], 2, "the base and the layer: {st}");
    assert_eq!(st["block_size_bytes"], 128 << 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_migrate_resumes_a_rollback_killed_at_every_point_before_the_record() {
    // tests/docker_migrate.rs kills migrations of a real install at every crash point; a
    // real install has no open transaction to roll back, so here the migration is killed
    // around the rollback's deletion, and the next run must find the device gone or delete
    // it, and finish.
    use std::os::unix::process::ExitStatusExt;
    for point in CRASH_POINTS.iter().filter(|p| !recorded_at(p)) {
        let dir = scratch_dir();
        let mut b = build_docker(dir.path());
        let origin = b.docker.layer_cache_id(&b.l1);
        crash_mid_create(&mut b.docker, &origin);
        b.docker.stop(false); // dockerd was killed: its pool is still active
        let pool = unique_pool_name();
        let config = write_config(dir.path(), &b.docker, &pool);
        let root = b.docker.root.to_str().unwrap().to_string();
        let args = ["migrate", "docker-devicemapper", "--root", &root];
        let out = thinsnap_env(&config, &args, &[("THINSNAP_FAILPOINT", point)]);
        assert_eq!(
            out.status.signal(),
            Some(9),
            "failpoint {point} must kill the migration: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let done = ok(migrate(&config, &b.docker, false));
        b.docker.migrated = true;
        assert!(!done.contains("resuming"), "{point}: {done}");
        let rolled_back = match *point {
            "migrate.after-deactivate" => "deleted thin id 6",
            _ => "already gone: thin id 6",
        };
        assert!(done.contains(rolled_back), "{point}: {done}");
        assert!(done.contains("migrated"), "{point}: {done}");
        let check = ok(thinsnap(&config, &["check"]));
        assert!(
            check.contains("store and pool agree: 4 snapshot(s)"),
            "{point}: {check}"
        );
        assert!(
            b.docker.active().is_empty(),
            "{point}: {:?}",
            b.docker.active()
        );
        let d = Daemon::start_in(dir, pool);
        check_migrated(&d, &b).await;
        let st: serde_json::Value =
            serde_json::from_str(&ok(d.cli(&["pool", "status", "--json"]))).unwrap();
        assert_eq!(
            st["thin_devices"], 5,
            "{point}: the rolled-back device is gone: {st}"
        );
        drop(d);
    }
}
