//! thinsnap's configuration: `/etc/thinsnap/config.toml`, every key optional with a
//! documented default, unknown keys and bad values rejected with the key's name.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use thinpool::{
    units::{self, Sectors},
    FsType, LvmPool, PoolName, PoolOptions, Source,
};

/// Where the configuration is read from unless `--config` or `THINSNAP_CONFIG` say otherwise.
pub const DEFAULT_PATH: &str = "/etc/thinsnap/config.toml";

/// The full default configuration file, with every key documented (`thinsnap config default`).
pub const DEFAULT_TOML: &str = r#"# thinsnap configuration. Every key is optional; the values shown are the defaults.
# Path: /etc/thinsnap/config.toml (override with --config or THINSNAP_CONFIG).

# Where thinsnap keeps its metadata store and, for loopback pools, the pool files.
state_dir = "/var/lib/thinsnap"

# The unix socket containerd connects to (proxy_plugins). Created mode 0660, owned by root.
# Under systemd, thinsnap.socket holds it (socket activation) and this must name the same path.
socket = "/run/thinsnap/thinsnap.sock"

# Runtime files. thinsnap mounts a device for a moment (to grow a new snapshot's filesystem,
# tidy a fresh base device, import into or export from a snapshot) only in its "mnt"
# directory, mode 0700, nosuid,nodev,noexec; nothing goes to /tmp.
runtime_dir = "/run/thinsnap"

# Filesystem of the base device every snapshot descends from: "ext4" or "xfs".
# The base device is formatted once; snapshots are mounted as they are (xfs with nouuid).
filesystem = "ext4"

# How many times xfs retries a metadata write the pool refused for lack of space before it
# shuts the filesystem down, for every xfs volume and temporary mount thinsnap makes
# (/sys/fs/xfs/<dev>/error/metadata/ENOSPC/max_retries, Docker's dm.xfs_nospace_max_retries).
# 0: never, so on a full pool writers get ENOSPC and then EIO instead of writing on into
# memory and waiting for space forever; -1: forever (the kernel's default). Snapshots that
# containerd mounts keep the kernel's default.
xfs_nospace_max_retries = 0

# Extra options passed to mkfs.ext4 / mkfs.xfs when the base device is formatted.
mkfs_options = []

# Extra mount options returned to containerd for every snapshot (e.g. ["discard"]).
# Generic flags such as "noatime" are fine: containerd splits flags from data.
mount_options = []

# Sizes, here and wherever thinsnap takes one (labels, `-o size=`, the CLI), are a number and
# an optional unit, all binary as in Docker and LVM: "512m", "200M" and "200MiB" are 200 MiB;
# "1G", "1GB" and "1GiB" all mean 1024 MiB; "1T" is 1024 GiB; a bare number is bytes.
# Zero and negative sizes are refused.

# Size of a snapshot's thin device (and filesystem) unless its labels ask for more:
# "containerd.io/snapshot/thinsnap.size" or "containerd.io/snapshot/max-size".
default_size = "10G"

# The largest size a snapshot's or volume's device may be given by its labels or `-o size`
# ("1T"). Empty: the pool's data size times `overcommit`. Thin devices only take space as they
# are written, so sizes beyond the pool are allowed up to this.
max_size = ""
overcommit = 10

# Discard a thin device's blocks when its snapshot is removed, returning the space to the
# pool's data device (and to a sparse loopback file). A snapshot that never wrote a block of
# its own (a view, a layer nothing was unpacked into) is deleted without one: it maps only
# blocks its parent still holds, so there is nothing to give back.
discard_on_remove = true

# Remove takes a snapshot out of the namespace at once (its key is free again) and its
# device is reclaimed (discarded, deactivated, deleted) by two threads in the background.
# With async_remove = true there are no such threads: containerd's Cleanup (its garbage
# collector calls it), `thinsnap gc` or the daemon, every minute, reclaim the devices.
async_remove = false

# Refuse new snapshots (ResourceExhausted) when the pool's free data or metadata space would
# drop under this share of its size, so running containers keep room to write.
min_free_space = "10%"

