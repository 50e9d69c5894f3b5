//! `thinsnap migrate docker-devicemapper` of real Docker 20.10 devicemapper installs (issue
//! 20), in the VM: Debian 12's dockerd 20.10 (tests/common/dockerd_dm.rs), once on its
//! loopback default and once on an LVM thin pool set up by hand as Docker's direct-lvm
//! documentation does it, given with `dm.thinpooldev`; xfs, Docker's default filesystem for
//! devicemapper, as Docker made it. Docker loads a three-layer image (a whiteout, an opaque
//! directory), runs a container that writes, deletes and exits, commits it, and runs a
//! second one that is stopped with data in it (and a file `docker cp` put there). What
//! Docker shows of every layer (`docker save`) and of both containers' filesystems (`docker
//! export`) is recorded, Docker is stopped, the migration's dry run must change nothing and
//! its real run adopt everything. thinsnap then serves the pool to a containerd: dockerd 26
//! pulls the committed image (from a registry of the test's own, with Docker's layers) and
//! finds every layer there under its chain id, runs it, and containerd's garbage collector
//! runs; then every layer, the committed image and both containers hold exactly what Docker
//! showed, nothing of Docker's is active, `thinsnap check` is clean, and removing it all
//! leaves the base device alone. The LVM install is migrated in one run; the loopback
//! install's migration is killed at every crash point in turn, each run going on from what
//! the one before left, and a last run finishes it.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use common::{
    containerd::Containerd,
    daemon::{Daemon, Mounted},
    dockerd::Dockerd,
    dockerd_dm::{dm_prefix, DockerdDm},
    image::{busybox_layers, chain_ids, digest, docker_archive_with, presence, LOOK},
    migrate::{
        fails, migrate, ok, recorded_at, root_files, serve_refuses, thinsnap, thinsnap_env,
        CRASH_POINTS,
    },
    registry::{Image, Registry},
    tree::{self, assert_same, Tree},
    *,
};
use serde_json::{json, Value};
use thinpool::loopback::{self, LoopFile};

const IMAGE: &str = "thinsnap.test/busybox:20.10";
const COMMITTED_REPO: &str = "thinsnap.test/committed";
const COMMITTED: &str = "thinsnap.test/committed:20.10";
const APPLETS: [&str; 12] = [
    "sh",
    "ls",
    "cat",
    "echo",
    "sleep",
    "test",
    "tr",
    "rm",
    "dd",
    "mkdir",
    "sha256sum",
    "true",
];
/// What the first container does: writes (a random MiB too), deletes a file of a lower
/// layer (a whiteout in the commit), replaces one, and adds to the opaque directory.
const C1: &str = "echo c1 > /data/written && dd if=/dev/urandom of=/data/blob bs=65536 count=16 2>/dev/null && rm /data/keep.txt && echo changed-by-c1 > /data/changed.txt && mkdir /opq/sub && echo deep > /opq/sub/f";
/// The second container writes, says so, and waits to be stopped.
const C2: &str = "echo c2 > /data/c2 && dd if=/dev/urandom of=/data/c2.bin bs=65536 count=8 2>/dev/null && echo ready && exec sleep 600";

fn docker_json(k: &DockerdDm, args: &[&str]) -> Value {
    serde_json::from_str(&k.ok(args)).unwrap()
}

/// Prints how long each step took (`--nocapture`), for the test's own timings.
struct Laps(std::time::Instant);

impl Laps {
    fn new() -> Laps {
        Laps(std::time::Instant::now())
    }
    fn lap(&mut self, what: &str) {
        println!("[{:6.1} s] {what}", self.0.elapsed().as_secs_f64());
        self.0 = std::time::Instant::now();
    }
}

/// Where Docker's pool is.
enum Setup {
    /// Docker's loopback default: `<root>/devicemapper/devicemapper/{data,metadata}`.
    Loopback,
    /// `dm.thinpooldev=/dev/mapper/<dm_name>`, an LVM thin pool `<vg>/thinpool`.
    Lvm { vg: String, dm_name: String },
}

impl Setup {
    /// The storage options after `dm.override_udev_sync_check=true`: none for the
    /// loopback default; for direct-lvm the ones Docker's documentation gives.
    fn storage_opts(&self) -> Vec<String> {
        match self {
            Setup::Loopback => Vec::new(),
            Setup::Lvm { dm_name, .. } => vec![
                format!("dm.thinpooldev=/dev/mapper/{dm_name}"),
                "dm.use_deferred_removal=true".into(),
                "dm.use_deferred_deletion=true".into(),
            ],
        }
    }

