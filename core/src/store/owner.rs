//! Who owns a thin device: a snapshot (by key), the base device of a filesystem, or a
//! Docker volume (by name). Every thin id thinsnap allocates has exactly one owner.

use std::fmt;

use thinpool::{FsType, ThinId};

use super::StoreError;

/// The owner of a thin device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A containerd snapshot, by key.
    Snapshot(String),
    /// The base device every snapshot (and volume) of a filesystem descends from.
    Base(FsType),
    /// A Docker volume, by name.
    Volume(String),
    /// A removed snapshot's device waiting to be reclaimed (its tombstone).
    Reclaim(ThinId),
}

const SNAPSHOT: &str = "snapshot:";
const BASE: &str = "base:";
const VOLUME: &str = "volume:";
const RECLAIM: &str = "reclaim:";

impl Owner {
    /// How the owner is written in the thin-id table (`snapshot:<key>`, `base:<fs>`,
    /// `volume:<name>`): unambiguous, whatever a snapshot key holds.
    pub fn encode(&self) -> String {
        match self {
            Owner::Snapshot(k) => format!("{SNAPSHOT}{k}"),
            Owner::Base(fs) => format!("{BASE}{fs}"),
            Owner::Volume(n) => format!("{VOLUME}{n}"),
            Owner::Reclaim(id) => format!("{RECLAIM}{id}"),
        }
    }

    /// Reads what [`Owner::encode`] wrote.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] for anything else.
    pub fn decode(text: &str) -> Result<Owner, StoreError> {
        let bad = || StoreError::Corrupt(format!("thin-id owner {text:?} is unreadable"));
        if let Some(k) = text.strip_prefix(SNAPSHOT) {
            Ok(Owner::Snapshot(k.to_string()))
        } else if let Some(fs) = text.strip_prefix(BASE) {
            Ok(Owner::Base(fs.parse().map_err(|_| bad())?))
        } else if let Some(n) = text.strip_prefix(VOLUME) {
            Ok(Owner::Volume(n.to_string()))
        } else if let Some(id) = text.strip_prefix(RECLAIM) {
            let id = id.parse().ok().and_then(|n| ThinId::new(n).ok());
            Ok(Owner::Reclaim(id.ok_or_else(bad)?))
        } else {
            Err(bad())
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Snapshot(k) => write!(f, "snapshot {k:?}"),
            Owner::Base(fs) => write!(f, "the {fs} base device"),
            Owner::Volume(n) => write!(f, "volume {n:?}"),
            Owner::Reclaim(id) => write!(f, "the removed snapshot device {id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip_even_when_a_key_looks_like_another_owner() {
        for o in [
            Owner::Snapshot("default/1/sha256:abc".into()),
            Owner::Snapshot("base:ext4".into()),
            Owner::Snapshot("volume:x".into()),
            Owner::Base(FsType::Xfs),
            Owner::Volume("data".into()),
            Owner::Reclaim(ThinId::new(7).unwrap()),
        ] {
            assert_eq!(Owner::decode(&o.encode()).unwrap(), o);
        }
        assert!(Owner::decode("base:btrfs").is_err());
        assert!(Owner::decode("plain").is_err());
    }
}
