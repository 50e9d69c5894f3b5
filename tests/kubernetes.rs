//! The Kubernetes deployment, on the host (it needs no device-mapper; vagrant/test runs it
//! beside tests/package.rs): packaging/kubernetes/thinsnap.yaml validated against the
//! Kubernetes API's own types (k8s-openapi), strictly, and with what thinsnap needs of it;
//! and, when THINSNAP_OCI names it, the OCI archive packaging/build-image made.

use std::collections::BTreeMap;

use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap, core::v1::Namespace};
use serde::de::DeserializeOwned;
use serde_json::Value;

const MANIFEST: &str = include_str!("../packaging/kubernetes/thinsnap.yaml");

/// Parses `doc` as `T`, then checks that serializing it again gives the document back:
/// a field the API does not have (a typo, a wrong level) would be dropped, and fails.
fn strict<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", doc["kind"], doc["metadata"]["name"]));
    let back = serde_json::to_value(&typed).unwrap();
    if let Some(path) = dropped(doc, &back, String::new()) {
        panic!(
            "{} {}: the Kubernetes API has no field {path}",
            doc["kind"], doc["metadata"]["name"]
        );
    }
    typed
}

/// The first path in `a` that `b` lacks.
fn dropped(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x.iter().find_map(|(k, v)| match y.get(k) {
            None => Some(format!("{at}.{k}")),
            Some(w) => dropped(v, w, format!("{at}.{k}")),
        }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| dropped(v, w, format!("{at}[{i}]"))),
        (x, y) if x == y => None,
        _ => Some(at),
    }
}

fn documents() -> Vec<Value> {
    serde_yaml::Deserializer::from_str(MANIFEST)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .collect()
}

#[test]
fn the_manifest_is_valid_kubernetes() {
    let docs = documents();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["Namespace", "RuntimeClass", "ConfigMap", "DaemonSet"],
        "the manifest's objects"
    );
    let _: Namespace = strict(&docs[0]);
    let rc: RuntimeClass = strict(&docs[1]);
    let cm: ConfigMap = strict(&docs[2]);
    let ds: DaemonSet = strict(&docs[3]);

    // The pieces fit: the pods run on the RuntimeClass, the drop-in gives its handler a
    // snapshotter that is not thinsnap, and the config serves containerd's address.
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.runtime_class_name.as_deref(),
        Some(rc.metadata.name.as_deref().unwrap())
    );
    let data = cm.data.as_ref().unwrap();
    let drop_in: toml::Value = toml::from_str(&data["containerd.toml"]).unwrap();
    let cri = &drop_in["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
    assert_eq!(cri["snapshotter"].as_str(), Some("thinsnap"));
    assert_eq!(
        cri["runtimes"][&rc.handler]["snapshotter"].as_str(),
        Some("overlayfs")
    );
    let config = thinsnap_core::config::Config::parse(&data["config.toml"]).unwrap();
    assert_eq!(
        drop_in["proxy_plugins"]["thinsnap"]["address"].as_str(),
        config.socket.to_str()
    );

    // Privileged, with the node's state directory, socket directory and /dev.
    let c = &pod.containers[0];
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let host: BTreeMap<&str, &str> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    let mounted: BTreeMap<&str, &str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.as_str(), m.name.as_str()))
        .collect();
    for dir in [config.state_dir.to_str().unwrap(), "/run/thinsnap", "/dev"] {
        assert_eq!(host.get(mounted[dir]), Some(&dir), "{dir} is the node's");
    }
    assert_eq!(
        c.args.as_deref().unwrap(),
        ["--config", "/etc/thinsnap/config.toml", "serve"]
    );
}

/// The image packaging/build-image made (vagrant/test builds it and sets THINSNAP_OCI): a
/// well-formed OCI layout whose digests hold, named as the manifest uses it, whose layer
/// has thinsnap and every program and library it runs.
#[test]
fn the_oci_image_is_what_the_manifest_runs() {
    let Some(path) = std::env::var_os("THINSNAP_OCI") else {
        panic!(
            "THINSNAP_OCI must name the archive packaging/build-image made (vagrant/test sets it)"
        );
    };
    use sha2::Digest;
    let mut blobs = BTreeMap::new();
    let mut index = None;
    let mut a = tar::Archive::new(std::fs::File::open(&path).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if let Some(d) = name.strip_prefix("blobs/sha256/") {
            if !d.is_empty() {
                assert_eq!(hex::encode(sha2::Sha256::digest(&data)), d, "blob digest");
                blobs.insert(format!("sha256:{d}"), data);
            }
        } else if name == "index.json" {
            index = Some(serde_json::from_slice::<Value>(&data).unwrap());
        }
    }
    let index = index.expect("index.json");
    let m = &index["manifests"][0];
    let ds: DaemonSet = strict(&documents()[3]);
    let image = ds.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone()
        .unwrap();
    assert_eq!(m["annotations"]["io.containerd.image.name"], image.as_str());
    let manifest: Value = serde_json::from_slice(&blobs[m["digest"].as_str().unwrap()]).unwrap();
    let config: Value =
        serde_json::from_slice(&blobs[manifest["config"]["digest"].as_str().unwrap()]).unwrap();
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/bin/thinsnap");
    let layer = &blobs[manifest["layers"][0]["digest"].as_str().unwrap()];
    let mut files = std::collections::BTreeSet::new();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&layer[..]));
    for e in tar.entries().unwrap() {
        let e = e.unwrap();
        files.insert(
            e.path()
                .unwrap()
                .display()
                .to_string()
                .trim_start_matches("./")
                .to_string(),
        );
    }
    for f in [
        "usr/bin/thinsnap",
        "usr/sbin/mkfs.ext4",
        "usr/sbin/resize2fs",
        "usr/sbin/mkfs.xfs",
        "usr/sbin/xfs_growfs",
        "usr/sbin/thin_check",
        "usr/sbin/lvm",
        "usr/bin/sh",
        "etc/mke2fs.conf",
        "usr/lib64/ld-linux-x86-64.so.2",
    ] {
        assert!(files.contains(f), "{f} is not in the image");
    }
}
