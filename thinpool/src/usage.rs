//! How many data blocks each thin device maps, and how many of those no other device maps
//! (what `thin_ls` calls MAPPED_BLOCKS and EXCLUSIVE_BLOCKS), read from a metadata snapshot.
//!
//! The kernel reports only the mapped count of an active device. Exclusive blocks need the
//! data-mapping btree: a two-level tree whose top level maps a thin id to the root of that
//! device's own btree, which maps virtual blocks to data blocks (a leaf value is
//! `data_block << 24 | time`). A snapshot starts out as the very root of its origin, and
//! copy-on-write shadows only the nodes on the path to a write, so the devices' trees are a
//! DAG of shared subtrees. The data space map cannot answer either: its reference counts
//! count the leaves that name a block, not the devices, and a leaf an origin and its
//! snapshot still share names its blocks once.
//!
//! So [`read_mapping_usage`] reads every distinct node once (level by level, in block order,
//! with neighbouring blocks read together), orders the DAG topologically, and counts for
//! each node the number of devices whose tree reaches it (the number of paths from device
//! roots: a node appears at most once in one device's tree). A data block is then reached by
//! as many devices as the sum of that count over the leaves naming it; it is exclusive when
//! that sum is 1, and it then belongs to the one device that reaches its leaf. Mapped counts
//! are memoized per subtree.
//!
//! A device's *owned* blocks are those it provisioned itself: a mapping's time is the pool's
//! snapshot counter when its block was provisioned, so a device's own mappings are those at
//! least as new as the device (its creation time in the device-details btree), and a
//! subtree with nothing that new is one it inherited and is skipped. Until the device is
//! snapshotted they are exactly its exclusive blocks; after, they stay what it added. The cost is one read per distinct metadata node and work in
//! proportion to the distinct leaf entries: the pool's metadata, not devices × their sizes.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    hash::{BuildHasherDefault, Hasher},
    path::Path,
};

use tracing::{debug, instrument};

use crate::{
    error::Result,
    metadata::{self, BtreeNode, Reader},
    units::META_BLOCK_BYTES,
};

/// What one thin device maps, in data blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceBlocks {
    /// Data blocks the device maps, shared ones included.
    pub mapped: u64,
    /// Data blocks no other device maps now (`thin_ls`'s EXCLUSIVE_BLOCKS).
    pub exclusive: u64,
    /// Data blocks the device provisioned itself, since it was created: its mappings whose
    /// time is at least its creation time (a snapshot shares only blocks provisioned before
    /// it). They are its exclusive blocks until it is snapshotted, and stay its own figure
    /// after: what a layer added to its parent.
    pub owned: u64,
}

/// Mapped and exclusive data blocks of every thin device of a pool, as of one metadata
/// snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappingUsage {
    /// The pool's transaction id in that snapshot.
    pub transaction_id: u64,
    /// The data block size in 512-byte sectors.
    pub data_block_size: u32,
    /// Every thin id in the data-mapping tree, with its figures.
    pub devices: BTreeMap<u32, DeviceBlocks>,
    /// Distinct metadata nodes read.
    pub nodes_read: u64,
    /// Read calls made (neighbouring nodes are read together).
    pub reads: u64,
}

impl MappingUsage {
    /// Bytes in `blocks` data blocks.
    pub fn bytes(&self, blocks: u64) -> u64 {
        blocks * u64::from(self.data_block_size) * 512
    }
}

/// What [`read_mapping_usage`] counts besides mapped and owned blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Mapped and owned blocks only (one pass over the distinct nodes, no per-block work):
    /// [`DeviceBlocks::exclusive`] is 0.
    Owned,
    /// Also the blocks no other device maps, counting for each data block the devices that
    /// reach it.
    Exclusive,
}

