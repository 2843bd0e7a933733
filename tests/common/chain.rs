//! A CNI client that follows libcni's invoke semantics, shared by the Rust
//! tests (through `common`) and the VM suites (through the `cni_client`
//! example, which `tests/e2e/lib.sh` calls): one client, not two.
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

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

/// Debian's containernetworking-plugins directory.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// The network namespace (under /run/netns) the plugins run in.
pub trait NodeNs {
    /// Its name; empty: the caller's own namespace.
    fn ns_name(&self) -> &str;
}

impl NodeNs for str {
    fn ns_name(&self) -> &str {
        self
    }
}

impl NodeNs for String {
    fn ns_name(&self) -> &str {
        self
    }
}

/// How a plugin run ended.
#[derive(Debug, Clone)]
pub struct Exec {
    /// The exit status was 0.
    pub ok: bool,
    /// stdout parsed as JSON, if it was JSON (result or error).
    pub json: Option<Value>,
    /// stdout as text.
    pub stdout: String,
}

impl Exec {
    /// The CNI error code, for a failed run.
    pub fn code(&self) -> Option<u64> {
        self.json.as_ref().and_then(|j| j["code"].as_u64())
    }
}

/// Everything a test needs to invoke plugins the way libcni does.
pub struct Chain {
    /// The conflist.
    pub conflist: Value,
    /// Directories searched for plugins, in order.
    pub cni_path: Vec<PathBuf>,
    /// The node namespace the plugins run in.
    pub node: String,
    /// The last result of each plugin during ADD (for assertions).
    pub per_plugin: Vec<Value>,
    /// libcni's cached result of the last ADD.
    pub cached: Option<Value>,
}

impl Chain {
    /// A chain over `conflist`, searching `bin` then Debian's plugin dir.
    pub fn new<N: NodeNs + ?Sized>(conflist: Value, bin: &Path, node: &N) -> Self {
        Chain {
            conflist,
            cni_path: vec![bin.to_path_buf(), PathBuf::from(DEBIAN_CNI_DIR)],
            node: node.ns_name().to_string(),
            per_plugin: Vec::new(),
            cached: None,
        }
    }

    fn version(&self) -> &str {
        self.conflist["cniVersion"]
            .as_str()
            .expect("conflist cniVersion")
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .expect("plugins array")
            .clone()
    }

