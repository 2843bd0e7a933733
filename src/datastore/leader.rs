//! The manager's writes, each fenced by its leadership: a transaction that
//! also compares `manager/leader` with the writer's id, so a deposed or
//! paused leader cannot write. The manager decides; this module alone knows
//! how its decisions become etcd transactions.

use etcd_client::{Compare, CompareOp, DeleteOptions, PutOptions, Txn, TxnOp};

use super::ipsec::{
    config_key, encode, epoch_key, leader_key, ClusterConfig, EpochRecord, IpsecStore,
    IpsecStoreError,
};

/// Holding the leadership: what every fenced write compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    id: String,
}

impl Fence {
    /// The fence of the manager `id`.
    pub fn new(id: &str) -> Self {
        Fence { id: id.to_string() }
    }

    /// The manager's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The comparisons: the leader record names us.
    pub(super) fn compares(&self) -> Vec<Compare> {
        vec![Compare::value(
            leader_key(),
            CompareOp::Equal,
            self.id.as_bytes(),
        )]
    }

    /// Adds the next epoch as pending while this leadership holds; `None`
    /// when it does not.
    pub async fn add_pending_epoch(
        &self,
        store: &IpsecStore<'_>,
        kek: &crate::keys::Kek,
        change: super::ipsec::CipherChange,
    ) -> Result<Option<EpochRecord>, IpsecStoreError> {
        store
            .add_pending_epoch_if(kek, change, &self.compares())
            .await
    }

    fn txn(&self, extra: impl IntoIterator<Item = Compare>, ops: Vec<TxnOp>) -> Txn {
        let mut cmp = self.compares();
        cmp.extend(extra);
        Txn::new().when(cmp).and_then(ops)
    }
}

impl IpsecStore<'_> {
    /// Becomes the leader if nobody is: the leader record is created under
    /// `lease`. `Ok(true)` when this call created it.
    pub async fn campaign(&self, fence: &Fence, lease: i64) -> Result<bool, IpsecStoreError> {
        let txn = Txn::new()
            .when([Compare::version(leader_key(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                leader_key(),
                fence.id.as_bytes().to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        Ok(self.etcd().txn("campaign", txn).await?)
    }

    /// Writes the config (a phase step) if it is still at `rev`.
    pub async fn put_config_fenced(
        &self,
        fence: &Fence,
        cfg: &ClusterConfig,
        rev: i64,
    ) -> Result<bool, IpsecStoreError> {
        let txn = fence.txn(
            [Compare::mod_revision(config_key(), CompareOp::Equal, rev)],
            vec![TxnOp::put(config_key(), encode(cfg), None)],
        );
        Ok(self.etcd().txn("set phase", txn).await?)
    }

    /// Writes epoch records (activation, retirement) if each is still at its
    /// revision; all or none.
    pub async fn put_epochs_fenced(
        &self,
        fence: &Fence,
        epochs: &[(EpochRecord, i64)],
    ) -> Result<bool, IpsecStoreError> {
        let cmp = epochs
            .iter()
            .map(|(r, rev)| Compare::mod_revision(epoch_key(r.epoch), CompareOp::Equal, *rev));
        let ops = epochs
            .iter()
            .map(|(r, _)| TxnOp::put(epoch_key(r.epoch), encode(r), None))
            .collect();
        Ok(self.etcd().txn("epochs", fence.txn(cmp, ops)).await?)
    }

    /// Deletes epoch `n` if it is still at `rev`.
    pub async fn delete_epoch_fenced(
        &self,
        fence: &Fence,
        n: u32,
        rev: i64,
    ) -> Result<bool, IpsecStoreError> {
        let key = epoch_key(n);
        // Its nodes' public keys go with it (nothing may use them after).
        let pubkeys = super::pubkeys::pubkeys_prefix(n);
        let txn = fence.txn(
            [Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)],
            vec![
                TxnOp::delete(key.as_str(), None),
                TxnOp::delete(pubkeys.as_str(), Some(DeleteOptions::new().with_prefix())),
            ],
        );
        Ok(self.etcd().txn("delete epoch", txn).await?)
    }

    /// Deletes `key` while the fence holds (true when it held).
    pub async fn delete_fenced(&self, fence: &Fence, key: &str) -> Result<bool, IpsecStoreError> {
        let del = TxnOp::delete(key, None);
        Ok(self
            .etcd()
            .txn(&format!("delete {key}"), fence.txn([], vec![del]))
            .await?)
    }

    /// Writes `value` at `key` under `lease`, fenced (the leader's status).
    pub async fn put_leased_fenced(
        &self,
        fence: &Fence,
        key: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<bool, IpsecStoreError> {
        let put = TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
        Ok(self
            .etcd()
            .txn(&format!("put {key}"), fence.txn([], vec![put]))
            .await?)
    }
}
