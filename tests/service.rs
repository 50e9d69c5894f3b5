//! The gRPC service on real dm: every Snapshots API method and its error codes, through
//! containerd's own client bindings, against a `thinsnap serve` process.

mod common;

use common::daemon::{labels, Daemon, Labels, Mounted};
use std::os::unix::fs::PermissionsExt;
use tonic::Code;

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.unwrap_err().code()
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_prepare_commit_child_view_remove() {
    let d = Daemon::start();
    let mut c = d.client().await;
    let m = c.prepare("base-active", "").await.unwrap();
    assert_eq!(m[0].r#type, "ext4");
    assert!(!m[0].options.contains(&"ro".to_string()));
    let mnt = Mounted::new(d.dir.path(), "base", &m);
    std::fs::write(mnt.path.join("hello"), b"from the base layer").unwrap();
    drop(mnt);
    c.commit("base", "base-active").await.unwrap();
    assert_eq!(
        c.stat("base-active").await.unwrap_err().code(),
        Code::NotFound
    );
    let info = c.stat("base").await.unwrap();
    assert_eq!(info.kind, 3, "committed");
    assert_eq!(info.parent, "");

    let m = c.prepare("child", "base").await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "child", &m);
    assert_eq!(
        std::fs::read(mnt.path.join("hello")).unwrap(),
        b"from the base layer"
    );
    std::fs::write(mnt.path.join("child-only"), b"x").unwrap();
    drop(mnt);
    let info = c.stat("child").await.unwrap();
    assert_eq!((info.kind, info.parent.as_str()), (2, "base"));

    let m = c.view("v", "base").await.unwrap();
    assert!(m[0].options.contains(&"ro".to_string()));
    let mnt = Mounted::new(d.dir.path(), "v", &m);
    assert!(mnt.path.join("hello").exists());
    assert!(
        !mnt.path.join("child-only").exists(),
        "a view sees nothing of a sibling"
    );
    assert!(
        std::fs::write(mnt.path.join("nope"), b"x").is_err(),
        "views are read-only"
    );
    drop(mnt);
    assert_eq!(c.stat("v").await.unwrap().kind, 1, "view");

    let err = c.remove("base").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    c.remove("child").await.unwrap();
    c.remove("v").await.unwrap();
    c.remove("base").await.unwrap();
    assert!(c.list(&[]).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_error_codes() {
    let d = Daemon::start();
    let mut c = d.client().await;
    c.prepare("a", "").await.unwrap();
    assert_eq!(code(c.prepare("a", "").await), Code::AlreadyExists);
    assert_eq!(code(c.prepare("b", "missing").await), Code::NotFound);
    assert_eq!(
        code(c.prepare("b", "a").await),
        Code::InvalidArgument,
        "active parent"
    );
    assert_eq!(
        code(c.view("b", "a").await),
        Code::InvalidArgument,
        "active parent"
    );
    assert_eq!(code(c.prepare("", "").await), Code::InvalidArgument);
    assert_eq!(
        code(c.prepare(&"k".repeat(5000), "").await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.prepare_with("b", "", labels(&[("", "v")])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.prepare_with("b", "", labels(&[("k", &"v".repeat(5000))]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(code(c.stat("missing").await), Code::NotFound);
    assert_eq!(code(c.mounts("missing").await), Code::NotFound);
    assert_eq!(code(c.usage("missing").await), Code::NotFound);
    assert_eq!(code(c.remove("missing").await), Code::NotFound);
    assert_eq!(code(c.commit("x", "missing").await), Code::NotFound);
    c.commit("a1", "a").await.unwrap();
    assert_eq!(
        code(c.commit("a2", "a").await),
        Code::NotFound,
        "the active key is gone"
    );
    assert_eq!(
        code(c.commit("a2", "a1").await),
        Code::FailedPrecondition,
        "a1 is committed, not active"
    );
    c.prepare("b", "a1").await.unwrap();
    assert_eq!(code(c.commit("a1", "b").await), Code::AlreadyExists);
    assert_eq!(
        code(c.mounts("a1").await),
        Code::FailedPrecondition,
        "committed"
    );
    c.view("v", "a1").await.unwrap();
    assert_eq!(
        code(c.commit("v1", "v").await),
        Code::FailedPrecondition,
        "views cannot be committed"
    );
    assert_eq!(
        code(c.update("missing", Labels::new(), &[]).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.update("b", Labels::new(), &["parent"]).await),
        Code::InvalidArgument
    );
    assert_eq!(code(c.list(&["name=="]).await), Code::InvalidArgument);
    // Nothing above changed anything.
    assert_eq!(c.names().await.unwrap(), vec!["a1", "b", "v"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_update_labels_and_walk_filters() {
    let d = Daemon::start();
    let mut c = d.client().await;
    c.prepare_with(
        "a",
        "",
        labels(&[("containerd.io/gc.root", "1"), ("x", "1")]),
    )
    .await
    .unwrap();
    c.commit_with(
        "a1",
        "a",
        labels(&[("containerd.io/gc.root", "1"), ("team", "blue")]),
    )
    .await
    .unwrap();
    c.prepare_with("b", "a1", labels(&[("team", "red")]))
        .await
        .unwrap();
    let info = c.stat("a1").await.unwrap();
    assert_eq!(
        info.labels,
        labels(&[("containerd.io/gc.root", "1"), ("team", "blue")]),
        "commit labels replace"
    );

    let i = c
        .update(
            "b",
            labels(&[("team", "green"), ("new", "y")]),
            &["labels.team"],
        )
        .await
        .unwrap();
    assert_eq!(
        i.labels,
        labels(&[("team", "green")]),
        "only the named label changes"
    );
    let i = c.update("b", labels(&[]), &["labels.team"]).await.unwrap();
    assert!(i.labels.is_empty(), "absent value deletes the label");
    let i = c
        .update("b", labels(&[("a", "1"), ("b", "2")]), &[])
        .await
        .unwrap();
    assert_eq!(
        i.labels,
        labels(&[("a", "1"), ("b", "2")]),
        "no paths: replace all"
    );
    let i = c
        .update("b", labels(&[("c", "3")]), &["labels"])
        .await
        .unwrap();
    assert_eq!(i.labels, labels(&[("c", "3")]));
    let before = c.stat("b").await.unwrap();
    assert!(before.updated_at.unwrap().seconds >= before.created_at.unwrap().seconds);

    let names = |v: Vec<containerd_client::services::v1::snapshots::Info>| {
        let mut n: Vec<String> = v.into_iter().map(|i| i.name).collect();
        n.sort();
        n
    };
    assert_eq!(names(c.list(&[]).await.unwrap()), vec!["a1", "b"]);
    assert_eq!(
        names(c.list(&["kind==committed"]).await.unwrap()),
        vec!["a1"]
    );
    assert_eq!(names(c.list(&["parent==a1"]).await.unwrap()), vec!["b"]);
    assert_eq!(
        names(
            c.list(&[r#"labels."containerd.io/gc.root""#])
                .await
                .unwrap()
        ),
        vec!["a1"]
    );
    assert_eq!(
        names(c.list(&["labels.team==blue", "labels.c==3"]).await.unwrap()),
        vec!["a1", "b"],
        "OR"
    );
    assert_eq!(
        names(c.list(&["kind==active,labels.c==3"]).await.unwrap()),
        vec!["b"],
        "AND"
    );
    assert_eq!(names(c.list(&["name~=^a"]).await.unwrap()), vec!["a1"]);
    // Stat agrees with what Walk returns.
    for i in c.list(&[]).await.unwrap() {
        assert_eq!(c.stat(&i.name).await.unwrap(), i);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_usage_counts_bytes_and_inodes() {
    let d = Daemon::start();
    let mut c = d.client().await;
    let m = c.prepare("a", "").await.unwrap();
    let empty = c.usage("a").await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "a", &m);
    for i in 0..20 {
        std::fs::write(mnt.path.join(format!("f{i}")), vec![7u8; 1 << 20]).unwrap();
    }
    nix::unistd::sync();
    // Usage answers from a reading of the pool's metadata at most a second (plus the
    // reading) old: the writes show within seconds.
    let mut active = c.usage("a").await.unwrap();
    let start = std::time::Instant::now();
    while active.size < empty.size + 20 * (1 << 20) && start.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        active = c.usage("a").await.unwrap();
    }
    assert!(
        active.size >= empty.size + 20 * (1 << 20),
        "{empty:?} -> {active:?}"
    );
    assert!(
        active.inodes >= empty.inodes + 20,
        "{empty:?} -> {active:?}"
    );
    drop(mnt);
    c.commit("a1", "a").await.unwrap();
    let committed = c.usage("a1").await.unwrap();
    assert!(committed.size >= 20 << 20, "{committed:?}");
    assert!(committed.inodes >= 20, "{committed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_remote_ref_label_reuses_committed_layers() {
    let d = Daemon::start();
    let mut c = d.client().await;
    c.prepare("extract-1", "").await.unwrap();
    c.commit("sha256:layer1", "extract-1").await.unwrap();
    let err = c
        .prepare_with(
            "extract-2",
            "",
            labels(&[("containerd.io/snapshot.ref", "sha256:layer1")]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    assert_eq!(
        c.stat("extract-2").await.unwrap_err().code(),
        Code::NotFound,
        "nothing was made"
    );
    // A ref naming a layer that is not here prepares normally.
    c.prepare_with(
        "extract-3",
        "",
        labels(&[("containerd.io/snapshot.ref", "sha256:other")]),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_size_label_grows_the_filesystem_and_is_inherited() {
    let d = Daemon::start();
    let mut c = d.client().await;
    let m = c.prepare("small", "").await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "small", &m);
    let small = common::fs_size(&mnt.path);
    drop(mnt);
    c.commit("small1", "small").await.unwrap();
    let m = c
        .prepare_with(
            "big",
            "small1",
            labels(&[("containerd.io/snapshot/thinsnap.size", "3G")]),
        )
        .await
        .unwrap();
    let mnt = Mounted::new(d.dir.path(), "big", &m);
    let big = common::fs_size(&mnt.path);
    assert!(big > small * 2, "{small} -> {big}");
    drop(mnt);
    c.commit("big1", "big").await.unwrap();
    let m = c.prepare("inherits", "big1").await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "inherits", &m);
    assert_eq!(common::fs_size(&mnt.path), big, "children inherit the size");
    drop(mnt);
    let err = c
        .prepare_with(
            "shrink",
            "big1",
            labels(&[("containerd.io/snapshot/thinsnap.size", "1G")]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_restart_keeps_active_snapshots_usable() {
    let mut d = Daemon::start();
    let mut c = d.client().await;
    let m = c.prepare("running", "").await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "running", &m);
    std::fs::write(mnt.path.join("before"), b"1").unwrap();
    assert!(d.stop().unwrap().success(), "SIGTERM stops it cleanly");
    // The container's filesystem keeps working while the daemon is down...
    std::fs::write(mnt.path.join("while-down"), b"2").unwrap();
    d.spawn();
    let mut c = d.client().await;
    // ...and after it is back, with the same device.
    assert_eq!(c.mounts("running").await.unwrap(), m);
    std::fs::write(mnt.path.join("after"), b"3").unwrap();
    drop(mnt);
    c.commit("done", "running").await.unwrap();
    let m = c.view("check", "done").await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "check", &m);
    for f in ["before", "while-down", "after"] {
        assert!(mnt.path.join(f).exists(), "{f}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_second_daemon_refuses_and_socket_is_private() {
    let d = Daemon::start();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinsnap"))
        .arg("--config")
        .arg(&d.config)
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another thinsnap process holds"), "{err}");
    let mut c = d.client().await;
    c.prepare("still-works", "").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_async_remove_defers_to_cleanup() {
    let d = Daemon::start_with("async_remove = true");
    let mut c = d.client().await;
    c.prepare("a", "").await.unwrap();
    c.remove("a").await.unwrap();
    assert_eq!(
        c.stat("a").await.unwrap_err().code(),
        Code::NotFound,
        "gone for containerd at once"
    );
    let before = common::dm_devices_of(&d.pool).len();
    c.cleanup().await.unwrap();
    assert_eq!(
        common::dm_devices_of(&d.pool).len(),
        before - 1,
        "cleanup deleted its device"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_xfs_snapshots_mount_with_nouuid() {
    let d = Daemon::start_with("filesystem = \"xfs\"");
    let mut c = d.client().await;
    let m = c.prepare("a", "").await.unwrap();
    assert_eq!(m[0].r#type, "xfs");
    assert!(m[0].options.contains(&"nouuid".to_string()));
    let mnt = Mounted::new(d.dir.path(), "a", &m);
    std::fs::write(mnt.path.join("f"), b"xfs").unwrap();
    drop(mnt);
    c.commit("a1", "a").await.unwrap();
    let m1 = c.prepare("b", "a1").await.unwrap();
    let m2 = c.prepare("c", "a1").await.unwrap();
    // Two snapshots of one filesystem mounted at once: same uuid, hence nouuid.
    let x = Mounted::new(d.dir.path(), "b", &m1);
    let y = Mounted::new(d.dir.path(), "c", &m2);
    assert_eq!(std::fs::read(x.path.join("f")).unwrap(), b"xfs");
    assert_eq!(std::fs::read(y.path.join("f")).unwrap(), b"xfs");
}

/// Writes `len` bytes to a new file at `path` and syncs it.
fn write_synced(path: &std::path::Path, len: usize) {
    let f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        std::io::Write::write_all(&mut &f, &chunk[..n]).unwrap();
        left -= n;
    }
    f.sync_all().unwrap();
}

/// Usage is a snapshot's exclusive bytes: what only its device maps, for a layer as of its
/// commit. A layer that writes 1 MiB onto a 200 MB parent reports the 1 MiB and the
/// filesystem metadata the write touched, a child never mounted reports nothing, and the
/// parent keeps its figure while children share its blocks. `thinsnap snapshot usage`
/// shows the mapped bytes beside them, and what removing the parent would free now.
#[tokio::test(flavor = "multi_thread")]
async fn loop_usage_is_exclusive_bytes() {
    const MIB: u64 = 1 << 20;
    let d = Daemon::start();
    let mut c = d.client().await;
    // `thinsnap snapshot usage` reads the mapping trees for the call; containerd's Usage
    // answers from the last reading, at most a second (plus a reading) old.
    let now = |k: &str| -> serde_json::Value {
        d.cli_json(&["snapshot", "usage", "--json", k])[0].clone()
    };
    let bytes = |v: &serde_json::Value, f: &str| v[f].as_u64().unwrap();
    let m = c.prepare("l1-active", "").await.unwrap();
    assert_eq!(c.usage("l1-active").await.unwrap().size, 0, "never mounted");
    let mnt = Mounted::new(d.dir.path(), "l1", &m);
    write_synced(&mnt.path.join("big"), 200_000_000);
    drop(mnt);
    c.commit("l1", "l1-active").await.unwrap();
    let l1 = now("l1");
    assert!(
        (200_000_000..200_000_000 + 16 * MIB).contains(&bytes(&l1, "exclusive_bytes")),
        "a 200 MB layer alone: {l1}"
    );
    assert_eq!(
        bytes(&l1, "exclusive_now_bytes"),
        bytes(&l1, "exclusive_bytes")
    );

    let m = c.prepare("l2-active", "l1").await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "l2", &m);
    write_synced(&mnt.path.join("small"), 1 << 20);
    drop(mnt);
    c.commit("l2", "l2-active").await.unwrap();
    c.prepare("child", "l1").await.unwrap();
    let (l2, child, l1_shared) = (now("l2"), now("child"), now("l1"));
    eprintln!("l1 {l1}\nl2 {l2}\nchild {child}\nl1 with children {l1_shared}");
    assert!(
        (MIB..=8 * MIB).contains(&bytes(&l2, "exclusive_bytes")),
        "1 MiB written onto the parent: {l2}"
    );
    assert!(bytes(&l2, "mapped_bytes") >= 201_000_000, "{l2}");
    assert_eq!(
        bytes(&child, "exclusive_bytes"),
        0,
        "never mounted: {child}"
    );
    assert!(bytes(&child, "mapped_bytes") >= 200_000_000, "{child}");
    // l1 shares every block with the child that never wrote: its Usage stays what it
    // added, but removing it alone would free nothing now.
    assert_eq!(
        bytes(&l1_shared, "exclusive_bytes"),
        bytes(&l1, "exclusive_bytes"),
        "a layer's figure is fixed at its commit"
    );
    assert_eq!(bytes(&l1_shared, "exclusive_now_bytes"), 0, "{l1_shared}");
    assert_eq!(
        l1_shared["inodes"], l1["inodes"],
        "inodes recorded at commit"
    );
    // containerd gets the same figures, from a reading at most a second or so old.
    let start = std::time::Instant::now();
    loop {
        let got = c.usage("l2").await.unwrap();
        if got.size as u64 == bytes(&l2, "exclusive_bytes") {
            break;
        }
        assert!(
            start.elapsed().as_secs() < 30,
            "Usage of l2: {got:?}, thinsnap: {l2}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let table = d.cli_ok(&["snapshot", "usage", "l1", "child"]);
    assert!(
        table.starts_with("NAME")
            && table.contains("EXCLUSIVE")
            && table.contains("MAPPED")
            && table.contains("FREEABLE"),
        "{table}"
    );

    c.remove("child").await.unwrap();
    c.remove("l2").await.unwrap();
    // Their devices go in the background: Cleanup waits for that.
    c.cleanup().await.unwrap();
    let alone = now("l1");
    assert_eq!(
        bytes(&alone, "exclusive_now_bytes"),
        bytes(&l1, "exclusive_bytes"),
        "its children gone, removing l1 would free all it added: {alone}"
    );
}

/// A client that opened an HTTP/2 connection and never reads it (it cannot see the
/// GOAWAY) does not keep a stopping daemon from exiting: after the GOAWAY and a grace
/// period the daemon closes the connection itself, exits cleanly, and says so in its log.
#[test]
fn loop_an_idle_connection_does_not_keep_the_daemon_from_stopping() {
    use std::io::Write;
    let mut d = Daemon::start();
    let mut idle = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    // The client preface and an empty SETTINGS frame; then nothing, ever.
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (tx, rx) = std::sync::mpsc::channel();
    let stopping = std::thread::spawn(move || {
        let status = d.stop();
        let _ = tx.send(());
        (d, status)
    });
    rx.recv_timeout(std::time::Duration::from_secs(90))
        .expect("the daemon did not exit within 90 s of SIGTERM with an idle client connected");
    let (d, status) = stopping.join().unwrap();
    assert!(status.unwrap().success(), "it stops cleanly");
    let log = std::fs::read_to_string(d.log()).unwrap();
    assert!(log.contains("after GOAWAY; closing them"), "{log}");
    drop(idle);
}
