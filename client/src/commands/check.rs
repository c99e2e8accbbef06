//! `check`: the daemon's findings about the host or one target.
//!
//! On a terminal the findings are grouped by area (the part of the id
//! before the first dot: `iommu.enabled` is in the IOMMU area), in the
//! daemon's order, each marked and colored by severity, long messages
//! wrapped under themselves, with a count at the end. Piped, one finding
//! per line. `--json` gives the findings as they came. The exit status is
//! 1 when anything fails, 0 otherwise.

use serde::Serialize;

use crate::bus::Bus;
use crate::error::{Exit, Failure};
use crate::output::{Color, Output, paint, table};

/// What the message of a finding the daemon could not check starts with
/// (its severity is `ok`): shown with a `?` mark.
const UNKNOWN: &str = "unknown: ";
/// Where messages wrap when the terminal's width is not known.
const DEFAULT_WIDTH: usize = 100;

/// One finding. The severity stays a string so that a level a newer
/// daemon invents still shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub id: String,
    pub severity: String,
    pub message: String,
}

impl Finding {
    fn is_failure(&self) -> bool {
        self.severity == "fail"
    }

    fn is_unknown(&self) -> bool {
        self.severity == "ok" && self.message.starts_with(UNKNOWN)
    }

    /// `iommu` of `iommu.enabled`.
    fn area(&self) -> &str {
        self.id.split('.').next().unwrap_or(&self.id)
    }
}

pub async fn run(bus: &Bus, out: &Output, target: Option<&str>) -> Result<Exit, Failure> {
    let manager = bus.manager().await?;
    let findings: Vec<Finding> = manager
        .check(target.unwrap_or(""))
        .await
        .map_err(|e| bus.failure(e))?
        .into_iter()
        .map(|(id, severity, message)| Finding {
            id,
            severity,
            message,
        })
        .collect();
    if out.json {
        // A Vec of plain structs always serializes.
        out.print_json(&serde_json::to_value(&findings).unwrap_or_default())?;
    } else if out.stdout_tty {
        out.print(&grouped(&findings, out.color, terminal_width()))?;
    } else {
        out.print(&plain(&findings))?;
    }
    Ok(if findings.iter().any(Finding::is_failure) {
        Exit::Failed
    } else {
        Exit::Done
    })
}

/// `COLUMNS` when the shell exports it, else [`DEFAULT_WIDTH`].
fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .filter(|c: &usize| *c >= 40)
        .unwrap_or(DEFAULT_WIDTH)
}

/// For programs: one finding per line in the daemon's order,
/// `severity  id  message`, a message's own line breaks made spaces.
fn plain(findings: &[Finding]) -> String {
    let rows: Vec<Vec<String>> = findings
        .iter()
        .map(|f| {
            vec![
                f.severity.clone(),
                f.id.clone(),
                f.message.trim_end().replace('\n', " "),
            ]
        })
        .collect();
    table(&rows, "")
}

/// The heading of an area; areas of one topic share a heading (the
/// numbered topics of the doctor's issue), unknown areas show as they are.
fn area_title(area: &str) -> &str {
    match area {
        "cpu" | "kvm" | "firmware" | "iommu" => "Virtualization and IOMMU",
        "modules" => "Drivers and modules",
        "group" => "IOMMU groups",
        "boot-gpu" => "Boot GPU",
        "reset" => "Reset",
        "power" | "memory" => "Power and memory",
        "usb" => "USB",
        "libvirt" => "libvirt and firmware",
        "bind" => "Bind (dry run)",
        other => other,
    }
}

