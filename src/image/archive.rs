//! Image archives: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`) or
//! a `docker save` tar (`manifest.json`), read in place from the uncompressed tar file:
//! the image to import, its verified configuration and layers, and a verified,
//! decompressed stream of each layer.
//!
//! The archive itself is a plain tar; each layer blob inside may be an uncompressed tar,
//! gzip or zstd, told apart by its first bytes. Every blob is checked against its digest
//! (and declared size) where the format gives one; every layer's uncompressed stream is
//! checked against the configuration's `rootfs.diff_ids` as it is applied.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{
    digest::{chain_ids, Digest, Hashing},
    error::{Error, Result},
};

/// Largest index, manifest or configuration JSON accepted.
pub const MAX_JSON: u64 = 16 << 20;
/// Most layers an image may have (containerd and Docker allow 127 in practice).
pub const MAX_LAYERS: usize = 1024;
/// Bytes read at a time when checking a blob's digest.
const VERIFY_READ: usize = 1 << 20;
/// Deepest nesting of image indexes followed.
const MAX_INDEX_DEPTH: usize = 4;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// How the archive lays the image out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An OCI image layout (`skopeo copy ... oci-archive:`, `docker buildx --output type=oci`).
    OciLayout,
    /// `docker save` of Docker 25 and later: an OCI image layout plus `manifest.json`
    /// (the layout is what is read).
    DockerSaveOci,
    /// `docker save` before Docker 25: `manifest.json`, `<id>/layer.tar`, `<hex>.json`.
    DockerSave,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::OciLayout => "OCI image layout",
            Format::DockerSaveOci => "docker save (OCI layout)",
            Format::DockerSave => "docker save",
        })
    }
}

/// Compression of a layer blob, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

impl Compression {
    /// What `head` (the first bytes of a blob) says; an error for compressions images do
    /// not use.
    pub fn detect(head: &[u8]) -> std::result::Result<Compression, &'static str> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Ok(Compression::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Ok(Compression::Zstd)
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Err("xz")
        } else if head.starts_with(b"BZh") {
            Err("bzip2")
        } else {
            Ok(Compression::None)
        }
    }

    /// The name `file` would use.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// One layer of the image to import.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The archive entry holding the blob.
    pub entry: String,
    /// The blob's digest, where the format gives one (OCI layouts, Docker 25+); legacy
    /// `docker save` layers are verified by their diff id only.
    pub digest: Option<Digest>,
    /// The blob's size in the archive.
    pub size: u64,
    /// The media type the manifest gives, if any (informational: the content decides).
    pub media_type: Option<String>,
    /// Digest of the uncompressed tar, from the image configuration.
    pub diff_id: Digest,
    /// containerd's chain id of this layer and all below it: the committed snapshot's name.
    pub chain_id: Digest,
}

/// The image an archive holds, verified down to its configuration.
#[derive(Debug, Clone)]
pub struct Image {
    /// How the archive lays it out.
    pub format: Format,
    /// The image's name as the archive records it (an OCI `ref.name` annotation or the
    /// first of docker's `RepoTags`).
    pub name: Option<String>,
    /// Digest of the image configuration (docker's image id).
    pub config: Digest,
    /// Its layers, bottom first.
    pub layers: Vec<Layer>,
}

/// Where an entry's data lies in the archive file.
#[derive(Debug, Clone)]
enum Entry {
    File { offset: u64, size: u64 },
    Link(String),
}

/// An image archive file, indexed.
pub struct Archive {
    path: PathBuf,
    file: File,
    entries: HashMap<String, Entry>,
}

/// An OCI descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Config {
    rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciLayout {
    image_layout_version: String,
}

/// A candidate image manifest found through the index.
struct Candidate {
    desc: Descriptor,
    names: Vec<String>,
}

/// Reads `len` bytes of `file` from `offset`, failing on a short file.
struct Section<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Section<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive file ends early",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Calls a function with the number of bytes each read returned.
struct Counting<'p, F: ?Sized, R> {
    inner: R,
    f: &'p mut F,
}

impl<F: FnMut(u64) + ?Sized, R: Read> Read for Counting<'_, F, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.f)(n as u64);
        Ok(n)
    }
}

/// A layer's uncompressed tar stream; [`LayerStream::finish`] checks its diff id.
pub struct LayerStream<'a> {
    inner: Hashing<Box<dyn Read + Send + 'a>>,
    compression: Compression,
    archive: &'a Path,
    entry: String,
    diff_id: Digest,
}

