//! `thinsnap migrate docker-devicemapper` on real dm: Docker 24's devicemapper storage is
//! built in the guest as Docker builds it (tests/common/docker.rs), migrated, and served.
//! A dry run changes nothing; the real run adopts image layers by chain id, a container
//! on its `-init` layer, and the base device, with every `rootfs/` made the root; Docker's
//! open transaction is rolled back and its pending deletions done; leaked thin ids are
//! adopted, not deleted; a device still in use makes it refuse without a change; an LVM
//! pool given with dm.thinpooldev is adopted as an LVM pool; a run killed at any crash
//! point finishes when run again.

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::{
    daemon::{labels, Daemon, Mounted},
    docker::{hex_id, DockerDm},
    *,
};
use thinpool::units::GIB;
use tonic::Code;

fn thinsnap(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thinsnap"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// thinsnap's configuration for the migrated pool: a test state directory and socket in
/// `dir`, Docker's loopback files as the pool.
fn write_config(dir: &Path, docker: &DockerDm, pool: &thinpool::PoolName) -> PathBuf {
    let kib = docker.block_size * 512 / 1024;
    let lines = format!(
        "source = \"loopback\"\nblock_size = \"{kib}K\"\n[pool.loopback]\ndir = \"{}\"",
        docker.home.join("devicemapper").display()
    );
    let config = dir.join("config.toml");
    fs::write(&config, daemon_config(dir, pool, &lines)).unwrap();
    config
}

fn daemon_config(dir: &Path, pool: &thinpool::PoolName, lines: &str) -> String {
    common::daemon::test_config(dir, pool, "", Some(lines))
}

fn migrate(config: &Path, docker: &DockerDm, dry_run: bool) -> Output {
    migrate_with(config, docker, dry_run, &[])
}

fn migrate_with(config: &Path, docker: &DockerDm, dry_run: bool, extra: &[&str]) -> Output {
    let root = docker.root.to_str().unwrap();
    let mut args = vec!["migrate", "docker-devicemapper", "--root", root];
    if dry_run {
        args.push("--dry-run");
    }
    args.extend(extra);
    thinsnap(config, &args)
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
async fn loop_migrate_docker_layers_and_a_container() {
    let dir = scratch_dir();
    let mut b = build_docker(dir.path());
    let (l1, l2, cid) = (b.l1.clone(), b.l2.clone(), b.cid.clone());
    let docker = &mut b.docker;
    docker.stop(true); // systemctl stop docker: the pool and loop devices go away

    let pool = unique_pool_name();
    let config = write_config(dir.path(), docker, &pool);
    let files = docker.files(true);
    let pool_state = docker.pool_state();
    let dm_before = thinpool::dm::list().unwrap();

    // The dry run prints the plan and changes nothing.
    let dry = ok(migrate(&config, docker, true));
    println!("{dry}");
    let init_key = format!("docker/container/{cid}-init");
    let rw_key = format!("docker/container/{cid}");
    for want in [
        format!("committed {l1} (thin id 2"),
        format!("committed {l2} (thin id 3"),
        format!("parent {l1}"),
        format!("committed {init_key} (thin id 4"),
        format!("active    {rw_key} (thin id 5"),
        format!("parent {init_key}"),
        "base     thin id 1".to_string(),
        "uses this pool".to_string(),
        "dry run: nothing was changed".to_string(),
    ] {
        assert!(dry.contains(&want), "{want:?} missing from:\n{dry}");
    }
    assert_eq!(
        docker.files(true),
        files,
        "the dry run changed Docker's files"
    );
    assert_eq!(docker.pool_state(), pool_state);
    assert_eq!(thinpool::dm::list().unwrap(), dm_before);
    assert!(loops_under(dir.path()).is_empty());
    assert!(!dir.path().join("state/metadata.redb").exists());

    // The real run.
    let done = ok(migrate(&config, docker, false));
    println!("{done}");
    docker.migrated = true;
    assert!(done.contains("migrated"), "{done}");
    assert!(
        done.contains("2 image layer(s)") && done.contains("1 container(s)"),
        "{done}"
    );
    assert!(
        done.contains("4 filesystem(s) have their rootfs/ as their root"),
        "{done}"
    );
    let check = ok(thinsnap(&config, &["check"]));
    assert!(
        check.contains("store and pool agree: 4 snapshot(s)"),
        "{check}"
    );
    let again = ok(migrate(&config, docker, false));
    assert!(again.contains("was migrated already"), "{again}");
    assert!(docker.home.join("MIGRATED-TO-THINSNAP").exists());
    assert!(
        docker.active().is_empty(),
        "no device keeps Docker's name: {:?}",
        docker.active()
    );

    let mut d = Daemon::start_in(dir, pool);
    let mut c = d.client().await;
    let mut names = c.names().await.unwrap();
    names.sort();
    let mut want = vec![l1.clone(), l2.clone(), init_key.clone(), rw_key.clone()];
    want.sort();
    assert_eq!(names, want);
    let s = c.stat(&l2).await.unwrap();
    assert_eq!((s.kind, s.parent.as_str()), (3, l1.as_str()), "committed");
    assert_eq!(
        s.labels["containerd.io/snapshot/thinsnap.docker-device"],
        b.docker.layer_cache_id(&l2)
    );
    assert_eq!(c.stat(&l1).await.unwrap().parent, "");
    let s = c.stat(&init_key).await.unwrap();
    assert_eq!((s.kind, s.parent.as_str()), (3, l2.as_str()));
    let s = c.stat(&rw_key).await.unwrap();
    assert_eq!(
        (s.kind, s.parent.as_str()),
        (2, init_key.as_str()),
        "active"
    );
    assert!(c.usage(&l1).await.unwrap().size >= 1 << 20);

    // The image's files at the root of its layers, Docker's layout gone; the container's
    // snapshot active, with what the container wrote.
    check_migrated(&d, &b).await;
    let v = Mounted::new(
        d.dir.path(),
        "bottom",
        &c.view("bottom", &l1).await.unwrap(),
    );
    assert!(v.path.join("etc/remove-me").exists() && !v.path.join("app").exists());
    drop(v);
    let w = Mounted::new(d.dir.path(), "ctr", &c.mounts(&rw_key).await.unwrap());
    fs::write(w.path.join("data/more"), "written after the migration").unwrap();
    drop(w);

    // The image's top layer is a parent like any other: Prepare, write, commit, view.
    let m = c.prepare("next", &l2).await.unwrap();
    let w = Mounted::new(d.dir.path(), "next", &m);
    assert!(w.path.join("app/run.sh").exists());
    fs::write(w.path.join("new"), "new layer").unwrap();
    drop(w);
    c.commit("next-layer", "next").await.unwrap();
    let v = Mounted::new(
        d.dir.path(),
        "nv",
        &c.view("nv", "next-layer").await.unwrap(),
    );
    assert!(v.path.join("new").exists() && v.path.join("bin/hello").exists());
    drop(v);
    // containerd's unpacker finds the adopted layers by chain id and skips them.
    let err = c
        .prepare_with(
            "extract-1",
            "",
            labels(&[("containerd.io/snapshot.ref", l1.as_str())]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    // A snapshot without a parent uses Docker's base device: an empty filesystem.
    let m = c.prepare("fresh", "").await.unwrap();
    let w = Mounted::new(d.dir.path(), "fresh", &m);
    assert_eq!(tree(&w.path), vec!["lost+found/"]);
    drop(w);

    // Removing the container's snapshots frees their thin ids; nothing leaks.
    for k in ["bottom", "nv", "fresh", rw_key.as_str(), init_key.as_str()] {
        c.remove(k).await.unwrap();
    }
    let st: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["pool", "status", "--json"]))).unwrap();
    assert_eq!(
        st["thin_devices"], 4,
        "base, two layers, next-layer and nothing else: {st}"
    );
    assert!(d.stop().unwrap().success());
    let check = ok(d.cli(&["check"]));
    assert!(
        check.contains("store and pool agree: 3 snapshot(s)"),
        "{check}"
    );
    // Drop destroys the pool and checks that no device, loop device or mount is left.
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

#[test]
fn loop_migrate_refuses_while_docker_uses_a_device() {
    let dir = scratch_dir();
    let mut docker = DockerDm::new(dir.path(), 128, GIB);
    let l1 = docker.add_layer(None, "busybox", |r| {
        fs::write(r.join("hello"), "hi").unwrap();
    });
    let cache = docker.layer_cache_id(&l1);
    let rootfs = docker.get(&cache); // a container is using it
    let pool = unique_pool_name();
    let files = docker.files(false);
    let state = docker.pool_state();
    let active = docker.active();

    // A configuration that names another pool is refused first, and names the fix.
    let config = dir.path().join("config.toml");
    fs::write(&config, daemon_config(dir.path(), &pool, "")).unwrap();
    let err = fails(migrate(&config, &docker, false));
    assert!(
        err.contains("does not use this pool") && err.contains("source = \"loopback\""),
        "{err}"
    );
    // A configuration file that does not exist would be written, but not while Docker's
    // device is mounted.
    let absent = dir.path().join("new/config.toml");
    let err = fails(migrate(&absent, &docker, false));
    println!("{err}");
    assert!(
        err.contains("is in use")
            && err.contains("mounted at")
            && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(!absent.exists());
    let config = write_config(dir.path(), &docker, &pool);
    let err = fails(migrate(&config, &docker, false));
    assert!(err.contains(&cache), "names the device: {err}");

    assert_eq!(docker.files(false), files);
    assert_eq!(docker.pool_state(), state);
    assert_eq!(docker.active(), active);
    assert!(!dir.path().join("state/metadata.redb").exists());
    assert_eq!(fs::read_to_string(rootfs.join("hello")).unwrap(), "hi");
    // Drop: "Docker" unmounts and deactivates its devices.
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_migrate_docker_lvm_thinpooldev() {
    // Docker's pool is an LVM thin pool given with dm.thinpooldev; its PV file lives
    // outside the daemon's directory and outlives the daemon, which removes only the LV.
    let docker_dir = scratch_dir();
    let vg = format!("tsdocker{}", std::process::id());
    let mut docker = DockerDm::new_lvm(docker_dir.path(), &vg, GIB);
    let l1 = docker.add_layer(None, "ubuntu", |r| {
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/lsb-release"), "DISTRIB_ID=Ubuntu\n").unwrap();
    });
    let cid = hex_id("lvm container");
    docker.add_container(&cid, &l1, |r| {
        fs::write(r.join("state"), "lvm").unwrap();
    });
    docker.stop(true); // the pool stays: it is LVM's
    let pooldev = docker.pool.to_string();

    let dir = scratch_dir();
    let pool = unique_pool_name();
    let config = dir.path().join("config.toml");
    let lines = format!("source = \"lvm\"\n[pool.lvm]\nvg = \"{vg}\"\nlv = \"thinpool\"");
    fs::write(&config, daemon_config(dir.path(), &pool, &lines)).unwrap();

    let err = fails(migrate(&config, &docker, true));
    assert!(err.contains("--thinpooldev"), "{err}");
    let dry = ok(migrate_with(
        &config,
        &docker,
        true,
        &["--thinpooldev", &pooldev],
    ));
    println!("{dry}");
    for want in [
        format!("pool: LVM thin pool {vg}/thinpool"),
        "blocks of 512 KiB".to_string(),
        format!("committed {l1} (thin id 2"),
        format!("active    docker/container/{cid} (thin id 4"),
        "uses this pool".to_string(),
    ] {
        assert!(dry.contains(&want), "{want:?} missing from:\n{dry}");
    }
    let dev = format!("/dev/mapper/{pooldev}");
    let done = ok(migrate_with(
        &config,
        &docker,
        false,
        &["--thinpooldev", &dev],
    ));
    println!("{done}");
    docker.migrated = true;
    assert!(docker.active().is_empty(), "{:?}", docker.active());
    ok(thinsnap(&config, &["check"]));

    let d = Daemon::start_in(dir, pool);
    let mut c = d.client().await;
    let v = Mounted::new(d.dir.path(), "v", &c.view("v", &l1).await.unwrap());
    assert_eq!(
        fs::read_to_string(v.path.join("etc/lsb-release")).unwrap(),
        "DISTRIB_ID=Ubuntu\n"
    );
    drop(v);
    let rw = format!("docker/container/{cid}");
    let w = Mounted::new(d.dir.path(), "w", &c.mounts(&rw).await.unwrap());
    assert_eq!(fs::read_to_string(w.path.join("state")).unwrap(), "lvm");
    assert!(w.path.join(".dockerenv").exists());
    drop(w);
    let st: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["pool", "status", "--json"]))).unwrap();
    assert_eq!(st["source"], format!("LVM thin pool {vg}/thinpool"), "{st}");
    assert_eq!(
        st["thin_devices"], 5,
        "base, layer, init, container, view: {st}"
    );
}

const CRASH_POINTS: [&str; 5] = [
    "migrate.after-deactivate",
    "migrate.after-delete",
    "migrate.after-record",
    "migrate.after-stage",
    "migrate.after-flatten",
];

/// `thinsnap serve` on `config` must exit at once with an error; returns its stderr.
fn serve_refuses(config: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinsnap"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                !status.success(),
                "serve started on an unfinished migration"
            );
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return err;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("serve did not refuse to start on an unfinished migration");
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_migrate_resumes_after_a_crash_at_every_point() {
    use std::os::unix::process::ExitStatusExt;
    for point in CRASH_POINTS {
        let dir = scratch_dir();
        let mut b = build_docker(dir.path());
        let origin = b.docker.layer_cache_id(&b.l1);
        crash_mid_create(&mut b.docker, &origin);
        b.docker.stop(false); // dockerd was killed: its pool is still active
        let pool = unique_pool_name();
        let config = write_config(dir.path(), &b.docker, &pool);
        let root = b.docker.root.to_str().unwrap().to_string();
        let args = [
            "--config",
            config.to_str().unwrap(),
            "migrate",
            "docker-devicemapper",
            "--root",
            &root,
        ];
        let out = Command::new(env!("CARGO_BIN_EXE_thinsnap"))
            .args(args)
            .env("THINSNAP_FAILPOINT", point)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(9),
            "failpoint {point} must kill the migration: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let recorded = !matches!(point, "migrate.after-deactivate" | "migrate.after-delete");
        if recorded {
            let err = serve_refuses(&config);
            assert!(
                err.contains("not serving") && err.contains("unfinished"),
                "{point}: {err}"
            );
            let check = thinsnap(&config, &["check"]);
            assert!(
                String::from_utf8_lossy(&check.stdout)
                    .contains("migration from Docker's devicemapper driver is unfinished"),
                "{point}: {check:?}"
            );
        }
        let done = ok(migrate(&config, &b.docker, false));
        b.docker.migrated = true;
        assert_eq!(done.contains("resuming"), recorded, "{point}: {done}");
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

/// Every failpoint of the migration has a crash test above.
#[test]
fn migrate_crash_points_are_all_tested() {
    let src = include_str!("../src/migrate/mod.rs");
    let found: Vec<&str> = src
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|p| p.starts_with("migrate.after-"))
        .collect();
    assert_eq!(found.len(), CRASH_POINTS.len(), "{found:?}");
    for p in found {
        assert!(CRASH_POINTS.contains(&p), "failpoint {p} has no crash test");
    }
}
