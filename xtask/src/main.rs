//! `cargo run -p xtask -- dist OUTDIR`: writes what `make install` ships
//! beside the binaries and that is generated from the code itself, so it
//! cannot drift from what the binaries parse:
//!
//! - `OUTDIR/man/vfiod.8`, `OUTDIR/man/vfioctl.1` and one
//!   `vfioctl-COMMAND.1` per command (clap_mangen);
//! - `OUTDIR/completions/vfioctl.bash`, `_vfioctl` (zsh) and
//!   `vfioctl.fish` (clap_complete).
//!
//! vfiod.toml(5) is written by hand (`man/vfiod.toml.5`); a test keeps it
//! in step with the config parser.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::Shell;

const USAGE: &str = "usage: xtask dist OUTDIR";

/// Appended to vfiod.8 after clap's sections.
const VFIOD_EXTRA: &str = r#".SH SIGNALS
.TP
\fBSIGHUP\fR
Reload the configuration file. A file that is refused is reported in the
log and the last good configuration is kept. Either way the verdict is
written to \fIreload.json\fR in the state directory, where
\fBvfiod \-\-reload\fR waits for it, and told to systemd
(\fBRELOADING=1\fR with \fBMONOTONIC_USEC=\fR, then \fBREADY=1\fR with the
outcome in \fBSTATUS=\fR, which \fBsystemctl status vfiod\fR shows).
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop. Devices stay where they are; what vfiod must remember to give them
back is kept in the state directory.
.SH RELOADING
\fBsystemctl reload vfiod\fR runs \fBvfiod \-\-reload \fR\fIPID\fR (the
unit's \fBExecReload=\fR): it sends the running vfiod \fBSIGHUP\fR and
waits, up to 60 seconds, for that vfiod's verdict. When the new
configuration is refused it prints the file, the line and the reason and
exits 1, so the reload fails where it was typed; \fBsystemctl status vfiod\fR
and \fBjournalctl \-u vfiod\fR show the reason. Run as root, \fBvfiod \-\-reload
$(systemctl show \-P MainPID vfiod)\fR prints it on the terminal.
\fBkill \-HUP\fR still reloads, but nobody waits for its verdict.
.SH ENVIRONMENT
.TP
\fBDBUS_SYSTEM_BUS_ADDRESS\fR
The system bus to serve on, instead of the default one.
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd (\fBNotifyAccess=main\fR): where reloads are announced.
.TP
\fBVFIOD_LOG\fR
The log filter (\fBerror\fR, \fBwarn\fR, \fBinfo\fR, \fBdebug\fR, \fBtrace\fR);
\fBinfo\fR by default.
.SH FILES
.TP
\fI/etc/vfiod/vfiod.toml\fR
The configuration: profiles of devices that move together, and the VMs that
use them. See \fBvfiod.toml\fR(5).
.TP
\fI/run/vfiod\fR
The state directory: the journal of moves and the host driver of every
device on vfio\-pci, kept across restarts of vfiod until the next boot.
.TP
\fI/usr/lib/systemd/system/vfiod.service\fR
The systemd unit; D\-Bus activation (\fIorg.vfiod1.service\fR) starts it on
the first call.
.TP
\fI/usr/lib/modules\-load.d/vfio\-pci.conf\fR
Loads vfio\-pci at boot: the unit's sandbox cannot load kernel modules.
.SH SEE ALSO
\fBvfioctl\fR(1), \fBvfiod.toml\fR(5), \fBsystemd.exec\fR(5), \fBbusctl\fR(1)
"#;

/// Appended to vfioctl.1 after clap's sections.
const VFIOCTL_EXTRA: &str = r#".SH EXIT STATUS
.TP
\fB0\fR
Done.
.TP
\fB1\fR
Refused or failed; the reason is on standard error.
.TP
\fB2\fR
Usage error, or an invalid domain XML for \fBlibvirt\-hook\fR.
.TP
\fB3\fR
vfiod unreachable (no system bus, or org.vfiod1 not on it).
.TP
\fB4\fR
Access denied (polkit action \fIorg.vfiod1.manage\fR).
.SH ENVIRONMENT
.TP
\fBDBUS_SYSTEM_BUS_ADDRESS\fR
The system bus to use, instead of the default one.
.SH FILES
.TP
\fI/etc/libvirt/hooks/qemu.d/vfiod\fR
The libvirt hook that runs \fBvfioctl libvirt\-hook\fR.
.TP
\fI/etc/vfiod/vfiod.toml\fR
Profiles, read by \fBlibvirt\-hook\fR to know which profiles a domain uses.
.SH SEE ALSO
\fBvfiod\fR(8), \fBvfiod.toml\fR(5)
"#;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [task, out] if task == "dist" => match dist(Path::new(out)) {
            Ok(files) => {
                for file in files {
                    println!("{}", file.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("xtask dist: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Writes every generated file under `out`; returns their paths.
fn dist(out: &Path) -> io::Result<Vec<PathBuf>> {
    let man = out.join("man");
    let completions = out.join("completions");
    fs::create_dir_all(&man)?;
    fs::create_dir_all(&completions)?;
    let mut written = Vec::new();

    let vfiod = vfiod::cli::command();
    written.push(man_page(&man, vfiod, "8", VFIOD_EXTRA)?);

    let mut vfioctl = vfioctl::command();
    // Sets every subcommand's bin name ("vfioctl bind") for the synopses.
    vfioctl.build();
    written.push(man_page(&man, vfioctl.clone(), "1", VFIOCTL_EXTRA)?);
    for sub in vfioctl.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let name = format!("vfioctl-{}", sub.get_name());
        let see_also = ".SH SEE ALSO\n\\fBvfioctl\\fR(1)\n";
        written.push(man_page(
            &man,
            sub.clone().display_name(name),
            "1",
            see_also,
        )?);
    }

    for (shell, file) in [
        (Shell::Bash, "vfioctl.bash"),
        (Shell::Zsh, "_vfioctl"),
        (Shell::Fish, "vfioctl.fish"),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut vfioctl.clone(), "vfioctl", &mut text);
        let path = completions.join(file);
        fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

/// `NAME.SECTION` in `dir`: clap's page, then `extra` (roff sections).
fn man_page(dir: &Path, command: clap::Command, section: &str, extra: &str) -> io::Result<PathBuf> {
    let name = command
        .get_display_name()
        .unwrap_or(command.get_name())
        .to_owned();
    let mut page = Vec::new();
    clap_mangen::Man::new(command)
        .section(section)
        .manual(if section == "8" {
            "System Administration"
        } else {
            "User Commands"
        })
        .source(concat!("vfiod ", env!("CARGO_PKG_VERSION")))
        .render(&mut page)?;
    page.extend_from_slice(extra.as_bytes());
    let path = dir.join(format!("{name}.{section}"));
    fs::write(&path, page)?;
    Ok(path)
}
