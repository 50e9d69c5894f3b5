//! Building image layers and archives for the tests: layer tars written entry by entry
//! (raw names, so hostile ones can be made), OCI image layouts and `docker save` archives,
//! with containerd's chain ids.

use std::{io::Write, path::Path};

use serde_json::json;

/// mtime of every entry the test layers write (unless a PAX record says otherwise).
pub const T: u64 = 1_600_000_000;

/// A layer tar written entry by entry; names go into the header raw, so bad ones can be
/// made.
pub struct Layer(pub tar::Builder<Vec<u8>>);

#[derive(Clone, Copy)]
pub enum Z {
    Tar,
    Gzip,
    Zstd,
}

pub fn header(
    kind: tar::EntryType,
    name: &str,
    mode: u32,
    owner: (u32, u32),
    size: u64,
) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(owner.0.into());
    h.set_gid(owner.1.into());
    h.set_size(size);
    h.set_mtime(T);
    assert!(name.len() <= 100, "{name}");
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h
}

impl Layer {
    pub fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }
    pub fn raw(&mut self, mut h: tar::Header, data: &[u8]) -> &mut Layer {
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Layer {
        self.0
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }
    pub fn dir(&mut self, name: &str, mode: u32, owner: (u32, u32)) -> &mut Layer {
        self.raw(header(tar::EntryType::Directory, name, mode, owner, 0), b"")
    }
    pub fn file(&mut self, name: &str, data: &[u8], mode: u32, owner: (u32, u32)) -> &mut Layer {
        self.raw(
            header(
                tar::EntryType::Regular,
                name,
                mode,
                owner,
                data.len() as u64,
            ),
            data,
        )
    }
    pub fn link(&mut self, kind: tar::EntryType, name: &str, target: &str) -> &mut Layer {
        let mut h = header(kind, name, 0o777, (0, 0), 0);
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        self.raw(h, b"")
    }
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Layer {
        self.link(tar::EntryType::Symlink, name, target)
    }
    pub fn hard(&mut self, name: &str, target: &str) -> &mut Layer {
        self.link(tar::EntryType::Link, name, target)
    }
    pub fn node(
        &mut self,
        kind: tar::EntryType,
        name: &str,
        dev: (u32, u32),
        mode: u32,
    ) -> &mut Layer {
        let mut h = header(kind, name, mode, (0, 6), 0);
        h.set_device_major(dev.0).unwrap();
        h.set_device_minor(dev.1).unwrap();
        self.raw(h, b"")
    }
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()))
            .into_inner()
            .unwrap()
    }
}

pub fn compress(tar: &[u8], z: Z) -> Vec<u8> {
    match z {
        Z::Tar => tar.to_vec(),
        Z::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Z::Zstd => zstd::stream::encode_all(tar, 1).unwrap(),
    }
}

pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", super::sha256(data))
}

/// containerd's chain ids of `diff_ids`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(p) => digest(format!("{p} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Files of an archive, written in order.
pub struct Archive(pub Vec<(String, Vec<u8>)>);

impl Archive {
    pub fn add(&mut self, name: impl Into<String>, data: Vec<u8>) {
        self.0.push((name.into(), data));
    }
    /// Adds a blob under blobs/sha256 and returns its descriptor.
    pub fn blob(&mut self, media_type: &str, data: Vec<u8>) -> serde_json::Value {
        let d = digest(&data);
        let desc = json!({"mediaType": media_type, "digest": d, "size": data.len()});
        self.add(format!("blobs/sha256/{}", &d[7..]), data);
        desc
    }
    pub fn write(&self, path: &Path) {
        let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
        for (n, data) in &self.0 {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(T);
            b.append_data(&mut h, n, &data[..]).unwrap();
        }
        b.into_inner().unwrap().sync_all().unwrap();
    }
}

pub fn config_json(diff_ids: &[String]) -> Vec<u8> {
    runtime_config_json(diff_ids, None)
}

/// An image config of `diff_ids`, with `runtime` (Cmd, Env, ...) as its `config` when given:
/// what a runtime needs to start a container from the image.
pub fn runtime_config_json(diff_ids: &[String], runtime: Option<&serde_json::Value>) -> Vec<u8> {
    let mut c = json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    if let Some(r) = runtime {
        c["config"] = r.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An OCI image layout of `layers` (tar, compression) named `name`; returns the archive
/// and the layers' chain ids. With `docker_manifest`, also docker 25's manifest.json (with
/// a different tag, to show which one is read).
pub fn oci_archive(
    layers: &[(&[u8], Z)],
    name: &str,
    docker_manifest: bool,
) -> (Archive, Vec<String>) {
    oci_archive_with(layers, name, docker_manifest, None)
}

/// [`oci_archive`] whose image config has `runtime` as its `config` (Cmd, Env, ...), so
/// that containerd can run it.
pub fn oci_archive_with(
    layers: &[(&[u8], Z)],
    name: &str,
    docker_manifest: bool,
    runtime: Option<&serde_json::Value>,
) -> (Archive, Vec<String>) {
    let mut a = Archive(vec![]);
    a.add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec());
    let mut descs = vec![];
    let mut diff_ids = vec![];
    for (tar, z) in layers {
        let mt = match z {
            Z::Tar => "application/vnd.oci.image.layer.v1.tar",
            Z::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Z::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        };
        descs.push(a.blob(mt, compress(tar, *z)));
        diff_ids.push(digest(tar));
    }
    let config = a.blob(
        "application/vnd.oci.image.config.v1+json",
        runtime_config_json(&diff_ids, runtime),
    );
    let manifest = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": config, "layers": descs}))
    .unwrap();
    let mut m = a.blob(OCI_MANIFEST, manifest);
    m["annotations"] = json!({"io.containerd.image.name": name});
    if docker_manifest {
        let layer_paths: Vec<String> = descs
            .iter()
            .map(|d| format!("blobs/sha256/{}", &d["digest"].as_str().unwrap()[7..]))
            .collect();
        let cfg = format!("blobs/sha256/{}", &config["digest"].as_str().unwrap()[7..]);
        a.add(
            "manifest.json",
            serde_json::to_vec(
                &json!([{"Config": cfg, "RepoTags": ["from-manifest-json:1"],
                "Layers": layer_paths}]),
            )
            .unwrap(),
        );
    }
    a.add(
        "index.json",
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [m]})).unwrap(),
    );
    (a, chain_ids(&diff_ids))
}

