//! The command-line interface (when `CNI_COMMAND` is not set).

pub mod mtu;

use clap::{Parser, Subcommand};

/// Why a CLI command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The MTU could not be computed.
    #[error(transparent)]
    Mtu(#[from] mtu::MtuCliError),
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
}

/// Runs a parsed command, writing its output to `out`.
pub fn exec(cli: Cli, out: &mut dyn std::io::Write) -> Result<(), CliError> {
    match cli.command {
        Command::Mtu(args) => mtu::exec(&args, out)?,
    }
    Ok(())
}
