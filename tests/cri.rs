//! Kubernetes' path end to end, in the VM: containerd 1.6's CRI plugin with thinsnap as its
//! snapshotter, driven by a client that speaks the CRI (runtime.v1 RuntimeService and
//! ImageService) as kubelet does. A pod sandbox from a locally imported pause image, a
//! container from a three-layer image with whiteouts, its writable layer's bytes in
//! ContainerStats, thinsnap's figures in ImageFsInfo, and after Stop/Remove and image
//! removal nothing left but the base device; then the same with a thinsnap restart between
//! CreateContainer and StartContainer.
//!
//! No CNI: the guest has no CNI plugins, so the pods use the node's network namespace
//! (NamespaceOption network NODE), for which containerd 1.6 sets up no pod network.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{
    containerd::{find_program, Containerd, Cri, SNAPSHOTTER},
    daemon::Daemon,
    image::{busybox_layers, oci_archive_with, presence, Layer, LOOK, Z},
};
use serde_json::json;
use tonic::transport::Channel;

/// The CRI API, generated from proto/k8s.io/cri-api by build.rs.
#[allow(clippy::all, dead_code)]
mod runtime {
    tonic::include_proto!("runtime.v1");
}

use runtime::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient, *,
};

const PAUSE: &str = "thinsnap.test/pause:cri";
const IMAGE: &str = "thinsnap.test/busybox:cri";
const MIB: u64 = 1 << 20;
/// What the container writes to its writable layer.
const WRITTEN: u64 = 20 * MIB;

/// kubelet's two CRI clients on containerd's socket.
struct Kubelet {
    rt: RuntimeServiceClient<Channel>,
    img: ImageServiceClient<Channel>,
}

impl Kubelet {
    async fn connect(socket: &Path) -> Kubelet {
        let path = socket.to_path_buf();
        let channel = tonic::transport::Endpoint::try_from("http://[::1]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        Kubelet {
            rt: RuntimeServiceClient::new(channel.clone()),
            img: ImageServiceClient::new(channel),
        }
    }
}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

/// Imports the pause image (busybox's sleep, as pause does nothing but wait) and the
/// three-layer busybox image into CRI's namespace, unpacked onto thinsnap.
fn import_images(c: &Containerd) {
    let dir = c.dir.path();
    let mut l = Layer::new();
    l.dir("bin/", 0o755, (0, 0))
        .file("bin/busybox", &common::image::busybox(), 0o755, (0, 0))
        .symlink("bin/sleep", "busybox");
    let pause_layer = l.finish();
    let runtime = json!({"Entrypoint": ["/bin/sleep", "2147483647"], "WorkingDir": "/"});
    let (archive, _) = oci_archive_with(&[(&pause_layer, Z::Gzip)], PAUSE, false, Some(&runtime));
    archive.write(&dir.join("pause.tar"));

    let [l1, l2, l3] = busybox_layers(&["sh", "ls", "cat", "echo", "sleep", "test", "tr", "dd"]);
    let runtime = json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"});
    let (archive, _) = oci_archive_with(
        &[(&l1, Z::Gzip), (&l2, Z::Tar), (&l3, Z::Zstd)],
        IMAGE,
        false,
        Some(&runtime),
    );
    archive.write(&dir.join("busybox.tar"));
    for (name, file) in [(PAUSE, "pause.tar"), (IMAGE, "busybox.tar")] {
        let out = c.ok(&[
            "images",
            "import",
            "--snapshotter",
            SNAPSHOTTER,
            dir.join(file).to_str().unwrap(),
        ]);
        assert!(out.contains(name), "import: {out}");
    }
}

/// Polls `f` every 200 ms until it returns Some, for at most `secs` seconds.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    secs: u64,
    mut f: impl FnMut() -> F,
) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if start.elapsed() > Duration::from_secs(secs) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// thinsnap's own sums over every snapshot it holds (all of them CRI's): exclusive bytes
/// and inodes, as `thinsnap snapshot usage --json` reports them.
fn thinsnap_sums(d: &Daemon) -> (u64, u64) {
    let u = d.cli_json(&["snapshot", "usage", "--json"]);
    u.as_array().unwrap().iter().fold((0, 0), |(b, i), r| {
        (
            b + r["exclusive_bytes"].as_u64().unwrap(),
            i + r["inodes"].as_u64().unwrap(),
        )
    })
}

async fn image_fs(k: &mut Kubelet) -> FilesystemUsage {
    let r = k
        .img
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.image_filesystems.len(), 1, "{r:?}");
    r.image_filesystems[0].clone()
}