[pool]
# Name of the pool: its dm devices are thinsnap-<name>-<id>. Lowercase letters, digits, "_".
name = "default"

# Where the pool's storage comes from: "loopback" (sparse files, created on first start),
# "existing" (an active dm thin-pool, by name) or "lvm" (an LVM thin pool; created on
# block devices when [pool.lvm] devices are given).
source = "loopback"

# Data block size: the unit of allocation and copy-on-write. 64K to 1G, a multiple of 64K.
block_size = "64K"

# Fail writes at once when the pool is out of data space, instead of queueing them.
error_if_no_space = true

# Zero newly provisioned blocks, so no data of a deleted snapshot can leak into a new one.
zero_new_blocks = true

[pool.autogrow]
# Let the daemon grow the pool by itself (loopback and LVM pools): when free data or
# metadata space drops under `threshold`, it grows that device by its step, up to its
# maximum. It wakes on the kernel's low-water-mark event and also checks every
# `check_interval`. Off by default: a loopback pool grows its files on the filesystem
# under state_dir, so set the maximums to what it may take. An LVM pool that LVM
# autoextends itself (thinsnap's own profile for pools it creates) is left to LVM.
enabled = false
threshold = "20%"
data_step = "10G"
metadata_step = "256M"
max_data_size = "1T"
max_metadata_size = "16G"
check_interval = "10s"

[pool.loopback]
# Directory of the sparse "data" and "metadata" files. Empty: <state_dir>/pool.
dir = ""
# Sizes of new files; they are sparse, so they use only what is written.
data_size = "100G"
metadata_size = "2G"

[pool.existing]
# dm name of an active thin-pool device, e.g. "docker-thinpool".
dm_name = ""

[pool.lvm]
# Volume group and thin-pool logical volume.
vg = ""
lv = "thinpool"
# Block devices to create the volume group on when it does not exist ("direct-lvm").
devices = []
# Share of the volume group for pool data, in percent.
data_percent = 95
# Metadata size; empty: 1% of the volume group (at least 64M, at most 16G).
metadata_size = ""

[volumes]
# Answer Docker's volume plugin protocol on this unix socket, so `docker volume create -d
# thinsnap` gives each volume its own thin device. Docker finds plugins by their socket in
# /run/docker/plugins/: turn it on with socket = "/run/docker/plugins/thinsnap.sock".
# Empty: off (volumes made while it was on are still kept, re-mounted and checked).
socket = ""
# Where volumes are mounted for containers: <mount_dir>/<volume name>. Empty:
# <state_dir>/volumes.
mount_dir = ""
# Size of a volume's thin device unless `-o size=...` asks for another. Empty: default_size.
# A volume at least as large as the base device (default_size) is a thin snapshot of it, grown
# to its size; a smaller one gets a filesystem of its own (mkfs), at least 16M of ext4 or 300M
# of xfs.
default_size = ""
# Filesystem of a volume unless `-o fs=...` says: "ext4" or "xfs". Empty: filesystem.
filesystem = ""
# Extra mount options for volumes (e.g. ["noatime"]); xfs volumes get "nouuid" too.
mount_options = []

[metrics]
# Serve Prometheus metrics over HTTP at this address, e.g. "127.0.0.1:9338" (GET /metrics).
# Empty: off. `thinsnap status` shows the same figures without it.
listen = ""
"#;

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Metadata store and loopback pool directory.
    pub state_dir: PathBuf,
    /// containerd's socket to us.
    pub socket: PathBuf,
    /// Runtime files: the private directory of temporary mounts is `<runtime_dir>/mnt`.
    pub runtime_dir: PathBuf,
    /// Filesystem of the base device.
    pub filesystem: FsType,
    /// Metadata write retries of xfs mounts on ENOSPC (-1: forever).
    pub xfs_nospace_max_retries: i32,
    /// Extra mkfs options.
    pub mkfs_options: Vec<String>,
    /// Extra mount options for every snapshot.
    pub mount_options: Vec<String>,
    /// Default thin device size in bytes.
    pub default_size: u64,
    /// The largest device size labels or volume options may ask for; `None`: the pool's
    /// data size times `overcommit`.
    pub max_size: Option<u64>,
    /// Multiple of the pool's data size devices may be given when `max_size` is empty.
    pub overcommit: u64,
    /// Discard blocks of removed snapshots.
    pub discard_on_remove: bool,
    /// Remove thin devices in the background.
    pub async_remove: bool,
    /// Minimum free share (0.0–1.0) of pool data and metadata space for new snapshots.
    pub min_free_space: f64,
    /// The pool's name.
    pub pool_name: PoolName,
    /// The pool's storage.
    pub pool_source: Source,
    /// The pool's table settings.
    pub pool_options: PoolOptions,
    /// Growing the pool by itself.
    pub autogrow: Autogrow,
    /// Address of the Prometheus endpoint, if any.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Docker volumes.
    pub volumes: Volumes,
}

