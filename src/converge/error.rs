//! Why a convergence failed, and the few helpers every step shares.

use std::io;
use std::time::Instant;

use crate::config::NodenameError;
use crate::datastore::ipsec::{IpsecStoreError, Phase};
use crate::datastore::snapshot::Snapshot;
use crate::keys::KekError;
use crate::state::StateError;
use crate::xfrm::kernel::XfrmError;
use crate::xfrm::DesiredError;

/// ICV length used when the config does not say.
pub const DEFAULT_ICV_BITS: u32 = 128;

/// Why converging failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvergeError {
    /// etcd or our records failed.
    #[error(transparent)]
    Store(#[from] IpsecStoreError),
    /// This node's name is unknown.
    #[error(transparent)]
    Nodename(#[from] NodenameError),
    /// The datastore does not allow a desired state.
    #[error(transparent)]
    Desired(#[from] DesiredError),
    /// The kernel refused.
    #[error(transparent)]
    Xfrm(#[from] XfrmError),
    /// The KEK cannot be loaded.
    #[error(transparent)]
    Kek(#[from] KekError),
    /// This node's state on disk (the lock, the ledger, the records, the
    /// epoch private keys) failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The kernel's boot id cannot be read.
    #[error("reading {path}: {source}")]
    BootId {
        /// The file.
        path: &'static str,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// This node's side of key agreement failed.
    #[error("key agreement: {0}")]
    Agreement(String),
    /// A key pair could not be made.
    #[error(transparent)]
    AgreementKeys(#[from] crate::keys::agreement::AgreementError),
    /// The nftables catch-all could not be written at `encrypt` or above.
    #[error("the nftables catch-all that drops pod traffic no XFRM policy protects: {0}")]
    Guard(#[source] crate::xfrm::guard::GuardError),
    /// The async runtime could not start.
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] io::Error),
}

/// A current-thread runtime for one convergence.
pub(super) fn runtime() -> Result<tokio::runtime::Runtime, ConvergeError> {
    crate::runtime::current_thread().map_err(ConvergeError::Runtime)
}

/// Milliseconds since `t`.
pub(super) fn ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The phase and ICV length a snapshot asks for (off when it has no config).
pub(super) fn phase_of(s: &Snapshot) -> (Phase, u32) {
    s.config
        .as_ref()
        .map_or((Phase::Off, DEFAULT_ICV_BITS), |c| (c.phase, c.icv_bits))
}

/// Reads the kernel's boot id.
pub fn boot_id() -> Result<String, ConvergeError> {
    crate::clock::read_boot_id().map_err(|source| ConvergeError::BootId {
        path: crate::clock::BOOT_ID_PATH,
        source,
    })
}
