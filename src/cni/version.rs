//! CNI specification versions this plugin speaks, and what each one allows.

use std::fmt;

/// Every CNI version the plugin accepts, oldest first; VERSION reports this list.
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// One CNI specification version from [`SUPPORTED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// 0.3.0: the first version with the current result shape.
    V030,
    /// 0.3.1: what every released Calico manifest writes.
    V031,
    /// 0.4.0: adds CHECK.
    V040,
    /// 1.0.0: drops `ips[].version`.
    V100,
    /// 1.1.0: adds GC and STATUS.
    V110,
}

impl CniVersion {
    /// The newest version, used when a request names none.
    pub const LATEST: CniVersion = CniVersion::V110;

    /// Parses a version string; `None` when it is not one we support.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "0.3.0" => Self::V030,
            "0.3.1" => Self::V031,
            "0.4.0" => Self::V040,
            "1.0.0" => Self::V100,
            "1.1.0" => Self::V110,
            _ => return None,
        })
    }

    /// The version as the spec writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V030 => "0.3.0",
            Self::V031 => "0.3.1",
            Self::V040 => "0.4.0",
            Self::V100 => "1.0.0",
            Self::V110 => "1.1.0",
        }
    }

    /// Whether CHECK exists at this version (0.4.0 and later).
    pub fn has_check(self) -> bool {
        self >= Self::V040
    }

    /// Whether GC and STATUS exist at this version (1.1.0 and later).
    pub fn has_gc_status(self) -> bool {
        self >= Self::V110
    }

    /// Whether results carry `ips[].version` (before 1.0.0).
    pub fn result_has_ip_version(self) -> bool {
        self < Self::V100
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_string_round_trips() {
        for s in SUPPORTED {
            let v = CniVersion::parse(s).expect("supported version parses");
            assert_eq!(v.as_str(), s);
        }
        assert_eq!(CniVersion::parse("0.2.0"), None);
        assert_eq!(CniVersion::parse("1.2.0"), None);
        assert_eq!(CniVersion::parse(""), None);
    }

    #[test]
    fn verbs_follow_the_spec() {
        assert!(!CniVersion::V031.has_check());
        assert!(CniVersion::V040.has_check());
        assert!(!CniVersion::V100.has_gc_status());
        assert!(CniVersion::V110.has_gc_status());
        assert!(CniVersion::V040.result_has_ip_version());
        assert!(!CniVersion::V100.result_has_ip_version());
    }
}
