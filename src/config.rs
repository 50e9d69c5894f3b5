//! thinsnap's configuration: `/etc/thinsnap/config.toml`, every key optional with a
//! documented default, unknown keys and bad values rejected with the key's name.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
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
socket = "/run/thinsnap/thinsnap.sock"

# Filesystem of the base device every snapshot descends from: "ext4" or "xfs".
# The base device is formatted once; snapshots are mounted as they are (xfs with nouuid).
filesystem = "ext4"

# Extra options passed to mkfs.ext4 / mkfs.xfs when the base device is formatted.
mkfs_options = []

# Extra mount options returned to containerd for every snapshot (e.g. ["discard"]).
# Generic flags such as "noatime" are fine: containerd splits flags from data.
mount_options = []

# Size of a snapshot's thin device (and filesystem) unless its labels ask for more:
# "containerd.io/snapshot/thinsnap.size" or "containerd.io/snapshot/max-size".
default_size = "10G"

# Discard a thin device's blocks when its snapshot is removed, returning the space to the
# pool's data device (and to a sparse loopback file).
discard_on_remove = true

# Remove snapshots in the background: Remove returns at once and Cleanup (or the daemon,
# periodically) deletes the thin devices.
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
# Size of a volume's thin device unless `-o size=...` asks for another. Empty: default_size
# (a volume is a snapshot of the base device, so it is never smaller than default_size).
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

/// A size as written: `"10G"` or a number of bytes.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum SizeValue {
    Text(String),
    Bytes(u64),
}

impl SizeValue {
    fn text(&self) -> String {
        match self {
            SizeValue::Text(s) => s.clone(),
            SizeValue::Bytes(b) => b.to_string(),
        }
    }
}

