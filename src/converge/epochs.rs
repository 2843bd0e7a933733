//! Step 3a of a convergence, *open the epochs*: each epoch's sealed secret
//! is opened with this node's KEK and the parameters its record carries.
//! A record whose parameters were changed after sealing (a downgrade by
//! someone who can write etcd but has no KEK), or that does not open at
//! all, is refused: it is left out of this convergence and reported, and
//! the epochs that do open carry the traffic.

use std::collections::BTreeMap;

use super::error::ConvergeError;
use super::facts::Facts;
use crate::config::PluginConfig;
use crate::datastore::ipsec::Phase;
use crate::datastore::records::SEAL_LEGACY;
use crate::keys::{EpochSecret, Kek};

/// The epochs this convergence may use.
#[derive(Debug, Default)]
pub(super) struct Opened {
    /// Each usable epoch's secret (zeroized on drop).
    pub secrets: BTreeMap<u32, EpochSecret>,
    /// Epochs refused, each with the reason.
    pub refused: Vec<(u32, String)>,
}

/// Opens every epoch of the snapshot and removes the ones that do not open
/// from it. Nothing is opened while the phase is off and no epoch has key
/// agreement (no key is needed then, and a node may hold no KEK yet).
pub(super) fn open(cfg: &PluginConfig, facts: &mut Facts) -> Result<Opened, ConvergeError> {
    let snap = &mut facts.snap;
    let mut out = Opened::default();
    let needed = facts.phase != Phase::Off || snap.epochs.iter().any(|e| e.agreement.is_some());
    if !needed || snap.epochs.is_empty() {
        return Ok(out);
    }
    let kek = Kek::load(&cfg.kek_file)?;
    let guid = snap.topology.cluster_guid.clone().unwrap_or_default();
    let mut kept = Vec::with_capacity(snap.epochs.len());
    for rec in std::mem::take(&mut snap.epochs) {
        match rec.open(&kek, &guid) {
            Ok(secret) => {
                if rec.seal == SEAL_LEGACY {
                    tracing::debug!(
                        epoch = rec.epoch,
                        "a legacy sealing (parameters not bound): the manager reseals it"
                    );
                }
                out.secrets.insert(rec.epoch, secret);
                kept.push(rec);
            }
            // Sealed under another KEK altogether: this node holds the
            // wrong KEK file, a configuration error, not a record to skip.
            Err(_) if !rec.sealed_under(&kek) => {
                return Err(crate::datastore::ipsec::IpsecStoreError::KekMismatch {
                    given: kek.fingerprint(),
                    expected: rec.kek_fingerprint.clone(),
                    epoch: rec.epoch,
                }
                .into());
            }
            Err(e) => {
                tracing::error!(epoch = rec.epoch, error = %e, "an epoch record does not open with its own parameters (altered in etcd?): it is not used, and traffic stays on the epochs that do");
                out.refused.push((rec.epoch, rec.refusal(&e)));
            }
        }
    }
    snap.epochs = kept;
    Ok(out)
}
