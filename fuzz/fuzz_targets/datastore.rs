//! Fuzzes what is parsed from etcd: Calico's Node, IPPool,
//! FelixConfiguration and ClusterInformation records, IPAM block keys and
//! allocation block records (borrowed addresses), and our config, epoch and
//! identity records, then the desired XFRM state and the catch-all's
//! nftables script in every phase. Any panic is a bug: a malformed record is skipped and
//! reported, never fatal. The desired state must also be self-consistent:
//! a kernel holding exactly it needs no change.
//!
//! Input: records separated by 0xFF; each record's first byte picks the
//! range (and a key), the rest is the value, or the key's last segment for
//! the IPAM range.

#![no_main]

use calico_ipsec::datastore::etcd::Kv;
use calico_ipsec::datastore::ipsec::Phase;
use calico_ipsec::datastore::snapshot::{watched, Snapshot};
use calico_ipsec::xfrm::guard::Guard;
use calico_ipsec::xfrm::{Desired, Held, Inputs, Plan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ranges = watched();
    let mut read: Vec<Vec<Kv>> = vec![Vec::new(); ranges.len()];
    for (n, rec) in data.split(|b| *b == 0xFF).enumerate() {
        let Some((&sel, body)) = rec.split_first() else {
            continue;
        };
        let i = sel as usize % ranges.len();
        let (prefix, is_prefix) = &ranges[i];
        let names = ["node-1", "node-2", "node-3", "default", "1"];
        let name = names[(sel as usize / ranges.len()) % names.len()];
        let (key, value) = if prefix.ends_with("/ipam/v2/host/") {
            let tail = String::from_utf8_lossy(body);
            (format!("{prefix}{name}/{tail}"), b"{}".to_vec())
        } else if prefix.ends_with("/ipam/v2/assignment/") {
            let block = ["ipv4/block/10.244.18.128-26", "ipv6/block/fd00:10:244::-122"];
            (
                format!("{prefix}{}", block[(sel as usize / ranges.len()) % 2]),
                body.to_vec(),
            )
        } else if *is_prefix {
            (format!("{prefix}{name}"), body.to_vec())
        } else {
            (prefix.clone(), body.to_vec())
        };
        read[i].push(Kv {
            key,
            value,
            mod_revision: n as i64 + 1,
            lease: 0,
        });
    }
    let Ok(snap) = Snapshot::from_ranges(&read, 1) else {
        return;
    };
    for phase in [Phase::Off, Phase::Accept, Phase::Encrypt, Phase::Enforce] {
        let inputs = Inputs {
            topology: &snap.topology,
            me: "node-1",
            my_identity: snap.identities.get("node-1"),
            identities: &snap.identities,
            phase,
            epochs: &snap.epochs,
            icv_bits: 128,
            agreement: &std::collections::BTreeMap::new(),
        };
        if let Ok(d) = Desired::compute(&inputs) {
            assert!(Plan::diff(&d, &Held::exactly(&d)).is_empty());
        }
        let _ = Guard::of(phase, &snap.topology).script();
    }
});
