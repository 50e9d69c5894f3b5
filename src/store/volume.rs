//! A Docker volume's durable record: its thin device, size and filesystem, where it came
//! from, and the Docker mount ids that hold it mounted (with the boot they belong to).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::record::{now_ns, State};

/// Prefix of a volume's owner in the thin-id table (`volume:<name>`).
pub const OWNER_PREFIX: &str = "volume:";

/// The durable record of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Docker's volume name.
    pub name: String,
    /// Thin device id in the pool.
    pub thin_id: u32,
    /// Thin device size in bytes.
    pub size: u64,
    /// Filesystem on the device.
    pub fs: String,
    /// The volume it was cloned from (`-o from=NAME`), if any; informational.
    pub origin: Option<String>,
    /// The options it was created with, as given.
    pub opts: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    pub created_ns: u128,
    /// Pool transaction id after the last pool change made for this volume.
    pub txn: u64,
    /// Lifecycle state.
    pub state: State,
    /// Docker mount ids holding the volume mounted (VolumeDriver.Mount without its
    /// Unmount yet). Non-empty means mounted at its mountpoint.
    pub mounts: BTreeSet<String>,
    /// The kernel boot (`/proc/sys/kernel/random/boot_id`) the mount ids were recorded in:
    /// ids of an earlier boot belong to containers that did not survive a reboot.
    pub boot_id: String,
}

impl Volume {
    /// A new volume record in state [`State::Creating`], created now.
    pub fn new(
        name: &str,
        thin_id: u32,
        size: u64,
        fs: &str,
        origin: Option<String>,
        opts: BTreeMap<String, String>,
    ) -> Volume {
        Volume {
            name: name.to_string(),
            thin_id,
            size,
            fs: fs.to_string(),
            origin,
            opts,
            created_ns: now_ns(),
            txn: 0,
            state: State::Creating,
            mounts: BTreeSet::new(),
            boot_id: String::new(),
        }
    }

    /// Its owner string in the thin-id table.
    pub fn owner(&self) -> String {
        format!("{OWNER_PREFIX}{}", self.name)
    }
}
