//! The engine on a simulated pool: its operations, and recovery after a crash at every
//! crash point (and after a crash during recovery itself), without a kernel. The VM suite
//! (tests/) checks the same against real device-mapper.

use std::{
    collections::{BTreeMap, BTreeSet},
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Once,
};

use thinpool::{FsType, PoolMode, ThinId};

use super::{lock, sim::SimPool, Engine};
use crate::{
    config::Config,
    error::Error,
    failpoint::{self, Crash},
    labels::SIZE_LABEL,
    store::{Kind, State},
};

/// A pool and a state directory that outlive the engines opened on them.
struct World {
    _dir: tempfile::TempDir,
    sim: SimPool,
    config: Config,
}

impl World {
    fn new() -> World {
        // The store fsyncs every commit: in memory where there is a tmpfs, as the engine's
        // tests are about the engine, not the disk.
        let dir = match std::path::Path::new("/dev/shm").is_dir() {
            true => tempfile::tempdir_in("/dev/shm"),
            false => tempfile::tempdir(),
        }
        .unwrap();
        let config = Config::parse(&format!(
            "state_dir = \"{}\"\ndefault_size = \"1G\"\n[pool]\nname = \"sim\"",
            dir.path().display()
        ))
        .unwrap();
        World {
            _dir: dir,
            sim: SimPool::new("sim"),
            config,
        }
    }

    /// An engine on the world's pool and store (as a process start would open them).
    fn engine(&self) -> Engine {
        Engine::with_pool(self.config.clone(), Box::new(self.sim.clone())).unwrap()
    }
}

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs `f` with crash point `point` armed; true when it crashed there. A crash unwinds
/// out of the engine without any cleanup of its own, as a killed process would stop.
fn crashes_at(point: &'static str, f: impl FnOnce()) -> bool {
    static QUIET: Once = Once::new();
    QUIET.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<Crash>() {
                default(info);
            }
        }));
    });
    failpoint::crash_at(Some(point));
    let res = catch_unwind(AssertUnwindSafe(f));
    failpoint::crash_at(None);
    match res {
        Ok(()) => false,
        Err(p) if p.downcast_ref::<Crash>().is_some_and(|c| c.0 == point) => true,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// The store and the pool agree, nothing is half done, and only what live snapshots and
/// mounted volumes need is active or mounted.
fn assert_consistent(w: &World, e: &Engine) {
    let report = e.recover(false).unwrap();
    assert!(report.is_clean(), "check after recovery: {report:?}");
    let r = e.store.read().unwrap();
    let owned: BTreeSet<ThinId> = r
        .thin_ids()
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let in_pool: BTreeSet<ThinId> = super::pool::Pool::thin_ids(&w.sim).unwrap();
    assert_eq!(in_pool, owned, "pool ids vs store ids");
    let mut want_active = BTreeSet::new();
    let mut want_mounts = BTreeSet::new();
    for rec in r.all().unwrap() {
        assert_eq!(rec.device.state, State::Ready, "{rec:?}");
        if rec.kind != Kind::Committed {
            want_active.insert(rec.device.thin_id);
        }
    }
    for b in r.bases().unwrap() {
        assert_eq!(b.device.state, State::Ready, "{b:?}");
    }
    for v in r.volumes().unwrap() {
        assert_eq!(v.device.state, State::Ready, "{v:?}");
        if !v.mounts.is_empty() {
            want_active.insert(v.device.thin_id);
            want_mounts.insert(e.volume_dir(&v.name));
        }
    }
    assert_eq!(w.sim.active_ids(), want_active, "active devices");
    let mounts: BTreeSet<_> = w.sim.mount_table().into_keys().collect();
    assert_eq!(mounts, want_mounts, "mounts");
}

/// An operation a crash test interrupts, with the state it starts from.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// The first Prepare of an empty pool (formats the base device).
    PrepareFirst,
    /// Prepare of a child of committed `l1`, larger than it (grows its filesystem).
    Prepare,
    /// Commit of active `a` (child of `l1`).
    Commit,
    /// Remove of committed leaf `l1`.
    Remove,
    /// A volume larger than the base (grown).
    VolumeCreate,
    /// A volume smaller than the base (a filesystem of its own).
    VolumeCreateSmall,
    /// Resize of volume `v`, mounted, from 1G to 2G.
    VolumeResize,
    /// Remove of unmounted volume `v`.
    VolumeRemove,
    /// Mount of volume `v`.
    VolumeMount,
    /// Unmount of volume `v`'s last mount id.
    VolumeUnmount,
}

