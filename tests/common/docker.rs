//! Docker's devicemapper storage driver as Docker (20.10 to 24) lays it out on disk and in
//! the kernel, built step by step the way moby's `daemon/graphdriver/devmapper` does it, for
//! the cases a real dockerd does not produce on demand (tests/migrate.rs; what a real
//! Docker 20.10 writes is the same, tests/docker_migrate.rs checks that): loopback pool
//! named `docker-<maj>:<min>-<ino>-pool`, table `... 128 32768 1 skip_block_zeroing`,
//! devices `docker-<maj>:<min>-<ino>-<hash>`, a transaction file around every pool change,
//! JSON written with Go's field names and no spaces, each filesystem holding `id` and
//! `rootfs/`, plus the layer store's `layerdb` entries. Ioctls go through thinpool's `dm`
//! functions, which take any name; no thinsnap code decides anything here.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

use thinpool::{
    dm,
    loopback::{self, LoopFile},
    units::{bytes_to_sectors, GIB, MIB},
    Device, DmNameBuf, FsType, RemoveMode,
};

/// A hex id (64 digits) derived from `seed`, like Docker's random ids.
pub fn hex_id(seed: &str) -> String {
    super::sha256(seed.as_bytes())
}

/// One of Docker's thin devices.
#[derive(Debug, Clone)]
pub struct Dev {
    pub id: u32,
    pub size: u64,
}

/// Docker's storage under `<dir>/docker`.
pub struct DockerDm {
    pub root: PathBuf,
    pub home: PathBuf,
    pub prefix: String,
    pub pool: DmNameBuf,
    pub pool_dev: Device,
    /// The loop devices of the loopback pool's `data` and `metadata` files.
    pub loops: Vec<LoopFile>,
    pub block_size: u64,
    pub base_size: u64,
    /// The pool's transaction id as Docker tracks it.
    pub txn: u64,
    /// Docker's NextDeviceID (the last id it allocated).
    pub next_id: u32,
    pub devices: BTreeMap<String, Dev>,
    pub base_uuid: String,
    /// Set once thinsnap owns the pool: Drop then leaves the devices alone.
    pub migrated: bool,
}