    fn find(&self, ty: &str) -> PathBuf {
        self.cni_path
            .iter()
            .map(|d| d.join(ty))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("plugin {ty} not found in CNI_PATH"))
    }

    /// libcni's buildOneConfig: inject name, cniVersion and prevResult.
    fn plugin_conf(&self, plugin: &Value, prev: Option<&Value>, extra: &[(&str, Value)]) -> Value {
        let mut conf = plugin.clone();
        let o = conf.as_object_mut().expect("plugin is an object");
        o.insert("name".into(), self.conflist["name"].clone());
        o.insert("cniVersion".into(), json!(self.version()));
        if let Some(p) = prev {
            o.insert("prevResult".into(), p.clone());
        }
        for (k, v) in extra {
            o.insert((*k).into(), v.clone());
        }
        conf
    }

    /// Runs one plugin binary the way libcni's invoke package does.
    pub fn exec(&self, ty: &str, command: &str, env: &[(&str, &str)], conf: &Value) -> Exec {
        let path = self.find(ty);
        let cni_path = self
            .cni_path
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":");
        exec_in(
            &self.node,
            &path,
            command,
            &cni_path,
            env,
            conf.to_string().as_bytes(),
        )
    }

    fn attachment_env<'a>(
        cid: &'a str,
        netns: &'a str,
        ifname: &'a str,
    ) -> Vec<(&'a str, &'a str)> {
        let mut env = vec![("CNI_CONTAINERID", cid), ("CNI_IFNAME", ifname)];
        if !netns.is_empty() {
            env.push(("CNI_NETNS", netns));
        }
        env.push((
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=test",
        ));
        env
    }

    /// ADD through every plugin; the final result, or the first failure.
    pub fn add(&mut self, cid: &str, netns: &Path, ifname: &str) -> Result<Value, Exec> {
        let ns = netns.to_string_lossy().into_owned();
        let env = Self::attachment_env(cid, &ns, ifname);
        let mut prev: Option<Value> = None;
        self.per_plugin.clear();
        for plugin in self.plugins() {
            let conf = self.plugin_conf(&plugin, prev.as_ref(), &[]);
            let ty = plugin["type"].as_str().expect("type");
            let out = self.exec(ty, "ADD", &env, &conf);
            if !out.ok {
                return Err(out);
            }
            let result = out.json.clone().expect("ADD printed a JSON result");
            self.per_plugin.push(result.clone());
            prev = Some(result);
        }
        self.cached = prev.clone();
        Ok(prev.unwrap_or(Value::Null))
    }

    /// CHECK through every plugin with the cached result.
    pub fn check(&self, cid: &str, netns: &Path, ifname: &str) -> Result<(), Exec> {
        let ns = netns.to_string_lossy().into_owned();
        let env = Self::attachment_env(cid, &ns, ifname);
        for plugin in self.plugins() {
            let conf = self.plugin_conf(&plugin, self.cached.as_ref(), &[]);
            let out = self.exec(plugin["type"].as_str().expect("type"), "CHECK", &env, &conf);
            if !out.ok {
                return Err(out);
            }
        }
        Ok(())
    }

    /// DEL through every plugin in reverse, with the cached result if any.
    /// `netns` may be None, as when the runtime already removed the sandbox.
    pub fn del(&self, cid: &str, netns: Option<&Path>, ifname: &str) -> Result<(), Exec> {
        let ns = netns
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let env = Self::attachment_env(cid, &ns, ifname);
        for plugin in self.plugins().iter().rev() {
            let conf = self.plugin_conf(plugin, self.cached.as_ref(), &[]);
            let out = self.exec(plugin["type"].as_str().expect("type"), "DEL", &env, &conf);
            if !out.ok {
                return Err(out);
            }
        }
        Ok(())
    }

    /// GC (1.1.0) with the given valid attachments.
    pub fn gc(&self, valid: &[(&str, &str)]) -> Result<(), Exec> {
        let list: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        for plugin in self.plugins() {
            let conf = self.plugin_conf(
                &plugin,
                None,
                &[("cni.dev/valid-attachments", Value::Array(list.clone()))],
            );
            let out = self.exec(plugin["type"].as_str().expect("type"), "GC", &[], &conf);
            if !out.ok {
                return Err(out);
            }
        }
        Ok(())
    }

    /// STATUS (1.1.0) of every plugin.
    pub fn status(&self) -> Result<(), Exec> {
        for plugin in self.plugins() {
            let conf = self.plugin_conf(&plugin, None, &[]);
            let out = self.exec(plugin["type"].as_str().expect("type"), "STATUS", &[], &conf);
            if !out.ok {
                return Err(out);
            }
        }
        Ok(())
    }
}

/// Runs `plugin` inside namespace `node` (empty: the caller's) with the CNI
/// environment and `stdin`. `CNI_PATH` is always set, as libcni does.
pub fn exec_in(
    node: &str,
    plugin: &Path,
    command: &str,
    cni_path: &str,
    env: &[(&str, &str)],
    stdin: &[u8],
) -> Exec {
    use std::io::Write;
    let mut cmd = Command::new(plugin);
    // Enter the node namespace in the child between fork and exec, so the
    // plugin starts in it as it would start in a node's host namespace.
    let ns_file = (!node.is_empty())
        .then(|| std::fs::File::open(format!("/run/netns/{node}")).expect("open node netns"));
    if let Some(ns) = &ns_file {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = ns.as_raw_fd();
        // SAFETY: setns is async-signal-safe, and `ns_file` keeps the fd open
        // until after the child has been spawned and waited for.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !cni_path.is_empty() {
        cmd.env("CNI_PATH", cni_path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait plugin");
    drop(ns_file);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(stdout.trim()).ok();
    if !out.status.success() {
        eprintln!(
            "{} {command} failed: {stdout} {}",
            plugin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Exec {
        ok: out.status.success(),
        json,
        stdout,
    }
}
