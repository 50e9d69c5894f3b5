//! Every device-mapper name and uuid thinsnap creates is built here, nowhere else.
//!
//! Names are deterministic, so a restarted daemon finds and re-adopts what is live:
//! `thinsnap-<pool>-pool` for a loopback pool's thin-pool target and `thinsnap-<pool>-<id>`
//! for thin device `<id>` of pool `<pool>`. The dm uuid is the same string, so leftovers can
//! be found by prefix. Pool names are at most 32 characters of `[a-z0-9_]` and thin ids are
//! below 2^24 (8 decimal digits), so a name is at most 9 + 32 + 1 + 8 = 50 bytes, well under
//! device-mapper's 127-byte limit.

use std::{fmt, str::FromStr};

use devicemapper::{DmName, DmNameBuf, DmUuidBuf};

use crate::error::{Error, Result};

/// Prefix of every dm device thinsnap creates.
pub const PREFIX: &str = "thinsnap-";

/// Longest accepted pool name.
pub const MAX_POOL_NAME_LEN: usize = 32;

/// A validated pool name: 1 to 32 characters of `[a-z0-9_]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolName(String);

impl PoolName {
    /// Validates `name`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `name` is empty, too long or has other characters.
    pub fn new(name: &str) -> Result<PoolName> {
        if name.is_empty() || name.len() > MAX_POOL_NAME_LEN {
            return Err(Error::invalid(
                format!("pool name {name:?}"),
                format!("must be 1 to {MAX_POOL_NAME_LEN} characters long"),
            ));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(Error::invalid(
                format!("pool name {name:?}"),
                "only lowercase letters, digits and '_' are allowed",
            ));
        }
        Ok(PoolName(name.to_string()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for PoolName {
    type Err = Error;
    fn from_str(s: &str) -> Result<PoolName> {
        PoolName::new(s)
    }
}

/// A thin device id inside a pool: the kernel allows 24 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ThinId(u32);

impl ThinId {
    /// Largest thin id the kernel accepts.
    pub const MAX: u32 = (1 << 24) - 1;

    /// Validates `id`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `id` is above [`ThinId::MAX`].
    pub fn new(id: u32) -> Result<ThinId> {
        if id > Self::MAX {
            return Err(Error::invalid(
                format!("thin id {id}"),
                format!("must be at most {}", Self::MAX),
            ));
        }
        Ok(ThinId(id))
    }

    /// The id as a number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for ThinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

fn dm_pair(s: &str) -> (DmNameBuf, DmUuidBuf) {
    // Pool names are validated and ids bounded (module docs): the name is always valid.
    (
        DmNameBuf::new(s.to_string()).expect("thinsnap dm names are short ASCII"),
        DmUuidBuf::new(s.to_string()).expect("thinsnap dm uuids are short ASCII"),
    )
}

/// Name and uuid of a loopback pool's thin-pool device: `thinsnap-<pool>-pool`.
pub fn pool_names(pool: &PoolName) -> (DmNameBuf, DmUuidBuf) {
    dm_pair(&format!("{PREFIX}{pool}-pool"))
}

/// Name and uuid of thin device `id` of `pool`: `thinsnap-<pool>-<id>`.
pub fn thin_names(pool: &PoolName, id: ThinId) -> (DmNameBuf, DmUuidBuf) {
    dm_pair(&format!("{PREFIX}{pool}-{id}"))
}

/// Parses a thin device name of `pool` back to its id; `None` for any other name.
pub fn parse_thin_name(pool: &PoolName, name: &DmName) -> Option<ThinId> {
    let rest = name
        .to_string()
        .strip_prefix(PREFIX)?
        .strip_prefix(pool.as_str())?
        .strip_prefix('-')?
        .to_string();
    if rest.is_empty()
        || !rest.bytes().all(|b| b.is_ascii_digit())
        || rest.starts_with('0') && rest.len() > 1
    {
        return None;
    }
    ThinId::new(rest.parse().ok()?).ok()
}

/// Device-mapper name of an LVM logical volume: hyphens in VG and LV names are doubled.
pub fn lvm_dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_are_validated() {
        assert!(PoolName::new("default").is_ok());
        assert!(PoolName::new("a_1").is_ok());
        assert!(PoolName::new("").is_err());
        assert!(PoolName::new("Has-Upper").is_err());
        assert!(PoolName::new("dash-ed").is_err());
        assert!(PoolName::new(&"a".repeat(33)).is_err());
    }

    #[test]
    fn thin_names_round_trip() {
        let pool = PoolName::new("p1").unwrap();
        let id = ThinId::new(ThinId::MAX).unwrap();
        let (name, uuid) = thin_names(&pool, id);
        assert_eq!(name.to_string(), "thinsnap-p1-16777215");
        assert_eq!(uuid.to_string(), name.to_string());
        assert_eq!(parse_thin_name(&pool, &name), Some(id));
        let longest = PoolName::new(&"z".repeat(MAX_POOL_NAME_LEN)).unwrap();
        assert!(thin_names(&longest, id).0.to_string().len() < 127);
    }

    #[test]
    fn foreign_names_do_not_parse() {
        let pool = PoolName::new("p1").unwrap();
        for n in [
            "thinsnap-p1-pool",
            "thinsnap-p2-3",
            "thinsnap-p1-",
            "other",
            "thinsnap-p1-007",
            "thinsnap-p1-99999999",
        ] {
            assert_eq!(
                parse_thin_name(&pool, &DmNameBuf::new(n.into()).unwrap()),
                None,
                "{n}"
            );
        }
    }

    #[test]
    fn thin_ids_are_24_bit() {
        assert!(ThinId::new(1 << 24).is_err());
    }

    #[test]
    fn lvm_names_double_hyphens() {
        assert_eq!(lvm_dm_name("my-vg", "thin-pool"), "my--vg-thin--pool");
    }
}
