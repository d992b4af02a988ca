//! The time at the start of every log line, `2026-11-21T11:42:00.123456Z`
//! (UTC, microseconds), as tracing-subscriber's `SystemTime` writes it.
//!
//! Only the microseconds change from one access line to the next, so the
//! date and time of day are formatted once per second and per thread and
//! reused; converting and formatting a full date for every request was a
//! visible share of the request path.

use std::cell::RefCell;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    /// The second the prefix is for, and `2026-11-21T11:42:00.` for it.
    static PREFIX: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Writes the current time.
pub fn write_now(w: &mut impl fmt::Write) -> fmt::Result {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    write_at(w, now.as_secs(), now.subsec_micros())
}

fn write_at(w: &mut impl fmt::Write, secs: u64, micros: u32) -> fmt::Result {
    PREFIX.with_borrow_mut(|(second, prefix)| {
        if *second != secs {
            *second = secs;
            prefix.clear();
            format_prefix(prefix, secs)?;
        }
        w.write_str(prefix)
    })?;
    // One more than a million keeps the leading zeros: "1000007" for 7 µs.
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(micros.min(999_999) + 1_000_000);
    w.write_str(&digits[1..])?;
    w.write_char('Z')
}

fn format_prefix(out: &mut String, secs: u64) -> fmt::Result {
    use fmt::Write as _;
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, micros: u32) -> String {
        let mut out = String::new();
        write_at(&mut out, secs, micros).expect("format");
        out
    }

    #[test]
    fn formats_like_rfc3339_with_microseconds() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(1_795_261_320, 123_456), "2026-11-21T11:42:00.123456Z");
        // Same second again (cached prefix), then the next one.
        assert_eq!(at(1_795_261_320, 7), "2026-11-21T11:42:00.000007Z");
        assert_eq!(at(1_795_261_321, 999_999), "2026-11-21T11:42:01.999999Z");
        assert_eq!(at(951_782_400, 1), "2000-02-29T00:00:00.000001Z");
    }
}
