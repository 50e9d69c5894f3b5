//! Reads what Docker's devicemapper storage driver (Docker 1.x to 24) left on disk: the
//! driver's device metadata under `<root>/devicemapper/metadata/` and the layer store's
//! records under `<root>/image/devicemapper/layerdb/`. Nothing here writes.
//!
//! The formats are moby's (`daemon/graphdriver/devmapper/deviceset.go`, `layer/filestore.go`):
//!
//! - `metadata/<hash>` (`metadata/base` for the base device): `{"device_id":N,"size":BYTES,
//!   "transaction_id":N,"initialized":BOOL,"deleted":BOOL}`;
//! - `metadata/deviceset-metadata`: `{"next_device_id":N,"BaseDeviceUUID":"...",
//!   "BaseDeviceFilesystem":"ext4"}`;
//! - `metadata/transaction-metadata`: `{"open_transaction_id":N,"device_hash":"...",
//!   "device_id":N}`, the last transaction opened (closed when the pool's transaction id
//!   reached it);
//! - `layerdb/sha256/<chain id>/{cache-id,parent,diff}`: an image layer, its device hash
//!   (`cache-id`) and its parent's chain id; directories named `<chain id>-<random>-removing`
//!   are layers being removed;
//! - `layerdb/mounts/<container id>/{mount-id,init-id,parent}`: a container's read-write
//!   device, its `-init` device and the chain id of its image's top layer.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Name of the base device's metadata file (its hash is empty).
pub const BASE_FILE: &str = "base";

/// One thin device as Docker's driver recorded it (`metadata/<hash>`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DevInfo {
    /// The thin id in the pool.
    pub device_id: u32,
    /// The device's size in bytes.
    pub size: u64,
    /// The pool transaction that created it.
    #[serde(default)]
    pub transaction_id: u64,
    /// Set on the base device once its filesystem was made.
    #[serde(default)]
    pub initialized: bool,
    /// Marked for deferred deletion: Docker deletes it at its next start.
    #[serde(default)]
    pub deleted: bool,
}

/// `metadata/deviceset-metadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct DeviceSetMeta {
    /// The last device id Docker allocated.
    #[serde(default)]
    pub next_device_id: u32,
    /// The base device's filesystem uuid.
    #[serde(default, rename = "BaseDeviceUUID")]
    pub base_device_uuid: String,
    /// The base device's filesystem (`ext4`, `xfs`; empty before Docker 1.10).
    #[serde(default, rename = "BaseDeviceFilesystem")]
    pub base_device_filesystem: String,
}

/// `metadata/transaction-metadata`: the last transaction Docker opened.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Transaction {
    /// The pool transaction id it moves to when it closes.
    pub open_transaction_id: u64,
    /// The device it creates or deletes.
    #[serde(rename = "device_hash")]
    pub device_hash: String,
    /// That device's thin id.
    pub device_id: u32,
}

/// An image layer of Docker's layer store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Its device's hash (the graph driver's id).
    pub cache_id: String,
    /// The chain id of its parent layer.
    pub parent: Option<String>,
}

/// A container's layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The read-write device's hash.
    pub mount_id: String,
    /// The `-init` device's hash (`<mount id>-init`).
    pub init_id: Option<String>,
    /// The chain id of the image's top layer.
    pub parent: Option<String>,
}

/// Everything read from a Docker root.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Docker's root, e.g. `/var/lib/docker`.
    pub root: PathBuf,
    /// The driver's home, `<root>/devicemapper`.
    pub home: PathBuf,
    /// The prefix of Docker's dm names, `docker-<major>:<minor>-<inode>` of the home.
    pub prefix: String,
    /// Devices by hash; the base device's hash is `""`.
    pub devices: BTreeMap<String, DevInfo>,
    /// `deviceset-metadata`.
    pub deviceset: DeviceSetMeta,
    /// `transaction-metadata`, if present.
    pub transaction: Option<Transaction>,
    /// Image layers by chain id (`sha256:...`).
    pub layers: BTreeMap<String, Layer>,
    /// Device hashes of layers being removed (`-removing` layer directories).
    pub removing: Vec<(String, String)>,
    /// Containers by id.
    pub mounts: BTreeMap<String, Mount>,
    /// The loopback files `<home>/devicemapper/{data,metadata}`, if both exist.
    pub loop_files: Option<(PathBuf, PathBuf)>,
    /// Docker set up a direct-lvm pool itself (`<home>/setup-config.json`): `docker/thinpool`.
    pub direct_lvm: bool,
    /// Entries that could not be read, one line each.
    pub warnings: Vec<String>,
}

