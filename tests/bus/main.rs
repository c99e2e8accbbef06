//! vfiod on a private bus: the real `vfiod --machine` and `vfioctl`
//! binaries, with busctl and gdbus as outside clients (DESIGN §4, §5).

mod access;
mod boot;
mod denied;
mod kernel_changes;
mod outside_clients;
mod reload;
mod resets;
mod vfioctl;
