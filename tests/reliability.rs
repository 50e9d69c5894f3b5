//! Reliability on real dm: full pools (data and metadata) refused before they hit 100% and
//! recovered by growing; a pool the kernel put out of space; I/O errors from a faulty data
//! device (dm-flakey); 64 concurrent clients; a table of malformed requests, each with its
//! exact gRPC code and no effect.

mod common;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::daemon::{Daemon, Labels, Mounted};
use thinpool::{dm, units::MIB};
use tonic::Code;

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn data_used_fraction(d: &Daemon) -> f64 {
    let v: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["pool", "status", "--json"]))).unwrap();
    v["data_used_bytes"].as_f64().unwrap() / v["data_total_bytes"].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_near_full_data_refuses_prepare_until_grown() {
    // A 1 GiB pool keeps the filling short under emulation.
    let d = Daemon::start_custom(
        "min_free_space = \"25%\"\ndefault_size = \"2G\"",
        Some("[pool.loopback]\ndata_size = \"1G\"\nmetadata_size = \"64M\""),
    );
    let mut c = d.client().await;
    let m = c.prepare("filler", "").await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "filler", &m);
    // Fill past 75% of the 4 GiB pool through a file.
    let mut i = 0;
    while data_used_fraction(&d) < 0.78 {
        common::write_pattern(&mnt.path.join(format!("f{i}")), 64 << 20, i);
        i += 1;
    }
    let err = c.prepare("refused", "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message().contains("data space") && err.message().contains("thinsnap pool grow"),
        "{err}"
    );
    assert_eq!(
        c.stat("refused").await.unwrap_err().code(),
        Code::NotFound,
        "nothing was made"
    );
    // The running container keeps writing.
    common::write_pattern(&mnt.path.join("still-writing"), 16 << 20, 99);

    ok(d.cli(&["pool", "grow", "+1G"]));
    c.prepare("after-grow", "").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_near_full_metadata_refuses_prepare_until_grown() {
    // A pool with only 2 MiB of metadata: its metadata fills (proportionally) long before
    // its data. With the free-space threshold between the two, metadata is the limit.
    let mut d = Daemon::start_custom(
        "min_free_space = \"0%\"",
        Some("[pool.loopback]\ndata_size = \"4G\"\nmetadata_size = \"2M\""),
    );
    let mut c = d.client().await;
    c.prepare("a", "").await.unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["pool", "status", "--json"]))).unwrap();
    assert_eq!(v["metadata_total_bytes"], 2 * MIB);
    let frac = |k: &str| {
        v[format!("{k}_used_bytes")].as_f64().unwrap()
            / v[format!("{k}_total_bytes")].as_f64().unwrap()
    };
    let (data, meta) = (frac("data"), frac("metadata"));
    assert!(meta > data + 0.02, "metadata {meta:.3} vs data {data:.3}");
    let threshold = 100.0 * (1.0 - (data + meta) / 2.0);
    assert!(d.stop().unwrap().success());
    let cfg = std::fs::read_to_string(&d.config).unwrap().replace(
        "min_free_space = \"0%\"",
        &format!("min_free_space = \"{threshold:.2}%\""),
    );
    std::fs::write(&d.config, cfg).unwrap();
    d.spawn();
    let mut c = d.client().await;
    let err = c.prepare("refused", "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("metadata space"), "{err}");
    assert_eq!(
        c.stat("refused").await.unwrap_err().code(),
        Code::NotFound,
        "nothing was made"
    );
    // The kernel counts a reserve of a tenth of the metadata (at most 16 MiB) as used, so
    // grow well past it.
    ok(d.cli(&["pool", "grow", "+0", "--metadata", "1G"]));
    c.prepare("after-grow", "").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_out_of_space_pool_is_reported_and_recovers_by_growing() {
    // No threshold: the pool is allowed to fill completely.
    let d = Daemon::start_custom(
        "min_free_space = \"0%\"\ndefault_size = \"2G\"",
        Some("[pool.loopback]\ndata_size = \"1G\"\nmetadata_size = \"64M\""),
    );
    let mut c = d.client().await;
    let m = c.prepare("filler", "").await.unwrap();
    let dev = std::path::PathBuf::from(&m[0].source);
    let err =
        common::write_direct(&dev, 512 << 20, 1536 << 20).expect_err("1 GiB pool, 1.5 GiB written");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let st: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["pool", "status", "--json"]))).unwrap();
    assert_eq!(st["mode"], "out-of-space");
    let err = c.prepare("refused", "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("out of data space"), "{err}");

    ok(d.cli(&["pool", "grow", "+2G"]));
    let st: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["pool", "status", "--json"]))).unwrap();
    assert_eq!(st["mode"], "rw");
    common::write_direct(&dev, 512 << 20, 512 << 20).expect("writes work after growing");
    c.prepare("after-grow", "").await.unwrap();
}

