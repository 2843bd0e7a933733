//! The plugin's configuration: its entry in Calico's conflist.
//!
//! Parsing is by hand over a JSON object rather than by `serde` derive, so that
//! every invalid value is reported with the exact field name and what it must be.
//! Fields we do not know are ignored, as the CNI convention expects.

use std::path::PathBuf;

use regex::Regex;
use serde_json::{Map, Value};

use crate::mtu::{Encapsulation, IcvBits, MtuParams, OuterIp};

/// Felix's default `MTUIfacePattern`: the interfaces that carry node traffic.
pub const DEFAULT_MTU_IFACE_PATTERN: &str = r"^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)";
/// Where Calico writes the node name it registered with.
pub const DEFAULT_NODENAME_FILE: &str = "/var/lib/calico/nodename";
/// Default log file, beside Calico's own CNI log.
pub const DEFAULT_LOG_FILE: &str = "/var/log/calico/cni/calico-ipsec.log";
/// Default directory for per-attachment state (MTU backups).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/calico-ipsec";
/// Default key-encryption-key file, delivered from a Kubernetes Secret.
pub const DEFAULT_KEK_FILE: &str = "/etc/cni/net.d/calico-ipsec/kek";
/// Where this node's epoch private keys live: tmpfs, never a disk.
pub const DEFAULT_AGREEMENT_DIR: &str = "/run/calico-ipsec/agreement";
/// Smallest underlay MTU accepted in `ext_mtu` (the IPv4 minimum reassembly size).
pub const MIN_EXT_MTU: u32 = 576;
/// Largest underlay MTU accepted in `ext_mtu`.
pub const MAX_EXT_MTU: u32 = 65535;

/// Why a configuration is invalid; always names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A field has the wrong JSON type or an out-of-range value.
    #[error("field \"{field}\" {problem}")]
    Invalid {
        /// The conflist field name.
        field: &'static str,
        /// What is wrong and what it must be.
        problem: String,
    },
}

impl ConfigError {
    /// The conflist field this error is about.
    pub fn field(&self) -> &'static str {
        match self {
            ConfigError::Invalid { field, .. } => field,
        }
    }
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// Log verbosity, named as in Calico's `log_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// The default.
    Info,
    /// Everything, for troubleshooting.
    Debug,
}

/// Default bound on connecting to etcd and on each request.
pub const DEFAULT_ETCD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// etcd connection settings, with Calico's field names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EtcdConfig {
    /// Endpoints from the comma-separated `etcd_endpoints`.
    pub endpoints: Vec<String>,
    /// `etcd_key_file`: the client key for TLS.
    pub key_file: Option<PathBuf>,
    /// `etcd_cert_file`: the client certificate for TLS.
    pub cert_file: Option<PathBuf>,
    /// `etcd_ca_cert_file`: the CA that signed etcd's server certificate.
    pub ca_cert_file: Option<PathBuf>,
}

/// A regular expression checked when the config is parsed and compiled on
/// first use: compiling costs far more than checking, and most ADDs (an
/// `ext_mtu` given) never use it.
#[derive(Debug, Clone)]
pub struct IfacePattern {
    source: String,
    compiled: std::sync::OnceLock<Regex>,
}

