//! The settings of a pool's thin-pool table, shared by the pool and the LVM layer that
//! creates pools for it.

use devicemapper::{DataBlocks, Sectors};

use crate::units;

/// Settings of a pool's thin-pool table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolOptions {
    /// Data block size (allocation unit), 64 KiB to 1 GiB, a multiple of 64 KiB.
    pub block_size: Sectors,
    /// Low-water mark in data blocks: the kernel raises an event when free blocks drop
    /// below it. `None`: a tenth of the data blocks.
    pub low_water_mark: Option<DataBlocks>,
    /// Fail writes at once when out of space, instead of queueing them for 60 s.
    pub error_if_no_space: bool,
    /// Zero newly provisioned blocks, so no data of a deleted device leaks into a new one.
    pub zero_new_blocks: bool,
    /// Pass discards down to the data device, returning space to a sparse file or SSD.
    pub discard_passdown: bool,
    /// Use direct I/O on loop devices where possible.
    pub direct_io: bool,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            block_size: units::DEFAULT_BLOCK_SIZE,
            low_water_mark: None,
            error_if_no_space: true,
            zero_new_blocks: true,
            discard_passdown: true,
            direct_io: true,
        }
    }
}
