//! Every error path of the CNI layer, run through the real binary: each case
//! asserts its code, that stdout holds exactly one CNI error object in the
//! requested version, and that the message names what to fix.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

struct Case {
    name: &'static str,
    command: &'static str,
    env: Vec<(&'static str, String)>,
    stdin: Vec<u8>,
    code: u64,
    /// Words the message must contain.
    says: &'static [&'static str],
}

fn base_env(netns: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_CONTAINERID", "abc123".into()),
        ("CNI_NETNS", netns.into()),
        ("CNI_IFNAME", "eth0".into()),
        ("CNI_PATH", "/usr/lib/cni".into()),
    ]
}

fn conf(tmp: &Path, version: &str, extra: Value, prev: bool) -> Vec<u8> {
    let mut c = ipsec_entry(tmp, json!({}));
    c["name"] = json!("k8s-pod-network");
    c["cniVersion"] = json!(version);
    if let (Some(o), Some(x)) = (c.as_object_mut(), extra.as_object()) {
        o.extend(x.clone());
    }
    if prev {
        let mut p = fixture("result-0.3.1-calico-v3.31.json");
        p["cniVersion"] = json!(version);
        c["prevResult"] = p;
    }
    // Allow a test to delete a field by setting it to null in `extra`.
    if let Some(o) = c.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    c.to_string().into_bytes()
}