impl Op {
    fn setup(self, e: &Engine) {
        match self {
            Op::PrepareFirst => {}
            Op::Prepare | Op::Commit | Op::Remove => {
                e.prepare("l1-a", "", labels(&[])).unwrap();
                e.commit("l1", "l1-a", labels(&[])).unwrap();
                if matches!(self, Op::Commit) {
                    e.prepare("a", "l1", labels(&[])).unwrap();
                }
            }
            Op::VolumeCreate | Op::VolumeCreateSmall => {}
            Op::VolumeRemove | Op::VolumeMount | Op::VolumeUnmount | Op::VolumeResize => {
                e.create_volume("v", labels(&[])).unwrap();
                if matches!(self, Op::VolumeUnmount | Op::VolumeResize) {
                    e.mount_volume("v", "m1").unwrap();
                }
            }
        }
    }

    fn run(self, e: &Engine) {
        let res = match self {
            Op::PrepareFirst => e.prepare("first", "", labels(&[])).map(|_| ()),
            Op::Prepare => e
                .prepare("new", "l1", labels(&[(SIZE_LABEL, "2G")]))
                .map(|_| ()),
            Op::Commit => e.commit("c", "a", labels(&[])),
            Op::Remove => e.remove("l1"),
            Op::VolumeCreate => e.create_volume("v", labels(&[("size", "2G")])).map(|_| ()),
            Op::VolumeCreateSmall => e
                .create_volume("v", labels(&[("size", "200M")]))
                .map(|_| ()),
            Op::VolumeResize => e.resize_volume("v", "2G").map(|_| ()),
            Op::VolumeRemove => e.remove_volume("v"),
            Op::VolumeMount => e.mount_volume("v", "m1").map(|_| ()),
            Op::VolumeUnmount => e.unmount_volume("v", "m1"),
        };
        res.unwrap();
    }

    /// After recovery the operation is either done or absent, and usable either way.
    fn verify(self, w: &World, e: &Engine) {
        fn absent<T>(r: Result<T, Error>) -> bool {
            matches!(r, Err(Error::NotFound(_)))
        }
        match self {
            Op::PrepareFirst => {
                e.prepare("second", "", labels(&[])).unwrap();
            }
            Op::Prepare => {
                if absent(e.stat("new")) {
                    e.prepare("new", "l1", labels(&[(SIZE_LABEL, "2G")]))
                        .unwrap();
                }
                assert_eq!(e.stat("new").unwrap().device.size, 2 << 30);
            }
            Op::Commit => match (e.stat("a"), e.stat("c")) {
                (Ok(_), Err(Error::NotFound(_))) => e.commit("c", "a", labels(&[])).unwrap(),
                (Err(Error::NotFound(_)), Ok(c)) => assert_eq!(c.kind, Kind::Committed),
                (a, c) => panic!("half-committed: {a:?} {c:?}"),
            },
            Op::Remove => {
                if !absent(e.stat("l1")) {
                    e.remove("l1").unwrap();
                }
            }
            Op::VolumeCreate => {
                if absent(e.volume("v")) {
                    e.create_volume("v", labels(&[("size", "2G")])).unwrap();
                }
                assert_eq!(e.volume("v").unwrap().device.size, 2 << 30);
            }
            Op::VolumeCreateSmall => {
                if absent(e.volume("v")) {
                    e.create_volume("v", labels(&[("size", "200M")])).unwrap();
                }
                e.mount_volume("v", "m").unwrap();
                e.unmount_volume("v", "m").unwrap();
                assert_eq!(e.volume("v").unwrap().device.size, 200 << 20);
            }
            Op::VolumeResize => {
                let v = e.volume("v").unwrap();
                if v.device.size != 2 << 30 {
                    assert_eq!(v.device.size, 1 << 30, "{v:?}");
                    e.resize_volume("v", "2G").unwrap();
                }
                let v = e.volume("v").unwrap();
                assert_eq!((v.device.size, v.resize_from), (2 << 30, None), "{v:?}");
                assert_eq!(
                    w.sim.fs_size(v.device.thin_id),
                    2 << 30,
                    "the filesystem fills the device"
                );
                assert!(v.mounts.contains("m1"), "still mounted for m1: {v:?}");
                e.unmount_volume("v", "m1").unwrap();
                e.mount_volume("v", "m2").unwrap();
                e.unmount_volume("v", "m2").unwrap();
                e.remove_volume("v").unwrap();
            }
            Op::VolumeRemove => {
                if !absent(e.volume("v")) {
                    e.remove_volume("v").unwrap();
                }
            }
            Op::VolumeMount | Op::VolumeUnmount => {
                e.mount_volume("v", "m2").unwrap();
                e.unmount_volume("v", "m2").unwrap();
                e.unmount_volume("v", "m1").unwrap();
                e.remove_volume("v").unwrap();
            }
        }
    }
}

