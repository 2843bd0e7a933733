//! Creating and resealing epoch records: `keys init`, `keys rotate` and
//! the manager's rotations (numbers from the epoch counter, never reused),
//! the sealing version the live agents can open, and the KEK rotation's
//! reseals.

use super::ipsec::{
    config_key, encode, epoch_counter_key, epoch_key, now_rfc3339, Cipher, CipherChange,
    ClusterConfig, EpochRecord, EpochState, IpsecStore, IpsecStoreError, ALGORITHM,
};
use super::records::{SEAL_BOTH_ENDS, SEAL_LEGACY, SEAL_NEWEST};
use crate::keys::{EpochSecret, Kek, SealError};

/// A new epoch record of `cipher` in `state` (activated now when active),
/// its secret sealed under `kek` as `version`.
fn new_epoch(
    epoch: u32,
    state: EpochState,
    cipher: Cipher,
    secret: &EpochSecret,
    kek: &Kek,
    guid: &str,
    version: u32,
) -> Result<EpochRecord, SealError> {
    let now = now_rfc3339();
    let mut rec = EpochRecord {
        epoch,
        state,
        activated: (state == EpochState::Active).then(|| now.clone()),
        created: now,
        algorithm: ALGORITHM.into(),
        key_bits: cipher.key_bits,
        icv_bits: cipher.icv_bits,
        kek_fingerprint: String::new(),
        sealed_secret: String::new(),
        seal: version,
        also_sealed: Default::default(),
        agreement: cipher
            .agreement
            .then(|| super::records::AGREEMENT_P256.to_string()),
    };
    rec.seal_under(secret, kek, guid, version)?;
    Ok(rec)
}

