//! Real-dm tests of thin devices: create, snapshot, activate, resize, deactivate, delete,
//! a 50-level snapshot chain, busy devices, listing ids from the pool's metadata.

mod common;

use std::collections::BTreeSet;

use common::*;
use thinpool::{
    units::{bytes_to_sectors, GIB, MIB},
    Error, FsType, RemoveMode, ThinId,
};

fn id(n: u32) -> ThinId {
    ThinId::new(n).unwrap()
}

#[test]
fn loop_create_activate_deactivate_delete() {
    let t = TestPool::small();
    let pool = t.pool();
    pool.create_thin(id(1)).unwrap();
    assert!(!pool.is_active(id(1)).unwrap());
    let dev = pool.activate(id(1), bytes_to_sectors(GIB)).unwrap();
    assert_eq!(dev.name.to_string(), format!("thinsnap-{}-1", t.name));
    assert_eq!(thinpool::dm::block_size_bytes(&dev.devnode).unwrap(), GIB);
    // Activating again returns the same device.
    assert_eq!(pool.activate(id(1), bytes_to_sectors(GIB)).unwrap(), dev);
    assert_eq!(pool.active_thins().unwrap().len(), 1);
    pool.deactivate(id(1), RemoveMode::Now).unwrap();
    pool.deactivate(id(1), RemoveMode::Now).unwrap(); // idempotent
    assert!(!pool.is_active(id(1)).unwrap());
    pool.delete_thin(id(1)).unwrap();
    pool.delete_thin(id(1)).unwrap(); // idempotent
    assert!(pool.thin_ids().unwrap().is_empty());
}

#[test]
fn loop_duplicate_ids_are_refused() {
    let t = TestPool::small();
    let pool = t.pool();
    pool.create_thin(id(1)).unwrap();
    let err = pool.create_thin(id(1)).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    let err = pool.create_snapshot(id(1), id(1)).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
}

#[test]
fn loop_snapshot_of_missing_origin_fails_and_leaks_nothing() {
    let t = TestPool::small();
    let pool = t.pool();
    let err = pool.create_snapshot(id(2), id(99)).unwrap_err();
    assert!(err.errno().is_some(), "{err}");
    assert!(pool.thin_ids().unwrap().is_empty());
}

#[test]
fn loop_activating_a_missing_id_fails_and_leaks_no_device() {
    let t = TestPool::small();
    let pool = t.pool();
    let err = pool.activate(id(42), bytes_to_sectors(GIB)).unwrap_err();
    assert!(matches!(err, Error::Dm { .. }), "{err}");
    assert!(dm_devices_of(&t.name).iter().all(|n| n.ends_with("-pool")));
}

#[test]
fn loop_snapshot_chain_50_levels_keeps_every_level() {
    let t = TestPool::small();
    let pool = t.pool();
    let size = bytes_to_sectors(GIB);
    let m = t.mountpoint("m");
    pool.create_thin(id(1)).unwrap();
    let dev = pool.activate(id(1), size).unwrap();
    FsType::Ext4.mkfs(&dev.devnode, &[]).unwrap();
    pool.deactivate(id(1), RemoveMode::Now).unwrap();
    let mut sums = Vec::new();
    for level in 1..=50u32 {
        let dev = pool.activate(id(level), size).unwrap();
        thinpool::fs::mount(&dev.devnode, &m, FsType::Ext4, &[] as &[&str]).unwrap();
        sums.push(write_pattern(
            &m.join(format!("level-{level}")),
            64 << 10,
            level as u64,
        ));
        thinpool::fs::umount(&m).unwrap();
        pool.deactivate(id(level), RemoveMode::Now).unwrap();
        if level < 50 {
            pool.create_snapshot(id(level + 1), id(level)).unwrap();
        }
    }
    for level in 1..=50u32 {
        let dev = pool.activate(id(level), size).unwrap();
        thinpool::fs::mount(&dev.devnode, &m, FsType::Ext4, &["ro"]).unwrap();
        for l in 1..=50u32 {
            let f = m.join(format!("level-{l}"));
            if l <= level {
                assert_eq!(
                    sha256_file(&f),
                    sums[l as usize - 1],
                    "level {level} file {l}"
                );
            } else {
                assert!(!f.exists(), "level {level} must not see level {l}");
            }
        }
        thinpool::fs::umount(&m).unwrap();
        pool.deactivate(id(level), RemoveMode::Now).unwrap();
    }
    assert_eq!(pool.thin_ids().unwrap().len(), 50);
}

