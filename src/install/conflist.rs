//! Pure edits of a CNI conflist's text: insert, update or remove our entry.
//!
//! The text is edited in place, not re-rendered: every byte outside our own
//! entry (and the separator before it) is kept as it was, whatever the file's
//! indentation, key order or line endings. Our entry is rendered in the
//! file's own style (indent unit, line prefix, newline), so installing and then
//! uninstalling gives back the original bytes.

use serde_json::{Map, Value};

use super::scan::{scan, Layout};
use super::InstallError;
use crate::config::{PluginConfig, DEFAULT_KEK_FILE, DEFAULT_LOG_FILE};

/// Our entry's `type`, which is also the binary's name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "calico-ipsec";
/// Calico's entry's `type`.
pub const CALICO_TYPE: &str = "calico";
/// The etcd fields copied from Calico's entry, in the order we write them.
pub const ETCD_FIELDS: [&str; 4] = [
    "etcd_endpoints",
    "etcd_key_file",
    "etcd_cert_file",
    "etcd_ca_cert_file",
];

/// What `install` should put in our entry besides the copied etcd fields.
#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    /// `kek_file` for our entry; the default path when `None`. An existing
    /// entry keeps its own value unless this is set.
    pub kek_file: Option<String>,
    /// The entry to put back when the file holds none of ours (the agent's
    /// last-seen entry, after Calico rewrote the file); Calico's etcd fields
    /// are still copied into it.
    pub restore: Option<Map<String, Value>>,
}

/// The result of planning an edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// The file already says what it should; nothing to write.
    Unchanged,
    /// The new text of the file.
    Changed(String),
}

/// The parsed document and its layout.
struct Doc<'a> {
    text: &'a str,
    plugins: Vec<Value>,
    layout: Layout,
}

impl<'a> Doc<'a> {
    fn parse(text: &'a str) -> Result<Self, InstallError> {
        let value: Value = serde_json::from_str(text).map_err(|e| InstallError::Malformed {
            reason: e.to_string(),
        })?;
        let plugins = match value.get("plugins") {
            Some(Value::Array(p)) => p.clone(),
            Some(_) => {
                return Err(InstallError::NotAConflist {
                    reason: "\"plugins\" is not an array".into(),
                })
            }
            None => {
                return Err(InstallError::NotAConflist {
                    reason: "it has no \"plugins\" array (a single-plugin .conf cannot be chained)"
                        .into(),
                })
            }
        };
        if plugins.iter().any(|p| !p.is_object()) {
            return Err(InstallError::NotAConflist {
                reason: "an element of \"plugins\" is not an object".into(),
            });
        }
        let layout = scan(text).ok_or_else(|| InstallError::NotAConflist {
            reason: "cannot locate one \"plugins\" array in the text (is the key given twice?)"
                .into(),
        })?;
        if layout.elements.len() != plugins.len() {
            return Err(InstallError::Internal {
                reason: "the scanned \"plugins\" array does not match the parsed one".into(),
            });
        }
        Ok(Doc {
            text,
            plugins,
            layout,
        })
    }

    fn indices(&self, ty: &str) -> Vec<usize> {
        self.plugins
            .iter()
            .enumerate()
            .filter(|(_, p)| p.get("type").and_then(Value::as_str) == Some(ty))
            .map(|(i, _)| i)
            .collect()
    }

    /// The separator (comma and whitespace) this file puts between elements.
    fn separator(&self) -> String {
        let e = &self.layout.elements;
        if e.len() >= 2 {
            self.text[e[0].end..e[1].start].to_string()
        } else if let Some(first) = e.first() {
            format!(",{}", &self.text[self.layout.open + 1..first.start])
        } else {
            ",".to_string()
        }
    }

    /// Renders `entry` in this file's style, to stand where element `like` stands.
    fn render(&self, entry: &Value, like: usize) -> String {
        let sep = self.separator();
        let newline = if sep.contains("\r\n") { "\r\n" } else { "\n" };
        let Some(nl) = sep.rfind('\n') else {
            return compact(entry);
        };
        let prefix = &sep[nl + 1..];
        let unit = self.indent_unit(like, prefix);
        let mut buf = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(unit.as_bytes());
        let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
        if serde::Serialize::serialize(entry, &mut ser).is_err() {
            return compact(entry);
        }
        let pretty = String::from_utf8_lossy(&buf);
        pretty
            .split('\n')
            .collect::<Vec<_>>()
            .join(&format!("{newline}{prefix}"))
    }