impl LayerStream<'_> {
    /// The blob's compression.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Reads what is left of the stream (tar padding after the end-of-archive marker) and
    /// checks the digest of everything read against the layer's diff id. Returns the
    /// uncompressed size.
    ///
    /// # Errors
    /// [`Error::DiffId`] on a mismatch; [`Error::Archive`] when the blob cannot be read
    /// or decompressed to its end.
    pub fn finish(mut self) -> Result<u64> {
        io::copy(&mut self.inner, &mut io::sink()).map_err(|e| self.read_error(e))?;
        let (actual, bytes) = self.inner.finish();
        if actual != self.diff_id {
            return Err(Error::DiffId {
                archive: self.archive.to_path_buf(),
                entry: self.entry,
                expected: self.diff_id,
                actual,
                bytes,
            });
        }
        Ok(bytes)
    }
}

impl LayerStream<'_> {
    /// The error for failing to read or decompress the blob to its end (`e`, from a read
    /// of this stream) after the layer's tar ended.
    pub fn read_error(&self, e: io::Error) -> Error {
        Error::Archive {
            archive: self.archive.to_path_buf(),
            what: format!(
                "layer {}: cannot read or decompress ({}) it to its end: {e}",
                self.entry,
                self.compression.as_str()
            ),
        }
    }
}

impl Read for LayerStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

