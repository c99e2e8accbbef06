//! vfiod: the kernel access, the transition engine and the D-Bus service.

pub mod boot;
pub mod bouncer;
pub mod cli;
pub mod doctor;
pub mod early_claim;
pub mod engine;
pub mod journal;
pub mod kernel;
pub mod ledger;
pub mod notify;
pub mod plan;
pub mod reload;
pub mod service;
pub mod state_dir;
pub mod state_file;
pub mod units;
pub mod workers;
