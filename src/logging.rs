//! Log output: one line per event, `key=value` with a leading tag.
//!
//! Everything goes to stdout (journald), always as `key=value`. Events on
//! the [`ACCESS`] target — `REQUEST`, `RATE_LIMIT`, `UPSTREAM_ERROR` — also
//! go to the optional `access_log` file, in the format
//! `access_log_format` picks: `key=value` for fail2ban, or one JSON object
//! per line for Loki and similar pipelines. Both writers are non-blocking and
//! batch their writes ([`batch`]): a slow terminal or a full disk drops
//! lines instead of stalling requests.
//! Values are quoted and escaped here, in one place, so a client cannot forge
//! a line break or a second `client_ip=` (or JSON key) through a path or a
//! header.

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

mod batch;
mod request_line;
mod timestamp;

pub use request_line::RequestLine;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt as tfmt};

use crate::config::AccessLogFormat;

/// The tracing target of access lines, which the access log file receives.
pub const ACCESS: &str = "access";

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("cannot open access log {}: {source}", path.display())]
    AccessLog { path: PathBuf, source: io::Error },
    #[error("invalid log level {filter:?}: {reason}")]
    Filter { filter: String, reason: String },
    #[error("a global logger is already installed")]
    AlreadyInstalled,
    #[error("cannot start a log writer thread: {0}")]
    Thread(io::Error),
}

/// Keeps the log writers alive and lets the access log be reopened.
pub struct LogHandle {
    access_log: Option<ReopenableFile>,
    _guards: Vec<batch::BatchGuard>,
}

impl LogHandle {
    /// Opens the access log path anew, so a file moved away by logrotate is
    /// replaced by a fresh one. Called on SIGHUP.
    pub fn reopen_access_log(&self) {
        if let Some(file) = &self.access_log {
            file.reopen();
        }
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
/// `format` applies to the `access_log` file only.
///
/// In `kv` format, an access line that stdout also shows is formatted once
/// and written to both sinks by the stdout layer; the file layer formats
/// only the access lines that stdout's filter leaves out (e.g. with
/// `log_level = "warn"`). `REQUEST` lines bypass the layers
/// ([`RequestLine`]) and follow the same rules.
pub fn init(
    level: &str,
    access_log: Option<&Path>,
    format: AccessLogFormat,
) -> Result<LogHandle, LoggingError> {
    let filter_text = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| level.to_owned());
    let parse = || {
        EnvFilter::builder()
            .parse(&filter_text)
            .map_err(|e| LoggingError::Filter {
                filter: filter_text.clone(),
                reason: e.to_string(),
            })
    };
    let (stdout, stdout_guard) =
        batch::batch("log-stdout", io::stdout()).map_err(LoggingError::Thread)?;
    let mut guards = vec![stdout_guard];
    let stdout_access = access_threshold(parse()?);
    let mut request_sinks = request_line::Sinks {
        stdout: (stdout_access >= Level::INFO).then(|| stdout.clone()),
        file: None,
    };

    let (access, kv_file, json_file, reopenable) = match access_log {
        Some(path) => {
            let file = ReopenableFile::open(path).map_err(|source| LoggingError::AccessLog {
                path: path.to_owned(),
                source,
            })?;
            let (writer, guard) =
                batch::batch("log-access", file.clone()).map_err(LoggingError::Thread)?;
            guards.push(guard);
            request_sinks.file = Some((writer.clone(), format));
            // The level hint keeps `debug!` and `trace!` call sites
            // everywhere disabled at no cost; without it they would all
            // ask this filter on every call.
            match format {
                AccessLogFormat::Kv => {
                    let hidden_from_stdout = filter_fn(move |m| {
                        m.target() == ACCESS && LevelFilter::from_level(*m.level()) > stdout_access
                    })
                    .with_max_level_hint(LevelFilter::INFO);
                    let layer = line_layer(writer.clone()).with_filter(hidden_from_stdout);
                    (Some(writer), Some(layer), None, Some(file))
                }
                AccessLogFormat::Json => {
                    let access_only =
                        filter_fn(|m| m.target() == ACCESS).with_max_level_hint(LevelFilter::INFO);
                    let layer = json_layer(writer).with_filter(access_only);
                    (None, None, Some(layer), Some(file))
                }
            }
        }
        None => (None, None, None, None),
    };
    let stdout_layer = line_layer(Tee { stdout, access }).with_filter(parse()?);
    tracing_subscriber::registry()
        .with(stdout_layer)
        .with(kv_file)
        .with(json_file)
        .try_init()
        .map_err(|_| LoggingError::AlreadyInstalled)?;
    request_line::install(request_sinks);
    Ok(LogHandle {
        access_log: reopenable,
        _guards: guards,
    })
}

/// The most verbose level at which `filter` passes events on the
/// [`ACCESS`] target, all of which are logged at `INFO` or `WARN`. They are
/// not emitted inside spans, so `filter`'s verdict on them never changes.
fn access_threshold(filter: EnvFilter) -> LevelFilter {
    tracing::subscriber::with_default(tracing_subscriber::registry().with(filter), || {
        if tracing::enabled!(target: ACCESS, Level::INFO) {
            LevelFilter::INFO
        } else if tracing::enabled!(target: ACCESS, Level::WARN) {
            LevelFilter::WARN
        } else if tracing::enabled!(target: ACCESS, Level::ERROR) {
            LevelFilter::ERROR
        } else {
            LevelFilter::OFF
        }
    })
}

fn line_layer<S, W>(writer: W) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tfmt::layer()
        .event_format(LineFormat)
        .with_ansi(false)
        .with_writer(writer)
}