/// A thin pool on a dm-flakey data device, for the daemon to adopt as an existing pool.
struct FlakeyPool {
    dir: tempfile::TempDir,
    data: thinpool::loopback::LoopFile,
    meta: thinpool::loopback::LoopFile,
    flakey: devicemapper::DmNameBuf,
    pool: devicemapper::DmNameBuf,
    sectors: u64,
}

impl FlakeyPool {
    fn new(tag: &str) -> FlakeyPool {
        common::require_dm();
        let dir = common::scratch_dir();
        let (d, m) = (dir.path().join("data"), dir.path().join("meta"));
        thinpool::loopback::create_sparse(&d, 4 << 30).unwrap();
        thinpool::loopback::create_sparse(&m, 64 << 20).unwrap();
        let data = thinpool::loopback::attach(&d, false).unwrap();
        let meta = thinpool::loopback::attach(&m, false).unwrap();
        let sectors = (4u64 << 30) / 512;
        let flakey =
            devicemapper::DmNameBuf::new(format!("tsflakey-{tag}-{}", std::process::id())).unwrap();
        let pool =
            devicemapper::DmNameBuf::new(format!("tsfpool-{tag}-{}", std::process::id())).unwrap();
        let fp = FlakeyPool {
            dir,
            data,
            meta,
            flakey,
            pool,
            sectors,
        };
        dm::create(&fp.flakey, None, &[fp.flakey_line(false)]).unwrap();
        let fdev = dm::info(&fp.flakey).unwrap().unwrap().device();
        let line = (
            0,
            sectors,
            "thin-pool".to_string(),
            format!(
                "{}:{} {}:{} 128 0 1 error_if_no_space",
                fp.meta.device.major, fp.meta.device.minor, fdev.major, fdev.minor
            ),
        );
        dm::create(&fp.pool, None, &[line]).unwrap();
        fp
    }

    /// The flakey table: always up, or always down with every write failing.
    fn flakey_line(&self, faulty: bool) -> dm::TableLine {
        let dev = format!("{}:{}", self.data.device.major, self.data.device.minor);
        let params = if faulty {
            format!("{dev} 0 0 3600 1 error_writes")
        } else {
            format!("{dev} 0 3600 0")
        };
        (0, self.sectors, "flakey".into(), params)
    }

    fn set_faulty(&self, faulty: bool) {
        dm::reload(&self.flakey, &[self.flakey_line(faulty)]).unwrap();
    }
}