/// `[volumes]`: the Docker volume plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct Volumes {
    /// The plugin's unix socket; `None`: the plugin is off.
    pub socket: Option<PathBuf>,
    /// Volumes are mounted at `<mount_dir>/<name>`.
    pub mount_dir: PathBuf,
    /// Size in bytes of a new volume without `-o size=`.
    pub default_size: u64,
    /// Filesystem of a new volume without `-o fs=`.
    pub filesystem: FsType,
    /// Extra mount options of volumes.
    pub mount_options: Vec<String>,
}

/// `[pool.autogrow]`: when and how far the daemon grows the pool by itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Autogrow {
    /// Whether the daemon grows the pool.
    pub enabled: bool,
    /// Grow when the free share (0.0–1.0) of data or metadata space drops under this.
    pub threshold: f64,
    /// Bytes added to the data device per grow.
    pub data_step: u64,
    /// Bytes added to the metadata device per grow.
    pub metadata_step: u64,
    /// The data device is not grown beyond this many bytes.
    pub max_data_size: u64,
    /// The metadata device is not grown beyond this many bytes.
    pub max_metadata_size: u64,
    /// How often the pool is checked without a kernel event.
    pub check_interval: std::time::Duration,
}

/// A configuration that cannot be used: names the key and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key is unknown or has a bad value, or the text is not TOML.
    #[error("{0}")]
    Invalid(String),
    /// The file cannot be read.
    #[error("cannot read configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is invalid.
    #[error("invalid configuration {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        source: Box<ConfigError>,
    },
}

/// Result of configuration parsing.
pub type Result<T> = std::result::Result<T, ConfigError>;

macro_rules! bail {
    ($($t:tt)*) => { return Err(ConfigError::Invalid(format!($($t)*))) };
}

impl Default for Config {
    fn default() -> Self {
        Config::parse(DEFAULT_TOML).expect("the default configuration is valid")
    }
}

/// The file's values laid over [`DEFAULT_TOML`]'s: every key has a value, and each is read
/// by its dotted name, so every error names the key.
struct Values(toml::Table);

