//! A real `calico-ipsec manager` against a real etcd holding status records
//! an agent never wrote: garbage and unleased records neither stall it nor
//! count as live nodes, an unreadable record under a live lease holds the
//! steps that need every node, `enable --wait` says why it waits, and
//! `/readyz` fails while the KEK cannot be read. Its metrics pass
//! `promtool check metrics`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use calico_ipsec::config::EtcdConfig;
use calico_ipsec::datastore::etcd::{Etcd, EtcdSettings};
use calico_ipsec::datastore::ipsec::{
    encode, identities_digest, node_key, now_rfc3339, IpsecStore, NodeStatus, Phase,
};
use common::etcd::{free_port, EtcdServer};
use common::probe;
use common::PLUGIN;

struct Manager(Child);

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(server: &EtcdServer, args: &[&str]) -> std::process::Output {
    Command::new(PLUGIN)
        .args(args)
        .args(["--etcd-endpoints", &server.endpoint])
        .output()
        .expect("run calico-ipsec")
}

fn status(phase: Phase, gen: u64) -> NodeStatus {
    NodeStatus {
        id: 1,
        incarnation: 1,
        installed_epochs: vec![1],
        acked_phase: phase,
        acked_generation: gen,
        active_epoch: Some(1),
        heartbeat: now_rfc3339(),
        stale: false,
        // No identity records: the digest of none, as the manager computes it.
        identities: identities_digest(&std::collections::BTreeMap::new()),
        handover: false,
        kek: String::new(),
        lost_epochs: vec![],
        seal: 2,
        ..Default::default()
    }
}

fn wait_phase(rt: &tokio::runtime::Runtime, etcd: &Etcd, want: Phase, secs: u64) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let cfg = rt
            .block_on(IpsecStore::new(etcd).config())
            .expect("config")
            .expect("initialised");
        if cfg.phase == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn garbage_status_records_do_not_stall_the_manager_and_its_probes_tell_the_truth() {
    common::require_root();
    let server = EtcdServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let kek = dir.path().join("kek");
    let kek_arg = kek.to_str().expect("utf8");
    let out = cli(&server, &["keys", "init", "--kek-file", kek_arg]);
    assert!(out.status.success(), "{out:?}");
    // Records no agent wrote: not JSON, and a well-formed one under no lease.
    server.put(&node_key("bogus"), "not json");
    server.put(
        &node_key("ghost"),
        &String::from_utf8(encode(&status(Phase::Off, 0))).expect("utf8"),
    );

    let port = free_port();
    let _m = Manager(
        Command::new(PLUGIN)
            .args([
                "manager",
                "--etcd-endpoints",
                &server.endpoint,
                "--id",
                "m1",
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--lease-ttl-seconds", "3", "--interval-ms", "100"])
            .args(["--kek-file", kek_arg])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("m1.log")).expect("log"))
            .spawn()
            .expect("start manager"),
    );
    let body = probe::wait_for(port, "/readyz", 200, 20);
    assert!(body.starts_with("ready (leader)"), "{body}");

    // No live node: `enable --wait` says so instead of guessing.
    let out = cli(&server, &["enable", "--wait", "--timeout-seconds", "3"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no node agent is alive"), "{stderr}");
    assert!(stderr.contains("manager m1 is waiting"), "{stderr}");

    let (_, metrics) = probe::get(port, "/metrics").expect("metrics");
    probe::promtool_check(&metrics);
    for line in [
        "calico_ipsec_manager_ignored_status_records{reason=\"unreadable\"} 0",
        "calico_ipsec_manager_ignored_status_records{reason=\"unleased\"} 2",
        "calico_ipsec_manager_live_nodes 0",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }

    let settings = EtcdSettings::from_config(
        &EtcdConfig {
            endpoints: vec![server.endpoint.clone()],
            ..EtcdConfig::default()
        },
        Duration::from_secs(2),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let etcd = rt.block_on(Etcd::connect(&settings)).expect("connect");
    // One real node acknowledges: the garbage does not hold the step.
    let lease = rt.block_on(etcd.grant_lease(60)).expect("lease");
    let store = IpsecStore::new(&etcd);
    rt.block_on(store.put_status("node-1", &status(Phase::Off, 0), lease))
        .expect("status");
    assert!(
        wait_phase(&rt, &etcd, Phase::Accept, 10),
        "the manager did not step past the garbage"
    );

    // An unreadable record under a live lease holds the next step, named.
    let lease9 = rt.block_on(etcd.grant_lease(60)).expect("lease");
    rt.block_on(etcd.put(&node_key("node-9"), b"{oops".to_vec(), Some(lease9)))
        .expect("put");
    rt.block_on(store.put_status("node-1", &status(Phase::Accept, 1), lease))
        .expect("status");
    assert!(
        !wait_phase(&rt, &etcd, Phase::Encrypt, 2),
        "stepped past a node it cannot read"
    );
    // The manager says why once it has decided on the new records; a loaded
    // machine may still show the reason before, so wait for this one.
    let end = Instant::now() + Duration::from_secs(10);
    let mut why = String::new();
    while Instant::now() < end {
        why = rt
            .block_on(calico_ipsec::manager::explain(&etcd))
            .expect("explain");
        if why.contains("node-9") && why.contains("cannot be read") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        why.contains("node-9") && why.contains("cannot be read"),
        "{why}"
    );
    assert_eq!(
        rt.block_on(IpsecStore::new(&etcd).config())
            .expect("config")
            .map(|c| c.phase),
        Some(Phase::Accept),
        "stepped past a node it cannot read"
    );
    rt.block_on(etcd.revoke_lease(lease9)).expect("revoke");
    assert!(
        wait_phase(&rt, &etcd, Phase::Encrypt, 10),
        "the step did not follow once the record's lease ended"
    );

    // The KEK gone: not ready (no epoch could be sealed), still alive.
    let saved = std::fs::read(&kek).expect("kek");
    std::fs::remove_file(&kek).expect("remove kek");
    let body = probe::wait_for(port, "/readyz", 503, 10);
    assert!(body.contains("KEK"), "{body}");
    assert_eq!(probe::get(port, "/livez").map(|r| r.0), Some(200));
    write_kek(&kek, &saved);
    probe::wait_for(port, "/readyz", 200, 10);
}

fn write_kek(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("kek");
    f.write_all(bytes).expect("write kek");
}