/// The operation that reaches each crash point, and for the points only recovery reaches,
/// the crash that leaves it work to do first.
fn scenario(point: &'static str) -> (Op, Option<&'static str>) {
    let op = |name: &str| match name {
        "create" | "undo-create" => Op::Prepare,
        "base" | "undo-base" => Op::PrepareFirst,
        "commit" => Op::Commit,
        "remove" => Op::Remove,
        "volume" | "undo-volume" => Op::VolumeCreate,
        "volume-remove" => Op::VolumeRemove,
        "volume-resize" => Op::VolumeResize,
        "volume-mount" => Op::VolumeMount,
        "volume-unmount" => Op::VolumeUnmount,
        other => panic!("no scenario for crash points of {other}"),
    };
    if point == "volume.after-mkfs" {
        return (Op::VolumeCreateSmall, None);
    }
    let name = point.split('.').next().unwrap();
    let first = match name {
        "undo-create" => Some("create.after-intent"),
        "undo-base" => Some("base.after-mkfs"),
        "undo-volume" => Some("volume.after-grow"),
        _ => None,
    };
    (op(name), first)
}

/// What a daemon's start does to the engine: reconcile, then reclaim the devices of
/// removed snapshots (its workers do that in the background; here it is waited for).
fn start(e: &Engine) -> super::Report {
    let report = e.recover(true).unwrap();
    e.cleanup().unwrap();
    report
}

/// Crashes at `point` (after `first`, when only recovery reaches it), recovers in a new
/// engine, and checks the result.
fn crash_and_recover(point: &'static str) {
    let w = World::new();
    let (op, first) = scenario(point);
    {
        let e = w.engine();
        op.setup(&e);
        let reached = match first {
            None => crashes_at(point, || op.run(&e)),
            Some(f) => {
                assert!(crashes_at(f, || op.run(&e)), "{f} not reached");
                drop(e);
                let e = w.engine();
                crashes_at(point, || {
                    start(&e);
                })
            }
        };
        assert!(reached, "crash point {point} not reached by {op:?}");
    }
    let e = w.engine();
    let report = start(&e);
    assert!(report.problems.is_empty(), "{point}: {report:?}");
    assert_consistent(&w, &e);
    op.verify(&w, &e);
    assert_consistent(&w, &e);
}

#[test]
fn a_prepare_interrupted_after_its_device_was_made_is_finished() {
    for point in [
        "create.after-message",
        "create.after-activate",
        "create.after-ready",
    ] {
        let w = World::new();
        {
            let e = w.engine();
            Op::Prepare.setup(&e);
            assert!(crashes_at(point, || Op::Prepare.run(&e)), "{point}");
        }
        let e = w.engine();
        start(&e);
        let r = e.stat("new").unwrap();
        assert_eq!(
            (r.device.state, r.device.size),
            (State::Ready, 2 << 30),
            "{point}"
        );
        assert!(w.sim.active_ids().contains(&r.device.thin_id), "{point}");
        assert_consistent(&w, &e);
    }
}

#[test]
fn recovery_after_a_crash_at_every_crash_point() {
    for point in failpoint::POINTS {
        crash_and_recover(point);
    }
}

/// Recovery itself crashes while finishing an interrupted removal, at each of its steps,
/// and the next recovery finishes it.
#[test]
fn recovery_survives_crashes_of_its_own() {
    for (first, op, again) in [
        ("remove.after-mark", Op::Remove, "remove.after-discard"),
        ("remove.after-mark", Op::Remove, "remove.after-deactivate"),
        ("remove.after-discard", Op::Remove, "remove.after-message"),
        ("remove.after-mark", Op::Remove, "remove.after-store"),
        (
            "volume-remove.after-mark",
            Op::VolumeRemove,
            "volume-remove.after-message",
        ),
        (
            "volume.after-grow",
            Op::VolumeCreate,
            "undo-volume.after-message",
        ),
        (
            "volume.after-mkfs",
            Op::VolumeCreateSmall,
            "undo-volume.after-message",
        ),
        (
            "volume-resize.after-reload",
            Op::VolumeResize,
            "volume-resize.after-grow",
        ),
    ] {
        let w = World::new();
        {
            let e = w.engine();
            op.setup(&e);
            assert!(crashes_at(first, || op.run(&e)));
        }
        {
            let e = w.engine();
            let crashed = crashes_at(again, || {
                start(&e);
            });
            assert!(crashed, "recovery after {first} did not reach {again}");
        }
        let e = w.engine();
        start(&e);
        assert_consistent(&w, &e);
        op.verify(&w, &e);
    }
}

