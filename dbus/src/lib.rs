//! The `org.vfiod1` API (DESIGN §4), shared by the daemon and its clients so
//! that names, errors and value types cannot drift apart.

mod error;
pub mod names;
pub mod objects;
pub mod proxy;
mod types;

pub use error::Error;
pub use types::{DeviceHealth, DeviceState, Direction, Finding, ProfileState, Severity};
