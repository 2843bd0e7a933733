//! The datastore against a real etcd (Debian's etcd-server on a free
//! loopback port), plain and with TLS client certificates.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use calico_ipsec::config::EtcdConfig;
use calico_ipsec::datastore::calico::Topology;
use calico_ipsec::datastore::etcd::{Etcd, EtcdSettings};
use calico_ipsec::datastore::ipsec::{IpsecStore, NodeStatus, Phase};
use calico_ipsec::keys::Kek;
use common::etcd::EtcdServer;
use common::*;
use serde_json::{json, Value};

/// Calico's clusterGUID as the store reads it ("" without the fixture).
fn guid(server: &EtcdServer) -> String {
    rt().block_on(async {
        let etcd = Etcd::connect(&settings(server)).await.expect("connect");
        IpsecStore::new(&etcd).cluster_guid().await.expect("guid")
    })
}

fn fixture_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calico/etcd-3-nodes.json")
}

fn settings(server: &EtcdServer) -> EtcdSettings {
    let mut tls = EtcdConfig {
        endpoints: vec![server.endpoint.clone()],
        ..EtcdConfig::default()
    };
    if let Some(t) = &server.tls {
        tls.ca_cert_file = Some(t.ca.clone());
        tls.cert_file = Some(t.cert.clone());
        tls.key_file = Some(t.key.clone());
    }
    EtcdSettings::from_config(&tls, calico_ipsec::datastore::etcd::DEFAULT_TIMEOUT)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs the CLI with etcdctl's environment variables pointing at `server`.
fn cli(server: &EtcdServer, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(PLUGIN);
    cmd.env_clear()
        .env("ETCD_ENDPOINTS", &server.endpoint)
        .args(args);
    if let Some(t) = &server.tls {
        cmd.env("ETCD_CACERT", &t.ca)
            .env("ETCD_CERT", &t.cert)
            .env("ETCD_KEY", &t.key);
    }
    cmd.output().expect("run calico-ipsec")
}

fn check_topology(server: &EtcdServer) {
    server.load_fixture(&fixture_path());
    // A malformed node and a node without a BGP address are skipped; the rest stay.
    server.put(
        "/calico/resources/v3/projectcalico.org/nodes/broken",
        "{not json",
    );
    server.put(
        "/calico/resources/v3/projectcalico.org/nodes/no-bgp",
        r#"{"kind":"Node","apiVersion":"projectcalico.org/v3","metadata":{"name":"no-bgp"},"spec":{}}"#,
    );
    let snap = rt()
        .block_on(async {
            let etcd = Etcd::connect(&settings(server)).await?;
            calico_ipsec::datastore::snapshot::read(&etcd).await
        })
        .expect("snapshot");
    let t: &Topology = &snap.topology;
    assert_eq!(
        t.nodes.keys().collect::<Vec<_>>(),
        ["node-1", "node-2", "node-3"]
    );
    assert_eq!(
        t.nodes["node-2"]
            .ipv4
            .map(|u| u.addr.to_string())
            .as_deref(),
        Some("10.0.0.12")
    );
    assert_eq!(t.nodes["node-3"].blocks[0].to_string(), "10.244.18.128/26");
    assert_eq!(
        t.cluster_guid.as_deref(),
        Some("5b0e2f9c8d4a4e61b7a39c2d1e0f4a66")
    );
    assert_eq!(t.skipped.len(), 2, "{:?}", t.skipped);
    assert!(snap.config.is_none(), "keys not initialised yet");
}

#[test]
fn reads_calico_topology() {
    check_topology(&EtcdServer::start());
}

#[test]
fn reads_calico_topology_over_tls() {
    // As `main` does: every TLS session takes this build's provider (the
    // FIPS build's is AWS-LC's module: `make fips` runs this test with it).
    calico_ipsec::keys::crypto::install_tls_provider();
    let provider = rustls::crypto::CryptoProvider::get_default().expect("installed");
    assert_eq!(provider.fips(), calico_ipsec::keys::crypto::FIPS_BUILD);
    let server = EtcdServer::start_tls();
    check_topology(&server);
    // Without the client certificate the server refuses us.
    let mut s = settings(&server);
    s.config.cert_file = None;
    s.config.key_file = None;
    let err = rt()
        .block_on(async { Etcd::connect(&s).await?.get("/x").await })
        .expect_err("no client certificate");
    assert!(!err.to_string().is_empty());
}

#[test]
fn keys_init_refuses_a_datastore_without_calicos_cluster_guid() {
    // An etcd Calico has not initialised (or one wiped and not yet seen by
    // calico-node): every seal binds the clusterGUID, and nodes refuse an
    // epoch without one, so `keys init` must not write one.
    let server = EtcdServer::start_bare();
    let tmp = tempfile::tempdir().expect("tempdir");
    let kek_path = tmp.path().join("kek");
    let init = || {
        let kek = kek_path.to_str().expect("utf8");
        cli(&server, &["keys", "init", "--kek-file", kek])
    };
    let out = init();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "init without a clusterGUID succeeded"
    );
    assert!(
        err.contains("clusterinformations/default") && err.contains("clusterGUID"),
        "{err}"
    );
    let left = server.etcdctl(&["get", "--prefix", "--keys-only", "/calico/ipsec/"]);
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "",
        "nothing written"
    );
    // Once Calico has written it, the same command works.
    server.put_cluster_information();
    let out = init();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn keys_init_rotate_show_and_no_secret_in_etcd() {
    let server = EtcdServer::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let kek_path = tmp.path().join("kek");
    let kek_arg = kek_path.to_str().expect("utf8");

    let out = cli(&server, &["keys", "init", "--kek-file", kek_arg]);
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&kek_path)
        .expect("kek")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "KEK file is 0600");
    let kek = Kek::load(&kek_path).expect("load kek");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&kek.fingerprint()));

    let again = cli(&server, &["keys", "init", "--kek-file", kek_arg]);
    assert!(!again.status.success(), "a second init must refuse");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        Kek::load(&kek_path).expect("kek").expose(),
        kek.expose(),
        "KEK untouched"
    );

    let rot = cli(&server, &["keys", "rotate", "--kek-file", kek_arg]);
    assert!(
        rot.status.success(),
        "rotate: {}",
        String::from_utf8_lossy(&rot.stderr)
    );

    let show = cli(&server, &["keys", "show", "--json"]);
    assert!(show.status.success());
    let shown: Value = serde_json::from_slice(&show.stdout).expect("JSON");
    assert_eq!(shown[0]["epoch"], 1);
    assert_eq!(shown[0]["state"], "active");
    assert_eq!(shown[1]["epoch"], 2);
    assert_eq!(shown[1]["state"], "pending");
    assert_eq!(shown[1]["kek_fingerprint"], json!(kek.fingerprint()));
    assert!(
        !String::from_utf8_lossy(&show.stdout).contains("sealed"),
        "show prints metadata only"
    );
    let table = cli(&server, &["keys", "show"]);
    assert!(String::from_utf8_lossy(&table.stdout).starts_with("EPOCH"));

    // Scan every value under /calico/ipsec/ for each raw secret, hex or base64.
    let store_epochs = rt().block_on(async {
        let etcd = Etcd::connect(&settings(&server)).await.expect("connect");
        IpsecStore::new(&etcd).epochs().await.expect("epochs")
    });
    let dump = server.etcdctl(&["get", "--prefix", "/calico/ipsec/"]);
    let text = String::from_utf8_lossy(&dump.stdout).into_owned();
    assert!(text.contains("/calico/ipsec/v1/epochs/2"));
    for rec in &store_epochs {
        let secret = rec.open(&kek, &guid(&server)).expect("opens with the KEK");
        let raw = secret.expose();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let engines = [
            base64::engine::general_purpose::STANDARD.encode(raw),
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw),
        ];
        assert!(
            !text.to_lowercase().contains(&hex),
            "hex secret of epoch {} in etcd",
            rec.epoch
        );
        for b in engines {
            assert!(
                !text.contains(&b[..40]),
                "base64 secret of epoch {} in etcd",
                rec.epoch
            );
        }
    }
    // Every value is readable JSON.
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let v: Value = serde_json::from_str(pair[1]).unwrap_or_else(|e| panic!("{}: {e}", pair[0]));
        assert!(v.is_object());
    }
}

