//! The CNI error a verb returns, with the spec's codes and ours.
//!
//! The codes are defined here, and the `From` impls here map each lower
//! layer's error type to a code and an operator-facing message. The verb
//! modules pick a code themselves only for what they check on their own
//! (a CHECK that finds drift, an ADD whose pod cannot take the bound).

use crate::state::StateError;
use serde_json::{json, Value};

/// CNI error codes: 1–11 from the spec, 100 and up our own.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid or missing environment variable.
    pub const BAD_ENVIRONMENT: u32 = 4;
    /// Input that cannot be decoded.
    pub const UNDECODABLE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (a dependency such as etcd is unreachable).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD right now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// No up interface carries node traffic, so EXTMTU is unknown.
    pub const NO_UNDERLAY: u32 = 100;
    /// The pod interface named by CNI_IFNAME, or its host peer, is not usable.
    pub const POD_INTERFACE: u32 = 101;
    /// CHECK found an MTU above the encryption bound.
    pub const MTU_ABOVE_BOUND: u32 = 102;
    /// The kernel refused a netlink request.
    pub const KERNEL: u32 = 103;
    /// The per-attachment state directory could not be read or written.
    pub const STATE: u32 = 104;
    /// etcd answered, but the request failed or a record is malformed.
    pub const DATASTORE: u32 = 105;
    /// The key-encryption key cannot open the epochs.
    pub const KEYS: u32 = 106;
    /// CHECK found the kernel's XFRM states or policies differ from etcd's.
    pub const XFRM_DRIFT: u32 = 107;
    /// The bound after encryption is below IPv6's minimum MTU (1280) for a
    /// pod with an IPv6 address.
    pub const MTU_TOO_SMALL: u32 = 108;
    /// A bug: the plugin panicked.
    pub const INTERNAL: u32 = 199;
}

/// A CNI error as printed on stdout: `{"cniVersion","code","msg","details"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}")]
pub struct CniError {
    /// The spec's or our code.
    pub code: u32,
    /// One sentence that tells the operator what is wrong and what to fix.
    pub msg: String,
    /// Longer context: the underlying cause.
    pub details: String,
}

impl CniError {
    /// Builds an error with a code, message and details.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON object the spec prints for an error at `version`.
    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

impl From<crate::podmtu::PodMtuError> for CniError {
    fn from(e: crate::podmtu::PodMtuError) -> Self {
        use crate::netns::NetnsError;
        use crate::podmtu::PodMtuError as E;
        let details = e.to_string();
        match e {
            E::Netns(NetnsError::Thread(_)) => CniError::new(
                code::INTERNAL,
                "a worker thread failed while entering the pod network namespace",
                details,
            ),
            E::Netns(_) => CniError::new(
                code::BAD_ENVIRONMENT,
                format!("CNI_NETNS is not usable: {details}"),
                "the runtime passed a network namespace that does not exist or cannot be entered",
            ),
            E::NoInterface { .. } => CniError::new(
                code::POD_INTERFACE,
                format!("{details}; calico-ipsec must come after the plugin that creates the pod interface (calico) in the conflist"),
                "",
            ),
            E::Link(_) => CniError::new(
                code::KERNEL,
                format!("the kernel refused a link change: {details}"),
                "",
            ),
            E::State(_) => CniError::new(
                code::STATE,
                format!("per-attachment state: {details}"),
                "check that state_dir is on a writable local filesystem",
            ),
        }
    }
}

impl From<crate::datastore::ipsec::IpsecStoreError> for CniError {
    fn from(e: crate::datastore::ipsec::IpsecStoreError) -> Self {
        use crate::datastore::etcd::EtcdError;
        use crate::datastore::ipsec::IpsecStoreError as E;
        let details = e.to_string();
        match e {
            E::Etcd(EtcdError::Unreachable { .. }) => CniError::new(
                code::TRY_AGAIN_LATER,
                format!("{details}; calico-ipsec cannot read its keys, so the pod is not started unencrypted; check etcd_endpoints and that etcd is up (the runtime retries)"),
                "",
            ),
            E::Etcd(EtcdError::TlsFile { .. }) | E::Etcd(EtcdError::NoEndpoints) => CniError::new(
                code::INVALID_CONFIG,
                format!("{details}; fix the etcd_* fields of the calico-ipsec conflist entry"),
                "",
            ),
            E::Seal(_) | E::KekMismatch { .. } => CniError::new(
                code::KEYS,
                format!("{details}; check that kek_file holds the cluster's KEK Secret"),
                "",
            ),
            _ => CniError::new(code::DATASTORE, format!("datastore: {details}"), ""),
        }
    }
}

impl From<crate::converge::ConvergeError> for CniError {
    fn from(e: crate::converge::ConvergeError) -> Self {
        use crate::converge::ConvergeError as E;
        let details = e.to_string();
        match e {
            E::Store(s) => s.into(),
            E::Nodename(_) => CniError::new(
                code::INVALID_CONFIG,
                format!("{details}; set `nodename` in the calico-ipsec conflist entry"),
                "",
            ),
            E::Desired(_) => CniError::new(
                code::DATASTORE,
                format!("cannot work out this node's IPsec state from etcd: {details}"),
                "",
            ),
            E::Xfrm(_) => CniError::new(
                code::KERNEL,
                format!("converging this node's IPsec states and policies failed, so the pod is not started: {details}"),
                "",
            ),
            E::Kek(_) => CniError::new(
                code::KEYS,
                format!("{details}; mount the cluster's KEK Secret at kek_file"),
                "",
            ),
            E::State(StateError::LockTimeout { .. }) => CniError::new(
                code::TRY_AGAIN_LATER,
                format!("{details}; the pod is not started until this node's IPsec state is converged (the runtime retries)"),
                "",
            ),
            E::State(StateError::Unsafe(_)) | E::State(StateError::Corrupt { .. }) => CniError::new(
                code::STATE,
                format!("{details}; calico-ipsec's files under state_dir and agreement_dir must be its own regular files"),
                "",
            ),
            E::State(StateError::Io { .. }) | E::BootId { .. } => CniError::new(
                code::STATE,
                format!("{details}; check state_dir and agreement_dir"),
                "",
            ),
            E::Agreement(_) => CniError::new(
                code::TRY_AGAIN_LATER,
                format!("{details}; the pod is not started until this node can use the epoch's key agreement (the runtime retries)"),
                "",
            ),
            E::AgreementKeys(_) => CniError::new(
                code::TRY_AGAIN_LATER,
                format!("{details}; the pod is not started until this node has a key pair for the epoch (the runtime retries)"),
                "",
            ),
            E::Guard(_) => CniError::new(
                code::KERNEL,
                format!("{details}; the pod is not started while this node cannot block what it does not encrypt"),
                "",
            ),
            E::Runtime(_) => CniError::new(code::INTERNAL, details, ""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::converge::ConvergeError;

    #[test]
    fn a_held_node_lock_is_try_again_later_and_a_planted_link_is_state() {
        let e: CniError = ConvergeError::State(StateError::LockTimeout {
            path: "/var/lib/calico-ipsec/node/lock".into(),
            waited: std::time::Duration::from_secs(25),
        })
        .into();
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(
            e.msg.contains("node/lock") && e.msg.contains("retries"),
            "{}",
            e.msg
        );
        let e: CniError = ConvergeError::State(StateError::Unsafe(
            crate::fsutil::SafeFileError::Symlink("/var/lib/calico-ipsec/node/lock".into()),
        ))
        .into();
        assert_eq!(e.code, code::STATE);
        assert!(e.msg.contains("symbolic link"), "{}", e.msg);
    }
}
