//! `check`: the daemon's findings about the host or one target.

use serde::Serialize;

use crate::bus::Bus;
use crate::error::{Exit, Failure};
use crate::output::{Color, Output, paint, table};

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
        out.print(&grouped(&findings, out.color))?;
    } else {
        out.print(&plain(&findings))?;
    }
    Ok(if findings.iter().any(Finding::is_failure) {
        Exit::Failed
    } else {
        Exit::Done
    })
}

/// Continuation lines of a message line up under its first line.
fn indent_message(message: &str, width: usize) -> String {
    message
        .trim_end()
        .replace('\n', &format!("\n{}", " ".repeat(width)))
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

/// For a reader: failures first, then warnings, then what passed, with a
/// count at the end.
fn grouped(findings: &[Finding], color: bool) -> String {
    let sections = [
        ("fail", "Failed", Color::Red),
        ("warn", "Warnings", Color::Yellow),
        ("ok", "Passed", Color::Green),
    ];
    let known: Vec<&str> = sections.iter().map(|(s, ..)| *s).collect();
    let mut others: Vec<&str> = findings
        .iter()
        .map(|f| f.severity.as_str())
        .filter(|s| !known.contains(s))
        .collect();
    others.sort_unstable();
    others.dedup();

    let id_width = findings
        .iter()
        .map(|f| f.id.chars().count())
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    let mut counts = Vec::new();
    let all = sections
        .iter()
        .map(|(s, title, c)| (*s, (*title).to_owned(), Some(*c)))
        .chain(others.iter().map(|s| (*s, (*s).to_owned(), None)));
    for (severity, title, c) in all {
        let members: Vec<&Finding> = findings.iter().filter(|f| f.severity == severity).collect();
        if members.is_empty() {
            continue;
        }
        counts.push(format!("{} {severity}", members.len()));
        let heading = format!("{title} ({}):", members.len());
        text.push_str(&paint(&heading, Color::Bold, color));
        text.push('\n');
        for f in members {
            let mark = match c {
                Some(c) => paint(&format!("{severity:<4}"), c, color),
                None => format!("{severity:<4}"),
            };
            let message = indent_message(&f.message, 2 + 4 + 2 + id_width + 2);
            text.push_str(&format!("  {mark}  {:<id_width$}  {message}\n", f.id));
        }
        text.push('\n');
    }
    if findings.is_empty() {
        text.push_str("no findings\n");
    } else {
        text.push_str(&counts.join(", "));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings() -> Vec<Finding> {
        [
            ("kvm", "ok", "/dev/kvm is there"),
            ("iommu", "fail", "no IOMMU groups: enable intel_iommu=on"),
            (
                "group.1",
                "warn",
                "group 1 also holds 0000:00:01.0 (a bridge)\nbridges may stay",
            ),
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
            "ok    kvm    /dev/kvm is there\nfail  iommu  no IOMMU groups: enable intel_iommu=on\n"
        );
    }

    #[test]
    fn grouped_puts_failures_first_and_counts() {
        let text = grouped(&findings(), false);
        let fail = text.find("Failed (1):").unwrap();
        let warn = text.find("Warnings (1):").unwrap();
        let ok = text.find("Passed (1):").unwrap();
        let note = text.find("note (1):").unwrap();
        assert!(fail < warn && warn < ok && ok < note, "{text}");
        assert!(text.contains("  fail  iommu    no IOMMU groups"), "{text}");
        assert!(
            text.contains("\n                 bridges may stay\n"),
            "{text}"
        );
        assert!(text.ends_with("1 fail, 1 warn, 1 ok, 1 note\n"), "{text}");
        assert!(!text.contains('\x1b'));
        assert!(grouped(&findings(), true).contains("\x1b[1;31mfail\x1b[0m"));
        assert_eq!(grouped(&[], false), "no findings\n");
    }

    #[test]
    fn json_is_an_array_of_objects() {
        let doc = serde_json::to_value(findings()).unwrap();
        assert_eq!(
            doc[1],
            serde_json::json!({"id": "iommu", "severity": "fail", "message": "no IOMMU groups: enable intel_iommu=on"})
        );
        assert!(findings().iter().any(Finding::is_failure));
    }
}
