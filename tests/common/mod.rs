//! Test harness: real network namespaces, and a CNI client that follows
//! libcni's invoke semantics (containerd's and CRI-O's client library).
//!
//! What libcni does, and so what `Chain` does:
//! - each plugin's config is its conflist entry with the list's `name` and
//!   `cniVersion` injected, plus `prevResult` where the verb has one;
//! - ADD runs the plugins in order, each getting the previous one's result;
//!   the last result is cached for CHECK and DEL;
//! - CHECK runs them in order, and DEL in reverse order, each with the cached
//!   result as `prevResult`;
//! - GC (1.1.0) injects `cni.dev/valid-attachments`; STATUS runs each plugin;
//! - a plugin is found by `type` in `CNI_PATH`, run with `CNI_*` variables and
//!   the config on stdin; a non-zero exit means stdout holds a CNI error.
//!
//! The plugins run inside a "node" namespace (entered between fork and exec), so tests never
//! touch the machine's own interfaces. These tests need root; off root they
//! fail with that reason rather than skip.

#![allow(dead_code)]

pub mod chain;
pub mod cluster;
pub mod etcd;
pub mod probe;

#[allow(unused_imports)]
pub use chain::{exec_in, Chain, Exec, NodeNs, DEBIAN_CNI_DIR};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{json, Value};

/// Our binary, built by cargo for the tests.
pub const PLUGIN: &str = env!("CARGO_BIN_EXE_calico-ipsec");

/// Fails the test with a clear reason unless running as root with the tools present.
pub fn require_root() {
    let uid = unsafe_free_uid();
    assert_eq!(
        uid, 0,
        "these tests create network namespaces and need root (CI runs them as root); run `sudo -E cargo test`"
    );
    assert!(
        Path::new(DEBIAN_CNI_DIR).join("ptp").exists(),
        "Debian's containernetworking-plugins is not installed (apt-get install containernetworking-plugins)"
    );
}

fn unsafe_free_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .expect("Uid line")
}

/// Runs a command and panics with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique short name for this process and test.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    /// Name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Creates a namespace with loopback up.
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// The namespace's path, as a runtime passes it in CNI_NETNS.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NS ARGS...`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// The MTU of `ifname` in this namespace, read with `ip -j link`.
    pub fn mtu(&self, ifname: &str) -> u32 {
        let out = self.ip(&["-j", "link", "show", "dev", ifname]);
        let v: Value = serde_json::from_str(&out).expect("ip -j output");
        v[0]["mtu"].as_u64().expect("mtu field") as u32
    }

    /// Moves the calling thread into this namespace: everything it starts
    /// afterwards (processes, threads, sockets) lives there.
    pub fn enter(&self) {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(self.path()).expect("open netns");
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// Whether `ifname` exists here.
    pub fn has_link(&self, ifname: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", ifname])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl NodeNs for Netns {
    fn ns_name(&self) -> &str {
        &self.name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A temporary directory holding the calico-ipsec symlink and a 1.1.0 shim for ptp.
pub fn plugin_dir(tmp: &Path) -> PathBuf {
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    let link = bin.join("calico-ipsec");
    if !link.exists() {
        std::os::unix::fs::symlink(PLUGIN, &link).expect("symlink plugin");
    }
    // Debian's ptp (containernetworking-plugins 1.1.1) predates CNI 1.1.0. The
    // 1.1.0 result schema is identical to 1.0.0's, so this shim relabels the
    // version on the way in and out and runs the real ptp. ptp has no GC or
    // STATUS, so the shim answers those as a plugin with nothing to clean.
    // This is the only stand-in in the chain, and only for 1.1.0.
    let shim = bin.join("ptp110");
    std::fs::write(
        &shim,
        r#"#!/bin/bash
set -uo pipefail
in=$(cat)
case "$CNI_COMMAND" in
  VERSION) echo '{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}'; exit 0;;
  GC|STATUS) exit 0;;
esac
out=$(jq -c '.cniVersion="1.0.0" | .type="ptp" | if .prevResult then .prevResult.cniVersion="1.0.0" else . end' <<<"$in" | /usr/lib/cni/ptp)
rc=$?
if [ -n "$out" ]; then jq -c 'if .cniVersion then .cniVersion="1.1.0" else . end' <<<"$out"; fi
exit $rc
"#,
    )
    .expect("write shim");
    sh(&["chmod", "0755", shim.to_str().expect("utf8 path")]);
    bin
}

/// Our conflist entry for tests, with state and logs in `tmp`.
pub fn ipsec_entry(tmp: &Path, extra: Value) -> Value {
    let mut e = json!({
        "type": "calico-ipsec",
        "log_file_path": tmp.join("calico-ipsec.log"),
        "log_level": "debug",
        "state_dir": tmp.join("state"),
        "nodename": "node-1",
        "ext_mtu": 1500,
    });
    if let (Some(o), Some(x)) = (e.as_object_mut(), extra.as_object()) {
        for (k, v) in x {
            o.insert(k.clone(), v.clone());
        }
    }
    e
}

/// The conflist [ptp + host-local, calico-ipsec] at `version`, standing in
/// for [calico, calico-ipsec]. ptp sets a 1500 MTU like Calico does without
/// encryption headroom.
pub fn ptp_conflist(version: &str, tmp: &Path, ipsec_extra: Value) -> Value {
    let ptp_type = if version == "1.1.0" { "ptp110" } else { "ptp" };
    json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "plugins": [
            {
                "type": ptp_type,
                "mtu": 1500,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.244.135.0/26"}]],
                    "dataDir": tmp.join("ipam"),
                },
            },
            ipsec_entry(tmp, ipsec_extra),
        ]
    })
}

/// Reads a Calico fixture from tests/fixtures/calico.
pub fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/calico/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("fixture JSON")
}
