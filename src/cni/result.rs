//! prevResult: validated, then passed on untouched apart from version and MTU.
//!
//! The result is kept as a JSON value so that every field we do not know
//! survives byte for byte. Only two things may change on the way out: the
//! `cniVersion` conversion the spec defines (`ips[].version` exists before
//! 1.0.0 only), and the `mtu` of an interface whose MTU we lowered.

use std::net::IpAddr;

use serde_json::{Map, Value};

use super::error::{code, CniError};
use super::version::CniVersion;
use crate::config::json_kind;

fn undecodable(path: &str, problem: impl std::fmt::Display) -> CniError {
    CniError::new(
        code::UNDECODABLE,
        format!("prevResult is malformed: {path} {problem}; the plugin before calico-ipsec in the chain returned a result this plugin cannot read"),
        "",
    )
}

/// Checks the parts of a result the spec defines; unknown fields are allowed.
pub fn validate(prev: &Value) -> Result<(), CniError> {
    let obj = prev.as_object().ok_or_else(|| {
        undecodable(
            "prevResult",
            format!("is {}, not an object", json_kind(prev)),
        )
    })?;
    let n_ifaces = match obj.get("interfaces") {
        None | Some(Value::Null) => 0,
        Some(Value::Array(ifaces)) => {
            for (i, iface) in ifaces.iter().enumerate() {
                let path = format!("prevResult.interfaces[{i}]");
                let o = iface
                    .as_object()
                    .ok_or_else(|| undecodable(&path, "is not an object"))?;
                expect_string(o, &path, "name", true)?;
                expect_string(o, &path, "sandbox", false)?;
                expect_string(o, &path, "mac", false)?;
                if let Some(m) = o.get("mtu") {
                    if !m.is_u64() {
                        return Err(undecodable(&format!("{path}.mtu"), "is not a whole number"));
                    }
                }
            }
            ifaces.len()
        }
        Some(other) => {
            return Err(undecodable(
                "prevResult.interfaces",
                format!("is {}, not an array", json_kind(other)),
            ))
        }
    };
    match obj.get("ips") {
        None | Some(Value::Null) => {}
        Some(Value::Array(ips)) => {
            for (i, ip) in ips.iter().enumerate() {
                let path = format!("prevResult.ips[{i}]");
                let o = ip
                    .as_object()
                    .ok_or_else(|| undecodable(&path, "is not an object"))?;
                let addr = expect_string(o, &path, "address", true)?.unwrap_or_default();
                parse_cidr(addr).ok_or_else(|| {
                    undecodable(
                        &format!("{path}.address"),
                        format!("{addr:?} is not an address in CIDR form"),
                    )
                })?;
                match o.get("interface") {
                    None | Some(Value::Null) => {}
                    Some(v) => match v.as_u64() {
                        Some(idx) if (idx as usize) < n_ifaces => {}
                        _ => {
                            return Err(undecodable(
                                &format!("{path}.interface"),
                                format!(
                                    "{v} does not index prevResult.interfaces ({n_ifaces} entries)"
                                ),
                            ))
                        }
                    },
                }
            }
        }
        Some(other) => {
            return Err(undecodable(
                "prevResult.ips",
                format!("is {}, not an array", json_kind(other)),
            ))
        }
    }
    Ok(())
}

fn expect_string<'a>(
    o: &'a Map<String, Value>,
    path: &str,
    field: &str,
    required: bool,
) -> Result<Option<&'a str>, CniError> {
    match o.get(field) {
        Some(Value::String(s)) => Ok(Some(s)),
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(undecodable(&format!("{path}.{field}"), "is missing")),
        Some(other) => Err(undecodable(
            &format!("{path}.{field}"),
            format!("is {}, not a string", json_kind(other)),
        )),
    }
}

/// Whether the result carries an IPv6 address (it was validated first).
pub fn has_ipv6(prev: &Value) -> bool {
    prev.get("ips")
        .and_then(Value::as_array)
        .is_some_and(|ips| {
            ips.iter().any(|ip| {
                ip.get("address")
                    .and_then(Value::as_str)
                    .and_then(parse_cidr)
                    .is_some_and(|(a, _)| a.is_ipv6())
            })
        })
}

/// Parses "a.b.c.d/nn" or an IPv6 CIDR; `None` when malformed.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

/// An interface whose MTU we changed, for the `mtu` field of the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtuChange {
    /// Interface name.
    pub name: String,
    /// The sandbox the interface lives in; `None` for the host side.
    pub sandbox: Option<String>,
    /// The MTU it has now.
    pub mtu: u32,
}