#[test]
fn wrong_kek_is_a_clear_error() {
    let server = EtcdServer::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let good = tmp.path().join("kek");
    let bad = tmp.path().join("other-kek");
    assert!(cli(
        &server,
        &["keys", "init", "--kek-file", good.to_str().expect("utf8")]
    )
    .status
    .success());
    Kek::generate()
        .expect("kek")
        .write_new(&bad)
        .expect("write");
    let out = cli(
        &server,
        &["keys", "rotate", "--kek-file", bad.to_str().expect("utf8")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong KEK"), "{err}");
    assert!(
        err.contains(&Kek::load(&bad).expect("bad").fingerprint()),
        "{err}"
    );

    // Opening an epoch with the wrong KEK names the epoch and the fingerprint.
    let wrong = Kek::load(&bad).expect("bad");
    let epochs = rt().block_on(async {
        let etcd = Etcd::connect(&settings(&server)).await.expect("connect");
        IpsecStore::new(&etcd).epochs().await.expect("epochs")
    });
    let e = epochs[0]
        .open(&wrong, &guid(&server))
        .expect_err("wrong KEK");
    assert!(
        e.to_string().contains("epoch 1") && e.to_string().contains(&wrong.fingerprint()),
        "{e}"
    );
}

#[test]
fn concurrent_id_allocation_is_unique() {
    let server = EtcdServer::start();
    let s = settings(&server);
    // 500 nodes at once (a rack powering up): every one gets an id, none
    // runs out of tries (each starts at its own slot, not the lowest free).
    const N: usize = 500;
    let ids = rt().block_on(async {
        let etcd = Etcd::connect(&s).await.expect("connect");
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let etcd = etcd.clone();
                tokio::spawn(
                    async move { IpsecStore::new(&etcd).node_id(&format!("node-{i}")).await },
                )
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.expect("task").expect("id"));
        }
        // Asking again returns the same id.
        assert_eq!(
            IpsecStore::new(&etcd).node_id("node-3").await.expect("id"),
            ids[3]
        );
        // A crowded stretch: the 40 ids from a node's home slot are taken,
        // so it probes past them and then reads which are free.
        let home = calico_ipsec::datastore::ipsec::home_slot("crowded");
        let max = calico_ipsec::keys::MAX_NODE_ID;
        let mut held = Vec::new();
        for d in 0..40u16 {
            let id = (home - 1 + d) % max + 1;
            let key = format!("/calico/ipsec/v1/ids/{id}");
            etcd.put(&key, br#"{"node":"someone"}"#.to_vec(), None)
                .await
                .expect("put");
            held.push(id);
        }
        let got = IpsecStore::new(&etcd).node_id("crowded").await.expect("id");
        assert!(!held.contains(&got) && !ids.contains(&got), "{got}");
        ids
    });
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), N, "ids repeat");
    assert!(sorted
        .iter()
        .all(|i| (1..=calico_ipsec::keys::MAX_NODE_ID).contains(i)));
}