/// Reads the mapped and exclusive blocks of every thin device from the superblock copy at
/// block `superblock` of metadata device (or file) `meta`: a held metadata snapshot's root
/// (see [`crate::ThinPool::mapping_usage`]), or 0 for a pool that is not active.
///
/// # Errors
/// [`crate::Error::Io`] when `meta` cannot be read; [`crate::Error::Invalid`] when it holds
/// no thin-pool metadata or the metadata is damaged.
#[instrument(level = "debug", skip(meta), fields(meta = %meta.display()))]
pub fn read_mapping_usage(meta: &Path, superblock: u64, what: Count) -> Result<MappingUsage> {
    let reader = Reader::open(meta)?;
    let sb = reader.read(superblock)?;
    let b = &sb.0;
    if metadata::u64_at(b, metadata::SB_MAGIC) != metadata::SUPERBLOCK_MAGIC {
        return Err(reader.corrupt(format!("block {superblock} is not a thin-pool superblock")));
    }
    // The kernel wipes the space map roots in a metadata snapshot's copy of the superblock;
    // the data device's size is then the primary superblock's (it only grows, and one
    // superblock is written whole, so a commit racing this read cannot tear it).
    let mut nr_data_blocks = metadata::u64_at(b, metadata::SB_DATA_SPACE_MAP_ROOT);
    if nr_data_blocks == 0 && superblock != 0 {
        let primary = reader.read(0)?;
        if metadata::u64_at(&primary.0, metadata::SB_MAGIC) != metadata::SUPERBLOCK_MAGIC {
            return Err(reader.corrupt("block 0 is not a thin-pool superblock".into()));
        }
        nr_data_blocks = metadata::u64_at(&primary.0, metadata::SB_DATA_SPACE_MAP_ROOT);
    }
    let mut created = BTreeMap::new();
    reader.walk(
        metadata::u64_at(b, metadata::SB_DEVICE_DETAILS_ROOT),
        0,
        &mut created,
    )?;
    let mut src = DiskNodes {
        reader: &reader,
        nodes_read: 0,
        reads: 0,
    };
    let devices = count(
        &mut src,
        metadata::u64_at(b, metadata::SB_DATA_MAPPING_ROOT),
        nr_data_blocks,
        &created,
        what,
    )?;
    let usage = MappingUsage {
        transaction_id: metadata::u64_at(b, metadata::SB_TRANSACTION_ID),
        data_block_size: metadata::u32_at(b, metadata::SB_DATA_BLOCK_SIZE),
        devices,
        nodes_read: src.nodes_read,
        reads: src.reads,
    };
    debug!(
        devices = usage.devices.len(),
        nodes = usage.nodes_read,
        reads = usage.reads,
        "read data-mapping trees"
    );
    Ok(usage)
}

/// Where btree nodes come from: the metadata device, or memory in tests.
pub(crate) trait NodeSource {
    /// The nodes at `blocks` (sorted, distinct), in that order.
    fn nodes(&mut self, blocks: &[u64]) -> Result<Vec<BtreeNode>>;
    /// An error for damaged metadata.
    fn corrupt(&self, why: String) -> crate::Error;
}

/// Neighbouring nodes closer than this many blocks are read in one call.
const MAX_GAP: u64 = 8;
/// At most this many blocks in one read (1 MiB).
const MAX_RUN: u64 = 256;

struct DiskNodes<'a> {
    reader: &'a Reader<'a>,
    nodes_read: u64,
    reads: u64,
}

impl NodeSource for DiskNodes<'_> {
    fn nodes(&mut self, blocks: &[u64]) -> Result<Vec<BtreeNode>> {
        let mut out = Vec::with_capacity(blocks.len());
        let mut i = 0;
        while i < blocks.len() {
            let first = blocks[i];
            let mut j = i + 1;
            while j < blocks.len()
                && blocks[j] - blocks[j - 1] <= MAX_GAP
                && blocks[j] - first < MAX_RUN
            {
                j += 1;
            }
            let run = self
                .reader
                .read_run(first, (blocks[j - 1] - first + 1) as usize)?;
            self.reads += 1;
            for &blocknr in &blocks[i..j] {
                let b = &run[(blocknr - first) as usize].0;
                out.push(metadata::parse_node(self.reader, blocknr, b)?);
            }
            self.nodes_read += (j - i) as u64;
            i = j;
        }
        debug_assert_eq!(META_BLOCK_BYTES, 4096);
        Ok(out)
    }

    fn corrupt(&self, why: String) -> crate::Error {
        self.reader.corrupt(why)
    }
}

