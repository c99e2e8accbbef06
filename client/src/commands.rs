//! The commands that talk to vfiod.

pub mod check;
pub mod moves;
pub mod show;
pub mod watch;