    /// The indent unit, read from how element `like` indents its first field.
    fn indent_unit(&self, like: usize, prefix: &str) -> String {
        let fallback = || {
            if prefix.is_empty() {
                "  ".to_string()
            } else {
                prefix[..prefix.len().div_ceil(2)].to_string()
            }
        };
        let Some(range) = self.layout.elements.get(like) else {
            return fallback();
        };
        let body = &self.text[range.clone()];
        let Some(nl) = body.find('\n') else {
            return fallback();
        };
        let line = &body[nl + 1..];
        let ws_len = line
            .bytes()
            .take_while(|b| *b == b' ' || *b == b'\t')
            .count();
        let ws = &line[..ws_len];
        match ws.strip_prefix(prefix) {
            Some(unit) if !unit.is_empty() => unit.to_string(),
            _ => fallback(),
        }
    }

    /// Text with element `i` replaced by `with`.
    fn replace(&self, i: usize, with: &str) -> String {
        let r = &self.layout.elements[i];
        format!("{}{}{}", &self.text[..r.start], with, &self.text[r.end..])
    }

    /// Text with `entry` inserted directly after element `after`.
    fn insert_after(&self, after: usize, entry: &Value) -> String {
        let rendered = self.render(entry, after);
        let at = self.layout.elements[after].end;
        format!(
            "{}{}{}{}",
            &self.text[..at],
            self.separator(),
            rendered,
            &self.text[at..]
        )
    }

    /// Text with element `i` and the separator before it (or after it, for the first) removed.
    fn remove(&self, i: usize) -> String {
        let e = &self.layout.elements;
        let cut = if i > 0 {
            e[i - 1].end..e[i].end
        } else if e.len() > 1 {
            e[0].start..e[1].start
        } else {
            e[0].clone()
        };
        format!("{}{}", &self.text[..cut.start], &self.text[cut.end..])
    }
}

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Checks Calico's entry: the etcd datastore, and etcd fields we can use.
pub fn check_calico_entry(calico: &Map<String, Value>) -> Result<(), InstallError> {
    match calico.get("datastore_type").and_then(Value::as_str) {
        Some("kubernetes") => return Err(InstallError::KubernetesDatastore),
        Some("etcdv3") | Some("") | None => {}
        Some(other) => {
            return Err(InstallError::UnknownDatastore {
                datastore: other.to_string(),
            })
        }
    }
    let endpoints = calico.get("etcd_endpoints").and_then(Value::as_str);
    if endpoints.map(str::trim).unwrap_or("").is_empty() {
        return Err(if calico.contains_key("etcd_discovery_srv") {
            InstallError::DiscoverySrv
        } else {
            InstallError::NoEtcdEndpoints
        });
    }
    Ok(())
}

/// Our entry as it should be: `existing` (if any) with the etcd fields copied from Calico's.
pub fn desired_entry(
    calico: &Map<String, Value>,
    existing: Option<&Map<String, Value>>,
    opts: &InstallOptions,
) -> Map<String, Value> {
    let mut entry = match existing {
        Some(e) => e.clone(),
        None => {
            let mut e = Map::new();
            e.insert("type".into(), Value::String(PLUGIN_TYPE.into()));
            e.insert(
                "log_file_path".into(),
                Value::String(DEFAULT_LOG_FILE.into()),
            );
            e
        }
    };
    for field in ETCD_FIELDS {
        match calico.get(field) {
            Some(v) if !v.is_null() => {
                entry.insert(field.into(), v.clone());
            }
            _ => {
                entry.shift_remove(field);
            }
        }
    }
    match (&opts.kek_file, entry.contains_key("kek_file")) {
        (Some(k), _) => {
            entry.insert("kek_file".into(), Value::String(k.clone()));
        }
        (None, false) => {
            entry.insert("kek_file".into(), Value::String(DEFAULT_KEK_FILE.into()));
        }
        (None, true) => {}
    }
    entry
}

