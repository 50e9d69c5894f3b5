//! Migration from Docker's removed devicemapper storage driver.

pub mod docker;
pub mod plan;
