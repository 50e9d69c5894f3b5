//! thinpool: device-mapper thin pools and thin devices for thinsnap, driven by ioctls.
//!
//! The mechanism under thinsnap: pools ([`ThinPool`]) from loopback files, an existing dm
//! pool or LVM; thin devices and snapshots inside them; loop devices; filesystems. It talks
//! to device-mapper through ioctls (the `devicemapper` crate), never `dmsetup`, and needs no
//! udev: device nodes are `/dev/dm-N`, made by devtmpfs or by [`dm::devnode`]. It knows
//! nothing of containerd. All calls are synchronous.
#![warn(missing_docs)]

pub mod cmd;
pub mod dm;
pub mod error;
pub mod failpoint;
pub mod fs;
pub mod loopback;
pub mod lvm;
pub mod metadata;
pub mod mountdir;
pub mod names;
pub mod options;
pub mod pool;
pub mod private;
pub mod thin;
pub mod units;
pub mod usage;

pub use devicemapper::{DataBlocks, Device, DmName, DmNameBuf, Sectors};
pub use dm::RemoveMode;
pub use error::{Error, Hint, Result};
pub use fs::FsType;
pub use lvm::LvmPool;
pub use mountdir::MountDir;
pub use names::{PoolName, ThinId};
pub use options::PoolOptions;
pub use pool::{PoolMode, PoolStatus, Source, ThinPool, HELD_SNAPSHOT_WAIT};
pub use thin::{ActiveThin, ThinReading, ThinUsage};
pub use usage::{Count, DeviceBlocks, MappingUsage};
