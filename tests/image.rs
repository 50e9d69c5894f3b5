//! `thinsnap image import` and `export` on real dm, through the CLI against a daemon:
//! images built here with the `tar` crate (OCI layout, docker save old and new), every file
//! type, whiteouts and opaque directories, ownership, modes and xattrs, a ~100 MB gzip layer
//! and a zstd layer; the merged tree checked file by file on a mounted view and in the
//! export; layer reuse; and archives that must be refused without leaving anything behind.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    io::Read,
    os::unix::{
        ffi::OsStrExt,
        fs::{FileTypeExt, MetadataExt},
    },
    path::{Path, PathBuf},
};

use common::{
    daemon::{Daemon, Mounted},
    image::*,
    private_mounts,
};

// ---------------------------------------------------------------------------------------
// Trees: what a mounted snapshot or an exported tar holds, one line per path.

/// path → description; and path → the first path of its hard link group.
#[derive(Debug, Default, PartialEq)]
struct Tree {
    nodes: BTreeMap<String, String>,
    links: BTreeMap<String, String>,
}

fn dir(mode: u32, owner: (u32, u32), xattrs: &[(&str, &[u8])]) -> String {
    format!("dir {mode:o} {}:{} x={}", owner.0, owner.1, xa(xattrs))
}

fn file_sha(sha: &str, mode: u32, owner: (u32, u32), t: &str, xattrs: &[(&str, &[u8])]) -> String {
    format!(
        "file {sha} {mode:o} {}:{} t={t} x={}",
        owner.0,
        owner.1,
        xa(xattrs)
    )
}

fn file(data: &[u8], mode: u32, owner: (u32, u32)) -> String {
    file_sha(&common::sha256(data), mode, owner, &format!("{T}.0"), &[])
}

fn symlink(target: &str) -> String {
    format!("symlink {target} 0:0 t={T}.0")
}

fn special(kind: &str, dev: (u32, u32), mode: u32, owner: (u32, u32)) -> String {
    format!(
        "{kind} {}:{} {mode:o} {}:{} t={T}.0",
        dev.0, dev.1, owner.0, owner.1
    )
}

fn xa(x: &[(&str, &[u8])]) -> String {
    let mut v: Vec<String> = x
        .iter()
        .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
        .collect();
    v.sort();
    v.join(",")
}

fn list_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: valid string and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", path.display());
    let mut out = vec![];
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 4096];
        // SAFETY: valid strings and buffer.
        let r = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(r >= 0);
        v.truncate(r as usize);
        out.push((String::from_utf8_lossy(name).into_owned(), v));
    }
    out
}

/// The tree of a mounted filesystem (mkfs's empty lost+found left out).
fn tree_of_dir(root: &Path) -> Tree {
    let mut t = Tree::default();
    let mut groups: HashMap<u64, Vec<String>> = HashMap::new();
    fn walk(root: &Path, dir: &Path, t: &mut Tree, groups: &mut HashMap<u64, Vec<String>>) {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        for p in paths {
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel == "lost+found" && md.is_dir() && std::fs::read_dir(&p).unwrap().next().is_none()
            {
                continue;
            }
            t.nodes.insert(rel.clone(), describe(&p, &md));
            if md.is_dir() {
                walk(root, &p, t, groups);
            } else if md.nlink() > 1 {
                groups.entry(md.ino()).or_default().push(rel);
            }
        }
    }
    let md = std::fs::symlink_metadata(root).unwrap();
    t.nodes.insert(".".into(), describe(root, &md));
    walk(root, root, &mut t, &mut groups);
    for g in groups.values() {
        let first = g.iter().min().unwrap();
        for p in g {
            t.links.insert(p.clone(), first.clone());
        }
    }
    t
}

fn describe(p: &Path, md: &std::fs::Metadata) -> String {
    let ft = md.file_type();
    let owner = (md.uid(), md.gid());
    let mode = md.mode() & 0o7777;
    let x: Vec<(String, Vec<u8>)> = list_xattrs(p);
    let x: Vec<(&str, &[u8])> = x.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let t = format!("{}.{}", md.mtime(), md.mtime_nsec());
    if ft.is_dir() {
        dir(mode, owner, &x)
    } else if ft.is_file() {
        file_sha(&common::sha256_file(p), mode, owner, &t, &x)
    } else if ft.is_symlink() {
        format!(
            "symlink {} {}:{} t={t}",
            std::fs::read_link(p).unwrap().display(),
            owner.0,
            owner.1
        )
    } else {
        let kind = if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else {
            assert!(ft.is_fifo(), "{}", p.display());
            "fifo"
        };
        let rdev = md.rdev();
        let dev = if kind == "fifo" {
            (0, 0)
        } else {
            (libc::major(rdev), libc::minor(rdev))
        };
        format!(
            "{kind} {}:{} {mode:o} {}:{} t={t}",
            dev.0, dev.1, owner.0, owner.1
        )
    }
}

