//! Moments that processes of one boot can compare: the kernel's boot id and
//! `CLOCK_BOOTTIME`, which neither jumps with the wall clock nor stops while
//! the machine sleeps. With them, one ADD can tell whether another ADD's
//! etcd read began after it asked. And the wall-clock times our records
//! carry (RFC 3339 UTC, Unix seconds).

use std::fs;
use std::io;
use std::path::Path;

use nix::time::{clock_gettime, ClockId};
use serde::{Deserialize, Serialize};

/// The kernel's boot id: changes on every boot.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Reads the kernel's boot id.
pub fn read_boot_id() -> io::Result<String> {
    fs::read_to_string(Path::new(BOOT_ID_PATH)).map(|s| s.trim().to_string())
}

/// A moment of this boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// The boot it belongs to.
    pub boot_id: String,
    /// Nanoseconds of `CLOCK_BOOTTIME`.
    pub boottime_ns: u64,
}

impl Stamp {
    /// Now; `None` when the boot id or the clock cannot be read (then no
    /// comparison is made, and nothing is taken on trust).
    pub fn now() -> Option<Self> {
        let boot_id = read_boot_id().ok().filter(|b| !b.is_empty())?;
        let t = clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?;
        let secs = u64::try_from(t.tv_sec()).ok()?;
        let nanos = u64::try_from(t.tv_nsec()).ok()?;
        let boottime_ns = secs.checked_mul(1_000_000_000)?.checked_add(nanos)?;
        Some(Self {
            boot_id,
            boottime_ns,
        })
    }

    /// Whether this moment is `other` or later, in the same boot.
    pub fn not_before(&self, other: &Self) -> bool {
        self.boot_id == other.boot_id && self.boottime_ns >= other.boottime_ns
    }
}

/// The current time as RFC 3339 UTC, e.g. "2026-11-21T12:00:00Z".
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Formats Unix seconds as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses the RFC 3339 UTC form [`rfc3339`] writes ("YYYY-MM-DDTHH:MM:SSZ")
/// back to Unix seconds; `None` for anything else.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86400 + hh * 3600 + mm * 60 + ss).ok()
}

/// The current time in Unix seconds.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_order_within_a_boot_and_never_across_boots() {
        let a = Stamp::now().expect("this machine has a boot id and CLOCK_BOOTTIME");
        let b = Stamp::now().expect("again");
        assert!(b.not_before(&a));
        assert!(a.not_before(&a));
        let later = Stamp {
            boottime_ns: a.boottime_ns + 1,
            ..a.clone()
        };
        assert!(!a.not_before(&later));
        let other_boot = Stamp {
            boot_id: "another boot".into(),
            boottime_ns: u64::MAX,
        };
        assert!(!other_boot.not_before(&a), "a later boot's clock restarts");
    }
}
