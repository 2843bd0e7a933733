//! The command-line interface (when `CNI_COMMAND` is not set).

pub mod cluster_status;
pub mod converge;
pub mod daemon;
pub mod install;
mod kek_rotation;
pub mod keys;
pub mod mtu;
pub mod status;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{parse_endpoints, ConfigError, EtcdConfig};
use crate::datastore::etcd::{EtcdError, EtcdSettings};
use crate::datastore::ipsec::IpsecStoreError;
use crate::keys::KekError;

/// Why a CLI command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The MTU could not be computed.
    #[error(transparent)]
    Mtu(#[from] mtu::MtuCliError),
    /// An argument is invalid.
    #[error("invalid argument: {0}")]
    Config(#[from] ConfigError),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// Our records failed.
    #[error(transparent)]
    Store(#[from] IpsecStoreError),
    /// The KEK file failed.
    #[error(transparent)]
    Kek(#[from] KekError),
    /// install or uninstall failed.
    #[error(transparent)]
    Install(#[from] crate::install::InstallFileError),
    /// Reading this node's state failed.
    #[error(transparent)]
    Converge(#[from] crate::converge::ConvergeError),
    /// A step refused, with what to do.
    #[error("{0}")]
    Refused(String),
    /// Writing output or starting the runtime failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// calico-ipsec: encrypt Calico pod traffic between nodes with kernel IPsec (ESP, AES-GCM).
///
/// Installed in /opt/cni/bin it runs as a chained CNI plugin after `calico`
/// whenever CNI_COMMAND is set; otherwise it is this command-line tool.
#[derive(Debug, Parser)]
#[command(name = "calico-ipsec", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The CLI's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the largest pod MTU that fits the underlay after encryption.
    Mtu(mtu::MtuArgs),
    /// Manage key epochs in etcd: init, rotate, show.
    Keys(keys::KeysArgs),
    /// This node's phase, epochs, peers and XFRM counters (no secrets).
    Status(status::StatusArgs),
    /// Converge this node's XFRM states and policies now, as an ADD would.
    Converge(converge::ConvergeArgs),
    /// Add our entry to Calico's conflist (after "calico"), and the binary and KEK to the node.
    Install(install::InstallArgs),
    /// Remove our entry from the conflist; nothing else in it changes.
    Uninstall(install::UninstallArgs),
    /// Run the node agent: keep this node converged, publish its status, serve metrics.
    Agent(daemon::AgentArgs),
    /// Run the key manager: phases, rotation and retirement, one leader at a time.
    Manager(daemon::ManagerArgs),
    /// Turn encryption on: set the target phase to enforce.
    Enable(daemon::PhaseArgs),
    /// Turn encryption off: set the target phase to off.
    Disable(daemon::PhaseArgs),
}

/// etcd access flags, named like the conflist fields; etcdctl's variables also work.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// Comma-separated etcd endpoints, e.g. https://10.0.0.5:2379.
    #[arg(long, global = true, env = "ETCD_ENDPOINTS")]
    pub etcd_endpoints: Option<String>,
    /// CA certificate that signed etcd's server certificate.
    #[arg(long, global = true, env = "ETCD_CACERT")]
    pub etcd_ca_cert_file: Option<PathBuf>,
    /// Client certificate.
    #[arg(long, global = true, env = "ETCD_CERT")]
    pub etcd_cert_file: Option<PathBuf>,
    /// Client key.
    #[arg(long, global = true, env = "ETCD_KEY")]
    pub etcd_key_file: Option<PathBuf>,
    /// Bound on connecting and on each request, in milliseconds.
    #[arg(long, global = true, default_value_t = 2000)]
    pub etcd_timeout_ms: u64,
}

impl EtcdArgs {
    /// Validated connection settings.
    pub fn settings(&self) -> Result<EtcdSettings, CliError> {
        let endpoints = match &self.etcd_endpoints {
            Some(s) => parse_endpoints(s)?,
            None => return Err(EtcdError::NoEndpoints.into()),
        };
        let tls = EtcdConfig {
            endpoints,
            key_file: self.etcd_key_file.clone(),
            cert_file: self.etcd_cert_file.clone(),
            ca_cert_file: self.etcd_ca_cert_file.clone(),
        };
        Ok(EtcdSettings::from_config(
            &tls,
            Duration::from_millis(self.etcd_timeout_ms.max(1)),
        ))
    }
}

/// Writes `v` as pretty JSON and a newline.
pub fn print_json(out: &mut dyn std::io::Write, v: &impl serde::Serialize) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(std::io::Error::other)?;
    writeln!(out, "{text}")
}

/// Runs a parsed command, writing its output to `out`.
pub fn exec(cli: Cli, out: &mut dyn std::io::Write) -> Result<(), CliError> {
    match cli.command {
        Command::Mtu(args) => mtu::exec(&args, out)?,
        Command::Status(args) => status::exec(&args, out)?,
        Command::Converge(args) => converge::exec(&args, out)?,
        Command::Keys(args) => {
            let rt = crate::runtime::current_thread()?;
            rt.block_on(keys::exec(&args, out))?;
        }
        Command::Install(args) => install::exec_install(&args, out)?,
        Command::Uninstall(args) => install::exec_uninstall(&args, out)?,
        Command::Agent(args) => daemon::exec_agent(&args)?,
        Command::Manager(args) => daemon::exec_manager(&args)?,
        Command::Enable(args) => {
            daemon::exec_phase(&args, crate::datastore::ipsec::Phase::Enforce, out)?
        }
        Command::Disable(args) => {
            daemon::exec_phase(&args, crate::datastore::ipsec::Phase::Off, out)?
        }
    }
    Ok(())
}