/// What a node just past a new incarnation asks etcd: did another
/// identity record change between its snapshot's newest and its own?
#[test]
fn identities_modified_between_sees_only_writes_strictly_in_between() {
    let server = EtcdServer::start();
    let s = settings(&server);
    rt().block_on(async {
        let etcd = Etcd::connect(&s).await.expect("connect");
        let store = IpsecStore::new(&etcd);
        let ids = "/calico/ipsec/v1/nodeids/";
        let put = |k: &str| {
            let etcd = etcd.clone();
            let key = format!("{ids}{k}");
            async move {
                etcd.put(&key, b"{}".to_vec(), None).await.expect("put");
                etcd.get(&key)
                    .await
                    .expect("get")
                    .expect("there")
                    .mod_revision
            }
        };
        let a = put("node-a").await;
        // Another prefix moves etcd's revision, not the identities.
        etcd.put("/calico/ipsec/v1/other", b"x".to_vec(), None)
            .await
            .expect("put");
        let b = put("node-b").await;
        assert!(b > a + 1);
        assert!(!store.identities_modified_between(a, b).await.expect("read"));
        let c = put("node-c").await;
        let d = put("node-d").await;
        assert!(
            store.identities_modified_between(b, d).await.expect("read"),
            "node-c in between"
        );
        assert!(!store.identities_modified_between(c, d).await.expect("read"));
        // node-c written again: its record is no longer in between.
        put("node-c").await;
        assert!(!store.identities_modified_between(b, d).await.expect("read"));
    });
}

