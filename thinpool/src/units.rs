//! Units: re-exports of device-mapper's typed sizes, thinsnap's defaults, and size parsing.

pub use devicemapper::{Bytes, DataBlocks, MetaBlocks, Sectors, SECTOR_SIZE};

use crate::error::{Error, Result};

/// Default data block size of a pool: 64 KiB.
pub const DEFAULT_BLOCK_SIZE: Sectors = Sectors(128);
/// Smallest data block size the kernel accepts: 64 KiB.
pub const MIN_BLOCK_SIZE: Sectors = Sectors(128);
/// Largest data block size the kernel accepts: 1 GiB.
pub const MAX_BLOCK_SIZE: Sectors = Sectors(2 * 1024 * 1024);
/// Size of a metadata block: 4 KiB.
pub const META_BLOCK_BYTES: u64 = 4096;

/// Bytes per KiB, MiB, GiB, TiB.
pub const KIB: u64 = 1 << 10;
/// Bytes per MiB.
pub const MIB: u64 = 1 << 20;
/// Bytes per GiB.
pub const GIB: u64 = 1 << 30;
/// Bytes per TiB.
pub const TIB: u64 = 1 << 40;

/// Converts bytes to sectors, rounding down.
pub fn bytes_to_sectors(bytes: u64) -> Sectors {
    Sectors(bytes / SECTOR_SIZE as u64)
}

/// Converts sectors to bytes.
pub fn sectors_to_bytes(sectors: Sectors) -> u64 {
    *sectors * SECTOR_SIZE as u64
}

/// Parses a size as people type it: a number, optionally with a fraction, then an optional
/// unit: `4096` (bytes), `512m`, `200M`, `1G`, `1GB`, `1GiB`, `1.5T`.
///
/// Every unit is binary, as in Docker's and LVM's sizes: `K`, `KB` and `KiB` all mean 1024
/// bytes, `M`/`MB`/`MiB` 1024², `G`/`GB`/`GiB` 1024³, `T`/`TB`/`TiB` 1024⁴; `B` means bytes.
/// Case does not matter and a space may come before the unit.
///
/// # Errors
/// [`Error::Invalid`] saying what is wrong: not a number, a negative or zero size, an
/// unknown unit, or a size beyond 16 EiB.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = |why: &str| Error::invalid(format!("size {s:?}"), why.to_string());
    let t = s.trim();
    if t.starts_with('-') {
        return Err(bad("a size cannot be negative"));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad("expected a number such as 10G, 512M or 4096"));
    }
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => KIB,
        "M" | "MB" | "MIB" => MIB,
        "G" | "GB" | "GIB" => GIB,
        "T" | "TB" | "TIB" => TIB,
        _ => {
            return Err(bad(
                "unknown unit: use K, M, G or T (binary: 1G, 1GB and 1GiB all mean 1024 MiB)",
            ))
        }
    };
    let value: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let bytes = value * mult as f64;
    if bytes == 0.0 {
        return Err(bad("a size must be more than zero"));
    }
    if bytes < 1.0 {
        return Err(bad("a size must be at least one byte"));
    }
    if bytes >= u64::MAX as f64 {
        return Err(bad("far too large"));
    }
    Ok(bytes as u64)
}

/// Formats bytes for people: `1.5 GiB`, `512 MiB`, `12 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10G").unwrap(), 10 * GIB);
        assert_eq!(parse_size("512MiB").unwrap(), 512 * MIB);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5T").unwrap(), 3 * TIB / 2);
        assert_eq!(parse_size("64k").unwrap(), 64 * KIB);
        for bad in ["", "G", "10X", "-1G", "0", "1.2.3G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    /// The spellings people type (docs/docker.md, "Sizes"): every unit is binary.
    #[test]
    fn sizes_as_people_type_them() {
        for (text, bytes) in [
            ("1G", GIB),
            ("1GB", GIB),
            ("1GiB", GIB),
            ("1g", GIB),
            ("1gb", GIB),
            ("1 GiB", GIB),
            ("512m", 512 * MIB),
            ("512M", 512 * MIB),
            ("512MB", 512 * MIB),
            ("200M", 200 * MIB),
            ("200MiB", 200 * MIB),
            ("50G", 50 * GIB),
            ("0.5G", 512 * MIB),
            ("2T", 2 * TIB),
            ("1024K", MIB),
            ("1048576", MIB),
            ("1048576B", MIB),
            (" 1G ", GIB),
        ] {
            assert_eq!(parse_size(text).unwrap(), bytes, "{text:?}");
        }
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        for (text, why) in [
            ("0", "more than zero"),
            ("0G", "more than zero"),
            ("0.0M", "more than zero"),
            ("-1G", "cannot be negative"),
            ("-0", "cannot be negative"),
            (" -512M", "cannot be negative"),
            ("0.1", "at least one byte"),
            ("1X", "unknown unit"),
            ("1GBB", "unknown unit"),
            ("1P", "unknown unit"),
            ("lots", "expected a number"),
            ("", "expected a number"),
            ("1.2.3G", "not a number"),
            ("+1G", "expected a number"),
            ("99999999999T", "far too large"),
        ] {
            let e = parse_size(text).unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains(&format!("{text:?}")),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn sizes_format() {
        assert_eq!(format_size(12), "12 B");
        assert_eq!(format_size(10 * GIB), "10 GiB");
        assert_eq!(format_size(3 * GIB / 2), "1.5 GiB");
    }

    #[test]
    fn sector_conversions() {
        assert_eq!(bytes_to_sectors(64 * KIB), DEFAULT_BLOCK_SIZE);
        assert_eq!(sectors_to_bytes(Sectors(2)), 1024);
    }
}
