//! thinsnap: a block-level thin-provisioning snapshotter for containerd on device-mapper
//! thin pools.
//!
//! The binary (`src/main.rs`) only parses and dispatches; this library holds the policy:
//! configuration ([`config`]), the crash-safe metadata store ([`store`]), containerd's
//! snapshot semantics ([`snapshotter`]), the gRPC service ([`service`]) and its [`metrics`],
//! the pool watcher that grows it ([`autogrow`]), the CLI ([`cli`]), the migration from
//! Docker's devicemapper driver ([`migrate`]) and benchmarks ([`bench`]). The mechanism (pools, thin devices, filesystems) is the
//! `thinpool` crate.

pub mod autogrow;
pub mod bench;
pub mod cli;
pub mod daemon;
pub mod image;
pub mod metrics;
pub mod migrate;
pub mod service;

#[cfg(test)]
mod coverage;
