//! Reads the thin ids a pool's metadata holds, straight from the metadata device.
//!
//! The kernel has no message that lists thin devices, and running `thin_ls` would mean a
//! process per check. Instead [`crate::ThinPool::thin_ids`] asks the kernel for a metadata
//! snapshot (`reserve_metadata_snap`, a consistent, committed copy of the superblock that
//! the pool keeps intact while it is held), reads that copy's device-details btree here with
//! direct I/O, and releases the snapshot. The on-disk format is the kernel's
//! (`drivers/md/dm-thin-metadata.c`, `persistent-data/dm-btree-internal.h`): 4 KiB blocks,
//! little-endian; a btree node is a 32-byte header, `max_entries` u64 keys, then values.

use std::{
    collections::BTreeSet,
    fs::{File, OpenOptions},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::Path,
};

use crate::{
    error::{Error, Result},
    units::META_BLOCK_BYTES,
};

/// Magic number of a thin-pool metadata superblock.
pub const SUPERBLOCK_MAGIC: u64 = 27022010;
pub(crate) const SB_MAGIC: usize = 32;
pub(crate) const SB_TRANSACTION_ID: usize = 48;
/// The data space map's root; its first field is the number of data blocks.
pub(crate) const SB_DATA_SPACE_MAP_ROOT: usize = 64;
/// Root of the two-level data-mapping btree (thin id, then virtual block).
pub(crate) const SB_DATA_MAPPING_ROOT: usize = 320;
pub(crate) const SB_DEVICE_DETAILS_ROOT: usize = 328;
pub(crate) const SB_DATA_BLOCK_SIZE: usize = 336;
const NODE_FLAGS: usize = 4;
pub(crate) const NODE_BLOCKNR: usize = 8;
const NODE_NR_ENTRIES: usize = 16;
const NODE_MAX_ENTRIES: usize = 20;
const NODE_VALUE_SIZE: usize = 24;
const NODE_HEADER: usize = 32;
const INTERNAL_NODE: u32 = 1;
const LEAF_NODE: u32 = 2;
pub(crate) const MAX_DEPTH: usize = 16;

/// One btree node: its entries' keys and raw 64-bit values (child block numbers in an
/// internal node, the tree's values in a leaf).
pub(crate) struct BtreeNode {
    pub(crate) leaf: bool,
    pub(crate) keys: Vec<u64>,
    pub(crate) values: Vec<u64>,
}

/// Parses block `blocknr` (read as `b`) as a btree node whose values are 64 bits wide.
pub(crate) fn parse_node(reader: &Reader<'_>, blocknr: u64, b: &[u8]) -> Result<BtreeNode> {
    let flags = u32_at(b, NODE_FLAGS);
    let nr = u32_at(b, NODE_NR_ENTRIES) as usize;
    let max = u32_at(b, NODE_MAX_ENTRIES) as usize;
    let value_size = u32_at(b, NODE_VALUE_SIZE) as usize;
    let values = NODE_HEADER + 8 * max;
    if nr > max || value_size != 8 || values + value_size * max > b.len() {
        return Err(reader.corrupt(format!("btree node {blocknr} has an impossible header")));
    }
    if u64_at(b, NODE_BLOCKNR) != blocknr {
        return Err(reader.corrupt(format!(
            "btree node {blocknr} says it is block {}",
            u64_at(b, NODE_BLOCKNR)
        )));
    }
    let leaf = match (flags & INTERNAL_NODE != 0, flags & LEAF_NODE != 0) {
        (true, false) => false,
        (false, true) => true,
        _ => {
            return Err(reader.corrupt(format!("btree node {blocknr} is neither internal nor leaf")))
        }
    };
    Ok(BtreeNode {
        leaf,
        keys: (0..nr).map(|i| u64_at(b, NODE_HEADER + 8 * i)).collect(),
        values: (0..nr).map(|i| u64_at(b, values + 8 * i)).collect(),
    })
}

/// A 4 KiB block buffer aligned for direct I/O.
#[derive(Clone)]
#[repr(C, align(4096))]
pub(crate) struct Block(pub(crate) [u8; META_BLOCK_BYTES as usize]);

pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

pub(crate) struct Reader<'a> {
    file: File,
    path: &'a Path,
    pub(crate) nr_blocks: u64,
}

impl<'a> Reader<'a> {
    /// Opens metadata device (or file) `meta` for direct reads.
    pub(crate) fn open(meta: &'a Path) -> Result<Reader<'a>> {
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(meta)
        {
            // A metadata file on a filesystem without direct I/O (tmpfs): the pool is not
            // active, so the page cache holds nothing stale.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => File::open(meta),
            r => r,
        }
        .map_err(|e| Error::io("open metadata device", meta, e))?;
        // Bounds come from the device: the superblock's block count lags behind a grown
        // device.
        let nr_blocks = crate::dm::block_size_bytes(meta)? / META_BLOCK_BYTES;
        Ok(Reader {
            file,
            path: meta,
            nr_blocks,
        })
    }

    /// Reads `count` consecutive metadata blocks from `first` in one direct read.
    pub(crate) fn read_run(&self, first: u64, count: usize) -> Result<Vec<Block>> {
        if first.saturating_add(count as u64) > self.nr_blocks {
            return Err(self.corrupt(format!(
                "blocks {first}..{} are beyond the {} metadata blocks",
                first.saturating_add(count as u64),
                self.nr_blocks
            )));
        }
        let mut blocks = vec![Block([0; META_BLOCK_BYTES as usize]); count];
        // SAFETY: Block is repr(C) around a byte array, so the vector's elements are
        // `count` contiguous, 4 KiB-aligned runs of initialized bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                blocks.as_mut_ptr().cast::<u8>(),
                count * META_BLOCK_BYTES as usize,
            )
        };
        self.file
            .read_exact_at(bytes, first * META_BLOCK_BYTES)
            .map_err(|e| Error::io("read metadata blocks from", self.path, e))?;
        Ok(blocks)
    }

    pub(crate) fn read(&self, blocknr: u64) -> Result<Box<Block>> {
        if blocknr >= self.nr_blocks {
            return Err(self.corrupt(format!(
                "block {blocknr} is beyond the {} metadata blocks",
                self.nr_blocks
            )));
        }
        let mut block = Box::new(Block([0; META_BLOCK_BYTES as usize]));
        self.file
            .read_exact_at(&mut block.0, blocknr * META_BLOCK_BYTES)
            .map_err(|e| Error::io("read metadata block from", self.path, e))?;
        Ok(block)
    }

    pub(crate) fn corrupt(&self, why: String) -> Error {
        Error::invalid(
            format!("thin-pool metadata on {}", self.path.display()),
            format!("{why}; check it with thin_check"),
        )
    }

    /// Walks the device-details btree at `blocknr`: thin id -> creation time (the pool's
    /// snapshot counter when the device was created; a leaf value is `mapped_blocks` u64,
    /// `transaction_id` u64, `creation_time` u32, `snapshotted_time` u32).
    pub(crate) fn walk(
        &self,
        blocknr: u64,
        depth: usize,
        ids: &mut std::collections::BTreeMap<u32, u32>,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(self.corrupt("device-details btree is too deep".into()));
        }
        let block = self.read(blocknr)?;
        let b = &block.0;
        let flags = u32_at(b, NODE_FLAGS);
        let nr = u32_at(b, NODE_NR_ENTRIES) as usize;
        let max = u32_at(b, NODE_MAX_ENTRIES) as usize;
        let value_size = u32_at(b, NODE_VALUE_SIZE) as usize;
        // Checked: on damaged metadata these fields can hold anything.
        let values = max.checked_mul(8).and_then(|k| k.checked_add(NODE_HEADER));
        let end = values.and_then(|v| value_size.checked_mul(max).and_then(|n| n.checked_add(v)));
        let (Some(values), Some(end)) = (values, end) else {
            return Err(self.corrupt(format!("btree node {blocknr} has an impossible header")));
        };
        let leaf_ok = flags & LEAF_NODE == 0 || value_size >= 24;
        if nr > max || !leaf_ok || end > b.len() {
            return Err(self.corrupt(format!("btree node {blocknr} has an impossible header")));
        }
        for i in 0..nr {
            let key = u64_at(b, NODE_HEADER + 8 * i);
            if flags & INTERNAL_NODE != 0 {
                self.walk(u64_at(b, values + value_size * i), depth + 1, ids)?;
            } else if flags & LEAF_NODE != 0 {
                let id = u32::try_from(key)
                    .map_err(|_| self.corrupt(format!("thin id {key} is out of range")))?;
                ids.insert(id, u32_at(b, values + value_size * i + 16));
            } else {
                return Err(
                    self.corrupt(format!("btree node {blocknr} is neither internal nor leaf"))
                );
            }
        }
        Ok(())
    }
}

