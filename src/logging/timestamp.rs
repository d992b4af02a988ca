//! The time at the start of every log line, `2026-11-21T11:42:00.123456Z`
//! (UTC, microseconds), as tracing-subscriber's `SystemTime` writes it.
//!
//! Only the microseconds change from one access line to the next, so the
//! date and time of day are formatted once per second and per thread and
//! reused; converting and formatting a full date for every request was a
//! visible share of the request path. The stamp is made of byte arrays of
//! fixed length, which the access line appends without going through
//! `fmt::Write`.

use std::cell::Cell;
use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `2026-11-21T11:42:00.`
const PREFIX_LEN: usize = 20;
/// The prefix, six digits of microseconds and `Z`.
const LEN: usize = PREFIX_LEN + 7;

thread_local! {
    /// A monotonic instant and the wall-clock time (since the epoch) read
    /// right after it.
    static ANCHOR: Cell<Option<(Instant, Duration)>> = const { Cell::new(None) };
    /// The second the prefix is for, and the prefix for it.
    static PREFIX: Cell<(u64, [u8; PREFIX_LEN])> = const { Cell::new((u64::MAX, [0; PREFIX_LEN])) };
}

/// The current time as the bytes of a log line's stamp (ASCII).
fn now() -> [u8; LEN] {
    stamp(wall_clock())
}

/// The wall-clock time since the epoch.
fn wall_clock() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Appends the wall-clock time of `at`, an instant the caller has just
/// read, to `out` as a log line's stamp. An access line already reads the
/// monotonic clock for its duration; the wall clock is read only when the
/// thread's last reading of both is a second old or more, so a change of
/// the system time shows within a second.
pub fn write_of(at: Instant, out: &mut Vec<u8>) {
    let anchored = ANCHOR.try_with(|anchor| {
        if let Some((instant, wall)) = anchor.get()
            && let Some(since) = at.checked_duration_since(instant)
            && since < Duration::from_secs(1)
        {
            return wall + since;
        }
        let wall = wall_clock();
        anchor.set(Some((at, wall)));
        wall
    });
    // Appended in its two parts: put together first, the stamp was copied
    // a byte or two at a time.
    let (prefix, fraction) = parts(anchored.unwrap_or_else(|_| wall_clock()));
    out.extend_from_slice(&prefix);
    out.extend_from_slice(&fraction);
}

/// Writes the current time.
pub fn write_now(w: &mut impl fmt::Write) -> fmt::Result {
    // Always ASCII, so the conversion cannot fail.
    w.write_str(std::str::from_utf8(&now()).unwrap_or_default())
}

fn stamp(wall: Duration) -> [u8; LEN] {
    let (prefix, fraction) = parts(wall);
    let mut stamp = [0; LEN];
    stamp[..PREFIX_LEN].copy_from_slice(&prefix);
    stamp[PREFIX_LEN..].copy_from_slice(&fraction);
    stamp
}

/// The stamp of `wall` as the prefix, cached for the second, and the
/// microseconds with the `Z`.
fn parts(wall: Duration) -> ([u8; PREFIX_LEN], [u8; LEN - PREFIX_LEN]) {
    let (secs, micros) = (wall.as_secs(), wall.subsec_micros());
    let prefix = PREFIX
        .try_with(|cached| {
            let (second, prefix) = cached.get();
            if second == secs {
                return prefix;
            }
            let prefix = format_prefix(secs);
            cached.set((secs, prefix));
            prefix
        })
        // While the thread's locals are torn down, format it afresh.
        .unwrap_or_else(|_| format_prefix(secs));
    let mut fraction = [b'Z'; LEN - PREFIX_LEN];
    let pairs = [micros / 10_000, micros / 100 % 100, micros % 100];
    for (i, pair) in pairs.into_iter().enumerate() {
        fraction[2 * i..][..2].copy_from_slice(two_digits(pair));
    }
    (prefix, fraction)
}

/// `00` to `99`; a table lookup rather than two divisions by ten.
fn two_digits(n: u32) -> &'static [u8; 2] {
    const PAIRS: [[u8; 2]; 100] = {
        let mut pairs = [[0; 2]; 100];
        let mut i = 0;
        while i < 100 {
            pairs[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
            i += 1;
        }
        pairs
    };
    &PAIRS[n as usize % 100]
}

/// Once a second per thread: kept out of line, as the compiler otherwise
/// began the date's arithmetic before the check that skips it.
#[cold]
#[inline(never)]
fn format_prefix(secs: u64) -> [u8; PREFIX_LEN] {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let year = u32::try_from(t.year()).unwrap_or(0).min(9999);
    let mut prefix = *b"0000-00-00T00:00:00.";
    prefix[..2].copy_from_slice(two_digits(year / 100));
    prefix[2..4].copy_from_slice(two_digits(year % 100));
    let rest = [
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
    ];
    for (i, n) in rest.into_iter().enumerate() {
        prefix[5 + 3 * i..][..2].copy_from_slice(two_digits(u32::from(n)));
    }
    prefix
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(secs: u64, micros: u32) -> String {
        String::from_utf8(stamp(Duration::new(secs, micros * 1_000)).to_vec()).expect("ascii")
    }

    #[test]
    fn formats_like_rfc3339_with_microseconds() {
        assert_eq!(text(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(text(1_795_261_320, 123_456), "2026-11-21T11:42:00.123456Z");
        // Same second again (cached prefix), then the next one.
        assert_eq!(text(1_795_261_320, 7), "2026-11-21T11:42:00.000007Z");
        assert_eq!(text(1_795_261_321, 999_999), "2026-11-21T11:42:01.999999Z");
        assert_eq!(text(951_782_400, 1), "2000-02-29T00:00:00.000001Z");
        assert_eq!(text(253_402_300_799, 10), "9999-12-31T23:59:59.000010Z");
    }

    #[test]
    fn an_instant_reads_as_the_wall_clock_at_it() {
        let text = |stamp: [u8; LEN]| String::from_utf8(stamp.to_vec()).expect("ascii");
        let start = Instant::now();
        let of = |at| {
            let mut out = Vec::new();
            write_of(at, &mut out);
            String::from_utf8(out).expect("ascii")
        };
        let first = of(start);
        let wall = text(now());
        // Anchored at `start`: a later instant reads later by the gap.
        let later = of(start + Duration::from_millis(250));
        assert!(first <= wall, "{first} {wall}");
        assert!(first < later, "{first} {later}");
        let micros = |t: &str| t[17..26].replace('.', "").parse::<u64>().expect("digits");
        let gap = (micros(&later) + 60_000_000 - micros(&first)) % 60_000_000;
        assert_eq!(gap, 250_000, "{first} {later}");
    }

    #[test]
    fn matches_the_formatter_it_stands_in_for() {
        use tracing_subscriber::fmt::format::Writer;
        use tracing_subscriber::fmt::time::{FormatTime, SystemTime as Tracing};
        let mut theirs = String::new();
        Tracing
            .format_time(&mut Writer::new(&mut theirs))
            .expect("format");
        let ours = String::from_utf8(now().to_vec()).expect("ascii");
        // The two clocks were read a moment apart: compare the shape.
        let shape = |s: &str| s.bytes().map(|b| b.is_ascii_digit()).collect::<Vec<_>>();
        assert_eq!(shape(&ours), shape(&theirs), "{ours} {theirs}");
    }
}
