//! thinsnap: a block-level thin-provisioning snapshotter for containerd.

fn main() {
    println!("thinsnap {}", env!("CARGO_PKG_VERSION"));
}