impl Values {
    /// Parses `text`, refusing keys [`DEFAULT_TOML`] does not have, and fills in the rest
    /// from it.
    fn parse(text: &str) -> Result<Values> {
        let mut all: toml::Table = DEFAULT_TOML
            .parse()
            .expect("the default configuration is TOML");
        // toml's message quotes the offending line, so it names the key.
        let given: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string().trim().to_string()))?;
        overlay(&mut all, given, "")?;
        Ok(Values(all))
    }

    fn get(&self, key: &str) -> &toml::Value {
        let mut parts = key.split('.');
        let first = parts.next().expect("keys are not empty");
        let mut v = self.0.get(first);
        for p in parts {
            v = v.and_then(|t| t.get(p));
        }
        v.unwrap_or_else(|| panic!("`{key}` is in DEFAULT_TOML"))
    }

    fn bad(key: &str, v: &toml::Value, expected: &str) -> ConfigError {
        ConfigError::Invalid(format!("bad value for `{key}`: {v} (expected {expected})"))
    }

    fn string(&self, key: &str) -> Result<&str> {
        let v = self.get(key);
        v.as_str().ok_or_else(|| Self::bad(key, v, "a string"))
    }

    fn boolean(&self, key: &str) -> Result<bool> {
        let v = self.get(key);
        v.as_bool()
            .ok_or_else(|| Self::bad(key, v, "true or false"))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let v = self.get(key);
        v.as_array()
            .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect())
            .ok_or_else(|| Self::bad(key, v, "a list of strings"))
    }

    /// A string that may be empty, meaning "not set".
    fn optional(&self, key: &str) -> Result<Option<&str>> {
        Ok(Some(self.string(key)?.trim()).filter(|s| !s.is_empty()))
    }

    /// An absolute path, or None when empty.
    fn path(&self, key: &str) -> Result<Option<PathBuf>> {
        match self.optional(key)? {
            None => Ok(None),
            Some(p) if !Path::new(p).is_absolute() => {
                bail!("bad value for `{key}`: {p:?} must be an absolute path")
            }
            Some(p) => Ok(Some(PathBuf::from(p))),
        }
    }

    /// A size as written, `"10G"` or a number of bytes; None when empty.
    fn size_or_empty(&self, key: &str) -> Result<Option<u64>> {
        let v = self.get(key);
        let text = match v {
            toml::Value::Integer(n) if *n >= 0 => n.to_string(),
            toml::Value::String(s) if s.trim().is_empty() => return Ok(None),
            toml::Value::String(s) => s.clone(),
            v => return Err(Self::bad(key, v, "a size such as \"10G\"")),
        };
        units::parse_size(&text)
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("bad value for `{key}`: {text:?}: {e}")))
    }

    fn size(&self, key: &str) -> Result<u64> {
        self.size_or_empty(key)?
            .ok_or_else(|| ConfigError::Invalid(format!("`{key}` must not be empty")))
    }

    /// A share written as a percentage, `"10%"`, as 0.0–1.0.
    fn percent(&self, key: &str) -> Result<f64> {
        let v = self.string(key)?.trim();
        let num = v.strip_suffix('%').unwrap_or(v);
        match num.trim().parse::<f64>() {
            Ok(p) if (0.0..100.0).contains(&p) => Ok(p / 100.0),
            _ => bail!(
                "bad value for `{key}`: {v:?} (expected a percentage such as \"10%\", 0 to 99)"
            ),
        }
    }

    /// A duration as written: `"10s"`, `"500ms"`, `"2m"`.
    fn duration(&self, key: &str) -> Result<std::time::Duration> {
        let v = self.string(key)?.trim();
        let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
        let Some(n) = num.parse::<u64>().ok().filter(|n| *n > 0) else {
            bail!("bad value for `{key}`: {v:?} (expected e.g. \"10s\", \"500ms\", \"2m\")")
        };
        Ok(match unit {
            "ms" => std::time::Duration::from_millis(n),
            "s" | "" => std::time::Duration::from_secs(n),
            "m" => std::time::Duration::from_secs(n * 60),
            _ => bail!("bad value for `{key}`: {v:?} (units: ms, s, m)"),
        })
    }

    fn fs(&self, key: &str) -> Result<Option<FsType>> {
        self.optional(key)?
            .map(|f| {
                f.parse()
                    .map_err(|e| ConfigError::Invalid(format!("bad value for `{key}`: {e}")))
            })
            .transpose()
    }
}

/// Lays `given` over `all` (both at `prefix`), refusing keys `all` does not have and
/// tables given as values or the other way round.
fn overlay(all: &mut toml::Table, given: toml::Table, prefix: &str) -> Result<()> {
    for (k, v) in given {
        let key = format!("{prefix}{k}");
        match (all.get_mut(&k), v) {
            (None, _) => bail!(
                "unknown key `{key}` in the configuration (`thinsnap config default` lists every key)"
            ),
            (Some(toml::Value::Table(t)), toml::Value::Table(g)) => {
                overlay(t, g, &format!("{key}."))?
            }
            (Some(toml::Value::Table(_)), v) => {
                bail!("bad value for `{key}`: {v} (expected a table, [{key}])")
            }
            (Some(_), toml::Value::Table(_)) => {
                bail!("bad value for `{key}`: a table (expected a value)")
            }
            (Some(slot), v) => *slot = v,
        }
    }
    Ok(())
}

