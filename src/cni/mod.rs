//! The CNI protocol: environment, stdin, verbs and the reply.
//!
//! `run` is the whole plugin. It parses and validates everything first, then
//! dispatches to one verb module. Each verb follows parse, validate, act and
//! returns the JSON to print; only `main` prints.

mod add;
mod check;
mod del;
pub mod error;
mod gc;
pub mod result;
mod status;
pub mod version;

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use crate::config::{json_kind, ConfigError, PluginConfig};
pub use error::{code, CniError};
pub use version::CniVersion;

/// The CNI verb from `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach.
    Add,
    /// Detach; must be idempotent.
    Del,
    /// Verify (0.4.0+).
    Check,
    /// Garbage-collect stale attachments (1.1.0+).
    Gc,
    /// Readiness (1.1.0+).
    Status,
    /// Report supported versions.
    Version,
}

impl Command {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Gc => "GC",
            Self::Status => "STATUS",
            Self::Version => "VERSION",
        }
    }
}

/// The validated CNI environment variables.
#[derive(Debug, Clone)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`, validated as a file-name-safe token.
    pub container_id: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`, validated as a Linux interface name.
    pub ifname: Option<String>,
    /// DEL only: why `CNI_CONTAINERID` or `CNI_IFNAME` is one ADD refuses
    /// (so no state can exist for it); both are then `None`.
    pub refused: Option<String>,
}

fn bad_env(msg: String) -> CniError {
    CniError::new(code::BAD_ENVIRONMENT, msg, "")
}

impl Env {
    /// Reads and validates the variables `command` needs.
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let raw = get("CNI_COMMAND").filter(|s| !s.is_empty()).ok_or_else(|| {
            bad_env("CNI_COMMAND is not set; calico-ipsec runs as a CNI plugin only when the container runtime sets it (or run `calico-ipsec --help` for the CLI)".into())
        })?;
        let command = Command::parse(&raw).ok_or_else(|| {
            bad_env(format!(
                "CNI_COMMAND={raw:?} is not a CNI verb; expected ADD, DEL, CHECK, GC, STATUS or VERSION"
            ))
        })?;
        let mut env = Env {
            command,
            container_id: None,
            netns: None,
            ifname: None,
            refused: None,
        };
        if command == Command::Version {
            return Ok(env);
        }
        let need = |name: &str| -> Result<String, CniError> {
            get(name).filter(|s| !s.is_empty()).ok_or_else(|| {
                bad_env(format!(
                    "{name} is required for {} but is not set",
                    command.as_str()
                ))
            })
        };
        need("CNI_PATH")?;
        let per_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        if per_attachment {
            let cid = need("CNI_CONTAINERID")?;
            let ifname = need("CNI_IFNAME")?;
            let refused = if !valid_container_id(&cid) {
                Some(format!(
                    "CNI_CONTAINERID={cid:?} is invalid: it must be letters, digits, '_', '.' and '-' only, starting with a letter or digit"
                ))
            } else if !valid_ifname(&ifname) {
                Some(format!(
                    "CNI_IFNAME={ifname:?} is not a valid interface name (1-15 characters, no '/', ':' or whitespace)"
                ))
            } else {
                None
            };
            match refused {
                // DEL never blocks the chain: nothing of ours can exist here.
                Some(why) if command == Command::Del => env.refused = Some(why),
                Some(why) => return Err(bad_env(why)),
                None => {
                    env.container_id = Some(cid);
                    env.ifname = Some(ifname);
                }
            }
        }
        match command {
            Command::Add | Command::Check => {
                let ns = need("CNI_NETNS")?;
                env.netns = Some(PathBuf::from(ns));
            }
            Command::Del => {
                env.netns = get("CNI_NETNS")
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            }
            _ => {}
        }
        Ok(env)
    }
}

/// A container ID safe to use in a file name: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
pub fn valid_container_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 1024
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// A Linux interface name: 1–15 bytes, no '/', ':' or whitespace, not "." or "..".
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// A fully parsed and validated invocation.
pub struct Request {
    /// The validated environment.
    pub env: Env,
    /// The configuration's cniVersion.
    pub version: CniVersion,
    /// The network name from the conflist.
    pub network: String,
    /// Our validated entry.
    pub config: PluginConfig,
    /// The previous plugin's result, validated.
    pub prev_result: Option<Value>,
    /// The whole stdin object, for verb-specific fields.
    pub raw: Map<String, Value>,
}

impl Request {
    /// `CNI_CONTAINERID`; present for ADD, DEL and CHECK.
    pub fn container_id(&self) -> &str {
        self.env.container_id.as_deref().unwrap_or_default()
    }

    /// `CNI_IFNAME`; present for ADD, DEL and CHECK.
    pub fn ifname(&self) -> &str {
        self.env.ifname.as_deref().unwrap_or_default()
    }

    /// `CNI_NETNS`, which ADD and CHECK require.
    pub fn netns(&self) -> Result<&std::path::Path, CniError> {
        self.env
            .netns
            .as_deref()
            .ok_or_else(|| bad_env("CNI_NETNS is required but is not set".into()))
    }
}

/// The largest pod MTU that fits after encryption, from `ext_mtu` or
/// detection: the smallest over `carriers` (every way this node's pod
/// packets may leave it), or over the conflist's `mtu` settings when there
/// is none (MTU-only, without a datastore).
pub fn encryption_bound(
    config: &PluginConfig,
    carriers: &[crate::mtu::MtuParams],
) -> Result<u32, CniError> {
    let ext = match config.ext_mtu {
        Some(m) => m,
        None => {
            let (mtu, iface) = crate::mtu::detect_ext_mtu(&config.mtu_iface_pattern).map_err(|e| {
                CniError::new(
                    code::NO_UNDERLAY,
                    format!("cannot find the node's underlay MTU: {e}"),
                    "set \"ext_mtu\" in the calico-ipsec conflist entry, or fix \"mtu_iface_pattern\" to match the node's uplink",
                )
            })?;
            tracing::debug!(mtu, iface, "detected underlay MTU");
            mtu
        }
    };
    let own = [config.mtu];
    let params = if carriers.is_empty() {
        &own[..]
    } else {
        carriers
    };
    let bounds: Option<Vec<u32>> = params
        .iter()
        .map(|p| p.breakdown(ext).map(|b| b.pod_mtu))
        .collect();
    bounds.and_then(|b| b.into_iter().min()).ok_or_else(|| {
        CniError::new(
            code::NO_UNDERLAY,
            format!("the underlay MTU {ext} leaves no room for a pod packet after encryption"),
            "",
        )
    })
}

/// Reads the datastore snapshot when etcd is configured; `None` otherwise.
pub fn read_snapshot(
    config: &PluginConfig,
) -> Result<Option<crate::datastore::snapshot::Snapshot>, CniError> {
    if config.etcd.endpoints.is_empty() {
        return Ok(None);
    }
    let settings = crate::converge::settings(config);
    Ok(Some(crate::datastore::snapshot::read_blocking(&settings)?))
}

/// Logs a warning when Calico's IPIP tunnel device allows more than the bound.
pub fn warn_tunnel_above(bound: u32) {
    let tunl0 = crate::link::RouteSocket::open().and_then(|mut s| s.by_name("tunl0"));
    if let Ok(Some(t)) = tunl0 {
        if t.mtu > bound {
            tracing::warn!(tunl0_mtu = t.mtu, bound, "tunl0's MTU is above the encryption bound: host-originated tunnel traffic may fragment; set Felix's ipipMTU to at most the bound");
        }
    }
}

/// What the plugin prints and how it exits.
#[derive(Debug)]
pub enum Outcome {
    /// Exit 0, printing the value if there is one.
    Success(Option<Value>),
    /// Exit 1, printing the error object in `version`.
    Failure {
        /// The cniVersion to write in the error object.
        version: String,
        /// The error.
        error: CniError,
    },
}

impl Outcome {
    /// The JSON for stdout, if any.
    pub fn stdout(&self) -> Option<Value> {
        match self {
            Outcome::Success(v) => v.clone(),
            Outcome::Failure { version, error } => Some(error.to_json(version)),
        }
    }
}

/// Runs one CNI invocation: `get` reads the environment, `stdin` is the config.
pub fn run(get: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    let mut version = CniVersion::LATEST.as_str().to_string();
    match run_inner(get, stdin, &mut version) {
        Ok(v) => Outcome::Success(v),
        Err(error) => {
            tracing::error!(code = error.code, msg = %error.msg, details = %error.details, "CNI request failed");
            Outcome::Failure { version, error }
        }
    }
}

fn run_inner(
    get: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    version_out: &mut String,
) -> Result<Option<Value>, CniError> {
    let env = Env::from_vars(get)?;
    if env.command == Command::Version {
        return Ok(Some(version_reply(stdin)));
    }
    let raw = parse_stdin(stdin)?;
    if let Some(Value::String(v)) = raw.get("cniVersion") {
        *version_out = v.clone();
    }
    crate::logging::init_from_raw(&raw);
    let req = if env.command == Command::Del {
        parse_del_request(env, raw)?
    } else {
        parse_request(env, raw)?
    };
    tracing::debug!(command = req.env.command.as_str(), cni_version = %req.version, container = ?req.env.container_id, "CNI request");
    // The FIPS build handles no key outside FIPS mode; DEL never fails.
    if req.env.command != Command::Del {
        crate::keys::crypto::ready(req.config.allow_non_fips_kernel)
            .map_err(|why| CniError::new(code::KEYS, why, ""))?;
    }
    match req.env.command {
        Command::Add => add::exec(&req).map(Some),
        Command::Del => {
            del::exec(&req);
            Ok(None)
        }
        Command::Check => check::exec(&req).map(|()| None),
        Command::Gc => gc::exec(&req).map(|()| None),
        Command::Status => status::exec(&req).map(|()| None),
        Command::Version => Ok(Some(version_reply(stdin))),
    }
}

/// Validates a whole request: version, verb support, our config and
/// prevResult. It touches neither the kernel nor the disk (beyond a `stat`
/// of `log_file_path`, to refuse our own stdout).
pub fn parse_request(env: Env, raw: Map<String, Value>) -> Result<Request, CniError> {
    let version_str =
        match raw.get("cniVersion") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => return Err(CniError::new(
                code::INVALID_CONFIG,
                "the network configuration has no cniVersion; set \"cniVersion\" in the conflist",
                "",
            )),
            Some(other) => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("cniVersion must be a string, not {}", json_kind(other)),
                    "",
                ))
            }
        };
    let version = CniVersion::parse(&version_str).ok_or_else(|| {
        CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "incompatible CNI versions: the configuration has cniVersion {version_str:?}, calico-ipsec supports {}",
                version::SUPPORTED.join(", ")
            ),
            "",
        )
    })?;
    match env.command {
        Command::Check if !version.has_check() => {
            return Err(verb_too_new("CHECK", "0.4.0", version))
        }
        Command::Gc if !version.has_gc_status() => {
            return Err(verb_too_new("GC", "1.1.0", version))
        }
        Command::Status if !version.has_gc_status() => {
            return Err(verb_too_new("STATUS", "1.1.0", version))
        }
        _ => {}
    }
    let config = PluginConfig::from_json(&raw).map_err(config_error)?;
    if crate::fsutil::is_stdout(&config.log_file) {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "invalid calico-ipsec configuration: log_file_path {} is the plugin's own stdout, which carries the CNI result",
                config.log_file.display()
            ),
            "set \"log_file_path\" of the calico-ipsec entry in the conflist to a file, e.g. /var/log/calico/cni/calico-ipsec.log",
        ));
    }
    let network = match raw.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "the network configuration has no \"name\"; a conflist must name its network",
                "",
            ))
        }
    };
    let prev_result = match raw.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v) => {
            result::validate(v)?;
            Some(v.clone())
        }
    };
    Ok(Request {
        env,
        version,
        network,
        config,
        prev_result,
        raw,
    })
}

/// Parses a DEL request, which never fails: libcni stops a DEL at the first
/// plugin that fails, and ours runs first, so a failure here would leak what
/// every earlier plugin holds (pod IPs). What is invalid is logged and
/// replaced by its default; DEL needs only `state_dir`.
pub fn parse_del_request(env: Env, raw: Map<String, Value>) -> Result<Request, CniError> {
    match parse_request(env.clone(), raw.clone()) {
        Ok(req) => return Ok(req),
        Err(e) => tracing::warn!(
            code = e.code,
            msg = %e.msg,
            "DEL: the network configuration is invalid; deleting anyway, with defaults for what is wrong, so that the chain's other DELs run"
        ),
    }
    let version = raw
        .get("cniVersion")
        .and_then(Value::as_str)
        .and_then(CniVersion::parse)
        .unwrap_or(CniVersion::LATEST);
    // Drop each invalid field in turn (every config error names one).
    let mut fields = raw.clone();
    let config = loop {
        match PluginConfig::from_json(&fields) {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(field = e.field(), error = %e, "DEL: ignoring an invalid field");
                if fields.remove(e.field()).is_none() {
                    // An error about a pair of fields: keep state_dir only.
                    let only: Map<String, Value> = raw
                        .get("state_dir")
                        .map(|v| ("state_dir".to_string(), v.clone()))
                        .into_iter()
                        .collect();
                    break PluginConfig::from_json(&only)
                        .or_else(|_| PluginConfig::from_json(&Map::new()))
                        .map_err(config_error)?;
                }
            }
        }
    };
    let network = raw
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok(Request {
        env,
        version,
        network,
        config,
        prev_result: None,
        raw,
    })
}

/// Parses stdin as the JSON object the spec requires.
pub fn parse_stdin(stdin: &[u8]) -> Result<Map<String, Value>, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::UNDECODABLE,
            "the network configuration on stdin is not valid JSON",
            e.to_string(),
        )
    })?;
    match value {
        Value::Object(m) => Ok(m),
        other => Err(CniError::new(
            code::UNDECODABLE,
            format!(
                "the network configuration on stdin is {}, not a JSON object",
                json_kind(&other)
            ),
            "",
        )),
    }
}

fn verb_too_new(verb: &str, since: &str, have: CniVersion) -> CniError {
    CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!("{verb} needs cniVersion {since} or later, but the configuration has {have}"),
        "",
    )
}

fn config_error(e: ConfigError) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        format!("invalid calico-ipsec configuration: {e}"),
        format!(
            "fix the \"{}\" field of the calico-ipsec entry in the conflist",
            e.field()
        ),
    )
}

fn version_reply(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .filter(|v| CniVersion::parse(v).is_some())
        .unwrap_or_else(|| CniVersion::LATEST.as_str().to_string());
    json!({
        "cniVersion": asked,
        "supportedVersions": version::SUPPORTED,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| owned.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn version_lists_all_supported() {
        let out = run(
            &vars(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"0.3.1"}"#,
        );
        let v = out.stdout().expect("reply");
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }

    #[test]
    fn container_id_and_ifname_rules() {
        assert!(valid_container_id("abc123_x.y-z"));
        assert!(!valid_container_id("../etc"));
        assert!(!valid_container_id("a/b"));
        assert!(!valid_container_id(""));
        assert!(valid_ifname("eth0"));
        assert!(!valid_ifname("a-very-long-ifname"));
        assert!(!valid_ifname("eth/0"));
        assert!(!valid_ifname(".."));
    }
}