/// What a thin-pool metadata superblock records, for tools that look at a pool's metadata
/// without activating it (e.g. a migration's dry run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// The pool's transaction id.
    pub transaction_id: u64,
    /// The data block size in 512-byte sectors.
    pub data_block_size: u32,
    /// Every thin id in the device-details btree.
    pub thin_ids: BTreeSet<u32>,
}

/// Reads the superblock copy at block `superblock` of metadata device (or file) `meta`: the
/// `held_metadata_root` of a pool with a reserved metadata snapshot, or 0 for the primary
/// superblock of a pool that is not active (reading the primary superblock of an active
/// pool races with the kernel's commits).
///
/// # Errors
/// [`Error::Io`] when `meta` cannot be read; [`Error::Invalid`] when it holds no thin-pool
/// metadata or the metadata is damaged.
pub fn read_superblock(meta: &Path, superblock: u64) -> Result<Superblock> {
    let reader = Reader::open(meta)?;
    let sb = reader.read(superblock)?;
    if u64_at(&sb.0, SB_MAGIC) != SUPERBLOCK_MAGIC {
        return Err(reader.corrupt(format!("block {superblock} is not a thin-pool superblock")));
    }
    let root = u64_at(&sb.0, SB_DEVICE_DETAILS_ROOT);
    let mut ids = std::collections::BTreeMap::new();
    reader.walk(root, 0, &mut ids)?;
    Ok(Superblock {
        transaction_id: u64_at(&sb.0, SB_TRANSACTION_ID),
        data_block_size: u32_at(&sb.0, SB_DATA_BLOCK_SIZE),
        thin_ids: ids.into_keys().collect(),
    })
}

/// The thin ids recorded in the superblock copy at block `superblock` of metadata device
/// `meta` (see [`read_superblock`]).
///
/// # Errors
/// As [`read_superblock`].
pub fn thin_ids(meta: &Path, superblock: u64) -> Result<BTreeSet<u32>> {
    read_superblock(meta, superblock).map(|sb| sb.thin_ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_node_headers_are_errors_not_panics() {
        let path = std::env::temp_dir().join(format!("thinpool-meta-{}", std::process::id()));
        let mut data = vec![0u8; 2 * META_BLOCK_BYTES as usize];
        data[SB_MAGIC..SB_MAGIC + 8].copy_from_slice(&SUPERBLOCK_MAGIC.to_le_bytes());
        data[SB_DEVICE_DETAILS_ROOT..SB_DEVICE_DETAILS_ROOT + 8]
            .copy_from_slice(&1u64.to_le_bytes());
        let node = META_BLOCK_BYTES as usize;
        let put = |d: &mut Vec<u8>, off: usize, v: u32| {
            d[node + off..node + off + 4].copy_from_slice(&v.to_le_bytes())
        };
        put(&mut data, NODE_FLAGS, LEAF_NODE);
        put(&mut data, NODE_NR_ENTRIES, 1);
        put(&mut data, NODE_MAX_ENTRIES, u32::MAX);
        put(&mut data, NODE_VALUE_SIZE, u32::MAX);
        std::fs::write(&path, &data).unwrap();
        let err = read_superblock(&path, 0).unwrap_err().to_string();
        assert!(err.contains("impossible header"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
