//! containerd's snapshotter conformance suite (`core/snapshots/testsuite` in
//! containerd/containerd: `testsuite.go`, `issues.go`, `helpers.go`), case by case, against a
//! real `thinsnap serve` through containerd's Snapshots API. Every case gets its own daemon
//! on its own loopback pool.
//!
//! | containerd case               | test                                              |
//! |-------------------------------|---------------------------------------------------|
//! | Basic                         | `loop_conformance_basic`                          |
//! | StatActive                    | `loop_conformance_stat_active`                    |
//! | StatComitted                  | `loop_conformance_stat_committed`                 |
//! | TransitivityTest              | `loop_conformance_transitivity`                   |
//! | PreareViewFailingtest         | `loop_conformance_prepare_view_failing`           |
//! | Update                        | `loop_conformance_update`                         |
//! | Remove                        | `loop_conformance_remove`                         |
//! | Walk                          | `loop_conformance_walk`                           |
//! | LayerFileupdate               | `loop_conformance_layer_file_update`              |
//! | RemoveDirectoryInLowerLayer   | `loop_conformance_remove_directory_in_lower_layer`|
//! | Chown                         | `loop_conformance_chown`                          |
//! | DirectoryPermissionOnCommit   | `loop_conformance_directory_permission_on_commit` |
//! | RemoveIntermediateSnapshot    | `loop_conformance_remove_intermediate_snapshot`   |
//! | DeletedFilesInChildSnapshot   | `loop_conformance_deleted_files_in_child_snapshot`|
//! | MoveFileFromLowerLayer        | `loop_conformance_move_file_from_lower_layer`     |
//! | ViewReadonly                  | `loop_conformance_view_readonly`                  |
//! | StatInWalk                    | `loop_conformance_stat_in_walk`                   |
//! | CloseTwice                    | `loop_conformance_close_twice`                    |
//! | RootPermission                | `loop_conformance_root_permission`                |
//! | Rename                        | `loop_conformance_rename`                         |
//! | 128LayersMount                | `loop_conformance_128_layers_mount`               |
//!
//! Adaptations to a block snapshotter behind a gRPC service:
//! - Snapshot keys are paths under a per-test `work` directory, as containerd's suite uses.
//!   Every Prepare, View and Commit carries the suite's `containerd.io/gc.root` label.
//! - Trees are compared like continuity's `fstest.CheckDirectoryEqual`: path, file type and
//!   mode, owner, and for regular files size, sha256 and hard-link groups; symlink targets;
//!   device numbers; the root directory itself is not compared. `/lost+found`, which
//!   mkfs.ext4 puts in every filesystem, is the one filesystem metadata entry left out (as
//!   continuity leaves out its `metadataFiles`).
//! - "Is an error" becomes the gRPC code containerd expects: NotFound, AlreadyExists,
//!   FailedPrecondition, InvalidArgument.
//! - Snapshots are always unmounted before Commit (containerd's suite does too).
//! - Rename renames a directory of the lower layer as well: only overlayfs is exempt.
//! - CloseTwice: the daemon is stopped with SIGTERM (exit 0), stopping it again is a no-op,
//!   and after a restart the snapshots are all there, unchanged.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::daemon::{labels, Client, Daemon, Labels, Mounted, SNAPSHOTTER};
use containerd_client::services::v1::snapshots::{Info, Kind, UpdateSnapshotRequest};
use containerd_client::types::Mount;
use sha2::Digest;
use tonic::Code;

const GC_ROOT: &str = "containerd.io/gc.root";
const VIEW: i32 = Kind::View as i32;
const ACTIVE: i32 = Kind::Active as i32;
const COMMITTED: i32 = Kind::Committed as i32;

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.unwrap_err().code()
}

/// Now as RFC 3339 in UTC, to the second (Go's `time.RFC3339` of a UTC time).
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since the epoch (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn time_of(t: &Option<prost_types::Timestamp>) -> SystemTime {
    let t = t.as_ref().expect("timestamp set");
    UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32)
}

// ---------------------------------------------------------------------------------------
// fstest: appliers and directory comparison.

/// One change of continuity's `fstest` appliers.
#[derive(Clone, Debug)]
enum Op {
    /// `CreateFile(path, content, perm)`: create or truncate, write, chmod.
    File(String, Vec<u8>, u32),
    /// `CreateDir(path, perm)`: mkdir -p, chmod.
    Dir(String, u32),
    /// `RemoveAll(path)`: like `rm -rf`; a missing path is fine.
    RemoveAll(String),
    /// `Rename(old, new)`.
    Rename(String, String),
    /// `Chown(path, uid, gid)`.
    Chown(String, u32, u32),
    /// `Link(old, new)`: a hard link.
    Link(String, String),
}

fn file(p: &str, content: &[u8], perm: u32) -> Op {
    Op::File(p.into(), content.to_vec(), perm)
}
fn dir(p: &str, perm: u32) -> Op {
    Op::Dir(p.into(), perm)
}
fn remove_all(p: &str) -> Op {
    Op::RemoveAll(p.into())
}
fn rename(a: &str, b: &str) -> Op {
    Op::Rename(a.into(), b.into())
}
fn chown(p: &str, uid: u32, gid: u32) -> Op {
    Op::Chown(p.into(), uid, gid)
}
fn link(a: &str, b: &str) -> Op {
    Op::Link(a.into(), b.into())
}

