//! The `REQUEST` access line, written straight into the log sinks.
//!
//! Every proxied request writes one, so it skips `tracing`: an event hands
//! each field to its visitor through a dynamic call, twice (the tag comes
//! first), which cost more than the rest of the line. Here the line is
//! formatted from plain fields straight into the buffer of the batched
//! writer that the tracing formatters in the parent module write to, byte
//! for byte as they write it (a unit test holds the two together), so its
//! order among other log lines is kept.

use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use http::{Method, StatusCode, Version};

use super::batch::BatchWriter;
use super::{Escape, escape_for, timestamp, write_escaped_carefully, write_json_string};
use crate::config::AccessLogFormat;

/// Where `REQUEST` lines go, settled once by [`super::init`].
pub(super) struct Sinks {
    /// Stdout, when its filter shows `access` lines at `INFO`.
    pub stdout: Option<BatchWriter>,
    /// The `access_log` file, if one is configured.
    pub file: Option<(BatchWriter, AccessLogFormat)>,
}

static SINKS: OnceLock<Sinks> = OnceLock::new();

/// Installs the sinks; only the first call has an effect, as only the
/// first global subscriber can be installed.
pub(super) fn install(sinks: Sinks) {
    let _ = SINKS.set(sinks);
}

/// One `REQUEST` line. Text that a client or the configuration controls is
/// escaped as it is written; a missing value is `-`.
pub struct RequestLine<'a> {
    /// The client's address as text.
    pub client_ip: &'a [u8],
    pub host: &'a str,
    /// `host` and `upstream` are a configured site's: a validated DNS name
    /// and host and port, which never need escaping. Otherwise `host` is
    /// whatever the client sent.
    pub site: bool,
    pub method: &'a Method,
    pub path: &'a str,
    pub status: StatusCode,
    pub upstream: &'a str,
    pub duration: Duration,
    /// When the exchange ended: the line's time stamp.
    pub ended: Instant,
    pub bytes_sent: u64,
    /// The raw header, which need not be UTF-8.
    pub user_agent: Option<&'a [u8]>,
    pub tls_version: Option<&'static str>,
    pub http_version: Version,
}

enum Value<'a> {
    /// Bytes a client or the configuration chose: escaped as needed.
    Text(&'a [u8]),
    /// ASCII that never needs escaping, in either format: a method (a
    /// token, as `http::Method` guarantees), an address, a version name.
    Plain(&'a [u8]),
    Number(u64),
}

impl RequestLine<'_> {
    /// Whether any sink takes `REQUEST` lines, so that a caller can skip
    /// gathering the fields of a line nobody reads.
    pub fn wanted() -> bool {
        SINKS
            .get()
            .is_some_and(|sinks| sinks.stdout.is_some() || sinks.file.is_some())
    }

    /// Writes the line to every sink that takes it; does nothing before
    /// logging is installed (as a `tracing` event without a subscriber).
    /// The line is formatted straight into the first sink's buffer and
    /// copied from there to a second (formatted anew if the first is full).
    pub fn emit(&self) {
        if let Some(sinks) = SINKS.get() {
            self.emit_to(sinks);
        }
    }

    fn emit_to(&self, sinks: &Sinks) {
        let kv_file = sinks
            .file
            .as_ref()
            .filter(|(_, format)| *format == AccessLogFormat::Kv)
            .map(|(writer, _)| writer);
        let mut kv_sinks = sinks.stdout.iter().chain(kv_file);
        if let Some(first) = kv_sinks.next() {
            let mut second = kv_sinks.next();
            first.append_with(|out| {
                let start = out.len();
                self.write_kv(out)?;
                if let Some(second) = second.take() {
                    second.append(&out[start..]);
                }
                Ok(())
            });
            // The first sink was full (a stalled stdout): the second still
            // gets the line, each sink dropping lines on its own account.
            if let Some(second) = second {
                second.append_with(|out| self.write_kv(out));
            }
        }
        if let Some((file, AccessLogFormat::Json)) = &sinks.file {
            file.append_with(|out| self.write_json(out));
        }
    }

    /// A value that comes from the configuration when the line is a site's.
    fn configured<'v>(&self, text: &'v str) -> Value<'v> {
        if self.site {
            Value::Plain(text.as_bytes())
        } else {
            Value::Text(text.as_bytes())
        }
    }

    fn write_configured(&self, out: &mut Vec<u8>, text: &str) -> fmt::Result {
        if self.site {
            out.extend_from_slice(text.as_bytes());
            Ok(())
        } else {
            write_kv_text(out, text.as_bytes())
        }
    }

    fn duration_ms(&self) -> u64 {
        u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX)
    }

    /// The values in [`JSON_KEYS`]' order.
    fn values(&self) -> [Value<'_>; 11] {
        [
            Value::Plain(self.client_ip),
            self.configured(self.host),
            Value::Plain(self.method.as_str().as_bytes()),
            Value::Text(self.path.as_bytes()),
            Value::Number(u64::from(self.status.as_u16())),
            self.configured(self.upstream),
            Value::Number(self.duration_ms()),
            Value::Number(self.bytes_sent),
            Value::Text(self.user_agent.unwrap_or(b"-")),
            Value::Plain(self.tls_version.unwrap_or("-").as_bytes()),
            Value::Plain(http_version(self.http_version).as_bytes()),
        ]
    }

    /// `2026-11-21T11:42:00.123456Z  INFO REQUEST client_ip=… …\n`
    ///
    /// Written field by field with literal keys rather than by a loop over
    /// keys as [`Self::write_json`] does: a key of known length is copied
    /// inline, where a loop calls `memcpy` for each (−1.3 % instructions per
    /// request). This is the default format, so every request pays for it.
    fn write_kv(&self, out: &mut Vec<u8>) -> fmt::Result {
        fn number(out: &mut Vec<u8>, n: u64) {
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        }
        timestamp::write_of(self.ended, out);
        out.extend_from_slice(b"  INFO REQUEST client_ip=");
        out.extend_from_slice(self.client_ip);
        out.extend_from_slice(b" host=");
        self.write_configured(out, self.host)?;
        out.extend_from_slice(b" method=");
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.extend_from_slice(b" path=");
        write_kv_text(out, self.path.as_bytes())?;
        out.extend_from_slice(b" status=");
        out.extend_from_slice(self.status.as_str().as_bytes());
        out.extend_from_slice(b" upstream=");
        self.write_configured(out, self.upstream)?;
        out.extend_from_slice(b" duration_ms=");
        number(out, self.duration_ms());
        out.extend_from_slice(b" bytes_sent=");
        number(out, self.bytes_sent);
        out.extend_from_slice(b" user_agent=");
        write_kv_text(out, self.user_agent.unwrap_or(b"-"))?;
        out.extend_from_slice(b" tls_version=");
        out.extend_from_slice(self.tls_version.unwrap_or("-").as_bytes());
        out.extend_from_slice(b" http_version=");
        out.extend_from_slice(http_version(self.http_version).as_bytes());
        out.push(b'\n');
        Ok(())
    }

    /// `{"ts":"…","level":"INFO","event":"REQUEST","client_ip":"…",…}\n`
    fn write_json(&self, out: &mut Vec<u8>) -> fmt::Result {
        out.extend_from_slice(b"{\"ts\":\"");
        timestamp::write_of(self.ended, out);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"event\":\"REQUEST\"");
        for (key, value) in JSON_KEYS.into_iter().zip(self.values()) {
            out.extend_from_slice(key.as_bytes());
            match value {
                Value::Text(b"-") | Value::Plain(b"-") => out.extend_from_slice(b"null"),
                Value::Text(text) => {
                    write_json_string(&mut Bytes(out), &String::from_utf8_lossy(text))?;
                }
                Value::Plain(text) => {
                    out.push(b'"');
                    out.extend_from_slice(text);
                    out.push(b'"');
                }
                Value::Number(n) => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
            }
        }
        out.extend_from_slice(b"}\n");
        Ok(())
    }
}

