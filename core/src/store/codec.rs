//! How typed record fields are written in the store's JSON: thin ids as numbers,
//! filesystems by name. An unreadable value is a decoding error, never a default.

/// [`thinpool::ThinId`] as a JSON number.
pub mod thin_id {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};
    use thinpool::ThinId;

    /// Writes the id's number.
    pub fn serialize<S: Serializer>(id: &ThinId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(id.get())
    }

    /// Reads a number and checks it is a thin id (24 bits).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ThinId, D::Error> {
        ThinId::new(u32::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// [`thinpool::FsType`] by name (`ext4`, `xfs`).
pub mod fs_type {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};
    use thinpool::FsType;

    /// Writes the filesystem's name.
    pub fn serialize<S: Serializer>(fs: &FsType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(fs.as_str())
    }

    /// Reads a filesystem name; an unknown one is an error.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<FsType, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}