#[test]
fn prepare_commit_view_remove() {
    let w = World::new();
    let e = w.engine();
    let m = e.prepare("a", "", labels(&[])).unwrap();
    assert_eq!(m[0].fs, "ext4");
    assert!(!m[0].options.contains(&"ro".to_string()));
    e.commit("l1", "a", labels(&[])).unwrap();
    assert!(matches!(e.stat("a"), Err(Error::NotFound(_))));
    let v = e.view("v", "l1", labels(&[])).unwrap();
    assert!(v[0].options.contains(&"ro".to_string()));
    assert!(matches!(e.remove("l1"), Err(Error::FailedPrecondition(_))));
    e.remove("v").unwrap();
    e.remove("l1").unwrap();
    assert!(e.walk(&[]).unwrap().is_empty());
    assert_eq!(
        w.sim.log().iter().filter(|l| l.starts_with("mkfs")).count(),
        1
    );
    assert_consistent(&w, &e);
}

#[test]
fn no_snapshot_carries_mkfs_lost_found() {
    let w = World::new();
    let e = w.engine();
    e.prepare("a", "", labels(&[])).unwrap();
    let base = e.store.read().unwrap().base(FsType::Ext4).unwrap().unwrap();
    let a = e.stat("a").unwrap().device.thin_id;
    assert!(base.lost_found_removed);
    assert!(!w.sim.has_lost_found(base.device.thin_id), "base");
    assert!(!w.sim.has_lost_found(a), "snapshot of a fresh base");

    // A base device made by an earlier version: tidied at the next start; snapshots made
    // from it keep theirs (it may hold an image's own files there).
    w.sim.add_lost_found(base.device.thin_id);
    w.sim.add_lost_found(a);
    let mut tx = e.store.write().unwrap();
    tx.put_base(&crate::store::Base::new(base.device)).unwrap();
    tx.commit().unwrap();
    drop(e);
    let e = w.engine();
    let report = e.recover(true).unwrap();
    assert!(
        report
            .actions
            .iter()
            .any(|l| l.contains("remove lost+found")),
        "{report:?}"
    );
    assert!(!w.sim.has_lost_found(base.device.thin_id), "old base");
    assert!(w.sim.has_lost_found(a), "snapshots are left alone");
    let tidy = e.store.read().unwrap().base(FsType::Ext4).unwrap().unwrap();
    assert!(tidy.lost_found_removed);
    assert!(e.recover(true).unwrap().actions.is_empty(), "once");
    assert_consistent(&w, &e);
}

#[test]
fn sizes_beyond_the_maximum_are_refused_before_anything_is_made() {
    let w = World::new();
    let e = w.engine();
    // The simulated pool has 100 GiB of data space; overcommit is 10.
    for size in ["1001G", "16T", "18000000000000000000"] {
        let err = e
            .prepare("a", "", labels(&[(SIZE_LABEL, size)]))
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("largest size allowed")),
            "{size}: {err}"
        );
        let err = e.create_volume("v", labels(&[("size", size)])).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{size}: {err}");
    }
    // Zero and negative sizes, as labels and as volume options.
    for (size, why) in [("0", "more than zero"), ("-1G", "cannot be negative")] {
        let err = e
            .prepare("a", "", labels(&[(SIZE_LABEL, size)]))
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains(why)),
            "{size}: {err}"
        );
        let err = e.create_volume("v", labels(&[("size", size)])).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains(why)),
            "{size}: {err}"
        );
    }
    assert!(w.sim.log().is_empty(), "nothing made: {:?}", w.sim.log());
    e.prepare("a", "", labels(&[(SIZE_LABEL, "1000G")]))
        .unwrap();
    assert_consistent(&w, &e);
}