fn json_layer<S, W>(writer: W) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tfmt::layer()
        .event_format(JsonFormat)
        .with_ansi(false)
        .with_writer(writer)
}

/// Stdout, plus the access log file for lines on the [`ACCESS`] target.
struct Tee {
    stdout: batch::BatchWriter,
    access: Option<batch::BatchWriter>,
}

struct TeeWriter<'a> {
    stdout: &'a batch::BatchWriter,
    access: Option<&'a batch::BatchWriter>,
}

impl<'a> MakeWriter<'a> for Tee {
    type Writer = TeeWriter<'a>;

    fn make_writer(&'a self) -> TeeWriter<'a> {
        TeeWriter {
            stdout: &self.stdout,
            access: None,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> TeeWriter<'a> {
        TeeWriter {
            stdout: &self.stdout,
            access: self.access.as_ref().filter(|_| meta.target() == ACCESS),
        }
    }
}

impl Write for TeeWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.stdout.append(line);
        if let Some(access) = self.access {
            access.append(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `2026-11-21T11:42:00.123456Z  INFO REQUEST client_ip=… host=…`
struct LineFormat;

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        timestamp::write_now(&mut writer)?;
        writer.write_str(match *event.metadata().level() {
            Level::ERROR => " ERROR ",
            Level::WARN => "  WARN ",
            Level::INFO => "  INFO ",
            Level::DEBUG => " DEBUG ",
            Level::TRACE => " TRACE ",
        })?;
        let mut visitor = LineVisitor {
            writer: &mut writer,
            message_pass: true,
            scratch: String::new(),
            result: Ok(()),
        };
        event.record(&mut visitor);
        visitor.message_pass = false;
        event.record(&mut visitor);
        visitor.result?;
        writer.write_char('\n')
    }
}

/// Writes the message (the tag) on a first pass, then every other field.
struct LineVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    message_pass: bool,
    scratch: String,
    result: fmt::Result,
}

impl LineVisitor<'_, '_> {
    fn field(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let is_message = field.name() == "message";
        if is_message != self.message_pass {
            return;
        }
        self.result = if is_message {
            write_escaped(self.writer, value, false)
        } else {
            self.key(field)
                .and_then(|()| write_escaped(self.writer, value, true))
        };
    }

    /// Writes ` key=`.
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.writer.write_char(' ')?;
        self.writer.write_str(field.name())?;
        self.writer.write_char('=')
    }

    /// A number: never the message, never quoted.
    fn number(&mut self, field: &Field, digits: &str) {
        if self.result.is_ok() && !self.message_pass {
            self.result = self.key(field).and_then(|()| self.writer.write_str(digits));
        }
    }
}