/// Plans `install`: our entry directly after Calico's, with Calico's etcd fields.
pub fn plan_install(text: &str, opts: &InstallOptions) -> Result<Edit, InstallError> {
    let doc = Doc::parse(text)?;
    let calico_at = *doc
        .indices(CALICO_TYPE)
        .first()
        .ok_or(InstallError::NoCalicoEntry)?;
    let calico = doc.plugins[calico_at]
        .as_object()
        .ok_or(InstallError::NoCalicoEntry)?
        .clone();
    check_calico_entry(&calico)?;
    let ours = doc.indices(PLUGIN_TYPE);
    if ours.len() > 1 {
        return Err(InstallError::Duplicate { count: ours.len() });
    }
    let existing = ours
        .first()
        .and_then(|&i| doc.plugins[i].as_object())
        .or(opts.restore.as_ref());
    let want = desired_entry(&calico, existing, opts);
    PluginConfig::from_json(&want).map_err(|e| InstallError::InvalidEntry { source: e })?;
    let want = Value::Object(want);

    let new_text = match ours.first() {
        Some(&i) if i == calico_at + 1 => {
            if doc.plugins[i] == want && same_order(&doc.plugins[i], &want) {
                return Ok(Edit::Unchanged);
            }
            doc.replace(i, &doc.render(&want, i))
        }
        Some(&i) => {
            // In the wrong place: take it out, then put it back after Calico's.
            let removed = doc.remove(i);
            let doc2 = Doc::parse(&removed)?;
            let at = *doc2
                .indices(CALICO_TYPE)
                .first()
                .ok_or(InstallError::NoCalicoEntry)?;
            doc2.insert_after(at, &want)
        }
        None => doc.insert_after(calico_at, &want),
    };

    let mut expected: Vec<Value> = doc
        .plugins
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE))
        .cloned()
        .collect();
    let at = expected
        .iter()
        .position(|p| p.get("type").and_then(Value::as_str) == Some(CALICO_TYPE))
        .ok_or(InstallError::NoCalicoEntry)?;
    expected.insert(at + 1, want);
    verify(&new_text, &expected)?;
    Ok(Edit::Changed(new_text))
}

/// Plans `uninstall`: every entry of ours removed, nothing else touched.
pub fn plan_uninstall(text: &str) -> Result<Edit, InstallError> {
    let doc = Doc::parse(text)?;
    let ours = doc.indices(PLUGIN_TYPE);
    if ours.is_empty() {
        return Ok(Edit::Unchanged);
    }
    let expected: Vec<Value> = doc
        .plugins
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE))
        .cloned()
        .collect();
    let mut current = text.to_string();
    for &i in ours.iter().rev() {
        current = Doc::parse(&current)?.remove(i);
    }
    verify(&current, &expected)?;
    Ok(Edit::Changed(current))
}

/// Whether the conflist text names Calico's plugin.
pub fn has_calico(text: &str) -> Result<bool, InstallError> {
    Ok(!Doc::parse(text)?.indices(CALICO_TYPE).is_empty())
}

/// Whether the conflist text holds our entry.
pub fn has_ours(text: &str) -> Result<bool, InstallError> {
    Ok(!Doc::parse(text)?.indices(PLUGIN_TYPE).is_empty())
}

/// Our entry's `kek_file`, if the conflist holds our entry.
pub fn our_kek_file(text: &str) -> Result<Option<String>, InstallError> {
    let doc = Doc::parse(text)?;
    Ok(doc.indices(PLUGIN_TYPE).first().map(|&i| {
        doc.plugins[i]
            .get("kek_file")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_KEK_FILE)
            .to_string()
    }))
}

/// Our entry, if the conflist holds one.
pub fn our_entry(text: &str) -> Result<Option<Map<String, Value>>, InstallError> {
    let doc = Doc::parse(text)?;
    Ok(doc
        .indices(PLUGIN_TYPE)
        .first()
        .and_then(|&i| doc.plugins[i].as_object().cloned()))
}

/// Calico's entry, if the conflist has one.
pub fn calico_entry(text: &str) -> Result<Option<Map<String, Value>>, InstallError> {
    let doc = Doc::parse(text)?;
    Ok(doc
        .indices(CALICO_TYPE)
        .first()
        .and_then(|&i| doc.plugins[i].as_object().cloned()))
}

fn same_order(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x.keys().eq(y.keys()),
        _ => true,
    }
}

/// Re-parses the edited text and checks it holds exactly the plugins we meant.
fn verify(text: &str, plugins: &[Value]) -> Result<(), InstallError> {
    let v: Value = serde_json::from_str(text).map_err(|e| InstallError::Internal {
        reason: format!("the edited conflist does not parse: {e}"),
    })?;
    match v.get("plugins").and_then(Value::as_array) {
        Some(p) if p.as_slice() == plugins => Ok(()),
        _ => Err(InstallError::Internal {
            reason: "the edited conflist does not hold the expected plugins".into(),
        }),
    }
}

