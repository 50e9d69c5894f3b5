//! The migration plan: which of Docker's thin devices become which thinsnap snapshots,
//! what Docker itself would have deleted at its next start, and what is left over. Pure:
//! computed from Docker's files and the pool's thin ids, so `--dry-run` and the real run
//! agree, and the rules are unit-tested without device-mapper.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use anyhow::{bail, Result};
use thinpool::{units, FsType, ThinId};

use super::docker::Layout;
use thinsnap_core::store::Kind;

/// Key prefix of snapshots that are not image layers.
pub const PREFIX: &str = "docker/";
/// Label recording the Docker device a snapshot was adopted from.
pub const DOCKER_DEVICE_LABEL: &str = "containerd.io/snapshot/thinsnap.docker-device";

/// The pool as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// The pool's transaction id.
    pub transaction_id: u64,
    /// Every thin id in the pool's metadata.
    pub thin_ids: BTreeSet<u32>,
}

/// Why a device is adopted under the name it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// Docker's base device, becoming thinsnap's base device of its filesystem.
    Base,
    /// An image layer, named by its chain id.
    Layer,
    /// A container's `-init` layer.
    Init,
    /// A container's read-write layer.
    Container,
    /// A device no layer or container references (or whose chain is broken).
    Orphan,
    /// A thin id in the pool that Docker's metadata does not know.
    Leaked,
}

/// One device to adopt as a snapshot (or as the base device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopt {
    /// The snapshot key.
    pub key: String,
    /// Its kind.
    pub kind: Kind,
    /// Its parent's key.
    pub parent: Option<String>,
    /// The thin id (Docker's device id).
    pub thin_id: u32,
    /// The device size in bytes.
    pub size: u64,
    /// The filesystem on it.
    pub fs: FsType,
    /// Docker's hash of the device (`""` for the base), if Docker knew it.
    pub docker_hash: Option<String>,
    /// Whether its Docker `rootfs/` directory must become its root.
    pub flatten: bool,
    /// What it is.
    pub role: Role,
    /// Why it got this name, for the report (empty for the usual cases).
    pub note: String,
}

/// A thin device Docker would delete at its next start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// The thin id.
    pub thin_id: u32,
    /// Why.
    pub why: String,
    /// Whether the pool still has it (otherwise it is only reported).
    pub in_pool: bool,
}

/// The whole migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Devices to delete first, as Docker would have.
    pub deletes: Vec<Delete>,
    /// The base device, if Docker's can be thinsnap's.
    pub base: Option<Adopt>,
    /// Snapshots, parents before children.
    pub snapshots: Vec<Adopt>,
    /// The store's next thin id afterwards (above every id Docker or the pool used).
    pub next_thin_id: u32,
    /// Things that need a person's attention; they do not stop the migration.
    pub problems: Vec<String>,
    /// Docker's filesystem.
    pub fs: FsType,
}