impl Config {
    /// Parses and validates configuration text; keys it leaves out have their value in
    /// [`DEFAULT_TOML`].
    ///
    /// # Errors
    /// Names the key that is unknown or has a bad value.
    pub fn parse(text: &str) -> Result<Config> {
        let v = Values::parse(text)?;
        let Some(state_dir) = v.path("state_dir")? else {
            bail!("`state_dir` must not be empty")
        };
        let Some(socket) = v.path("socket")? else {
            bail!("`socket` must not be empty")
        };
        let Some(runtime_dir) = v.path("runtime_dir")? else {
            bail!("`runtime_dir` must not be empty")
        };
        let Some(filesystem) = v.fs("filesystem")? else {
            bail!("`filesystem` must not be empty: use \"ext4\" or \"xfs\"")
        };
        let default_size = v.size("default_size")?;
        if default_size < 64 * units::MIB {
            bail!("bad value for `default_size`: snapshots need at least 64M");
        }
        let volumes = Self::volumes(&v, &state_dir, &socket, filesystem, default_size)?;
        Ok(Config {
            filesystem,
            xfs_nospace_max_retries: match v.get("xfs_nospace_max_retries") {
                toml::Value::Integer(n) if (-1..=i32::MAX as i64).contains(n) => *n as i32,
                other => {
                    return Err(Values::bad(
                        "xfs_nospace_max_retries",
                        other,
                        "-1 (retry forever), 0 or a number of retries",
                    ))
                }
            },
            mkfs_options: v.strings("mkfs_options")?,
            mount_options: v.strings("mount_options")?,
            default_size,
            max_size: v.size_or_empty("max_size")?,
            overcommit: match v.get("overcommit") {
                toml::Value::Integer(n) if (1..=1000).contains(n) => *n as u64,
                other => return Err(Values::bad("overcommit", other, "a whole number from 1 to 1000")),
            },
            discard_on_remove: v.boolean("discard_on_remove")?,
            async_remove: v.boolean("async_remove")?,
            min_free_space: v.percent("min_free_space")?,
            pool_name: PoolName::new(v.string("pool.name")?)
                .map_err(|e| ConfigError::Invalid(format!("bad value for `pool.name`: {e}")))?,
            pool_source: Self::pool_source(&v, &state_dir)?,
            pool_options: Self::pool_options(&v)?,
            autogrow: Self::autogrow(&v)?,
            metrics_listen: match v.optional("metrics.listen")? {
                None => None,
                Some(a) => Some(a.parse().map_err(|_| {
                    ConfigError::Invalid(format!("bad value for `metrics.listen`: {a:?} (expected an address and port such as \"127.0.0.1:9338\")"))
                })?),
            },
            volumes,
            state_dir,
            socket,
            runtime_dir,
        })
    }

    fn pool_options(v: &Values) -> Result<PoolOptions> {
        let block_size = v.size("pool.block_size")?;
        if block_size % (64 * units::KIB) != 0
            || !(64 * units::KIB..=units::GIB).contains(&block_size)
        {
            bail!("bad value for `pool.block_size`: must be a multiple of 64K between 64K and 1G");
        }
        Ok(PoolOptions {
            block_size: Sectors(block_size / 512),
            low_water_mark: None,
            error_if_no_space: v.boolean("pool.error_if_no_space")?,
            zero_new_blocks: v.boolean("pool.zero_new_blocks")?,
            discard_passdown: true,
            direct_io: true,
        })
    }