/// WireGuard settings that are on in one FelixConfiguration resource (its JSON value).
pub fn felix_wireguard_fields(value: &[u8]) -> Vec<&'static str> {
    let Ok(v) = serde_json::from_slice::<Value>(value) else {
        return Vec::new();
    };
    ["wireguardEnabled", "wireguardEnabledV6"]
        .into_iter()
        .filter(|f| v["spec"][*f].as_bool() == Some(true))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALICO: &str = include_str!("../../tests/fixtures/calico/10-calico.conflist");
    const WITH_IPSEC: &str =
        include_str!("../../tests/fixtures/calico/10-calico-with-ipsec.conflist");

    fn install(text: &str) -> String {
        match plan_install(text, &InstallOptions::default()).expect("install plans") {
            Edit::Changed(t) => t,
            Edit::Unchanged => text.to_string(),
        }
    }

    fn uninstall(text: &str) -> String {
        match plan_uninstall(text).expect("uninstall plans") {
            Edit::Changed(t) => t,
            Edit::Unchanged => text.to_string(),
        }
    }

    #[test]
    fn fixture_gives_the_expected_shape_byte_for_byte() {
        assert_eq!(install(CALICO), WITH_IPSEC);
        assert_eq!(
            plan_install(WITH_IPSEC, &InstallOptions::default()).expect("plans"),
            Edit::Unchanged
        );
        assert_eq!(uninstall(WITH_IPSEC), CALICO);
        assert_eq!(plan_uninstall(CALICO).expect("plans"), Edit::Unchanged);
    }

    #[test]
    fn other_styles_round_trip_exactly() {
        let styles = [
            // compact, one line
            r#"{"name":"k8s","cniVersion":"1.0.0","plugins":[{"type":"calico","etcd_endpoints":"http://127.0.0.1:2379"},{"type":"bandwidth"}]}"#.to_string(),
            // tabs and CRLF
            "{\r\n\t\"cniVersion\": \"0.3.1\",\r\n\t\"plugins\": [\r\n\t\t{\r\n\t\t\t\"type\": \"calico\",\r\n\t\t\t\"etcd_endpoints\": \"http://127.0.0.1:2379\"\r\n\t\t}\r\n\t]\r\n}\r\n".to_string(),
            // four spaces, calico not first, a trailing newline
            "{\n    \"cniVersion\": \"0.4.0\",\n    \"plugins\": [\n        {\"type\": \"first\"},\n        {\n            \"type\": \"calico\",\n            \"etcd_endpoints\": \"http://127.0.0.1:2379\"\n        },\n        {\"type\": \"portmap\"}\n    ]\n}\n".to_string(),
        ];
        for text in &styles {
            let installed = install(text);
            let v: Value = serde_json::from_str(&installed).expect("valid JSON");
            let plugins = v["plugins"].as_array().expect("plugins");
            let at = plugins
                .iter()
                .position(|p| p["type"] == CALICO_TYPE)
                .expect("calico");
            assert_eq!(plugins[at + 1]["type"], PLUGIN_TYPE, "{installed}");
            assert_eq!(
                plugins[at + 1]["etcd_endpoints"],
                "http://127.0.0.1:2379",
                "{installed}"
            );
            assert_eq!(install(&installed), installed, "idempotent");
            assert_eq!(&uninstall(&installed), text, "round trip of {text:?}");
        }
        // The style of the rendered entry follows the file's.
        assert!(install(&styles[1]).contains("\r\n\t\t\t\"type\": \"calico-ipsec\""));
        assert!(install(&styles[2]).contains("\n            \"type\": \"calico-ipsec\""));
        assert!(!install(&styles[0]).contains('\n'));
    }

    #[test]
    fn stale_etcd_fields_are_updated_and_custom_fields_kept() {
        // Our entry's endpoints are the second occurrence; make them stale and add a field.
        let ours = WITH_IPSEC.rfind("https://10.0.0.5:2379").expect("ours");
        let mut stale2 = WITH_IPSEC.to_string();
        stale2.replace_range(ours..ours + 21, "https://10.9.9.9:2379");
        let stale2 = stale2.replace(
            "\"kek_file\": \"/etc/cni/net.d/calico-ipsec/kek\"",
            "\"kek_file\": \"/etc/cni/net.d/calico-ipsec/kek\",\n   \"ext_mtu\": 9000",
        );
        let fixed = install(&stale2);
        let v: Value = serde_json::from_str(&fixed).expect("JSON");
        assert_eq!(v["plugins"][1]["etcd_endpoints"], "https://10.0.0.5:2379");
        assert_eq!(v["plugins"][1]["ext_mtu"], 9000);
        assert_eq!(fixed.matches("10.9.9.9").count(), 0);
        // Only our entry changed.
        let before: Value = serde_json::from_str(&stale2).expect("JSON");
        assert_eq!(v["plugins"][0], before["plugins"][0]);
        assert_eq!(v["plugins"][2], before["plugins"][2]);
    }

    #[test]
    fn an_entry_in_the_wrong_place_moves_after_calico() {
        let text = r#"{"cniVersion":"0.3.1","plugins":[{"type":"calico-ipsec","ext_mtu":1500},{"type":"calico","etcd_endpoints":"http://127.0.0.1:2379"},{"type":"portmap"}]}"#;
        let v: Value = serde_json::from_str(&install(text)).expect("JSON");
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .map(|p| p["type"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(types, ["calico", "calico-ipsec", "portmap"]);
        assert_eq!(v["plugins"][1]["ext_mtu"], 1500);
    }

    #[test]
    fn refusals_name_the_reason() {
        let kdd = r#"{"plugins":[{"type":"calico","datastore_type":"kubernetes"}]}"#;
        assert!(matches!(
            plan_install(kdd, &InstallOptions::default()),
            Err(InstallError::KubernetesDatastore)
        ));
        let no_etcd = r#"{"plugins":[{"type":"calico"}]}"#;
        assert!(matches!(
            plan_install(no_etcd, &InstallOptions::default()),
            Err(InstallError::NoEtcdEndpoints)
        ));
        let srv = r#"{"plugins":[{"type":"calico","etcd_discovery_srv":"example.com"}]}"#;
        assert!(matches!(
            plan_install(srv, &InstallOptions::default()),
            Err(InstallError::DiscoverySrv)
        ));
        let none = r#"{"plugins":[{"type":"bridge"}]}"#;
        assert!(matches!(
            plan_install(none, &InstallOptions::default()),
            Err(InstallError::NoCalicoEntry)
        ));
        let twice = r#"{"plugins":[{"type":"calico","etcd_endpoints":"http://a:1"},{"type":"calico-ipsec"},{"type":"calico-ipsec"}]}"#;
        assert!(matches!(
            plan_install(twice, &InstallOptions::default()),
            Err(InstallError::Duplicate { count: 2 })
        ));
        for bad in [
            "{",
            "[]",
            r#"{"type":"calico"}"#,
            r#"{"plugins":{}}"#,
            r#"{"plugins":[1]}"#,
        ] {
            assert!(
                plan_install(bad, &InstallOptions::default()).is_err(),
                "{bad}"
            );
        }
        let dup_key = r#"{"plugins":[{"type":"x"}],"plugins":[{"type":"calico","etcd_endpoints":"http://a:1"}]}"#;
        assert!(matches!(
            plan_install(dup_key, &InstallOptions::default()),
            Err(InstallError::NotAConflist { .. })
        ));
        let bad_tls = r#"{"plugins":[{"type":"calico","etcd_endpoints":"https://a:1","etcd_key_file":"/k"}]}"#;
        assert!(matches!(
            plan_install(bad_tls, &InstallOptions::default()),
            Err(InstallError::InvalidEntry { .. })
        ));
    }

    #[test]
    fn uninstall_removes_every_entry_of_ours_and_nothing_else() {
        let text = "{\"plugins\": [\n {\"type\": \"calico-ipsec\"},\n {\"type\": \"calico\"},\n {\"type\": \"calico-ipsec\", \"x\": \"}]\\\"\"}\n]}";
        assert_eq!(
            uninstall(text),
            "{\"plugins\": [\n {\"type\": \"calico\"}\n]}"
        );
        let only = r#"{"plugins":[{"type":"calico-ipsec"}]}"#;
        assert_eq!(uninstall(only), r#"{"plugins":[]}"#);
    }

    #[test]
    fn kek_file_option_and_wireguard_fields() {
        let opts = InstallOptions {
            kek_file: Some("/etc/kek".into()),
            ..InstallOptions::default()
        };
        let Edit::Changed(t) = plan_install(CALICO, &opts).expect("plans") else {
            panic!("must change")
        };
        assert_eq!(
            our_kek_file(&t).expect("parse").as_deref(),
            Some("/etc/kek")
        );
        assert!(
            felix_wireguard_fields(br#"{"spec":{"wireguardEnabled":true}}"#)
                .contains(&"wireguardEnabled")
        );
        assert!(felix_wireguard_fields(br#"{"spec":{"wireguardEnabled":false}}"#).is_empty());
        assert!(felix_wireguard_fields(b"not json").is_empty());
        assert_eq!(
            felix_wireguard_fields(br#"{"spec":{"wireguardEnabledV6":true}}"#),
            ["wireguardEnabledV6"]
        );
    }
}
