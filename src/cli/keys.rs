//! `calico-ipsec keys init|rotate|show`: key epochs in etcd, metadata only.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{CliError, EtcdArgs};
use crate::config::DEFAULT_KEK_FILE;
use crate::datastore::etcd::Etcd;
use crate::datastore::ipsec::{Cipher, CipherChange, ClusterConfig, EpochRecord, IpsecStore};
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
        /// AES-GCM ICV bits: the longest any epoch may use (the pod MTU
        /// leaves room for it), and epoch 1's.
        #[arg(long, default_value_t = 128, value_parser = super::mtu::parse_icv)]
        icv_bits: u32,
        /// AES key bits of epoch 1 (and of the epochs that follow, until a
        /// rotation names another size): 128 or 256.
        #[arg(long, default_value_t = crate::keys::DEFAULT_KEY_BITS, value_parser = parse_key_bits)]
        key_bits: u32,
        /// Seconds between automatic rotations.
        #[arg(long, default_value_t = 24 * 3600)]
        rotation_interval_seconds: u64,
        /// Seconds an old epoch stays installed after senders switch.
        #[arg(long, default_value_t = 300)]
        overlap_seconds: u64,
        /// Per-node P-256 key agreement for epoch 1 (and those after it):
        /// `p256` (the default) or `none`.
        #[arg(long, default_value = "p256", value_parser = parse_agreement)]
        agreement: bool,
    },
    /// Add a new pending epoch; the manager activates it once every node has it.
    Rotate {
        /// AES key bits of the new epoch (and of those after it): 128 or
        /// 256. Default: the newest epoch's. A change of size is a rotation
        /// like any other, with no packet lost.
        #[arg(long, value_parser = parse_key_bits)]
        key_bits: Option<u32>,
        /// ICV bits of the new epoch: 64, 96 or 128, at most the config's.
        /// Default: the newest epoch's.
        #[arg(long, value_parser = super::mtu::parse_icv)]
        icv_bits: Option<u32>,
        /// Per-node P-256 key agreement for the new epoch (and those after
        /// it): `p256` or `none`. Default: the newest epoch's, except that
        /// the first epoch with keys per incarnation moves a cluster to
        /// `p256`.
        #[arg(long, value_parser = parse_agreement)]
        agreement: Option<bool>,
    },
    /// Change the KEK without an outage: seal every epoch under a new KEK
    /// (`--new-kek-file`) beside the current one (`--kek-file`); after every
    /// node holds the new KEK file, the same command with `--finish` drops
    /// the old. `--kek-file` is the current KEK here as everywhere else.
    RotateKek {
        /// The new KEK file: read if it exists, otherwise written (0600). With
        /// `--finish`, the KEK to keep (when absent, the `--kek-file`, for a
        /// caller whose KEK file already holds the new KEK).
        #[arg(long, required_unless_present = "finish")]
        new_kek_file: Option<PathBuf>,
        /// End the rotation: keep only the sealing under the new KEK, once
        /// every live node reports it.
        #[arg(long)]
        finish: bool,
        /// With `--finish`: do not wait for the nodes (those still on the old
        /// KEK can no longer open the epochs, and keep their SAs as they are).
        #[arg(long, requires = "finish")]
        force: bool,
    },
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
            icv_bits,
            key_bits,
            rotation_interval_seconds,
            overlap_seconds,
            agreement,
        } => {
            if store.config().await?.is_some() {
                return Err(
                    crate::datastore::ipsec::IpsecStoreError::AlreadyInitialised(
                        crate::datastore::ipsec::config_key(),
                    )
                    .into(),
                );
            }
            // Refused before the KEK file is written: nothing is left behind.
            store.sealing_guid().await?;
            let kek = Kek::generate()?;
            kek.write_new(&args.kek_file)?;
            let config = ClusterConfig {
                icv_bits: *icv_bits,
                rotation_interval_seconds: *rotation_interval_seconds,
                overlap_seconds: *overlap_seconds,
                ..ClusterConfig::default()
            };
            let cipher = Cipher {
                key_bits: *key_bits,
                agreement: *agreement,
                ..Cipher::default()
            };
            let rec = match store.init(&kek, &config, cipher).await {
                Ok(rec) => rec,
                Err(e) => {
                    // No epoch is sealed under the KEK just written: remove
                    // it, so that a retry does not find it in the way.
                    if let Err(rm) = std::fs::remove_file(&args.kek_file) {
                        tracing::warn!(path = %args.kek_file.display(), error = %rm, "cannot remove the unused KEK file");
                    }
                    return Err(e.into());
                }
            };
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
        KeysCommand::Rotate {
            key_bits,
            icv_bits,
            agreement,
        } => {
            let kek = Kek::load(&args.kek_file)?;
            let change = CipherChange {
                key_bits: *key_bits,
                icv_bits: *icv_bits,
                agreement: *agreement,
            };
            let rec = store.add_pending_epoch(&kek, change).await?;
            writeln!(
                out,
                "added epoch {} (pending, AES-{}-GCM); it becomes active once every node has installed it",
                rec.epoch, rec.key_bits
            )?;
        }
        KeysCommand::RotateKek {
            new_kek_file,
            finish,
            force,
        } => {
            super::kek_rotation::exec(
                &store,
                &args.kek_file,
                new_kek_file.as_deref(),
                *finish,
                *force,
                out,
            )
            .await?;
        }
        KeysCommand::Show { json } => {
            let epochs = store.epochs().await?;
            if *json {
                let v: Vec<serde_json::Value> = epochs.iter().map(metadata).collect();
                super::print_json(out, &v)?;
            } else {
                writeln!(
                    out,
                    "{:<6} {:<8} {:<21} {:<18} {:<4} {:<4} KEK",
                    "EPOCH", "STATE", "CREATED", "ALGORITHM", "KEY", "ICV"
                )?;
                for e in &epochs {
                    writeln!(
                        out,
                        "{:<6} {:<8} {:<21} {:<18} {:<4} {:<4} {}",
                        e.epoch,
                        format!("{:?}", e.state).to_lowercase(),
                        e.created,
                        e.algorithm.escape_debug().to_string(),
                        e.key_bits,
                        e.icv_bits.map_or("cfg".to_string(), |b| b.to_string()),
                        e.kek_fingerprint.escape_debug()
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
        "key_bits": e.key_bits,
        "icv_bits": e.icv_bits,
        "kek_fingerprint": e.kek_fingerprint,
    })
}

/// Parses `--key-bits`: 128 or 256.
fn parse_key_bits(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(b) if crate::keys::KEY_BITS.contains(&b) => Ok(b),
        _ => Err(format!("{s:?} is not an AES key size we use: 128 or 256")),
    }
}

/// `--agreement`: `p256` (on) or `none` (off).
fn parse_agreement(s: &str) -> Result<bool, String> {
    match s {
        "p256" => Ok(true),
        "none" => Ok(false),
        other => Err(format!("{other:?} is not p256 or none")),
    }
}