    fn pool_source(v: &Values, state_dir: &Path) -> Result<Source> {
        Ok(match v.string("pool.source")? {
            "loopback" => Source::Loopback {
                dir: v
                    .path("pool.loopback.dir")?
                    .unwrap_or_else(|| state_dir.join("pool")),
                data_size: v.size("pool.loopback.data_size")?,
                meta_size: v.size("pool.loopback.metadata_size")?,
            },
            "existing" => match v.optional("pool.existing.dm_name")? {
                Some(n) => Source::Existing {
                    dm_name: n.to_string(),
                },
                None => {
                    bail!("`pool.existing.dm_name` is required when `pool.source` is \"existing\"")
                }
            },
            "lvm" => {
                let Some(vg) = v.optional("pool.lvm.vg")? else {
                    bail!("`pool.lvm.vg` is required when `pool.source` is \"lvm\"")
                };
                let mut lvm = LvmPool::new(vg, v.string("pool.lvm.lv")?);
                lvm.devices = v
                    .strings("pool.lvm.devices")?
                    .into_iter()
                    .map(PathBuf::from)
                    .collect();
                let pct = v.get("pool.lvm.data_percent");
                lvm.data_percent = match pct.as_integer() {
                    Some(d @ 1..=97) => d as u8,
                    _ => return Err(Values::bad("pool.lvm.data_percent", pct, "1 to 97")),
                };
                lvm.meta_size = v.size_or_empty("pool.lvm.metadata_size")?;
                Source::Lvm(lvm)
            }
            other => bail!(
                "bad value for `pool.source`: {other:?} (use \"loopback\", \"existing\" or \"lvm\")"
            ),
        })
    }

    fn autogrow(v: &Values) -> Result<Autogrow> {
        let a = Autogrow {
            enabled: v.boolean("pool.autogrow.enabled")?,
            threshold: v.percent("pool.autogrow.threshold")?,
            data_step: v.size("pool.autogrow.data_step")?,
            metadata_step: v.size("pool.autogrow.metadata_step")?,
            max_data_size: v.size("pool.autogrow.max_data_size")?,
            max_metadata_size: v.size("pool.autogrow.max_metadata_size")?,
            check_interval: v.duration("pool.autogrow.check_interval")?,
        };
        if a.enabled && (a.data_step == 0 || a.metadata_step == 0) {
            bail!("bad value for `pool.autogrow.data_step`/`metadata_step`: steps must be more than 0");
        }
        if a.max_metadata_size > 16 * units::GIB {
            bail!("bad value for `pool.autogrow.max_metadata_size`: thin-pool metadata is at most 16G");
        }
        Ok(a)
    }

    fn volumes(
        v: &Values,
        state_dir: &Path,
        socket: &Path,
        filesystem: FsType,
        default_size: u64,
    ) -> Result<Volumes> {
        let volumes = Volumes {
            socket: v.path("volumes.socket")?,
            mount_dir: v
                .path("volumes.mount_dir")?
                .unwrap_or_else(|| state_dir.join("volumes")),
            default_size: v
                .size_or_empty("volumes.default_size")?
                .unwrap_or(default_size),
            filesystem: v.fs("volumes.filesystem")?.unwrap_or(filesystem),
            mount_options: v.strings("volumes.mount_options")?,
        };
        if volumes.socket.as_deref() == Some(socket) {
            bail!(
                "bad value for `volumes.socket`: {:?} is containerd's `socket`; the volume plugin needs a socket of its own (e.g. \"/run/docker/plugins/thinsnap.sock\")",
                socket
            );
        }
        let min = volumes.filesystem.min_size();
        if volumes.default_size < min {
            bail!(
                "bad value for `volumes.default_size`: {} is smaller than the smallest {} filesystem, {}",
                units::format_size(volumes.default_size),
                volumes.filesystem,
                units::format_size(min)
            );
        }
        Ok(volumes)
    }