fn under(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

/// Applies `ops` under `root`, panicking with the failing change.
fn apply(root: &Path, ops: &[Op]) {
    for op in ops {
        let res = match op {
            Op::File(p, content, perm) => {
                let path = under(root, p);
                (|| {
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(*perm)
                        .open(&path)?;
                    f.write_all(content)?;
                    drop(f);
                    fs::set_permissions(&path, fs::Permissions::from_mode(*perm))
                })()
            }
            Op::Dir(p, perm) => {
                let path = under(root, p);
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(*perm)
                    .create(&path)
                    .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(*perm)))
            }
            Op::RemoveAll(p) => {
                let path = under(root, p);
                match fs::symlink_metadata(&path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e),
                    Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
                    Ok(_) => fs::remove_file(&path),
                }
            }
            Op::Rename(a, b) => fs::rename(under(root, a), under(root, b)),
            Op::Chown(p, uid, gid) => {
                std::os::unix::fs::chown(under(root, p), Some(*uid), Some(*gid))
            }
            Op::Link(a, b) => fs::hard_link(under(root, a), under(root, b)),
        };
        if let Err(e) = res {
            panic!("applying {op:?} under {}: {e}", root.display());
        }
    }
}

/// What continuity compares of one entry of a tree: path (the first of its hard links),
/// type and mode, owner, size, content, other hard links, symlink target, device numbers.
fn manifest(root: &Path) -> Vec<String> {
    struct Entry {
        paths: Vec<String>,
        desc: String,
    }
    fn walk(
        root: &Path,
        dir: &Path,
        entries: &mut Vec<Entry>,
        links: &mut HashMap<(u64, u64), usize>,
    ) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let p = dir.join(&name);
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            if rel == "/lost+found" {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let mut desc = format!("mode={:o} uid={} gid={}", m.mode(), m.uid(), m.gid());
            if ft.is_file() {
                let data = fs::read(&p).unwrap();
                desc += &format!(" size={} sha256={:x}", m.len(), sha2::Sha256::digest(&data));
                if m.nlink() >= 2 {
                    if let Some(&i) = links.get(&(m.dev(), m.ino())) {
                        entries[i].paths.push(rel);
                        continue;
                    }
                    links.insert((m.dev(), m.ino()), entries.len());
                }
            } else if ft.is_symlink() {
                desc += &format!(" target={}", fs::read_link(&p).unwrap().display());
            } else {
                use std::os::unix::fs::FileTypeExt;
                if ft.is_block_device() || ft.is_char_device() {
                    desc += &format!(" rdev={:x}", m.rdev());
                }
            }
            entries.push(Entry {
                paths: vec![rel],
                desc,
            });
            if ft.is_dir() {
                walk(root, &p, entries, links);
            }
        }
    }
    let mut entries = Vec::new();
    walk(root, root, &mut entries, &mut HashMap::new());
    let mut out: Vec<String> = entries
        .into_iter()
        .map(|mut e| {
            e.paths.sort();
            let links = if e.paths.len() > 1 {
                format!(" links={:?}", &e.paths[1..])
            } else {
                String::new()
            };
            format!("{} {}{links}", e.paths[0], e.desc)
        })
        .collect();
    out.sort();
    out
}

/// `fstest.CheckDirectoryEqual(expected, actual)`.
fn check_directory_equal(expected: &Path, actual: &Path, what: &str) {
    let e = manifest(expected);
    let a = manifest(actual);
    if e != a {
        let mut msg = String::new();
        for x in e.iter().filter(|x| !a.contains(x)) {
            msg += &format!("- {x}\n");
        }
        for x in a.iter().filter(|x| !e.contains(x)) {
            msg += &format!("+ {x}\n");
        }
        panic!(
            "{what}: {} differs from the expected {} (- expected, + actual):\n{msg}",
            actual.display(),
            expected.display()
        );
    }
}

// ---------------------------------------------------------------------------------------
// The suite's fixture: a daemon, a client, a work directory for keys and trees.

struct Suite {
    d: Daemon,
    c: Client,
    /// Where keys point (containerd uses `filepath.Join(work, name)` as keys).
    work: PathBuf,
    /// The suite's `opt`: a `containerd.io/gc.root` label.
    opt: Labels,
    n: u32,
}

impl Suite {
    async fn new() -> Suite {
        let d = Daemon::start();
        let c = d.client().await;
        let work = d.dir.path().join("work");
        fs::create_dir_all(&work).unwrap();
        Suite {
            d,
            c,
            work,
            opt: labels(&[(GC_ROOT, &rfc3339_now())]),
            n: 0,
        }
    }

    /// `filepath.Join(work, name)`.
    fn key(&self, name: &str) -> String {
        self.work.join(name).display().to_string()
    }

    /// A fresh unique name with `prefix`.
    fn unique(&mut self, prefix: &str) -> String {
        self.n += 1;
        format!("{prefix}-{}", self.n)
    }

