//! Each node's public key for each epoch with key agreement
//! (`pubkeys/<epoch>/<node>`, or `pubkeys/<epoch>/<node>/<incarnation>`
//! for an epoch sealed as version 3, whose keys belong to one incarnation
//! of a node). A record is written once and never changed:
//! the kernel never shows an SA's key, so a key that changed under an
//! unchanged SPI could not be noticed (docs/design/key-agreement.md).

use super::ipsec::{encode, IpsecStore, IpsecStoreError, PREFIX};
use super::records::PubkeyRecord;

/// The key of `node`'s public key for `epoch` (of one incarnation when
/// `incarnation` is given).
pub fn pubkey_key(epoch: u32, node: &str, incarnation: Option<u32>) -> String {
    match incarnation {
        None => format!("{PREFIX}pubkeys/{epoch}/{node}"),
        Some(i) => format!("{PREFIX}pubkeys/{epoch}/{node}/{i}"),
    }
}

/// The prefix of every node's public key for `epoch`.
pub fn pubkeys_prefix(epoch: u32) -> String {
    format!("{PREFIX}pubkeys/{epoch}/")
}

impl IpsecStore<'_> {
    /// Writes `node`'s public key for `epoch` (of `incarnation`, when
    /// given) unless a record is there or the epoch is gone; true when this
    /// call wrote it.
    pub async fn create_pubkey(
        &self,
        epoch: u32,
        node: &str,
        incarnation: Option<u32>,
        rec: &PubkeyRecord,
    ) -> Result<bool, IpsecStoreError> {
        let key = pubkey_key(epoch, node, incarnation);
        // Only while the epoch exists: a key published after the manager
        // deleted the epoch (with its keys, in one transaction) would
        // outlive it, and keep every node's private key of that number.
        let epoch_rec = super::ipsec::epoch_key(epoch);
        let txn = etcd_client::Txn::new()
            .when([
                etcd_client::Compare::version(key.as_str(), etcd_client::CompareOp::Equal, 0),
                etcd_client::Compare::version(
                    epoch_rec.as_str(),
                    etcd_client::CompareOp::Greater,
                    0,
                ),
            ])
            .and_then([etcd_client::TxnOp::put(key.as_str(), encode(rec), None)]);
        Ok(self.etcd().txn(&format!("create {key}"), txn).await?)
    }
}