#[test]
fn node_status_vanishes_with_its_lease() {
    let server = EtcdServer::start();
    let s = settings(&server);
    rt().block_on(async {
        let etcd = Etcd::connect(&s).await.expect("connect");
        let store = IpsecStore::new(&etcd);
        // 5 s: long enough that a slow fsync between the grant, the put and
        // the read below cannot end it first.
        let lease = etcd.grant_lease(5).await.expect("lease");
        let status = NodeStatus {
            id: 1,
            incarnation: 1,
            installed_epochs: vec![1],
            acked_phase: Phase::Off,
            acked_generation: 0,
            active_epoch: Some(1),
            heartbeat: calico_ipsec::datastore::ipsec::now_rfc3339(),
            stale: false,
            identities: String::new(),
            handover: false,
            kek: String::new(),
            lost_epochs: vec![],
            seal: 2,
            ..Default::default()
        };
        store
            .put_status("node-1", &status, lease)
            .await
            .expect("put");
        assert_eq!(
            store.statuses().await.expect("statuses"),
            vec![("node-1".to_string(), status)]
        );
        let start = Instant::now();
        while !store.statuses().await.expect("statuses").is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "status outlived its lease"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

#[test]
fn add_fails_with_code_11_when_etcd_is_down() {
    require_root();
    let mut server = EtcdServer::start();
    let endpoint = server.endpoint.clone();
    server.stop();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = plugin_dir(tmp.path());
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let mut chain = Chain::new(
        ptp_conflist(
            "0.3.1",
            tmp.path(),
            json!({"etcd_endpoints": endpoint, "etcd_timeout_ms": 1000}),
        ),
        &bin,
        &node,
    );
    let start = Instant::now();
    let err = chain
        .add(&unique("ctr"), &pod.path(), "eth0")
        .expect_err("ADD must fail");
    let took = start.elapsed();
    assert_eq!(err.code(), Some(11), "{:?}", err.json);
    let msg = err
        .json
        .as_ref()
        .and_then(|j| j["msg"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.contains(&endpoint) && msg.contains("unreachable"),
        "{msg}"
    );
    assert!(
        took < Duration::from_secs(5),
        "ADD took {took:?} with a 1 s etcd timeout"
    );
    assert_eq!(
        pod.mtu("eth0"),
        1500,
        "nothing applied: the MTU is untouched"
    );
    // The state dir may hold the node lock (taken before etcd is read), but
    // no MTU backup and no SA ledger.
    let written: Vec<_> = std::fs::read_dir(tmp.path().join("state"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "node")
        .collect();
    assert!(written.is_empty(), "nothing applied, but found {written:?}");
    assert!(
        !tmp.path().join("state/node/ledger").exists(),
        "nothing applied: no ledger"
    );
}

/// `keys rotate-kek` against a real etcd: every epoch opens with either KEK
/// while it runs, rotations wait, `--finish` waits for the nodes, and at the
/// end only the new KEK opens anything.
#[test]
fn kek_rotation_keeps_every_epoch_open_then_drops_the_old_kek() {
    let server = EtcdServer::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let old = tmp.path().join("kek");
    let new = tmp.path().join("kek-new");
    let (old_s, new_s) = (old.to_str().expect("utf8"), new.to_str().expect("utf8"));
    let ok = |args: &[&str]| {
        let out = cli(&server, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["keys", "init", "--kek-file", old_s]);
    ok(&["keys", "rotate", "--kek-file", old_s, "--key-bits", "256"]);
    let said = ok(&[
        "keys",
        "rotate-kek",
        "--kek-file",
        old_s,
        "--new-kek-file",
        new_s,
    ]);
    assert!(said.contains("wrote a new KEK"), "{said}");
    let (old_k, new_k) = (Kek::load(&old).expect("old"), Kek::load(&new).expect("new"));
    let rt = rt();
    let etcd = rt
        .block_on(Etcd::connect(&settings(&server)))
        .expect("connect");
    let store = IpsecStore::new(&etcd);
    let epochs = rt.block_on(store.epochs()).expect("epochs");
    assert_eq!(epochs.len(), 2);
    let g = guid(&server);
    for e in &epochs {
        let a = e.open(&old_k, &g).expect("opens with the old KEK");
        let b = e.open(&new_k, &g).expect("opens with the new KEK");
        assert_eq!(a, b, "the same secret under both");
        assert_eq!(e.key_bits, if e.epoch == 2 { 256 } else { 128 });
    }
    // Rotations wait while two KEKs seal the epochs.
    let out = cli(&server, &["keys", "rotate", "--kek-file", old_s]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("KEK rotation is in progress"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A live node still on the old KEK holds the end back.
    let lease = rt.block_on(etcd.grant_lease(60)).expect("lease");
    let mut status = NodeStatus {
        id: 1,
        incarnation: 1,
        installed_epochs: vec![1, 2],
        acked_phase: Phase::Off,
        acked_generation: 0,
        active_epoch: Some(1),
        heartbeat: String::new(),
        stale: false,
        identities: String::new(),
        handover: false,
        kek: old_k.fingerprint(),
        lost_epochs: vec![],
        seal: 2,
        ..Default::default()
    };
    rt.block_on(store.put_status("node-1", &status, lease))
        .expect("status");
    let out = cli(
        &server,
        &["keys", "rotate-kek", "--finish", "--kek-file", new_s],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node-1") && err.contains(&old_k.fingerprint()),
        "{err}"
    );
    status.kek = new_k.fingerprint();
    rt.block_on(store.put_status("node-1", &status, lease))
        .expect("status");
    // `--kek-file` is the current KEK, as in every subcommand; the KEK kept
    // is `--new-kek-file`.
    ok(&[
        "keys",
        "rotate-kek",
        "--finish",
        "--kek-file",
        old_s,
        "--new-kek-file",
        new_s,
    ]);
    for e in rt.block_on(store.epochs()).expect("epochs") {
        assert!(
            e.open(&new_k, &g).is_ok(),
            "epoch {} opens with the new KEK",
            e.epoch
        );
        assert!(
            e.open(&old_k, &g).is_err(),
            "epoch {} no longer opens with the old",
            e.epoch
        );
        assert!(e.also_sealed.is_empty());
        assert_eq!(e.kek_fingerprint, new_k.fingerprint());
    }
    // No second epoch while one is pending (nobody activated epoch 2 here).
    let out = cli(&server, &["keys", "rotate", "--kek-file", new_s]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("epoch 2 is pending"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Activated (as the manager would), rotations go on under the new KEK,
    // keeping AES-256.
    let mut two = rt.block_on(store.epochs()).expect("epochs")[1].clone();
    two.state = calico_ipsec::datastore::ipsec::EpochState::Active;
    let json = serde_json::to_string(&two).expect("json");
    let put = server.etcdctl(&["put", "/calico/ipsec/v1/epochs/2", &json]);
    assert!(put.status.success());
    ok(&["keys", "rotate", "--kek-file", new_s]);
    let last = rt.block_on(store.epochs()).expect("epochs");
    assert_eq!(last.last().map(|e| (e.epoch, e.key_bits)), Some((3, 256)));
}