/// Builds the plan for Docker's `layout` on a pool with `pool`'s thin ids; `target_fs` is
/// the filesystem thinsnap's configuration names for new base devices.
///
/// # Errors
/// When Docker's metadata contradicts itself (two devices with one thin id), or its
/// filesystem is unknown.
pub fn build(
    layout: &Layout,
    pool: &PoolView,
    docker_fs: FsType,
    target_fs: FsType,
) -> Result<Plan> {
    let mut problems = Vec::new();
    let mut by_id: BTreeMap<u32, &str> = BTreeMap::new();
    for (hash, d) in &layout.devices {
        if ThinId::new(d.device_id).is_err() {
            bail!(
                "Docker's device {hash:?} has thin id {}, beyond 2^24: its metadata is damaged",
                d.device_id
            );
        }
        if let Some(other) = by_id.insert(d.device_id, hash) {
            bail!(
                "Docker's devices {:?} and {:?} both claim thin id {}: its metadata is damaged; fix or remove one of {}/metadata/{{{},{}}}",
                name_of(other),
                name_of(hash),
                d.device_id,
                layout.home.display(),
                file_of(other),
                file_of(hash)
            );
        }
    }

    // Devices an image layer or a container uses: never deleted, whatever else says so.
    let mut referenced: BTreeMap<&str, String> = BTreeMap::new();
    for (chain, l) in &layout.layers {
        referenced.insert(l.cache_id.as_str(), format!("image layer {chain}"));
    }
    for (c, m) in &layout.mounts {
        referenced.insert(m.mount_id.as_str(), format!("container {c}"));
        if let Some(i) = &m.init_id {
            referenced.insert(i.as_str(), format!("container {c}"));
        }
    }

    // Docker's pending work: what its next start would delete.
    let mut dropped: BTreeSet<String> = BTreeSet::new();
    let mut deletes: Vec<Delete> = Vec::new();
    let delete = |hash: &str,
                  id: u32,
                  why: String,
                  deletes: &mut Vec<Delete>,
                  problems: &mut Vec<String>,
                  dropped: &mut BTreeSet<String>| {
        if let Some(user) = referenced.get(hash) {
            problems.push(format!(
                "{why}, but {user} uses it: kept (Docker would have deleted it)"
            ));
            return;
        }
        if !deletes.iter().any(|d| d.thin_id == id) {
            deletes.push(Delete {
                thin_id: id,
                why,
                in_pool: pool.thin_ids.contains(&id),
            });
        }
        dropped.insert(hash.to_string());
    };
    if let Some(t) = &layout.transaction {
        if t.open_transaction_id > pool.transaction_id {
            let why = format!(
                "roll back Docker's open transaction {} (the pool is at {}): thin id {} of device {}",
                t.open_transaction_id, pool.transaction_id, t.device_id, name_of(&t.device_hash)
            );
            // The device in it and any record of that id go, as in Docker's rollback.
            let holder = by_id
                .get(&t.device_id)
                .copied()
                .unwrap_or(t.device_hash.as_str());
            delete(
                holder,
                t.device_id,
                why,
                &mut deletes,
                &mut problems,
                &mut dropped,
            );
            if holder != t.device_hash && !referenced.contains_key(t.device_hash.as_str()) {
                if let Some(d) = layout.devices.get(&t.device_hash) {
                    if d.device_id == t.device_id {
                        dropped.insert(t.device_hash.clone());
                    }
                }
            }
        } else if t.open_transaction_id < pool.transaction_id {
            problems.push(format!(
                "Docker's last transaction {} is older than the pool's transaction id {}: something else changed the pool (Docker ignores this too)",
                t.open_transaction_id, pool.transaction_id
            ));
        }
    }
    for (hash, d) in &layout.devices {
        if d.deleted {
            delete(
                hash,
                d.device_id,
                format!(
                    "Docker's device {} is marked deleted (deferred deletion)",
                    name_of(hash)
                ),
                &mut deletes,
                &mut problems,
                &mut dropped,
            );
        } else if hash.is_empty() && !d.initialized {
            delete(
                hash,
                d.device_id,
                "Docker's base device was never initialized (Docker makes a new one)".into(),
                &mut deletes,
                &mut problems,
                &mut dropped,
            );
        }
    }
    for (dir, cache_id) in &layout.removing {
        if let Some(d) = layout.devices.get(cache_id) {
            delete(
                cache_id,
                d.device_id,
                format!("image layer {dir} was being removed"),
                &mut deletes,
                &mut problems,
                &mut dropped,
            );
        }
    }

    // What is left, and present in the pool, is adopted.
    let mut live: BTreeMap<&str, &super::docker::DevInfo> = BTreeMap::new();
    for (hash, d) in &layout.devices {
        if dropped.contains(hash) {
            continue;
        }
        if !pool.thin_ids.contains(&d.device_id) {
            problems.push(format!(
                "Docker's device {} (thin id {}) is missing from the pool: its data is lost; not adopted",
                name_of(hash),
                d.device_id
            ));
            continue;
        }
        live.insert(hash.as_str(), d);
    }

    let adopt =
        |key: String, kind: Kind, parent: Option<String>, hash: &str, role: Role, note: String| {
            let d = live[hash];
            Adopt {
                key,
                kind,
                parent,
                thin_id: d.device_id,
                size: d.size,
                fs: docker_fs,
                docker_hash: Some(hash.to_string()),
                flatten: !hash.is_empty(),
                role,
                note,
            }
        };
    let mut snapshots: Vec<Adopt> = Vec::new();
    let mut used: BTreeSet<&str> = BTreeSet::new();

    let base = match live.get("") {
        Some(_) if docker_fs == target_fs => {
            used.insert("");
            let mut b = adopt(
                format!("base:{docker_fs}"),
                Kind::Committed,
                None,
                "",
                Role::Base,
                String::new(),
            );
            b.flatten = false;
            Some(b)
        }
        Some(_) => {
            used.insert("");
            let mut b = adopt(
                format!("{PREFIX}base"),
                Kind::Committed,
                None,
                "",
                Role::Orphan,
                format!("Docker's {docker_fs} base device; thinsnap's configuration makes {target_fs} base devices"),
            );
            b.flatten = false;
            snapshots.push(b);
            None
        }
        None => None,
    };

    // Image layers whose whole parent chain is adoptable keep their chain ids.
    let mut chain_ok: BTreeMap<&str, Result<(), String>> = BTreeMap::new();
    fn check<'a>(
        chain: &'a str,
        layout: &'a Layout,
        live: &BTreeMap<&str, &super::docker::DevInfo>,
        memo: &mut BTreeMap<&'a str, Result<(), String>>,
        depth: usize,
    ) -> Result<(), String> {
        if let Some(r) = memo.get(chain) {
            return r.clone();
        }
        let r = match layout.layers.get(chain) {
            _ if depth > 256 => Err(format!("the parent chain of {chain} is too long or loops")),
            None => Err(format!(
                "parent layer {chain} is not in Docker's layer store"
            )),
            Some(l) if !live.contains_key(l.cache_id.as_str()) => Err(format!(
                "layer {chain} has no device (device {} is missing)",
                l.cache_id
            )),
            Some(l) => match &l.parent {
                None => Ok(()),
                Some(p) => check(p, layout, live, memo, depth + 1),
            },
        };
        memo.insert(chain, r.clone());
        r
    }
    // Parents before children: order the chain ids by depth.
    let mut layers: Vec<(usize, &String)> = Vec::new();
    for chain in layout.layers.keys() {
        if check(chain, layout, &live, &mut chain_ok, 0).is_ok() {
            let mut depth = 0;
            let mut p = layout.layers[chain].parent.as_deref();
            while let Some(c) = p {
                depth += 1;
                p = layout.layers.get(c).and_then(|l| l.parent.as_deref());
            }
            layers.push((depth, chain));
        }
    }
    layers.sort();
    for (_, chain) in layers {
        let l = &layout.layers[chain];
        if !used.insert(l.cache_id.as_str()) {
            problems.push(format!(
                "image layer {chain} shares device {} with another layer: not adopted twice",
                l.cache_id
            ));
            continue;
        }
        snapshots.push(adopt(
            chain.clone(),
            Kind::Committed,
            l.parent.clone(),
            &l.cache_id,
            Role::Layer,
            String::new(),
        ));
    }

    // Containers: the -init layer is committed (its parent the image's top layer), the
    // read-write layer active on top of it.
    for (c, m) in &layout.mounts {
        let image = match &m.parent {
            None => Ok(None),
            Some(p) => check(p, layout, &live, &mut chain_ok, 0).map(|()| Some(p.clone())),
        };
        let (mut parent, mut note) = match image {
            Ok(p) => (p, String::new()),
            Err(why) => (
                None,
                format!("its image's layers cannot be adopted ({why}): no parent"),
            ),
        };
        if let Some(init) = &m.init_id {
            if live.contains_key(init.as_str()) && used.insert(init.as_str()) {
                let key = format!("{PREFIX}container/{c}-init");
                snapshots.push(adopt(
                    key.clone(),
                    Kind::Committed,
                    parent.clone(),
                    init,
                    Role::Init,
                    note.clone(),
                ));
                parent = Some(key);
                note.clear();
            } else if !live.contains_key(init.as_str()) {
                problems.push(format!("container {c}: its init layer {init} has no device: the container's layer is adopted without it"));
            }
        }
        if live.contains_key(m.mount_id.as_str()) && used.insert(m.mount_id.as_str()) {
            snapshots.push(adopt(
                format!("{PREFIX}container/{c}"),
                Kind::Active,
                parent,
                &m.mount_id,
                Role::Container,
                note,
            ));
        } else if !live.contains_key(m.mount_id.as_str()) {
            problems.push(format!(
                "container {c}: its layer {} has no device: not adopted",
                m.mount_id
            ));
        }
    }

    // Everything else Docker knows: adopted under its hash, reported.
    let layer_of: BTreeMap<&str, &str> = layout
        .layers
        .iter()
        .map(|(chain, l)| (l.cache_id.as_str(), chain.as_str()))
        .collect();
    for hash in live.keys() {
        if used.contains(hash) {
            continue;
        }
        let note = match layer_of.get(hash) {
            Some(chain) => match chain_ok.get(chain) {
                Some(Err(why)) => format!("image layer {chain}, but {why}"),
                _ => format!("image layer {chain}"),
            },
            None => "no image layer or container of Docker's layer store uses it".to_string(),
        };
        snapshots.push(adopt(
            format!("{PREFIX}orphan/{hash}"),
            Kind::Committed,
            None,
            hash,
            Role::Orphan,
            note,
        ));
    }

    // Thin ids Docker does not know: never deleted, adopted so they stay visible.
    let known: BTreeSet<u32> = layout.devices.values().map(|d| d.device_id).collect();
    let deleted: BTreeSet<u32> = deletes.iter().map(|d| d.thin_id).collect();
    let leak_size = layout.devices.get("").map_or(10 * units::GIB, |b| b.size);
    for &id in pool.thin_ids.difference(&known) {
        if deleted.contains(&id) {
            continue;
        }
        snapshots.push(Adopt {
            key: format!("{PREFIX}leaked/thin-{id}"),
            kind: Kind::Committed,
            parent: None,
            thin_id: id,
            size: leak_size,
            fs: docker_fs,
            docker_hash: None,
            flatten: false,
            role: Role::Leaked,
            note: "in the pool, but Docker's metadata does not know it: inspect it, then remove it with `thinsnap snapshot rm`".into(),
        });
    }

    let max = pool
        .thin_ids
        .iter()
        .copied()
        .chain(layout.devices.values().map(|d| d.device_id))
        .chain(layout.transaction.iter().map(|t| t.device_id))
        .chain([layout.deviceset.next_device_id])
        .max()
        .unwrap_or(0);
    Ok(Plan {
        deletes,
        base,
        snapshots,
        next_thin_id: max.saturating_add(1).min(ThinId::MAX + 1),
        problems,
        fs: docker_fs,
    })
}