/// A `key=value` value from raw bytes, as `super::write_escaped` writes
/// text (invalid UTF-8 becoming U+FFFD on the careful path). Inlined, with
/// the rare careful path kept out of line: a call per value cost a fifth
/// of the check itself.
#[inline]
fn write_kv_text(out: &mut Vec<u8>, text: &[u8]) -> fmt::Result {
    match escape_for(text, true) {
        Escape::Bare => out.extend_from_slice(text),
        Escape::Quoted => {
            out.push(b'"');
            out.extend_from_slice(text);
            out.push(b'"');
        }
        Escape::Carefully => return write_kv_carefully(out, text),
    }
    Ok(())
}

#[cold]
#[inline(never)]
fn write_kv_carefully(out: &mut Vec<u8>, text: &[u8]) -> fmt::Result {
    write_escaped_carefully(&mut Bytes(out), &String::from_utf8_lossy(text), true)
}

/// Lets the `fmt::Write` helpers write into the byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn http_version(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "-",
    }
}

const JSON_KEYS: [&str; 11] = [
    ",\"client_ip\":",
    ",\"host\":",
    ",\"method\":",
    ",\"path\":",
    ",\"status\":",
    ",\"upstream\":",
    ",\"duration_ms\":",
    ",\"bytes_sent\":",
    ",\"user_agent\":",
    ",\"tls_version\":",
    ",\"http_version\":",
];

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing::info;
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::logging::{ACCESS, json_layer, line_layer};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl MakeWriter<'_> for Captured {
        type Writer = Self;
        fn make_writer(&self) -> Self {
            self.clone()
        }
    }

    impl Captured {
        fn text(&self) -> String {
            let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8(bytes.clone()).expect("utf-8")
        }
    }

    const TS: usize = "2026-11-21T11:42:00.123456Z".len();

    /// The line as the tracing formatters write the same fields.
    fn through_tracing(line: &RequestLine<'_>) -> (String, String) {
        let (kv, json) = (Captured::default(), Captured::default());
        let subscriber = tracing_subscriber::registry()
            .with(line_layer(kv.clone()))
            .with(json_layer(json.clone()));
        let user_agent = line.user_agent.map_or("-".into(), String::from_utf8_lossy);
        tracing::subscriber::with_default(subscriber, || {
            info!(
                target: ACCESS,
                client_ip = std::str::from_utf8(line.client_ip).expect("ascii"),
                host = line.host,
                method = line.method.as_str(),
                path = line.path,
                status = line.status.as_u16(),
                upstream = line.upstream,
                duration_ms = line.duration.as_millis() as u64,
                bytes_sent = line.bytes_sent,
                user_agent = user_agent.as_ref(),
                tls_version = line.tls_version.unwrap_or("-"),
                http_version = http_version(line.http_version),
                "REQUEST"
            );
        });
        (kv.text(), json.text())
    }

    fn direct(line: &RequestLine<'_>) -> (String, String) {
        let (mut kv, mut json) = (Vec::new(), Vec::new());
        line.write_kv(&mut kv).expect("kv");
        line.write_json(&mut json).expect("json");
        let text = |bytes| String::from_utf8(bytes).expect("utf-8");
        (text(kv), text(json))
    }

    #[test]
    fn lines_match_the_tracing_formatters_byte_for_byte() {
        let extension = Method::from_bytes(b"PURGE").expect("method");
        let hostile: [(&str, Option<&[u8]>, &str); 8] = [
            ("/plain", Some(b"curl/8.0"), "a.test"),
            ("/a b", Some(b"Mozilla/5.0 (X11; Linux)"), "-"),
            ("/\r\nclient_ip=1.2.3.4", Some(b"say \"hi\"\\"), "b.test"),
            ("/x=1", Some(b""), "c.test"),
            (
                "/\u{1b}[31m\u{7f}",
                Some("\u{2028}\u{e9}\t".as_bytes()),
                "-",
            ),
            ("/{\"x\":1}", None, "d.test"),
            ("/latin1", Some(b"caf\xe9 \xff\xfe"), "e.test"),
            ("/", Some(b"-"), "f.test"),
        ];
        for (i, (path, user_agent, upstream)) in hostile.into_iter().enumerate() {
            let line = RequestLine {
                client_ip: if i % 2 == 0 {
                    b"2001:db8::7"
                } else {
                    b"192.0.2.10"
                },
                host: match i {
                    3 => "-",
                    5 => "a b=\"c\"",
                    _ => "a.test",
                },
                site: upstream != "-" && i != 3 && i != 5,
                method: if i % 3 == 0 { &Method::GET } else { &extension },
                path,
                status: StatusCode::BAD_GATEWAY,
                upstream,
                duration: Duration::from_micros(12_345),
                ended: Instant::now(),
                bytes_sent: u64::MAX,
                user_agent,
                tls_version: (i % 2 == 1).then_some("TLSv1.3"),
                http_version: if i % 2 == 0 {
                    Version::HTTP_11
                } else {
                    Version::HTTP_2
                },
            };
            let (kv, json) = direct(&line);
            let (tracing_kv, tracing_json) = through_tracing(&line);
            assert_eq!(kv[TS..], tracing_kv[TS..], "{path:?} {user_agent:?}");
            // Past `{"ts":"` and the time.
            let skip = 7 + TS;
            assert_eq!(
                json[skip..],
                tracing_json[skip..],
                "{path:?} {user_agent:?}"
            );
            assert_eq!(kv.matches('\n').count(), 1, "{kv}");
            assert_eq!(json.matches('\n').count(), 1, "{json}");
        }
    }

    /// A stalled stdout drops its own lines, not the access log file's.
    #[test]
    fn a_full_first_sink_does_not_starve_the_second() {
        use crate::logging::batch::testing::{Gated, Sink};
        use crate::logging::batch::{MAX_PENDING, batch};

        let stalled = Gated::default();
        let (stdout, stdout_guard) = batch("test-stdout", stalled.clone()).expect("thread");
        let file_out = Sink::default();
        let (file, file_guard) = batch("test-file", file_out.clone()).expect("thread");
        stdout.append(b"first\n");
        stalled.wait_for(|s| s.0);
        stdout.append(&vec![b'x'; MAX_PENDING]);
        let sinks = Sinks {
            stdout: Some(stdout),
            file: Some((file, AccessLogFormat::Kv)),
        };
        let line = RequestLine {
            client_ip: b"192.0.2.10",
            host: "a.test",
            site: true,
            method: &Method::GET,
            path: "/kept",
            status: StatusCode::OK,
            upstream: "127.0.0.1:3000",
            duration: Duration::from_millis(3),
            ended: Instant::now(),
            bytes_sent: 10,
            user_agent: None,
            tls_version: None,
            http_version: Version::HTTP_11,
        };
        line.emit_to(&sinks);
        stalled.set(|s| s.1 = true);
        drop((stdout_guard, file_guard));
        let written = file_out.0.lock().unwrap_or_else(PoisonError::into_inner);
        let text = String::from_utf8_lossy(&written.0);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains(" path=/kept "), "{text}");
        let stdout_text = stalled.out.0.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(!String::from_utf8_lossy(&stdout_text.0).contains("/kept"));
    }
}