/// A multiplicative hasher for block numbers (std's SipHash costs more than the counting).
#[derive(Default)]
struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type BlockMap<V> = HashMap<u64, V, BuildHasherDefault<BlockHasher>>;

/// The distinct nodes reachable from some roots.
struct Dag {
    nodes: Vec<BtreeNode>,
    index: BlockMap<usize>,
}

impl Dag {
    /// Reads every node reachable from `roots`, level by level, each distinct one once.
    fn read(src: &mut impl NodeSource, roots: impl IntoIterator<Item = u64>) -> Result<Dag> {
        let mut dag = Dag {
            nodes: Vec::new(),
            index: BlockMap::default(),
        };
        let mut level: Vec<u64> = roots.into_iter().collect();
        let mut depth = 0;
        while !level.is_empty() {
            level.sort_unstable();
            level.dedup();
            level.retain(|b| !dag.index.contains_key(b));
            if level.is_empty() {
                break;
            }
            if depth > metadata::MAX_DEPTH {
                return Err(src.corrupt("data-mapping btree is too deep".into()));
            }
            let nodes = src.nodes(&level)?;
            let mut next = Vec::new();
            for (blocknr, node) in level.iter().zip(nodes) {
                if !node.leaf {
                    next.extend_from_slice(&node.values);
                }
                dag.index.insert(*blocknr, dag.nodes.len());
                dag.nodes.push(node);
            }
            level = next;
            depth += 1;
        }
        Ok(dag)
    }

    fn idx(&self, blocknr: u64) -> usize {
        self.index[&blocknr]
    }

    /// The nodes in an order where every node comes after all its parents; an error for a
    /// cycle (damaged metadata).
    fn topological(&self, src: &impl NodeSource) -> Result<Vec<usize>> {
        let mut indegree = vec![0u32; self.nodes.len()];
        for n in &self.nodes {
            if !n.leaf {
                for c in &n.values {
                    indegree[self.idx(*c)] += 1;
                }
            }
        }
        let mut queue: VecDeque<usize> = (0..self.nodes.len())
            .filter(|&i| indegree[i] == 0)
            .collect();
        let mut order = Vec::with_capacity(self.nodes.len());
        while let Some(i) = queue.pop_front() {
            order.push(i);
            let n = &self.nodes[i];
            if !n.leaf {
                for c in &n.values {
                    let c = self.idx(*c);
                    indegree[c] -= 1;
                    if indegree[c] == 0 {
                        queue.push_back(c);
                    }
                }
            }
        }
        if order.len() != self.nodes.len() {
            return Err(src.corrupt("data-mapping btree has a cycle".into()));
        }
        Ok(order)
    }
}