#[test]
fn loop_busy_device_refuses_deactivation_clearly() {
    let t = TestPool::small();
    let pool = t.pool();
    pool.create_thin(id(1)).unwrap();
    let dev = pool.activate(id(1), bytes_to_sectors(GIB)).unwrap();
    FsType::Ext4.mkfs(&dev.devnode, &[]).unwrap();
    let m = t.mountpoint("busy");
    thinpool::fs::mount(&dev.devnode, &m, FsType::Ext4, &[] as &[&str]).unwrap();

    let err = pool.deactivate(id(1), RemoveMode::Now).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("thinsnap-{}-1", t.name)), "{text}");
    assert!(
        text.contains("mounted at") && text.contains(&m.display().to_string()),
        "{text}"
    );
    let err = pool.delete_thin(id(1)).unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    assert!(pool.is_active(id(1)).unwrap());
    assert!(
        pool.thin_ids().unwrap().contains(&id(1)),
        "nothing was deleted"
    );

    // Deferred removal succeeds now and takes effect at unmount.
    pool.deactivate(id(1), RemoveMode::Deferred).unwrap();
    assert!(pool.is_active(id(1)).unwrap());
    thinpool::fs::umount(&m).unwrap();
    // The kernel runs deferred removals from a work queue, just after the last close.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pool.is_active(id(1)).unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "deferred removal never happened"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn loop_snapshot_of_an_inactive_origin() {
    let t = TestPool::small();
    let pool = t.pool();
    pool.create_thin(id(1)).unwrap();
    let dev = pool.activate(id(1), bytes_to_sectors(GIB)).unwrap();
    write_direct(&dev.devnode, 0, 4 * MIB).unwrap();
    pool.deactivate(id(1), RemoveMode::Now).unwrap();
    pool.create_snapshot(id(2), id(1)).unwrap();
    assert!(!pool.is_active(id(1)).unwrap(), "the origin stays inactive");
    pool.activate(id(2), bytes_to_sectors(GIB)).unwrap();
    let usage = pool.thin_usage(id(2)).unwrap();
    assert_eq!(
        thinpool::units::sectors_to_bytes(usage.mapped),
        4 * MIB,
        "shares the origin's blocks"
    );
    assert_eq!(
        pool.status().unwrap().data_used_bytes(),
        4 * MIB,
        "no copy was made"
    );
}

fn resize_and_grow(fs: FsType) {
    let t = TestPool::small();
    let pool = t.pool();
    pool.create_thin(id(1)).unwrap();
    let dev = pool.activate(id(1), bytes_to_sectors(512 * MIB)).unwrap();
    fs.mkfs(&dev.devnode, &[]).unwrap();
    let m = t.mountpoint("g");
    thinpool::fs::mount(&dev.devnode, &m, fs, fs.required_options()).unwrap();
    let small = fs_size(&m);
    pool.resize_thin(id(1), bytes_to_sectors(GIB + 512 * MIB))
        .unwrap();
    assert_eq!(
        thinpool::dm::block_size_bytes(&dev.devnode).unwrap(),
        GIB + 512 * MIB
    );
    thinpool::fs::grow_mounted(fs, &dev.devnode, &m).unwrap();
    let big = fs_size(&m);
    assert!(big > small * 2, "{fs}: {small} -> {big}");
    thinpool::fs::umount(&m).unwrap();

    // Growing an unmounted filesystem mounts it privately.
    pool.resize_thin(id(1), bytes_to_sectors(2 * GIB)).unwrap();
    thinpool::fs::grow_unmounted(fs, &dev.devnode).unwrap();
    thinpool::fs::mount(&dev.devnode, &m, fs, fs.required_options()).unwrap();
    assert!(fs_size(&m) > big, "{fs}");
}

#[test]
fn loop_thin_resize_and_ext4_grow() {
    resize_and_grow(FsType::Ext4);
}

#[test]
fn loop_thin_resize_and_xfs_grow() {
    resize_and_grow(FsType::Xfs);
}

#[test]
fn loop_thin_ids_are_read_from_pool_metadata() {
    let t = TestPool::small();
    let pool = t.pool();
    // 400 ids span several btree leaves and an internal node.
    let mut want = BTreeSet::new();
    for n in (0..400u32).map(|i| i * 7 + 3).chain([0, ThinId::MAX]) {
        pool.create_thin(id(n)).unwrap();
        want.insert(id(n));
    }
    assert_eq!(pool.thin_ids().unwrap(), want);
    pool.delete_thin(id(3)).unwrap();
    want.remove(&id(3));
    assert_eq!(pool.thin_ids().unwrap(), want);
    assert_eq!(
        pool.status().unwrap().held_metadata_root,
        None,
        "snapshot released"
    );
}
