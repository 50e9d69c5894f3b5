//! thinsnap-core: thinsnap's engine over one device-mapper thin pool.
//!
//! It owns the policy that turns thin devices into containerd snapshots, base devices and
//! Docker volumes: the crash-safe metadata [`store`], the [`engine`] (one device lifecycle:
//! intent record, kernel change, result record; startup reconciliation), snapshot
//! [`labels`], the typed [`config`]uration and the state directory's lock ([`state`]).
//! The mechanism (pools, thin devices, filesystems) is the `thinpool` crate; the gRPC
//! service, the Docker volume plugin, the CLI, image import/export and migration live in
//! the `thinsnap` binary, which is the only place errors become protocol codes. Nothing
//! here knows tonic, hyper or clap.

pub mod config;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod labels;
pub mod pool_admin;
pub mod process;
pub mod state;
pub mod store;
pub mod time;

pub use config::Config;
pub use engine::Engine;
pub use error::{Error, ErrorKind, Result};
