//! Shared by the benchmarks: etcd settings, a runtime, loading a Calico
//! cluster of any size into etcd, timing a process.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use calico_ipsec::config::EtcdConfig;
use calico_ipsec::datastore::etcd::{Etcd, EtcdSettings};
use calico_ipsec::datastore::ipsec::{Cipher, ClusterConfig, Identity, IpsecStore, Phase, PREFIX};
use calico_ipsec::datastore::pubkeys::pubkey_key;
use calico_ipsec::datastore::records::PubkeyRecord;
use calico_ipsec::datastore::snapshot;
use calico_ipsec::keys::agreement::{pubkey_mac, EpochKeyPair, KeyOwner};
use calico_ipsec::keys::Kek;

/// etcd settings for one endpoint with a generous timeout.
pub fn settings(endpoint: &str) -> EtcdSettings {
    EtcdSettings::from_config(
        &EtcdConfig {
            endpoints: vec![endpoint.to_string()],
            ..EtcdConfig::default()
        },
        Duration::from_secs(30),
    )
}

/// A single-threaded runtime.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Writes every (key, value) in transactions of 100 puts (etcd's default
/// limit is 128 operations per transaction).
async fn put_chunked(etcd: &Etcd, items: &[(String, Vec<u8>)]) {
    for chunk in items.chunks(100) {
        let batch: Vec<(&str, Vec<u8>)> =
            chunk.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        etcd.put_all(&batch).await.expect("put batch");
    }
}

/// Writes `nodes` Calico nodes (node-1..node-N, 10.0.a.b/16, one /26 block
/// each), an IPIP-Always pool and the clusterGUID, then `keys init` with `config`.
pub fn load(endpoint: &str, kek: &Kek, nodes: usize, config: &ClusterConfig) {
    load_modes(endpoint, kek, nodes, config, "Always", "Never");
}

/// [`load`] with the pool's `ipipMode` and `vxlanMode` (e.g. "Never" twice:
/// no encapsulation, so every peer is protected by tunnel mode).
pub fn load_modes(
    endpoint: &str,
    kek: &Kek,
    nodes: usize,
    config: &ClusterConfig,
    ipip: &str,
    vxlan: &str,
) {
    load_cipher(
        endpoint,
        kek,
        nodes,
        config,
        (ipip, vxlan),
        Cipher::default(),
    );
}

