//! Reading a 5,000-node Calico cluster from a real etcd and deriving all of
//! one node's keys, against a plain `etcdctl get --prefix` of the same keys,
//! in the same run.
//!
//! Both sides are whole processes, timed from spawn to exit: etcdctl prints
//! the keys to /dev/null; our side is this binary re-executed with `--child`,
//! which connects, reads the snapshot (Calico's resources, block affinities and
//! our epochs), builds the topology, unseals the epoch and derives an outbound
//! and an inbound key for each of the 4,999 peers. Runs alternate.

#[path = "../tests/common/etcd.rs"]
mod etcd_server;
mod support;

use std::process::Command;
use std::time::Instant;

use calico_ipsec::datastore::etcd::Etcd;
use calico_ipsec::datastore::ipsec::ClusterConfig;
use calico_ipsec::datastore::snapshot;
use calico_ipsec::keys::{Kek, SaId};
use support::{load, median, rt, settings, time};

const NODES: usize = 5000;

/// The child: read and derive, print how many keys.
fn child(endpoint: &str, kek_hex_file: &str) {
    let kek = Kek::load(std::path::Path::new(kek_hex_file)).expect("kek");
    let snap = rt()
        .block_on(async {
            let etcd = Etcd::connect(&settings(endpoint)).await?;
            snapshot::read(&etcd).await
        })
        .expect("snapshot");
    let guid = snap.topology.cluster_guid.clone().expect("clusterGUID");
    let me = "node-1";
    let mut n = 0usize;
    for rec in &snap.epochs {
        let secret = rec.open(&kek, &guid).expect("unseal");
        for peer in snap.topology.peers(me) {
            for (sender, receiver) in [(me, peer.name.as_str()), (peer.name.as_str(), me)] {
                let k = secret
                    .derive(
                        &guid,
                        &SaId {
                            epoch: rec.epoch,
                            sender,
                            incarnation: 1,
                            receiver,
                            lane: 0,
                            key_bits: 128,
                            receiver_incarnation: rec.binds_receiver().then_some(1),
                        },
                    )
                    .expect("derives");
                n += k.0.expose().len() / 20;
            }
        }
    }
    assert_eq!(n, 2 * (NODES - 1) * snap.epochs.len());
    assert_eq!(snap.topology.nodes.len(), NODES);
    println!("{n}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        return child(&args[2], &args[3]);
    }
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let server = etcd_server::EtcdServer::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let kek_path = tmp.path().join("kek");
    let kek = Kek::generate().expect("kek");
    kek.write_new(&kek_path).expect("write kek");
    let t0 = Instant::now();
    load(&server.endpoint, &kek, NODES, &ClusterConfig::default());
    eprintln!(
        "loaded {NODES} nodes + {NODES} block affinities in {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    let me = std::env::current_exe().expect("self");
    let ours = || {
        let mut c = Command::new(&me);
        c.arg("--child").arg(&server.endpoint).arg(&kek_path);
        c
    };
    let etcdctl = || {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3").args([
            "--endpoints",
            &server.endpoint,
            "get",
            "--prefix",
            "/calico/",
        ]);
        c
    };
    time(ours());
    time(etcdctl());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        if i % 2 == 0 {
            a.push(time(etcdctl()));
            b.push(time(ours()));
        } else {
            b.push(time(ours()));
            a.push(time(etcdctl()));
        }
    }
    let (ma, mb) = (median(&mut a), median(&mut b));
    let table = format!(
        "5,000-node topology read, {rounds} alternating rounds, whole processes\n\
         etcdctl get --prefix /calico/ (to /dev/null)          median {:>8.1} ms\n\
         calico-ipsec: read snapshot + topology + {} keys      median {:>8.1} ms\n\
         ratio calico-ipsec / etcdctl: {:.2}x (target <= 1.5x)\n",
        ma.as_secs_f64() * 1e3,
        2 * (NODES - 1),
        mb.as_secs_f64() * 1e3,
        mb.as_secs_f64() / ma.as_secs_f64()
    );
    print!("{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("datastore.txt"), table);
}
