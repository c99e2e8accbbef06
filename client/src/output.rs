//! Where and how results are shown: text or JSON on stdout, reasons and
//! progress on stderr, color only for a terminal that wants it.

use std::io::{self, IsTerminal, Write};

use serde_json::{Value, json};

use crate::error::Failure;
use crate::model::{DeviceView, Objects, ProfileView};

/// What the streams are and what the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    pub json: bool,
    /// stdout is a terminal: group and align for a reader.
    pub stdout_tty: bool,
    /// Color on stdout (a terminal, and NO_COLOR unset or empty).
    pub color: bool,
    /// stderr is a terminal: live progress goes there.
    pub stderr_tty: bool,
}

impl Output {
    pub fn detect(json: bool) -> Output {
        let stdout_tty = io::stdout().is_terminal();
        // https://no-color.org: any non-empty value turns color off.
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Output {
            json,
            stdout_tty,
            color: stdout_tty && !no_color && !json,
            stderr_tty: io::stderr().is_terminal(),
        }
    }

    /// Writes text to stdout. A reader that went away (`| head`) is not
    /// an error: what was to be done is done.
    pub fn print(&self, text: &str) -> Result<(), Failure> {
        match self.write_stdout(text) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(Failure::local(
                "Output",
                format!("cannot write to stdout: {e}"),
            )),
            _ => Ok(()),
        }
    }

    /// Writes and flushes at once, so that a line reaches a pipe when it
    /// happens (watch).
    pub fn write_stdout(&self, text: &str) -> io::Result<()> {
        let mut stdout = io::stdout().lock();
        stdout.write_all(text.as_bytes())?;
        stdout.flush()
    }

    /// One JSON document: indented for a terminal, one line for a program.
    pub fn print_json(&self, value: &Value) -> Result<(), Failure> {
        let text = if self.stdout_tty {
            serde_json::to_string_pretty(value)
        } else {
            serde_json::to_string(value)
        };
        // Serializing a Value cannot fail: its keys are strings.
        self.print(&format!("{}\n", text.unwrap_or_default()))
    }

    /// A line on stderr: progress, warnings, reasons.
    pub fn note(&self, line: &str) {
        // Nothing better to do when stderr itself is gone.
        let _ = writeln!(io::stderr().lock(), "{line}");
    }

    pub fn warn(&self, message: &str) {
        self.note(&format!("vfioctl: warning: {message}"));
    }

    /// Reports a failure: the reason on stderr, and with --json also
    /// `{"error": {...}}` on stdout.
    pub fn fail(&self, failure: &Failure) {
        self.note(&format!("vfioctl: {failure}"));
        if self.json {
            self.error_json(failure);
        }
    }

    /// `{"error": {"name": ..., "message": ...}}` on stdout.
    pub fn error_json(&self, failure: &Failure) {
        // The exit status already says it failed; a closed stdout adds nothing.
        let _ = self.print_json(&json!({ "error": failure.to_json() }));
    }
}

/// ANSI colors for check results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    Red,
    Yellow,
    Green,
    Bold,
}

pub fn paint(text: &str, color: Color, enabled: bool) -> String {
    if !enabled {
        return text.to_owned();
    }
    let code = match color {
        Color::Red => "1;31",
        Color::Yellow => "1;33",
        Color::Green => "32",
        Color::Bold => "1",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// `-` for an empty field, so that columns stay columns.
pub fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn or_null(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::from(s)
    }
}

/// Rows as columns separated by two spaces; the last column is not padded.
pub fn table(rows: &[Vec<String>], indent: &str) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(indent);
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Stable keys; absent strings are null, hex ids are strings as lspci shows them.
pub fn device_json(device: &DeviceView, objects: Option<&Objects>) -> Value {
    let profile = objects
        .and_then(|o| o.profile_of(device))
        .map(|p| p.name.as_str());
    json!({
        "address": device.address,
        "vendor_id": format!("{:04x}", device.vendor_id),
        "device_id": format!("{:04x}", device.device_id),
        "class": format!("0x{:06x}", device.class),
        "name": device.name,
        "driver": or_null(&device.driver),
        "host_driver": or_null(&device.host_driver),
        "iommu_group": (device.iommu_group >= 0).then_some(device.iommu_group),
        "state": device.state,
        "owner": or_null(&device.owner),
        "boot_vga": device.boot_vga,
        "reset_method": or_null(&device.reset_method),
        "health": device.health,
        "profile": profile,
    })
}

/// A profile with its devices as addresses.
pub fn profile_json(profile: &ProfileView) -> Value {
    json!({
        "name": profile.name,
        "state": profile.state,
        "owner": or_null(&profile.owner),
        "last_error": or_null(&profile.last_error),
        "devices": profile_addresses(profile),
    })
}

/// The addresses of a profile's devices.
pub fn profile_addresses(profile: &ProfileView) -> Vec<String> {
    profile.devices.iter().map(ToString::to_string).collect()
}

pub fn device_row(d: &DeviceView) -> Vec<String> {
    vec![
        d.address.clone(),
        or_dash(&d.driver).to_owned(),
        d.state_shown(),
        or_dash(&d.owner).to_owned(),
        d.name.clone(),
    ]
}

pub fn profile_row(p: &ProfileView) -> Vec<String> {
    vec![
        p.name.clone(),
        p.state.to_string(),
        or_dash(&p.owner).to_owned(),
        profile_addresses(p).join(" "),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::sample;

    #[test]
    fn tables_align_and_do_not_pad_the_last_column() {
        let rows = vec![
            vec!["a".to_owned(), "bbb".to_owned(), "c".to_owned()],
            vec!["aaaa".to_owned(), "b".to_owned(), "".to_owned()],
        ];
        assert_eq!(table(&rows, "  "), "  a     bbb  c\n  aaaa  b\n");
    }

    #[test]
    fn device_json_has_stable_keys_and_nulls() {
        let o = sample();
        let gpu = device_json(&o.devices[0], Some(&o));
        assert_eq!(
            gpu,
            json!({
                "address": "0000:01:00.0", "vendor_id": "1002", "device_id": "67df",
                "class": "0x030000", "name": "Ellesmere", "driver": "vfio-pci",
                "host_driver": "amdgpu", "iommu_group": 1, "state": "vfio", "owner": "win10",
                "boot_vga": false, "reset_method": "bus", "health": "ok", "profile": "rx580",
            })
        );
        let usb = device_json(&o.devices[2], Some(&o));
        assert_eq!(usb["iommu_group"], Value::Null);
        assert_eq!(usb["owner"], Value::Null);
        assert_eq!(usb["profile"], Value::Null);
        let rx = profile_json(&o.profiles[0]);
        assert_eq!(rx["devices"], json!(["0000:01:00.0", "0000:01:00.1"]));
        assert_eq!(rx["last_error"], Value::Null);
    }

    #[test]
    fn color_only_when_enabled() {
        assert_eq!(paint("fail", Color::Red, false), "fail");
        assert_eq!(paint("fail", Color::Red, true), "\x1b[1;31mfail\x1b[0m");
    }
}