impl Visit for LineVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, itoa::Buffer::new().format(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let is_message = field.name() == "message";
        if is_message != self.message_pass {
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let _ = write!(scratch, "{value:?}");
        self.field(field, &scratch);
        self.scratch = scratch;
    }
}

/// What a byte asks of a `key=value` value, as bits: [`SEPARATOR`] (quote
/// it), [`QUOTED_ESCAPE`] (quote it and escape the byte), [`OTHER`] (a
/// control or non-ASCII byte: take the careful path).
const SEPARATOR: u8 = 1;
const QUOTED_ESCAPE: u8 = 2;
const OTHER: u8 = 4;
static BYTE_CLASS: [u8; 256] = {
    let mut table = [OTHER; 256];
    let mut b = b'!';
    while b <= b'~' {
        table[b as usize] = 0;
        b += 1;
    }
    table[b' ' as usize] = SEPARATOR;
    table[b'=' as usize] = SEPARATOR;
    table[b'"' as usize] = QUOTED_ESCAPE;
    table[b'\\' as usize] = QUOTED_ESCAPE;
    table
};

/// How a `key=value` value is written.
enum Escape {
    Bare,
    Quoted,
    /// Char by char ([`write_escaped_carefully`]).
    Carefully,
}

/// Settles how `value` is written in one pass over its bytes: almost every
/// value is printable ASCII and needs no more.
fn escape_for(value: &[u8], quote_if_needed: bool) -> Escape {
    let of = |class, bytes: &[u8]| {
        bytes
            .iter()
            .fold(class, |class, &b| class | BYTE_CLASS[usize::from(b)])
    };
    // Eight bytes a step, which the compiler unrolls: byte by byte, a user
    // agent's tens of bytes spent as much on the loop as on the lookups.
    let mut chunks = value.chunks_exact(8);
    let class = (&mut chunks).fold(0, of);
    let class = of(class, chunks.remainder());
    match class {
        0 if !value.is_empty() => Escape::Bare,
        c if c & OTHER == 0 && !quote_if_needed => Escape::Bare,
        SEPARATOR if quote_if_needed => Escape::Quoted,
        _ => Escape::Carefully,
    }
}

/// Writes a value, quoting it when it holds anything that could be read as
/// a separator. The message is never quoted but is escaped all the same.
fn write_escaped(w: &mut impl fmt::Write, value: &str, quote_if_needed: bool) -> fmt::Result {
    match escape_for(value.as_bytes(), quote_if_needed) {
        Escape::Bare => w.write_str(value),
        Escape::Quoted => {
            w.write_char('"')?;
            w.write_str(value)?;
            w.write_char('"')
        }
        Escape::Carefully => write_escaped_carefully(w, value, quote_if_needed),
    }
}

/// [`write_escaped`] for any value, char by char.
fn write_escaped_carefully(
    w: &mut impl fmt::Write,
    value: &str,
    quote_if_needed: bool,
) -> fmt::Result {
    let needs_quotes = quote_if_needed
        && (value.is_empty()
            || value
                .chars()
                .any(|c| matches!(c, ' ' | '"' | '\\' | '=') || c.is_control()));
    let plain = value
        .chars()
        .all(|c| !(c.is_control() || (needs_quotes && matches!(c, '"' | '\\'))));
    if plain {
        if needs_quotes {
            w.write_char('"')?;
            w.write_str(value)?;
            return w.write_char('"');
        }
        return w.write_str(value);
    }
    if needs_quotes {
        w.write_char('"')?;
    }
    for c in value.chars() {
        match c {
            '"' if needs_quotes => w.write_str("\\\"")?,
            '\\' if needs_quotes => w.write_str("\\\\")?,
            '\n' => w.write_str("\\n")?,
            '\r' => w.write_str("\\r")?,
            '\t' => w.write_str("\\t")?,
            c if c.is_control() => write!(w, "\\u{{{:x}}}", c as u32)?,
            c => w.write_char(c)?,
        }
    }
    if needs_quotes {
        w.write_char('"')?;
    }
    Ok(())
}