/// A `docker save` archive of Docker before 25: `<id>/layer.tar`, `<hex>.json`,
/// manifest.json.
pub fn docker_archive(layers: &[&[u8]], tag: &str) -> (Archive, Vec<String>) {
    docker_archive_with(layers, tag, None)
}

/// [`docker_archive`] whose image config has `runtime` as its `config` (Cmd, Env, ...), so
/// that Docker can run it.
pub fn docker_archive_with(
    layers: &[&[u8]],
    tag: &str,
    runtime: Option<&serde_json::Value>,
) -> (Archive, Vec<String>) {
    let mut a = Archive(vec![]);
    let diff_ids: Vec<String> = layers.iter().map(|t| digest(t)).collect();
    let mut paths = vec![];
    for (i, t) in layers.iter().enumerate() {
        let id = super::sha256(format!("layer {i} {}", diff_ids[i]).as_bytes());
        a.add(format!("{id}/VERSION"), b"1.0".to_vec());
        a.add(format!("{id}/layer.tar"), t.to_vec());
        paths.push(format!("{id}/layer.tar"));
    }
    let config = runtime_config_json(&diff_ids, runtime);
    let cname = format!("{}.json", super::sha256(&config));
    a.add(cname.clone(), config);
    a.add(
        "manifest.json",
        serde_json::to_vec(&json!([{"Config": cname, "RepoTags": [tag], "Layers": paths}]))
            .unwrap(),
    );
    (a, chain_ids(&diff_ids))
}

/// The guest's static busybox (the host's in a Vagrant VM).
#[allow(dead_code)]
pub fn busybox() -> Vec<u8> {
    ["/busybox/bin/busybox", "/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .expect("a static busybox at /busybox/bin/busybox (the VM guest's) or /bin/busybox (apt-get install busybox-static)")
}

/// The three layers (uncompressed tars) of the end-to-end tests' busybox image:
///
/// 1. busybox and `applets` as symlinks to it in /bin, and /tmp;
/// 2. /data/{keep,gone,changed}.txt and /opq/{old.txt,olddir/f};
/// 3. a whiteout of /data/gone.txt, a new /data/changed.txt, and /opq made opaque with a
///    new /opq/new.txt.
#[allow(dead_code)]
pub fn busybox_layers(applets: &[&str]) -> [Vec<u8>; 3] {
    const ROOT: (u32, u32) = (0, 0);
    let mut l1 = Layer::new();
    l1.dir("bin/", 0o755, ROOT).dir("tmp/", 0o1777, ROOT).file(
        "bin/busybox",
        &busybox(),
        0o755,
        ROOT,
    );
    for applet in applets {
        l1.symlink(&format!("bin/{applet}"), "busybox");
    }
    let l1 = l1.finish();
    let l2 = Layer::new()
        .dir("data/", 0o755, ROOT)
        .file("data/keep.txt", b"kept from layer 2\n", 0o644, ROOT)
        .file("data/gone.txt", b"whited out by layer 3\n", 0o644, ROOT)
        .file("data/changed.txt", b"layer 2\n", 0o644, ROOT)
        .dir("opq/", 0o755, ROOT)
        .file("opq/old.txt", b"hidden by layer 3\n", 0o644, ROOT)
        .dir("opq/olddir/", 0o755, ROOT)
        .file("opq/olddir/f", b"hidden too\n", 0o644, ROOT)
        .finish();
    let l3 = Layer::new()
        .dir("data/", 0o755, ROOT)
        .file("data/.wh.gone.txt", b"", 0o644, ROOT)
        .file("data/changed.txt", b"layer 3\n", 0o644, ROOT)
        .dir("opq/", 0o755, ROOT)
        .file("opq/.wh..wh..opq", b"", 0o644, ROOT)
        .file("opq/new.txt", b"added by layer 3\n", 0o644, ROOT)
        .finish();
    [l1, l2, l3]
}

/// A shell script listing what a container sees of [`busybox_layers`]' files (and
/// `data/written`): a `present F` or `absent F` line each, `changed: ...` and `opq: ...`.
#[allow(dead_code)]
pub const LOOK: &str = "cd /; for f in data/keep.txt data/gone.txt data/changed.txt opq/old.txt \
    opq/olddir opq/new.txt data/written; do if [ -e $f ]; then echo \"present $f\"; \
    else echo \"absent $f\"; fi; done; echo \"changed: $(cat data/changed.txt)\"; \
    echo \"opq: $(ls -A opq | tr '\\n' ' ')\"";

/// Lines of `out` (of [`LOOK`]) that report a file as present or absent.
#[allow(dead_code)]
pub fn presence(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.starts_with("present ") || l.starts_with("absent "))
        .collect()
}