/// A volume smaller than the base device gets a filesystem of its own, sized as asked;
/// one at least as large is a snapshot of the base; clones of either are snapshots. The
/// base device is made only when a volume needs it.
#[test]
fn volumes_of_any_size_from_the_filesystem_minimum() {
    let w = World::new();
    let e = w.engine();
    let small = e
        .create_volume("small", labels(&[("size", "200M")]))
        .unwrap();
    assert_eq!(small.device.size, 200 << 20);
    assert_eq!(w.sim.fs_size(small.device.thin_id), 200 << 20);
    assert!(
        e.store.read().unwrap().bases().unwrap().is_empty(),
        "no base device for a volume that does not start from it"
    );
    let log = w.sim.log();
    let id = small.device.thin_id;
    assert!(log.contains(&format!("create_thin {id}")), "{log:?}");
    assert!(!w.sim.has_lost_found(id), "no lost+found in a new volume");
    let tiny = e.create_volume("tiny", labels(&[("size", "16M")])).unwrap();
    assert_eq!(w.sim.fs_size(tiny.device.thin_id), 16 << 20);
    let x = e
        .create_volume("x", labels(&[("size", "300M"), ("fs", "xfs")]))
        .unwrap();
    assert_eq!(x.device.fs, FsType::Xfs);
    for (opts, min) in [
        (&[("size", "15M")][..], "smallest ext4 filesystem, 16 MiB"),
        (
            &[("size", "299M"), ("fs", "xfs")][..],
            "smallest xfs filesystem, 300 MiB",
        ),
    ] {
        let err = e.create_volume("no", labels(opts)).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains(min)),
            "{opts:?}: {err}"
        );
    }

    // At least the base's size (1G here): a snapshot of the base, made now.
    let big = e.create_volume("big", labels(&[("size", "1G")])).unwrap();
    let base = e.store.read().unwrap().base(FsType::Ext4).unwrap().unwrap();
    assert!(w.sim.log().contains(&format!(
        "create_snapshot {} {}",
        big.device.thin_id, base.device.thin_id
    )));

    // Clones of a small volume, at its size and larger, keep its filesystem.
    let c = e.create_volume("c", labels(&[("from", "small")])).unwrap();
    assert_eq!(c.device.size, 200 << 20);
    let c2 = e
        .create_volume("c2", labels(&[("from", "small"), ("size", "300M")]))
        .unwrap();
    assert_eq!(w.sim.fs_size(c2.device.thin_id), 300 << 20);
    for v in ["small", "c", "c2", "tiny", "x", "big"] {
        e.mount_volume(v, "m").unwrap();
        e.unmount_volume(v, "m").unwrap();
        e.remove_volume(v).unwrap();
    }
    assert_consistent(&w, &e);
}

/// Volumes grow, mounted or not, to the size asked (the filesystem with them); they do
/// not shrink; a grow that fails stays pending and is finished by asking again.
#[test]
fn volumes_grow_online_and_offline_but_never_shrink() {
    let w = World::new();
    let e = w.engine();
    e.create_volume("on", labels(&[])).unwrap();
    e.create_volume("off", labels(&[("size", "200M")])).unwrap();
    e.mount_volume("on", "c").unwrap();
    for (name, size, bytes) in [("on", "3G", 3u64 << 30), ("off", "1GB", 1 << 30)] {
        let r = e.resize_volume(name, size).unwrap();
        let v = e.volume(name).unwrap();
        assert_eq!(
            (r.volume.device.size, v.device.size),
            (bytes, bytes),
            "{name}"
        );
        assert_eq!(v.resize_from, None);
        assert_eq!(
            w.sim.fs_size(v.device.thin_id),
            bytes,
            "{name}'s filesystem"
        );
    }
    assert!(
        w.sim.mount_table().contains_key(&e.volume_dir("on")),
        "still mounted"
    );
    assert!(!w
        .sim
        .active_ids()
        .contains(&e.volume("off").unwrap().device.thin_id));
    assert!(!w.sim.mount_table().contains_key(&e.volume_dir("off")));
    // The same size again changes nothing.
    let before = w.sim.log().len();
    assert_eq!(e.resize_volume("on", "3G").unwrap().previous, 3 << 30);
    assert_eq!(w.sim.log().len(), before, "no kernel step");
    for (name, size, why) in [
        ("on", "2G", "cannot shrink to 2 GiB"),
        ("on", "0", "more than zero"),
        ("on", "2000G", "largest size allowed"),
        ("on", "lots", "expected a number"),
        ("../x", "4G", "is not valid"),
    ] {
        let err = e.resize_volume(name, size).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains(why)),
            "{name} {size}: {err}"
        );
    }
    assert!(matches!(
        e.resize_volume("nope", "4G"),
        Err(Error::NotFound(_))
    ));
    assert_eq!(
        w.sim.log().len(),
        before,
        "no kernel step for a refused resize"
    );

    // A grow that fails stays pending: the device has the new size, the filesystem not
    // yet; asking again finishes it.
    w.sim.fail_next("grow_mounted", nix::errno::Errno::EIO);
    assert!(e.resize_volume("on", "4G").is_err());
    let v = e.volume("on").unwrap();
    assert_eq!((v.device.size, v.resize_from), (4 << 30, Some(3 << 30)));
    assert_eq!(w.sim.fs_size(v.device.thin_id), 3 << 30);
    let r = e.resize_volume("on", "4G").unwrap();
    assert_eq!((r.previous, r.volume.resize_from), (3 << 30, None));
    assert_eq!(w.sim.fs_size(v.device.thin_id), 4 << 30);
    e.unmount_volume("on", "c").unwrap();
    assert_consistent(&w, &e);
}

#[test]
fn bad_requests_change_nothing() {
    let w = World::new();
    let e = w.engine();
    e.prepare("a", "", labels(&[])).unwrap();
    let before = w.sim.log().len();
    assert!(matches!(
        e.prepare("a", "", labels(&[])),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        e.prepare("b", "a", labels(&[])),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        e.prepare("b", "nope", labels(&[])),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        e.prepare("b", "", labels(&[(SIZE_LABEL, "lots")])),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        e.commit("c", "nope", labels(&[])),
        Err(Error::NotFound(_))
    ));
    assert_eq!(
        w.sim.log().len(),
        before,
        "no kernel step for a bad request"
    );
    assert_consistent(&w, &e);
}