/// Mapped and exclusive blocks of every device in the two-level data-mapping tree at
/// `mapping_root`, whose leaves must name data blocks below `nr_data_blocks`.
pub(crate) fn count(
    src: &mut impl NodeSource,
    mapping_root: u64,
    nr_data_blocks: u64,
    created: &BTreeMap<u32, u32>,
    what: Count,
) -> Result<BTreeMap<u32, DeviceBlocks>> {
    // The top level: thin id -> root of the device's tree.
    let top = Dag::read(src, [mapping_root])?;
    let mut roots: Vec<(u32, u64)> = Vec::new();
    for n in top.nodes.iter().filter(|n| n.leaf) {
        for (k, v) in n.keys.iter().zip(&n.values) {
            let id = u32::try_from(*k)
                .map_err(|_| src.corrupt(format!("thin id {k} is out of range")))?;
            roots.push((id, *v));
        }
    }
    roots.sort_unstable();
    if roots.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(src.corrupt("a thin id is in the data-mapping tree twice".into()));
    }

    // The devices' trees, each distinct node once.
    let dag = Dag::read(src, roots.iter().map(|r| r.1))?;
    let order = dag.topological(src)?;
    let n = dag.nodes.len();

    // How many devices reach each node (paths from device roots), and for the nodes only
    // one device reaches, which one.
    const NOBODY: u32 = u32::MAX;
    let mut reach = vec![0u32; n];
    let mut owner = vec![NOBODY; n];
    for (id, root) in &roots {
        let i = dag.idx(*root);
        reach[i] = reach[i].saturating_add(1);
        owner[i] = *id;
    }
    for &i in &order {
        let node = &dag.nodes[i];
        if node.leaf {
            continue;
        }
        for c in &node.values {
            let c = dag.idx(*c);
            reach[c] = reach[c].saturating_add(reach[i]);
            owner[c] = owner[i];
        }
    }

    // How many devices reach each data block (2 meaning two or more).
    let mut devices_of: BlockMap<u8> = BlockMap::default();
    for (i, node) in dag.nodes.iter().enumerate() {
        if !node.leaf {
            continue;
        }
        let r = reach[i].min(2) as u8;
        for v in &node.values {
            let block = v >> 24;
            if block >= nr_data_blocks {
                return Err(src.corrupt(format!(
                    "a mapping names data block {block}, beyond the pool's {nr_data_blocks}"
                )));
            }
            if what == Count::Exclusive {
                let c = devices_of.entry(block).or_insert(0);
                *c = (*c + r).min(2);
            }
        }
    }

    // Mapped blocks and the newest mapping time per subtree (children before parents),
    // exclusive blocks per owner.
    let time = |v: &u64| (v & 0xff_ffff) as u32;
    let mut newest = vec![0u32; n];
    let mut mapped = vec![0u64; n];
    let mut exclusive: BTreeMap<u32, u64> = BTreeMap::new();
    for &i in order.iter().rev() {
        let node = &dag.nodes[i];
        if node.leaf {
            mapped[i] = node.values.len() as u64;
            newest[i] = node.values.iter().map(time).max().unwrap_or(0);
            if reach[i] == 1 && what == Count::Exclusive {
                let own = node
                    .values
                    .iter()
                    .filter(|v| devices_of[&(*v >> 24)] == 1)
                    .count() as u64;
                *exclusive.entry(owner[i]).or_default() += own;
            }
        } else {
            mapped[i] = node.values.iter().map(|c| mapped[dag.idx(*c)]).sum();
            newest[i] = node
                .values
                .iter()
                .map(|c| newest[dag.idx(*c)])
                .max()
                .unwrap_or(0);
        }
    }

    // Blocks each device provisioned itself: mappings at least as new as the device. A
    // subtree with nothing that new is one it inherited: skipped whole, so each device
    // walks only the nodes written since it was created.
    let owned = |root: usize, since: u32| -> u64 {
        let mut total = 0;
        let mut stack = vec![root];
        while let Some(i) = stack.pop() {
            if newest[i] < since {
                continue;
            }
            let node = &dag.nodes[i];
            if node.leaf {
                total += node.values.iter().filter(|v| time(v) >= since).count() as u64;
            } else {
                stack.extend(node.values.iter().map(|c| dag.idx(*c)));
            }
        }
        total
    };
    Ok(roots
        .iter()
        .map(|(id, root)| {
            (
                *id,
                DeviceBlocks {
                    mapped: mapped[dag.idx(*root)],
                    exclusive: exclusive.get(id).copied().unwrap_or(0),
                    owned: owned(dag.idx(*root), created.get(id).copied().unwrap_or(0)),
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;

    /// An in-memory metadata device: nodes by block number, built the way the kernel's
    /// copy-on-write btrees are, with snapshots sharing their origin's nodes.
    #[derive(Default)]
    struct Mem {
        nodes: HashMap<u64, (bool, Vec<u64>, Vec<u64>)>,
        next: u64,
        reads: usize,
    }

    impl NodeSource for Mem {
        fn nodes(&mut self, blocks: &[u64]) -> Result<Vec<BtreeNode>> {
            self.reads += blocks.len();
            blocks
                .iter()
                .map(|b| {
                    let (leaf, keys, values) = self
                        .nodes
                        .get(b)
                        .cloned()
                        .ok_or_else(|| self.corrupt(format!("no node {b}")))?;
                    Ok(BtreeNode { leaf, keys, values })
                })
                .collect()
        }
        fn corrupt(&self, why: String) -> crate::Error {
            crate::Error::invalid("test metadata", why)
        }
    }

    impl Mem {
        fn node(&mut self, leaf: bool, keys: Vec<u64>, values: Vec<u64>) -> u64 {
            self.next += 1;
            self.nodes.insert(self.next, (leaf, keys, values));
            self.next
        }
        /// A leaf mapping virtual blocks `vblocks` to data blocks `data`.
        fn leaf(&mut self, vblocks: std::ops::Range<u64>, data: &[u64]) -> u64 {
            let keys: Vec<u64> = vblocks.collect();
            let values = data.iter().map(|d| (d << 24) | 7).collect();
            self.node(true, keys, values)
        }
        fn internal(&mut self, children: &[u64]) -> u64 {
            let keys = (0..children.len() as u64).map(|k| k * 100).collect();
            self.node(false, keys, children.to_vec())
        }
        fn top(&mut self, devices: &[(u64, u64)]) -> u64 {
            let (k, v) = devices.iter().copied().unzip();
            self.node(true, k, v)
        }
    }

    /// The reference answer: every device's tree walked in full, blocks counted per device.
    fn brute(m: &Mem, devices: &[(u64, u64)]) -> BTreeMap<u32, DeviceBlocks> {
        fn walk(m: &Mem, n: u64, out: &mut Vec<u64>) {
            let (leaf, _, values) = &m.nodes[&n];
            for v in values {
                if *leaf {
                    out.push(v >> 24);
                } else {
                    walk(m, *v, out);
                }
            }
        }
        let per: Vec<(u32, BTreeSet<u64>, u64)> = devices
            .iter()
            .map(|(id, root)| {
                let mut v = Vec::new();
                walk(m, *root, &mut v);
                let n = v.len() as u64;
                (*id as u32, v.into_iter().collect(), n)
            })
            .collect();
        per.iter()
            .map(|(id, set, n)| {
                let excl = set
                    .iter()
                    .filter(|b| per.iter().filter(|(_, s, _)| s.contains(b)).count() == 1)
                    .count() as u64;
                (
                    *id,
                    DeviceBlocks {
                        mapped: *n,
                        exclusive: excl,
                        owned: *n,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_snapshot_sharing_its_origins_root_has_nothing_exclusive() {
        let mut m = Mem::default();
        let a = m.leaf(0..3, &[10, 11, 12]);
        let b = m.leaf(3..5, &[13, 14]);
        let root = m.internal(&[a, b]);
        let devices = [(1, root), (2, root)];
        let top = m.top(&devices);
        let got = count(&mut m, top, 100, &BTreeMap::new(), Count::Exclusive).unwrap();
        assert_eq!(
            got[&1],
            DeviceBlocks {
                mapped: 5,
                exclusive: 0,
                owned: 5
            }
        );
        assert_eq!(got, brute(&m, &devices));
        // Every distinct node read once: the top leaf, the shared root and its two leaves.
        assert_eq!(m.reads, 4);
    }

    #[test]
    fn a_shared_leaf_names_its_blocks_once_but_two_devices_reach_them() {
        // The data space map would count block 10 once (one leaf names it), yet the origin
        // and the snapshot both map it: neither owns it.
        let mut m = Mem::default();
        let shared = m.leaf(0..2, &[10, 11]);
        let origin_leaf = m.leaf(2..4, &[12, 13]);
        let snap_leaf = m.leaf(2..4, &[12, 20]); // the snapshot overwrote block 3
        let origin = m.internal(&[shared, origin_leaf]);
        let snap = m.internal(&[shared, snap_leaf]);
        let devices = [(1, origin), (2, snap)];
        let top = m.top(&devices);
        let got = count(&mut m, top, 100, &BTreeMap::new(), Count::Exclusive).unwrap();
        assert_eq!(
            got[&1],
            DeviceBlocks {
                mapped: 4,
                exclusive: 1,
                owned: 4
            }
        ); // 13
        assert_eq!(
            got[&2],
            DeviceBlocks {
                mapped: 4,
                exclusive: 1,
                owned: 4
            }
        ); // 20
        assert_eq!(got, brute(&m, &devices));
    }

    #[test]
    fn chains_of_snapshots_match_a_full_walk() {
        // A chain of layers and containers with shared subtrees several levels deep, where
        // some data blocks are named by two leaves (shadowed copies) of different devices.
        let mut m = Mem::default();
        let mut next_data = 1000;
        let mut data = || {
            next_data += 1;
            next_data
        };
        let l0: Vec<u64> = (0..4)
            .map(|i| m.leaf(i * 4..i * 4 + 4, &[i * 4, i * 4 + 1, i * 4 + 2, i * 4 + 3]))
            .collect();
        let base_mid = m.internal(&l0[..2]);
        let base_mid2 = m.internal(&l0[2..]);
        let base = m.internal(&[base_mid, base_mid2]);
        // Layer 1 rewrites one leaf: its path is shadowed, the rest shared.
        let d = [0, 1, data(), 3];
        let l1_leaf = m.leaf(0..4, &d);
        let l1_mid = m.internal(&[l1_leaf, l0[1]]);
        let layer1 = m.internal(&[l1_mid, base_mid2]);
        // Two containers on layer 1: one shares it whole, one rewrites a base leaf.
        let d2 = [8, data(), 10, 11];
        let c2_leaf = m.leaf(8..12, &d2);
        let c2_mid = m.internal(&[c2_leaf, l0[3]]);
        let c2 = m.internal(&[l1_mid, c2_mid]);
        let devices = [(1, base), (2, layer1), (3, layer1), (4, c2), (9, base)];
        let top = m.top(&devices);
        let got = count(&mut m, top, 2000, &BTreeMap::new(), Count::Exclusive).unwrap();
        assert_eq!(got, brute(&m, &devices));
        assert!(got.values().all(|d| d.mapped == 16));
    }

    #[test]
    fn owned_blocks_are_those_provisioned_since_the_device_was_created() {
        // The origin (created at time 0) wrote blocks 10..14 at time 0; the snapshot was
        // created at time 1 and rewrote virtual block 3 (data 20, time 1); the origin then
        // rewrote virtual block 0 (data 30, time 1).
        let mut m = Mem::default();
        let with_time = |m: &mut Mem, keys: std::ops::Range<u64>, data: &[(u64, u64)]| {
            let values = data.iter().map(|(d, t)| (d << 24) | t).collect();
            m.node(true, keys.collect(), values)
        };
        let origin_a = with_time(&mut m, 0..2, &[(30, 1), (11, 0)]);
        let shared_b = with_time(&mut m, 2..4, &[(12, 0), (13, 0)]);
        let snap_a = with_time(&mut m, 0..2, &[(10, 0), (11, 0)]);
        let snap_b = with_time(&mut m, 2..4, &[(12, 0), (20, 1)]);
        let origin = m.internal(&[origin_a, shared_b]);
        let snap = m.internal(&[snap_a, snap_b]);
        let devices = [(1, origin), (2, snap)];
        let top = m.top(&devices);
        let created = BTreeMap::from([(1, 0), (2, 1)]);
        let got = count(&mut m, top, 100, &created, Count::Exclusive).unwrap();
        // The origin provisioned all it maps; now only 13 and 30 are its alone.
        assert_eq!(
            got[&1],
            DeviceBlocks {
                mapped: 4,
                exclusive: 2,
                owned: 4
            }
        );
        // The snapshot provisioned 20 only, which is also all it has alone.
        assert_eq!(
            got[&2],
            DeviceBlocks {
                mapped: 4,
                exclusive: 2,
                owned: 1
            }
        );
    }

    #[test]
    fn damage_is_an_error_not_a_figure() {
        let mut m = Mem::default();
        let leaf = m.leaf(0..1, &[500]);
        let top = m.top(&[(1, leaf)]);
        let e = count(&mut m, top, 100, &BTreeMap::new(), Count::Exclusive)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beyond the pool's 100"), "{e}");

        let mut m = Mem::default();
        let a = m.internal(&[]);
        // A cycle: a's child is a.
        m.nodes.get_mut(&a).unwrap().2.push(a);
        m.nodes.get_mut(&a).unwrap().1.push(0);
        let top = m.top(&[(1, a)]);
        let e = count(&mut m, top, 100, &BTreeMap::new(), Count::Exclusive)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cycle"), "{e}");
    }
}

/// The reader against `thin_ls` on metadata `thin_restore` writes from XML (on-disk format,
/// leaves that name one data block from two devices); the VM's tests compare it on live
/// pools, with the subtrees kernel snapshots share.
#[cfg(test)]
mod thin_ls {
    use std::process::Command;

    use super::*;

    fn tool(name: &str) -> Command {
        let found = ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!(
                    "this test needs {name} from thin-provisioning-tools: \
                     `vagrant/vm setup` installs it (apt-get install thin-provisioning-tools)"
                )
            });
        Command::new(found)
    }

    #[test]
    fn figures_match_thin_ls() {
        let dir = std::env::temp_dir().join(format!("thinpool-usage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Device 1 maps 0..300 to data 0..300; device 2 shares 0..100 and has 300 of its own
        // (300 leaf entries: more than one leaf); device 3 shares data 150..160 with device
        // 1 only and maps one block of its own; device 4 is empty.
        let xml = r#"<superblock uuid="" time="1" transaction="5" flags="0" version="2" data_block_size="128" nr_data_blocks="4096">
  <device dev_id="1" mapped_blocks="300" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="300" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="400" transaction="0" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="100" time="0"/>
    <range_mapping origin_begin="100" data_begin="1000" length="300" time="1"/>
  </device>
  <device dev_id="3" mapped_blocks="11" transaction="0" creation_time="1" snap_time="1">
    <range_mapping origin_begin="5000" data_begin="150" length="10" time="0"/>
    <single_mapping origin_block="9000" data_block="4000" time="1"/>
  </device>
  <device dev_id="4" mapped_blocks="0" transaction="0" creation_time="1" snap_time="1">
  </device>
</superblock>
"#;
        let xml_path = dir.join("meta.xml");
        let meta = dir.join("meta.bin");
        std::fs::write(&xml_path, xml).unwrap();
        std::fs::File::create(&meta)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let out = tool("thin_restore")
            .arg("-i")
            .arg(&xml_path)
            .arg("-o")
            .arg(&meta)
            .output()
            .unwrap();
        assert!(out.status.success(), "thin_restore: {out:?}");
        let got = read_mapping_usage(&meta, 0, Count::Exclusive).unwrap();
        let owned = read_mapping_usage(&meta, 0, Count::Owned).unwrap();
        for (id, d) in &owned.devices {
            assert_eq!(
                (d.mapped, d.owned, d.exclusive),
                (got.devices[id].mapped, got.devices[id].owned, 0)
            );
        }
        let out = tool("thin_ls")
            .args(["--no-headers", "-o", "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS"])
            .arg(&meta)
            .output()
            .unwrap();
        assert!(out.status.success(), "thin_ls: {out:?}");
        let theirs: BTreeMap<u32, (u64, u64)> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let f: Vec<u64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
                (f[0] as u32, (f[1], f[2]))
            })
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        let ours: BTreeMap<u32, (u64, u64)> = got
            .devices
            .iter()
            .map(|(id, d)| (*id, (d.mapped, d.exclusive)))
            .collect();
        assert_eq!(ours, theirs);
        assert_eq!(
            got.devices[&2],
            DeviceBlocks {
                mapped: 400,
                exclusive: 300,
                owned: 300
            }
        );
        // Created at time 1: of its 11 mappings, the one at time 1 is its own.
        assert_eq!(got.devices[&3].owned, 1);
        assert_eq!(got.devices[&1].exclusive, 300 - 100 - 10);
        assert_eq!((got.transaction_id, got.data_block_size), (5, 128));
        assert_eq!(got.bytes(2), 2 * 64 * 1024);
    }
}
