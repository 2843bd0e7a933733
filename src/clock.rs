//! Moments that processes of one boot can compare: the kernel's boot id and
//! `CLOCK_BOOTTIME`, which neither jumps with the wall clock nor stops while
//! the machine sleeps. With them, one ADD can tell whether another ADD's
//! etcd read began after it asked.

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