#[test]
fn a_failed_kernel_step_rolls_the_create_back() {
    let w = World::new();
    let e = w.engine();
    e.prepare("a", "", labels(&[])).unwrap();
    e.commit("l1", "a", labels(&[])).unwrap();
    for op in ["create_snapshot", "activate", "grow_unmounted"] {
        w.sim.fail_next(op, nix::errno::Errno::EIO);
        let err = e
            .prepare("b", "l1", labels(&[(SIZE_LABEL, "2G")]))
            .unwrap_err();
        assert!(err.to_string().contains("injected"), "{op}: {err}");
        assert!(matches!(e.stat("b"), Err(Error::NotFound(_))), "{op}");
        assert_consistent(&w, &e);
    }
}

#[test]
fn a_busy_device_is_not_removed_and_its_record_stays() {
    let w = World::new();
    let e = w.engine();
    let m = e.prepare("a", "", labels(&[])).unwrap();
    super::pool::Pool::mount(
        &w.sim,
        &m[0].source,
        std::path::Path::new("/mnt/x"),
        thinpool::FsType::Ext4,
        &[],
    )
    .unwrap();
    assert!(matches!(e.remove("a"), Err(Error::FailedPrecondition(_))));
    assert_eq!(e.stat("a").unwrap().device.state, State::Ready);
    super::pool::Pool::umount(&w.sim, std::path::Path::new("/mnt/x")).unwrap();
    e.remove("a").unwrap();
    assert_consistent(&w, &e);
}

#[test]
fn only_devices_that_wrote_blocks_of_their_own_are_discarded_before_delete() {
    let w = World::new();
    let e = w.engine();
    e.prepare("a", "", labels(&[])).unwrap();
    e.commit("written", "a", labels(&[])).unwrap();
    e.prepare("b", "written", labels(&[])).unwrap();
    let untouched = e.stat("b").unwrap().device.thin_id;
    e.commit("untouched", "b", labels(&[])).unwrap();
    e.prepare("c", "untouched", labels(&[])).unwrap();
    let c = e.stat("c").unwrap().device.thin_id;
    w.sim.write(c, 1 << 20);
    let discards = || {
        w.sim
            .log()
            .into_iter()
            .filter(|l| l.starts_with("discard"))
            .count()
    };
    let before = discards();
    // A container's layer that wrote data: discarded, then deleted.
    e.remove("c").unwrap();
    e.cleanup().unwrap();
    assert!(!w.sim.holds(c));
    assert_eq!(discards(), before + 1, "c wrote 1 MiB: {:?}", w.sim.log());
    // A layer that never wrote a block of its own: deleted without a discard.
    e.remove("untouched").unwrap();
    e.cleanup().unwrap();
    assert!(!w.sim.holds(untouched));
    assert_eq!(
        discards(),
        before + 1,
        "nothing to discard: {:?}",
        w.sim.log()
    );
    assert_consistent(&w, &e);
}

#[test]
fn remove_frees_the_key_at_once_and_workers_reclaim_the_device() {
    let w = World::new();
    let e = std::sync::Arc::new(w.engine());
    e.start_reclaiming(2).unwrap();
    e.prepare("a", "", labels(&[])).unwrap();
    e.commit("l", "a", labels(&[])).unwrap();
    let id = e.stat("l").unwrap().device.thin_id;
    e.remove("l").unwrap();
    assert!(matches!(e.stat("l"), Err(Error::NotFound(_))));
    // The key can be taken again at once, by a new snapshot with a new device.
    e.prepare("l", "", labels(&[])).unwrap();
    assert_ne!(e.stat("l").unwrap().device.thin_id, id);
    // Cleanup waits for the workers: then the device is gone.
    e.cleanup().unwrap();
    assert!(!w.sim.holds(id), "reclaimed");
    assert_eq!(e.counts().unwrap().reclaiming, 0);
    e.stop_reclaiming(std::time::Duration::from_secs(5));
    assert_consistent(&w, &e);
}

#[test]
fn async_removal_leaves_the_work_to_cleanup() {
    let w = World::new();
    let mut config = w.config.clone();
    config.async_remove = true;
    let e = Engine::with_pool(config, Box::new(w.sim.clone())).unwrap();
    e.prepare("a", "", labels(&[])).unwrap();
    let id = e.stat("a").unwrap().device.thin_id;
    let before = w.sim.log().len();
    e.remove("a").unwrap();
    assert_eq!(
        w.sim.log().len(),
        before,
        "Remove itself changes nothing in the pool"
    );
    assert!(matches!(e.stat("a"), Err(Error::NotFound(_))));
    assert!(w.sim.holds(id), "the device waits for Cleanup");
    assert_eq!(e.cleanup().unwrap(), 1);
    assert!(!w.sim.holds(id));
    assert_consistent(&w, &e);
}