/// Raw configuration as written in the file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    filesystem: Option<String>,
    mkfs_options: Vec<String>,
    mount_options: Vec<String>,
    default_size: Option<SizeValue>,
    discard_on_remove: Option<bool>,
    async_remove: Option<bool>,
    min_free_space: Option<String>,
    pool: RawPool,
    volumes: RawVolumes,
    metrics: RawMetrics,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawVolumes {
    socket: Option<PathBuf>,
    mount_dir: Option<PathBuf>,
    default_size: Option<SizeValue>,
    filesystem: Option<String>,
    mount_options: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAutogrow {
    enabled: Option<bool>,
    threshold: Option<String>,
    data_step: Option<SizeValue>,
    metadata_step: Option<SizeValue>,
    max_data_size: Option<SizeValue>,
    max_metadata_size: Option<SizeValue>,
    check_interval: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawPool {
    name: Option<String>,
    source: Option<String>,
    block_size: Option<SizeValue>,
    error_if_no_space: Option<bool>,
    zero_new_blocks: Option<bool>,
    autogrow: RawAutogrow,
    loopback: RawLoopback,
    existing: RawExisting,
    lvm: RawLvm,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLoopback {
    dir: Option<PathBuf>,
    data_size: Option<SizeValue>,
    metadata_size: Option<SizeValue>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawExisting {
    dm_name: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLvm {
    vg: Option<String>,
    lv: Option<String>,
    devices: Vec<PathBuf>,
    data_percent: Option<u8>,
    metadata_size: Option<SizeValue>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Metadata store and loopback pool directory.
    pub state_dir: PathBuf,
    /// containerd's socket to us.
    pub socket: PathBuf,
    /// Filesystem of the base device.
    pub filesystem: FsType,
    /// Extra mkfs options.
    pub mkfs_options: Vec<String>,
    /// Extra mount options for every snapshot.
    pub mount_options: Vec<String>,
    /// Default thin device size in bytes.
    pub default_size: u64,
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

impl Default for Config {
    fn default() -> Self {
        Config::parse(DEFAULT_TOML).expect("the default configuration is valid")
    }
}

fn size(key: &str, value: Option<&SizeValue>, default: &str) -> Result<u64> {
    let v = value.map_or_else(|| default.to_string(), SizeValue::text);
    let v = v.as_str();
    units::parse_size(v).with_context(|| format!("bad value for `{key}`: {v:?}"))
}

fn percent(key: &str, value: Option<&str>, default: &str) -> Result<f64> {
    let v = value.unwrap_or(default).trim();
    let num = v.strip_suffix('%').unwrap_or(v);
    match num.trim().parse::<f64>() {
        Ok(p) if (0.0..100.0).contains(&p) => Ok(p / 100.0),
        _ => bail!("bad value for `{key}`: {v:?} (expected a percentage such as \"10%\", 0 to 99)"),
    }
}

/// A duration as written: `"10s"`, `"500ms"`, `"2m"`.
fn duration(key: &str, v: &str) -> Result<std::time::Duration> {
    let v = v.trim();
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = num.parse().ok().filter(|n| *n > 0).with_context(|| {
        format!("bad value for `{key}`: {v:?} (expected e.g. \"10s\", \"500ms\", \"2m\")")
    })?;
    Ok(match unit {
        "ms" => std::time::Duration::from_millis(n),
        "s" | "" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n * 60),
        _ => bail!("bad value for `{key}`: {v:?} (units: ms, s, m)"),
    })
}

impl Config {
    /// Parses and validates configuration text.
    ///
    /// # Errors
    /// Names the key that is unknown or has a bad value.
    pub fn parse(text: &str) -> Result<Config> {
        // toml's message quotes the offending line, so it names the key.
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))?;
        let state_dir = raw.state_dir.unwrap_or_else(|| "/var/lib/thinsnap".into());
        if !state_dir.is_absolute() {
            bail!(
                "bad value for `state_dir`: {:?} must be an absolute path",
                state_dir
            );
        }
        let socket = raw
            .socket
            .unwrap_or_else(|| "/run/thinsnap/thinsnap.sock".into());
        if !socket.is_absolute() {
            bail!(
                "bad value for `socket`: {:?} must be an absolute path",
                socket
            );
        }
        let filesystem: FsType = raw
            .filesystem
            .as_deref()
            .unwrap_or("ext4")
            .parse()
            .context("bad value for `filesystem`")?;
        let default_size = size("default_size", raw.default_size.as_ref(), "10G")?;
        if default_size < 64 * units::MIB {
            bail!("bad value for `default_size`: snapshots need at least 64M");
        }
        let min_free_space = percent("min_free_space", raw.min_free_space.as_deref(), "10%")?;

        let p = raw.pool;
        let pool_name = PoolName::new(p.name.as_deref().unwrap_or("default"))
            .context("bad value for `pool.name`")?;
        let block_size = size("pool.block_size", p.block_size.as_ref(), "64K")?;
        let pool_options = PoolOptions {
            block_size: Sectors(block_size / 512),
            low_water_mark: None,
            error_if_no_space: p.error_if_no_space.unwrap_or(true),
            zero_new_blocks: p.zero_new_blocks.unwrap_or(true),
            discard_passdown: true,
            direct_io: true,
        };
        if block_size % (64 * units::KIB) != 0
            || !(64 * units::KIB..=units::GIB).contains(&block_size)
        {
            bail!("bad value for `pool.block_size`: must be a multiple of 64K between 64K and 1G");
        }
        let pool_source = match p.source.as_deref().unwrap_or("loopback") {
            "loopback" => Source::Loopback {
                dir: match p.loopback.dir {
                    Some(d) if !d.as_os_str().is_empty() => {
                        if !d.is_absolute() {
                            bail!("bad value for `pool.loopback.dir`: {:?} must be an absolute path", d);
                        }
                        d
                    }
                    _ => state_dir.join("pool"),
                },
                data_size: size("pool.loopback.data_size", p.loopback.data_size.as_ref(), "100G")?,
                meta_size: size("pool.loopback.metadata_size", p.loopback.metadata_size.as_ref(), "2G")?,
            },
            "existing" => match p.existing.dm_name {
                Some(n) if !n.is_empty() => Source::Existing { dm_name: n },
                _ => bail!("`pool.existing.dm_name` is required when `pool.source` is \"existing\""),
            },
            "lvm" => {
                let vg = match p.lvm.vg {
                    Some(v) if !v.is_empty() => v,
                    _ => bail!("`pool.lvm.vg` is required when `pool.source` is \"lvm\""),
                };
                let mut lvm = LvmPool::new(&vg, p.lvm.lv.as_deref().unwrap_or("thinpool"));
                lvm.devices = p.lvm.devices;
                if let Some(d) = p.lvm.data_percent {
                    if !(1..=97).contains(&d) {
                        bail!("bad value for `pool.lvm.data_percent`: {d} (1 to 97)");
                    }
                    lvm.data_percent = d;
                }
                lvm.meta_size = match &p.lvm.metadata_size {
                    None => None,
                    Some(SizeValue::Text(s)) if s.is_empty() => None,
                    Some(v) => Some(size("pool.lvm.metadata_size", Some(v), "")?),
                };
                Source::Lvm(lvm)
            }
            other => bail!("bad value for `pool.source`: {other:?} (use \"loopback\", \"existing\" or \"lvm\")"),
        };
        let a = p.autogrow;
        let autogrow = Autogrow {
            enabled: a.enabled.unwrap_or(false),
            threshold: percent("pool.autogrow.threshold", a.threshold.as_deref(), "20%")?,
            data_step: size("pool.autogrow.data_step", a.data_step.as_ref(), "10G")?,
            metadata_step: size(
                "pool.autogrow.metadata_step",
                a.metadata_step.as_ref(),
                "256M",
            )?,
            max_data_size: size(
                "pool.autogrow.max_data_size",
                a.max_data_size.as_ref(),
                "1T",
            )?,
            max_metadata_size: size(
                "pool.autogrow.max_metadata_size",
                a.max_metadata_size.as_ref(),
                "16G",
            )?,
            check_interval: duration(
                "pool.autogrow.check_interval",
                a.check_interval.as_deref().unwrap_or("10s"),
            )?,
        };
        if autogrow.enabled && (autogrow.data_step == 0 || autogrow.metadata_step == 0) {
            bail!("bad value for `pool.autogrow.data_step`/`metadata_step`: steps must be more than 0");
        }
        if autogrow.max_metadata_size > 16 * units::GIB {
            bail!("bad value for `pool.autogrow.max_metadata_size`: thin-pool metadata is at most 16G");
        }
        let v = raw.volumes;
        let absolute = |key: &str, p: Option<PathBuf>| -> Result<Option<PathBuf>> {
            match p {
                Some(p) if p.as_os_str().is_empty() => Ok(None),
                Some(p) if !p.is_absolute() => {
                    bail!("bad value for `{key}`: {p:?} must be an absolute path")
                }
                p => Ok(p),
            }
        };
        let volumes = Volumes {
            socket: absolute("volumes.socket", v.socket)?,
            mount_dir: absolute("volumes.mount_dir", v.mount_dir)?
                .unwrap_or_else(|| state_dir.join("volumes")),
            default_size: match &v.default_size {
                Some(SizeValue::Text(t)) if t.is_empty() => default_size,
                None => default_size,
                Some(s) => size("volumes.default_size", Some(s), "")?,
            },
            filesystem: match v.filesystem.as_deref() {
                None | Some("") => filesystem,
                Some(f) => f.parse().context("bad value for `volumes.filesystem`")?,
            },
            mount_options: v.mount_options,
        };
        if volumes.socket.as_deref() == Some(socket.as_path()) {
            bail!(
                "bad value for `volumes.socket`: {:?} is containerd's `socket`; the volume plugin needs a socket of its own (e.g. \"/run/docker/plugins/thinsnap.sock\")",
                socket
            );
        }
        if volumes.default_size < default_size {
            bail!(
                "bad value for `volumes.default_size`: {} is smaller than `default_size` ({}), the size of the base filesystem every volume starts from",
                units::format_size(volumes.default_size),
                units::format_size(default_size)
            );
        }
        let metrics_listen = match raw.metrics.listen.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(a) => Some(a.parse().map_err(|_| {
                anyhow::anyhow!(
                    "bad value for `metrics.listen`: {a:?} (expected an address and port such as \"127.0.0.1:9338\")"
                )
            })?),
        };
        Ok(Config {
            state_dir,
            socket,
            filesystem,
            mkfs_options: raw.mkfs_options,
            mount_options: raw.mount_options,
            default_size,
            discard_on_remove: raw.discard_on_remove.unwrap_or(true),
            async_remove: raw.async_remove.unwrap_or(false),
            min_free_space,
            pool_name,
            pool_source,
            pool_options,
            autogrow,
            metrics_listen,
            volumes,
        })
    }

    /// Loads the configuration at `path`; a missing file at the default path means all
    /// defaults, a missing file named explicitly is an error.
    ///
    /// # Errors
    /// When the file cannot be read or is invalid.
    pub fn load(path: &Path, explicit: bool) -> Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text)
                .with_context(|| format!("invalid configuration {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(e) => {
                Err(e).with_context(|| format!("cannot read configuration {}", path.display()))
            }
        }
    }

    /// Path of the metadata store.
    pub fn store_path(&self) -> PathBuf {
        self.state_dir.join("metadata.redb")
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
            ("[volumes]\nsocket = \"plugin.sock\"", "volumes.socket"),
            ("[volumes]\nfilesystem = \"zfs\"", "volumes.filesystem"),
            ("[volumes]\ndefault_size = \"1M\"", "volumes.default_size"),
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
