//! containerd's Snapshots API, generated from `proto/` by `build.rs`.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// containerd's protobuf packages.
pub mod containerd {
    /// `containerd.types`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

/// thinsnap's own packages.
pub mod thinsnap {
    /// `thinsnap.admin.v1`.
    pub mod admin {
        /// `thinsnap.admin.v1`.
        pub mod v1 {
            tonic::include_proto!("thinsnap.admin.v1");
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::Mount;
pub use thinsnap::admin::v1 as admin;
