//! Two real `calico-ipsec manager` processes against a real etcd (Debian's
//! etcd-server on a free loopback port).
//!
//! The node agents are stood in for by this test, which writes their leased
//! status records: a real agent cannot acknowledge a phase with SAs on this
//! machine's kernel (no ESP). The VM suites (tests/e2e/test_lifecycle.sh,
//! test_faults.sh) run the real agents.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use calico_ipsec::config::EtcdConfig;
use calico_ipsec::datastore::aggregate::{Aggregate, Revs};
use calico_ipsec::datastore::etcd::{Etcd, EtcdSettings};
use calico_ipsec::datastore::ipsec::{
    encode, identities_digest, nodeid_key, now_rfc3339, ClusterConfig, EpochState, Identity,
    IpsecStore, NodeStatus, Phase,
};
use common::etcd::{manager_leader, EtcdServer};
use common::PLUGIN;

struct Manager {
    id: String,
    child: Child,
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn manager(server: &EtcdServer, kek: &std::path::Path, id: &str, log: &std::path::Path) -> Manager {
    let log = std::fs::File::create(log).expect("log file");
    let child = Command::new(PLUGIN)
        .args(["manager", "--etcd-endpoints", &server.endpoint, "--id", id])
        .args([
            "--listen",
            "none",
            "--lease-ttl-seconds",
            // 3 s, kept alive every 1 s: a tick slowed by a loaded machine
            // for under 2 s does not cost the lease.
            "3",
            "--interval-ms",
            "100",
        ])
        .arg("--kek-file")
        .arg(kek)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start manager");
    Manager {
        id: id.into(),
        child,
    }
}

/// Settings for the test's etcd, with a 2 s budget per request.
fn settings(server: &EtcdServer) -> EtcdSettings {
    EtcdSettings::from_config(
        &EtcdConfig {
            endpoints: vec![server.endpoint.clone()],
            ..EtcdConfig::default()
        },
        Duration::from_secs(2),
    )
}

/// Managers m1 and m2, logging into `dir`.
fn two_managers(server: &EtcdServer, kek: &std::path::Path, dir: &std::path::Path) -> Vec<Manager> {
    vec![
        manager(server, kek, "m1", &dir.join("m1.log")),
        manager(server, kek, "m2", &dir.join("m2.log")),
    ]
}

fn cli(server: &EtcdServer, args: &[&str]) {
    let out = Command::new(PLUGIN)
        .args(args)
        .args(["--etcd-endpoints", &server.endpoint])
        .output()
        .expect("run calico-ipsec");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Polls `f` every 50 ms for up to `secs`.
async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within {secs}s: {what}");
}

async fn config(etcd: &Etcd) -> ClusterConfig {
    IpsecStore::new(etcd)
        .config()
        .await
        .expect("read config")
        .expect("config exists")
}

async fn epochs(etcd: &Etcd) -> Vec<(u32, EpochState)> {
    IpsecStore::new(etcd)
        .epochs()
        .await
        .expect("epochs")
        .iter()
        .map(|e| (e.epoch, e.state))
        .collect()
}

/// The stand-in agents: each node's leased status.
struct Nodes {
    leases: BTreeMap<String, i64>,
    digest: String,
}

impl Nodes {
    /// Publishes an identity for each node and grants each a status lease.
    async fn start(etcd: &Etcd, names: &[&str]) -> Self {
        let mut ids = BTreeMap::new();
        let mut leases = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            let ident = Identity {
                id: u16::try_from(i + 1).expect("few"),
                incarnation: 1,
                boot_id: "b".into(),
            };
            etcd.put(&nodeid_key(name), encode(&ident), None)
                .await
                .expect("identity");
            ids.insert(name.to_string(), ident);
            leases.insert(name.to_string(), etcd.grant_lease(60).await.expect("lease"));
        }
        Nodes {
            leases,
            digest: identities_digest(&ids),
        }
    }

