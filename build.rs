//! Generates containerd's Snapshots API and thinsnap's admin API (server and client), and
//! a client of Kubernetes' CRI (for the CRI end-to-end test), from `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[
                "proto/containerd/services/snapshots/v1/snapshots.proto",
                "proto/thinsnap/admin/v1/admin.proto",
            ],
            &["proto", "/usr/include"],
        )?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_protos(&["proto/k8s.io/cri-api/runtime/v1/api.proto"], &["proto"])?;
    Ok(())
}
