//! `calico-ipsec converge`: converge this node's XFRM state now, from the
//! calico-ipsec entry of a conflist (the same settings the plugin uses), and
//! print what was done. Useful after a manual change, and for benchmarks.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde_json::Value;

use super::CliError;
use crate::config::{ConfigError, PluginConfig};

/// Arguments of `calico-ipsec converge`.
#[derive(Debug, Args)]
pub struct ConvergeArgs {
    /// A conflist holding a calico-ipsec entry, or that entry alone (JSON).
    #[arg(long, default_value = "/etc/cni/net.d/10-calico.conflist")]
    pub config: PathBuf,
}

/// Reads our entry from a conflist, or a lone entry.
pub fn load_entry(path: &std::path::Path) -> Result<PluginConfig, CliError> {
    let invalid = |reason: String| {
        CliError::Config(ConfigError::Invalid {
            field: "config",
            problem: format!("({}): {reason}", path.display()),
        })
    };
    let text = std::fs::read(path).map_err(|e| invalid(format!("cannot read it: {e}")))?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    let entry = match v.get("plugins").and_then(Value::as_array) {
        Some(plugins) => plugins
            .iter()
            .find(|p| p.get("type").and_then(Value::as_str) == Some("calico-ipsec"))
            .cloned()
            .ok_or_else(|| invalid("no plugin of type calico-ipsec in the conflist".into()))?,
        None => v,
    };
    let obj = entry
        .as_object()
        .ok_or_else(|| invalid("the entry is not a JSON object".into()))?;
    Ok(PluginConfig::from_json(obj)?)
}

/// Runs `calico-ipsec converge`.
pub fn exec(args: &ConvergeArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let cfg = load_entry(&args.config)?;
    let report = crate::converge::converge(&cfg)?;
    super::print_json(out, &report)?;
    Ok(())
}