/// `{"ts":"2026-11-21T11:42:00.123456Z","level":"INFO","event":"REQUEST","client_ip":…}`
///
/// Numbers stay numbers; a value of `-` (nothing there, in the `key=value`
/// format) becomes `null`.
struct JsonFormat;

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writer.write_str("{\"ts\":\"")?;
        timestamp::write_now(&mut writer)?;
        write!(
            writer,
            "\",\"level\":\"{}\"",
            event.metadata().level().as_str()
        )?;
        let mut visitor = JsonVisitor {
            writer: &mut writer,
            message_pass: true,
            scratch: String::new(),
            result: Ok(()),
        };
        event.record(&mut visitor);
        visitor.message_pass = false;
        event.record(&mut visitor);
        visitor.result?;
        writer.write_str("}\n")
    }
}

/// Writes the message as `event` on a first pass, then every other field.
struct JsonVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    message_pass: bool,
    scratch: String,
    result: fmt::Result,
}

impl JsonVisitor<'_, '_> {
    /// Writes `,"key":` and then the value with `value`, if this pass
    /// wants the field.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let is_message = field.name() == "message";
        if is_message != self.message_pass {
            return;
        }
        let key = if is_message { "event" } else { field.name() };
        self.result = self
            .writer
            .write_char(',')
            .and_then(|()| write_json_string(self.writer, key))
            .and_then(|()| self.writer.write_char(':'))
            .and_then(|()| value(self.writer));
    }
}