    /// `thinsnap migrate` arguments beyond `--root`.
    fn migrate_args(&self) -> Vec<String> {
        match self {
            Setup::Loopback => Vec::new(),
            Setup::Lvm { dm_name, .. } => {
                vec!["--thinpooldev".into(), format!("/dev/mapper/{dm_name}")]
            }
        }
    }

    /// thinsnap's pool configuration lines for Docker's pool under `root`.
    fn pool_lines(&self, root: &Path) -> String {
        match self {
            Setup::Loopback => format!(
                "source = \"loopback\"\nblock_size = \"64K\"\n[pool.loopback]\ndir = \"{}\"",
                root.join("devicemapper/devicemapper").display()
            ),
            Setup::Lvm { vg, .. } => {
                format!("source = \"lvm\"\n[pool.lvm]\nvg = \"{vg}\"\nlv = \"thinpool\"")
            }
        }
    }

    /// The configuration lines the migration prints for a configuration it would write.
    fn printed_lines(&self, root: &Path) -> Vec<String> {
        let mut l = vec!["filesystem = \"xfs\"".to_string()];
        match self {
            Setup::Loopback => {
                l.push("source = \"loopback\"".into());
                l.push("block_size = \"64K\"".into());
                l.push(format!(
                    "dir = \"{}\"",
                    root.join("devicemapper/devicemapper").display()
                ));
            }
            Setup::Lvm { vg, .. } => {
                l.push("source = \"lvm\"".into());
                l.push(format!("vg = \"{vg}\""));
                l.push("lv = \"thinpool\"".into());
            }
        }
        l
    }
}

/// Writes thinsnap's configuration for the migrated pool in `dir` (state, socket and
/// runtime directory there; Docker's filesystem) and returns its path.
fn write_config(dir: &Path, pool: &thinpool::PoolName, setup: &Setup, root: &Path) -> PathBuf {
    let config = dir.join("config.toml");
    let text = common::daemon::test_config(
        dir,
        pool,
        "filesystem = \"xfs\"",
        Some(&setup.pool_lines(root)),
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// An LVM thin pool made as Docker's documentation for direct-lvm makes it by hand (a PV,
/// the VG, `thinpool` and `thinpoolmeta` volumes converted into a thin pool with 512 KiB
/// chunks and no zeroing, the `docker-thinpool` metadata profile), on a loop device over a
/// file in `dir`. The VG outlives a migration (thinsnap's `pool destroy` removes the pool's
/// LV only): on drop it is removed with its PV.
struct DirectLvm {
    vg: String,
    pv: LoopFile,
}

impl DirectLvm {
    fn new(dir: &Path) -> DirectLvm {
        common::dockerd_dm::require();
        let vg = format!("tsdocker{}", std::process::id());
        let file = dir.join("pv.img");
        loopback::create_sparse(&file, 4 * thinpool::units::GIB).unwrap();
        let pv = loopback::attach(&file, false).unwrap();
        let dev = pv.dev_path.to_str().unwrap().to_string();
        let lvm = |args: &[&str]| thinpool::cmd::lvm(args).unwrap();
        lvm(&["pvcreate", "-f", &dev]);
        lvm(&["vgcreate", &vg, &dev]);
        let lvcreate = |name: &str, extents: &str| {
            lvm(&[
                "lvcreate",
                "--wipesignatures",
                "y",
                "-n",
                name,
                &vg,
                "--extents",
                extents,
            ])
        };
        lvcreate("thinpool", "95%VG");
        lvcreate("thinpoolmeta", "1%VG");
        lvm(&[
            "lvconvert",
            "-y",
            "--zero",
            "n",
            "-c",
            "512K",
            "--thinpool",
            &format!("{vg}/thinpool"),
            "--poolmetadata",
            &format!("{vg}/thinpoolmeta"),
        ]);
        std::fs::create_dir_all("/etc/lvm/profile").unwrap();
        std::fs::write(
            "/etc/lvm/profile/docker-thinpool.profile",
            "activation {\n  thin_pool_autoextend_threshold=80\n  thin_pool_autoextend_percent=20\n}\n",
        )
        .unwrap();
        lvm(&[
            "lvchange",
            "--metadataprofile",
            "docker-thinpool",
            &format!("{vg}/thinpool"),
        ]);
        lvm(&["lvchange", "-ay", &format!("{vg}/thinpool")]);
        DirectLvm { vg, pv }
    }

    /// The dm name of the pool's active thin-pool device (`/dev/mapper/<vg>-thinpool`, or
    /// its `-tpool` layer).
    fn dm_name(&self) -> String {
        let base = format!("{}-thinpool", self.vg);
        [format!("{base}-tpool"), base]
            .into_iter()
            .find(|n| {
                let name = thinpool::DmNameBuf::new(n.clone()).unwrap();
                thinpool::dm::info(&name).unwrap().is_some()
                    && thinpool::dm::table(&name).unwrap().1 == "thin-pool"
            })
            .expect("an active thin-pool device of the LV")
    }
}

impl Drop for DirectLvm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file("/etc/lvm/profile/docker-thinpool.profile");
        let _ = thinpool::cmd::lvm(&["vgremove", "-y", "-f", &self.vg]);
        let _ = thinpool::cmd::lvm(&["pvremove", "-y", self.pv.dev_path.to_str().unwrap()]);
        let _ = self.pv.detach();
    }
}