#[test]
fn a_read_only_pool_refuses_new_snapshots() {
    let w = World::new();
    let e = w.engine();
    w.sim.set_mode(PoolMode::ReadOnly);
    let before = w.sim.log().len();
    let err = e.prepare("a", "", labels(&[])).unwrap_err();
    assert_eq!(err.kind(), crate::error::ErrorKind::Unavailable, "{err}");
    // The check runs alongside the intent's commit: the intent is dropped again, and the
    // pool was not changed.
    assert!(
        !w.sim.log()[before..]
            .iter()
            .any(|s| s.starts_with("create")),
        "{:?}",
        &w.sim.log()[before..]
    );
    assert!(matches!(e.stat("a"), Err(Error::NotFound(_))));
    assert_consistent(&w, &e);
    w.sim.set_mode(PoolMode::ReadWrite);
    e.prepare("a", "", labels(&[])).unwrap();
    assert_consistent(&w, &e);
}

/// Commit measures an active snapshot's device with one reading; one it finds inactive
/// (deactivated behind the daemon's back) is activated to be measured, then committed.
#[test]
fn commit_measures_a_device_found_inactive() {
    let w = World::new();
    let e = w.engine();
    // The same snapshot measured as it is (active): what the base's blocks count.
    e.prepare("b", "", labels(&[])).unwrap();
    e.commit("cb", "b", labels(&[])).unwrap();
    let shared = e.stat("cb").unwrap().usage.unwrap().bytes;
    e.prepare("a", "", labels(&[])).unwrap();
    let id = e.stat("a").unwrap().device.thin_id;
    w.sim.write(id, 3 << 20);
    super::pool::Pool::deactivate(&w.sim, id, thinpool::RemoveMode::Now).unwrap();
    e.commit("c", "a", labels(&[])).unwrap();
    let info = e.stat("c").unwrap();
    assert_eq!(info.usage.map(|u| u.bytes), Some(shared + (3 << 20)));
    assert!(
        !w.sim.active_ids().contains(&id),
        "a committed device is inactive"
    );
    assert_consistent(&w, &e);
}

/// Another tool's thin devices in the pool (a shared or LVM pool, or a store restored from
/// an older copy) are never allocated, deleted or counted as a problem.
#[test]
fn foreign_thin_ids_are_never_touched() {
    let w = World::new();
    let id = |n| ThinId::new(n).unwrap();
    // Where the allocator starts, and one it will reach.
    w.sim.create_foreign(id(1), 7);
    w.sim.create_foreign(id(3), 7);
    let e = w.engine();
    let report = e.recover(true).unwrap();
    assert!(
        report.problems.is_empty() && report.actions.is_empty(),
        "{report:?}"
    );
    assert_eq!(report.notes.len(), 1, "{report:?}");
    for n in 0..6 {
        e.prepare(&format!("a{n}"), "", labels(&[])).unwrap();
    }
    assert!(w.sim.holds(id(1)) && w.sim.holds(id(3)));
    // An id the engine did not know was taken (not seeded: a create meets EEXIST).
    let next = e.stat("a5").unwrap().device.thin_id.get() + 1;
    w.sim.create_foreign(id(next), 7);
    w.sim.create_foreign(id(next + 1), 7);
    for n in 6..10 {
        e.prepare(&format!("a{n}"), "", labels(&[])).unwrap();
    }
    for n in 0..10 {
        e.remove(&format!("a{n}")).unwrap();
    }
    e.gc(false).unwrap();
    e.recover(true).unwrap();
    for n in [1, 3, next, next + 1] {
        assert!(w.sim.holds(id(n)), "foreign id {n} was deleted");
    }
    let log = w.sim.log();
    for n in [1, 3, next, next + 1] {
        assert!(
            !log.iter()
                .any(|l| l == &format!("delete_thin {n}") || l == &format!("activate {n}")),
            "foreign id {n} was touched: {log:?}"
        );
    }
}

