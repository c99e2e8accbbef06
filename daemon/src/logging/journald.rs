//! vfiod's journald layer: each event is one entry of journald's native
//! protocol (<https://systemd.io/JOURNAL_NATIVE_PROTOCOL/>), a datagram of
//! `NAME=value` lines to `/run/systemd/journal/socket`. Its MESSAGE is the
//! line as the text log shows it, the event's fields and then its spans'
//! (`step device=0000:01:00.0 step="unbind amdgpu" target=rx580
//! direction=bind`), so `journalctl -u vfiod` alone says which device and
//! what step; each field is also its own `VFIOD_<NAME>` field, for
//! `journalctl VFIOD_DEVICE=0000:01:00.0`.

use std::io;
use std::path::Path;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use super::JOURNAL_FIELD_PREFIX;
use super::fields::{FieldLine, Rendered, render_debug, render_error};
use socket::JournalSocket;

mod socket;

/// Where journald reads native entries.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// journald refuses a field name longer than this.
const MAX_NAME_LEN: usize = 64;

/// Appends one field: `NAME=value\n`, or, for a value with a newline,
/// journald's binary-safe form `NAME\n<u64 LE length>value\n`.
pub fn put_field(entry: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    entry.extend_from_slice(name);
    if value.contains(&b'\n') {
        entry.push(b'\n');
        entry.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        entry.push(b'=');
    }
    entry.extend_from_slice(value);
    entry.push(b'\n');
}

/// `VFIOD_` and a tracing field's name as journald accepts a name (`A-Z`,
/// `0-9`, `_`, at most 64 bytes): a dot is `_` (`error.sources`), other
/// characters and leading underscores are left out, letters upper case.
pub fn field_name(name: &str) -> Vec<u8> {
    let mut out = format!("{JOURNAL_FIELD_PREFIX}_").into_bytes();
    out.extend(
        name.bytes()
            .map(|c| if c == b'.' { b'_' } else { c })
            .skip_while(|&c| c == b'_')
            .filter(|&c| c == b'_' || c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_uppercase()),
    );
    out.truncate(MAX_NAME_LEN);
    out
}

/// journald's priorities (syslog's): INFO is notice, as tracing-journald
/// had it, so an admin's `journalctl -p notice` keeps vfiod's moves.
fn priority(level: &Level) -> &'static [u8] {
    match *level {
        Level::ERROR => b"3",
        Level::WARN => b"4",
        Level::INFO => b"5",
        Level::DEBUG => b"6",
        Level::TRACE => b"7",
    }
}

/// Where a span or event was written: `TARGET` (the module), `CODE_FILE`,
/// `CODE_LINE`, with `prefix` (`SPAN_`) for a span's.
fn put_origin(entry: &mut Vec<u8>, meta: &Metadata<'_>, prefix: &str) {
    put_field(
        entry,
        format!("{prefix}TARGET").as_bytes(),
        meta.target().as_bytes(),
    );
    if let Some(file) = meta.file() {
        put_field(
            entry,
            format!("{prefix}CODE_FILE").as_bytes(),
            file.as_bytes(),
        );
    }
    if let Some(line) = meta.line() {
        put_field(
            entry,
            format!("{prefix}CODE_LINE").as_bytes(),
            line.to_string().as_bytes(),
        );
    }
}

/// Each field of an event or span into both the entry's `VFIOD_<NAME>`
/// fields and the text of its MESSAGE.
struct EntryFields<'a> {
    entry: &'a mut Vec<u8>,
    line: &'a mut FieldLine,
}

impl EntryFields<'_> {
    fn record(&mut self, field: &Field, value: Rendered) {
        if field.name() != "message" {
            put_field(
                self.entry,
                &field_name(field.name()),
                value.as_str().as_bytes(),
            );
        }
        self.line.record(field, &value);
    }
}

impl Visit for EntryFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, Rendered::Text(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record(field, render_error(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record(field, render_debug(value));
    }
}

/// A span's part of every entry inside it: its journal fields, encoded
/// once, and its fields as text.
struct SpanFields {
    entry: Vec<u8>,
    line: FieldLine,
}

/// The layer: entries made here, sent by [`JournalSocket`].
pub struct JournaldLayer {
    socket: JournalSocket,
}

impl JournaldLayer {
    /// The layer on journald's socket; an error when nothing listens there.
    pub fn new() -> io::Result<Self> {
        Self::at(Path::new(JOURNAL_SOCKET))
    }

    pub fn at(path: &Path) -> io::Result<Self> {
        Ok(JournaldLayer {
            socket: JournalSocket::open(path)?,
        })
    }
}

/// The entry that says how many were dropped.
fn dropped_report(dropped: u64) -> Vec<u8> {
    let mut entry = Vec::with_capacity(256);
    put_field(&mut entry, b"PRIORITY", priority(&Level::WARN));
    put_field(&mut entry, b"SYSLOG_IDENTIFIER", b"vfiod");
    put_field(&mut entry, b"TARGET", module_path!().as_bytes());
    put_field(
        &mut entry,
        &field_name("dropped"),
        dropped.to_string().as_bytes(),
    );
    let message =
        format!("log entries dropped: journald did not take them in time dropped={dropped}");
    put_field(&mut entry, b"MESSAGE", message.as_bytes());
    entry
}

impl<S> Layer<S> for JournaldLayer
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = SpanFields {
            entry: Vec::with_capacity(256),
            line: FieldLine::default(),
        };
        put_field(&mut fields.entry, b"SPAN_NAME", span.name().as_bytes());
        put_origin(&mut fields.entry, span.metadata(), "SPAN_");
        attrs.record(&mut EntryFields {
            entry: &mut fields.entry,
            line: &mut fields.line,
        });
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            values.record(&mut EntryFields {
                entry: &mut fields.entry,
                line: &mut fields.line,
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut entry = Vec::with_capacity(512);
        // The spans', outermost first, as the text log shows them.
        let mut span_fields = Vec::new();
        for span in ctx
            .event_scope(event)
            .into_iter()
            .flat_map(|s| s.from_root())
        {
            if let Some(fields) = span.extensions().get::<SpanFields>() {
                entry.extend_from_slice(&fields.entry);
                span_fields.extend(fields.line.fields.iter().map(|(_, text)| text.clone()));
            }
        }
        let meta = event.metadata();
        put_field(&mut entry, b"PRIORITY", priority(meta.level()));
        put_origin(&mut entry, meta, "");
        put_field(&mut entry, b"SYSLOG_IDENTIFIER", b"vfiod");
        let mut line = FieldLine::default();
        event.record(&mut EntryFields {
            entry: &mut entry,
            line: &mut line,
        });
        let message = line.line(span_fields.iter().map(String::as_str));
        put_field(&mut entry, b"MESSAGE", message.as_bytes());
        self.socket.send(entry);
    }
}

#[cfg(test)]
mod tests;
