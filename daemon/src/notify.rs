//! systemd's notify protocol (sd_notify(3)): one datagram of `NAME=value`
//! lines to the socket `NOTIFY_SOCKET` names (a path, or `@name` in the
//! abstract namespace). The unit says `NotifyAccess=main`: systemd 252 takes
//! `STATUS=` (shown by `systemctl status`), and `RELOADING=1` / `READY=1`
//! around a `kill -HUP` by hand; systemd 253 and newer read them as
//! `Type=notify-reload` does. Outside systemd there is no socket and
//! nothing is sent.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd names its socket in.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `NAME=value` assignments) to systemd.
/// `Ok(false)` when vfiod is not run by systemd (no `NOTIFY_SOCKET`).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let socket = socket
        .to_str()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "NOTIFY_SOCKET is not UTF-8"))?;
    let address = match socket.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(socket)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &address)?;
    Ok(true)
}

/// `RELOADING=1` as systemd 253 wants it: with the monotonic time the
/// reload began (`MONOTONIC_USEC=`), and what is going on.
pub fn reloading(began_usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={began_usec}\nSTATUS=reloading the configuration")
}

/// `READY=1` after a reload, with its outcome as the unit's status line.
pub fn ready(status: &str) -> String {
    // A newline would end the assignment: the status is one line.
    format!("READY=1\nSTATUS={}", status.replace('\n', " "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reload_messages_are_what_systemd_reads() {
        assert_eq!(
            reloading(12),
            "RELOADING=1\nMONOTONIC_USEC=12\nSTATUS=reloading the configuration"
        );
        assert_eq!(
            ready("refused: f.toml: line 3\n  colour = 1"),
            "READY=1\nSTATUS=refused: f.toml: line 3   colour = 1"
        );
    }
}
