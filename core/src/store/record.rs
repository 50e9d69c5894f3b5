//! The durable records of snapshots and base devices, and the [`Device`] part every record
//! that owns a thin device shares.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thinpool::{FsType, ThinId};

use super::{codec, Owner};
use crate::time::now_ns;

/// containerd's snapshot kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Writable, prepared from a committed parent.
    Active,
    /// Read-only view of a committed parent.
    View,
    /// Immutable; may be a parent.
    Committed,
}

impl Kind {
    /// containerd's name of the kind, as used in filters.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        }
    }
}

/// Where a record is in its device's lifecycle; the trying states are finished or rolled
/// back by recovery after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The thin device is being created (trying).
    Creating,
    /// Complete and usable.
    Ready,
    /// Being removed (trying); invisible to containerd.
    Removing,
}

/// Disk usage of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes the thin device has mapped.
    pub bytes: u64,
    /// Inodes in use in its filesystem.
    pub inodes: u64,
}

/// The thin device a record owns: the part of snapshots, base devices and volumes the
/// device lifecycle works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Thin device id in the pool.
    #[serde(with = "codec::thin_id")]
    pub thin_id: ThinId,
    /// Thin device (and filesystem) size in bytes.
    pub size: u64,
    /// Filesystem on the device.
    #[serde(with = "codec::fs_type")]
    pub fs: FsType,
    /// Lifecycle state.
    pub state: State,
}

impl Device {
    /// A device about to be created (state [`State::Creating`]).
    pub fn creating(thin_id: ThinId, size: u64, fs: FsType) -> Device {
        Device {
            thin_id,
            size,
            fs,
            state: State::Creating,
        }
    }
}

/// The durable record of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// containerd's key (the name, once committed).
    pub key: String,
    /// Its kind.
    pub kind: Kind,
    /// Key of the committed parent, if any.
    pub parent: Option<String>,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    pub created_ns: u128,
    /// Last update, nanoseconds since the epoch.
    pub updated_ns: u128,
    /// Its thin device.
    #[serde(flatten)]
    pub device: Device,
    /// Usage, recorded at commit.
    pub usage: Option<Usage>,
    /// Key before commit, for crash recovery and diagnostics.
    #[serde(default)]
    pub committed_from: Option<String>,
}

impl Record {
    /// A new record whose device is about to be created, created now.
    pub fn new(
        key: &str,
        kind: Kind,
        parent: Option<String>,
        labels: BTreeMap<String, String>,
        device: Device,
    ) -> Record {
        let now = now_ns();
        Record {
            key: key.to_string(),
            kind,
            parent,
            labels,
            created_ns: now,
            updated_ns: now,
            device,
            usage: None,
            committed_from: None,
        }
    }

    /// Its owner in the thin-id table.
    pub fn owner(&self) -> Owner {
        Owner::Snapshot(self.key.clone())
    }
}

/// The durable record of a base device: the empty filesystem every snapshot (and volume)
/// of one filesystem descends from, formatted once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    /// Its thin device (its `fs` names the base).
    #[serde(flatten)]
    pub device: Device,
    /// Whether the `lost+found` mkfs made was removed, so snapshots hold only what their
    /// layers put there (bases of earlier versions have it until the next start).
    #[serde(default)]
    pub lost_found_removed: bool,
}

impl Base {
    /// The record of a base device on `device` whose filesystem still has its `lost+found`.
    pub fn new(device: Device) -> Base {
        Base {
            device,
            lost_found_removed: false,
        }
    }

    /// Its owner in the thin-id table.
    pub fn owner(&self) -> Owner {
        Owner::Base(self.device.fs)
    }
}

/// A removed snapshot's thin device, waiting to be reclaimed (discarded, deactivated and
/// deleted) in the background. The snapshot left the namespace when this was written (its
/// key is free at once); the tombstone is the intent that reclamation, or recovery after a
/// crash, finishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The device (state Removing).
    #[serde(flatten)]
    pub device: Device,
    /// The key the snapshot had, for messages.
    pub was: String,
    /// When it was removed, in nanoseconds since the epoch.
    pub removed_ns: u128,
}

impl Tombstone {
    /// The tombstone of `record`'s device.
    pub fn of(record: &Record) -> Tombstone {
        Tombstone {
            device: Device {
                state: State::Removing,
                ..record.device
            },
            was: record.key.clone(),
            removed_ns: now_ns(),
        }
    }

    /// Its owner in the thin-id table.
    pub fn owner(&self) -> Owner {
        Owner::Reclaim(self.device.thin_id)
    }
}