/// CNI environment variables.
type Env = Vec<(&'static str, String)>;

fn without(mut env: Vec<(&'static str, String)>, key: &str) -> Vec<(&'static str, String)> {
    env.retain(|(k, _)| *k != key);
    env
}

fn with(
    mut env: Vec<(&'static str, String)>,
    key: &'static str,
    v: &str,
) -> Vec<(&'static str, String)> {
    env.retain(|(k, _)| *k != key);
    env.push((key, v.into()));
    env
}

#[test]
fn every_error_path_has_its_code() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    // A real, empty pod namespace: it has no eth0.
    let pod = Netns::new("pod");
    let ns = pod.path().to_string_lossy().into_owned();
    let env = base_env(&ns);
    let good = conf(t, "0.3.1", json!({}), true);

    let cases = vec![
        Case {
            name: "stdin is not JSON",
            command: "ADD",
            env: env.clone(),
            stdin: b"{not json".to_vec(),
            code: 6,
            says: &["not valid JSON"],
        },
        Case {
            name: "stdin is an array",
            command: "ADD",
            env: env.clone(),
            stdin: b"[1,2]".to_vec(),
            code: 6,
            says: &["not a JSON object"],
        },
        Case {
            name: "empty stdin",
            command: "DEL",
            env: env.clone(),
            stdin: Vec::new(),
            code: 6,
            says: &["not valid JSON"],
        },
        Case {
            name: "unknown cniVersion",
            command: "ADD",
            env: env.clone(),
            stdin: conf(t, "9.9.9", json!({}), true),
            code: 1,
            says: &["9.9.9", "0.3.1"],
        },
        Case {
            name: "cniVersion missing",
            command: "ADD",
            env: env.clone(),
            stdin: br#"{"name":"n","type":"calico-ipsec"}"#.to_vec(),
            code: 7,
            says: &["cniVersion"],
        },
        Case {
            name: "cniVersion not a string",
            command: "ADD",
            env: env.clone(),
            stdin: br#"{"cniVersion":1,"name":"n"}"#.to_vec(),
            code: 7,
            says: &["cniVersion"],
        },
        Case {
            name: "name missing",
            command: "ADD",
            env: env.clone(),
            stdin: conf(t, "0.3.1", json!({"name": null}), true),
            code: 7,
            says: &["name"],
        },
        Case {
            name: "ADD without prevResult",
            command: "ADD",
            env: env.clone(),
            stdin: conf(t, "0.3.1", json!({}), false),
            code: 7,
            says: &["prevResult", "after calico"],
        },
        Case {
            name: "CHECK without prevResult",
            command: "CHECK",
            env: env.clone(),
            stdin: conf(t, "1.0.0", json!({}), false),
            code: 7,
            says: &["prevResult"],
        },
        Case {
            name: "malformed prevResult",
            command: "ADD",
            env: env.clone(),
            stdin: {
                let mut c: Value = serde_json::from_slice(&good).expect("json");
                c["prevResult"]["ips"][0]["address"] = json!("10.0.0.1");
                c.to_string().into_bytes()
            },
            code: 6,
            says: &["prevResult.ips[0].address"],
        },
        Case {
            name: "unknown CNI_COMMAND",
            command: "FROB",
            env: env.clone(),
            stdin: good.clone(),
            code: 4,
            says: &["FROB"],
        },
        Case {
            name: "no CNI_CONTAINERID",
            command: "ADD",
            env: without(env.clone(), "CNI_CONTAINERID"),
            stdin: good.clone(),
            code: 4,
            says: &["CNI_CONTAINERID"],
        },
        Case {
            name: "no CNI_NETNS on ADD",
            command: "ADD",
            env: without(env.clone(), "CNI_NETNS"),
            stdin: good.clone(),
            code: 4,
            says: &["CNI_NETNS"],
        },
        Case {
            name: "no CNI_IFNAME",
            command: "ADD",
            env: without(env.clone(), "CNI_IFNAME"),
            stdin: good.clone(),
            code: 4,
            says: &["CNI_IFNAME"],
        },
        Case {
            name: "no CNI_PATH",
            command: "ADD",
            env: without(env.clone(), "CNI_PATH"),
            stdin: good.clone(),
            code: 4,
            says: &["CNI_PATH"],
        },
        Case {
            name: "path in container id",
            command: "ADD",
            env: with(env.clone(), "CNI_CONTAINERID", "../../etc/x"),
            stdin: good.clone(),
            code: 4,
            says: &["CNI_CONTAINERID"],
        },
        Case {
            name: "overlong ifname",
            command: "ADD",
            env: with(env.clone(), "CNI_IFNAME", "eth0123456789abcdef"),
            stdin: good.clone(),
            code: 4,
            says: &["CNI_IFNAME"],
        },
        Case {
            name: "netns does not exist",
            command: "ADD",
            env: with(env.clone(), "CNI_NETNS", "/run/netns/does-not-exist"),
            stdin: good.clone(),
            code: 4,
            says: &["does-not-exist"],
        },
        Case {
            name: "pod interface missing",
            command: "ADD",
            env: env.clone(),
            stdin: good.clone(),
            code: 101,
            says: &["eth0", "after the plugin"],
        },
        Case {
            name: "CHECK before 0.4.0",
            command: "CHECK",
            env: env.clone(),
            stdin: good.clone(),
            code: 1,
            says: &["CHECK", "0.4.0"],
        },
        Case {
            name: "GC before 1.1.0",
            command: "GC",
            env: env.clone(),
            stdin: conf(t, "1.0.0", json!({}), false),
            code: 1,
            says: &["GC", "1.1.0"],
        },
        Case {
            name: "STATUS before 1.1.0",
            command: "STATUS",
            env: env.clone(),
            stdin: conf(t, "1.0.0", json!({}), false),
            code: 1,
            says: &["STATUS", "1.1.0"],
        },
        Case {
            name: "GC with malformed attachments",
            command: "GC",
            env: env.clone(),
            stdin: conf(
                t,
                "1.1.0",
                json!({"cni.dev/valid-attachments": [{"containerID": 5}]}),
                false,
            ),
            code: 7,
            says: &["valid-attachments"],
        },
        Case {
            name: "icv_bits invalid",
            command: "ADD",
            env: env.clone(),
            stdin: conf(t, "0.3.1", json!({"icv_bits": 100}), true),
            code: 7,
            says: &["icv_bits", "64, 96 or 128"],
        },
        Case {
            name: "ext_mtu wrong type",
            command: "ADD",
            env: env.clone(),
            stdin: conf(t, "0.3.1", json!({"ext_mtu": "1500"}), true),
            code: 7,
            says: &["ext_mtu"],
        },
        Case {
            name: "ext_mtu too small",
            command: "ADD",
            env: env.clone(),
            stdin: conf(t, "0.3.1", json!({"ext_mtu": 200}), true),
            code: 7,
            says: &["ext_mtu", "576"],
        },
        Case {
            name: "encapsulation invalid",
            command: "ADD",
            env: env.clone(),
            stdin: conf(t, "0.3.1", json!({"encapsulation": "gre"}), true),
            code: 7,
            says: &["encapsulation"],
        },
        Case {
            name: "log file is the plugin's stdout",
            command: "ADD",
            env: env.clone(),
            stdin: conf(t, "0.3.1", json!({"log_file_path": "/dev/stdout"}), true),
            code: 7,
            says: &["log_file_path", "stdout"],
        },
        Case {
            name: "log file is fd 1 by another name",
            command: "ADD",
            env: env.clone(),
            stdin: conf(
                t,
                "0.3.1",
                json!({"log_file_path": "/proc/self/fd/1"}),
                true,
            ),
            code: 7,
            says: &["log_file_path", "stdout"],
        },
        Case {
            name: "no CNI_CONTAINERID on DEL",
            command: "DEL",
            env: without(env.clone(), "CNI_CONTAINERID"),
            stdin: good.clone(),
            code: 4,
            says: &["CNI_CONTAINERID"],
        },
        Case {
            name: "pattern invalid",
            command: "ADD",
            env: env.clone(),
            stdin: conf(t, "0.3.1", json!({"mtu_iface_pattern": "(["}), true),
            code: 7,
            says: &["mtu_iface_pattern"],
        },
        Case {
            name: "etcd endpoint invalid",
            command: "ADD",
            env: env.clone(),
            stdin: conf(t, "0.3.1", json!({"etcd_endpoints": "10.0.0.5:2379"}), true),
            code: 7,
            says: &["etcd_endpoints", "https://"],
        },
        Case {
            name: "relative log path",
            command: "ADD",
            env: env.clone(),
            stdin: conf(t, "0.3.1", json!({"log_file_path": "x.log"}), true),
            code: 7,
            says: &["log_file_path"],
        },
        Case {
            name: "a pod with an IPv6 address and a bound below 1280",
            command: "ADD",
            env: env.clone(),
            stdin: {
                let mut c: Value =
                    serde_json::from_slice(&conf(t, "0.3.1", json!({"ext_mtu": 1300}), true))
                        .expect("json");
                let ips = c["prevResult"]["ips"].as_array_mut().expect("ips");
                ips.push(json!({"version": "6", "address": "fd00:10:244::5/128", "interface": 1}));
                c.to_string().into_bytes()
            },
            code: 108,
            says: &["1280", "1246", "IPv6"],
        },
        Case {
            name: "no underlay interface",
            command: "ADD",
            env: env.clone(),
            stdin: conf(
                t,
                "0.3.1",
                json!({"ext_mtu": null, "mtu_iface_pattern": "^nomatch$"}),
                true,
            ),
            code: 100,
            says: &["nomatch", "ext_mtu"],
        },
    ];

    let mut failures = Vec::new();
    for case in &cases {
        let env: Vec<(&str, &str)> = case.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        // The plugin runs in a fresh namespace so detection sees no uplink.
        let node = Netns::new("node");
        let out = exec_in(
            &node.name,
            Path::new(PLUGIN),
            case.command,
            "",
            &env,
            &case.stdin,
        );
        let problems = check_error(case, &out);
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {} (stdout: {})",
                case.name,
                problems.join("; "),
                out.stdout
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Nothing was half-applied: no state was written by any failing ADD.
    assert!(
        !t.join("state").exists()
            || std::fs::read_dir(t.join("state"))
                .expect("dir")
                .next()
                .is_none()
    );
}

fn check_error(case: &Case, out: &Exec) -> Vec<String> {
    let mut p = Vec::new();
    if out.ok {
        p.push("exited 0".into());
    }
    let Some(j) = &out.json else {
        p.push("stdout is not one JSON object".into());
        return p;
    };
    if out.stdout.trim().lines().count() != 1 {
        p.push("stdout has more than the error object".into());
    }
    if j["code"].as_u64() != Some(case.code) {
        p.push(format!("code {} want {}", j["code"], case.code));
    }
    let msg = j["msg"].as_str().unwrap_or_default();
    for word in case.says {
        if !msg.contains(word) && !j["details"].as_str().unwrap_or_default().contains(word) {
            p.push(format!("message lacks {word:?}: {msg}"));
        }
    }
    if !j["cniVersion"].is_string() {
        p.push("error has no cniVersion".into());
    }
    p
}

/// The error object carries the cniVersion the request asked for.
#[test]
fn error_is_in_the_requested_version() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let stdin = conf(tmp.path(), v, json!({}), false);
        let env = base_env("/run/netns/none");
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = exec_in("", Path::new(PLUGIN), "ADD", "", &env, &stdin);
        assert!(!out.ok);
        let j = out.json.expect("error JSON");
        assert_eq!(j["cniVersion"], v);
        assert_eq!(j["code"], 7);
    }
}

/// VERSION answers without any other environment.
#[test]
fn version_needs_nothing_else() {
    let out = exec_in(
        "",
        Path::new(PLUGIN),
        "VERSION",
        "",
        &[],
        br#"{"cniVersion":"1.0.0"}"#,
    );
    assert!(out.ok);
    let j = out.json.expect("JSON");
    assert_eq!(j["cniVersion"], "1.0.0");
    assert_eq!(
        j["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

/// Logs go to log_file_path, never to stdout.
#[test]
fn logs_go_to_the_file() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = tmp.path().join("calico-ipsec.log");
    let stdin = conf(tmp.path(), "0.3.1", json!({"icv_bits": 100}), true);
    let env = base_env("/run/netns/none");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = exec_in("", Path::new(PLUGIN), "ADD", "", &env, &stdin);
    assert_eq!(out.code(), Some(7));
    let text = std::fs::read_to_string(&log).expect("log file written");
    assert!(text.contains("icv_bits"), "log records the failure: {text}");
    assert!(
        !out.stdout.contains("ERROR"),
        "stdout holds only the CNI error"
    );
}

/// libcni stops a DEL at the first plugin that fails, and ours runs first:
/// a DEL with a config it can parse at all succeeds (exit 0, nothing on
/// stdout), logs what is wrong, and still restores from `state_dir`.
#[test]
fn del_with_a_bad_config_succeeds_and_logs_what_is_wrong() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let env = base_env("/run/netns/calico-ipsec-test-gone");
    let backup = t.join("state").join("abc123_eth0.json");
    // (name, environment, stdin, a word the warning must hold)
    let cases: Vec<(&str, Env, Vec<u8>, &str)> = vec![
        (
            "encapsulation invalid",
            env.clone(),
            conf(t, "0.3.1", json!({"encapsulation": "gre"}), false),
            "encapsulation",
        ),
        (
            "two bad fields",
            env.clone(),
            conf(t, "1.0.0", json!({"icv_bits": 100, "ext_mtu": "x"}), false),
            "icv_bits",
        ),
        (
            "unknown cniVersion",
            env.clone(),
            conf(t, "9.9.9", json!({}), false),
            "9.9.9",
        ),
        (
            "no name",
            env.clone(),
            conf(t, "1.0.0", json!({"name": null}), false),
            "name",
        ),
        (
            "malformed prevResult",
            env.clone(),
            {
                let mut c: Value =
                    serde_json::from_slice(&conf(t, "0.4.0", json!({}), true)).expect("json");
                c["prevResult"]["ips"][0]["address"] = json!("10.0.0.1");
                c.to_string().into_bytes()
            },
            "prevResult",
        ),
        (
            "etcd TLS half set",
            env.clone(),
            conf(t, "1.0.0", json!({"etcd_key_file": "/k"}), false),
            "etcd_cert_file",
        ),
        (
            "container id ADD refuses",
            with(env.clone(), "CNI_CONTAINERID", "../../etc/x"),
            conf(t, "1.0.0", json!({}), false),
            "CNI_CONTAINERID",
        ),
    ];
    let log = t.join("calico-ipsec.log");
    for (name, env, stdin, says) in cases {
        // A backup DEL must find (its namespace is gone, so it is just removed).
        std::fs::create_dir_all(t.join("state")).expect("mkdir");
        std::fs::write(
            &backup,
            br#"{"container_id":"abc123","ifname":"eth0","pod_mtu":1500,"host_ifname":null,"host_mtu":null,"bound":1446}"#,
        )
        .expect("backup");
        let before = std::fs::read_to_string(&log).unwrap_or_default().len();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = exec_in("", Path::new(PLUGIN), "DEL", "", &env, &stdin);
        assert!(out.ok, "{name}: DEL failed: {}", out.stdout);
        assert_eq!(out.stdout.trim(), "", "{name}: DEL prints nothing");
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        let new = &logged[before.min(logged.len())..];
        assert!(
            new.contains("WARN") && new.contains(says),
            "{name}: the log does not warn about {says:?}:\n{new}"
        );
        if name == "container id ADD refuses" {
            assert!(backup.exists(), "{name}: an ID ADD refuses touches nothing");
        } else {
            assert!(!backup.exists(), "{name}: DEL still used state_dir");
        }
    }
}