impl IfacePattern {
    /// Checks `pattern`'s syntax. The default needs no check (a unit test
    /// parses it), which keeps the regex parser out of the usual ADD.
    pub fn new(pattern: &str) -> Result<Self, Box<regex_syntax::Error>> {
        if pattern != DEFAULT_MTU_IFACE_PATTERN {
            regex_syntax::Parser::new()
                .parse(pattern)
                .map_err(Box::new)?;
        }
        Ok(Self {
            source: pattern.to_string(),
            compiled: std::sync::OnceLock::new(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl std::ops::Deref for IfacePattern {
    type Target = Regex;

    fn deref(&self) -> &Regex {
        self.compiled.get_or_init(|| {
            Regex::new(&self.source).unwrap_or_else(|e| {
                // Only a size limit can fail here (the syntax was checked):
                // then no interface matches, and detection says so.
                tracing::warn!(pattern = %self.source, error = %e, "mtu_iface_pattern does not compile; matching nothing");
                Regex::new("[^\\s\\S]").unwrap_or_else(|_| unreachable!("a constant pattern"))
            })
        })
    }
}

/// The validated configuration of our conflist entry.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// etcd access, shared with Calico's entry.
    pub etcd: EtcdConfig,
    /// `nodename`: overrides the node name file.
    pub nodename: Option<String>,
    /// `nodename_file`: where Calico wrote the node name.
    pub nodename_file: PathBuf,
    /// `kek_file`: the key-encryption key.
    pub kek_file: PathBuf,
    /// `log_file_path`: our log file; never stdout.
    pub log_file: PathBuf,
    /// `log_level`.
    pub log_level: LogLevel,
    /// `log_file_max_size` (MiB) and `log_file_max_count`, as Calico's plugin
    /// names them: when the log reaches the size, it becomes `<file>.1` and
    /// older ones shift up to the count.
    pub log_rotation: LogRotation,
    /// `state_dir`: per-attachment MTU backups, and under `node/` the node
    /// lock, the incarnation ledger, the convergence record, the guard's
    /// record and the etcd member hint.
    pub state_dir: PathBuf,
    /// `agreement_dir`: this node's private keys of the epochs with key
    /// agreement, one 0600 file each; it must be on tmpfs (`/run`).
    pub agreement_dir: PathBuf,
    /// `encapsulation`, `icv_bits`, `outer_ip` and `udp_encap`: what the MTU bound depends on.
    pub mtu: MtuParams,
    /// `ext_mtu`: the underlay MTU; detected when absent.
    pub ext_mtu: Option<u32>,
    /// `mtu_iface_pattern`: which interfaces carry node traffic, for detection.
    pub mtu_iface_pattern: IfacePattern,
    /// `etcd_timeout_ms`: bound on connecting to etcd and on each request.
    pub etcd_timeout: std::time::Duration,
    /// `allow_non_fips_kernel`: lets the FIPS build run on a kernel that is
    /// not in FIPS mode (ignored by the standard build).
    pub allow_non_fips_kernel: bool,
}

/// When the plugin's log file is rotated, and how many old ones are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRotation {
    /// The size, in MiB, at which the file is rotated.
    pub max_mib: u64,
    /// How many rotated files are kept (`<file>.1` is the newest).
    pub keep: u64,
}

impl LogRotation {
    /// Calico's defaults: 100 MiB, 10 files.
    pub const DEFAULT: LogRotation = LogRotation {
        max_mib: 100,
        keep: 10,
    };
}

/// Typed, field-naming access to a JSON object.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, field: &'static str) -> Option<&'a Value> {
        match self.0.get(field) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    fn string(&self, field: &'static str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(invalid(
                field,
                format!("must be a string, not {}", json_kind(other)),
            )),
        }
    }

    fn nonempty_string(&self, field: &'static str) -> Result<Option<&'a str>, ConfigError> {
        match self.string(field)? {
            Some("") => Err(invalid(field, "must not be empty")),
            other => Ok(other),
        }
    }

    fn path(&self, field: &'static str) -> Result<Option<PathBuf>, ConfigError> {
        match self.nonempty_string(field)? {
            None => Ok(None),
            Some(s) if !s.starts_with('/') => Err(invalid(
                field,
                format!("must be an absolute path, not {s:?}"),
            )),
            Some(s) if s.contains('\0') => Err(invalid(field, "must not contain a NUL byte")),
            Some(s) => Ok(Some(PathBuf::from(s))),
        }
    }

    fn uint(&self, field: &'static str) -> Result<Option<u64>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| invalid(field, format!("must be a whole number >= 0, not {n}"))),
            Some(other) => Err(invalid(
                field,
                format!("must be a number, not {}", json_kind(other)),
            )),
        }
    }

    /// A whole number within `range`, in `unit`.
    fn uint_within(
        &self,
        field: &'static str,
        range: std::ops::RangeInclusive<u64>,
        unit: &str,
    ) -> Result<Option<u64>, ConfigError> {
        match self.uint(field)? {
            Some(n) if !range.contains(&n) => Err(invalid(
                field,
                format!(
                    "must be between {} and {} {unit}, not {n}",
                    range.start(),
                    range.end()
                ),
            )),
            n => Ok(n),
        }
    }

    fn boolean(&self, field: &'static str) -> Result<Option<bool>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(invalid(
                field,
                format!("must be true or false, not {}", json_kind(other)),
            )),
        }
    }
}

