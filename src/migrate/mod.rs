//! Migration from Docker's removed devicemapper storage driver.

pub mod docker;
pub mod flatten;
pub mod plan;
