//! Generates containerd's Snapshots API (server and client) from `proto/`.

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
    Ok(())
}
