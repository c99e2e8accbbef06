//! The command line of `vfioctl`, kept in a library of its own so that man
//! pages (clap_mangen) and shell completions (clap_complete) are generated
//! from the very definition the binary parses.

pub mod cli;
/// The libvirt domain XML, parsed: kept in the library so it can be fuzzed.
pub mod domain;

pub use cli::command;