/// The tree an exported tar holds.
fn tree_of_tar(data: impl Read) -> Tree {
    let mut t = Tree::default();
    let mut pairs: Vec<(String, String)> = vec![];
    let mut a = tar::Archive::new(data);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let raw = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let path = raw
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let path = if path.is_empty() {
            ".".to_string()
        } else {
            path
        };
        assert!(!t.nodes.contains_key(&path), "{path} twice in the export");
        let h = e.header().clone();
        let mode = h.mode().unwrap() & 0o7777;
        let owner = (h.uid().unwrap() as u32, h.gid().unwrap() as u32);
        let mut mtime = format!("{}.0", h.mtime().unwrap());
        let mut x: Vec<(String, Vec<u8>)> = vec![];
        if let Some(pax) = e.pax_extensions().unwrap() {
            for r in pax {
                let r = r.unwrap();
                let k = r.key().unwrap();
                if let Some(n) = k.strip_prefix("SCHILY.xattr.") {
                    x.push((n.to_string(), r.value_bytes().to_vec()));
                } else if k == "mtime" {
                    let v = r.value().unwrap();
                    let (s, f) = v.split_once('.').unwrap_or((v, "0"));
                    let nanos: u64 = format!("{f:0<9}")[..9].parse().unwrap();
                    mtime = format!("{s}.{nanos}");
                }
            }
        }
        let x: Vec<(&str, &[u8])> = x.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8(l.into_owned()).unwrap());
        use tar::EntryType as E;
        let node = match h.entry_type() {
            E::Directory => dir(mode, owner, &x),
            E::Regular => {
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                file_sha(&common::sha256(&data), mode, owner, &mtime, &x)
            }
            E::Symlink => format!(
                "symlink {} {}:{} t={mtime}",
                link.unwrap(),
                owner.0,
                owner.1
            ),
            E::Link => {
                pairs.push((path.clone(), link.unwrap()));
                continue;
            }
            E::Char | E::Block => format!(
                "{} {}:{} {mode:o} {}:{} t={mtime}",
                if h.entry_type() == E::Char {
                    "char"
                } else {
                    "block"
                },
                h.device_major().unwrap().unwrap(),
                h.device_minor().unwrap().unwrap(),
                owner.0,
                owner.1
            ),
            E::Fifo => format!("fifo 0:0 {mode:o} {}:{} t={mtime}", owner.0, owner.1),
            other => panic!("unexpected entry type {other:?} for {path}"),
        };
        t.nodes.insert(path, node);
    }
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (p, target) in pairs {
        let node = t
            .nodes
            .get(&target)
            .unwrap_or_else(|| panic!("{p} links to missing {target}"))
            .clone();
        t.nodes.insert(p.clone(), node);
        groups
            .entry(target.clone())
            .or_insert_with(|| vec![target])
            .push(p);
    }
    for g in groups.values() {
        let first = g.iter().min().unwrap();
        for p in g {
            t.links.insert(p.clone(), first.clone());
        }
    }
    t
}