fn go_bool(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl DockerDm {
    /// Starts "Docker" on `<dir>/docker` with its loopback pool: the sparse files, the
    /// pool, the base device with an ext4 filesystem, `deviceset-metadata`. `block_size`
    /// is in sectors (Docker's `dm.blocksize`), `base_size` in bytes (`dm.basesize`).
    pub fn new(dir: &Path, block_size: u64, base_size: u64) -> DockerDm {
        super::require_dm();
        let (root, home, prefix) = Self::home(dir);
        fs::create_dir_all(home.join("devicemapper")).unwrap();
        let data_file = home.join("devicemapper/data");
        let meta_file = home.join("devicemapper/metadata");
        loopback::create_sparse(&data_file, 4 * GIB).unwrap();
        loopback::create_sparse(&meta_file, 128 * MIB).unwrap();
        let data = loopback::attach(&data_file, false).unwrap();
        let meta = loopback::attach(&meta_file, false).unwrap();
        let pool = DmNameBuf::new(format!("{prefix}-pool")).unwrap();
        let params = format!(
            "{}:{} {}:{} {block_size} 32768 1 skip_block_zeroing",
            meta.device.major, meta.device.minor, data.device.major, data.device.minor
        );
        let info = dm::create(
            &pool,
            None,
            &[(0, *bytes_to_sectors(4 * GIB), "thin-pool".into(), params)],
        )
        .unwrap();
        Self::start(
            root,
            home,
            prefix,
            pool,
            info.device(),
            vec![data, meta],
            block_size,
            base_size,
        )
    }

    fn home(dir: &Path) -> (PathBuf, PathBuf, String) {
        let root = dir.join("docker");
        let home = root.join("devicemapper");
        fs::create_dir_all(home.join("metadata")).unwrap();
        let st = fs::metadata(&home).unwrap();
        let dev = st.dev();
        let (major, minor) = ((dev >> 8) & 0xfff, (dev & 0xff) | ((dev >> 12) & 0xfff00));
        let prefix = format!("docker-{major}:{minor}-{}", st.ino());
        (root, home, prefix)
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        root: PathBuf,
        home: PathBuf,
        prefix: String,
        pool: DmNameBuf,
        pool_dev: Device,
        loops: Vec<LoopFile>,
        block_size: u64,
        base_size: u64,
    ) -> DockerDm {
        let mut d = DockerDm {
            root,
            home,
            prefix,
            pool,
            pool_dev,
            loops,
            block_size,
            base_size,
            txn: 0,
            next_id: 0,
            devices: BTreeMap::new(),
            base_uuid: String::new(),
            migrated: false,
        };
        // setupBaseImage → createBaseImage: a thin device, then mkfs, then initialized.
        let id = d.create_register("", None);
        let node = d.activate("");
        FsType::Ext4.mkfs(&node, &[]).unwrap();
        run("tune2fs", &["-c", "-1", "-i", "0", node.to_str().unwrap()]);
        d.base_uuid = run(
            "blkid",
            &["-s", "UUID", "-o", "value", node.to_str().unwrap()],
        )
        .trim()
        .to_string();
        d.deactivate("");
        d.save_device("", id, base_size, d.txn, true, false);
        d.save_deviceset();
        d
    }

    fn meta_dir(&self) -> PathBuf {
        self.home.join("metadata")
    }

    /// Writes a metadata file the way Docker's writeMetaFile does (temp file, rename).
    pub fn write_meta(&self, name: &str, json: &str) {
        let tmp = self.meta_dir().join(format!(".tmp{name}"));
        fs::write(&tmp, json).unwrap();
        fs::rename(&tmp, self.meta_dir().join(name)).unwrap();
    }

    pub fn save_device(&self, hash: &str, id: u32, size: u64, txn: u64, init: bool, deleted: bool) {
        let file = if hash.is_empty() { "base" } else { hash };
        self.write_meta(
            file,
            &format!(
                r#"{{"device_id":{id},"size":{size},"transaction_id":{txn},"initialized":{},"deleted":{}}}"#,
                go_bool(init),
                go_bool(deleted)
            ),
        );
    }

    pub fn save_deviceset(&self) {
        self.write_meta(
            "deviceset-metadata",
            &format!(
                r#"{{"next_device_id":{},"BaseDeviceUUID":"{}","BaseDeviceFilesystem":"ext4"}}"#,
                self.next_id, self.base_uuid
            ),
        );
    }

    /// openTransaction: the transaction file names the next transaction id and device.
    pub fn open_transaction(&self, hash: &str, id: u32) -> u64 {
        let open = self.txn + 1;
        self.write_meta(
            "transaction-metadata",
            &format!(r#"{{"open_transaction_id":{open},"device_hash":"{hash}","device_id":{id}}}"#),
        );
        open
    }

    /// closeTransaction: the pool's transaction id moves to the open one.
    pub fn close_transaction(&mut self, open: u64) {
        self.message(&format!("set_transaction_id {} {open}", self.txn));
        self.txn = open;
    }

    pub fn message(&self, msg: &str) {
        dm::message(&self.pool, "message", msg).unwrap();
    }

    /// getNextFreeDeviceID.
    pub fn next_device_id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    /// createRegisterDevice / createRegisterSnapDevice: a new device `hash` (a snapshot
    /// of `origin`'s device when given), registered and its transaction closed.
    pub fn create_register(&mut self, hash: &str, origin: Option<&str>) -> u32 {
        let id = self.next_device_id();
        let open = self.open_transaction(hash, id);
        match origin {
            None => self.message(&format!("create_thin {id}")),
            Some(o) => {
                let oid = self.devices[o].id;
                self.message(&format!("create_snap {id} {oid}"))
            }
        }
        let size = origin.map_or(self.base_size, |o| self.devices[o].size);
        self.save_device(hash, id, size, open, false, false);
        self.devices.insert(hash.to_string(), Dev { id, size });
        self.close_transaction(open);
        id
    }

    pub fn dm_name(&self, hash: &str) -> DmNameBuf {
        let h = if hash.is_empty() { "base" } else { hash };
        DmNameBuf::new(format!("{}-{h}", self.prefix)).unwrap()
    }

    /// activateDeviceIfNeeded.
    pub fn activate(&self, hash: &str) -> PathBuf {
        let d = &self.devices[hash];
        let name = self.dm_name(hash);
        let info = match dm::info(&name).unwrap() {
            Some(i) => i,
            None => dm::create(
                &name,
                None,
                &[(
                    0,
                    *bytes_to_sectors(d.size),
                    "thin".into(),
                    format!("{}:{} {}", self.pool_dev.major, self.pool_dev.minor, d.id),
                )],
            )
            .unwrap(),
        };
        dm::devnode(info.device()).unwrap()
    }

    pub fn deactivate(&self, hash: &str) {
        dm::remove(&self.dm_name(hash), RemoveMode::Now).unwrap();
    }

    /// Driver.Get: mounts the device at `mnt/<hash>`, makes `rootfs` and the `id` file;
    /// returns the rootfs.
    pub fn get(&self, hash: &str) -> PathBuf {
        let node = self.activate(hash);
        let mp = self.home.join("mnt").join(hash);
        fs::create_dir_all(&mp).unwrap();
        thinpool::fs::mount(&node, &mp, FsType::Ext4, &[] as &[&str]).unwrap();
        fs::create_dir_all(mp.join("rootfs")).unwrap();
        if !mp.join("id").exists() {
            fs::write(mp.join("id"), hash).unwrap();
        }
        mp.join("rootfs")
    }

    /// Driver.Put: unmounts, removes the mount point, deactivates.
    pub fn put(&self, hash: &str) {
        let mp = self.home.join("mnt").join(hash);
        thinpool::fs::umount(&mp).unwrap();
        fs::remove_dir(&mp).unwrap();
        self.deactivate(hash);
    }

    /// The layer store registers an image layer: a device on its parent's, the diff applied
    /// through Get/Put, then `layerdb/sha256/<chain id>/{cache-id,diff,size,parent}`.
    /// Returns the chain id.
    pub fn add_layer(
        &mut self,
        parent: Option<&str>,
        seed: &str,
        apply: impl FnOnce(&Path),
    ) -> String {
        let cache_id = hex_id(&format!("cache {seed}"));
        let diff = format!("sha256:{}", hex_id(&format!("diff {seed}")));
        let parent_cache = parent.map(|p| self.layer_cache_id(p));
        self.create_register(&cache_id, Some(parent_cache.as_deref().unwrap_or("")));
        let rootfs = self.get(&cache_id);
        apply(&rootfs);
        self.put(&cache_id);
        let chain = match parent {
            None => diff.clone(),
            Some(p) => format!("sha256:{}", super::sha256(format!("{p} {diff}").as_bytes())),
        };
        let dir = self
            .layerdb()
            .join("sha256")
            .join(chain.trim_start_matches("sha256:"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cache-id"), &cache_id).unwrap();
        fs::write(dir.join("diff"), &diff).unwrap();
        fs::write(dir.join("size"), "1234").unwrap();
        if let Some(p) = parent {
            fs::write(dir.join("parent"), p).unwrap();
        }
        chain
    }

    pub fn layerdb(&self) -> PathBuf {
        self.root.join("image/devicemapper/layerdb")
    }

    pub fn layer_cache_id(&self, chain: &str) -> String {
        fs::read_to_string(
            self.layerdb()
                .join("sha256")
                .join(chain.trim_start_matches("sha256:"))
                .join("cache-id"),
        )
        .unwrap()
    }

    /// CreateRWLayer with an init layer: `<mount id>-init` on the image's top layer (Docker's
    /// init files written through Get/Put), the read-write device on it, then
    /// `layerdb/mounts/<container>/{mount-id,init-id,parent}`. Returns the mount id.
    pub fn add_container(
        &mut self,
        container: &str,
        image: &str,
        run: impl FnOnce(&Path),
    ) -> String {
        let mount_id = hex_id(&format!("mount {container}"));
        let init_id = format!("{mount_id}-init");
        let top = self.layer_cache_id(image);
        self.create_register(&init_id, Some(&top));
        let rootfs = self.get(&init_id);
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::write(
            rootfs.join("etc/hostname"),
            format!("{}\n", &container[..12]),
        )
        .unwrap();
        fs::write(rootfs.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
        fs::write(rootfs.join(".dockerenv"), "").unwrap();
        self.put(&init_id);
        self.create_register(&mount_id, Some(&init_id));
        let rootfs = self.get(&mount_id);
        run(&rootfs);
        self.put(&mount_id);
        let dir = self.layerdb().join("mounts").join(container);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("mount-id"), &mount_id).unwrap();
        fs::write(dir.join("init-id"), &init_id).unwrap();
        fs::write(dir.join("parent"), image).unwrap();
        mount_id
    }

    /// Docker's Shutdown: saves deviceset-metadata, deactivates its devices and (a clean
    /// stop) its loopback pool, whose loop devices then go away.
    pub fn stop(&self, clean: bool) {
        self.save_deviceset();
        for h in self.devices.keys() {
            self.deactivate(h);
        }
        if clean {
            dm::remove(&self.pool, RemoveMode::Now).unwrap();
            for l in &self.loops {
                l.detach().unwrap();
            }
        }
    }

    /// The pool's transaction id and thin ids, from the kernel (active pool) or the
    /// metadata file (inactive pool).
    pub fn pool_state(&self) -> (u64, Vec<u32>) {
        if dm::info(&self.pool).unwrap().is_some() {
            let (_, status) = dm::status(&self.pool, true).unwrap();
            let txn = status.split_whitespace().next().unwrap().parse().unwrap();
            (txn, self.thin_ids_from_dump())
        } else {
            let sb =
                thinpool::metadata::read_superblock(&self.home.join("devicemapper/metadata"), 0)
                    .unwrap();
            (sb.transaction_id, sb.thin_ids.into_iter().collect())
        }
    }

    fn thin_ids_from_dump(&self) -> Vec<u32> {
        // thin_dump of a metadata snapshot, as an admin would check it.
        let (_, _, params) = dm::table(&self.pool).unwrap();
        let meta = dm::parse_device(params.split_whitespace().next().unwrap()).unwrap();
        let meta = dm::devnode(meta).unwrap();
        self.message("reserve_metadata_snap");
        let out = Command::new("thin_dump")
            .args(["-m", meta.to_str().unwrap()])
            .output()
            .unwrap();
        self.message("release_metadata_snap");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("<device dev_id=\""))
            .map(|l| l.split('"').next().unwrap().parse().unwrap())
            .collect()
    }

    /// Docker's files (see [`super::migrate::root_files`]).
    pub fn files(&self, inactive_pool: bool) -> BTreeMap<String, String> {
        super::migrate::root_files(&self.root, inactive_pool)
    }

    /// Names of Docker's active dm devices.
    pub fn active(&self) -> Vec<String> {
        dm::list()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n.to_string())
            .filter(|n| n.starts_with(&self.prefix))
            .collect()
    }
}

impl Drop for DockerDm {
    fn drop(&mut self) {
        if std::env::var_os("THINSNAP_KEEP_TEST_DEVICES").is_some() {
            return;
        }
        if !self.migrated {
            for m in super::mounts_under(&self.home).into_iter().rev() {
                let _ = thinpool::fs::umount(&m);
            }
            for n in self.active() {
                if n != self.pool.to_string() {
                    let _ = dm::remove(&DmNameBuf::new(n).unwrap(), RemoveMode::Now);
                }
            }
            let _ = dm::remove(&self.pool, RemoveMode::Now);
            for l in &self.loops {
                let _ = l.detach();
            }
        }
    }
}
