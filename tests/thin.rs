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

    // Growing an unmounted filesystem mounts it for a moment in the private directory,
    // which it leaves empty.
    let private = t.dir.path().join("private");
    let dirs = thinpool::MountDir::open(&private).unwrap();
    pool.resize_thin(id(1), bytes_to_sectors(2 * GIB)).unwrap();
    thinpool::fs::grow_unmounted(fs, &dev.devnode, &dirs).unwrap();
    assert_eq!(
        std::fs::read_dir(&private).unwrap().count(),
        0,
        "{fs}: mount left behind"
    );
    thinpool::fs::mount(&dev.devnode, &m, fs, fs.required_options()).unwrap();
    assert!(fs_size(&m) > big, "{fs}");
    thinpool::fs::umount(&m).unwrap();
}

/// mkfs.ext4 makes `lost+found` (mkfs.xfs does not); it is removed through a private
/// mount, and only when empty.
fn lost_found(fs: FsType) {
    let t = TestPool::small();
    let pool = t.pool();
    pool.create_thin(id(1)).unwrap();
    let dev = pool.activate(id(1), bytes_to_sectors(512 * MIB)).unwrap();
    fs.mkfs(&dev.devnode, &[]).unwrap();
    let m = t.mountpoint("lf");
    thinpool::fs::mount(&dev.devnode, &m, fs, fs.required_options()).unwrap();
    assert_eq!(m.join("lost+found").is_dir(), fs == FsType::Ext4, "{fs}");
    thinpool::fs::umount(&m).unwrap();

    let private = t.dir.path().join("private");
    let dirs = thinpool::MountDir::open(&private)
        .unwrap()
        .with_xfs_enospc_retries(Some(0));
    // An xfs temporary mount gives up on metadata writes a full pool refuses at once.
    let knob = dirs
        .with_mount(
            "probe",
            &dev.devnode,
            fs,
            fs.required_options(),
            "probe",
            |_| {
                let name = thinpool::fs::kernel_name(&dev.devnode)?;
                Ok(std::fs::read_to_string(format!(
                    "/sys/fs/xfs/{name}/error/metadata/ENOSPC/max_retries"
                ))
                .ok())
            },
        )
        .unwrap();
    let want = (fs == FsType::Xfs).then(|| "0\n".to_string());
    assert_eq!(knob, want, "{fs}: max_retries of the temporary mount");
    let removed = thinpool::fs::remove_lost_found(fs, &dev.devnode, &dirs).unwrap();
    assert_eq!(removed, fs == FsType::Ext4, "{fs}");
    assert_eq!(
        std::fs::read_dir(&private).unwrap().count(),
        0,
        "{fs}: mount left behind"
    );
    thinpool::fs::mount(&dev.devnode, &m, fs, fs.required_options()).unwrap();
    let names: Vec<_> = std::fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "{fs}: root holds {names:?}");
    // One that holds something is left.
    std::fs::create_dir(m.join("lost+found")).unwrap();
    std::fs::write(m.join("lost+found/#12"), b"x").unwrap();
    thinpool::fs::umount(&m).unwrap();
    assert!(!thinpool::fs::remove_lost_found(fs, &dev.devnode, &dirs).unwrap());
}

#[test]
fn loop_thin_ext4_lost_found_removed() {
    lost_found(FsType::Ext4);
}

#[test]
fn loop_thin_xfs_lost_found_removed() {
    lost_found(FsType::Xfs);
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

/// The pool's mapping trees as `thin_ls` reads them, on the same held metadata snapshot
/// as thinpool's reader: every device's mapped and exclusive blocks agree, for devices
/// whose trees share subtrees in every way kernel snapshots make them.
#[test]
fn loop_mapping_usage_matches_thin_ls() {
    let t = TestPool::small();
    let pool = t.pool();
    let size = bytes_to_sectors(GIB);
    let write = |n: u32, offset: u64, len: u64| {
        let dev = pool.activate(id(n), size).unwrap();
        write_direct(&dev.devnode, offset, len).unwrap();
    };
    pool.create_thin(id(1)).unwrap();
    write(1, 0, 128 * MIB); // 2048 blocks of 64 KiB: a tree of several levels
    pool.create_snapshot(id(2), id(1)).unwrap();
    pool.create_snapshot(id(3), id(2)).unwrap();
    pool.create_snapshot(id(4), id(1)).unwrap(); // never written
    write(2, 0, 4 * MIB); // overwrites blocks 2 shared with 1, 3 and 4
    write(3, 64 * MIB, 8 * MIB);
    write(3, 128 * MIB, MIB); // beyond what 1 mapped
    pool.create_snapshot(id(5), id(3)).unwrap();
    write(5, 64 * MIB, MIB); // makes 1 MiB of 3's own blocks exclusive to 3
    write(1, 100 * MIB, 2 * MIB); // the origin breaks sharing from its side

    let (ours, theirs) = pool
        .with_metadata_snapshot(|meta, root| {
            let ours = thinpool::usage::read_mapping_usage(meta, root, thinpool::Count::Exclusive)?;
            // thin_ls finds the held snapshot's root in the primary superblock itself.
            let out = std::process::Command::new("thin_ls")
                .arg("--metadata-snap")
                .args(["--no-headers", "-o", "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS"])
                .arg(meta)
                .output()
                .expect("thin_ls (thin-provisioning-tools) must be on PATH");
            assert!(out.status.success(), "thin_ls: {out:?}");
            Ok((ours, String::from_utf8(out.stdout).unwrap()))
        })
        .unwrap();
    let theirs: std::collections::BTreeMap<u32, (u64, u64)> = theirs
        .lines()
        .map(|l| {
            let f: Vec<u64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
            (f[0] as u32, (f[1], f[2]))
        })
        .collect();
    eprintln!(
        "{} nodes in {} reads; thin_ls: {theirs:?}",
        ours.nodes_read, ours.reads
    );
    let live: std::collections::BTreeMap<u32, (u64, u64)> = ours
        .devices
        .iter()
        .map(|(id, d)| (*id, (d.mapped, d.exclusive)))
        .collect();
    assert_eq!(live, theirs, "thinpool's reader vs thin_ls");
    // Owned: what each device provisioned itself since it was created (1 is the origin of
    // everything; 4 never wrote).
    let blocks = |mib: u64| mib * MIB / (64 * 1024);
    let expect = [
        (1, 128, 2, 128),
        (2, 128, 4, 4),
        (3, 129, 1, 9),
        (4, 128, 0, 0),
        (5, 129, 1, 1),
    ];
    for (n, mapped, exclusive, owned) in expect {
        assert_eq!(
            ours.devices[&n],
            thinpool::DeviceBlocks {
                mapped: blocks(mapped),
                exclusive: blocks(exclusive),
                owned: blocks(owned),
            },
            "device {n}"
        );
    }
    // The same through the pool's own call (which takes and releases the snapshot).
    assert_eq!(
        pool.mapping_usage(thinpool::Count::Exclusive)
            .unwrap()
            .devices,
        ours.devices
    );
    assert_eq!(pool.status().unwrap().held_metadata_root, None);
}