    /// A fresh empty directory for a tree (containerd's `os.MkdirTemp(work, ...)`).
    fn temp_dir(&mut self, prefix: &str) -> PathBuf {
        let name = self.unique(prefix);
        let p = self.work.join(name);
        fs::create_dir(&p).unwrap();
        p
    }

    async fn prepare(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
        let opt = self.opt.clone();
        self.c.prepare_with(key, parent, opt).await
    }

    async fn view(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
        let opt = self.opt.clone();
        self.c.view_with(key, parent, opt).await
    }

    async fn commit(&mut self, name: &str, key: &str) -> Result<(), tonic::Status> {
        let opt = self.opt.clone();
        self.c.commit_with(name, key, opt).await
    }

    /// Mounts `mounts` at a fresh directory; unmounted when dropped.
    fn mount(&mut self, mounts: &[Mount]) -> Mounted {
        assert!(!mounts.is_empty(), "expected mounts to have entries");
        let name = self.unique("m");
        Mounted::new(self.d.dir.path(), &name, mounts)
    }

    /// `snapshotterPrepareMount`: Prepare `work/name` on `parent` and mount it.
    async fn prepare_mount(&mut self, name: &str, parent: &str) -> (String, Mounted) {
        let key = self.key(name);
        let m = self.prepare(&key, parent).await.unwrap();
        let mnt = self.mount(&m);
        (key, mnt)
    }

    /// `fstest.CheckDirectoryEqualWithApplier(root, layers...)`.
    fn check_equal_with_applier(&mut self, root: &Path, layers: &[&[Op]]) {
        let applied = self.temp_dir("fstest");
        for ops in layers {
            apply(&applied, ops);
        }
        check_directory_equal(&applied, root, "snapshot");
        fs::remove_dir_all(&applied).unwrap();
    }

    /// `createSnapshot`: prepare `<n>-prepare` on `parent`, apply `ops` through a mount,
    /// unmount, commit as `<n>`; returns `<n>`.
    async fn create_snapshot(&mut self, parent: &str, ops: &[Op]) -> String {
        let n = self.unique("snapshot");
        let prepare = format!("{n}-prepare");
        let m = self
            .prepare(&prepare, parent)
            .await
            .unwrap_or_else(|e| panic!("failed to prepare snapshot: {e}"));
        let mnt = self.mount(&m);
        apply(&mnt.path, ops);
        drop(mnt);
        self.commit(&n, &prepare)
            .await
            .unwrap_or_else(|e| panic!("failed to commit: {e}"));
        n
    }

    /// `checkSnapshot`: a view `<name>-view` of `name`, mounted, must equal `check`; the view
    /// is removed afterwards.
    async fn check_snapshot(&mut self, name: &str, check: &Path) {
        let view = format!("{name}-view");
        let m = self
            .view(&view, name)
            .await
            .unwrap_or_else(|e| panic!("failed to create view: {e}"));
        let mnt = self.mount(&m);
        check_directory_equal(check, &mnt.path, &format!("snapshot {name}"));
        drop(mnt);
        self.c
            .remove(&view)
            .await
            .unwrap_or_else(|e| panic!("failed to remove view: {e}"));
    }

    /// `checkSnapshots`: a chain of snapshots, one per layer of changes, each checked in a
    /// view against the same changes applied to one flat directory.
    async fn check_snapshots(&mut self, layers: &[Vec<Op>]) {
        let flat = self.temp_dir("flat");
        let mut parent = String::new();
        for ops in layers {
            let s = self.create_snapshot(&parent, ops).await;
            apply(&flat, ops);
            self.check_snapshot(&s, &flat).await;
            parent = s;
        }
        fs::remove_dir_all(&flat).unwrap();
    }
}

/// Update with the whole `info` sent, as containerd's proxy does.
async fn update_info(c: &mut Client, info: Info, paths: &[&str]) -> Result<Info, tonic::Status> {
    let r = c
        .inner
        .update(UpdateSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            info: Some(info),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|s| s.to_string()).collect(),
            }),
        })
        .await?;
    Ok(r.into_inner().info.unwrap())
}

fn sorted_names(infos: Vec<Info>) -> Vec<String> {
    let mut n: Vec<String> = infos.into_iter().map(|i| i.name).collect();
    n.sort();
    n
}

// ---------------------------------------------------------------------------------------
// testsuite.go