impl IpsecStore<'_> {
    /// Creates the config and epoch 1 (active), atomically; refuses when
    /// either exists.
    pub async fn init(
        &self,
        kek: &Kek,
        config: &ClusterConfig,
        cipher: Cipher,
    ) -> Result<EpochRecord, IpsecStoreError> {
        let guid = self.sealing_guid().await?;
        let secret = EpochSecret::generate()?;
        let version = self.seal_version().await?;
        let rec = new_epoch(1, EpochState::Active, cipher, &secret, kek, &guid, version)?;
        let created = self
            .etcd()
            .create_all(&[
                (&config_key(), encode(config)),
                (&epoch_key(1), encode(&rec)),
                (
                    &epoch_counter_key(),
                    encode(&serde_json::json!({ "last": 1 })),
                ),
            ])
            .await?;
        if created {
            Ok(rec)
        } else {
            Err(IpsecStoreError::AlreadyInitialised(config_key()))
        }
    }

    /// Adds the next epoch as pending, sealed under `kek`, with the newest
    /// epoch's cipher changed by `change`.
    pub async fn add_pending_epoch(
        &self,
        kek: &Kek,
        change: CipherChange,
    ) -> Result<EpochRecord, IpsecStoreError> {
        self.add_pending_epoch_if(kek, change, &[])
            .await?
            .ok_or_else(|| IpsecStoreError::Contended("adding an epoch".into()))
    }

    /// Adds the next epoch as pending, only while every comparison in
    /// `fence` holds (the manager's leadership, see
    /// `leader::Fence::add_pending_epoch`; none: unfenced); `None` when one
    /// does not.
    /// Its cipher is the newest epoch's, changed by `change`.
    pub async fn add_pending_epoch_if(
        &self,
        kek: &Kek,
        change: CipherChange,
        fence: &[etcd_client::Compare],
    ) -> Result<Option<EpochRecord>, IpsecStoreError> {
        let Some(config) = self.config().await? else {
            return Err(IpsecStoreError::NotInitialised(config_key()));
        };
        let guid = self.sealing_guid().await?;
        let version = self.seal_version().await?;
        for _ in 0..16 {
            let epochs = self.epochs().await?;
            if epochs.iter().any(|e| !e.also_sealed.is_empty()) {
                return Err(IpsecStoreError::KekRotating);
            }
            if let Some(last) = epochs.last() {
                if last.kek_fingerprint != kek.fingerprint() {
                    return Err(IpsecStoreError::KekMismatch {
                        given: kek.fingerprint(),
                        expected: last.kek_fingerprint.clone(),
                        epoch: last.epoch,
                    });
                }
            }
            if let Some(p) = epochs.iter().find(|e| e.state == EpochState::Pending) {
                return Err(IpsecStoreError::PendingEpoch(p.epoch));
            }
            // Epoch numbers are never reused, even after a pending epoch
            // was deleted: the counter keeps the highest ever created.
            let counter = self.etcd().get(&epoch_counter_key()).await?;
            let (counted, counter_rev) = counter.as_ref().map_or((0, 0), |kv| {
                let n = serde_json::from_slice::<serde_json::Value>(&kv.value)
                    .ok()
                    .and_then(|v| v["last"].as_u64())
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(0);
                (n, kv.mod_revision)
            });
            let last = epochs.last().map_or(0, |e| e.epoch).max(counted);
            let next = last
                .checked_add(1)
                .ok_or(IpsecStoreError::EpochsExhausted(last))?;
            let newest = epochs.last();
            let mut base = newest.map(EpochRecord::cipher).unwrap_or_default();
            // Key agreement is the default: the first epoch whose keys are
            // per incarnation (so a reboot costs no rotation) turns it on
            // unless the operator says otherwise; after that, the newest
            // epoch's choice stands.
            if version >= SEAL_BOTH_ENDS && newest.is_none_or(|n| !n.binds_receiver()) {
                base.agreement = true;
            }
            let cipher = change.apply(base);
            let secret = EpochSecret::generate()?;
            let rec = new_epoch(
                next,
                EpochState::Pending,
                cipher,
                &secret,
                kek,
                &guid,
                version,
            )?;
            if let Some(why) = rec.cipher_problem(config.icv_bits) {
                return Err(IpsecStoreError::BadCipher(why));
            }
            let key = epoch_key(next);
            let counter_key = epoch_counter_key();
            let counter_cmp = if counter_rev == 0 {
                etcd_client::Compare::version(
                    counter_key.as_str(),
                    etcd_client::CompareOp::Equal,
                    0,
                )
            } else {
                etcd_client::Compare::mod_revision(
                    counter_key.as_str(),
                    etcd_client::CompareOp::Equal,
                    counter_rev,
                )
            };
            let mut cmp = vec![
                etcd_client::Compare::version(key.as_str(), etcd_client::CompareOp::Equal, 0),
                counter_cmp,
            ];
            cmp.extend(fence.iter().cloned());
            let txn = etcd_client::Txn::new().when(cmp).and_then([
                etcd_client::TxnOp::put(key.as_str(), encode(&rec), None),
                etcd_client::TxnOp::put(
                    counter_key.as_str(),
                    encode(&serde_json::json!({ "last": next })),
                    None,
                ),
            ]);
            if self.etcd().txn(&format!("create {key}"), txn).await? {
                return Ok(Some(rec));
            }
            if !fence.is_empty() {
                // Lost the fence (leadership) or raced another writer: the
                // caller decides.
                return Ok(None);
            }
        }
        Err(IpsecStoreError::Contended("adding an epoch".into()))
    }

    /// The sealing version a new record gets: the newest one every live
    /// node opens ([`SEAL_NEWEST`] once all run this release; an agent of
    /// an earlier release reports what it opens, so a rolling upgrade keeps
    /// working).
    pub async fn seal_version(&self) -> Result<u32, IpsecStoreError> {
        let opened_by_all = self
            .node_statuses()
            .await?
            .live
            .iter()
            .map(|(_, s)| s.seal)
            .min()
            .unwrap_or(SEAL_NEWEST);
        Ok(opened_by_all.clamp(SEAL_LEGACY, SEAL_NEWEST))
    }

    /// Calico's clusterGUID, for sealing a new epoch: refused when Calico
    /// has written none (nodes would refuse every epoch sealed without it).
    pub async fn sealing_guid(&self) -> Result<String, IpsecStoreError> {
        let guid = self.cluster_guid().await?;
        if guid.is_empty() {
            return Err(IpsecStoreError::NoClusterGuid(format!(
                "{}clusterinformations/default",
                super::calico::RESOURCES
            )));
        }
        Ok(guid)
    }

    /// Calico's clusterGUID (ClusterInformation `default`), which sealing
    /// binds; "" when the cluster has none.
    pub async fn cluster_guid(&self) -> Result<String, IpsecStoreError> {
        let key = format!("{}clusterinformations/default", super::calico::RESOURCES);
        let Some(kv) = self.etcd().get(&key).await? else {
            return Ok(String::new());
        };
        let v: serde_json::Value =
            serde_json::from_slice(&kv.value).map_err(|e| IpsecStoreError::Malformed {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        Ok(v.pointer("/spec/clusterGUID")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string())
    }

    /// Seals every epoch's secret under `new` beside its current sealing
    /// (the start of a KEK rotation: nodes open epochs with either KEK).
    /// Returns the epochs resealed.
    pub async fn reseal_beside(&self, old: &Kek, new: &Kek) -> Result<Vec<u32>, IpsecStoreError> {
        let guid = self.cluster_guid().await?;
        self.reseal(|rec| {
            let secret = rec.open(old, &guid)?;
            rec.seal_beside(&secret, new, &guid)
        })
        .await
    }

    /// Leaves `kek` the only sealing of every epoch (the end of a KEK
    /// rotation). Returns the epochs resealed.
    pub async fn reseal_only(&self, kek: &Kek) -> Result<Vec<u32>, IpsecStoreError> {
        let guid = self.cluster_guid().await?;
        self.reseal(|rec| {
            let secret = rec.open(kek, &guid)?;
            let version = rec.seal;
            rec.seal_under(&secret, kek, &guid, version)
        })
        .await
    }

    /// Rewrites every epoch record through `f`, each by compare-and-swap;
    /// an epoch changed meanwhile (the manager moved it) is read again.
    async fn reseal<F>(&self, mut f: F) -> Result<Vec<u32>, IpsecStoreError>
    where
        F: FnMut(&mut EpochRecord) -> Result<(), SealError>,
    {
        let mut done = Vec::new();
        for _ in 0..16 {
            let mut raced = false;
            for (mut rec, rev) in self.epochs_rev().await? {
                if done.contains(&rec.epoch) {
                    continue;
                }
                f(&mut rec)?;
                match self
                    .etcd()
                    .compare_and_put_at(&epoch_key(rec.epoch), rev, encode(&rec))
                    .await?
                {
                    Some(_) => done.push(rec.epoch),
                    None => raced = true,
                }
            }
            if !raced {
                return Ok(done);
            }
        }
        Err(IpsecStoreError::Contended("resealing the epochs".into()))
    }
}