/// What Docker showed of its storage before it stopped.
struct Shown {
    /// Chain ids of the committed image's layers (the three loaded, the commit's).
    chain: Vec<String>,
    /// Each layer's filesystem: the saved layers up to it, applied in order.
    layers: Vec<Tree>,
    /// Docker's device id of the image's top layer and of the commit's layer.
    image_top_id: u32,
    committed_id: u32,
    /// The containers (first, second): id, Docker's device id, device hash, filesystem.
    containers: Vec<(String, u32, String, Tree)>,
    /// `docker save` of the committed image.
    save: PathBuf,
}

fn device_id(graph: &Value) -> u32 {
    graph["Data"]["DeviceId"].as_str().unwrap().parse().unwrap()
}

/// Runs Docker on `root` as issue 20 says, checks that the migration refuses while Docker
/// runs, records what Docker shows, and stops Docker.
fn run_docker(dir: &Path, root: &Path, setup: &Setup, pool: &thinpool::PoolName) -> Shown {
    let opts = setup.storage_opts();
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let mut t = Laps::new();
    let mut k = DockerdDm::start(root, &opts);
    t.lap("dockerd 20.10 started");
    let info = docker_json(&k, &["info", "--format", "{{json .}}"]);
    assert_eq!(info["Driver"], "devicemapper", "{info:#}");
    assert!(
        info["ServerVersion"]
            .as_str()
            .unwrap()
            .starts_with("20.10."),
        "{info:#}"
    );
    let status: BTreeMap<String, String> = info["DriverStatus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| {
            (
                kv[0].as_str().unwrap().into(),
                kv[1].as_str().unwrap().into(),
            )
        })
        .collect();
    println!("Docker's devicemapper status: {status:#?}");
    assert_eq!(status["Backing Filesystem"], "xfs", "Docker's default");
    assert_eq!(status["Base Device Size"], "10.74GB", "Docker's default");
    match setup {
        Setup::Loopback => {
            assert_eq!(status["Pool Name"], format!("{}-pool", k.prefix()));
            assert_eq!(
                status["Data loop file"],
                root.join("devicemapper/devicemapper/data")
                    .display()
                    .to_string()
            );
        }
        Setup::Lvm { dm_name, .. } => assert_eq!(&status["Pool Name"], dm_name),
    }

    // docker load of the busybox image (three layers, a whiteout and an opaque directory).
    let [l1, l2, l3] = busybox_layers(&APPLETS);
    let runtime = json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"});
    let (archive, _) = docker_archive_with(&[&l1, &l2, &l3], IMAGE, Some(&runtime));
    let image_tar = dir.join("busybox.tar");
    archive.write(&image_tar);
    let out = k.ok(&["load", "--input", image_tar.to_str().unwrap()]);
    assert!(out.contains(&format!("Loaded image: {IMAGE}")), "{out}");
    t.lap("docker load");

    // A container that writes and exits, committed; a second one left running for now.
    k.ok(&[
        "run",
        "--network",
        "none",
        "--name",
        "c1",
        IMAGE,
        "sh",
        "-c",
        C1,
    ]);
    k.ok(&["commit", "c1", COMMITTED]);
    t.lap("docker run, docker commit");
    k.ok(&[
        "run",
        "--detach",
        "--network",
        "none",
        "--name",
        "c2",
        IMAGE,
        "sh",
        "-c",
        C2,
    ]);
    let start = std::time::Instant::now();
    while k.ok(&["logs", "c2"]) != "ready\n" {
        assert!(start.elapsed().as_secs() < 120, "c2 did not get ready");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    t.lap("docker run --detach");

    // While dockerd runs with c2's device mounted the migration changes nothing.
    let extra = setup.migrate_args();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let absent = dir.join("absent/config.toml");
    let err = fails(migrate(&absent, root, false, &extra));
    println!("{err}");
    assert!(
        err.contains(&format!("dockerd is running (pid {})", k.pid().unwrap()))
            && err.contains("is in use")
            && err.contains(&format!(
                "mounted at {}",
                root.join("devicemapper/mnt").display()
            ))
            && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(!absent.exists(), "no configuration written");
    // A configuration of another pool is refused first, and the error names the keys.
    let other = dir.join("other.toml");
    std::fs::write(&other, common::daemon::test_config(dir, pool, "", None)).unwrap();
    let err = fails(migrate(&other, root, false, &extra));
    assert!(
        err.contains("does not use this pool") && err.contains("filesystem = \"xfs\""),
        "{err}"
    );
    assert!(!dir.join("state/metadata.redb").exists());
    let running = k.ok(&["inspect", "--format", "{{.State.Running}}", "c2"]);
    assert_eq!(running, "true\n", "c2 kept running");

    t.lap("the migration refuses");
    k.ok(&["stop", "--time", "1", "c2"]);
    let copied = dir.join("copied.txt");
    std::fs::write(&copied, "put there by docker cp\n").unwrap();
    k.ok(&["cp", copied.to_str().unwrap(), "c2:/data/copied.txt"]);

    // What Docker shows: the committed image's layers and both containers' filesystems.
    let save = dir.join("committed-save.tar");
    k.ok(&["save", "--output", save.to_str().unwrap(), COMMITTED]);
    let committed = docker_json(
        &k,
        &["image", "inspect", "--format", "{{json .}}", COMMITTED],
    );
    let image = docker_json(&k, &["image", "inspect", "--format", "{{json .}}", IMAGE]);
    let diff_ids: Vec<String> =
        serde_json::from_value(committed["RootFS"]["Layers"].clone()).unwrap();
    assert_eq!(diff_ids.len(), 4, "{committed:#}");
    assert_eq!(
        diff_ids[..3],
        [digest(&l1), digest(&l2), digest(&l3)],
        "the loaded layers come first"
    );
    let layers = saved_layers(&save);
    assert_eq!(
        layers.iter().map(|l| digest(l)).collect::<Vec<_>>(),
        diff_ids,
        "docker save gives the layers whose digests are their diff ids"
    );
    let mut fs = Tree::new();
    let mut trees = Vec::new();
    for l in &layers {
        tree::apply_tar(&mut fs, l, true);
        trees.push(fs.clone());
    }
    let mut containers = Vec::new();
    for c in ["c1", "c2"] {
        let i = docker_json(&k, &["container", "inspect", "--format", "{{json .}}", c]);
        let export = dir.join(format!("{c}-export.tar"));
        k.ok(&["export", "--output", export.to_str().unwrap(), c]);
        let name = i["GraphDriver"]["Data"]["DeviceName"].as_str().unwrap();
        let hash = name
            .strip_prefix(&format!("{}-", k.prefix()))
            .unwrap()
            .to_string();
        containers.push((
            i["Id"].as_str().unwrap().to_string(),
            device_id(&i["GraphDriver"]),
            hash,
            tree::of_tar(&std::fs::read(&export).unwrap()),
        ));
    }
    // What the containers did is in what Docker shows.
    let c1 = &containers[0].3;
    assert!(c1.contains_key("data/written") && !c1.contains_key("data/keep.txt"));
    assert!(c1.contains_key(".dockerenv") && c1.contains_key("etc/hostname"));
    let c2 = &containers[1].3;
    assert!(c2.contains_key("data/c2.bin") && c2.contains_key("data/copied.txt"));
    assert!(!trees[3].contains_key("data/keep.txt") && trees[3].contains_key("opq/sub/f"));
    assert!(
        !trees[3].contains_key(".dockerenv"),
        "the commit has no init files"
    );

    t.lap("docker stop, cp, save, export");
    k.stop();
    t.lap("dockerd stopped");
    Shown {
        chain: chain_ids(&diff_ids),
        layers: trees,
        image_top_id: device_id(&image["GraphDriver"]),
        committed_id: device_id(&committed["GraphDriver"]),
        containers,
        save,
    }
}

/// The layer tars of a `docker save` archive (Docker before 25), in order.
fn saved_layers(save: &Path) -> Vec<Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut a = tar::Archive::new(std::fs::File::open(save).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        files.insert(path, data);
    }
    let manifest: Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    manifest[0]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| files[l.as_str().unwrap()].clone())
        .collect()
}