    /// Loads the configuration at `path`; a missing file at the default path means all
    /// defaults, a missing file named explicitly is an error.
    ///
    /// # Errors
    /// When the file cannot be read or is invalid.
    pub fn load(path: &Path, explicit: bool) -> Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text).map_err(|e| ConfigError::File {
                path: path.to_path_buf(),
                source: Box::new(e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Path of the metadata store.
    pub fn store_path(&self) -> PathBuf {
        self.state_dir.join("metadata.redb")
    }

    /// The private directory of temporary mounts.
    pub fn temp_mount_dir(&self) -> PathBuf {
        self.runtime_dir.join("mnt")
    }

    /// Opens the private directory of temporary mounts, whose xfs mounts get
    /// `xfs_nospace_max_retries`.
    ///
    /// # Errors
    /// As [`thinpool::MountDir::open`].
    pub fn temp_mounts(&self) -> thinpool::Result<thinpool::MountDir> {
        Ok(thinpool::MountDir::open(&self.temp_mount_dir())?
            .with_xfs_enospc_retries(Some(self.xfs_nospace_max_retries)))
    }

    /// Path of the lock file that keeps a second daemon (or a writing CLI) out.
    pub fn lock_path(&self) -> PathBuf {
        self.state_dir.join("thinsnap.lock")
    }
}

/// The containerd configuration snippet that registers thinsnap as a proxy snapshotter.
pub fn containerd_snippet(socket: &Path) -> String {
    format!(
        r#"# Add to /etc/containerd/config.toml, then restart containerd.
# Use it with `ctr --snapshotter thinsnap ...`, or make it the CRI default with
# [plugins."io.containerd.grpc.v1.cri".containerd] snapshotter = "thinsnap" (containerd 1.x)
# or [plugins."io.containerd.cri.v1.images"] snapshotter = "thinsnap" (containerd 2.x).
[proxy_plugins]
  [proxy_plugins.thinsnap]
    type = "snapshot"
    address = "{}"
"#,
        socket.display()
    )
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "state_dir      {}", self.state_dir.display())?;
        writeln!(f, "socket         {}", self.socket.display())?;
        writeln!(f, "runtime_dir    {}", self.runtime_dir.display())?;
        writeln!(f, "filesystem     {}", self.filesystem)?;
        writeln!(
            f,
            "default_size   {}",
            units::format_size(self.default_size)
        )?;
        writeln!(
            f,
            "pool           {} ({:?})",
            self.pool_name, self.pool_source
        )?;
        match &self.volumes.socket {
            Some(s) => writeln!(
                f,
                "volumes        Docker plugin on {}, mounted under {}",
                s.display(),
                self.volumes.mount_dir.display()
            ),
            None => writeln!(f, "volumes        off"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_to_defaults() {
        let c = Config::default();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/thinsnap"));
        assert_eq!(c.socket, PathBuf::from("/run/thinsnap/thinsnap.sock"));
        assert_eq!(c.filesystem, FsType::Ext4);
        assert_eq!(c.default_size, 10 * units::GIB);
        assert!((c.min_free_space - 0.10).abs() < 1e-9);
        assert_eq!(c.pool_name.as_str(), "default");
        assert_eq!(
            c.pool_source,
            Source::Loopback {
                dir: "/var/lib/thinsnap/pool".into(),
                data_size: 100 * units::GIB,
                meta_size: 2 * units::GIB
            }
        );
        assert_eq!(c.pool_options.block_size, Sectors(128));
        assert_eq!(c.xfs_nospace_max_retries, 0, "Docker's default");
        assert_eq!(
            Config::parse("xfs_nospace_max_retries = -1")
                .unwrap()
                .xfs_nospace_max_retries,
            -1
        );
        assert_eq!(
            Config::parse("").unwrap(),
            c,
            "an empty file means all defaults"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse("statedir = \"/x\"").unwrap_err();
        assert!(format!("{e:#}").contains("statedir"), "{e:#}");
        let e = Config::parse("[pool]\nsize = 1").unwrap_err();
        assert!(format!("{e:#}").contains("size"), "{e:#}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("filesystem = \"btrfs\"", "filesystem"),
            ("default_size = \"huge\"", "default_size"),
            ("min_free_space = \"150%\"", "min_free_space"),
            ("[pool]\nname = \"Bad-Name\"", "pool.name"),
            ("[pool]\nsource = \"nfs\"", "pool.source"),
            ("[pool]\nblock_size = \"100K\"", "pool.block_size"),
            ("[pool]\nsource = \"existing\"", "pool.existing.dm_name"),
            ("[pool]\nsource = \"lvm\"", "pool.lvm.vg"),
            ("state_dir = \"relative\"", "state_dir"),
            ("default_size = 10", "default_size"),
            ("default_size = true", "default_size"),
            ("async_remove = \"yes\"", "async_remove"),
            ("xfs_nospace_max_retries = -2", "xfs_nospace_max_retries"),
            ("xfs_nospace_max_retries = \"0\"", "xfs_nospace_max_retries"),
            ("[volumes]\nsocket = \"plugin.sock\"", "volumes.socket"),
            ("[volumes]\nfilesystem = \"zfs\"", "volumes.filesystem"),
            ("[volumes]\ndefault_size = \"1M\"", "volumes.default_size"),
            (
                "[volumes]\ndefault_size = \"200M\"\nfilesystem = \"xfs\"",
                "smallest xfs filesystem, 300 MiB",
            ),
            ("[volumes]\nsize = \"1G\"", "size"),
            (
                "socket = \"/run/x.sock\"\n[volumes]\nsocket = \"/run/x.sock\"",
                "volumes.socket",
            ),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert!(format!("{e:#}").contains(key), "{text}: {e:#}");
        }
    }

    #[test]
    fn volumes_are_off_by_default_and_follow_the_snapshot_defaults() {
        let c =
            Config::parse("state_dir = \"/srv/ts\"\nfilesystem = \"xfs\"\ndefault_size = \"2G\"")
                .unwrap();
        assert_eq!(c.volumes.socket, None);
        assert_eq!(c.volumes.mount_dir, PathBuf::from("/srv/ts/volumes"));
        assert_eq!(c.volumes.default_size, 2 * units::GIB);
        assert_eq!(c.volumes.filesystem, FsType::Xfs);
        let c = Config::parse("[volumes]\nsocket = \"/run/docker/plugins/thinsnap.sock\"\ndefault_size = \"20G\"\nfilesystem = \"ext4\"\nmount_dir = \"/srv/v\"").unwrap();
        assert_eq!(
            c.volumes.socket.as_deref(),
            Some(Path::new("/run/docker/plugins/thinsnap.sock"))
        );
        assert_eq!(c.volumes.default_size, 20 * units::GIB);
        assert_eq!(c.volumes.mount_dir, PathBuf::from("/srv/v"));
        let c = Config::parse("[volumes]\ndefault_size = \"16M\"").unwrap();
        assert_eq!(
            c.volumes.default_size,
            16 * units::MIB,
            "smaller than the base"
        );
    }

    #[test]
    fn lvm_and_existing_sources() {
        let c = Config::parse("[pool]\nsource = \"lvm\"\n[pool.lvm]\nvg = \"vg0\"\ndevices = [\"/dev/sdb\"]\nmetadata_size = \"1G\"").unwrap();
        match c.pool_source {
            Source::Lvm(l) => {
                assert_eq!((l.vg.as_str(), l.lv.as_str()), ("vg0", "thinpool"));
                assert_eq!(l.devices, vec![PathBuf::from("/dev/sdb")]);
                assert_eq!(l.meta_size, Some(units::GIB));
            }
            s => panic!("{s:?}"),
        }
        let c = Config::parse(
            "[pool]\nsource = \"existing\"\n[pool.existing]\ndm_name = \"docker-thinpool\"",
        )
        .unwrap();
        assert_eq!(
            c.pool_source,
            Source::Existing {
                dm_name: "docker-thinpool".into()
            }
        );
    }

    #[test]
    fn loopback_dir_follows_state_dir() {
        let c = Config::parse("state_dir = \"/srv/ts\"").unwrap();
        assert_eq!(c.store_path(), PathBuf::from("/srv/ts/metadata.redb"));
        match c.pool_source {
            Source::Loopback { dir, .. } => assert_eq!(dir, PathBuf::from("/srv/ts/pool")),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn containerd_snippet_names_the_socket() {
        let s = containerd_snippet(Path::new("/run/thinsnap/thinsnap.sock"));
        assert!(s.contains("[proxy_plugins.thinsnap]"));
        assert!(s.contains("address = \"/run/thinsnap/thinsnap.sock\""));
        toml::from_str::<toml::Value>(&s).unwrap();
    }
}
