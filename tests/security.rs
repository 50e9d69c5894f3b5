//! Safe on a shared node, on real device-mapper: thinsnap's state is root's alone, its
//! temporary mounts stay in its private directory (never /tmp, never through a planted
//! symlink, always nosuid,nodev,noexec), and thin devices it did not create, in a pool it
//! shares with another tool or with LVM, are never touched, whatever crashes and repairs
//! happen meanwhile. docs/security.md has the threat model.

mod common;

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use common::daemon::{Daemon, Labels};
use thinpool::{units::bytes_to_sectors, PoolOptions, RemoveMode, Source, ThinId, ThinPool};

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// The daemon's state: every path with the mode it must have.
fn state_modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    let s = dir.join("state");
    vec![
        (s.clone(), 0o700),
        (s.join("pool"), 0o700),
        (s.join("pool/data"), 0o600),
        (s.join("pool/metadata"), 0o600),
        (s.join("metadata.redb"), 0o600),
        (s.join("thinsnap.lock"), 0o600),
        (dir.join("run/mnt"), 0o700),
        (dir.join("thinsnap.sock"), 0o660),
    ]
}

#[test]
fn loop_state_and_pool_files_are_private_and_corrected_at_start() {
    let mut d = Daemon::start();
    d.cli_ok(&["snapshot", "prepare", "a"]);
    for (p, want) in state_modes(d.dir.path()) {
        assert_eq!(mode(&p), want, "{}", p.display());
    }
    // What an earlier version left open to everyone is made private at the next start.
    assert!(d.stop().unwrap().success());
    let s = d.dir.path().join("state");
    chmod(&s, 0o755);
    chmod(&s.join("pool"), 0o755);
    for f in ["pool/data", "pool/metadata", "metadata.redb"] {
        chmod(&s.join(f), 0o644);
    }
    d.spawn();
    for (p, want) in state_modes(d.dir.path()) {
        assert_eq!(mode(&p), want, "{} after the restart", p.display());
    }
    let log = std::fs::read_to_string(d.log()).unwrap();
    assert!(
        log.matches("made private").count() >= 5,
        "each correction is logged:\n{log}"
    );
}