/// The snapshot keys the migration makes of `shown`.
fn keys(shown: &Shown) -> Vec<String> {
    let mut k = shown.chain.clone();
    for (id, ..) in &shown.containers {
        k.push(format!("docker/container/{id}-init"));
        k.push(format!("docker/container/{id}"));
    }
    k.sort();
    k
}

/// The pool's transaction id and thin ids, without changing it: from the metadata file of
/// an inactive loopback pool, or a metadata snapshot of an active one (as an admin would
/// look with thin_dump).
fn pool_state(setup: &Setup, root: &Path) -> (u64, Vec<u32>) {
    match setup {
        Setup::Loopback => {
            let sb = thinpool::metadata::read_superblock(
                &root.join("devicemapper/devicemapper/metadata"),
                0,
            )
            .unwrap();
            (sb.transaction_id, sb.thin_ids.into_iter().collect())
        }
        Setup::Lvm { dm_name, .. } => {
            let pool = thinpool::DmNameBuf::new(dm_name.clone()).unwrap();
            let (_, status) = thinpool::dm::status(&pool, true).unwrap();
            let txn = status.split_whitespace().next().unwrap().parse().unwrap();
            let (_, _, params) = thinpool::dm::table(&pool).unwrap();
            let meta =
                thinpool::dm::parse_device(params.split_whitespace().next().unwrap()).unwrap();
            let meta = thinpool::dm::devnode(meta).unwrap();
            thinpool::dm::message(&pool, "message", "reserve_metadata_snap").unwrap();
            let out = Command::new("thin_dump")
                .args(["-m", meta.to_str().unwrap()])
                .output()
                .unwrap();
            thinpool::dm::message(&pool, "message", "release_metadata_snap").unwrap();
            assert!(out.status.success(), "{out:?}");
            let ids = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .filter_map(|l| l.trim().strip_prefix("<device dev_id=\""))
                .map(|l| l.split('"').next().unwrap().parse().unwrap())
                .collect();
            (txn, ids)
        }
    }
}