    async fn ack(&self, etcd: &Etcd, phase: Phase, gen: u64, installed: &[u32], active: u32) {
        for (i, (name, lease)) in self.leases.iter().enumerate() {
            let status = NodeStatus {
                id: u16::try_from(i + 1).expect("few nodes"),
                incarnation: 1,
                installed_epochs: installed.to_vec(),
                acked_phase: phase,
                acked_generation: gen,
                active_epoch: Some(active),
                heartbeat: now_rfc3339(),
                stale: false,
                identities: self.digest.clone(),
                handover: false,
                acked_rev: Some(IDS_AT),
                settled_rev: Some(IDS_AT),
                kek: String::new(),
                lost_epochs: vec![],
                seal: 2,
                ..Default::default()
            };
            IpsecStore::new(etcd)
                .put_status(name, &status, *lease)
                .await
                .expect("status");
        }
    }
}

#[test]
fn two_managers_step_only_on_acknowledgement_and_the_survivor_finishes_a_rotation() {
    common::require_root();
    let server = EtcdServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let kek = dir.path().join("kek");
    cli(
        &server,
        &[
            "keys",
            "init",
            "--kek-file",
            kek.to_str().expect("utf8"),
            "--overlap-seconds",
            "1",
            "--rotation-interval-seconds",
            "0",
        ],
    );
    let settings = settings(&server);
    let mut managers = two_managers(&server, &kek, dir.path());
    rt().block_on(async {
        let etcd = Etcd::connect(&settings).await.expect("connect");
        let nodes = Nodes::start(&etcd, &["node-1", "node-2"]).await;
        nodes.ack(&etcd, Phase::Off, 0, &[], 1).await;

        // Enable: each step waits for every node's acknowledgement of the last.
        cli(&server, &["enable"]);
        let mut gen = 0;
        for want in [Phase::Accept, Phase::Encrypt, Phase::Enforce] {
            eventually(10, &format!("phase {want:?}"), || async {
                config(&etcd).await.phase == want
            })
            .await;
            let c = config(&etcd).await;
            assert_eq!(
                c.phase_generation,
                gen + 1,
                "exactly one step per acknowledgement"
            );
            gen = c.phase_generation;
            if want != Phase::Enforce {
                // Not acknowledged yet: the managers must hold.
                tokio::time::sleep(Duration::from_millis(600)).await;
                let held = config(&etcd).await;
                assert_eq!(
                    (held.phase, held.phase_generation),
                    (want, gen),
                    "advanced without an acknowledgement"
                );
                // An acknowledgement made before a peer's incarnation counts for nothing.
                let stale = Nodes {
                    leases: nodes.leases.clone(),
                    digest: "0000".into(),
                };
                stale.ack(&etcd, want, gen, &[1], 1).await;
                tokio::time::sleep(Duration::from_millis(600)).await;
                assert_eq!(
                    config(&etcd).await.phase,
                    want,
                    "advanced on a stale identity digest"
                );
            }
            nodes.ack(&etcd, want, gen, &[1], 1).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            config(&etcd).await.phase_generation,
            gen,
            "no step past the target"
        );

        // Kill the leader, then rotate: the other manager must take over.
        let leader = manager_leader(&etcd).await;
        let idx = managers
            .iter()
            .position(|m| m.id == leader)
            .expect("known leader");
        let dead = managers.remove(idx);
        drop(dead);
        cli(
            &server,
            &["keys", "rotate", "--kek-file", kek.to_str().expect("utf8")],
        );
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            epochs(&etcd).await,
            vec![(1, EpochState::Active), (2, EpochState::Pending)],
            "activated before every node installed it"
        );
        nodes.ack(&etcd, Phase::Enforce, gen, &[1, 2], 1).await;
        eventually(10, "epoch 2 active", || async {
            epochs(&etcd).await == vec![(1, EpochState::Active), (2, EpochState::Active)]
        })
        .await;
        assert_eq!(manager_leader(&etcd).await, managers[0].id);
        // Epoch 1 stays until every node sends with 2 and the overlap passed.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            epochs(&etcd).await[0],
            (1, EpochState::Active),
            "retired while a node still sends with it"
        );
        nodes.ack(&etcd, Phase::Enforce, gen, &[1, 2], 2).await;
        eventually(10, "epoch 1 retired", || async {
            epochs(&etcd).await[0] == (1, EpochState::Retired)
        })
        .await;
        nodes.ack(&etcd, Phase::Enforce, gen, &[2], 2).await;
        eventually(10, "epoch 1 deleted", || async {
            epochs(&etcd).await == vec![(2, EpochState::Active)]
        })
        .await;

        // A node whose lease is gone no longer counts.
        cli(&server, &["disable"]);
        eventually(10, "phase encrypt", || async {
            config(&etcd).await.phase == Phase::Encrypt
        })
        .await;
        let gen = config(&etcd).await.phase_generation;
        let node2 = nodes.leases["node-2"];
        etcd.revoke_lease(node2).await.expect("revoke");
        let only1 = Nodes {
            leases: nodes
                .leases
                .iter()
                .filter(|(n, _)| *n == "node-1")
                .map(|(n, l)| (n.clone(), *l))
                .collect(),
            digest: nodes.digest.clone(),
        };
        only1.ack(&etcd, Phase::Encrypt, gen, &[2], 2).await;
        eventually(10, "phase accept with node-2 gone", || async {
            config(&etcd).await.phase == Phase::Accept
        })
        .await;
    });
}