/// The result to print: `prev` in `version`, with changed MTUs reflected where
/// the previous plugin reported an MTU.
pub fn render(prev: &Value, version: CniVersion, changes: &[MtuChange]) -> Value {
    let mut out = prev.clone();
    let Some(obj) = out.as_object_mut() else {
        return out;
    };
    let from = obj
        .get("cniVersion")
        .and_then(Value::as_str)
        .and_then(CniVersion::parse);
    if from != Some(version) {
        obj.insert("cniVersion".into(), Value::String(version.as_str().into()));
        if let Some(Value::Array(ips)) = obj.get_mut("ips") {
            for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
                if version.result_has_ip_version() {
                    if !ip.contains_key("version") {
                        let v = ip
                            .get("address")
                            .and_then(Value::as_str)
                            .and_then(parse_cidr)
                            .map(|(a, _)| if a.is_ipv4() { "4" } else { "6" });
                        if let Some(v) = v {
                            ip.insert("version".into(), Value::String(v.into()));
                        }
                    }
                } else {
                    ip.remove("version");
                }
            }
        }
    }
    if let Some(Value::Array(ifaces)) = obj.get_mut("interfaces") {
        for iface in ifaces.iter_mut().filter_map(Value::as_object_mut) {
            if !iface.contains_key("mtu") {
                continue;
            }
            let name = iface.get("name").and_then(Value::as_str);
            let sandbox = iface
                .get("sandbox")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            if let Some(c) = changes
                .iter()
                .find(|c| Some(c.name.as_str()) == name && c.sandbox.as_deref() == sandbox)
            {
                iface.insert("mtu".into(), Value::from(c.mtu));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/tests/fixtures/calico/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).expect("fixture readable");
        serde_json::from_str(&text).expect("fixture is JSON")
    }

    #[test]
    fn calico_fixtures_validate() {
        for f in [
            "result-0.3.1-calico-v3.31.json",
            "result-0.3.1-calico-legacy.json",
            "result-1.0.0-calico.json",
        ] {
            validate(&fixture(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }

    #[test]
    fn same_version_passes_through_unchanged() {
        for f in [
            "result-0.3.1-calico-v3.31.json",
            "result-0.3.1-calico-legacy.json",
        ] {
            let prev = fixture(f);
            assert_eq!(render(&prev, CniVersion::V031, &[]), prev, "{f}");
        }
    }

    #[test]
    fn conversion_adds_or_drops_ip_version() {
        let prev = fixture("result-1.0.0-calico.json");
        let old = render(&prev, CniVersion::V031, &[]);
        assert_eq!(old["cniVersion"], "0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        let back = render(&old, CniVersion::V100, &[]);
        assert_eq!(back, prev);
    }

    #[test]
    fn lowered_mtu_is_reported_only_where_an_mtu_was_reported() {
        let prev = fixture("result-1.0.0-calico.json");
        let sandbox = prev["interfaces"][1]["sandbox"].as_str().map(String::from);
        let changes = [
            MtuChange {
                name: "eth0".into(),
                sandbox,
                mtu: 1446,
            },
            MtuChange {
                name: "cali5f2a9c03d41".into(),
                sandbox: None,
                mtu: 1446,
            },
        ];
        let out = render(&prev, CniVersion::V100, &changes);
        assert_eq!(out["interfaces"][1]["mtu"], 1446);
        // The host veth had no mtu field, and must not gain one.
        assert!(out["interfaces"][0].get("mtu").is_none());
        let mut expect = prev.clone();
        expect["interfaces"][1]["mtu"] = json!(1446);
        assert_eq!(out, expect);
    }

    #[test]
    fn malformed_results_name_the_path() {
        let cases = [
            (json!([]), "prevResult"),
            (json!({"interfaces": {}}), "prevResult.interfaces"),
            (
                json!({"interfaces": [{"mac": "x"}]}),
                "prevResult.interfaces[0].name",
            ),
            (
                json!({"interfaces": [{"name": 3}]}),
                "prevResult.interfaces[0].name",
            ),
            (
                json!({"ips": [{"address": "10.0.0.1"}]}),
                "prevResult.ips[0].address",
            ),
            (
                json!({"ips": [{"address": "10.0.0.1/33"}]}),
                "prevResult.ips[0].address",
            ),
            (
                json!({"interfaces": [{"name": "a"}], "ips": [{"address": "10.0.0.1/32", "interface": 1}]}),
                "prevResult.ips[0].interface",
            ),
        ];
        for (v, path) in cases {
            let e = validate(&v).expect_err(&v.to_string());
            assert_eq!(e.code, code::UNDECODABLE);
            assert!(e.msg.contains(path), "{path}: {}", e.msg);
        }
    }
}