/// Nothing of Docker's is active after the migration: no dm device with its prefix, no
/// /dev/mapper node of Docker's (libdevmapper made them while Docker ran), no mount.
fn assert_nothing_of_dockers(root: &Path) {
    let prefix = format!("{}-", dm_prefix(root));
    let active: Vec<String> = thinpool::dm::list()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n.to_string())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert_eq!(active, Vec::<String>::new(), "Docker's devices are active");
    let nodes: Vec<String> = std::fs::read_dir("/dev/mapper")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert_eq!(nodes, Vec::<String>::new(), "Docker's /dev/mapper nodes");
    assert_eq!(mounts_under(root), Vec::<PathBuf>::new());
}

/// The migrated snapshots through thinsnap's Snapshots API: names, kinds and parents,
/// labels, and every layer's and both containers' filesystems.
async fn check_snapshots(d: &Daemon, shown: &Shown) {
    let mut c = d.client().await;
    let names: Vec<String> = c
        .names()
        .await
        .unwrap()
        .into_iter()
        .filter(|n| !n.starts_with("moby/"))
        .collect();
    assert_eq!(names, keys(shown));
    for (i, chain) in shown.chain.iter().enumerate() {
        let s = c.stat(chain).await.unwrap();
        let parent = if i == 0 {
            ""
        } else {
            shown.chain[i - 1].as_str()
        };
        assert_eq!(
            (s.kind, s.parent.as_str()),
            (3, parent),
            "{chain} committed"
        );
        assert_eq!(
            s.labels.get("containerd.io/snapshot.ref"),
            Some(chain),
            "{chain}: how containerd finds it"
        );
        let m = c.view("look", chain).await.unwrap();
        assert_eq!(m[0].r#type, "xfs", "{m:?}");
        let v = Mounted::new(d.dir.path(), "look", &m);
        assert_same(
            &format!("layer {chain}"),
            &tree::of_dir(&v.path),
            &shown.layers[i],
        );
        drop(v);
        c.remove("look").await.unwrap();
    }
    for (id, _, hash, fs) in &shown.containers {
        let init = format!("docker/container/{id}-init");
        let s = c.stat(&init).await.unwrap();
        assert_eq!((s.kind, s.parent.as_str()), (3, shown.chain[2].as_str()));
        let rw = format!("docker/container/{id}");
        let s = c.stat(&rw).await.unwrap();
        assert_eq!((s.kind, s.parent.as_str()), (2, init.as_str()), "active");
        assert_eq!(
            s.labels["containerd.io/snapshot/thinsnap.docker-device"],
            *hash
        );
        let w = Mounted::new(d.dir.path(), "ctr", &c.mounts(&rw).await.unwrap());
        assert_same(&format!("container {id}"), &tree::of_dir(&w.path), fs);
    }
    // A snapshot without a parent is made from Docker's base device, which is thinsnap's
    // now: an empty xfs, as every first layer Docker made started.
    let m = c.prepare("fresh", "").await.unwrap();
    assert_eq!(m[0].r#type, "xfs", "{m:?}");
    let w = Mounted::new(d.dir.path(), "fresh", &m);
    assert_same(
        "a snapshot of the base device",
        &tree::of_dir(&w.path),
        &Tree::new(),
    );
    drop(w);
    c.remove("fresh").await.unwrap();
}

/// thinsnap's snapshots as `thinsnap snapshot list --json` shows them: name → kind.
fn snapshot_kinds(d: &Daemon) -> BTreeMap<String, String> {
    d.cli_json(&["snapshot", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed().as_secs() < 120, "{what}: not within 120 s");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Migrates Docker's storage under `root` (stopped) into thinsnap's pool `pool` with the
/// configuration in `dir`: dry runs (with a configuration it would write, then with
/// `dir`'s) that change nothing, then the real run. Returns the configuration's path.
fn dry_run_and_migrate(
    dir: &Path,
    root: &Path,
    setup: &Setup,
    pool: &thinpool::PoolName,
    shown: &Shown,
) -> PathBuf {
    let extra = setup.migrate_args();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let files = root_files(root, true);
    let state = pool_state(setup, root);
    let dm_before = thinpool::dm::list().unwrap();

    // A configuration it would write names Docker's filesystem and pool; the plan then
    // makes Docker's base device thinsnap's base device.
    let absent = dir.join("absent/config.toml");
    let dry = ok(migrate(&absent, root, true, &extra));
    println!("{dry}");
    assert!(dry.contains("would be written with"), "{dry}");
    for line in setup.printed_lines(root) {
        assert!(dry.contains(&line), "{line:?} missing from:\n{dry}");
    }
    assert!(
        dry.contains("base     thin id 1 ") && dry.contains("thinsnap's xfs base device"),
        "{dry}"
    );
    assert!(!absent.exists());

    let config = write_config(dir, pool, setup, root);
    let dry = ok(migrate(&config, root, true, &extra));
    println!("{dry}");
    let (c1, c1_id, ..) = &shown.containers[0];
    let (c2, c2_id, ..) = &shown.containers[1];
    for want in [
        "filesystem xfs; 9 device(s), 4 image layer(s), 2 container(s) in Docker's metadata"
            .to_string(),
        "base     thin id 1      10 GiB (xfs): thinsnap's xfs base device".to_string(),
        format!(
            "committed {} (thin id {}, 10 GiB, rootfs/ flattened) parent {}",
            shown.chain[2], shown.image_top_id, shown.chain[1]
        ),
        format!(
            "committed {} (thin id {}, 10 GiB, rootfs/ flattened) parent {}",
            shown.chain[3], shown.committed_id, shown.chain[2]
        ),
        format!(
            "active    docker/container/{c1} (thin id {c1_id}, 10 GiB, rootfs/ flattened) parent docker/container/{c1}-init"
        ),
        format!(
            "active    docker/container/{c2} (thin id {c2_id}, 10 GiB, rootfs/ flattened) parent docker/container/{c2}-init"
        ),
        format!("committed docker/container/{c2}-init (thin id"),
        "uses this pool".to_string(),
        "dry run: nothing was changed".to_string(),
    ] {
        assert!(dry.contains(&want), "{want:?} missing from:\n{dry}");
    }
    assert!(!dry.contains("problem"), "{dry}");
    assert!(!dry.contains("delete thin id"), "nothing to delete: {dry}");
    assert_eq!(
        root_files(root, true),
        files,
        "the dry run changed Docker's files"
    );
    assert_eq!(
        pool_state(setup, root),
        state,
        "the dry run changed the pool"
    );
    assert_eq!(thinpool::dm::list().unwrap(), dm_before);
    assert!(!dir.join("state/metadata.redb").exists());
    config
}

/// The real run on the configuration `config`, and what must hold right after it.
fn migrate_for_real(config: &Path, root: &Path, setup: &Setup) {
    let extra = setup.migrate_args();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let done = ok(migrate(config, root, false, &extra));
    println!("{done}");
    assert!(!done.contains("resuming"), "{done}");
    migrated(config, root, &extra, &done);
}

/// What must hold once a run finished the migration (its output `done`).
fn migrated(config: &Path, root: &Path, extra: &[&str], done: &str) {
    for want in [
        "4 image layer(s) as committed snapshots named by chain id, 2 container(s)",
        "Docker's base device (thin id 1) as thinsnap's xfs base device",
        "8 filesystem(s) have their rootfs/ as their root now",
    ] {
        assert!(done.contains(want), "{want:?} missing from:\n{done}");
    }
    assert_nothing_of_dockers(root);
    let check = ok(thinsnap(config, &["check"]));
    assert!(
        check.contains("store and pool agree: 8 snapshot(s)"),
        "{check}"
    );
    let again = ok(migrate(config, root, false, extra));
    assert!(again.contains("was migrated already"), "{again}");
    assert!(root.join("devicemapper/MIGRATED-TO-THINSNAP").exists());
}

/// The migration of the stopped loopback install under `root`, killed at every crash point
/// in turn: each run goes on from what the run before left and is killed at the next point
/// (a run after the record resumes the recorded job; the last two are killed inside one
/// filesystem's flattening, staged, then moved up), then a last run finishes it.
fn migrate_killed_at_every_point(config: &Path, root: &Path) {
    use std::os::unix::process::ExitStatusExt;
    let mut t = Laps::new();
    let args = [
        "migrate",
        "docker-devicemapper",
        "--root",
        root.to_str().unwrap(),
    ];
    let mut recorded = false;
    for point in CRASH_POINTS {
        let out = thinsnap_env(config, &args, &[("THINSNAP_FAILPOINT", point)]);
        assert_eq!(
            out.status.signal(),
            Some(9),
            "failpoint {point} must kill the migration: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.contains("resuming"), recorded, "{point}: {stdout}");
        recorded = recorded_at(point);
        if recorded {
            let err = serve_refuses(config);
            assert!(
                err.contains("not serving") && err.contains("unfinished"),
                "{point}: {err}"
            );
            let check = thinsnap(config, &["check"]);
            assert!(
                String::from_utf8_lossy(&check.stdout)
                    .contains("migration from Docker's devicemapper driver is unfinished"),
                "{point}: {check:?}"
            );
        }
        t.lap(&format!("killed at {point}"));
    }
    let done = ok(migrate(config, root, false, &[]));
    println!("{done}");
    assert!(done.contains("resuming"), "{done}");
    migrated(config, root, &[], &done);
    t.lap("run to the end");
}

/// thinsnap serving the migrated pool to a containerd, with dockerd 26 on it: the
/// committed image pulled from a registry of Docker's layers is found there (no layer is
/// unpacked); with `run`, a container of it runs and containerd's garbage collector runs
/// while the migrated snapshots are there; every migrated snapshot holds what Docker
/// showed; removing it all leaves the base device alone.
async fn serve_and_check(d: &Daemon, shown: &Shown, run: bool) {
    let before = snapshot_kinds(d);
    let devices = d.thin_devices();
    assert_eq!(devices, 1 + 8, "the base device and the adopted snapshots");
    let mut t = Laps::new();
    let c = Containerd::start(d);
    let k = Dockerd::start(&c);
    t.lap("containerd and dockerd 26 started");
    let registry = Registry::serve(vec![Image::from_docker_save(
        &shown.save,
        COMMITTED_REPO,
        "20.10",
    )]);
    let reference = registry.reference(COMMITTED_REPO, "20.10");
    k.ok(&["pull", &reference]);
    t.lap("docker pull");
    assert_eq!(
        snapshot_kinds(d),
        before,
        "containerd found every layer by its chain id: nothing was unpacked"
    );
    assert_eq!(d.thin_devices(), devices);

    if run {
        // A container of it on thinsnap, removed with --rm: containerd's collector then walks
        // thinsnap's snapshots and removes what it does not know of.
        let blob = shown.layers[3]["data/blob"].rsplit(' ').next().unwrap();
        let out = k.run(&[
            "--rm",
            &reference,
            "sh",
            "-c",
            &format!("{LOOK}; sha256sum /data/blob"),
        ]);
        assert_eq!(
            presence(&out),
            [
                "absent data/keep.txt",
                "absent data/gone.txt",
                "present data/changed.txt",
                "absent opq/old.txt",
                "absent opq/olddir",
                "present opq/new.txt",
                "present data/written",
            ],
            "{out}"
        );
        assert!(out.contains("changed: changed-by-c1\n"), "{out}");
        assert!(out.contains(&format!("{blob}  /data/blob")), "{out}");
        t.lap("docker run --rm");
        eventually("the container's snapshots removed by containerd", || {
            !snapshot_kinds(d).keys().any(|n| n.starts_with("moby/"))
        });
        assert_eq!(
            snapshot_kinds(d),
            before,
            "containerd's garbage collector left the migrated snapshots alone"
        );

        t.lap("containerd's garbage collector");
    }
    check_snapshots(d, shown).await;
    t.lap("every layer's and container's files");

    // Removing everything: the image through dockerd (containerd owns the layers it
    // found), Docker's containers with the CLI; only the base device is left.
    let mut rm = vec!["snapshot", "rm"];
    let ctrs: Vec<String> = shown
        .containers
        .iter()
        .flat_map(|(id, ..)| {
            [
                format!("docker/container/{id}"),
                format!("docker/container/{id}-init"),
            ]
        })
        .collect();
    rm.extend(ctrs.iter().map(String::as_str));
    ok(d.cli(&rm));
    k.ok(&["rmi", &reference]);
    eventually("containerd removes the image's layers", || {
        snapshot_kinds(d).is_empty()
    });
    // Remove reclaims devices in the background: they go soon after the snapshots.
    eventually("only the base device is left", || d.thin_devices() == 1);
    drop(k);
    drop(c);
    t.lap("everything removed");
}

/// Stops thinsnap serve; `thinsnap check` must then find the store and the pool agreeing,
/// with nothing left but the base device. Dropping the daemon destroys the pool and
/// checks that no device, loop device or mount is left.
fn stop_and_check(mut d: Daemon) {
    let mut t = Laps::new();
    assert!(d.stop().unwrap().success(), "thinsnap serve's exit");
    t.lap("thinsnap serve stopped");
    let check = ok(d.cli(&["check"]));
    assert!(
        check.contains("store and pool agree: 0 snapshot(s)"),
        "{check}"
    );
    t.lap("thinsnap check");
    drop(d);
    t.lap("pool destroyed");
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_migrate_real_docker_20_10_loopback() {
    let dir = scratch_dir();
    let root = dir.path().join("docker");
    let pool = unique_pool_name();
    let shown = run_docker(dir.path(), &root, &Setup::Loopback, &pool);
    let mut t = Laps::new();
    let config = dry_run_and_migrate(dir.path(), &root, &Setup::Loopback, &pool, &shown);
    t.lap("dry runs");
    // Killed at every crash point on its way (an uninterrupted run is the LVM install's).
    migrate_killed_at_every_point(&config, &root);
    // Docker's loop files are thinsnap's pool now.
    assert_eq!(loops_under(&root).len(), 2, "the pool's data and metadata");
    let d = Daemon::start_in(dir, pool);
    serve_and_check(&d, &shown, true).await;
    stop_and_check(d);
    t.lap("served, checked, and the pool destroyed");
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_migrate_real_docker_20_10_lvm_thinpooldev() {
    let lvm_dir = scratch_dir();
    let lvm = DirectLvm::new(lvm_dir.path());
    let setup = Setup::Lvm {
        vg: lvm.vg.clone(),
        dm_name: lvm.dm_name(),
    };
    let dir = scratch_dir();
    let root = dir.path().join("docker");
    let pool = unique_pool_name();
    let shown = run_docker(dir.path(), &root, &setup, &pool);
    let Setup::Lvm { dm_name, .. } = &setup else {
        unreachable!()
    };
    assert!(
        thinpool::dm::info(&thinpool::DmNameBuf::new(dm_name.clone()).unwrap())
            .unwrap()
            .is_some(),
        "dockerd leaves a dm.thinpooldev pool active: it is not its own"
    );
    let mut t = Laps::new();
    let config = dry_run_and_migrate(dir.path(), &root, &setup, &pool, &shown);
    t.lap("dry runs");
    migrate_for_real(&config, &root, &setup);
    t.lap("migrated");
    let d = Daemon::start_in(dir, pool);
    let st = d.cli_json(&["pool", "status", "--json"]);
    assert_eq!(
        st["source"],
        format!("LVM thin pool {}/thinpool", lvm.vg),
        "{st}"
    );
    assert_eq!(st["block_size_bytes"], 512 << 10, "{st}");
    // What containerd's collector does with the snapshots does not depend on where the
    // pool is: the loopback test runs it (a container and a collection), saving CI time.
    serve_and_check(&d, &shown, false).await;
    stop_and_check(d);
    t.lap("served, checked, and the pool destroyed");
    drop(lvm);
}