/// checkSnapshotterBasic: the basic workflow of a snapshotter.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_basic() {
    let mut s = Suite::new().await;
    let initial = vec![
        file("/foo", b"foo\n", 0o777),
        dir("/a", 0o755),
        dir("/a/b", 0o755),
        dir("/a/b/c", 0o755),
    ];
    let diff = vec![
        file("/bar", b"bar\n", 0o777),
        // also, change content of foo to bar
        file("/foo", b"bar\n", 0o777),
        remove_all("/a/b"),
    ];

    let preparing = s.key("preparing");
    let m = s.prepare(&preparing, "").await.unwrap();
    let mnt = s.mount(&m);
    apply(&mnt.path, &initial);
    // unmount before commit
    drop(mnt);

    let committed = s.key("committed");
    s.commit(&committed, &preparing).await.unwrap();
    let si = s.c.stat(&committed).await.unwrap();
    assert_eq!(si.parent, "");
    assert_eq!(si.kind, COMMITTED);
    assert_eq!(
        code(s.c.stat(&preparing).await),
        Code::NotFound,
        "{preparing} should no longer be available after Commit"
    );

    let next = s.key("nextlayer");
    let m = s.prepare(&next, &committed).await.unwrap();
    let mnt = s.mount(&m);
    s.check_equal_with_applier(&mnt.path, &[&initial]);
    apply(&mnt.path, &diff);
    // unmount before commit
    drop(mnt);

    let ni = s.c.stat(&next).await.unwrap();
    assert_eq!(ni.parent, committed);
    assert_eq!(ni.kind, ACTIVE);

    let next_committed = s.key("committed-next");
    s.commit(&next_committed, &next).await.unwrap();
    let si2 = s.c.stat(&next_committed).await.unwrap();
    assert_eq!(si2.parent, committed);
    assert_eq!(si2.kind, COMMITTED);
    assert_eq!(
        code(s.c.stat(&next).await),
        Code::NotFound,
        "{next} should no longer be available after Commit"
    );

    let walked: BTreeMap<String, Info> =
        s.c.list(&[])
            .await
            .unwrap()
            .into_iter()
            .map(|i| (i.name.clone(), i))
            .collect();
    for expected in [&si, &si2] {
        let got = walked
            .get(&expected.name)
            .unwrap_or_else(|| panic!("Missing stat for {}", expected.name));
        assert_eq!(got, expected);
    }

    let nextnext = s.key("nextnextlayer");
    let m = s.view(&nextnext, &next_committed).await.unwrap();
    let mnt = s.mount(&m);
    s.check_equal_with_applier(&mnt.path, &[&initial, &diff]);
    drop(mnt);
    s.c.remove(&nextnext).await.unwrap();

    let err = s.c.remove(&committed).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("remove"), "{err}");

    s.c.remove(&next_committed).await.unwrap();
    s.c.remove(&committed).await.unwrap();
}

/// checkSnapshotterStatActive: Stat of a new layer made with Prepare says Active.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_stat_active() {
    let mut s = Suite::new().await;
    let (preparing, mnt) = s.prepare_mount("preparing", "").await;
    fs::write(mnt.path.join("foo"), b"foo\n").unwrap();
    let si = s.c.stat(&preparing).await.unwrap();
    assert_eq!(si.name, preparing);
    assert_eq!(si.kind, ACTIVE);
    assert_eq!(si.parent, "");
    drop(mnt);
}

/// checkSnapshotterStatCommitted: Stat of a layer made with Prepare and Commit says
/// Committed.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_stat_committed() {
    let mut s = Suite::new().await;
    let (preparing, mnt) = s.prepare_mount("preparing", "").await;
    fs::write(mnt.path.join("foo"), b"foo\n").unwrap();
    drop(mnt);
    let committed = s.key("committed");
    s.commit(&committed, &preparing).await.unwrap();
    let si = s.c.stat(&committed).await.unwrap();
    assert_eq!(si.name, committed);
    assert_eq!(si.kind, COMMITTED);
    assert_eq!(si.parent, "");
}

/// checkSnapshotterTransitivity: given A <- B <- C, B is the parent of C and A is a
/// transitive parent of C.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_transitivity() {
    let mut s = Suite::new().await;
    let (preparing, mnt) = s.prepare_mount("preparing", "").await;
    fs::write(mnt.path.join("foo"), b"foo\n").unwrap();
    drop(mnt);
    let snap_a = s.key("snapA");
    s.commit(&snap_a, &preparing).await.unwrap();

    let (next, mnt) = s.prepare_mount("next", &snap_a).await;
    assert_eq!(
        fs::read(mnt.path.join("foo")).unwrap(),
        b"foo\n",
        "the child sees its parent's file"
    );
    fs::write(mnt.path.join("foo"), b"foo bar\n").unwrap();
    drop(mnt);
    let snap_b = s.key("snapB");
    s.commit(&snap_b, &next).await.unwrap();

    let si_a = s.c.stat(&snap_a).await.unwrap();
    let si_b = s.c.stat(&snap_b).await.unwrap();
    let si_parent_b = s.c.stat(&si_b.parent).await.unwrap();
    assert_eq!(si_a.parent, "");
    assert_eq!(si_b.parent, snap_a);
    assert_eq!(si_parent_b.parent, "");
}

/// checkSnapshotterPrepareView: two Prepares or Views with the same key must fail.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_prepare_view_failing() {
    let mut s = Suite::new().await;
    let (preparing, mnt) = s.prepare_mount("preparing", "").await;
    drop(mnt);
    let snap_a = s.key("snapA");
    s.commit(&snap_a, &preparing).await.unwrap();

    // Prepare & View with same key
    let new_layer = s.key("newlayer");
    s.prepare(&new_layer, &snap_a).await.unwrap();
    assert_eq!(code(s.view(&new_layer, &snap_a).await), Code::AlreadyExists);

    // Two Prepare with same key
    let prep_layer = s.key("prepLayer");
    s.prepare(&prep_layer, &snap_a).await.unwrap();
    assert_eq!(
        code(s.prepare(&prep_layer, &snap_a).await),
        Code::AlreadyExists
    );

    // Two View with same key
    let view_layer = s.key("viewLayer");
    s.view(&view_layer, &snap_a).await.unwrap();
    assert_eq!(
        code(s.view(&view_layer, &snap_a).await),
        Code::AlreadyExists
    );
}