/// gc in a loop while 16 clients prepare, commit, view and remove: no request fails for
/// any reason but the ones its own race explains, gc never touches an operation in
/// flight, and the store and pool agree afterwards.
#[test]
fn gc_in_a_loop_under_load_touches_nothing_in_flight() {
    let w = World::new();
    let e = std::sync::Arc::new(w.engine());
    e.prepare("base-a", "", labels(&[])).unwrap();
    e.commit("base", "base-a", labels(&[])).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (e, stop) = (e.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (report, _) = e.gc(false).unwrap();
                assert!(report.problems.is_empty(), "gc: {report:?}");
                assert!(
                    !report.notes.iter().any(|n| n.contains("not thinsnap's")),
                    "nothing here is foreign: {report:?}"
                );
                runs += 1;
            }
            runs
        })
    };
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let e = e.clone();
            std::thread::spawn(move || {
                for i in 0..20 {
                    let key = format!("c{c}-{i}");
                    e.prepare(&key, "base", labels(&[])).unwrap();
                    if i % 3 == 0 {
                        e.remove(&key).unwrap();
                        continue;
                    }
                    let name = format!("{key}-done");
                    e.commit(&name, &key, labels(&[])).unwrap();
                    let view = format!("{key}-view");
                    e.view(&view, &name, labels(&[])).unwrap();
                    e.remove(&view).unwrap();
                    e.remove(&name).unwrap();
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = gc.join().unwrap();
    assert!(runs > 0);
    assert!(lock(&e.live).is_empty(), "nothing is left in flight");
    assert_eq!(e.walk(&[]).unwrap().len(), 1, "only the base layer is left");
    assert_consistent(&w, &e);
}

#[test]
fn a_kept_snapshot_is_not_removed_until_containerd_takes_it_over() {
    use crate::labels::{KEEP_LABEL, REF_LABEL};
    let w = World::new();
    let e = w.engine();
    e.prepare("a", "", labels(&[])).unwrap();
    let keep = labels(&[(KEEP_LABEL, "docker-devicemapper")]);
    e.commit("sha256:l1", "a", keep.clone()).unwrap();
    e.prepare("b", "sha256:l1", labels(&[])).unwrap();
    e.commit("docker/container/c", "b", keep).unwrap();

    // containerd's garbage collector removes what its metadata does not name: refused, in
    // the one way the collector passes over (FailedPrecondition), and nothing changes.
    match e.remove("docker/container/c") {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains("is kept"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(e.walk(&[]).unwrap().len(), 2);

    // A pull that finds the layer by its chain id takes it over: no longer kept.
    let err = e
        .prepare(
            "extract-1 sha256:l1",
            "",
            labels(&[(REF_LABEL, "sha256:l1")]),
        )
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err:?}");
    assert!(!e.stat("sha256:l1").unwrap().labels.contains_key(KEEP_LABEL));
    assert!(e.stat("extract-1 sha256:l1").is_err(), "nothing was made");
    // The container's snapshot is removed once its label is (thinsnap snapshot rm).
    e.update(
        "docker/container/c",
        labels(&[]),
        &[format!("labels.{KEEP_LABEL}")],
    )
    .unwrap();
    e.remove("docker/container/c").unwrap();
    e.remove("sha256:l1").unwrap();
    assert!(e.walk(&[]).unwrap().is_empty());
    assert_consistent(&w, &e);
}

#[test]
fn usage_is_exclusive_and_one_reading_serves_many_calls() {
    let w = World::new();
    let e = w.engine();
    e.prepare("a", "", labels(&[])).unwrap();
    let a = e.usage("a").unwrap();
    // The sim's snapshot shares all its base's blocks (mkfs wrote them).
    assert_eq!(a.exclusive_bytes, 0, "{a:?}");
    assert!(a.mapped_bytes > 0, "{a:?}");
    let reads = w.sim.mapping_reads();
    assert_eq!(reads, 1);
    e.commit("l1", "a", labels(&[])).unwrap();
    // A committed snapshot's figure is final: it comes from a reading after the commit.
    e.usage("l1").unwrap();
    let reads = reads + 1;
    assert_eq!(w.sim.mapping_reads(), reads);
    e.usage("l1").unwrap();
    assert_eq!(
        w.sim.mapping_reads(),
        reads,
        "answered from the same reading"
    );
    // A snapshot newer than the reading makes a new one.
    e.prepare("b", "l1", labels(&[])).unwrap();
    assert_eq!(e.usage("b").unwrap().exclusive_bytes, 0);
    assert_eq!(w.sim.mapping_reads(), reads + 1);
    assert!(matches!(e.usage("missing"), Err(Error::NotFound(_))));
    // Older than a second, the reading still answers, and a new one starts behind it.
    std::thread::sleep(super::USAGE_MAX_AGE);
    e.usage("b").unwrap();
    let start = std::time::Instant::now();
    while w.sim.mapping_reads() < reads + 2 {
        assert!(
            start.elapsed().as_secs() < 10,
            "no reading in the background"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // People get a reading made for them, with what only each snapshot maps now.
    let now = e.usage_now(&["b".to_string(), "l1".to_string()]).unwrap();
    assert_eq!(now.len(), 2);
    assert!(w.sim.mapping_reads() >= reads + 3);
}