/// Normalizes an entry name of the archive: no leading `./` or `/`, no empty or `.`
/// components; `..` is resolved within the archive and never above its root.
fn clean_name(base: &[&str], name: &str) -> String {
    let mut parts: Vec<&str> = if name.starts_with('/') {
        vec![]
    } else {
        base.to_vec()
    };
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// The architecture name OCI uses for this machine's.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

fn is_index(media_type: Option<&str>) -> bool {
    matches!(media_type, Some(OCI_INDEX | DOCKER_LIST))
}

fn is_manifest(media_type: Option<&str>) -> bool {
    matches!(media_type, Some(OCI_MANIFEST | DOCKER_MANIFEST))
}

/// Names an OCI descriptor gives its image.
fn ref_names(d: &Descriptor) -> Vec<String> {
    [
        "io.containerd.image.name",
        "org.opencontainers.image.ref.name",
    ]
    .iter()
    .filter_map(|k| d.annotations.get(*k).cloned())
    .collect()
}

impl Archive {
    /// Opens the archive at `path` and indexes its entries.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be read; [`Error::Archive`] when it is not a tar or is
    /// truncated.
    pub fn open(path: &Path) -> Result<Archive> {
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        let bad = |what: String| Error::Archive {
            archive: path.to_path_buf(),
            what,
        };
        let mut entries = HashMap::new();
        let mut end = 0u64;
        {
            let mut tar = tar::Archive::new(&file);
            let iter = tar
                .entries_with_seek()
                .map_err(|e| bad(format!("not a tar archive: {e}")))?;
            for entry in iter {
                let entry = entry.map_err(|e| {
                    bad(format!(
                        "not a valid tar archive after byte {end}: {e} (is the file truncated \
                         or not an image archive? `docker save` and `skopeo copy ... \
                         oci-archive:` write uncompressed tars)"
                    ))
                })?;
                let name = clean_name(&[], &String::from_utf8_lossy(&entry.path_bytes()));
                let offset = entry.raw_file_position();
                let size = entry.size();
                end = offset + size.div_ceil(512) * 512;
                if offset + size > len {
                    return Err(bad(format!(
                        "truncated: entry {name} needs {size} bytes from byte {offset}, but the \
                         file ends at byte {len} (copy the archive again)"
                    )));
                }
                let kind = entry.header().entry_type();
                if kind.is_file() || kind == tar::EntryType::Continuous {
                    entries.insert(name, Entry::File { offset, size });
                } else if kind.is_symlink() || kind.is_hard_link() {
                    if let Some(target) = entry.link_name_bytes() {
                        let target = String::from_utf8_lossy(&target).into_owned();
                        let target = if kind.is_hard_link() {
                            clean_name(&[], &target)
                        } else {
                            let dir: Vec<&str> = name.split('/').collect();
                            clean_name(&dir[..dir.len().saturating_sub(1)], &target)
                        };
                        entries.insert(name, Entry::Link(target));
                    }
                }
            }
        }
        // tar ends with two zero blocks; a file that stops at an entry boundary without
        // them was cut short there.
        let mut marker = [0u8; 512];
        match file.read_exact_at(&mut marker, end) {
            Ok(()) if marker.iter().all(|b| *b == 0) => {}
            Ok(()) => {
                return Err(bad(format!(
                    "not a valid tar archive: unreadable header at byte {end}"
                )))
            }
            Err(_) => {
                return Err(bad(format!(
                    "truncated: the file ends at byte {len} without tar's end-of-archive \
                     marker (copy the archive again)"
                )))
            }
        }
        Ok(Archive {
            path: path.to_path_buf(),
            file,
            entries,
        })
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn bad(&self, what: impl Into<String>) -> Error {
        Error::Archive {
            archive: self.path.clone(),
            what: what.into(),
        }
    }

    fn integrity(&self, entry: &str, what: impl Into<String>) -> Error {
        Error::Integrity {
            archive: self.path.clone(),
            entry: entry.to_string(),
            what: what.into(),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The offset and size of entry `name`, following links inside the archive.
    fn locate(&self, name: &str) -> Result<(u64, u64)> {
        let mut cur = clean_name(&[], name);
        for _ in 0..16 {
            match self.entries.get(&cur) {
                Some(Entry::File { offset, size }) => return Ok((*offset, *size)),
                Some(Entry::Link(t)) => cur = t.clone(),
                None => {
                    return Err(self.bad(format!(
                        "{name} is not in the archive (an incomplete save, or a layer the \
                         image refers to but the archive does not carry)"
                    )))
                }
            }
        }
        Err(self.bad(format!("{name}: too many links")))
    }

    fn section(&self, offset: u64, size: u64) -> Section<'_> {
        Section {
            file: &self.file,
            pos: offset,
            end: offset + size,
        }
    }

    fn blob_name(&self, digest: &str) -> Result<(String, Digest)> {
        let d: Digest = digest.parse().map_err(|e| {
            self.bad(format!(
                "{e}: only sha256 content is supported (re-save the image with a current tool)"
            ))
        })?;
        Ok((format!("blobs/sha256/{}", d.hex()), d))
    }

    /// Reads a JSON document, checking its size and (when given) digest.
    fn json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        what: &str,
        expect: Option<(&Digest, i64)>,
    ) -> Result<T> {
        let (offset, size) = self.locate(name)?;
        if size > MAX_JSON {
            return Err(self.bad(format!(
                "{what} {name} is {size} bytes; refusing JSON over {} MiB",
                MAX_JSON >> 20
            )));
        }
        if let Some((_, declared)) = expect {
            if declared != size as i64 {
                return Err(self.integrity(
                    name,
                    format!("the {what} is {size} bytes but its descriptor says {declared}"),
                ));
            }
        }
        let mut data = Vec::with_capacity(size as usize);
        self.section(offset, size)
            .read_to_end(&mut data)
            .map_err(|e| Error::io("read", &self.path, e))?;
        if let Some((digest, _)) = expect {
            let actual = Digest::of(&data);
            if &actual != digest {
                return Err(self.integrity(
                    name,
                    format!("the {what} has digest {actual}, not {digest}"),
                ));
            }
        }
        serde_json::from_slice(&data)
            .map_err(|e| self.bad(format!("{name} is not a valid {what}: {e}")))
    }

    /// The image to import: `want` (a name the archive records for it) chooses among
    /// several; otherwise the only one, or the one for this machine's platform.
    ///
    /// # Errors
    /// [`Error::Archive`] or [`Error::Integrity`] for anything malformed, missing or not
    /// matching its digest.
    pub fn image(&self, want: Option<&str>) -> Result<Image> {
        if self.has("index.json") {
            let format = if self.has("manifest.json") {
                Format::DockerSaveOci
            } else {
                Format::OciLayout
            };
            self.oci_image(format, want)
        } else if self.has("manifest.json") {
            self.docker_image(want)
        } else {
            Err(self.bad(
                "neither index.json (OCI image layout) nor manifest.json (docker save) is in \
                 it: is it an image archive? Create one with `docker save -o FILE IMAGE` or \
                 `skopeo copy docker://IMAGE oci-archive:FILE`",
            ))
        }
    }

    fn oci_image(&self, format: Format, want: Option<&str>) -> Result<Image> {
        if self.has("oci-layout") {
            let l: OciLayout = self.json("oci-layout", "OCI layout marker", None)?;
            if !l.image_layout_version.starts_with("1.") {
                return Err(self.bad(format!(
                    "OCI image layout version {} is not supported (1.x is)",
                    l.image_layout_version
                )));
            }
        }
        let index: Index = self.json("index.json", "image index", None)?;
        let mut found = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for d in &index.manifests {
            self.collect(d, ref_names(d), 0, &mut found, &mut seen)?;
        }
        let chosen = self.choose(found, want)?;
        let (name, digest) = self.blob_name(&chosen.desc.digest)?;
        let manifest: Manifest =
            self.json(&name, "image manifest", Some((&digest, chosen.desc.size)))?;
        if manifest.layers.len() > MAX_LAYERS {
            return Err(self.bad(format!(
                "the image has {} layers; refusing more than {MAX_LAYERS}",
                manifest.layers.len()
            )));
        }
        let (cname, cdigest) = self.blob_name(&manifest.config.digest)?;
        let config: Config = self.json(
            &cname,
            "image configuration",
            Some((&cdigest, manifest.config.size)),
        )?;
        let diff_ids = self.diff_ids(&config, manifest.layers.len())?;
        let chains = chain_ids(&diff_ids);
        let mut layers = Vec::with_capacity(diff_ids.len());
        for ((d, diff_id), chain_id) in manifest.layers.iter().zip(diff_ids).zip(chains) {
            if let Some(mt) = &d.media_type {
                if !mt.contains(".tar") || mt.contains("encrypted") {
                    return Err(self.bad(format!(
                        "layer {} has media type {mt}, which is not a (gzip or zstd) tar",
                        d.digest
                    )));
                }
            }
            let (entry, digest) = self.blob_name(&d.digest)?;
            let (_, size) = self.locate(&entry)?;
            if d.size != size as i64 {
                return Err(self.integrity(
                    &entry,
                    format!("the layer is {size} bytes but the manifest says {}", d.size),
                ));
            }
            layers.push(Layer {
                entry,
                digest: Some(digest),
                size,
                media_type: d.media_type.clone(),
                diff_id,
                chain_id,
            });
        }
        Ok(Image {
            format,
            name: chosen.names.into_iter().next(),
            config: cdigest,
            layers,
        })
    }

    /// Collects the image manifests reachable from descriptor `d`. Each nested index is
    /// read once (`seen`), however many descriptors name it: a crafted archive whose indexes
    /// name each other many times over cannot make the walk exponential.
    fn collect(
        &self,
        d: &Descriptor,
        names: Vec<String>,
        depth: usize,
        out: &mut Vec<Candidate>,
        seen: &mut std::collections::HashSet<String>,
    ) -> Result<()> {
        let sniffed;
        let mut mt = d.media_type.as_deref();
        if mt.is_none() {
            // Descriptors without a media type (old tools): the document says what it is.
            let (name, digest) = self.blob_name(&d.digest)?;
            if !self.has(&name) {
                return Ok(());
            }
            let doc: serde_json::Value =
                self.json(&name, "image manifest or index", Some((&digest, d.size)))?;
            sniffed = if doc.get("manifests").is_some() {
                OCI_INDEX
            } else {
                OCI_MANIFEST
            };
            mt = Some(sniffed);
        }
        if is_manifest(mt) {
            // BuildKit's attestations are manifests of no platform: not images.
            if !d.annotations.contains_key("vnd.docker.reference.type") {
                out.push(Candidate {
                    desc: d.clone(),
                    names,
                });
            }
        } else if is_index(mt) {
            if depth >= MAX_INDEX_DEPTH {
                return Err(self.bad(format!(
                    "image indexes nested deeper than {MAX_INDEX_DEPTH}"
                )));
            }
            let (name, digest) = self.blob_name(&d.digest)?;
            if !self.has(&name) {
                // A multi-platform index whose other platforms were not saved.
                return Ok(());
            }
            if !seen.insert(name.clone()) {
                return Ok(());
            }
            let nested: Index = self.json(&name, "image index", Some((&digest, d.size)))?;
            for n in &nested.manifests {
                let mut names = names.clone();
                names.extend(ref_names(n));
                self.collect(n, names, depth + 1, out, seen)?;
            }
        }
        Ok(())
    }

    fn choose(&self, found: Vec<Candidate>, want: Option<&str>) -> Result<Candidate> {
        let mut found: Vec<Candidate> = found;
        // Only manifests whose blob is here can be imported.
        found.retain(|c| {
            self.blob_name(&c.desc.digest)
                .map(|(n, _)| self.has(&n))
                .unwrap_or(true)
        });
        if found.is_empty() {
            return Err(self.bad("index.json names no image manifest this archive carries"));
        }
        if let Some(w) = want {
            let named: Vec<usize> = (0..found.len())
                .filter(|i| found[*i].names.iter().any(|n| n == w))
                .collect();
            if !named.is_empty() {
                found = found
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| named.contains(i))
                    .map(|(_, c)| c)
                    .collect();
            }
        }
        let arch = host_arch();
        let matches = |c: &Candidate| {
            c.desc
                .platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        };
        if found.iter().any(matches) {
            found.retain(matches);
        }
        found.sort_by(|a, b| a.desc.digest.cmp(&b.desc.digest));
        found.dedup_by(|a, b| a.desc.digest == b.desc.digest);
        if found.len() == 1 {
            return Ok(found.pop().expect("one"));
        }
        let list: Vec<String> = found
            .iter()
            .map(|c| {
                let p = c
                    .desc
                    .platform
                    .as_ref()
                    .map(|p| {
                        format!(
                            "{}/{}{}",
                            p.os,
                            p.architecture,
                            p.variant
                                .as_deref()
                                .map(|v| format!("/{v}"))
                                .unwrap_or_default()
                        )
                    })
                    .unwrap_or_else(|| "no platform".into());
                format!("{} ({p}; {})", c.desc.digest, c.names.join(", "))
            })
            .collect();
        Err(self.bad(format!(
            "it holds {} images and none is the only one for linux/{arch}: {}; name one with \
             --ref",
            found.len(),
            list.join("; ")
        )))
    }

    fn diff_ids(&self, config: &Config, layers: usize) -> Result<Vec<Digest>> {
        if config.rootfs.kind != "layers" {
            return Err(self.bad(format!(
                "the image configuration's rootfs type is {:?}, not \"layers\"",
                config.rootfs.kind
            )));
        }
        if config.rootfs.diff_ids.len() != layers {
            return Err(self.bad(format!(
                "the image configuration lists {} diff ids for {layers} layers",
                config.rootfs.diff_ids.len()
            )));
        }
        config
            .rootfs
            .diff_ids
            .iter()
            .map(|d| {
                d.parse()
                    .map_err(|e| self.bad(format!("image configuration: diff id {e}")))
            })
            .collect()
    }

    /// The digest a `docker save` path names, if it names one (`blobs/sha256/<hex>` or
    /// `<hex>.json`).
    fn digest_in_path(path: &str) -> Option<Digest> {
        let name = clean_name(&[], path);
        if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            return Digest::from_hex(hex).ok();
        }
        name.strip_suffix(".json")
            .filter(|h| !h.contains('/'))
            .and_then(|h| Digest::from_hex(h).ok())
    }

    fn docker_image(&self, want: Option<&str>) -> Result<Image> {
        let mut manifests: Vec<DockerManifest> =
            self.json("manifest.json", "docker save manifest", None)?;
        let tags = |m: &DockerManifest| m.repo_tags.clone().unwrap_or_default();
        let m = if manifests.len() == 1 {
            manifests.pop().expect("one")
        } else if let Some(i) = want.and_then(|w| {
            manifests
                .iter()
                .position(|m| tags(m).iter().any(|t| t == w))
        }) {
            manifests.swap_remove(i)
        } else if manifests.is_empty() {
            return Err(self.bad("manifest.json lists no image"));
        } else {
            let list: Vec<String> = manifests
                .iter()
                .map(|m| format!("{} ({})", m.config, tags(m).join(", ")))
                .collect();
            return Err(self.bad(format!(
                "it holds {} images: {}; name one of their tags with --ref",
                manifests.len(),
                list.join("; ")
            )));
        };
        if m.layers.len() > MAX_LAYERS {
            return Err(self.bad(format!(
                "the image has {} layers; refusing more than {MAX_LAYERS}",
                m.layers.len()
            )));
        }
        let cdigest = Self::digest_in_path(&m.config);
        let (_, csize) = self.locate(&m.config)?;
        let config: Config = self.json(
            &m.config,
            "image configuration",
            cdigest.as_ref().map(|d| (d, csize as i64)),
        )?;
        let config_digest = match cdigest {
            Some(d) => d,
            None => {
                let (offset, size) = self.locate(&m.config)?;
                let mut h = Hashing::new(self.section(offset, size));
                io::copy(&mut h, &mut io::sink()).map_err(|e| Error::io("read", &self.path, e))?;
                h.finish().0
            }
        };
        let diff_ids = self.diff_ids(&config, m.layers.len())?;
        let chains = chain_ids(&diff_ids);
        let mut layers = Vec::with_capacity(diff_ids.len());
        for ((path, diff_id), chain_id) in m.layers.iter().zip(diff_ids).zip(chains) {
            let (_, size) = self.locate(path)?;
            layers.push(Layer {
                entry: clean_name(&[], path),
                digest: Self::digest_in_path(path),
                size,
                media_type: None,
                diff_id,
                chain_id,
            });
        }
        Ok(Image {
            format: Format::DockerSave,
            name: tags(&m).into_iter().next(),
            config: config_digest,
            layers,
        })
    }

    /// Checks a layer blob against its digest (when the format gives one), calling
    /// `progress` with the bytes read.
    ///
    /// # Errors
    /// [`Error::Integrity`] on a mismatch; [`Error::Io`] when it cannot be read.
    pub fn verify(&self, layer: &Layer, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let Some(expected) = &layer.digest else {
            return Ok(());
        };
        let (offset, size) = self.locate(&layer.entry)?;
        let mut h = Hashing::new(Counting {
            inner: self.section(offset, size),
            f: progress,
        });
        // Large reads: io::copy would read 8 KiB at a time, a syscall each.
        let mut buf = vec![0u8; VERIFY_READ];
        loop {
            match h.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", &self.path, e)),
            }
        }
        let (actual, _) = h.finish();
        if &actual != expected {
            return Err(self.integrity(
                &layer.entry,
                format!("the layer blob has digest {actual}, not {expected}"),
            ));
        }
        Ok(())
    }

    /// The uncompressed tar stream of `layer`, calling `progress` with the blob bytes read.
    ///
    /// # Errors
    /// [`Error::Archive`] when the blob is missing or compressed with something other than
    /// gzip or zstd.
    pub fn layer<'a>(
        &'a self,
        layer: &Layer,
        progress: &'a mut (dyn FnMut(u64) + Send),
    ) -> Result<LayerStream<'a>> {
        let (offset, size) = self.locate(&layer.entry)?;
        let mut section = self.section(offset, size);
        let mut head = Vec::with_capacity(6);
        (&mut section)
            .take(6)
            .read_to_end(&mut head)
            .map_err(|e| Error::io("read", &self.path, e))?;
        let compression = Compression::detect(&head).map_err(|c| {
            self.bad(format!(
                "layer {} is compressed with {c}; only uncompressed, gzip and zstd layers \
                 are supported",
                layer.entry
            ))
        })?;
        if let Some(mt) = &layer.media_type {
            let says = if mt.ends_with("+gzip") || mt.ends_with(".gzip") {
                Compression::Gzip
            } else if mt.ends_with("+zstd") {
                Compression::Zstd
            } else {
                Compression::None
            };
            if says != compression {
                tracing::warn!(
                    layer = %layer.entry,
                    media_type = %mt,
                    content = compression.as_str(),
                    "the layer's media type does not match its content; going by the content"
                );
            }
        }
        progress(head.len() as u64);
        let raw = Counting {
            inner: io::Cursor::new(head).chain(section),
            f: progress,
        };
        let raw = io::BufReader::with_capacity(256 << 10, raw);
        let decoded: Box<dyn Read + Send + 'a> = match compression {
            Compression::None => Box::new(raw),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(raw)
                    .map_err(|e| Error::io("start decompressing", &self.path, e))?,
            ),
        };
        Ok(LayerStream {
            inner: Hashing::new(decoded),
            compression,
            archive: &self.path,
            entry: layer.entry.clone(),
            diff_id: layer.diff_id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_are_cleaned_within_the_archive() {
        assert_eq!(clean_name(&[], "./blobs//sha256/ab"), "blobs/sha256/ab");
        assert_eq!(clean_name(&[], "/index.json"), "index.json");
        assert_eq!(clean_name(&["a", "b"], "../c/layer.tar"), "a/c/layer.tar");
        assert_eq!(clean_name(&["a"], "../../../x"), "x");
    }

    #[test]
    fn compression_by_magic() {
        assert_eq!(
            Compression::detect(&[0x1f, 0x8b, 8, 0]),
            Ok(Compression::Gzip)
        );
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Ok(Compression::Zstd)
        );
        assert_eq!(Compression::detect(b"etc/\0\0"), Ok(Compression::None));
        assert_eq!(Compression::detect(b""), Ok(Compression::None));
        assert_eq!(Compression::detect(b"\xfd7zXZ\0"), Err("xz"));
        assert_eq!(Compression::detect(b"BZh91A"), Err("bzip2"));
    }

    #[test]
    fn digests_named_by_docker_paths() {
        let hex = "a".repeat(64);
        assert_eq!(
            Archive::digest_in_path(&format!("blobs/sha256/{hex}")),
            Some(Digest::from_hex(&hex).unwrap())
        );
        assert_eq!(
            Archive::digest_in_path(&format!("{hex}.json")),
            Some(Digest::from_hex(&hex).unwrap())
        );
        assert_eq!(Archive::digest_in_path(&format!("{hex}/layer.tar")), None);
    }

    use serde_json::json;
    use std::io::Write;

    type Files = Vec<(String, Vec<u8>)>;

    /// A layer tar holding one file.
    fn layer_tar(name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data).unwrap();
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Writes an archive of `files` (name, content) to a temporary file.
    fn archive_file(files: &[(String, Vec<u8>)]) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("image.tar");
        let mut b = tar::Builder::new(File::create(&p).unwrap());
        for (n, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, n, &data[..]).unwrap();
        }
        b.into_inner().unwrap().flush().unwrap();
        (d, p)
    }

    fn blob(files: &mut Vec<(String, Vec<u8>)>, data: Vec<u8>) -> serde_json::Value {
        let d = Digest::of(&data);
        let v = json!({"mediaType": "x", "digest": d.as_str(), "size": data.len()});
        files.push((format!("blobs/sha256/{}", d.hex()), data));
        v
    }

    /// An OCI layout with a gzip and a zstd layer, through a nested index with two
    /// platforms and an attestation.
    fn oci(corrupt_layer: bool) -> (Files, Vec<Vec<u8>>) {
        let mut files = vec![(
            "oci-layout".to_string(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        )];
        let l1 = layer_tar("a", b"one");
        let l2 = layer_tar("b", b"two");
        let mut d1 = blob(&mut files, gzip(&l1));
        d1["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
        let mut d2 = blob(&mut files, zstd::stream::encode_all(&l2[..], 1).unwrap());
        d2["mediaType"] = "application/vnd.oci.image.layer.v1.tar+zstd".into();
        let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
            "diff_ids": [Digest::of(&l1).as_str(), Digest::of(&l2).as_str()]}});
        let c = blob(&mut files, serde_json::to_vec(&config).unwrap());
        let manifest = json!({"schemaVersion": 2, "config": c, "layers": [d1, d2]});
        let mut m = blob(&mut files, serde_json::to_vec(&manifest).unwrap());
        m["mediaType"] = OCI_MANIFEST.into();
        m["platform"] = json!({"os": "linux", "architecture": host_arch()});
        let mut other = m.clone();
        other["platform"] = json!({"os": "linux", "architecture": "s390x"});
        other["digest"] = Digest::of(b"not here").as_str().into();
        let mut att = m.clone();
        att["annotations"] = json!({"vnd.docker.reference.type": "attestation-manifest"});
        att["platform"] = json!({"os": "unknown", "architecture": "unknown"});
        let idx = json!({"schemaVersion": 2, "manifests": [m, other, att]});
        let mut i = blob(&mut files, serde_json::to_vec(&idx).unwrap());
        i["mediaType"] = OCI_INDEX.into();
        i["annotations"] = json!({"org.opencontainers.image.ref.name": "example:1"});
        files.push((
            "index.json".into(),
            serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [i]})).unwrap(),
        ));
        if corrupt_layer {
            let (_, data) = files
                .iter_mut()
                .find(|(n, _)| {
                    n.ends_with(d1["digest"].as_str().unwrap().trim_start_matches("sha256:"))
                })
                .unwrap();
            let last = data.len() - 1;
            data[last] ^= 1;
        }
        (files, vec![l1, l2])
    }

    fn read_layer(a: &Archive, l: &Layer) -> Result<Vec<u8>> {
        let mut n = 0u64;
        let mut count = |k| n += k;
        let mut s = a.layer(l, &mut count)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        s.finish()?;
        Ok(out)
    }

    #[test]
    fn indexes_naming_each_other_many_times_are_read_once() {
        let (mut files, _) = oci(false);
        // index.json -> a x300 -> b x300 -> c x300 -> the image's index: 300^3 paths.
        let (pos, _) = files
            .iter()
            .enumerate()
            .find(|(_, (n, _))| n == "index.json")
            .unwrap();
        let (_, top) = files.remove(pos);
        let top: serde_json::Value = serde_json::from_slice(&top).unwrap();
        let mut inner = top["manifests"][0].clone();
        for _ in 0..3 {
            let many: Vec<serde_json::Value> = (0..300).map(|_| inner.clone()).collect();
            let idx = json!({"schemaVersion": 2, "manifests": many});
            inner = blob(&mut files, serde_json::to_vec(&idx).unwrap());
            inner["mediaType"] = OCI_INDEX.into();
        }
        files.push((
            "index.json".into(),
            serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [inner]})).unwrap(),
        ));
        let (_d, p) = archive_file(&files);
        let img = Archive::open(&p).unwrap().image(None).unwrap();
        assert_eq!(img.layers.len(), 2);
    }

    #[test]
    fn oci_layout_through_a_nested_index() {
        let (files, tars) = oci(false);
        let (_d, p) = archive_file(&files);
        let a = Archive::open(&p).unwrap();
        let img = a.image(None).unwrap();
        assert_eq!(img.format, Format::OciLayout);
        assert_eq!(img.name.as_deref(), Some("example:1"));
        assert_eq!(img.layers.len(), 2);
        let diffs: Vec<Digest> = tars.iter().map(|t| Digest::of(t)).collect();
        assert_eq!(img.layers[0].chain_id, diffs[0]);
        assert_eq!(img.layers[1].chain_id, chain_ids(&diffs)[1]);
        for (l, t) in img.layers.iter().zip(&tars) {
            a.verify(l, &mut |_| {}).unwrap();
            assert_eq!(&read_layer(&a, l).unwrap(), t);
        }
    }

    #[test]
    fn corrupt_blobs_and_truncated_archives_are_refused() {
        let (files, _) = oci(true);
        let (_d, p) = archive_file(&files);
        let a = Archive::open(&p).unwrap();
        let img = a.image(None).unwrap();
        let e = a.verify(&img.layers[0], &mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::Integrity { .. }), "{e}");
        assert!(e.to_string().contains("has digest"), "{e}");

        let (files, _) = oci(false);
        let (_d, p) = archive_file(&files);
        let full = std::fs::read(&p).unwrap();
        for cut in [full.len() - 1024, full.len() / 2, 700] {
            std::fs::write(&p, &full[..cut]).unwrap();
            let e = Archive::open(&p).map(|_| ()).unwrap_err().to_string();
            assert!(
                e.contains("truncated") || e.contains("not a valid tar"),
                "{cut}: {e}"
            );
        }
    }

    #[test]
    fn diff_ids_are_checked_while_reading() {
        let l = layer_tar("a", b"one");
        let other = layer_tar("a", b"two");
        let config =
            json!({"rootfs": {"type": "layers", "diff_ids": [Digest::of(&other).as_str()]}});
        let config = serde_json::to_vec(&config).unwrap();
        let cname = format!("{}.json", Digest::of(&config).hex());
        let files = vec![
            (
                "manifest.json".to_string(),
                serde_json::to_vec(
                    &json!([{"Config": cname, "RepoTags": ["x:1"], "Layers": ["abc/layer.tar"]}]),
                )
                .unwrap(),
            ),
            (cname.clone(), config),
            ("abc/layer.tar".to_string(), l),
        ];
        let (_d, p) = archive_file(&files);
        let a = Archive::open(&p).unwrap();
        let img = a.image(None).unwrap();
        assert_eq!(img.format, Format::DockerSave);
        assert_eq!(img.name.as_deref(), Some("x:1"));
        assert!(img.layers[0].digest.is_none());
        let e = read_layer(&a, &img.layers[0]).unwrap_err();
        assert!(matches!(e, Error::DiffId { .. }), "{e}");
    }
}