/// baseTestSnapshots: c1 committed; c2 committed on c1; a1 active on c2; a2 active; v1 view
/// on c2; v2 view.
async fn base_test_snapshots(s: &mut Suite) {
    s.prepare("c1-a", "").await.unwrap();
    s.commit("c1", "c1-a").await.unwrap();
    s.prepare("c2-a", "c1").await.unwrap();
    s.commit("c2", "c2-a").await.unwrap();
    s.prepare("a1", "c2").await.unwrap();
    s.prepare("a2", "").await.unwrap();
    s.view("v1", "c2").await.unwrap();
    s.view("v2", "").await.unwrap();
}

/// checkUpdate: timestamps, labels replaced, set and deleted per field path; the parent
/// is immutable.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_update() {
    let mut s = Suite::new().await;
    let t1 = SystemTime::now();
    base_test_snapshots(&mut s).await;
    let t2 = SystemTime::now();
    let cases = [
        ("c1", COMMITTED, ""),
        ("c2", COMMITTED, "c1"),
        ("a1", ACTIVE, "c2"),
        ("a2", ACTIVE, ""),
        ("v1", VIEW, "c2"),
        ("v2", VIEW, ""),
    ];
    for (name, kind, parent) in cases {
        let mut st = s.c.stat(name).await.unwrap();
        let created = time_of(&st.created_at);
        assert!(
            created >= t1 && created <= t2,
            "({name}) wrong created time {created:?}: expected between {t1:?} and {t2:?}"
        );
        assert_eq!(
            st.created_at, st.updated_at,
            "({name}) unexpected updated time"
        );
        assert_eq!(st.kind, kind, "({name}) kind");
        assert_eq!(st.parent, parent, "({name}) parent");
        assert_eq!(st.name, name, "({name}) name");

        let created_at = st.created_at;
        let root_time = rfc3339_now();
        let expected = labels(&[
            ("l1", "v1"),
            ("l2", "v2"),
            ("l3", "v3"),
            // Keep root label
            (GC_ROOT, &root_time),
        ]);
        st.parent = "doesnotexist".into();
        st.labels = expected.clone();
        let u1 = SystemTime::now();
        let st = update_info(&mut s.c, st, &[]).await.unwrap();
        let u2 = SystemTime::now();
        assert_eq!(st.created_at, created_at, "({name}) wrong created time");
        let updated = time_of(&st.updated_at);
        assert!(
            updated >= u1 && updated <= u2,
            "({name}) wrong updated time {updated:?}: expected between {u1:?} and {u2:?}"
        );
        assert_eq!(st.kind, kind, "({name}) kind");
        assert_eq!(st.parent, parent, "({name}) parent");
        assert_eq!(st.name, name, "({name}) name");
        assert_eq!(st.labels, expected, "({name}) labels");

        let expected = labels(&[("l1", "updated"), ("l3", "v3"), (GC_ROOT, &root_time)]);
        let mut st = st;
        st.labels = labels(&[("l1", "updated"), ("l4", "v4")]);
        let st = update_info(&mut s.c, st, &["labels.l1", "labels.l2"])
            .await
            .unwrap();
        assert_eq!(st.labels, expected, "({name}) labels");

        let expected = labels(&[("l4", "v4"), (GC_ROOT, &root_time)]);
        let mut st = st;
        st.labels = expected.clone();
        let st = update_info(&mut s.c, st, &["labels"]).await.unwrap();
        assert_eq!(st.labels, expected, "({name}) labels");

        // Test failure received when providing immutable field path
        let mut st = st;
        st.parent = "doesnotexist".into();
        let err = update_info(&mut s.c, st, &["parent"]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "({name}) {err}");
        assert_eq!(
            s.c.stat(name).await.unwrap().parent,
            parent,
            "({name}) parent"
        );
    }
}

/// checkRemove: keys and names are reusable after Remove.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_remove() {
    let mut s = Suite::new().await;
    s.prepare("committed-a", "").await.unwrap();
    s.commit("committed-1", "committed-a").await.unwrap();
    s.prepare("reuse-1", "committed-1").await.unwrap();
    s.c.remove("reuse-1").await.unwrap();
    s.view("reuse-1", "committed-1").await.unwrap();
    s.c.remove("reuse-1").await.unwrap();
    s.prepare("reuse-1", "").await.unwrap();
    s.c.remove("committed-1").await.unwrap();
    s.commit("committed-1", "reuse-1").await.unwrap();
}