/// The mount options of the mount at `path`, from mountinfo.
fn mount_options(path: &Path) -> Option<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4).is_some_and(|m| Path::new(m) == path))
        .map(|f| f[5].to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_temporary_mounts_stay_in_the_private_directory() {
    let mut d = Daemon::start();
    let mut c = d.client().await;
    c.prepare("a", "").await.unwrap();
    c.commit("l1", "a").await.unwrap();
    drop(c);
    assert!(d.stop().unwrap().success());

    // A symlink planted where the private mount directory goes is refused, not followed.
    let mnt = d.dir.path().join("run/mnt");
    let elsewhere = d.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::remove_dir(&mnt).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &mnt).unwrap();
    let out = d.cli(&["repair"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("private mount directory") && err.contains("is not a directory"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    std::fs::remove_file(&mnt).unwrap();

    // A crash while a new snapshot's filesystem is grown leaves its mount: in the private
    // directory, nosuid,nodev,noexec; nothing of thinsnap's in /tmp.
    let tmp_before = thinsnap_in_tmp();
    d.spawn_with_failpoint("create.after-grow-mount");
    let mut c = d.client().await;
    let size: Labels = [(
        "containerd.io/snapshot/thinsnap.size".to_string(),
        "2G".to_string(),
    )]
    .into();
    assert!(c.prepare_with("big", "l1", size).await.is_err());
    drop(c);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&d.wait_exit()),
        Some(9)
    );
    let left = common::mounts_under(&mnt);
    assert_eq!(left.len(), 1, "{left:?}");
    let name = left[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("grow-"), "{name}");
    let opts = mount_options(&left[0]).unwrap();
    for o in ["nosuid", "nodev", "noexec"] {
        assert!(opts.split(',').any(|x| x == o), "{o} not in {opts}");
    }
    assert_eq!(mode(&mnt), 0o700);
    assert_eq!(
        thinsnap_in_tmp(),
        tmp_before,
        "nothing of thinsnap's in /tmp"
    );
    // The next start removes it before it rolls the snapshot back.
    d.spawn();
    assert_eq!(common::private_mounts(d.dir.path()), Vec::<String>::new());
}

/// Entries of /tmp named like thinsnap's.
fn thinsnap_in_tmp() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/tmp")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("thinsnap-grow") || n.starts_with("thinsnap-import"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Another tool's thin device in the pool: its id, and the checksum of the data it holds.
struct Foreign {
    id: ThinId,
    sum: String,
}

const FOREIGN_BYTES: usize = 4 << 20;

/// Creates thin device `id` in `pool` with raw pool messages and writes a pattern to it.
fn create_foreign(pool: &ThinPool, id: u32) -> Foreign {
    let id = ThinId::new(id).unwrap();
    pool.create_thin(id).unwrap();
    let dev = pool.activate(id, bytes_to_sectors(64 << 20)).unwrap();
    let sum = common::write_pattern(&dev.devnode, FOREIGN_BYTES, u64::from(id.get()));
    pool.deactivate(id, RemoveMode::Now).unwrap();
    Foreign { id, sum }
}

/// The checksum of the first bytes of thin device `id`.
fn foreign_sum(pool: &ThinPool, id: ThinId) -> String {
    let dev = pool.activate(id, bytes_to_sectors(64 << 20)).unwrap();
    let mut data = vec![0u8; FOREIGN_BYTES];
    use std::io::Read;
    std::fs::File::open(&dev.devnode)
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    pool.deactivate(id, RemoveMode::Now).unwrap();
    common::sha256(&data)
}

/// 50 rounds of Prepare, Commit and Remove; every tenth round the daemon is killed (-9)
/// in the middle of a Prepare and started again. Then gc, check and repair.
async fn churn_with_crashes(d: &mut Daemon) {
    for i in 0..50u32 {
        let mut c = d.client().await;
        let (a, l) = (format!("a{i}"), format!("l{i}"));
        c.prepare(&a, "").await.unwrap();
        c.commit(&l, &a).await.unwrap();
        if i % 2 == 0 {
            c.remove(&l).await.unwrap();
        }
        if i % 10 == 9 {
            let mut c2 = d.client().await;
            let key = format!("killed{i}");
            let req = tokio::spawn(async move { c2.prepare(&key, "").await });
            tokio::time::sleep(Duration::from_millis(20 * u64::from(i / 10))).await;
            d.kill();
            let _ = req.await;
            d.spawn();
        }
    }
    d.cli_ok(&["gc"]);
    assert!(d.stop().unwrap().success());
    let out = d.cli(&["check"]);
    let check = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && check.contains("store and pool agree"),
        "{check}\ndaemon log:\n{}",
        std::fs::read_to_string(d.log()).unwrap_or_default()
    );
    assert!(
        check.contains("not thinsnap's"),
        "foreign ids are noted: {check}"
    );
    d.cli_ok(&["repair"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_foreign_thin_devices_in_a_shared_pool_are_never_touched() {
    let mut d = Daemon::start();
    let mut c = d.client().await;
    c.prepare("warm", "").await.unwrap();
    c.remove("warm").await.unwrap();
    drop(c);
    assert!(d.stop().unwrap().success());
    // Another tool's devices in the same pool, behind thinsnap's back: the ids thinsnap
    // would take next, and one far off.
    let source = Source::Loopback {
        dir: d.dir.path().join("state/pool"),
        data_size: 4 << 30,
        meta_size: 64 << 20,
    };
    let pool = ThinPool::open(&d.pool, &source, &PoolOptions::default()).unwrap();
    let foreign: Vec<Foreign> = [3, 4, 7, 1000]
        .into_iter()
        .map(|id| create_foreign(&pool, id))
        .collect();
    d.spawn();
    churn_with_crashes(&mut d).await;
    let ids = pool.thin_ids().unwrap();
    for f in &foreign {
        assert!(ids.contains(&f.id), "foreign thin id {} is gone", f.id);
        assert_eq!(
            foreign_sum(&pool, f.id),
            f.sum,
            "data of foreign id {}",
            f.id
        );
    }
    // They are the test's to remove: thinsnap's pool destroy would take them along.
    for f in &foreign {
        pool.delete_thin(f.id).unwrap();
    }
    d.spawn();
}

/// A volume group on a loop device, removed with everything in it when dropped.
struct VolumeGroup {
    name: String,
    pv: thinpool::loopback::LoopFile,
    _dir: tempfile::TempDir,
}

impl VolumeGroup {
    fn new() -> VolumeGroup {
        common::require_dm();
        let dir = common::scratch_dir();
        let pv_file = dir.path().join("pv.img");
        thinpool::loopback::create_sparse(&pv_file, 6 << 30).unwrap();
        let pv = thinpool::loopback::attach(&pv_file, false).unwrap();
        let name = format!("tssec{}", std::process::id());
        let pvs = pv.dev_path.display().to_string();
        thinpool::cmd::lvm(&["pvcreate", "-y", &pvs]).unwrap();
        thinpool::cmd::lvm(&["vgcreate", "-y", &name, &pvs]).unwrap();
        VolumeGroup {
            name,
            pv,
            _dir: dir,
        }
    }
}

impl Drop for VolumeGroup {
    fn drop(&mut self) {
        let _ = thinpool::cmd::lvm(&["vgremove", "-y", "-f", &self.name]);
        let _ = thinpool::cmd::lvm(&["pvremove", "-y", &self.pv.dev_path.display().to_string()]);
        let _ = self.pv.detach();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_a_users_thin_lv_in_a_shared_lvm_pool_is_never_touched() {
    let vg = VolumeGroup::new();
    let vgn = vg.name.as_str();
    let lvm = |args: &[&str]| thinpool::cmd::lvm(args).unwrap();
    lvm(&[
        "lvcreate",
        "-y",
        "--type",
        "thin-pool",
        "-L",
        "4G",
        "-n",
        "pool",
        vgn,
    ]);
    // The user's own thin LV, with data in it.
    lvm(&[
        "lvcreate",
        "-y",
        "-T",
        &format!("{vgn}/pool"),
        "-V",
        "1G",
        "-n",
        "user",
    ]);
    let user = devicemapper::DmNameBuf::new(format!("{vgn}-user")).unwrap();
    let info = thinpool::dm::info(&user)
        .unwrap()
        .expect("lvcreate activates the LV");
    let node = thinpool::dm::devnode(info.device()).unwrap();
    let sum = common::write_pattern(&node, FOREIGN_BYTES, 42);

    let pool_lines = format!("source = \"lvm\"\n[pool.lvm]\nvg = \"{vgn}\"\nlv = \"pool\"");
    let mut d = Daemon::start_custom("", Some(&pool_lines));
    churn_with_crashes(&mut d).await;
    d.spawn();
    // Everything thinsnap made goes; the user's LV stays, with its data.
    let mut c = d.client().await;
    for s in c.list(&[]).await.unwrap() {
        c.remove(&s.name).await.unwrap();
    }
    drop(c);
    assert!(d.stop().unwrap().success());
    drop(d);
    let mut data = vec![0u8; FOREIGN_BYTES];
    use std::io::Read;
    std::fs::File::open(&node)
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    assert_eq!(common::sha256(&data), sum, "the user's thin LV's data");
    let lvs = thinpool::cmd::lvm(&["lvs", "--noheadings", "-o", "lv_name", vgn]).unwrap();
    assert!(lvs.split_whitespace().any(|l| l == "user"), "{lvs}");
}
