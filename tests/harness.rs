//! The VM harness's own proof: on real device-mapper, a thin pool on two loop devices, a
//! thin device formatted ext4 and xfs, mounted, written, snapshotted, the snapshot mounted
//! and read, and everything removed with nothing left behind.

mod common;

use common::*;
use thinpool::{units::GIB, FsType, RemoveMode, ThinId};

fn snapshot_round_trip(fs: FsType) {
    let t = TestPool::small();
    let pool = t.pool();
    let origin = ThinId::new(1).unwrap();
    let snap = ThinId::new(2).unwrap();
    let size = thinpool::units::bytes_to_sectors(GIB);

    pool.create_thin(origin).unwrap();
    let dev = pool.activate(origin, size).unwrap();
    assert!(
        dev.devnode.to_string_lossy().starts_with("/dev/dm-"),
        "{}",
        dev.devnode.display()
    );
    fs.mkfs(&dev.devnode, &[]).unwrap();
    let m1 = t.mountpoint("origin");
    thinpool::fs::mount(&dev.devnode, &m1, fs, &["noatime"]).unwrap();
    let sum = write_pattern(&m1.join("file"), 3 << 20, 7);

    // Snapshot while the origin is mounted and active: it is suspended around the message.
    pool.create_snapshot(snap, origin).unwrap();
    let sdev = pool.activate(snap, size).unwrap();
    let m2 = t.mountpoint("snap");
    thinpool::fs::mount(&sdev.devnode, &m2, fs, fs.required_options()).unwrap();
    assert_eq!(
        sha256_file(&m2.join("file")),
        sum,
        "snapshot sees the origin's file"
    );

    // Writes after the snapshot stay apart.
    std::fs::write(m1.join("after"), b"origin only").unwrap();
    std::fs::write(m2.join("snap-only"), b"snapshot only").unwrap();
    assert!(!m2.join("after").exists());
    assert!(!m1.join("snap-only").exists());

    for m in [&m1, &m2] {
        thinpool::fs::umount(m).unwrap();
    }
    for id in [snap, origin] {
        pool.deactivate(id, RemoveMode::Now).unwrap();
        pool.delete_thin(id).unwrap();
    }
    assert!(pool.thin_ids().unwrap().is_empty());
}

#[test]
fn loop_ext4_snapshot_round_trip() {
    snapshot_round_trip(FsType::Ext4);
}

#[test]
fn loop_xfs_snapshot_round_trip() {
    snapshot_round_trip(FsType::Xfs);
}