/// [`load_modes`] with epoch 1 made with `cipher`.
pub fn load_cipher(
    endpoint: &str,
    kek: &Kek,
    nodes: usize,
    config: &ClusterConfig,
    (ipip, vxlan): (&str, &str),
    cipher: Cipher,
) {
    rt().block_on(async {
        let etcd = Etcd::connect(&settings(endpoint)).await.expect("connect");
        let res = "/calico/resources/v3/projectcalico.org";
        let mut items: Vec<(String, String)> = vec![
            (format!("{res}/clusterinformations/default"),
             r#"{"apiVersion":"projectcalico.org/v3","kind":"ClusterInformation","metadata":{"name":"default"},"spec":{"clusterGUID":"5b0e2f9c8d4a4e61b7a39c2d1e0f4a66","datastoreReady":true}}"#.into()),
            (format!("{res}/ippools/default-ipv4-ippool"),
             r#"{"apiVersion":"projectcalico.org/v3","kind":"IPPool","metadata":{"name":"default-ipv4-ippool"},"spec":{"cidr":"10.128.0.0/9","blockSize":26,"ipipMode":"IPIP","vxlanMode":"VXLAN","natOutgoing":true}}"#.replace("IPIP", ipip).replace("VXLAN", vxlan)),
        ];
        for i in 1..=nodes {
            let (a, b) = (i / 250, i % 250 + 1);
            let block = i * 64;
            let blk = format!("10.{}.{}.{}", 128 + block / 65536, block / 256 % 256, block % 256);
            items.push((format!("{res}/nodes/node-{i}"), format!(
                r#"{{"apiVersion":"projectcalico.org/v3","kind":"Node","metadata":{{"name":"node-{i}"}},"spec":{{"bgp":{{"ipv4Address":"10.0.{a}.{b}/16","ipv4IPIPTunnelAddr":"{blk}"}},"orchRefs":[{{"nodeName":"node-{i}","orchestrator":"k8s"}}]}},"status":{{}}}}"#)));
            items.push((format!("/calico/ipam/v2/host/node-{i}/ipv4/block/{blk}-26"),
                r#"{"state":"confirmed","deleted":false}"#.into()));
        }
        let items: Vec<(String, Vec<u8>)> =
            items.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        put_chunked(&etcd, &items).await;
        IpsecStore::new(&etcd).init(kek, config, cipher).await.expect("keys init");
    });
}

/// A cluster of `peers + 1` nodes in enforce, one epoch, every peer with a
/// published identity (node-1, the node under test, has none yet).
pub fn setup(endpoint: &str, peers: usize, kek: &Kek, ipip: &str) {
    setup_cipher(endpoint, peers, kek, ipip, Cipher::default());
}

/// [`setup`] with a P-256 agreement epoch: every peer has also published
/// its public key for it, with the MAC a node writes (node-1 makes and
/// publishes its own on its first convergence, as a node does).
pub fn setup_agreement(endpoint: &str, peers: usize, kek: &Kek, ipip: &str) {
    let cipher = Cipher {
        agreement: true,
        ..Cipher::default()
    };
    setup_cipher(endpoint, peers, kek, ipip, cipher);
    rt().block_on(async {
        let etcd = Etcd::connect(&settings(endpoint)).await.expect("connect");
        let snap = snapshot::read(&etcd).await.expect("snapshot");
        let rec = snap.epochs.first().expect("epoch 1");
        let guid = snap.topology.cluster_guid.clone().unwrap_or_default();
        let secret = rec.open(kek, &guid).expect("open epoch 1");
        let keys: Vec<(String, Vec<u8>)> = (2..=peers + 1)
            .map(|i| {
                let node = format!("node-{i}");
                let pair = EpochKeyPair::generate().expect("key pair");
                // Keys per incarnation (an epoch sealed as 3): the peers'
                // incarnation 1, as `setup_cipher` publishes it.
                let inc = rec.binds_receiver().then_some(1);
                let owner = KeyOwner {
                    node: &node,
                    incarnation: inc,
                };
                let mac = pubkey_mac(&secret, &guid, rec.epoch, owner, pair.public()).expect("mac");
                let r = PubkeyRecord {
                    public: B64.encode(pair.public()),
                    mac: B64.encode(mac),
                };
                (
                    pubkey_key(rec.epoch, &node, inc),
                    serde_json::to_vec(&r).expect("json"),
                )
            })
            .collect();
        put_chunked(&etcd, &keys).await;
    });
}

fn setup_cipher(endpoint: &str, peers: usize, kek: &Kek, ipip: &str, cipher: Cipher) {
    let config = ClusterConfig {
        phase: Phase::Enforce,
        target_phase: Phase::Enforce,
        ..ClusterConfig::default()
    };
    load_cipher(endpoint, kek, peers + 1, &config, (ipip, "Never"), cipher);
    rt().block_on(async {
        let etcd = Etcd::connect(&settings(endpoint)).await.expect("connect");
        let ids: Vec<(String, Vec<u8>)> = (1..=peers + 1)
            .filter(|i| *i != 1)
            .map(|i| {
                let id = Identity {
                    id: u16::try_from(i).expect("id"),
                    incarnation: 1,
                    boot_id: "bench".into(),
                };
                (
                    format!("{PREFIX}nodeids/node-{i}"),
                    serde_json::to_vec(&id).expect("json"),
                )
            })
            .collect();
        put_chunked(&etcd, &ids).await;
    });
}

/// Runs a command to completion (it must succeed) and returns its wall time.
pub fn time(mut cmd: Command) -> Duration {
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

/// The median of `v` (sorts it).
pub fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Exits with a hint unless running inside the test VM (tests/e2e/vm.sh):
/// the machine's own kernel has no ESP, GCM or IPIP.
pub fn require_vm() {
    if std::env::var("E2E_IN_VM").as_deref() != Ok("1") {
        eprintln!(
            "this benchmark needs the VM's kernel: run `make bench` (it boots tests/e2e/vm.sh)"
        );
        std::process::exit(2);
    }
}

/// Turns address-space randomisation off for this process and every process
/// it starts from now on (what `setarch -R` does), so that each binary loads
/// at the same addresses every time.
pub fn no_aslr() {
    // SAFETY: personality(2) only changes this process's execution domain
    // flags; 0xffffffff reads the current ones.
    let current = unsafe { libc::personality(0xffff_ffff) };
    assert!(
        current >= 0,
        "personality: {}",
        std::io::Error::last_os_error()
    );
    let flags = current as libc::c_ulong | libc::ADDR_NO_RANDOMIZE as libc::c_ulong;
    // SAFETY: as above.
    let set = unsafe { libc::personality(flags) };
    assert!(set >= 0, "personality: {}", std::io::Error::last_os_error());
}