/// A short name for a JSON value's type, for error messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl PluginConfig {
    /// Validates our conflist entry (the whole plugin config object).
    pub fn from_json(obj: &Map<String, Value>) -> Result<Self, ConfigError> {
        let f = Fields(obj);

        let endpoints = match f.nonempty_string("etcd_endpoints")? {
            None => Vec::new(),
            Some(s) => parse_endpoints(s)?,
        };
        let etcd = EtcdConfig {
            endpoints,
            key_file: f.path("etcd_key_file")?,
            cert_file: f.path("etcd_cert_file")?,
            ca_cert_file: f.path("etcd_ca_cert_file")?,
        };
        if etcd.key_file.is_some() != etcd.cert_file.is_some() {
            let field = if etcd.key_file.is_some() {
                "etcd_cert_file"
            } else {
                "etcd_key_file"
            };
            return Err(invalid(
                field,
                "must be set together with its pair: TLS client auth needs both etcd_cert_file and etcd_key_file",
            ));
        }

        let nodename = match f.nonempty_string("nodename")? {
            Some(n) => Some(validate_nodename(n)?),
            None => None,
        };

        let log_level = match f.string("log_level")? {
            None => LogLevel::Info,
            Some(s) => parse_log_level(s)?,
        };

        let encapsulation = match f.string("encapsulation")? {
            None => Encapsulation::Ipip,
            Some(s) => Encapsulation::parse(s).ok_or_else(|| {
                invalid(
                    "encapsulation",
                    format!("must be \"ipip\" or \"vxlan\", not {s:?}"),
                )
            })?,
        };
        let icv = match f.uint("icv_bits")? {
            None => IcvBits::B128,
            Some(n) => IcvBits::from_bits(n)
                .ok_or_else(|| invalid("icv_bits", format!("must be 64, 96 or 128, not {n}")))?,
        };
        let outer = match f.string("outer_ip")? {
            None => OuterIp::V4,
            Some(s) => OuterIp::parse(s).ok_or_else(|| {
                invalid(
                    "outer_ip",
                    format!("must be \"ipv4\" or \"ipv6\", not {s:?}"),
                )
            })?,
        };
        let udp_encap = f.boolean("udp_encap")?.unwrap_or(false);

        let ext_mtu = match f.uint("ext_mtu")? {
            None | Some(0) => None,
            Some(n) if (MIN_EXT_MTU as u64..=MAX_EXT_MTU as u64).contains(&n) => Some(n as u32),
            Some(n) => {
                return Err(invalid(
                    "ext_mtu",
                    format!(
                    "must be between {MIN_EXT_MTU} and {MAX_EXT_MTU} (or 0 to detect it), not {n}"
                ),
                ))
            }
        };
        let mtu = MtuParams {
            encapsulation,
            icv,
            outer,
            udp_encap,
        };
        if let Some(ext) = ext_mtu {
            if mtu.breakdown(ext).is_none() {
                return Err(invalid(
                    "ext_mtu",
                    format!("{ext} leaves no room for a pod packet after encryption overhead"),
                ));
            }
        }

        let pattern = f
            .nonempty_string("mtu_iface_pattern")?
            .unwrap_or(DEFAULT_MTU_IFACE_PATTERN);
        let mtu_iface_pattern = IfacePattern::new(pattern).map_err(|e| {
            invalid(
                "mtu_iface_pattern",
                format!("is not a valid regular expression: {e}"),
            )
        })?;

        let etcd_timeout = match f.uint("etcd_timeout_ms")? {
            None => DEFAULT_ETCD_TIMEOUT,
            Some(n) if (1..=60_000).contains(&n) => std::time::Duration::from_millis(n),
            Some(n) => {
                return Err(invalid(
                    "etcd_timeout_ms",
                    format!("must be between 1 and 60000 milliseconds, not {n}"),
                ))
            }
        };

        let log_rotation = LogRotation {
            max_mib: f
                .uint_within("log_file_max_size", 1..=10_240, "MiB")?
                .unwrap_or(LogRotation::DEFAULT.max_mib),
            keep: f
                .uint_within("log_file_max_count", 1..=100, "files")?
                .unwrap_or(LogRotation::DEFAULT.keep),
        };

        Ok(PluginConfig {
            allow_non_fips_kernel: f.boolean("allow_non_fips_kernel")?.unwrap_or(false),
            log_rotation,
            etcd_timeout,
            etcd,
            nodename,
            nodename_file: f
                .path("nodename_file")?
                .unwrap_or_else(|| DEFAULT_NODENAME_FILE.into()),
            kek_file: f
                .path("kek_file")?
                .unwrap_or_else(|| DEFAULT_KEK_FILE.into()),
            log_file: f
                .path("log_file_path")?
                .unwrap_or_else(|| DEFAULT_LOG_FILE.into()),
            log_level,
            state_dir: f
                .path("state_dir")?
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            agreement_dir: f
                .path("agreement_dir")?
                .unwrap_or_else(|| DEFAULT_AGREEMENT_DIR.into()),
            mtu,
            ext_mtu,
            mtu_iface_pattern,
        })
    }
}