#[test]
fn no_phase_step_past_a_node_calico_lists_until_its_agent_is_live_or_it_is_excluded() {
    common::require_root();
    let server = EtcdServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let kek = dir.path().join("kek");
    let kek_s = kek.to_str().expect("utf8");
    cli(&server, &["keys", "init", "--kek-file", kek_s]);
    let settings = settings(&server);
    let _m = manager(&server, &kek, "m1", &dir.path().join("m1.log"));
    rt().block_on(async {
        let etcd = Etcd::connect(&settings).await.expect("connect");
        let node_key = |n: &str| format!("/calico/resources/v3/projectcalico.org/nodes/{n}");
        for (i, name) in ["node-1", "node-2", "node-3"].iter().enumerate() {
            let node = format!(
                r#"{{"kind":"Node","apiVersion":"projectcalico.org/v3","metadata":{{"name":"{name}"}},"spec":{{"bgp":{{"ipv4Address":"10.0.0.1{i}/24"}}}}}}"#
            );
            etcd.put(&node_key(name), node.into_bytes(), None)
                .await
                .expect("node");
        }
        // Calico lists node-3; its agent never runs.
        let nodes = Nodes::start(&etcd, &["node-1", "node-2"]).await;
        nodes.ack(&etcd, Phase::Off, 0, &[], 1).await;
        cli(&server, &["enable"]);
        // Every live node acknowledged off, but node-3 is not following: the
        // manager names it (once it leads and has read the view; polled, as a
        // loaded machine may take a while), and takes no step past it.
        let log_path = dir.path().join("m1.log");
        let names_node3 = || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            log.contains("node-3") && log.contains("no live agent")
        };
        eventually(10, "the manager names node-3", || async { names_node3() }).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(config(&etcd).await.phase, Phase::Off, "no step past node-3");
        // The operator excludes it: the phase moves on.
        let mut cfg = config(&etcd).await;
        cfg.excluded_nodes = vec!["node-3".into()];
        etcd.put(&calico_ipsec::datastore::ipsec::config_key(), encode(&cfg), None)
            .await
            .expect("config");
        eventually(10, "the phase steps to accept once node-3 is excluded", || async {
            config(&etcd).await.phase == Phase::Accept
        })
        .await;
    });
}

/// The identity revision the simulated nodes acknowledge.
const IDS_AT: i64 = 40;

/// The leader's aggregate as etcd holds it, when it is exactly the one
/// computed from the statuses etcd holds now (`Some(None)`: rightly none,
/// while a status of an older release is live).
async fn exact_aggregate(etcd: &Etcd) -> Option<Option<Aggregate>> {
    let store = IpsecStore::new(etcd);
    let (Ok(written), Ok(live)) = (store.aggregate().await, store.statuses().await) else {
        return None;
    };
    (written == Aggregate::build(&live)).then_some(written)
}

/// True when an aggregate is written, is exact, and `f` holds of it.
async fn exact_aggregate_where(etcd: &Etcd, f: impl Fn(&Aggregate) -> bool) -> bool {
    exact_aggregate(etcd).await.flatten().is_some_and(|a| f(&a))
}