/// Docker's `major()`/`minor()` of a device number (the kernel's `new_encode_dev` layout),
/// as used in its dm name prefix.
pub fn docker_dev_numbers(dev: u64) -> (u64, u64) {
    ((dev >> 8) & 0xfff, (dev & 0xff) | ((dev >> 12) & 0xfff00))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{} is not Docker's JSON", path.display()))
}

fn read_trimmed(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Layout {
    /// Reads Docker's devicemapper storage under `root`.
    ///
    /// # Errors
    /// When `root` holds no devicemapper storage, or its device metadata is unreadable
    /// (the layer store's entries that cannot be read become warnings).
    pub fn read(root: &Path) -> Result<Layout> {
        let home = root.join("devicemapper");
        let meta_dir = home.join("metadata");
        if !meta_dir.is_dir() {
            bail!(
                "{} does not exist: {} holds no storage of Docker's devicemapper driver (pass Docker's data-root with --root)",
                meta_dir.display(),
                root.display()
            );
        }
        let st = fs::metadata(&home).with_context(|| format!("cannot stat {}", home.display()))?;
        let (major, minor) = docker_dev_numbers(st.dev());
        let mut layout = Layout {
            root: root.to_path_buf(),
            prefix: format!("docker-{major}:{minor}-{}", st.ino()),
            home: home.clone(),
            ..Default::default()
        };
        let mut names: Vec<String> = fs::read_dir(&meta_dir)
            .with_context(|| format!("cannot list {}", meta_dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let path = meta_dir.join(&name);
            match name.as_str() {
                "deviceset-metadata" => layout.deviceset = read_json(&path)?,
                "transaction-metadata" => layout.transaction = Some(read_json(&path)?),
                n if n.starts_with('.') || n.ends_with(".migrated") => {}
                n => {
                    let info: DevInfo = read_json(&path)?;
                    let hash = if n == BASE_FILE {
                        String::new()
                    } else {
                        n.to_string()
                    };
                    layout.devices.insert(hash, info);
                }
            }
        }
        let data = home.join("devicemapper").join("data");
        let meta = home.join("devicemapper").join("metadata");
        if data.is_file() && meta.is_file() {
            layout.loop_files = Some((data, meta));
        }
        layout.direct_lvm = fs::metadata(home.join("setup-config.json"))
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        layout.read_layerdb(&root.join("image").join("devicemapper").join("layerdb"));
        Ok(layout)
    }

    fn read_layerdb(&mut self, db: &Path) {
        let sha = db.join("sha256");
        let mut dirs: Vec<PathBuf> = fs::read_dir(&sha)
            .map(|it| it.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        dirs.sort();
        for dir in dirs.into_iter().filter(|d| d.is_dir()) {
            let name = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let cache_id = match read_trimmed(&dir.join("cache-id")) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    self.warnings
                        .push(format!("layer {} has no cache-id: skipped", dir.display()));
                    continue;
                }
                Err(e) => {
                    self.warnings.push(format!("{e:#}: skipped"));
                    continue;
                }
            };
            if name.ends_with("-removing") {
                self.removing.push((name, cache_id));
                continue;
            }
            if !is_hex64(&name) {
                continue;
            }
            let parent = match read_trimmed(&dir.join("parent")) {
                Ok(p) => p,
                Err(e) => {
                    self.warnings.push(format!("{e:#}: layer skipped"));
                    continue;
                }
            };
            self.layers
                .insert(format!("sha256:{name}"), Layer { cache_id, parent });
        }
        let mut mounts: Vec<PathBuf> = fs::read_dir(db.join("mounts"))
            .map(|it| it.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        mounts.sort();
        for dir in mounts.into_iter().filter(|d| d.is_dir()) {
            let name = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let read = |f: &str| read_trimmed(&dir.join(f));
            match (read("mount-id"), read("init-id"), read("parent")) {
                (Ok(Some(mount_id)), Ok(init_id), Ok(parent)) => {
                    self.mounts.insert(
                        name,
                        Mount {
                            mount_id,
                            init_id,
                            parent,
                        },
                    );
                }
                (Ok(None), _, _) => self.warnings.push(format!(
                    "container layer {} has no mount-id: skipped",
                    dir.display()
                )),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => self
                    .warnings
                    .push(format!("{e:#}: container layer skipped")),
            }
        }
    }

    /// The dm name of Docker's own loopback pool, `<prefix>-pool`.
    pub fn loop_pool_name(&self) -> String {
        format!("{}-pool", self.prefix)
    }

    /// The dm name Docker gave device `hash` when active (`<prefix>-base` for the base).
    pub fn device_name(&self, hash: &str) -> String {
        format!(
            "{}-{}",
            self.prefix,
            if hash.is_empty() { BASE_FILE } else { hash }
        )
    }

    /// The base device's filesystem as Docker recorded it, if it did.
    pub fn base_filesystem(&self) -> Option<&str> {
        Some(self.deviceset.base_device_filesystem.as_str()).filter(|s| !s.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn reads_docker_24_files() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let meta = root.join("devicemapper/metadata");
        write(
            &meta.join("base"),
            r#"{"device_id":1,"size":10737418240,"transaction_id":1,"initialized":true,"deleted":false}"#,
        );
        let h = "a".repeat(64);
        write(
            &meta.join(&h),
            r#"{"device_id":2,"size":10737418240,"transaction_id":2,"initialized":false,"deleted":false}"#,
        );
        write(
            &meta.join("deviceset-metadata"),
            r#"{"next_device_id":2,"BaseDeviceUUID":"5e3c","BaseDeviceFilesystem":"ext4"}"#,
        );
        write(
            &meta.join("transaction-metadata"),
            &format!(r#"{{"open_transaction_id":2,"device_hash":"{h}","device_id":2}}"#),
        );
        write(&meta.join(".tmp123"), "partial");
        let chain = "c".repeat(64);
        let db = root.join("image/devicemapper/layerdb");
        write(&db.join(format!("sha256/{chain}/cache-id")), &h);
        write(
            &db.join(format!("sha256/{chain}/diff")),
            &format!("sha256:{chain}"),
        );
        write(
            &db.join(format!("sha256/{}-1234-removing/cache-id", "d".repeat(64))),
            "gone",
        );
        write(&db.join("mounts/ctr/mount-id"), &"e".repeat(64));
        write(
            &db.join("mounts/ctr/init-id"),
            &format!("{}-init", "e".repeat(64)),
        );
        write(&db.join("mounts/ctr/parent"), &format!("sha256:{chain}"));
        write(&root.join("devicemapper/devicemapper/data"), "");
        write(&root.join("devicemapper/devicemapper/metadata"), "");

        let l = Layout::read(root).unwrap();
        assert!(l.prefix.starts_with("docker-"), "{}", l.prefix);
        assert_eq!(l.devices.len(), 2);
        assert!(l.devices[""].initialized);
        assert_eq!(l.devices[&h].device_id, 2);
        assert_eq!(l.deviceset.next_device_id, 2);
        assert_eq!(l.base_filesystem(), Some("ext4"));
        assert_eq!(l.transaction.as_ref().unwrap().device_hash, h);
        assert_eq!(l.layers[&format!("sha256:{chain}")].cache_id, h);
        assert_eq!(l.layers[&format!("sha256:{chain}")].parent, None);
        assert_eq!(l.removing.len(), 1);
        let m = &l.mounts["ctr"];
        assert_eq!(
            m.init_id.as_deref(),
            Some(format!("{}-init", "e".repeat(64)).as_str())
        );
        assert_eq!(
            m.parent.as_deref(),
            Some(format!("sha256:{chain}").as_str())
        );
        assert!(l.loop_files.is_some());
        assert!(!l.direct_lvm);
        assert_eq!(l.device_name(""), format!("{}-base", l.prefix));
    }

    #[test]
    fn a_root_without_devicemapper_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = Layout::read(d.path()).unwrap_err();
        assert!(format!("{e:#}").contains("--root"), "{e:#}");
    }

    #[test]
    fn bad_json_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        write(&d.path().join("devicemapper/metadata/abc"), "{not json");
        let e = Layout::read(d.path()).unwrap_err();
        assert!(format!("{e:#}").contains("metadata/abc"), "{e:#}");
    }

    #[test]
    fn device_numbers_like_docker() {
        // 8:1 encoded the kernel's way.
        assert_eq!(docker_dev_numbers(0x801), (8, 1));
        // 259:65537 (a minor above 255).
        let minor: u64 = 65537;
        let dev = (259 << 8) | (minor & 0xff) | ((minor & !0xff) << 12);
        assert_eq!(docker_dev_numbers(dev), (259, 65537));
    }
}