/// What containerd's log of a CRI container holds: the CRI log format's content parts.
fn container_output(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .map(|s| format!("{s}\n"))
        .collect()
}

/// One pod's life, as kubelet leads it: sandbox, container, stats, then everything
/// removed and collected. With `restart`, thinsnap restarts between CreateContainer and
/// StartContainer.
async fn pod(k: &mut Kubelet, c: &Containerd, d: &mut Daemon, round: u32, restart: bool) {
    let t0 = Instant::now();
    let before = d.thin_devices();
    import_images(c);
    // CRI's image store learns of imported images from containerd's events.
    let found = eventually(30, || {
        let mut img = k.img.clone();
        async move {
            let r = img
                .image_status(ImageStatusRequest {
                    image: spec(IMAGE),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner();
            r.image
        }
    })
    .await
    .expect("CRI never saw the imported image");
    assert_eq!(found.repo_tags, [IMAGE], "{found:?}");

    let logs = c.dir.path().join(format!("pod-logs-{round}"));
    std::fs::create_dir_all(&logs).unwrap();
    let node = NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    };
    let sandbox_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: format!("pod-{round}"),
            uid: format!("uid-{round}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        // The node's network means the node's UTS namespace: no hostname of its own
        // (runc refuses to set one), as kubelet leaves it for host-network pods.
        hostname: String::new(),
        log_directory: logs.display().to_string(),
        dns_config: Some(DnsConfig {
            servers: vec!["127.0.0.1".into()],
            ..Default::default()
        }),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("/{}", c.cgroup),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(node),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod_id =
        k.rt.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.log_tail()))
        .into_inner()
        .pod_sandbox_id;

    // ImageFsInfo is the sum of thinsnap's Usage over CRI's snapshots (the image's layers
    // and the sandbox's), once CRI's collector has asked thinsnap about them all.
    let last_fs = std::sync::Arc::new(std::sync::Mutex::new((0, 0)));
    let fs = eventually(30, || {
        let mut k2 = Kubelet {
            rt: k.rt.clone(),
            img: k.img.clone(),
        };
        let sums = thinsnap_sums(d);
        let last_fs = last_fs.clone();
        async move {
            let fs = image_fs(&mut k2).await;
            let got = (
                fs.used_bytes.as_ref().unwrap().value,
                fs.inodes_used.as_ref().unwrap().value,
            );
            *last_fs.lock().unwrap() = got;
            (got == sums).then_some(fs)
        }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "ImageFsInfo never matched thinsnap's figures {:?}: {:?}",
            thinsnap_sums(d),
            last_fs.lock().unwrap()
        )
    });
    let fs_before = fs.used_bytes.as_ref().unwrap().value;
    eprintln!(
        "round {round}: ImageFsInfo {fs_before} bytes, {} inodes at {}",
        fs.inodes_used.as_ref().unwrap().value,
        fs.fs_id.as_ref().unwrap().mountpoint
    );

    let script = format!(
        "{LOOK}; dd if=/dev/zero of=/data/twenty bs=1048576 count={} conv=fsync 2>&1; \
         echo wrote; exec sleep 600",
        WRITTEN / MIB
    );
    let container_config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "writer".into(),
            attempt: 0,
        }),
        image: spec(IMAGE),
        command: vec!["/bin/sh".into(), "-c".into(), script],
        log_path: "writer.log".into(),
        linux: Some(LinuxContainerConfig::default()),
        ..Default::default()
    };
    let ctr_id =
        k.rt.create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(container_config),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", c.log_tail()))
        .into_inner()
        .container_id;
    if restart {
        assert!(d.stop().unwrap().success(), "thinsnap stops cleanly");
        d.spawn();
    }
    k.rt.start_container(StartContainerRequest {
        container_id: ctr_id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", c.log_tail()));

    // The container sees the layers merged, whiteout and opaque directory applied.
    let log = logs.join("writer.log");
    let out = eventually(60, || {
        let out = container_output(&log);
        async move { out.contains("wrote\n").then_some(out) }
    })
    .await
    .unwrap_or_else(|| panic!("the container never wrote: {}", container_output(&log)));
    assert_eq!(
        presence(&out),
        [
            "present data/keep.txt",
            "absent data/gone.txt",
            "present data/changed.txt",
            "absent opq/old.txt",
            "absent opq/olddir",
            "present opq/new.txt",
            "absent data/written",
        ],
        "{out}"
    );
    assert!(out.contains("changed: layer 3\n"), "{out}");
    assert!(out.contains("opq: new.txt \n"), "{out}");

    // kubelet's view of the writable layer: thinsnap's exclusive bytes of the container's
    // snapshot, through CRI's collector (every second here).
    let within = |b: u64| b.abs_diff(WRITTEN) <= WRITTEN / 10;
    let last = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ok = eventually(30, || {
        let mut rt = k.rt.clone();
        let id = ctr_id.clone();
        let last = last.clone();
        async move {
            let s = rt
                .container_stats(ContainerStatsRequest { container_id: id })
                .await
                .unwrap()
                .into_inner()
                .stats
                .unwrap();
            let bytes = s.writable_layer.unwrap().used_bytes.unwrap().value;
            last.store(bytes, std::sync::atomic::Ordering::SeqCst);
            within(bytes).then_some(())
        }
    })
    .await;
    let last = last.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        ok.is_some(),
        "round {round}: the writable layer reports {last} bytes for {WRITTEN} written"
    );
    eprintln!("round {round}: writable layer {last} bytes for {WRITTEN} written");
    let grown = eventually(30, || {
        let mut k2 = Kubelet {
            rt: k.rt.clone(),
            img: k.img.clone(),
        };
        async move {
            let now = image_fs(&mut k2).await.used_bytes.unwrap().value;
            (now >= fs_before + WRITTEN * 9 / 10).then_some(now)
        }
    })
    .await;
    assert!(
        grown.is_some(),
        "ImageFsInfo did not grow by what the container wrote"
    );

    // Gone again, as kubelet removes a pod and image garbage collection an image.
    k.rt.stop_container(StopContainerRequest {
        container_id: ctr_id.clone(),
        timeout: 0,
    })
    .await
    .unwrap();
    k.rt.remove_container(RemoveContainerRequest {
        container_id: ctr_id,
    })
    .await
    .unwrap();
    k.rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    })
    .await
    .unwrap();
    k.rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod_id,
    })
    .await
    .unwrap();
    for image in [IMAGE, PAUSE] {
        k.img
            .remove_image(RemoveImageRequest { image: spec(image) })
            .await
            .unwrap();
    }
    let images = k
        .img
        .list_images(ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(images.is_empty(), "{images:?}");
    // containerd's garbage collector removed every snapshot through thinsnap's Remove (CRI
    // deletes images synchronously; the collector may still be finishing).
    let left = eventually(30, || {
        let list = d.cli_json(&["snapshot", "list", "--json"]);
        async move { (list == json!([])).then_some(()) }
    })
    .await;
    assert!(
        left.is_some(),
        "snapshots left after the pod and images were removed: {}",
        d.cli_json(&["snapshot", "list", "--json"])
    );
    let ctr_left = c.ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
    assert_eq!(ctr_left.lines().count(), 1, "containerd's list: {ctr_left}");
    // And CRI's collector forgets them: kubelet's image filesystem is empty again. (Until
    // it has, a layer imported again under the same key would keep its old figure.)
    let empty = eventually(30, || {
        let mut k2 = Kubelet {
            rt: k.rt.clone(),
            img: k.img.clone(),
        };
        async move {
            let fs = image_fs(&mut k2).await;
            let got = (fs.used_bytes.unwrap().value, fs.inodes_used.unwrap().value);
            (got == (0, 0)).then_some(())
        }
    })
    .await;
    assert!(
        empty.is_some(),
        "ImageFsInfo after everything was removed: {:?}",
        image_fs(k).await
    );
    let base = if before == 0 { 1 } else { 0 };
    assert_eq!(
        d.thin_devices(),
        before + base,
        "only the base device is left"
    );
    eprintln!(
        "round {round} (restart: {restart}) took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_cri_pods_on_thinsnap_and_across_a_restart() {
    let mut d = Daemon::start_activated();
    assert!(
        find_program("containerd").is_some(),
        "this test needs containerd 1.6 with its CRI plugin: run it in the VM \
         (`vagrant/test --test cri`), whose tools disk has Debian 12's containerd"
    );
    let c = Containerd::start_cri(
        &d,
        &Cri {
            sandbox_image: PAUSE.into(),
        },
    );
    let mut k = Kubelet::connect(&c.socket).await;
    let v =
        k.rt.version(VersionRequest {
            version: "v1".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("CRI Version: {e}\n{}", c.log_tail()))
        .into_inner();
    assert_eq!(v.runtime_api_version, "v1", "{v:?}");
    eprintln!(
        "{} {} speaks CRI {}",
        v.runtime_name, v.runtime_version, v.runtime_api_version
    );
    pod(&mut k, &c, &mut d, 1, false).await;
    pod(&mut k, &c, &mut d, 2, true).await;
}
