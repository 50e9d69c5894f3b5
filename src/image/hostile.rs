//! Property tests of layer application with hostile archives: whatever entries a layer
//! holds (`..`, absolute names, symlinks pointing out, hard links to outside, whiteouts of
//! parents), applying it never creates, changes or removes anything outside the root.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use proptest::prelude::*;

use super::apply::apply_layer;

#[derive(Debug, Clone)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    Hardlink(String),
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    kind: Kind,
}

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just("".to_string()),
        Just("outside".to_string()),
        Just(".wh.a".to_string()),
        Just(".wh.outside".to_string()),
        Just(".wh..wh..opq".to_string()),
        Just("etc".to_string()),
    ]
}

fn name() -> impl Strategy<Value = String> {
    (any::<bool>(), prop::collection::vec(component(), 1..5)).prop_map(|(abs, parts)| {
        let p = parts.join("/");
        if abs {
            format!("/{p}")
        } else {
            p
        }
    })
}

fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/".to_string()),
        Just("..".to_string()),
        Just("../..".to_string()),
        Just("../outside".to_string()),
        Just("../outside/victim".to_string()),
        Just("/etc".to_string()),
        Just("a".to_string()),
        Just("a/b".to_string()),
        name(),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    let kind = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Kind::File),
        Just(Kind::Dir),
        target().prop_map(Kind::Symlink),
        target().prop_map(Kind::Hardlink),
    ];
    (name(), kind).prop_map(|(name, kind)| Entry { name, kind })
}

/// A tar stream with the entries exactly as given: names are written into the headers
/// raw, bypassing the `tar` crate's own path checks.
fn layer(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let name = e.name.as_bytes();
        let n = name.len().min(99);
        h.as_gnu_mut().expect("gnu header").name[..n].copy_from_slice(&name[..n]);
        h.set_mode(0o755);
        h.set_mtime(0);
        let data: &[u8] = match &e.kind {
            Kind::File(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                d
            }
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                &[]
            }
            Kind::Symlink(t) | Kind::Hardlink(t) => {
                h.set_entry_type(if matches!(e.kind, Kind::Symlink(_)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                let t = t.as_bytes();
                let n = t.len().min(99);
                h.as_gnu_mut().expect("gnu header").linkname[..n].copy_from_slice(&t[..n]);
                &[]
            }
        };
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).expect("append to memory");
    }
    b.into_inner().expect("finish")
}

/// Everything under `dir`: path → (kind, size, mode, content or link target).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, u64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("readable") {
            let p = e.expect("entry").path();
            let m = fs::symlink_metadata(&p).expect("stat");
            let content = if m.file_type().is_symlink() {
                fs::read_link(&p)
                    .expect("link")
                    .into_os_string()
                    .into_encoded_bytes()
            } else if m.is_file() {
                fs::read(&p).expect("read")
            } else {
                stack.push(p.clone());
                Vec::new()
            };
            out.insert(p, (m.mode(), m.nlink(), content));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn hostile_layers_never_touch_anything_outside_the_root(entries in prop::collection::vec(entry(), 1..12)) {
        let top = tempfile::tempdir().expect("tempdir");
        let root = top.path().join("root");
        let outside = top.path().join("outside");
        fs::create_dir_all(root.join("a")).expect("mkdir");
        fs::create_dir_all(&outside).expect("mkdir");
        fs::write(outside.join("victim"), b"must survive").expect("write");
        fs::write(root.join("a/b"), b"lower layer").expect("write");
        let before_outside = snapshot(&outside);
        let before_top: Vec<_> = fs::read_dir(top.path()).expect("ls").map(|e| e.expect("e").file_name()).collect();

        let data = layer(&entries);
        // Ok or a clean error: both fine; a panic or an escape is not.
        let _ = apply_layer(&root, data.as_slice(), &|| false);

        prop_assert_eq!(snapshot(&outside), before_outside, "outside changed");
        let mut after_top: Vec<_> = fs::read_dir(top.path()).expect("ls").map(|e| e.expect("e").file_name()).collect();
        let mut b = before_top.clone();
        after_top.sort();
        b.sort();
        prop_assert_eq!(after_top, b, "something was created beside the root");
        // Nothing inside the root points a hard link at the victim.
        prop_assert_eq!(fs::metadata(outside.join("victim")).expect("victim").nlink(), 1);
    }
}