/// For a reader: sections by area in the daemon's order, each finding
/// marked by severity (`?` for what could not be checked), a count at
/// the end.
fn grouped(findings: &[Finding], color: bool, width: usize) -> String {
    let mut sections: Vec<(&str, Vec<&Finding>)> = Vec::new();
    for f in findings {
        let title = area_title(f.area());
        match sections.iter_mut().find(|(t, _)| *t == title) {
            Some((_, members)) => members.push(f),
            None => sections.push((title, vec![f])),
        }
    }
    let id_width = findings
        .iter()
        .map(|f| f.id.chars().count())
        .max()
        .unwrap_or(0);
    let mark_width = findings
        .iter()
        .map(|f| f.severity.chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    let indent = 2 + mark_width + 2 + id_width + 2;
    let mut text = String::new();
    for (title, members) in &sections {
        text.push_str(&paint(title, Color::Bold, color));
        text.push('\n');
        for f in members {
            let (mark, c) = match f.severity.as_str() {
                "fail" => ("fail", Some(Color::Red)),
                "warn" => ("warn", Some(Color::Yellow)),
                "ok" if f.is_unknown() => ("?", None),
                "ok" => ("ok", Some(Color::Green)),
                other => (other, None),
            };
            let padded = format!("{mark:<mark_width$}");
            let mark = match c {
                Some(c) => paint(&padded, c, color),
                None => padded,
            };
            let message = wrap(&f.message, width.saturating_sub(indent).max(30), indent);
            text.push_str(&format!("  {mark}  {:<id_width$}  {message}\n", f.id));
        }
        text.push('\n');
    }
    if findings.is_empty() {
        text.push_str("no findings\n");
        return text;
    }
    let count = |pred: &dyn Fn(&Finding) -> bool| findings.iter().filter(|f| pred(f)).count();
    let mut counts = vec![
        format!("{} fail", count(&|f| f.severity == "fail")),
        format!("{} warn", count(&|f| f.severity == "warn")),
        format!("{} ok", count(&|f| f.severity == "ok" && !f.is_unknown())),
    ];
    let unknown = count(&|f| f.is_unknown());
    if unknown > 0 {
        counts.push(format!("{unknown} not checked"));
    }
    let mut others: Vec<&str> = findings
        .iter()
        .map(|f| f.severity.as_str())
        .filter(|s| !["fail", "warn", "ok"].contains(s))
        .collect();
    others.sort_unstable();
    others.dedup();
    for other in others {
        counts.push(format!("{} {other}", count(&|f| f.severity == other)));
    }
    text.push_str(&counts.join(", "));
    text.push('\n');
    text
}

/// Breaks `message` into lines of at most `width` characters at spaces
/// (a longer word stays whole), continuation lines indented by `indent`.
/// The message's own line breaks are kept.
fn wrap(message: &str, width: usize, indent: usize) -> String {
    let mut lines: Vec<String> = Vec::new();
    for paragraph in message.trim_end().split('\n') {
        let mut line = String::new();
        for word in paragraph.split(' ').filter(|w| !w.is_empty()) {
            if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines.join(&format!("\n{}", " ".repeat(indent)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings() -> Vec<Finding> {
        [
            ("kvm", "ok", "/dev/kvm exists"),
            (
                "iommu.enabled",
                "fail",
                "no IOMMU groups: enable intel_iommu=on",
            ),
            (
                "group.members",
                "warn",
                "group 1 also holds 0000:00:01.0 (a bridge)\nbridges may stay",
            ),
            (
                "libvirt.hook",
                "ok",
                "unknown: whether the hook is installed",
            ),
            ("iommu.acs-override", "ok", "no pcie_acs_override"),
            ("future", "note", "something new"),
        ]
        .into_iter()
        .map(|(id, severity, message)| Finding {
            id: id.into(),
            severity: severity.into(),
            message: message.into(),
        })
        .collect()
    }

    #[test]
    fn plain_is_one_line_each_in_order() {
        let text = plain(&findings()[..2]);
        assert_eq!(
            text,
            "ok    kvm            /dev/kvm exists\nfail  iommu.enabled  no IOMMU groups: enable intel_iommu=on\n"
        );
    }

    #[test]
    fn grouped_by_area_in_the_daemons_order_with_counts() {
        let text = grouped(&findings(), false, 100);
        let virt = text.find("Virtualization and IOMMU\n").unwrap();
        let groups = text.find("IOMMU groups\n").unwrap();
        let libvirt = text.find("libvirt and firmware\n").unwrap();
        let future = text.find("\nfuture\n").unwrap();
        assert!(
            virt < groups && groups < libvirt && libvirt < future,
            "{text}"
        );
        // kvm, iommu.enabled and iommu.acs-override share the first section.
        let first = &text[virt..groups];
        assert!(
            first.contains("  ok    kvm                 /dev/kvm exists\n")
                && first.contains("  fail  iommu.enabled       no IOMMU groups")
                && first.contains("iommu.acs-override"),
            "{text}"
        );
        // What could not be checked is marked `?`, and counted apart.
        assert!(
            text.contains("  ?     libvirt.hook        unknown: whether the hook is installed\n"),
            "{text}"
        );
        // A message's own line break lines up under its first line.
        assert!(
            text.contains("(a bridge)\n                            bridges may stay\n"),
            "{text}"
        );
        assert!(
            text.ends_with("1 fail, 1 warn, 2 ok, 1 not checked, 1 note\n"),
            "{text}"
        );
        assert!(!text.contains('\x1b'));
        let colored = grouped(&findings(), true, 100);
        assert!(colored.contains("\x1b[1;31mfail\x1b[0m"), "{colored}");
        assert!(colored.contains("\x1b[1mIOMMU groups\x1b[0m"), "{colored}");
        assert_eq!(grouped(&[], false, 100), "no findings\n");
    }

    #[test]
    fn long_messages_wrap_under_themselves() {
        let long = Finding {
            id: "boot-gpu.boot-vga".into(),
            severity: "fail".into(),
            message: "word ".repeat(40).trim_end().to_owned(),
        };
        let text = grouped(&[long], false, 60);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Boot GPU");
        assert!(
            lines[1].starts_with("  fail  boot-gpu.boot-vga  word word"),
            "{text}"
        );
        let indent = " ".repeat(2 + 4 + 2 + "boot-gpu.boot-vga".len() + 2);
        for line in &lines[1..lines.len() - 2] {
            assert!(line.chars().count() <= 60, "{line:?} in\n{text}");
        }
        assert!(lines[2].starts_with(&format!("{indent}word")), "{text}");
        assert_eq!(wrap("a bb ccc", 4, 2), "a bb\n  ccc");
        assert_eq!(wrap("unbreakable-word x", 5, 0), "unbreakable-word\nx");
    }

    #[test]
    fn json_is_an_array_of_objects() {
        let doc = serde_json::to_value(findings()).unwrap();
        assert_eq!(
            doc[1],
            serde_json::json!({"id": "iommu.enabled", "severity": "fail", "message": "no IOMMU groups: enable intel_iommu=on"})
        );
        assert!(findings().iter().any(Finding::is_failure));
    }
}
