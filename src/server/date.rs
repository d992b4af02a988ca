//! The `Date` field every response carries (RFC 9110 §6.6.1), as
//! `Sun, 22 Nov 2026 02:30:00 GMT`.
//!
//! It changes once a second, so it is formatted once a second and per
//! thread, and copied into each response head.

use std::cell::Cell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An IMF-fixdate is always this long.
const LEN: usize = 29;

thread_local! {
    /// The second the date is for, and the date.
    static CACHED: Cell<(u64, [u8; LEN])> = const { Cell::new((u64::MAX, [0; LEN])) };
}

/// Appends the current date.
pub fn extend(out: &mut Vec<u8>) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (second, mut date) = CACHED.get();
    if second != secs {
        date = format(secs);
        CACHED.set((secs, date));
    }
    out.extend_from_slice(&date);
}

fn format(secs: u64) -> [u8; LEN] {
    let formatted = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs));
    let mut date = [b' '; LEN];
    let len = formatted.len().min(LEN);
    date[..len].copy_from_slice(&formatted.as_bytes()[..len]);
    date
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_an_imf_fixdate() {
        assert_eq!(&format(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&format(1_795_314_600), b"Sun, 22 Nov 2026 02:30:00 GMT");
    }

    #[test]
    fn extends_with_the_current_date() {
        let mut out = b"date: ".to_vec();
        extend(&mut out);
        let parsed = std::str::from_utf8(&out[6..]).expect("ascii");
        let date = httpdate::parse_http_date(parsed).expect("an HTTP date");
        let age = SystemTime::now()
            .duration_since(date)
            .expect("not in the future");
        assert!(age < Duration::from_secs(5), "{parsed} is {age:?} old");
    }
}