/// checkWalk: Walk with containerd's filters.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_walk() {
    let mut s = Suite::new().await;
    let opt = labels(&[(GC_ROOT, "check-walk")]);
    let with_l = |l: &str| labels(&[("l", l), (GC_ROOT, "check-walk")]);
    let c = &mut s.c;

    // No parent active
    c.prepare_with("a-np", "", opt.clone()).await.unwrap();
    // Base parent
    c.prepare_with("p-tmp", "", opt.clone()).await.unwrap();
    c.commit_with("p", "p-tmp", opt.clone()).await.unwrap();
    // Active
    c.prepare_with("a", "p", opt.clone()).await.unwrap();
    // View
    c.view_with("v", "p", opt.clone()).await.unwrap();
    // Base parent with label=1
    c.prepare_with("p-wl-tmp", "", opt.clone()).await.unwrap();
    c.commit_with("p-wl", "p-wl-tmp", with_l("1"))
        .await
        .unwrap();
    // active with label=2
    c.prepare_with("a-wl", "p-wl", with_l("2")).await.unwrap();
    // view with label=3
    c.view_with("v-wl", "p-wl", with_l("3")).await.unwrap();
    // no parent active with label=2
    c.prepare_with("a-np-wl", "", with_l("2")).await.unwrap();

    let cases: &[(&[&str], &[&str])] = &[
        (
            &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            &[r#"labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["a-np", "a", "a-wl", "a-np-wl"],
            &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["v", "v-wl"],
            &[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["p", "p-wl"],
            &[r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (&["p", "a-np-wl"], &["name==p", "name==a-np-wl"]),
        (&["a-wl"], &["name==a-wl,labels.l"]),
        (&["a", "v"], &["parent==p"]),
        (
            &["a", "v", "a-wl", "v-wl"],
            &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
        ),
        (&["p-wl", "a-wl", "v-wl", "a-np-wl"], &["labels.l"]),
        (&["a-wl", "a-np-wl"], &["labels.l==2"]),
    ];
    let mut failures = Vec::new();
    for (i, (matches, filters)) in cases.iter().enumerate() {
        let mut expected: Vec<String> = matches.iter().map(|s| s.to_string()).collect();
        expected.sort();
        match c.list(filters).await {
            Ok(infos) => {
                let actual = sorted_names(infos);
                if actual != expected {
                    failures.push(format!(
                        "[{i}] {filters:?}: got {actual:?}, expected {expected:?}"
                    ));
                }
            }
            Err(e) => failures.push(format!("[{i}] {filters:?}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// checkSnapshotterViewReadonly: a view mounts read-only for real.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_view_readonly() {
    let mut s = Suite::new().await;
    let preparing = s.key("preparing");
    s.prepare(&preparing, "").await.unwrap();
    let committed = s.key("committed");
    s.commit(&committed, &preparing).await.unwrap();
    let view = s.key("view");
    let m = s.view(&view, &committed).await.unwrap();
    // Just checking the option string is not enough, we need to test a real mount.
    let mnt = s.mount(&m);
    let testfile = mnt.path.join("testfile");
    let res = fs::write(&testfile, b"testcontent");
    drop(mnt);
    let err = res.expect_err("write to a view should fail (EROFS) but did not fail");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    s.c.remove(&view).await.unwrap();
    s.c.remove(&committed).await.unwrap();
}

/// closeTwice: closing the snapshotter twice does not fail. Here: SIGTERM the daemon, it
/// exits 0; stopping it again is a no-op; after a restart every snapshot is still there.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_close_twice() {
    let mut s = Suite::new().await;
    let n = format!("closeTwice-{}", std::process::id());
    let prepare = format!("{n}-prepare");
    // do some dummy ops to modify the snapshotter internal state
    s.prepare(&prepare, "").await.unwrap();
    s.commit(&n, &prepare).await.unwrap();
    s.c.remove(&n).await.unwrap();
    // ...and leave some snapshots behind, to find them after the restart.
    let (keep_prepare, mnt) = s.prepare_mount("keep-prepare", "").await;
    fs::write(mnt.path.join("kept"), b"still here\n").unwrap();
    drop(mnt);
    let keep = s.key("keep");
    s.commit(&keep, &keep_prepare).await.unwrap();
    let active = s.key("active");
    s.prepare(&active, &keep).await.unwrap();
    let view = s.key("view");
    s.view(&view, &keep).await.unwrap();
    let before = s.c.list(&[]).await.unwrap();
    assert_eq!(sorted_names(before.clone()), {
        let mut v = vec![keep.clone(), active.clone(), view.clone()];
        v.sort();
        v
    });

    let first = s.d.stop().expect("the daemon was running");
    assert!(first.success(), "the first close failed: {first}");
    assert!(
        s.d.stop().is_none(),
        "the second close does nothing and does not fail"
    );

    s.d.spawn();
    s.c = s.d.client().await;
    let mut after = s.c.list(&[]).await.unwrap();
    let mut before = before;
    before.sort_by(|a, b| a.name.cmp(&b.name));
    after.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(after, before, "the snapshots survive the restart unchanged");
    assert_eq!(code(s.c.stat(&n).await), Code::NotFound);
    let m = s.c.mounts(&view).await.unwrap();
    let mnt = s.mount(&m);
    assert_eq!(fs::read(mnt.path.join("kept")).unwrap(), b"still here\n");
    drop(mnt);
}

/// checkRootPermission: the root of a new snapshot is 0755.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_root_permission() {
    let mut s = Suite::new().await;
    let (_preparing, mnt) = s.prepare_mount("preparing", "").await;
    let mode = fs::metadata(&mnt.path).unwrap().permissions().mode() & 0o777;
    drop(mnt);
    assert_eq!(mode, 0o755, "expected 0755, got 0{mode:o}");
}

/// checkStatInWalk: Stat can be called during a Walk, and agrees with it.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_stat_in_walk() {
    let mut s = Suite::new().await;
    let prefix = "stats-in-walk-";
    // createNamedSnapshots
    let (c1, c2) = (format!("{prefix}c1"), format!("{prefix}c2"));
    s.prepare(&format!("{c1}-a"), "").await.unwrap();
    s.commit(&c1, &format!("{c1}-a")).await.unwrap();
    s.prepare(&format!("{c2}-a"), &c1).await.unwrap();
    s.commit(&c2, &format!("{c2}-a")).await.unwrap();
    s.prepare(&format!("{prefix}a1"), &c2).await.unwrap();
    s.view(&format!("{prefix}v1"), &c2).await.unwrap();
    // Some snapshots of others, which the walk skips.
    s.prepare("other", "").await.unwrap();

    let mut walker = s.c.inner.clone();
    let mut stream = walker
        .list(
            containerd_client::services::v1::snapshots::ListSnapshotsRequest {
                snapshotter: SNAPSHOTTER.into(),
                filters: vec![],
            },
        )
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    // Stat while the walk is still open, between its messages.
    while let Some(batch) = stream.message().await.unwrap() {
        for si in batch.info {
            if !si.name.starts_with(prefix) {
                // Only stat snapshots from this test
                continue;
            }
            let si2 = s.c.stat(&si.name).await.unwrap();
            // checkInfo: kind, name, parent, labels, created, updated.
            assert_eq!(si, si2);
            seen.push(si.name);
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        ["a1", "c1", "c2", "v1"].map(|n| format!("{prefix}{n}")),
        "the walk saw this test's snapshots"
    );
}

/// checkRemoveIntermediateSnapshot: of three layers, removing the middle one fails until
/// the top one is gone.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_remove_intermediate_snapshot() {
    let mut s = Suite::new().await;
    let (base, mnt) = s.prepare_mount("base", "").await;
    drop(mnt);
    let committed_base = s.key("committed-base");
    s.commit(&committed_base, &base).await.unwrap();

    // Create intermediate layer
    let intermediate = s.key("intermediate");
    s.prepare(&intermediate, &committed_base).await.unwrap();
    let committed_inter = s.key("committed-inter");
    s.commit(&committed_inter, &intermediate).await.unwrap();

    // Create top layer
    let top_layer = s.key("toplayer");
    s.prepare(&top_layer, &committed_inter).await.unwrap();

    // Deletion of intermediate layer must fail.
    let err = s.c.remove(&committed_inter).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    // Removal from toplayer to base should not fail.
    s.c.remove(&top_layer).await.unwrap();
    s.c.remove(&committed_inter).await.unwrap();
    s.c.remove(&committed_base).await.unwrap();
}

/// checkDeletedFilesInChildSnapshot: files of the base layer deleted in a new layer are gone
/// after commit.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_deleted_files_in_child_snapshot() {
    let mut s = Suite::new().await;
    let l1 = vec![
        file("/foo", b"foo\n", 0o777),
        file("/foobar", b"foobar\n", 0o777),
    ];
    let l2 = vec![remove_all("/foobar")];
    let l3 = vec![];
    s.check_snapshots(&[l1, l2, l3]).await;
}

/// checkFileFromLowerLayer: files of the base layer moved in the next layer are gone from
/// the source and present at the destination.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_move_file_from_lower_layer() {
    let mut s = Suite::new().await;
    let l1 = vec![
        dir("/dir1", 0o700),
        file("/dir1/f1", b"Hello", 0o644),
        dir("dir2", 0o700),
        file("dir2/f2", b"...", 0o644),
    ];
    let l2 = vec![
        dir("/dir3", 0o700),
        file("/dir3/f1", b"Hello", 0o644),
        remove_all("/dir1"),
        link("dir2/f2", "dir3/f2"),
        remove_all("dir2/f2"),
    ];
    s.check_snapshots(&[l1, l2]).await;
}

/// check128LayersMount: 128 layers, each checked before and after its changes against a
/// flat directory, and a view of the top one.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_128_layers_mount() {
    let mut s = Suite::new().await;
    let mut layers = vec![vec![
        file("/bottom", b"way at the bottom\n", 0o777),
        file("/overwriteme", b"FIRST!\n", 0o777),
        dir("/addhere", 0o755),
        dir("/onlyme", 0o755),
        file("/onlyme/bottom", b"bye!\n", 0o777),
    ]];
    for i in 1..=127 {
        layers.push(vec![
            file("/overwriteme", format!("{i} WAS HERE!\n").as_bytes(), 0o777),
            file(&format!("/addhere/file-{i}"), b"same\n", 0o755),
            remove_all("/onlyme"),
            dir("/onlyme", 0o755),
            file(&format!("/onlyme/file-{i}"), b"only me!\n", 0o777),
        ]);
    }

    let flat = s.work.join("flat");
    fs::create_dir_all(&flat).unwrap();
    let mut parent = String::new();
    for (i, ops) in layers.iter().enumerate() {
        let preparing = s.key(&format!("prepare-layer-{i}"));
        let m = s
            .prepare(&preparing, &parent)
            .await
            .unwrap_or_else(|e| panic!("[layer {i}] failed to get mount info: {e}"));
        let mnt = s.mount(&m);
        check_directory_equal(
            &flat,
            &mnt.path,
            &format!("[layer {i}] preparing before apply"),
        );
        apply(&flat, ops);
        apply(&mnt.path, ops);
        check_directory_equal(
            &flat,
            &mnt.path,
            &format!("[layer {i}] preparing after apply"),
        );
        drop(mnt);
        parent = s.key(&format!("committed-{i}"));
        s.commit(&parent, &preparing)
            .await
            .unwrap_or_else(|e| panic!("[layer {i}] failed to commit the preparing: {e}"));
    }

    let view = s.key("fullview");
    let m = s
        .view(&view, &parent)
        .await
        .unwrap_or_else(|e| panic!("failed to get view's mount info: {e}"));
    let mnt = s.mount(&m);
    check_directory_equal(&flat, &mnt.path, "fullview");
    drop(mnt);
}

// ---------------------------------------------------------------------------------------
// issues.go

/// checkLayerFileUpdate: updating one file in an upper layer (docker#21555), five times,
/// starting on second boundaries.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_layer_file_update() {
    let mut s = Suite::new().await;
    let l1 = vec![
        dir("/etc", 0o700),
        file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
        file("/etc/profile", b"PATH=/usr/bin", 0o644),
    ];
    let l2 = vec![
        file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
        file("/etc/profile", b"PATH=/usr/bin", 0o666),
        dir("/root", 0o700),
        file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644),
    ];
    // run 5 times to account for sporadic failure
    let mut sleep = Duration::ZERO;
    for _ in 0..5 {
        tokio::time::sleep(sleep).await;
        s.check_snapshots(&[l1.clone(), l2.clone()]).await;
        // Sleep until next second boundary before running again
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        sleep = Duration::from_secs(now.as_secs() + 1) - now;
    }
}