impl Drop for FlakeyPool {
    fn drop(&mut self) {
        let _ = dm::remove(&self.pool, dm::RemoveMode::Now);
        let _ = dm::remove(&self.flakey, dm::RemoveMode::Now);
        let _ = self.data.detach();
        let _ = self.meta.detach();
        let _ = &self.dir;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_data_device_errors_are_clear_and_the_service_recovers() {
    let fp = FlakeyPool::new("io");
    let pool = format!(
        "source = \"existing\"\n[pool.existing]\ndm_name = \"{}\"",
        &*fp.pool
    );
    let mut d = Daemon::start_custom("", Some(&pool));
    let mut c = d.client().await;

    // A healthy layer first.
    let m = c.prepare("ok-active", "").await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "ok", &m);
    let sum = common::write_pattern(&mnt.path.join("data"), 4 << 20, 1);
    drop(mnt);
    c.commit("ok", "ok-active").await.unwrap();

    // The data device starts failing writes. The kernel cannot flush it before committing
    // metadata, so it switches the pool to read-only and flags it needs_check.
    let m = c.prepare("during-fault", "ok").await.unwrap();
    fp.set_faulty(true);
    let err = common::write_direct(std::path::Path::new(&m[0].source), 0, 4 * MIB)
        .expect_err("writes must fail");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EIO) | Some(libc::ENOSPC)),
        "{err}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st: serde_json::Value =
            serde_json::from_str(&ok(d.cli(&["pool", "status", "--json"]))).unwrap();
        if st["mode"] == "read-only" {
            assert_eq!(st["needs_check"], true);
            break;
        }
        assert!(Instant::now() < deadline, "pool never went read-only: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // New snapshots are refused with a clear error; nothing changes.
    let err = c.prepare("refused", "ok").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(
        err.message().contains("read-only") && err.message().contains("pool check"),
        "{err}"
    );
    assert_eq!(c.names().await.unwrap(), vec!["during-fault", "ok"]);

    // The fault clears; the documented recovery: stop thinsnap, `thinsnap pool repair`.
    fp.set_faulty(false);
    assert!(d.stop().unwrap().success());
    let report = ok(d.cli(&["pool", "repair"]));
    assert!(
        report.contains("needs_check cleared") && report.contains("-> rw"),
        "{report}"
    );
    d.spawn();
    let mut c = d.client().await;
    // Everything works again, and the committed data is intact.
    let m = c.mounts("during-fault").await.unwrap();
    common::write_direct(std::path::Path::new(&m[0].source), 0, 4 * MIB)
        .expect("writes work again");
    c.prepare("after-repair", "ok").await.unwrap();
    let m = c.view("check", "ok").await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "check", &m);
    assert_eq!(common::sha256_file(&mnt.path.join("data")), sum);
    drop(mnt);
    for k in ["check", "after-repair", "during-fault", "ok"] {
        c.remove(k).await.unwrap();
    }
    assert!(d.stop().unwrap().success());
    let check = ok(d.cli(&["check"]));
    assert!(check.contains("store and pool agree"), "{check}");
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_64_concurrent_clients() {
    let secs: u64 = std::env::var("THINSNAP_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut d = Daemon::start();
    let mut c = d.client().await;
    c.prepare("root-a", "").await.unwrap();
    c.commit("root", "root-a").await.unwrap();
    let ops = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for client in 0..64u64 {
        let mut c = d.client().await;
        let ops = ops.clone();
        tasks.push(tokio::spawn(async move {
            let mut x = client.wrapping_mul(0x9E3779B97F4A7C15) | 1;
            let mut rnd = move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let mut unexpected = Vec::new();
            while Instant::now() < deadline {
                // Keys shared between clients, so they race for the same snapshots.
                let k = format!("k{}", rnd(24));
                let n = format!("n{}", rnd(24));
                let parent = if rnd(3) == 0 {
                    "root".to_string()
                } else {
                    format!("n{}", rnd(24))
                };
                let res: Result<(), tonic::Status> = match rnd(6) {
                    0 => c.prepare(&k, &parent).await.map(|_| ()),
                    1 => c.commit(&n, &k).await,
                    2 => c.view(&format!("v{}", rnd(24)), &parent).await.map(|_| ()),
                    3 => c.remove(&if rnd(2) == 0 { k } else { n }).await,
                    4 => c.list(&["kind==committed"]).await.map(|_| ()),
                    _ => c.remove(&format!("v{}", rnd(24))).await,
                };
                ops.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = res {
                    if !matches!(
                        e.code(),
                        Code::NotFound
                            | Code::AlreadyExists
                            | Code::FailedPrecondition
                            | Code::InvalidArgument
                    ) {
                        unexpected.push(format!("{:?}: {}", e.code(), e.message()));
                    }
                }
            }
            unexpected
        }));
    }
    let mut unexpected = Vec::new();
    for t in tasks {
        unexpected.extend(t.await.unwrap());
    }
    let total = ops.load(Ordering::Relaxed);
    assert!(unexpected.is_empty(), "unexpected errors: {unexpected:?}");
    assert!(total > 64, "only {total} operations in {secs} s");
    eprintln!(
        "64 clients, {secs} s: {total} operations ({:.1}/s)",
        total as f64 / secs as f64
    );
    std::fs::write(d.dir.path().join("soak-ops"), total.to_string()).unwrap();
    assert!(d.stop().unwrap().success());
    let check = ok(d.cli(&["check"]));
    assert!(check.contains("store and pool agree"), "{check}");
    d.spawn();
}

/// `thinsnap gc` in a loop while 16 clients prepare, commit, view and remove shared keys:
/// gc never takes an operation in flight (a Removing record a Remove is still working on),
/// no request fails unexpectedly, and the store and pool agree afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn loop_gc_in_a_loop_under_16_clients() {
    let mut d = Daemon::start();
    let mut c = d.client().await;
    c.prepare("root-a", "").await.unwrap();
    c.commit("root", "root-a").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut tasks = Vec::new();
    for client in 0..16u64 {
        let mut c = d.client().await;
        tasks.push(tokio::spawn(async move {
            let mut unexpected = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let k = format!("c{client}-{}", i % 4);
                let n = format!("{k}-done");
                let steps: [Result<(), tonic::Status>; 4] = [
                    c.prepare(&k, "root").await.map(|_| ()),
                    c.commit(&n, &k).await,
                    c.view(&format!("{k}-view"), &n).await.map(|_| ()),
                    c.remove(&format!("{k}-view")).await,
                ];
                let last = c.remove(&n).await;
                for r in steps.into_iter().chain([last]) {
                    if let Err(e) = r {
                        unexpected.push(format!("{:?}: {}", e.code(), e.message()));
                    }
                }
                i += 1;
            }
            unexpected
        }));
    }
    let config = d.config.clone();
    let gc = tokio::task::spawn_blocking(move || {
        let mut problems = Vec::new();
        let mut runs = 0;
        while Instant::now() < deadline {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinsnap"))
                .arg("--config")
                .arg(&config)
                .args(["gc", "--json"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if !out.status.success() {
                problems.push(format!("{text}{}", String::from_utf8_lossy(&out.stderr)));
            }
            runs += 1;
        }
        (runs, problems)
    });
    let mut unexpected = Vec::new();
    for t in tasks {
        unexpected.extend(t.await.unwrap());
    }
    let (runs, problems) = gc.await.unwrap();
    assert!(unexpected.is_empty(), "unexpected errors: {unexpected:?}");
    assert!(problems.is_empty(), "gc reported problems: {problems:?}");
    assert!(runs > 1, "gc ran {runs} time(s)");
    assert_eq!(
        c.list(&[]).await.unwrap().len(),
        1,
        "only the root layer is left"
    );
    assert!(d.stop().unwrap().success());
    let check = ok(d.cli(&["check"]));
    assert!(check.contains("store and pool agree"), "{check}");
    d.spawn();
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_malformed_requests_get_exact_codes_and_change_nothing() {
    let d = Daemon::start();
    let mut c = d.client().await;
    c.prepare("active", "").await.unwrap();
    c.prepare("c-a", "").await.unwrap();
    c.commit("committed", "c-a").await.unwrap();
    c.view("view", "committed").await.unwrap();
    let before = {
        let mut v = c.list(&[]).await.unwrap();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    };
    let huge = "k".repeat(100_000);
    let label = |k: &str, v: &str| -> Labels { [(k.to_string(), v.to_string())].into() };
    let cases: Vec<(&str, Code, Result<(), tonic::Status>)> = vec![
        (
            "empty key",
            Code::InvalidArgument,
            c.prepare("", "").await.map(|_| ()),
        ),
        (
            "huge key",
            Code::InvalidArgument,
            c.prepare(&huge, "").await.map(|_| ()),
        ),
        (
            "huge parent",
            Code::InvalidArgument,
            c.prepare("x", &huge).await.map(|_| ()),
        ),
        (
            "huge commit name",
            Code::InvalidArgument,
            c.commit(&huge, "active").await,
        ),
        (
            "unknown parent",
            Code::NotFound,
            c.prepare("x", "nope").await.map(|_| ()),
        ),
        (
            "active parent",
            Code::InvalidArgument,
            c.prepare("x", "active").await.map(|_| ()),
        ),
        (
            "view parent",
            Code::InvalidArgument,
            c.prepare("x", "view").await.map(|_| ()),
        ),
        (
            "own key as parent",
            Code::NotFound,
            c.prepare("self", "self").await.map(|_| ()),
        ),
        (
            "duplicate key",
            Code::AlreadyExists,
            c.prepare("active", "").await.map(|_| ()),
        ),
        (
            "duplicate view key",
            Code::AlreadyExists,
            c.view("view", "committed").await.map(|_| ()),
        ),
        (
            "view of active",
            Code::InvalidArgument,
            c.view("x", "active").await.map(|_| ()),
        ),
        (
            "empty label key",
            Code::InvalidArgument,
            c.prepare_with("x", "", label("", "v")).await.map(|_| ()),
        ),
        (
            "oversized label",
            Code::InvalidArgument,
            c.prepare_with("x", "", label("k", &"v".repeat(4096)))
                .await
                .map(|_| ()),
        ),
        (
            "bad size label",
            Code::InvalidArgument,
            c.prepare_with(
                "x",
                "",
                label("containerd.io/snapshot/thinsnap.size", "lots"),
            )
            .await
            .map(|_| ()),
        ),
        (
            "commit unknown",
            Code::NotFound,
            c.commit("x", "nope").await,
        ),
        (
            "commit committed",
            Code::FailedPrecondition,
            c.commit("x", "committed").await,
        ),
        (
            "commit view",
            Code::FailedPrecondition,
            c.commit("x", "view").await,
        ),
        (
            "commit onto existing name",
            Code::AlreadyExists,
            c.commit("committed", "active").await,
        ),
        (
            "commit empty name",
            Code::InvalidArgument,
            c.commit("", "active").await,
        ),
        ("remove unknown", Code::NotFound, c.remove("nope").await),
        (
            "remove with child",
            Code::FailedPrecondition,
            c.remove("committed").await,
        ),
        (
            "stat unknown",
            Code::NotFound,
            c.stat("nope").await.map(|_| ()),
        ),
        (
            "mounts of committed",
            Code::FailedPrecondition,
            c.mounts("committed").await.map(|_| ()),
        ),
        (
            "update unknown",
            Code::NotFound,
            c.update("nope", Labels::new(), &[]).await.map(|_| ()),
        ),
        (
            "update name field",
            Code::InvalidArgument,
            c.update("active", Labels::new(), &["name"])
                .await
                .map(|_| ()),
        ),
        (
            "update kind field",
            Code::InvalidArgument,
            c.update("active", Labels::new(), &["kind"])
                .await
                .map(|_| ()),
        ),
        (
            "update bad label",
            Code::InvalidArgument,
            c.update("active", label("", "v"), &["labels."])
                .await
                .map(|_| ()),
        ),
        (
            "walk bad filter",
            Code::InvalidArgument,
            c.list(&["labels.\"unterminated"]).await.map(|_| ()),
        ),
        (
            "walk bad regex",
            Code::InvalidArgument,
            c.list(&["name~=("]).await.map(|_| ()),
        ),
        (
            "usage unknown",
            Code::NotFound,
            c.usage("nope").await.map(|_| ()),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, want, got) in &cases {
        match got {
            Err(e) if e.code() == *want => {}
            other => wrong.push(format!("{what}: want {want:?}, got {other:?}")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let mut after = c.list(&[]).await.unwrap();
    after.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(before, after, "malformed requests changed nothing");
}

/// The state directory's filesystem fills up: requests fail with an error that names the
/// metadata store, and once space is freed the daemon works again without a restart (redb
/// refuses everything after an I/O error until it is opened again; the store does that).
#[tokio::test(flavor = "multi_thread")]
async fn loop_a_full_state_directory_is_survived_without_a_restart() {
    common::require_dm();
    let dir = common::scratch_dir();
    let pool = common::unique_pool_name();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &state,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=3m,mode=0700"),
    )
    .unwrap();
    let d = dir.path().display();
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "state_dir = \"{d}/state\"\nsocket = \"{d}/thinsnap.sock\"\nruntime_dir = \"{d}/run\"\ndefault_size = \"1G\"\n[pool]\nname = \"{pool}\"\n[pool.loopback]\ndir = \"{d}/pool\"\ndata_size = \"4G\"\nmetadata_size = \"64M\"\n"
        ),
    )
    .unwrap();
    let d = Daemon::start_in(dir, pool);
    let mut c = d.client().await;
    c.prepare("first", "").await.unwrap();
    // Fill the state directory's filesystem.
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xa5u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let big: Labels = (0..8)
        .map(|i| (format!("containerd.io/snapshot/fill{i}"), "x".repeat(3000)))
        .collect();
    let mut failure = None;
    for i in 0..200 {
        match c.prepare_with(&format!("k{i}"), "", big.clone()).await {
            Ok(_) => {}
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let e = failure.expect("a request fails while the state directory is full");
    assert!(e.message().contains("metadata store"), "{e:?}");
    std::fs::remove_file(&filler).unwrap();
    // Space again: the next requests work, without a restart.
    c.prepare_with("after", "", big.clone()).await.unwrap();
    c.commit("after-c", "after").await.unwrap();
    c.remove("after-c").await.unwrap();
    let log = std::fs::read_to_string(d.log()).unwrap();
    assert!(log.contains("opened again after an I/O error"), "{log}");
    // What the failed request left half done is the next start's to roll back.
    let mut d = d;
    assert!(d.stop().unwrap().success());
    d.spawn();
}
