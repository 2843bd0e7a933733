//! A node's public key record against a real etcd: written once, a second
//! write of the very same record (the agent and the CNI plugin converging
//! the same node from the same stored pair) is its own, and anything else
//! is refused.

mod common;

use calico_ipsec::datastore::etcd::{Etcd, EtcdSettings};
use calico_ipsec::datastore::ipsec::{epoch_key, IpsecStore};
use calico_ipsec::datastore::pubkeys::{pubkey_key, PubkeyWrite};
use calico_ipsec::datastore::records::PubkeyRecord;
use common::etcd::EtcdServer;

fn record(public: &str) -> PubkeyRecord {
    PubkeyRecord {
        public: public.into(),
        mac: "bWFj".into(),
    }
}

#[test]
fn the_same_record_twice_is_this_nodes_own_and_another_is_refused() {
    let server = EtcdServer::start();
    let cfg = calico_ipsec::config::EtcdConfig {
        endpoints: vec![server.endpoint.clone()],
        ..Default::default()
    };
    let settings = EtcdSettings::from_config(&cfg, calico_ipsec::datastore::etcd::DEFAULT_TIMEOUT);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let etcd = Etcd::connect(&settings).await.expect("connect");
        let store = IpsecStore::new(&etcd);
        let mine = record("QUFB");

        // No epoch record: nothing is written, whatever the record.
        let w = store.create_pubkey(7, "node-1", Some(2), &mine).await;
        assert_eq!(w.expect("create"), PubkeyWrite::Refused);
        let key = pubkey_key(7, "node-1", Some(2));
        assert!(etcd.get(&key).await.expect("get").is_none());

        etcd.put(&epoch_key(7), b"{}".to_vec(), None)
            .await
            .expect("put epoch");
        let w = store.create_pubkey(7, "node-1", Some(2), &mine).await;
        assert_eq!(w.expect("create"), PubkeyWrite::Wrote);
        let written = etcd.get(&key).await.expect("get").expect("written");

        // The same bytes again: accepted as already there, not rewritten.
        let w = store.create_pubkey(7, "node-1", Some(2), &mine).await;
        assert_eq!(w.expect("create"), PubkeyWrite::AlreadyThere);
        // Another key under the same name: refused, the first one stays.
        let w = store.create_pubkey(7, "node-1", Some(2), &record("QkJC")).await;
        assert_eq!(w.expect("create"), PubkeyWrite::Refused);
        let now = etcd.get(&key).await.expect("get").expect("still there");
        assert_eq!(now.mod_revision, written.mod_revision, "never rewritten");
        assert_eq!(now.value, written.value);

        // A malformed record there is not ours either.
        let other = pubkey_key(7, "node-1", Some(3));
        etcd.put(&other, b"not json".to_vec(), None)
            .await
            .expect("put");
        let w = store.create_pubkey(7, "node-1", Some(3), &mine).await;
        assert_eq!(w.expect("create"), PubkeyWrite::Refused);
    });
}