/// checkRemoveDirectoryInLowerLayer (docker#25244).
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_remove_directory_in_lower_layer() {
    let mut s = Suite::new().await;
    let l1 = vec![dir("/lib", 0o700), file("/lib/hidden", b"", 0o644)];
    let l2 = vec![
        remove_all("/lib"),
        dir("/lib", 0o700),
        file("/lib/not-hidden", b"", 0o644),
    ];
    let l3 = vec![file("/lib/newfile", b"", 0o644)];
    s.check_snapshots(&[l1, l2, l3]).await;
}

/// checkChown (docker#20240, #24913, #28391).
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_chown() {
    let mut s = Suite::new().await;
    let l1 = vec![
        dir("/opt", 0o700),
        dir("/opt/a", 0o700),
        dir("/opt/a/b", 0o700),
        file("/opt/a/b/file.txt", b"hello", 0o644),
    ];
    let l2 = vec![
        chown("/opt", 1, 1),
        chown("/opt/a", 1, 1),
        chown("/opt/a/b", 1, 1),
        chown("/opt/a/b/file.txt", 1, 1),
    ];
    s.check_snapshots(&[l1, l2]).await;
}

/// checkRename (docker#25409), including the directory rename overlayfs is exempt from.
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_rename() {
    let mut s = Suite::new().await;
    let l1 = vec![
        dir("/dir1", 0o700),
        dir("/somefiles", 0o700),
        file("/somefiles/f1", b"was here first!", 0o644),
        file("/somefiles/f2", b"nothing interesting", 0o644),
    ];
    let l2 = vec![
        rename("/dir1", "/dir2"),
        file("/somefiles/f1-overwrite", b"new content 1", 0o644),
        rename("/somefiles/f1-overwrite", "/somefiles/f1"),
        rename("/somefiles/f2", "/somefiles/f3"),
    ];
    s.check_snapshots(&[l1, l2]).await;
}

/// checkDirectoryPermissionOnCommit (docker#27298).
#[tokio::test(flavor = "multi_thread")]
async fn loop_conformance_directory_permission_on_commit() {
    let mut s = Suite::new().await;
    let l1 = vec![
        dir("/dir1", 0o700),
        dir("/dir2", 0o700),
        dir("/dir3", 0o700),
        dir("/dir4", 0o700),
        file("/dir4/f1", b"...", 0o644),
        dir("/dir5", 0o700),
        file("/dir5/f1", b"...", 0o644),
        chown("/dir1", 1, 1),
        chown("/dir2", 1, 1),
        chown("/dir3", 1, 1),
        chown("/dir5", 1, 1),
        chown("/dir5/f1", 1, 1),
    ];
    let l2 = vec![
        chown("/dir2", 0, 0),
        remove_all("/dir3"),
        chown("/dir4", 1, 1),
        chown("/dir4/f1", 1, 1),
    ];
    let l3 = vec![
        dir("/dir3", 0o700),
        chown("/dir3", 1, 1),
        remove_all("/dir5"),
        dir("/dir5", 0o700),
        chown("/dir5", 1, 1),
    ];
    s.check_snapshots(&[l1, l2, l3]).await;
}
