//! `calico-ipsec keys init|rotate|show`: key epochs in etcd, metadata only.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{CliError, EtcdArgs};
use crate::config::DEFAULT_KEK_FILE;
use crate::datastore::etcd::Etcd;
use crate::datastore::ipsec::{ClusterConfig, EpochRecord, IpsecStore};
use crate::keys::Kek;

/// Arguments of `calico-ipsec keys`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// etcd access.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// The key-encryption key file (0600).
    #[arg(long, global = true, default_value = DEFAULT_KEK_FILE)]
    pub kek_file: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new KEK file (refusing to overwrite one), then create the config and epoch 1.
    Init {
        /// How Calico carries pod traffic: ipip or vxlan.
        #[arg(long, default_value = "ipip", value_parser = ["ipip", "vxlan"])]
        encapsulation: String,
        /// AES-GCM ICV bits.
        #[arg(long, default_value_t = 128, value_parser = super::mtu::parse_icv)]
        icv_bits: u32,
        /// Seconds between automatic rotations.
        #[arg(long, default_value_t = 24 * 3600)]
        rotation_interval_seconds: u64,
        /// Seconds an old epoch stays installed after senders switch.
        #[arg(long, default_value_t = 300)]
        overlap_seconds: u64,
    },
    /// Add a new pending epoch; the manager activates it once every node has it.
    Rotate,
    /// Print epoch metadata (never a secret).
    Show {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `calico-ipsec keys`.
pub async fn exec(args: &KeysArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let etcd = Etcd::connect(&args.etcd.settings()?).await?;
    let store = IpsecStore::new(&etcd);
    match &args.command {
        KeysCommand::Init {
            encapsulation,
            icv_bits,
            rotation_interval_seconds,
            overlap_seconds,
        } => {
            if store.config().await?.is_some() {
                return Err(
                    crate::datastore::ipsec::IpsecStoreError::AlreadyInitialised(
                        crate::datastore::ipsec::config_key(),
                    )
                    .into(),
                );
            }
            let kek = Kek::generate()?;
            kek.write_new(&args.kek_file)?;
            let config = ClusterConfig {
                encapsulation: encapsulation.clone(),
                icv_bits: *icv_bits,
                rotation_interval_seconds: *rotation_interval_seconds,
                overlap_seconds: *overlap_seconds,
                ..ClusterConfig::default()
            };
            let rec = store.init(&kek, &config).await?;
            writeln!(
                out,
                "wrote KEK {} (fingerprint {}); created epoch {} ({:?})",
                args.kek_file.display(),
                kek.fingerprint(),
                rec.epoch,
                rec.state
            )?;
            writeln!(out, "deliver the KEK file to every node as a Kubernetes Secret; keep a backup: without it the epochs cannot be opened")?;
        }
        KeysCommand::Rotate => {
            let kek = Kek::load(&args.kek_file)?;
            let rec = store.add_pending_epoch(&kek).await?;
            writeln!(
                out,
                "added epoch {} (pending); it becomes active once every node has installed it",
                rec.epoch
            )?;
        }
        KeysCommand::Show { json } => {
            let epochs = store.epochs().await?;
            if *json {
                let v: Vec<serde_json::Value> = epochs.iter().map(metadata).collect();
                super::print_json(out, &v)?;
            } else {
                writeln!(
                    out,
                    "{:<6} {:<8} {:<21} {:<18} KEK",
                    "EPOCH", "STATE", "CREATED", "ALGORITHM"
                )?;
                for e in &epochs {
                    writeln!(
                        out,
                        "{:<6} {:<8} {:<21} {:<18} {}",
                        e.epoch,
                        format!("{:?}", e.state).to_lowercase(),
                        e.created,
                        e.algorithm,
                        e.kek_fingerprint
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// An epoch's metadata, without the sealed secret.
fn metadata(e: &EpochRecord) -> serde_json::Value {
    serde_json::json!({
        "epoch": e.epoch,
        "state": e.state,
        "created": e.created,
        "algorithm": e.algorithm,
        "kek_fingerprint": e.kek_fingerprint,
    })
}
