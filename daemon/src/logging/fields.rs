//! How a log line shows its fields: `message name=value name="a value"`.
//! One rendering for the text log (as the fmt layer's field formatter) and
//! for the journal's MESSAGE, so both read alike.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// A value as a line shows it: bare when it is one word, quoted (with
/// Rust's escapes, so a newline stays on the line) when it has a space, a
/// quote, an `=`, a control character or nothing: `step="unbind amdgpu"`.
pub fn push_value(out: &mut String, value: &str) {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=');
    if plain {
        out.push_str(value);
    } else {
        let _ = write!(out, "{value:?}");
    }
}

/// A field's value as text: `str` values as they are, `?`/`%` values (and
/// numbers) through Debug, which for `%` is their Display; an error is its
/// Display, as the fmt layer shows it.
pub enum Rendered {
    Text(String),
    /// Already Debug-formatted: a Debug string (`"x"`) is kept as it is.
    Debug(String),
}

impl Rendered {
    pub fn as_str(&self) -> &str {
        match self {
            Rendered::Text(s) | Rendered::Debug(s) => s,
        }
    }

    fn push_to(&self, out: &mut String) {
        match self {
            Rendered::Debug(s) if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') => {
                out.push_str(s)
            }
            other => push_value(out, other.as_str()),
        }
    }
}

/// The fields of one event or span, in the order they were recorded; the
/// `message` field apart.
#[derive(Default)]
pub struct FieldLine {
    pub message: Option<String>,
    /// `(name, name=value)`.
    pub fields: Vec<(&'static str, String)>,
}

impl FieldLine {
    /// Records one field (the visitors of this module and the journal's
    /// call this for each value).
    pub fn record(&mut self, field: &Field, value: &Rendered) {
        if field.name() == "message" {
            self.message = Some(value.as_str().to_owned());
            return;
        }
        let mut text = format!("{}=", field.name());
        value.push_to(&mut text);
        self.fields.push((field.name(), text));
    }

    /// `message name=value ...`, then `extra` (a span's fields) left out
    /// where the same `name=value` is already shown.
    pub fn line<'a>(&'a self, extra: impl IntoIterator<Item = &'a str>) -> String {
        let mut out = self.message.clone().unwrap_or_default();
        let shown: Vec<&str> = self.fields.iter().map(|(_, t)| t.as_str()).collect();
        let extra = extra.into_iter().filter(|t| !shown.contains(t));
        for text in shown.iter().copied().chain(extra) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(text);
        }
        out
    }
}

/// The rendering of each kind of value `tracing` records.
pub fn render_debug(value: &dyn fmt::Debug) -> Rendered {
    Rendered::Debug(format!("{value:?}"))
}

pub fn render_error(value: &(dyn std::error::Error + 'static)) -> Rendered {
    Rendered::Text(value.to_string())
}

impl Visit for FieldLine {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, &Rendered::Text(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record(field, &render_error(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, &render_debug(value));
    }
}

/// The text log's field formatter (`fmt::layer().fmt_fields(TextFields)`):
/// an event's `message name=value ...`, a span's `name=value ...`.
pub struct TextFields;

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut line = FieldLine::default();
        fields.record(&mut line);
        writer.write_str(&line.line([]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(value: &str) -> String {
        let mut out = String::new();
        push_value(&mut out, value);
        out
    }

    #[test]
    fn a_value_is_quoted_only_when_it_is_not_one_word() {
        assert_eq!(shown("0000:01:00.0"), "0000:01:00.0");
        assert_eq!(shown("rx580"), "rx580");
        assert_eq!(shown("unbind amdgpu"), "\"unbind amdgpu\"");
        assert_eq!(shown(""), "\"\"");
        assert_eq!(shown("a=b"), "\"a=b\"");
        assert_eq!(shown("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(shown("two\nlines"), "\"two\\nlines\"");
    }

    #[test]
    fn a_span_field_the_event_already_shows_is_shown_once() {
        let mut line = FieldLine {
            message: Some("move done".into()),
            fields: vec![("target", "target=gpu".into())],
        };
        assert_eq!(
            line.line(["target=gpu", "direction=bind"]),
            "move done target=gpu direction=bind"
        );
        line.message = None;
        assert_eq!(line.line(["target=usb"]), "target=gpu target=usb");
    }
}