/// Splits and checks a comma-separated endpoint list, as Calico writes it.
pub fn parse_endpoints(s: &str) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for raw in s.split(',') {
        let ep = raw.trim();
        if ep.is_empty() {
            continue;
        }
        let rest = ep
            .strip_prefix("http://")
            .or_else(|| ep.strip_prefix("https://"))
            .ok_or_else(|| {
                invalid(
                    "etcd_endpoints",
                    format!("entry {ep:?} must start with http:// or https://"),
                )
            })?;
        if rest.is_empty() || rest.contains(char::is_whitespace) {
            return Err(invalid(
                "etcd_endpoints",
                format!("entry {ep:?} has no valid host"),
            ));
        }
        out.push(ep.to_string());
    }
    if out.is_empty() {
        return Err(invalid(
            "etcd_endpoints",
            "must list at least one endpoint, e.g. \"https://10.0.0.5:2379\"",
        ));
    }
    Ok(out)
}

/// Why this node's name is unknown.
#[derive(Debug, thiserror::Error)]
pub enum NodenameError {
    /// The node name file could not be read.
    #[error("cannot read the node name from {path} ({source}); set \"nodename\" in the calico-ipsec conflist entry, or check that calico-node is running on this node")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file holds something that is not a node name.
    #[error("{path} does not hold a valid node name: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl PluginConfig {
    /// This node's name: `nodename` if set, else Calico's node name file.
    pub fn node_name(&self) -> Result<String, NodenameError> {
        if let Some(n) = &self.nodename {
            return Ok(n.clone());
        }
        read_nodename_file(&self.nodename_file)
    }
}

/// Reads and validates Calico's nodename file.
pub fn read_nodename_file(path: &std::path::Path) -> Result<String, NodenameError> {
    let text = std::fs::read_to_string(path).map_err(|source| NodenameError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    validate_nodename(text.trim()).map_err(|e| NodenameError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Parses Calico's `log_level` names (case-insensitive).
pub fn parse_log_level(s: &str) -> Result<LogLevel, ConfigError> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "error" | "fatal" | "panic" => LogLevel::Error,
        "warn" | "warning" => LogLevel::Warn,
        "info" => LogLevel::Info,
        "debug" | "trace" => LogLevel::Debug,
        _ => {
            return Err(invalid(
                "log_level",
                format!("must be one of error, warning, info, debug; not {s:?}"),
            ))
        }
    })
}

