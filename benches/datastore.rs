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

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use calico_ipsec::config::EtcdConfig;
use calico_ipsec::datastore::etcd::{Etcd, EtcdSettings};
use calico_ipsec::datastore::ipsec::{ClusterConfig, IpsecStore};
use calico_ipsec::datastore::snapshot;
use calico_ipsec::keys::{Kek, SaId};

const NODES: usize = 5000;

fn settings(endpoint: &str) -> EtcdSettings {
    EtcdSettings::from_config(
        &EtcdConfig {
            endpoints: vec![endpoint.to_string()],
            ..EtcdConfig::default()
        },
        Duration::from_secs(30),
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

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
        let secret = rec.open(&kek).expect("unseal");
        for peer in snap.topology.peers(me) {
            for (sender, receiver) in [(me, peer.name.as_str()), (peer.name.as_str(), me)] {
                let k = secret.derive(
                    &guid,
                    &SaId {
                        epoch: rec.epoch,
                        sender,
                        incarnation: 1,
                        receiver,
                    },
                );
                n += k.0.expose().len() / 20;
            }
        }
    }
    assert_eq!(n, 2 * (NODES - 1) * snap.epochs.len());
    assert_eq!(snap.topology.nodes.len(), NODES);
    println!("{n}");
}

fn load(endpoint: &str, kek: &Kek) {
    rt().block_on(async {
        let etcd = Etcd::connect(&settings(endpoint)).await.expect("connect");
        let res = "/calico/resources/v3/projectcalico.org";
        let mut items: Vec<(String, String)> = vec![
            (format!("{res}/clusterinformations/default"),
             r#"{"apiVersion":"projectcalico.org/v3","kind":"ClusterInformation","metadata":{"name":"default"},"spec":{"clusterGUID":"5b0e2f9c8d4a4e61b7a39c2d1e0f4a66","datastoreReady":true}}"#.into()),
            (format!("{res}/ippools/default-ipv4-ippool"),
             r#"{"apiVersion":"projectcalico.org/v3","kind":"IPPool","metadata":{"name":"default-ipv4-ippool"},"spec":{"cidr":"10.128.0.0/9","blockSize":26,"ipipMode":"Always","vxlanMode":"Never","natOutgoing":true}}"#.into()),
        ];
        for i in 1..=NODES {
            let (a, b) = (i / 250, i % 250 + 1);
            let block = i * 64;
            let blk = format!("10.{}.{}.{}", 128 + block / 65536, block / 256 % 256, block % 256);
            items.push((format!("{res}/nodes/node-{i}"), format!(
                r#"{{"apiVersion":"projectcalico.org/v3","kind":"Node","metadata":{{"name":"node-{i}"}},"spec":{{"bgp":{{"ipv4Address":"10.0.{a}.{b}/16","ipv4IPIPTunnelAddr":"{blk}"}},"orchRefs":[{{"nodeName":"node-{i}","orchestrator":"k8s"}}]}},"status":{{}}}}"#)));
            items.push((format!("/calico/ipam/v2/host/node-{i}/ipv4/block/{blk}-26"),
                r#"{"state":"confirmed","deleted":false}"#.into()));
        }
        for chunk in items.chunks(100) {
            let batch: Vec<(&str, Vec<u8>)> =
                chunk.iter().map(|(k, v)| (k.as_str(), v.clone().into_bytes())).collect();
            etcd.put_all(&batch).await.expect("put batch");
        }
        IpsecStore::new(&etcd).init(kek, &ClusterConfig::default()).await.expect("keys init");
    });
}

fn time(mut cmd: Command) -> Duration {
    let start = Instant::now();
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .expect("spawn");
    let d = start.elapsed();
    assert!(st.success(), "{cmd:?} failed");
    d
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
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
    load(&server.endpoint, &kek);
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
