//! vfiod: the kernel access, the transition engine and the D-Bus service.

pub mod config;
pub mod engine;
pub mod kernel;
pub mod plan;