fn name_of(hash: &str) -> &str {
    if hash.is_empty() {
        "base"
    } else {
        hash
    }
}

fn file_of(hash: &str) -> &str {
    name_of(hash)
}

impl Plan {
    /// Every adopted device: the base first, then the snapshots.
    pub fn adopted(&self) -> impl Iterator<Item = &Adopt> {
        self.base.iter().chain(self.snapshots.iter())
    }

    /// How many filesystems get their `rootfs/` flattened.
    pub fn flattens(&self) -> usize {
        self.adopted().filter(|a| a.flatten).count()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.deletes {
            let how = if d.in_pool { "delete" } else { "already gone:" };
            writeln!(f, "  {how} thin id {}: {}", d.thin_id, d.why)?;
        }
        if let Some(b) = &self.base {
            writeln!(
                f,
                "  base     thin id {:<6} {} ({}): thinsnap's {} base device",
                b.thin_id,
                units::format_size(b.size),
                b.fs,
                b.fs
            )?;
        }
        for a in &self.snapshots {
            let parent = a.parent.as_deref().unwrap_or("-");
            let flat = if a.flatten { ", rootfs/ flattened" } else { "" };
            write!(
                f,
                "  {:<9} {} (thin id {}, {}{flat}) parent {parent}",
                a.kind.as_str(),
                a.key,
                a.thin_id,
                units::format_size(a.size),
            )?;
            if !a.note.is_empty() {
                write!(f, ": {}", a.note)?;
            }
            writeln!(f)?;
        }
        writeln!(f, "  next thin id {}", self.next_thin_id)?;
        for p in &self.problems {
            writeln!(f, "  problem: {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::docker::{DevInfo, Layer, Mount, Transaction};
    use super::*;

    fn h(c: char) -> String {
        c.to_string().repeat(64)
    }
    fn chain(c: char) -> String {
        format!("sha256:{}", h(c))
    }
    fn dev(id: u32) -> DevInfo {
        DevInfo {
            device_id: id,
            size: 10 * units::GIB,
            transaction_id: id as u64,
            initialized: false,
            deleted: false,
        }
    }

    /// base (1) ← layer a (2) ← layer b (3) ← container x: init (4) ← rw (5).
    fn layout() -> Layout {
        let mut l = Layout::default();
        let mut base = dev(1);
        base.initialized = true;
        l.devices.insert(String::new(), base);
        l.devices.insert(h('a'), dev(2));
        l.devices.insert(h('b'), dev(3));
        l.devices.insert(format!("{}-init", h('e')), dev(4));
        l.devices.insert(h('e'), dev(5));
        l.deviceset.next_device_id = 5;
        l.layers.insert(
            chain('1'),
            Layer {
                cache_id: h('a'),
                parent: None,
            },
        );
        l.layers.insert(
            chain('2'),
            Layer {
                cache_id: h('b'),
                parent: Some(chain('1')),
            },
        );
        l.mounts.insert(
            "x".into(),
            Mount {
                mount_id: h('e'),
                init_id: Some(format!("{}-init", h('e'))),
                parent: Some(chain('2')),
            },
        );
        l
    }

    fn pool(ids: &[u32], txn: u64) -> PoolView {
        PoolView {
            transaction_id: txn,
            thin_ids: ids.iter().copied().collect(),
        }
    }

    fn keys(p: &Plan) -> Vec<(String, Kind, Option<String>, u32)> {
        p.snapshots
            .iter()
            .map(|a| (a.key.clone(), a.kind, a.parent.clone(), a.thin_id))
            .collect()
    }

    #[test]
    fn layers_containers_and_base_map_to_snapshots() {
        let p = build(
            &layout(),
            &pool(&[1, 2, 3, 4, 5], 5),
            FsType::Ext4,
            FsType::Ext4,
        )
        .unwrap();
        assert!(p.deletes.is_empty() && p.problems.is_empty(), "{p}");
        let b = p.base.as_ref().unwrap();
        assert_eq!(
            (b.key.as_str(), b.thin_id, b.flatten),
            ("base:ext4", 1, false)
        );
        assert_eq!(
            keys(&p),
            vec![
                (chain('1'), Kind::Committed, None, 2),
                (chain('2'), Kind::Committed, Some(chain('1')), 3),
                (
                    "docker/container/x-init".into(),
                    Kind::Committed,
                    Some(chain('2')),
                    4
                ),
                (
                    "docker/container/x".into(),
                    Kind::Active,
                    Some("docker/container/x-init".into()),
                    5
                ),
            ]
        );
        assert!(p.snapshots.iter().all(|a| a.flatten));
        assert_eq!(p.flattens(), 4);
        assert_eq!(p.next_thin_id, 6);
        let text = p.to_string();
        assert!(
            text.contains("committed docker/container/x-init (thin id 4"),
            "{text}"
        );
        assert!(text.contains(&format!("parent {}", chain('2'))), "{text}");
    }

    #[test]
    fn an_open_transaction_is_rolled_back() {
        let mut l = layout();
        l.devices.insert(h('f'), dev(6));
        l.transaction = Some(Transaction {
            open_transaction_id: 6,
            device_hash: h('f'),
            device_id: 6,
        });
        let p = build(
            &l,
            &pool(&[1, 2, 3, 4, 5, 6], 5),
            FsType::Ext4,
            FsType::Ext4,
        )
        .unwrap();
        assert_eq!(p.deletes.len(), 1, "{p}");
        assert_eq!((p.deletes[0].thin_id, p.deletes[0].in_pool), (6, true));
        assert!(p.deletes[0].why.contains("open transaction 6"), "{p}");
        assert!(p.snapshots.iter().all(|a| a.thin_id != 6), "{p}");
        assert_eq!(p.next_thin_id, 7, "ids stay above what Docker used");

        // Created in the pool but not recorded: the same.
        l.devices.remove(&h('f'));
        let p = build(
            &l,
            &pool(&[1, 2, 3, 4, 5, 6], 5),
            FsType::Ext4,
            FsType::Ext4,
        )
        .unwrap();
        assert_eq!(p.deletes.len(), 1, "{p}");
        assert!(
            p.snapshots.iter().all(|a| a.thin_id != 6),
            "not leaked: {p}"
        );

        // Closed (the pool reached it): nothing to do.
        let p = build(&l, &pool(&[1, 2, 3, 4, 5], 6), FsType::Ext4, FsType::Ext4).unwrap();
        assert!(p.deletes.is_empty(), "{p}");
    }

    #[test]
    fn a_used_device_is_never_deleted() {
        let mut l = layout();
        l.transaction = Some(Transaction {
            open_transaction_id: 9,
            device_hash: h('b'),
            device_id: 3,
        });
        l.devices.get_mut(&h('a')).unwrap().deleted = true;
        let p = build(&l, &pool(&[1, 2, 3, 4, 5], 5), FsType::Ext4, FsType::Ext4).unwrap();
        assert!(p.deletes.is_empty(), "{p}");
        assert_eq!(p.problems.len(), 2, "{p}");
        assert!(p.problems[0].contains("kept"), "{p}");
        assert_eq!(p.snapshots.len(), 4);
    }

    #[test]
    fn docker_pending_deletions_are_done() {
        let mut l = layout();
        let mut gone = dev(7);
        gone.deleted = true;
        l.devices.insert(h('7'), gone);
        l.devices.insert(h('8'), dev(8));
        l.removing.push((format!("{}-1-removing", h('9')), h('8')));
        let p = build(
            &l,
            &pool(&[1, 2, 3, 4, 5, 8], 5),
            FsType::Ext4,
            FsType::Ext4,
        )
        .unwrap();
        let d: Vec<(u32, bool)> = p.deletes.iter().map(|d| (d.thin_id, d.in_pool)).collect();
        assert_eq!(d, vec![(7, false), (8, true)], "{p}");
        assert!(p.to_string().contains("already gone: thin id 7"), "{p}");
    }

    #[test]
    fn leaks_and_orphans_are_adopted_and_named() {
        let mut l = layout();
        l.devices.insert(h('c'), dev(9));
        let p = build(
            &l,
            &pool(&[1, 2, 3, 4, 5, 9, 12], 5),
            FsType::Ext4,
            FsType::Ext4,
        )
        .unwrap();
        let orphan = p.snapshots.iter().find(|a| a.thin_id == 9).unwrap();
        assert_eq!(orphan.key, format!("docker/orphan/{}", h('c')));
        assert!(orphan.flatten && orphan.note.contains("no image layer"));
        let leak = p.snapshots.iter().find(|a| a.thin_id == 12).unwrap();
        assert_eq!(
            (leak.key.as_str(), leak.flatten),
            ("docker/leaked/thin-12", false)
        );
        assert_eq!(p.next_thin_id, 13);
    }

    #[test]
    fn a_broken_chain_loses_its_chain_id() {
        let l = layout();
        // Layer a's device is gone from the pool: b and the container lose their parents.
        let p = build(&l, &pool(&[1, 3, 4, 5], 5), FsType::Ext4, FsType::Ext4).unwrap();
        assert!(p.problems[0].contains("missing from the pool"), "{p}");
        let b = p.snapshots.iter().find(|a| a.thin_id == 3).unwrap();
        assert_eq!(b.key, format!("docker/orphan/{}", h('b')));
        assert!(b.note.contains("has no device"), "{}", b.note);
        let init = p.snapshots.iter().find(|a| a.thin_id == 4).unwrap();
        assert_eq!(init.parent, None);
        assert!(init.note.contains("no parent"), "{}", init.note);
        let rw = p.snapshots.iter().find(|a| a.thin_id == 5).unwrap();
        assert_eq!(rw.parent.as_deref(), Some("docker/container/x-init"));
    }

    #[test]
    fn another_filesystem_keeps_the_base_as_a_snapshot() {
        let p = build(
            &layout(),
            &pool(&[1, 2, 3, 4, 5], 5),
            FsType::Ext4,
            FsType::Xfs,
        )
        .unwrap();
        assert!(p.base.is_none());
        let b = &p.snapshots[0];
        assert_eq!(
            (b.key.as_str(), b.thin_id, b.flatten),
            ("docker/base", 1, false)
        );
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let mut l = layout();
        l.devices.insert(h('d'), dev(2));
        let e = build(&l, &pool(&[1, 2], 5), FsType::Ext4, FsType::Ext4).unwrap_err();
        assert!(e.to_string().contains("both claim thin id 2"), "{e}");
    }

    #[test]
    fn an_uninitialized_base_is_deleted_like_docker_does() {
        let mut l = layout();
        l.devices.get_mut("").unwrap().initialized = false;
        let p = build(&l, &pool(&[1, 2, 3, 4, 5], 5), FsType::Ext4, FsType::Ext4).unwrap();
        assert_eq!(p.deletes[0].thin_id, 1);
        assert!(p.base.is_none());
    }
}
