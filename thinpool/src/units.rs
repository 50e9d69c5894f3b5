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

/// Parses a size such as `10G`, `512M`, `100GiB`, `4096` (bytes) or `1.5T`.
///
/// Suffixes are binary (K = 1024); `B`, `iB` and `B` after the letter are accepted.
///
/// # Errors
/// [`Error::Invalid`] for anything else, or a size of zero.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = |why: &str| Error::invalid(format!("size {s:?}"), why.to_string());
    let t = s.trim();
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
        _ => return Err(bad("unknown unit: use K, M, G or T")),
    };
    let value: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let bytes = value * mult as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(bad("must be at least one byte"));
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
