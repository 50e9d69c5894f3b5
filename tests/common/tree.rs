//! What a filesystem holds, to compare it with what Docker showed: every path (relative, no
//! leading `/`) with its kind, permissions, owner and content (a file's sha256, a symlink's
//! target, a device's numbers). Read from a mounted filesystem, from a tar of one (`docker
//! export`), or from image layers applied in order (`docker save`), whiteouts and opaque
//! directories done as Docker does them.

use std::{
    collections::BTreeMap,
    fs,
    io::Read,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::Path,
};

/// Path → description.
pub type Tree = BTreeMap<String, String>;

/// Every entry under `root` (not `root` itself), not crossing into other filesystems.
pub fn of_dir(root: &Path) -> Tree {
    fn walk(dir: &Path, root: &Path, dev: u64, out: &mut Tree) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = fs::symlink_metadata(&p).unwrap();
            let t = m.file_type();
            let owner = format!("{}:{}", m.uid(), m.gid());
            let perm = m.mode() & 0o7777;
            let desc = if t.is_dir() {
                format!("dir {perm:04o} {owner}")
            } else if t.is_symlink() {
                format!(
                    "symlink {owner} -> {}",
                    fs::read_link(&p).unwrap().display()
                )
            } else if t.is_file() {
                format!("file {perm:04o} {owner} {}", super::sha256_file(&p))
            } else if t.is_char_device() || t.is_block_device() {
                let kind = if t.is_char_device() { "char" } else { "block" };
                let r = m.rdev();
                let (maj, min) = ((r >> 8) & 0xfff, (r & 0xff) | ((r >> 12) & 0xfff00));
                format!("{kind} {perm:04o} {owner} {maj}:{min}")
            } else if t.is_fifo() {
                format!("fifo {perm:04o} {owner}")
            } else {
                format!("socket {perm:04o} {owner}")
            };
            out.insert(rel, desc);
            if t.is_dir() && m.dev() == dev {
                walk(&p, root, dev, out);
            }
        }
    }
    let mut out = Tree::new();
    walk(root, root, fs::metadata(root).unwrap().dev(), &mut out);
    out
}

fn clean(name: &str) -> String {
    let n = name.trim_start_matches("./").trim_start_matches('/');
    n.trim_end_matches('/').to_string()
}

fn remove_under(tree: &mut Tree, dir: &str) {
    let prefix = format!("{dir}/");
    tree.retain(|k, _| !k.starts_with(&prefix));
}

/// Applies one tar to `tree`: entries added or replaced, and with `whiteouts` Docker's
/// `.wh.<name>` (removes `<name>`) and `.wh..wh..opq` (empties its directory of what the
/// layers below put there) done and not listed.
pub fn apply_tar(tree: &mut Tree, tar: &[u8], whiteouts: bool) {
    let mut archive = tar::Archive::new(tar);
    let mut opaque_done: Vec<String> = Vec::new();
    let mut added: Vec<String> = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let raw = e.path().unwrap().display().to_string();
        let path = clean(&raw);
        if path.is_empty() {
            continue;
        }
        let (dir, base) = match path.rsplit_once('/') {
            Some((d, b)) => (d.to_string(), b.to_string()),
            None => (String::new(), path.clone()),
        };
        if whiteouts && base == ".wh..wh..opq" {
            // What this layer put in the directory stays; what is below goes.
            if !opaque_done.contains(&dir) {
                let keep: Vec<(String, String)> = added
                    .iter()
                    .filter(|a| a.starts_with(&format!("{dir}/")))
                    .filter_map(|a| tree.get(a).map(|v| (a.clone(), v.clone())))
                    .collect();
                remove_under(tree, &dir);
                tree.extend(keep);
                opaque_done.push(dir);
            }
            continue;
        }
        if whiteouts {
            if let Some(gone) = base.strip_prefix(".wh.") {
                let gone = if dir.is_empty() {
                    gone.to_string()
                } else {
                    format!("{dir}/{gone}")
                };
                tree.remove(&gone);
                remove_under(tree, &gone);
                continue;
            }
        }
        let h = e.header();
        let perm = h.mode().unwrap() & 0o7777;
        let owner = format!("{}:{}", h.uid().unwrap(), h.gid().unwrap());
        let desc = match h.entry_type() {
            tar::EntryType::Directory => format!("dir {perm:04o} {owner}"),
            tar::EntryType::Symlink => format!(
                "symlink {owner} -> {}",
                e.link_name().unwrap().unwrap().display()
            ),
            tar::EntryType::Link => {
                let target = clean(&e.link_name().unwrap().unwrap().display().to_string());
                tree.get(&target)
                    .unwrap_or_else(|| panic!("hard link {path} to {target}, which is not there"))
                    .clone()
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                format!("file {perm:04o} {owner} {}", super::sha256(&data))
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let kind = if h.entry_type() == tar::EntryType::Char {
                    "char"
                } else {
                    "block"
                };
                let (maj, min) = (
                    h.device_major().unwrap().unwrap(),
                    h.device_minor().unwrap().unwrap(),
                );
                format!("{kind} {perm:04o} {owner} {maj}:{min}")
            }
            tar::EntryType::Fifo => format!("fifo {perm:04o} {owner}"),
            t => panic!("{path}: tar entry type {t:?}"),
        };
        if !desc.starts_with("dir ") {
            remove_under(tree, &path);
        }
        tree.insert(path.clone(), desc);
        added.push(path);
    }
}

/// The tree of a tar of a whole filesystem (`docker export`), entries as they are.
pub fn of_tar(tar: &[u8]) -> Tree {
    let mut t = Tree::new();
    apply_tar(&mut t, tar, false);
    t
}

/// What differs between `got` and `want`, one line each (empty when they are equal).
pub fn diff(got: &Tree, want: &Tree) -> String {
    let mut out = String::new();
    for (k, v) in want {
        match got.get(k) {
            None => out.push_str(&format!("missing   {k}: {v}\n")),
            Some(g) if g != v => out.push_str(&format!("differs   {k}: {g}, not {v}\n")),
            _ => {}
        }
    }
    for (k, v) in got {
        if !want.contains_key(k) {
            out.push_str(&format!("unexpected {k}: {v}\n"));
        }
    }
    out
}

/// Asserts that `got` is `want`, naming what differs.
pub fn assert_same(what: &str, got: &Tree, want: &Tree) {
    let d = diff(got, want);
    assert!(
        d.is_empty(),
        "{what} is not what Docker showed ({} entries, Docker {}):\n{d}",
        got.len(),
        want.len()
    );
}
