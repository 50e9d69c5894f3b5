//! A snapshot's (or base device's) durable record.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

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

/// Where a record is in its lifecycle; the trying states are finished or rolled back at
/// startup after a crash.
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

/// The durable record of a snapshot or base device.
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
    /// Thin device id in the pool.
    pub thin_id: u32,
    /// Thin device size in bytes.
    pub size: u64,
    /// Filesystem on the device.
    pub fs: String,
    /// Pool transaction id after the last pool change made for this record.
    pub txn: u64,
    /// Lifecycle state.
    pub state: State,
    /// Usage, recorded at commit.
    pub usage: Option<Usage>,
    /// Key before commit, for crash recovery and diagnostics.
    #[serde(default)]
    pub committed_from: Option<String>,
}

/// Now, in nanoseconds since the epoch.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant).
pub fn civil(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Nanoseconds since the epoch as RFC 3339 UTC, e.g. `2024-05-01T12:00:00Z` (Docker's
/// `CreatedAt`).
pub fn rfc3339(ns: u128) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Record {
    /// A new record in state [`State::Creating`], created now.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: &str,
        kind: Kind,
        parent: Option<String>,
        labels: BTreeMap<String, String>,
        thin_id: u32,
        size: u64,
        fs: &str,
        txn: u64,
    ) -> Record {
        let now = now_ns();
        Record {
            key: key.to_string(),
            kind,
            parent,
            labels,
            created_ns: now,
            updated_ns: now,
            thin_id,
            size,
            fs: fs.to_string(),
            txn,
            state: State::Creating,
            usage: None,
            committed_from: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(1_709_210_096_500_000_000),
            "2024-02-29T12:34:56Z",
            "a leap day"
        );
    }
}