#[test]
fn the_aggregate_follows_every_status_across_a_leader_change_and_a_dead_agent() {
    common::require_root();
    let server = EtcdServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let kek = dir.path().join("kek");
    cli(
        &server,
        &["keys", "init", "--kek-file", kek.to_str().expect("utf8")],
    );
    let settings = settings(&server);
    let mut managers = two_managers(&server, &kek, dir.path());
    rt().block_on(async {
        let etcd = Etcd::connect(&settings).await.expect("connect");
        let nodes = Nodes::start(&etcd, &["node-1", "node-2", "node-3"]).await;
        nodes.ack(&etcd, Phase::Accept, 0, &[1], 1).await;
        eventually(10, "an aggregate equal to the statuses", || async {
            exact_aggregate(&etcd).await.is_some()
        })
        .await;
        let store = IpsecStore::new(&etcd);
        let steady = store.aggregate().await.expect("read").expect("written");
        assert!(steady.nodes.is_empty(), "a steady cluster names no node");
        assert_eq!(
            steady.common,
            Revs {
                acked: IDS_AT,
                settled: IDS_AT
            }
        );

        // node-2 hands over: named, with what its status says.
        let lease2 = nodes.leases["node-2"];
        let mut st = store
            .statuses()
            .await
            .expect("statuses")
            .into_iter()
            .find(|(n, _)| n == "node-2")
            .expect("node-2")
            .1;
        st.handover = true;
        st.settled_rev = Some(IDS_AT - 1);
        store.put_status("node-2", &st, lease2).await.expect("put");
        eventually(10, "node-2 named as handing over", || async {
            exact_aggregate_where(&etcd, |a| {
                a.nodes
                    .get("node-2")
                    .is_some_and(|r| r.settled == IDS_AT - 1)
            })
            .await
        })
        .await;

        // The leader dies; node-3 acknowledges other identities meanwhile.
        let leader = manager_leader(&etcd).await;
        managers.retain(|m| m.id != leader);
        let mut st3 = st.clone();
        st3.handover = false;
        st3.identities = "0000".into();
        st3.acked_rev = Some(IDS_AT + 5);
        st3.settled_rev = Some(IDS_AT + 5);
        st3.id = 3;
        store
            .put_status("node-3", &st3, nodes.leases["node-3"])
            .await
            .expect("put");
        eventually(
            15,
            "the new leader's aggregate says node-3's revisions",
            || async {
                exact_aggregate_where(&etcd, |a| {
                    a.peer("node-3")
                        == Revs {
                            acked: IDS_AT + 5,
                            settled: IDS_AT + 5,
                        }
                })
                .await
            },
        )
        .await;
        assert_eq!(manager_leader(&etcd).await, managers[0].id);

        // node-2's agent dies (its lease goes): it is no longer named.
        etcd.revoke_lease(lease2).await.expect("revoke");
        eventually(10, "node-2 no longer named", || async {
            exact_aggregate_where(&etcd, |a| !a.nodes.contains_key("node-2")).await
        })
        .await;

        // node-1 rolls back to a release without revisions: no aggregate
        // while it runs, so every node reads the statuses; and back.
        let mut old = st3.clone();
        old.acked_rev = None;
        old.settled_rev = None;
        old.id = 1;
        store
            .put_status("node-1", &old, nodes.leases["node-1"])
            .await
            .expect("put");
        eventually(
            10,
            "no aggregate while node-1 says no revisions",
            || async { exact_aggregate(&etcd).await == Some(None) },
        )
        .await;
        old.acked_rev = Some(IDS_AT + 5);
        old.settled_rev = Some(IDS_AT + 5);
        store
            .put_status("node-1", &old, nodes.leases["node-1"])
            .await
            .expect("put");
        eventually(
            10,
            "an aggregate again, node-1 and node-3 in step",
            || async {
                exact_aggregate_where(&etcd, |a| {
                    a.exact && a.nodes.is_empty() && a.common.acked == IDS_AT + 5
                })
                .await
            },
        )
        .await;
    });
}
