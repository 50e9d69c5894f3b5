//! Snapshot labels thinsnap reads or writes, and containerd's limits on keys and labels.

use std::collections::BTreeMap;

use thinpool::units;

use crate::error::{Error, Result};

/// Label giving a snapshot's thin device size, e.g. `20G` (thinsnap's own).
pub const SIZE_LABEL: &str = "containerd.io/snapshot/thinsnap.size";
/// containerd's label giving a snapshot's maximum size in bytes (containerd 2.4).
pub const MAX_SIZE_LABEL: &str = "containerd.io/snapshot/max-size";
/// containerd's remote-snapshotter label: the chain id a Prepare would create.
pub const REF_LABEL: &str = "containerd.io/snapshot.ref";
/// Label on a snapshot containerd did not make and does not know of (the migration from
/// Docker's devicemapper driver adopts its layers and containers with it; the value says
/// where it came from). containerd's garbage collector removes every snapshot of its
/// snapshotters that its own metadata does not name, so Remove refuses a snapshot with this
/// label (FailedPrecondition, which the collector passes over). It goes when containerd
/// takes the snapshot over (a Prepare whose [`REF_LABEL`] names it: containerd's pull finds
/// a layer there already), or when someone removes the label: `thinsnap snapshot rm` does
/// that first.
pub const KEEP_LABEL: &str = "containerd.io/snapshot/thinsnap.keep";
/// Label on every layer snapshot an import commits: the image it came with (the `--ref`
/// given, else the name the archive records, else the archive's file name).
pub const IMAGE_LABEL: &str = "containerd.io/snapshot/thinsnap.image";
/// Label on the active snapshot of a layer being imported: the importing process
/// ([`crate::process`]); the engine removes the snapshot once that process is gone.
pub const IMPORTING_LABEL: &str = "containerd.io/snapshot/thinsnap.importing";
/// Label on the temporary view an export reads a committed snapshot through: the exporting
/// process ([`crate::process`]), as for [`IMPORTING_LABEL`].
pub const EXPORTING_LABEL: &str = "containerd.io/snapshot/thinsnap.exporting";
/// Longest accepted snapshot key, in bytes.
pub const MAX_KEY_LEN: usize = 4096;
/// Longest accepted label key plus value, in bytes (containerd's limit).
pub const MAX_LABEL_LEN: usize = 4096;

/// Checks a snapshot key.
///
/// # Errors
/// InvalidArgument when it is empty or longer than [`MAX_KEY_LEN`].
pub fn validate_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} must not be empty")));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes long; the limit is {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(())
}

/// Checks labels as containerd does: key plus value at most 4096 bytes, keys non-empty.
///
/// # Errors
/// InvalidArgument naming the offending label.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        if k.is_empty() {
            return Err(Error::InvalidArgument(
                "label keys must not be empty".into(),
            ));
        }
        if k.len() + v.len() > MAX_LABEL_LEN {
            let short: String = k.chars().take(64).collect();
            return Err(Error::InvalidArgument(format!(
                "label key and value length ({} bytes) greater than maximum size ({MAX_LABEL_LEN} bytes), key: {short}",
                k.len() + v.len()
            )));
        }
    }
    Ok(())
}

/// The size a snapshot asks for in its labels ([`SIZE_LABEL`], [`MAX_SIZE_LABEL`]; the
/// larger wins), if any.
///
/// # Errors
/// InvalidArgument when a size label cannot be read.
pub fn requested_size(labels: &BTreeMap<String, String>) -> Result<Option<u64>> {
    let mut size = None;
    for label in [SIZE_LABEL, MAX_SIZE_LABEL] {
        if let Some(v) = labels.get(label) {
            let bytes = units::parse_size(v)
                .map_err(|e| Error::InvalidArgument(format!("label {label}: {e}")))?;
            size = Some(size.map_or(bytes, |s: u64| s.max(bytes)));
        }
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("key", "a").is_ok());
        assert!(matches!(
            validate_key("key", ""),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            validate_key("key", &"x".repeat(MAX_KEY_LEN + 1)),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn labels_are_validated_like_containerd() {
        let mut l = BTreeMap::new();
        l.insert("k".to_string(), "v".repeat(MAX_LABEL_LEN - 1));
        assert!(validate_labels(&l).is_ok());
        l.insert("k".to_string(), "v".repeat(MAX_LABEL_LEN));
        let e = validate_labels(&l).unwrap_err();
        assert!(e.to_string().contains("greater than maximum size"), "{e}");
        let mut l = BTreeMap::new();
        l.insert(String::new(), "v".into());
        assert!(matches!(
            validate_labels(&l),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn size_labels() {
        let mut l = BTreeMap::new();
        assert_eq!(requested_size(&l).unwrap(), None);
        l.insert(SIZE_LABEL.to_string(), "20G".to_string());
        assert_eq!(requested_size(&l).unwrap(), Some(20 * units::GIB));
        l.insert(MAX_SIZE_LABEL.to_string(), (30 * units::GIB).to_string());
        assert_eq!(
            requested_size(&l).unwrap(),
            Some(30 * units::GIB),
            "the larger wins"
        );
        for (text, bytes) in [("1GB", units::GIB), ("512m", 512 * units::MIB)] {
            let l = BTreeMap::from([(SIZE_LABEL.to_string(), text.to_string())]);
            assert_eq!(requested_size(&l).unwrap(), Some(bytes), "{text}");
        }
        for (text, why) in [
            ("lots", "expected a number"),
            ("0", "more than zero"),
            ("-5G", "cannot be negative"),
        ] {
            for label in [SIZE_LABEL, MAX_SIZE_LABEL] {
                let l = BTreeMap::from([(label.to_string(), text.to_string())]);
                let e = requested_size(&l).unwrap_err();
                assert!(
                    matches!(&e, Error::InvalidArgument(m) if m.contains(label) && m.contains(why)),
                    "{label}={text}: {e}"
                );
            }
        }
    }
}
