//! A Docker volume's durable record: its thin device, where it came from, and the Docker
//! mount ids that hold it mounted (with the boot they belong to).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{record::Device, Owner};
use crate::time::now_ns;

/// The durable record of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Docker's volume name.
    pub name: String,
    /// Its thin device.
    #[serde(flatten)]
    pub device: Device,
    /// The volume it was cloned from (`-o from=NAME`), if any; informational.
    pub origin: Option<String>,
    /// The options it was created with, as given.
    pub opts: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    pub created_ns: u128,
    /// Docker mount ids holding the volume mounted (VolumeDriver.Mount without its
    /// Unmount yet). Non-empty means mounted at its mountpoint.
    pub mounts: BTreeSet<String>,
    /// The kernel boot (`/proc/sys/kernel/random/boot_id`) the mount ids were recorded in:
    /// ids of an earlier boot belong to containers that did not survive a reboot.
    pub boot_id: String,
    /// While a resize is unfinished: the size before it. The device (`device.size`) is
    /// already the new size, so it is never smaller than its filesystem; the filesystem
    /// may not fill it yet. Recovery, or the same resize again, finishes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize_from: Option<u64>,
}

impl Volume {
    /// A new volume record whose device is about to be created, created now.
    pub fn new(
        name: &str,
        device: Device,
        origin: Option<String>,
        opts: BTreeMap<String, String>,
    ) -> Volume {
        Volume {
            name: name.to_string(),
            device,
            origin,
            opts,
            created_ns: now_ns(),
            mounts: BTreeSet::new(),
            boot_id: String::new(),
            resize_from: None,
        }
    }

    /// Its owner in the thin-id table.
    pub fn owner(&self) -> Owner {
        Owner::Volume(self.name.clone())
    }
}