/// Checks a Kubernetes node name: a DNS subdomain (lowercase, digits, '-', '.').
pub fn validate_nodename(n: &str) -> Result<String, ConfigError> {
    let ok = n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !n.starts_with(['-', '.'])
        && !n.ends_with(['-', '.']);
    if ok {
        Ok(n.to_string())
    } else {
        Err(invalid(
            "nodename",
            format!("{n:?} is not a valid Kubernetes node name (lowercase letters, digits, '-' and '.')"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<PluginConfig, ConfigError> {
        PluginConfig::from_json(v.as_object().expect("test config is an object"))
    }

    #[test]
    fn defaults_when_fields_are_absent() {
        let c = parse(json!({"type": "calico-ipsec"})).expect("empty config is valid");
        assert_eq!(c.mtu.encapsulation, Encapsulation::Ipip);
        assert_eq!(c.mtu.icv, IcvBits::B128);
        assert_eq!(c.ext_mtu, None);
        assert_eq!(c.log_file, PathBuf::from(DEFAULT_LOG_FILE));
        assert!(c.mtu_iface_pattern.is_match("eth0"));
        assert!(c.mtu_iface_pattern.is_match("ens3"));
        assert!(!c.mtu_iface_pattern.is_match("tunl0"));
        assert!(!c.mtu_iface_pattern.is_match("cali5f2a9c03d41"));
    }

    #[test]
    fn the_default_pattern_parses() {
        // IfacePattern::new skips the check for the default: it must hold here.
        regex_syntax::Parser::new()
            .parse(DEFAULT_MTU_IFACE_PATTERN)
            .expect("the default mtu_iface_pattern is valid");
    }

    #[test]
    fn calico_fixture_entry_is_accepted() {
        let list: Value = serde_json::from_str(include_str!(
            "../tests/fixtures/calico/10-calico-with-ipsec.conflist"
        ))
        .expect("fixture parses");
        let entry = list["plugins"][1].as_object().expect("entry");
        let c = PluginConfig::from_json(entry).expect("fixture entry is valid");
        assert_eq!(c.etcd.endpoints, vec!["https://10.0.0.5:2379".to_string()]);
        assert_eq!(
            c.etcd.ca_cert_file.as_deref(),
            Some(std::path::Path::new("/etc/cni/net.d/calico-tls/etcd-ca"))
        );
    }

    #[test]
    fn each_invalid_value_names_its_field() {
        let cases = [
            (json!({"icv_bits": 100}), "icv_bits"),
            (json!({"icv_bits": "128"}), "icv_bits"),
            (json!({"encapsulation": "gre"}), "encapsulation"),
            (json!({"outer_ip": "ipv5"}), "outer_ip"),
            (json!({"ext_mtu": 100}), "ext_mtu"),
            (json!({"ext_mtu": -1}), "ext_mtu"),
            (json!({"ext_mtu": 1500.5}), "ext_mtu"),
            (json!({"ext_mtu": 70000}), "ext_mtu"),
            (json!({"mtu_iface_pattern": "(["}), "mtu_iface_pattern"),
            (json!({"log_level": "loud"}), "log_level"),
            (json!({"log_file_path": "relative.log"}), "log_file_path"),
            (json!({"etcd_endpoints": "10.0.0.5:2379"}), "etcd_endpoints"),
            (json!({"etcd_endpoints": " , "}), "etcd_endpoints"),
            (json!({"etcd_endpoints": 5}), "etcd_endpoints"),
            (json!({"etcd_key_file": "/k"}), "etcd_cert_file"),
            (json!({"udp_encap": "yes"}), "udp_encap"),
            (json!({"nodename": "Node_1"}), "nodename"),
            (json!({"state_dir": ""}), "state_dir"),
        ];
        for (cfg, field) in cases {
            let err = parse(cfg.clone()).expect_err(&format!("{cfg} must be rejected"));
            assert_eq!(err.field(), field, "{cfg}");
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn node_name_from_config_or_calico_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("nodename");
        let c = parse(json!({"nodename_file": file})).expect("valid");
        assert!(matches!(
            c.node_name(),
            Err(NodenameError::Unreadable { .. })
        ));
        std::fs::write(&file, "node-7\n").expect("write");
        assert_eq!(c.node_name().expect("name"), "node-7");
        std::fs::write(&file, "Not/A/Name").expect("write");
        assert!(matches!(c.node_name(), Err(NodenameError::Invalid { .. })));
        let c = parse(json!({"nodename": "node-2", "nodename_file": file})).expect("valid");
        assert_eq!(c.node_name().expect("name"), "node-2");
    }

    #[test]
    fn endpoints_split_like_calico() {
        let c = parse(json!({"etcd_endpoints": "https://a:2379, https://b:2379,"})).expect("valid");
        assert_eq!(c.etcd.endpoints, vec!["https://a:2379", "https://b:2379"]);
    }
}
