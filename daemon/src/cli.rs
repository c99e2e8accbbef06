//! vfiod's command line (DESIGN §5). Kept in the library so man pages can
//! be generated from the same definition.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "vfiod",
    version,
    about = "Moves PCI devices between their host drivers and vfio-pci for VMs, safely, over D-Bus",
    long_about = "vfiod serves org.vfiod1 on the system bus (DBUS_SYSTEM_BUS_ADDRESS is honoured). \
It moves GPUs, their audio functions and USB controllers between their host drivers and vfio-pci \
on request, refusing moves that would take what the host needs, and verifying every step."
)]
pub struct Args {
    /// Configuration file (absent file = no profiles).
    #[arg(long, value_name = "FILE", default_value = vfiod_config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Run on the simulated kernel described by this machine file, as a normal user.
    #[arg(long, value_name = "FILE")]
    pub machine: Option<PathBuf>,
    /// Where vfiod keeps what it must remember across restarts: a directory
    /// of vfiod's user, not a symbolic link, made 0700
    /// [default: /run/vfiod as root, $XDG_RUNTIME_DIR/vfiod otherwise; none
    /// without XDG_RUNTIME_DIR].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Do not serve: ask the running vfiod of process PID to reload its
    /// configuration (SIGHUP) and wait for its verdict, read from its state
    /// dir (the same --state-dir). Exits 0 when the new configuration is in
    /// force, 1 with the reason (file, line, why) when vfiod refused it and
    /// kept the old one, or when it gave no verdict within 60 s. The unit's
    /// ExecReload=, so `systemctl reload vfiod` fails when the reload does.
    #[arg(long, value_name = "PID", conflicts_with = "machine")]
    pub reload: Option<u32>,
}

pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

/// The state dir when none is given (see [`crate::state_dir::default_state_dir`]).
pub fn default_state_dir() -> Result<PathBuf, crate::state_dir::StateDirError> {
    crate::state_dir::default_state_dir(
        nix::unistd::geteuid().is_root(),
        std::env::var_os("XDG_RUNTIME_DIR"),
    )
}