impl Visit for JsonVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |w| {
            if value == "-" {
                w.write_str("null")
            } else {
                write_json_string(w, value)
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.field(field, |w| write!(w, "{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let is_message = field.name() == "message";
        if is_message != self.message_pass {
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let _ = write!(scratch, "{value:?}");
        self.record_str(field, &scratch);
        self.scratch = scratch;
    }
}

/// A JSON string literal: quotes, backslashes and every control character
/// escaped, so the line stays one line and one object.
fn write_json_string(w: &mut impl fmt::Write, value: &str) -> fmt::Result {
    w.write_char('"')?;
    let mut plain_from = 0;
    for (i, c) in value.char_indices() {
        let escaped = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => "",
            _ => continue,
        };
        w.write_str(&value[plain_from..i])?;
        if escaped.is_empty() {
            write!(w, "\\u{:04x}", c as u32)?;
        } else {
            w.write_str(escaped)?;
        }
        plain_from = i + c.len_utf8();
    }
    w.write_str(&value[plain_from..])?;
    w.write_char('"')
}

/// The access log file, which can be reopened at its path (for logrotate)
/// and never reports a failed write upward: the non-blocking worker would
/// otherwise stop, and a full disk must not stop the proxy. Failures are
/// reported on stderr, at most once a minute.
#[derive(Clone)]
struct ReopenableFile {
    inner: Arc<Mutex<FileState>>,
}

struct FileState {
    path: PathBuf,
    file: Option<File>,
    last_complaint: Option<Instant>,
    dropped_since_complaint: u64,
}

const COMPLAINT_INTERVAL: Duration = Duration::from_secs(60);

impl ReopenableFile {
    fn open(path: &Path) -> io::Result<Self> {
        let file = open_append(path)?;
        Ok(Self {
            inner: Arc::new(Mutex::new(FileState {
                path: path.to_owned(),
                file: Some(file),
                last_complaint: None,
                dropped_since_complaint: 0,
            })),
        })
    }

    fn reopen(&self) {
        let mut state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match open_append(&state.path) {
            Ok(file) => state.file = Some(file),
            // Keeping the old handle loses no lines: they land in the
            // rotated file, where they are easier to find than nowhere.
            Err(e) => eprintln!(
                "ERROR access log {} cannot be reopened ({e}); still writing to the file opened before, requests are still served",
                state.path.display()
            ),
        }
    }
}

impl FileState {
    fn complain(&mut self, error: &io::Error) {
        self.dropped_since_complaint += 1;
        let due = self
            .last_complaint
            .is_none_or(|t| t.elapsed() >= COMPLAINT_INTERVAL);
        if due {
            // The logger itself is what failed, so this goes straight to stderr.
            eprintln!(
                "ERROR access log {} cannot be written ({error}); {} line(s) dropped, requests are still served",
                self.path.display(),
                self.dropped_since_complaint
            );
            self.last_complaint = Some(Instant::now());
            self.dropped_since_complaint = 0;
        }
    }
}

impl Write for ReopenableFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if state.file.is_none() {
            match open_append(&state.path) {
                Ok(file) => state.file = Some(file),
                Err(e) => {
                    state.complain(&e);
                    return Ok(buf.len());
                }
            }
        }
        if let Some(Err(e)) = state.file.as_mut().map(|f| f.write_all(buf)) {
            state.complain(&e);
            // Try a fresh handle next time: the file may have been removed.
            state.file = None;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::LevelFilter;

    use super::{access_threshold, write_escaped, write_escaped_carefully, write_json_string};

    fn json(s: &str) -> String {
        let mut out = String::new();
        write_json_string(&mut out, s).ok();
        out
    }

    #[test]
    fn json_strings_escape_what_json_requires() {
        assert_eq!(json("/a b"), "\"/a b\"");
        assert_eq!(json("say \"hi\"\\"), "\"say \\\"hi\\\"\\\\\"");
        assert_eq!(json("/\r\n{\"x\":1}"), "\"/\\r\\n{\\\"x\\\":1}\"");
        assert_eq!(json("\u{1b}[31m\u{7f}"), "\"\\u001b[31m\\u007f\"");
        assert_eq!(json("\u{2028}é"), "\"\\u2028é\"");
    }

    fn esc(s: &str) -> String {
        let mut out = String::new();
        write_escaped(&mut out, s, true).ok();
        out
    }

    #[test]
    fn plain_values_are_bare() {
        assert_eq!(esc("/user/repo"), "/user/repo");
        assert_eq!(esc("2001:db8::1"), "2001:db8::1");
    }

    #[test]
    fn access_threshold_follows_the_filter_for_the_access_target() {
        for (filter, expected) in [
            ("info", LevelFilter::INFO),
            ("warn", LevelFilter::WARN),
            ("debug", LevelFilter::INFO),
            ("error", LevelFilter::ERROR),
            ("warn,access=info", LevelFilter::INFO),
            ("info,access=off", LevelFilter::OFF),
            ("reverse_proxy=info", LevelFilter::OFF),
        ] {
            let parsed = EnvFilter::builder().parse(filter).expect("filter");
            assert_eq!(access_threshold(parsed), expected, "{filter}");
        }
    }

    /// The one-pass shortcut agrees with the char-by-char path on every
    /// printable ASCII byte, alone and next to each separator.
    #[test]
    fn the_fast_path_writes_what_the_careful_path_writes() {
        let mut values = vec![String::new(), "-".to_owned(), "é".to_owned()];
        for b in b' '..=b'~' {
            let c = char::from(b);
            for other in ["", " ", "=", "\"", "\\", "\n", "\u{85}", "ü"] {
                values.push(format!("a{c}{other}"));
            }
        }
        // Each kind of byte at each place in values of up to 17 bytes: the
        // check reads eight bytes a step and the rest one at a time.
        for len in 1..=17 {
            for at in 0..len {
                for other in [" ", "=", "\"", "\\", "\n", "\u{7f}", "ü"] {
                    let (before, after) = ("a".repeat(at), "a".repeat(len - at - 1));
                    values.push(format!("{before}{other}{after}"));
                }
            }
        }
        for value in &values {
            for quote in [true, false] {
                let (mut fast, mut careful) = (String::new(), String::new());
                write_escaped(&mut fast, value, quote).ok();
                write_escaped_carefully(&mut careful, value, quote).ok();
                assert_eq!(fast, careful, "{value:?} quote={quote}");
            }
        }
    }

    #[test]
    fn separators_are_quoted_and_escaped() {
        assert_eq!(esc("a b"), "\"a b\"");
        assert_eq!(esc(""), "\"\"");
        assert_eq!(esc("x=1"), "\"x=1\"");
        assert_eq!(esc("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(
            esc("/\r\nclient_ip=1.2.3.4"),
            "\"/\\r\\nclient_ip=1.2.3.4\""
        );
        assert_eq!(esc("\u{1b}[31m"), "\"\\u{1b}[31m\"");
    }
}