/// Compares trees path by path, listing every difference.
fn assert_tree(what: &str, actual: &Tree, expected: &Tree) {
    let mut diffs = vec![];
    for (p, e) in &expected.nodes {
        match actual.nodes.get(p) {
            None => diffs.push(format!("missing {p}: expected {e}")),
            Some(a) if a != e => diffs.push(format!("{p}:\n    got      {a}\n    expected {e}")),
            _ => {}
        }
    }
    for (p, a) in &actual.nodes {
        if !expected.nodes.contains_key(p) {
            diffs.push(format!("unexpected {p}: {a}"));
        }
    }
    if actual.links != expected.links {
        diffs.push(format!(
            "hard links: got {:?}, expected {:?}",
            actual.links, expected.links
        ));
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// The test image.

/// Content of the ~100 MB file: compressible, but not trivially.
fn big_content() -> Vec<u8> {
    let mut v = Vec::with_capacity(100 << 20);
    let mut x: u32 = 1;
    while v.len() < 100 << 20 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let word = format!("line {} value {:08x}\n", v.len() / 64, x >> 8);
        v.extend_from_slice(word.as_bytes());
    }
    v.truncate(100 << 20);
    v
}

struct Image {
    layers: Vec<Vec<u8>>,
    expected: Tree,
}

/// Four layers (tar, gzip, zstd, and a ~100 MB gzip) and the tree they merge into.
fn test_image() -> Image {
    let root = (0, 0);
    let l1 = Layer::new()
        .dir("./", 0o755, root)
        .dir("etc/", 0o755, root)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\n",
            0o644,
            root,
        )
        .file("etc/remove-me", b"deleted by layer 2", 0o644, root)
        .dir("etc/dir-remove/", 0o755, root)
        .file("etc/dir-remove/a", b"a", 0o644, root)
        .file("etc/dir-remove/sub/b", b"b", 0o644, root)
        .file("etc/secret", b"s3cret", 0o400, (1234, 5678))
        .file("etc/zero-mode", b"", 0, root)
        .symlink("etc/hosts-link", "/etc/hosts")
        .dir("usr/", 0o755, root)
        .dir("usr/bin/", 0o755, root)
        .pax(&[("SCHILY.xattr.user.mime", b"application/x-tool")])
        .file("usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o755, root)
        .hard("usr/bin/tool-hard", "usr/bin/tool")
        .file("usr/bin/suid", b"suid", 0o4755, root)
        .file("usr/bin/sgid", b"sgid", 0o2755, (0, 50))
        .dir("usr/lib/", 0o755, root)
        .file("usr/lib/libfoo.so.1", b"\x7fELF lib", 0o644, root)
        .symlink("usr/lib/libfoo.so", "libfoo.so.1")
        .symlink("escape", "../../../../../../etc/shadow")
        .dir("tmp/", 0o1777, root)
        .dir("var/", 0o755, root)
        .dir("var/cache/", 0o755, root)
        .pax(&[("SCHILY.xattr.user.dirattr", b"on a dir")])
        .dir("var/cache/app/", 0o750, (1000, 1000))
        .file("var/cache/app/data", b"old data", 0o640, (1000, 1000))
        .dir("opq/", 0o755, root)
        .file("opq/lower-a", b"hidden by the opaque marker", 0o644, root)
        .file("opq/sub/lower-b", b"hidden too", 0o644, root)
        .dir("dev/", 0o755, root)
        .node(tar::EntryType::Char, "dev/null", (1, 3), 0o666)
        .node(tar::EntryType::Block, "dev/sda", (8, 0), 0o660)
        .node(tar::EntryType::Fifo, "dev/fifo", (0, 0), 0o600)
        .finish();
    let l2 = Layer::new()
        .file("etc/.wh.remove-me", b"", 0o644, root)
        .file("etc/.wh.dir-remove", b"", 0o644, root)
        .pax(&[("mtime", b"1600000000.5")])
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
            0o644,
            root,
        )
        .file(
            "etc/hosts-link",
            b"a file now: the symlink was not followed",
            0o644,
            root,
        )
        .hard("usr/bin/hard-to-lower", "usr/bin/tool")
        .dir("opq/", 0o711, root)
        .file(
            "opq/new-early",
            b"same layer, before the marker",
            0o644,
            root,
        )
        .dir("opq/sub/", 0o755, root)
        .file("opq/sub/mine", b"mine", 0o644, root)
        .file("opq/.wh..wh..opq", b"", 0o644, root)
        .file("opq/new-late", b"after the marker", 0o644, root)
        .finish();
    let l3 = Layer::new()
        .file("var/cache/app/.wh.data", b"", 0o644, root)
        .file("var/cache/app/new", b"new data", 0o600, (1000, 1000))
        .file("usr/share/doc/readme", b"implicit parents", 0o644, root)
        .dir("etc/remove-me/", 0o700, root)
        .file("etc/remove-me/now-a-dir", b"x", 0o644, root)
        .finish();
    let big = big_content();
    let l4 = Layer::new()
        .dir("data/", 0o755, root)
        .file("data/big.bin", &big, 0o644, (0, 0))
        .finish();

    let tool_x: &[(&str, &[u8])] = &[("user.mime", b"application/x-tool")];
    let tool = file_sha(
        &common::sha256(b"#!/bin/sh\necho tool\n"),
        0o755,
        root,
        &format!("{T}.0"),
        tool_x,
    );
    let mut nodes: BTreeMap<String, String> = [
        (".", dir(0o755, root, &[])),
        ("etc", dir(0o755, root, &[])),
        (
            "etc/passwd",
            file_sha(
                &common::sha256(
                    b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
                ),
                0o644,
                root,
                &format!("{T}.500000000"),
                &[],
            ),
        ),
        ("etc/remove-me", dir(0o700, root, &[])),
        ("etc/remove-me/now-a-dir", file(b"x", 0o644, root)),
        ("etc/secret", file(b"s3cret", 0o400, (1234, 5678))),
        ("etc/zero-mode", file(b"", 0, root)),
        (
            "etc/hosts-link",
            file(b"a file now: the symlink was not followed", 0o644, root),
        ),
        ("usr", dir(0o755, root, &[])),
        ("usr/bin", dir(0o755, root, &[])),
        ("usr/bin/tool", tool.clone()),
        ("usr/bin/tool-hard", tool.clone()),
        ("usr/bin/hard-to-lower", tool),
        ("usr/bin/suid", file(b"suid", 0o4755, root)),
        ("usr/bin/sgid", file(b"sgid", 0o2755, (0, 50))),
        ("usr/lib", dir(0o755, root, &[])),
        ("usr/lib/libfoo.so.1", file(b"\x7fELF lib", 0o644, root)),
        ("usr/lib/libfoo.so", symlink("libfoo.so.1")),
        ("usr/share", dir(0o755, root, &[])),
        ("usr/share/doc", dir(0o755, root, &[])),
        (
            "usr/share/doc/readme",
            file(b"implicit parents", 0o644, root),
        ),
        ("escape", symlink("../../../../../../etc/shadow")),
        ("tmp", dir(0o1777, root, &[])),
        ("var", dir(0o755, root, &[])),
        ("var/cache", dir(0o755, root, &[])),
        (
            "var/cache/app",
            dir(0o750, (1000, 1000), &[("user.dirattr", b"on a dir")]),
        ),
        ("var/cache/app/new", file(b"new data", 0o600, (1000, 1000))),
        ("opq", dir(0o711, root, &[])),
        (
            "opq/new-early",
            file(b"same layer, before the marker", 0o644, root),
        ),
        ("opq/new-late", file(b"after the marker", 0o644, root)),
        ("opq/sub", dir(0o755, root, &[])),
        ("opq/sub/mine", file(b"mine", 0o644, root)),
        ("dev", dir(0o755, root, &[])),
        ("dev/null", special("char", (1, 3), 0o666, (0, 6))),
        ("dev/sda", special("block", (8, 0), 0o660, (0, 6))),
        ("dev/fifo", special("fifo", (0, 0), 0o600, (0, 6))),
        ("data", dir(0o755, root, &[])),
        ("data/big.bin", file(&big, 0o644, root)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    nodes.insert(
        "etc/hosts-link".into(),
        file(b"a file now: the symlink was not followed", 0o644, root),
    );
    let links = ["usr/bin/tool", "usr/bin/tool-hard", "usr/bin/hard-to-lower"]
        .iter()
        .map(|p| (p.to_string(), "usr/bin/hard-to-lower".to_string()))
        .collect();
    Image {
        layers: vec![l1, l2, l3, l4],
        expected: Tree { nodes, links },
    }
}

// ---------------------------------------------------------------------------------------
// Helpers against the daemon.

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `thinsnap image import` and asserts it succeeded.
fn import(d: &Daemon, archive: &Path, extra: &[&str]) -> String {
    let mut args = vec!["image", "import", archive.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = d.cli(&args);
    assert!(
        o.status.success(),
        "import {} failed:\n{}\n{}",
        archive.display(),
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Runs `thinsnap image import` and asserts it failed; returns its error output.
fn import_fails(d: &Daemon, archive: &Path) -> String {
    let o = d.cli(&["image", "import", archive.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "import of {} should fail:\n{}",
        archive.display(),
        stdout(&o)
    );
    stderr(&o)
}

async fn names(d: &Daemon) -> Vec<String> {
    d.client().await.names().await.unwrap()
}

/// The pool's active dm devices once the daemon has reclaimed every removed snapshot's
/// device: a failed import's snapshots are removed at once, their devices are discarded
/// and deleted in the background, and Cleanup (as containerd calls it) waits for that.
async fn settled_devices(d: &Daemon) -> Vec<String> {
    d.client().await.cleanup().await.unwrap();
    common::dm_devices_of(&d.pool)
}

/// The tree of committed snapshot `name`, through a view.
async fn tree_of_snapshot(d: &Daemon, name: &str) -> Tree {
    let mut c = d.client().await;
    let key = format!("check-{name}");
    let m = c.view(&key, name).await.unwrap();
    let mnt = Mounted::new(d.dir.path(), &key.replace(':', "_"), &m);
    let t = tree_of_dir(&mnt.path);
    drop(mnt);
    c.remove(&key).await.unwrap();
    t
}

// ---------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread")]
async fn loop_import_export_and_reuse() {
    let d = Daemon::start();
    let work = d.dir.path().join("images");
    std::fs::create_dir_all(&work).unwrap();
    let img = test_image();

    // OCI layout: a plain tar, gzip, zstd, and a ~100 MB gzip layer.
    let zs = [Z::Tar, Z::Gzip, Z::Zstd, Z::Gzip];
    let layers: Vec<(&[u8], Z)> = img.layers.iter().map(|l| &l[..]).zip(zs).collect();
    let (a, chains) = oci_archive(&layers, "example.com/test/image:1", false);
    let oci = work.join("oci.tar");
    a.write(&oci);
    drop(a);
    let out = import(&d, &oci, &[]);
    assert!(
        out.contains("4 layers imported, 0 already present"),
        "{out}"
    );
    assert!(out.contains("OCI image layout"), "{out}");
    assert!(
        out.contains(&format!("top snapshot: {}", chains[3])),
        "{out}"
    );
    assert_eq!(private_mounts(d.dir.path()), Vec::<String>::new());
    let mut c = d.client().await;
    for (i, chain) in chains.iter().enumerate() {
        let info = c.stat(chain).await.unwrap();
        assert_eq!(info.kind, 3, "{chain} committed");
        assert_eq!(info.parent, if i == 0 { "" } else { &chains[i - 1] });
        assert_eq!(
            info.labels
                .get("containerd.io/snapshot/thinsnap.image")
                .map(String::as_str),
            Some("example.com/test/image:1")
        );
    }
    assert_eq!(names(&d).await.len(), 4, "nothing but the layers");

    // The merged tree, file by file.
    assert_tree(
        "imported",
        &tree_of_snapshot(&d, &chains[3]).await,
        &img.expected,
    );
    // Lower layers hold only what they should: the whiteouts act on layer 2 only.
    let t1 = tree_of_snapshot(&d, &chains[0]).await;
    assert!(t1.nodes.contains_key("etc/remove-me") && t1.nodes.contains_key("opq/lower-a"));
    assert!(!t1.nodes.contains_key("data/big.bin"));

    // Export of the top snapshot is the same tree.
    let exported = work.join("export.tar");
    let o = d.cli(&["image", "export", &chains[3], exported.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("exported"), "{}", stdout(&o));
    assert_tree(
        "exported",
        &tree_of_tar(std::fs::File::open(&exported).unwrap()),
        &img.expected,
    );
    std::fs::remove_file(&exported).unwrap();
    assert_eq!(names(&d).await.len(), 4, "the export's view is gone");
    assert_eq!(private_mounts(d.dir.path()), Vec::<String>::new());

    // A second import reuses every layer.
    let out = import(&d, &oci, &["--ref", "again:2"]);
    assert!(
        out.contains("0 layers imported, 4 already present"),
        "{out}"
    );
    assert!(
        out.contains(&format!("top snapshot: {}", chains[3])),
        "{out}"
    );
    std::fs::remove_file(&oci).unwrap();

    // docker save (before Docker 25) of layer 1 and a layer of its own: layer 1 is the
    // same snapshot whatever the format.
    let d2 = Layer::new()
        .file("etc/.wh.passwd", b"", 0o644, (0, 0))
        .file("docker-only", b"from docker save", 0o600, (7, 8))
        .finish();
    let (a, dchains) = docker_archive(&[&img.layers[0], &d2], "example/docker:1");
    assert_eq!(dchains[0], chains[0]);
    let docker = work.join("docker.tar");
    a.write(&docker);
    let out = import(&d, &docker, &[]);
    assert!(
        out.contains("1 layers imported, 1 already present"),
        "{out}"
    );
    assert!(
        out.contains("imported example/docker:1 (docker save"),
        "{out}"
    );
    let t = tree_of_snapshot(&d, &dchains[1]).await;
    assert_eq!(
        t.nodes["docker-only"],
        file(b"from docker save", 0o600, (7, 8))
    );
    assert!(!t.nodes.contains_key("etc/passwd"));
    assert_eq!(t.nodes["etc/secret"], img.expected.nodes["etc/secret"]);

    // docker save of Docker 25+: an OCI layout plus manifest.json; index.json is read.
    let d3 = Layer::new()
        .file("new-docker", b"25", 0o644, (0, 0))
        .finish();
    let (a, nchains) = oci_archive(
        &[(&img.layers[0], Z::Tar), (&d3, Z::Gzip)],
        "from-index:1",
        true,
    );
    let newdocker = work.join("docker25.tar");
    a.write(&newdocker);
    let out = import(&d, &newdocker, &[]);
    assert!(
        out.contains("imported from-index:1 (docker save (OCI layout)"),
        "{out}"
    );
    assert!(
        out.contains("1 layers imported, 1 already present"),
        "{out}"
    );
    let t = tree_of_snapshot(&d, &nchains[1]).await;
    assert_eq!(t.nodes["new-docker"], file(b"25", 0o644, (0, 0)));
    assert_eq!(names(&d).await.len(), 6);
    assert_eq!(private_mounts(d.dir.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_bad_archives_are_refused_and_leave_nothing() {
    let d = Daemon::start();
    let work = d.dir.path().join("images");
    std::fs::create_dir_all(&work).unwrap();
    let ok = Layer::new().file("ok", b"fine", 0o644, (0, 0)).finish();
    // Layer 1 of every image below, imported first so the bad ones fail on their own.
    let (a, base) = oci_archive(&[(&ok, Z::Tar)], "base", false);
    let p = work.join("base.tar");
    a.write(&p);
    import(&d, &p, &[]);
    let before = names(&d).await;
    let devices = common::dm_devices_of(&d.pool);

    // (name, bad layer, what the error must say)
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            Layer::new()
                .file("fine-1", b"applied, then discarded", 0o644, (0, 0))
                .file("../escaped", b"x", 0o644, (0, 0))
                .finish(),
            "`..` component",
        ),
        (
            "absolute",
            Layer::new()
                .file("/thinsnap-abs", b"x", 0o644, (0, 0))
                .finish(),
            "absolute path",
        ),
        (
            "hardlink-out",
            Layer::new().hard("h", "../../etc/passwd").finish(),
            "hard link target",
        ),
    ];
    for (name, layer, says) in &cases {
        let (a, chains) = oci_archive(&[(&ok, Z::Tar), (layer, Z::Gzip)], name, false);
        let p = work.join(format!("{name}.tar"));
        a.write(&p);
        let err = import_fails(&d, &p);
        assert!(err.contains(says), "{name}: {err}");
        assert!(err.contains("refusing layer entry"), "{name}: {err}");
        assert!(
            err.contains("layer 2/2") && err.contains("no snapshot of this import is left"),
            "{name}: {err}"
        );
        assert_eq!(chains[0], base[0]);
        assert_eq!(names(&d).await, before, "{name}: nothing new is left");
        assert_eq!(settled_devices(&d).await, devices, "{name}: no device left");
        assert_eq!(private_mounts(d.dir.path()), Vec::<String>::new(), "{name}");
    }
    assert!(!Path::new("/thinsnap-abs").exists());

    // Symlinked parents resolve inside the snapshot, as with containerd: a link to `/`
    // writes the snapshot's /etc, and a hard link through it finds only the snapshot's
    // files (here: none, so the import fails and leaves nothing).
    let (a, _) = oci_archive(
        &[
            (&ok, Z::Tar),
            (
                &Layer::new()
                    .symlink("s", "/etc")
                    .hard("h", "s/passwd")
                    .finish(),
                Z::Tar,
            ),
        ],
        "hardlink-via-symlink",
        false,
    );
    let p = work.join("hardlink-via-symlink.tar");
    a.write(&p);
    let err = import_fails(&d, &p);
    assert!(
        err.contains("in neither this layer nor those below"),
        "{err}"
    );
    assert_eq!(names(&d).await, before, "nothing new is left");
    let scoped = Layer::new()
        .symlink("a", "/")
        .file("a/etc/thinsnap-escape", b"inside", 0o644, (0, 0))
        .finish();
    let (a, chains) = oci_archive(&[(&ok, Z::Tar), (&scoped, Z::Tar)], "scoped", false);
    let p = work.join("scoped.tar");
    a.write(&p);
    import(&d, &p, &[]);
    assert!(
        !Path::new("/etc/thinsnap-escape").exists(),
        "the host's /etc is untouched"
    );
    let mut c = d.client().await;
    let m = c.view("scoped-view", chains[1].as_str()).await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "scoped-view", &m);
    assert_eq!(
        std::fs::read(mnt.path.join("etc/thinsnap-escape")).unwrap(),
        b"inside"
    );
    drop(mnt);
    c.remove("scoped-view").await.unwrap();
    c.remove(chains[1].as_str()).await.unwrap();
    assert_eq!(names(&d).await, before);

    // A blob that does not match its digest: refused before anything is made.
    let evil = Layer::new()
        .file("evil", b"original", 0o644, (0, 0))
        .finish();
    let (mut a, _) = oci_archive(&[(&ok, Z::Tar), (&evil, Z::Tar)], "tampered", false);
    let d_evil = format!("blobs/sha256/{}", common::sha256(&evil));
    let blob = &mut a.0.iter_mut().find(|(n, _)| *n == d_evil).unwrap().1;
    let at = blob.windows(8).position(|w| w == b"original").unwrap();
    blob[at..at + 8].copy_from_slice(b"tampered");
    let p = work.join("tampered.tar");
    a.write(&p);
    let err = import_fails(&d, &p);
    assert!(err.contains("has digest") && err.contains(&d_evil), "{err}");
    assert!(err.contains("corrupt or was altered"), "{err}");
    assert_eq!(names(&d).await, before);

    // A truncated archive.
    let big = Layer::new()
        .file("big", &vec![7u8; 1 << 20], 0o644, (0, 0))
        .finish();
    let (a, _) = oci_archive(&[(&ok, Z::Tar), (&big, Z::Tar)], "truncated", false);
    let p = work.join("truncated.tar");
    a.write(&p);
    let full = std::fs::read(&p).unwrap();
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    let err = import_fails(&d, &p);
    assert!(err.contains("truncated"), "{err}");
    assert!(err.contains("truncated.tar"), "names the file: {err}");
    assert_eq!(names(&d).await, before);

    // A layer whose content does not match the configuration's diff id (legacy docker
    // save has no other digest for it): caught while applying, the layer discarded.
    let (mut a, _) = docker_archive(&[&ok, &evil], "diffid:1");
    let layer = &mut a
        .0
        .iter_mut()
        .find(|(n, data)| n.ends_with("layer.tar") && data == &evil)
        .unwrap()
        .1;
    let at = layer.windows(8).position(|w| w == b"original").unwrap();
    layer[at..at + 8].copy_from_slice(b"tampered");
    let p = work.join("diffid.tar");
    a.write(&p);
    let err = import_fails(&d, &p);
    assert!(err.contains("the image configuration says"), "{err}");
    assert!(err.contains("layer 2/2"), "{err}");
    assert_eq!(names(&d).await, before);
    assert_eq!(settled_devices(&d).await, devices);

    // A bad layer above a new good one: the good one is committed and reported as kept.
    let good = Layer::new().file("good", b"kept", 0o644, (0, 0)).finish();
    let bad = Layer::new().file("../x", b"x", 0o644, (0, 0)).finish();
    let (a, chains) = oci_archive(
        &[(&ok, Z::Tar), (&good, Z::Zstd), (&bad, Z::Tar)],
        "partial",
        false,
    );
    let p = work.join("partial.tar");
    a.write(&p);
    let err = import_fails(&d, &p);
    assert!(err.contains("layer 3/3"), "{err}");
    assert!(
        err.contains("the 1 layer this import committed below it is complete"),
        "{err}"
    );
    let mut expected = before.clone();
    expected.push(chains[1].clone());
    expected.sort();
    assert_eq!(names(&d).await, expected);
    assert_eq!(private_mounts(d.dir.path()), Vec::<String>::new());
}
