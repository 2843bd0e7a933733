//! `make bench-scale`: what calico-ipsec costs one etcd at 100, 1,000 and
//! 5,000 nodes.
//!
//! Real parts: Debian's etcd on loopback, and the real manager (this build's
//! binary, its own process, so that its CPU and RSS are its own). The
//! nodes are simulated, in this process: each opens the watches the agent
//! opens on what changes during a step (the config, the epochs, the node
//! identities and the leader's aggregate; Calico's resources, which do not
//! change here, are not watched), allocates its id, publishes its
//! incarnation and its status under its lease with the crate's own
//! records and calls (`IpsecStore::node_id`, `identity`,
//! `publish_identity`, `put_status`), and acknowledges every step at once,
//! writing its status only when what it says changes. No SA is made: that
//! is the kernel's part, measured elsewhere.
//!
//! Per size, in one run: the time for all nodes to get their ids, etcd's
//! own counters (watch events sent, bytes sent to clients) per second idle
//! and during a step, the manager's CPU per wall second and RSS, and the
//! time for `enable --wait` and for one rotation with a 0 s overlap (from
//! `keys rotate` to the old epoch's deletion).
//!
//! Sizes: `BENCH_SCALE_NODES` (default "100 1000 5000").

#[path = "../tests/common/etcd.rs"]
mod etcd_server;
mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use calico_ipsec::datastore::aggregate::{aggregate_key, Aggregate};
use calico_ipsec::datastore::etcd::Etcd;
use calico_ipsec::datastore::ipsec::{
    config_key, identities_digest, ClusterConfig, EpochRecord, EpochState, Identity, IpsecStore,
    NodeStatus, Phase, PREFIX,
};
use calico_ipsec::datastore::records::SEAL_NEWEST;
use calico_ipsec::keys::Kek;
use etcd_client::{EventType, WatchOptions};

const BIN: &str = env!("CARGO_BIN_EXE_calico-ipsec");
const LEASE_TTL: i64 = 30;
/// Simulated nodes per etcd connection.
const PER_CONNECTION: usize = 100;

/// The node identities, kept by one watch of the simulator: every node's
/// digest of them is the same, so it is computed once per change (the
/// simulator's shortcut; each node still opens its own watch on them).
#[derive(Default)]
struct Shared {
    ids: Mutex<Ids>,
    /// What each node's status last said of `settled_rev`.
    settled: Mutex<BTreeMap<String, i64>>,
}

/// The identity records as the simulator's one watch sees them.
#[derive(Default)]
struct Ids {
    ids: BTreeMap<String, Identity>,
    digest: String,
    /// Each record's `mod_revision`, by node, and the same sorted.
    revs: BTreeMap<String, i64>,
    by_rev: std::collections::BTreeSet<(i64, String)>,
}

impl Ids {
    fn newest(&self) -> i64 {
        self.by_rev.last().map_or(0, |(r, _)| *r)
    }
}

/// What a node's watches told it.
#[derive(Default, Clone)]
struct Seen {
    config: Option<ClusterConfig>,
    epochs: BTreeMap<u32, EpochRecord>,
    acks: Option<Aggregate>,
}

/// The hand-over as the agent does it with keys that bind both ends, for
/// one node: a pair whose newer identity is past what the node last
/// switched at waits until the leader's aggregate says the peer converged
/// with it. Returns (acked, settled).
#[derive(Default)]
struct Handover {
    /// Every pair up to this revision is switched.
    switched: i64,
    /// The node held SAs at its last status.
    on: bool,
}

impl Handover {
    fn revs(&mut self, me: &str, on: bool, ids: &Ids, agg: Option<&Aggregate>) -> (i64, i64) {
        let acked = ids.newest();
        if !on || !self.on {
            // No older SA to hand over from.
            self.on = on;
            self.switched = acked;
            return if on { (acked, acked) } else { (0, 0) };
        }
        let mine = ids.revs.get(me).copied().unwrap_or(0);
        let reached = |peer: &str, q: i64| agg.is_some_and(|a| a.peer(peer).acked >= q);
        let mut pending: Option<i64> = None;
        if mine > self.switched {
            // This node's new incarnation: every pair waits.
            let all = agg.is_some_and(|a| {
                a.common.acked >= mine && a.nodes.iter().all(|(n, r)| n == me || r.acked >= mine)
            });
            if !all {
                pending = Some(mine - 1);
            }
        } else {
            for (rev, peer) in ids
                .by_rev
                .iter()
                .rev()
                .take_while(|(r, _)| *r > self.switched)
            {
                let q = (*rev).max(mine);
                if peer != me && !reached(peer, q) {
                    pending = Some(pending.map_or(q - 1, |p: i64| p.min(q - 1)));
                }
            }
        }
        match pending {
            None => {
                self.switched = acked;
                (acked, acked)
            }
            Some(p) => (acked, p.min(acked)),
        }
    }
}

/// The status a node with `seen` publishes (the agent's rules, without SAs).
fn status_of(seen: &Seen, id: u16, incarnation: u32, digest: &str, revs: (i64, i64)) -> NodeStatus {
    let Some(cfg) = &seen.config else {
        return NodeStatus::default();
    };
    let on = cfg.phase != Phase::Off;
    let installed: Vec<u32> = seen
        .epochs
        .values()
        .filter(|e| on && e.state != EpochState::Retired)
        .map(|e| e.epoch)
        .collect();
    let active = seen
        .epochs
        .values()
        .filter(|e| on && e.state == EpochState::Active)
        .map(|e| e.epoch)
        .max();
    NodeStatus {
        id,
        incarnation,
        installed_epochs: installed,
        acked_phase: cfg.phase,
        acked_generation: cfg.phase_generation,
        active_epoch: active,
        identities: if on {
            digest.to_string()
        } else {
            String::new()
        },
        handover: revs.1 < revs.0,
        acked_rev: Some(revs.0),
        settled_rev: Some(revs.1),
        seal: SEAL_NEWEST,
        ..NodeStatus::default()
    }
}

/// One simulated node, for ever.
async fn node(etcd: Etcd, name: String, shared: Arc<Shared>, ready: Arc<()>) {
    let store = IpsecStore::new(&etcd);
    let id = loop {
        match store.node_id(&name).await {
            Ok(id) => break id,
            Err(e) => {
                eprintln!("{name}: id: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // The agent publishes its incarnation at its first convergence, in
    // phase off too.
    let mut incarnation = 0u32;
    while incarnation == 0 {
        if let Ok((mut ident, rev)) = store.identity(&name).await {
            ident.incarnation += 1;
            ident.boot_id = "simulated".into();
            if let Ok(Some(_)) = store.publish_identity(&name, &ident, rev).await {
                incarnation = ident.incarnation;
            }
        }
    }
    drop(ready);
    let lease = loop {
        match etcd.grant_lease(LEASE_TTL).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    // The lease's keep-alive, every TTL/3, as the agent does.
    {
        let etcd = etcd.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs((LEASE_TTL / 3) as u64)).await;
                let _ = etcd.keep_alive_once(lease).await;
            }
        });
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
    let seen = Arc::new(Mutex::new(Seen::default()));
    for prefix in [
        config_key(),
        format!("{PREFIX}epochs/"),
        format!("{PREFIX}nodeids/"),
        aggregate_key(),
    ] {
        let (etcd, tx, seen) = (etcd.clone(), tx.clone(), Arc::clone(&seen));
        tokio::spawn(async move {
            // The identities are followed once for all (`Shared`): this
            // node's watch only receives them, from now on; the other
            // prefixes are read first, as the agent reads them.
            let ids = prefix.ends_with("nodeids/");
            let read = if ids { &aggregate_key() } else { &prefix };
            let (rev, kvs) = loop {
                match etcd.get_prefix(read, false).await {
                    Ok(r) => break r,
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            };
            for kv in kvs.iter().filter(|_| !ids) {
                absorb(&seen, &kv.key, Some(&kv.value));
            }
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(rev + 1);
            let mut w = loop {
                match etcd.watch(&prefix, opts.clone()).await {
                    Ok(w) => break w,
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            };
            let _ = tx.try_send(());
            while let Ok(Some(resp)) = w.stream.message().await {
                for ev in resp.events() {
                    if let Some(kv) = ev.kv() {
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        let value = (ev.event_type() == EventType::Put).then(|| kv.value());
                        absorb(&seen, &key, value);
                    }
                }
                let _ = tx.try_send(());
            }
        });
    }
    let mut last: Option<NodeStatus> = None;
    let mut handover = Handover::default();
    while rx.recv().await.is_some() {
        while rx.try_recv().is_ok() {}
        let now = seen.lock().map(|s| s.clone()).unwrap_or_default();
        let on = now.config.as_ref().is_some_and(|c| c.phase != Phase::Off);
        let (digest, revs) = match shared.ids.lock() {
            Ok(g) => (
                g.digest.clone(),
                handover.revs(&name, on, &g, now.acks.as_ref()),
            ),
            Err(_) => continue,
        };
        let st = status_of(&now, id, incarnation, &digest, revs);
        if last.as_ref() != Some(&st) && store.put_status(&name, &st, lease).await.is_ok() {
            if let Ok(mut g) = shared.settled.lock() {
                g.insert(name.clone(), revs.1);
            }
            last = Some(st);
        }
    }
}

fn absorb(seen: &Mutex<Seen>, key: &str, value: Option<&[u8]>) {
    let Ok(mut s) = seen.lock() else { return };
    if key == config_key() {
        s.config = value.and_then(|v| serde_json::from_slice(v).ok());
    } else if key == aggregate_key() {
        s.acks = value.and_then(|v| serde_json::from_slice(v).ok());
    } else if let Some(n) = key.strip_prefix(&format!("{PREFIX}epochs/")) {
        let Ok(n) = n.parse::<u32>() else { return };
        match value.and_then(|v| serde_json::from_slice::<EpochRecord>(v).ok()) {
            Some(e) => s.epochs.insert(n, e),
            None => s.epochs.remove(&n),
        };
    }
}

/// Keeps [`Shared`] from one watch of `nodeids/`.
async fn follow_ids(etcd: Etcd, shared: Arc<Shared>) {
    let prefix = format!("{PREFIX}nodeids/");
    let (rev, kvs) = etcd.get_prefix(&prefix, false).await.expect("read");
    let set = |key: &str, v: Option<&[u8]>, at: i64| {
        let Some(name) = key.strip_prefix(&prefix) else {
            return;
        };
        let Ok(mut g) = shared.ids.lock() else { return };
        if let Some(old) = g.revs.remove(name) {
            g.by_rev.remove(&(old, name.to_string()));
        }
        match v.and_then(|v| serde_json::from_slice::<Identity>(v).ok()) {
            Some(i) => {
                g.ids.insert(name.to_string(), i);
                g.revs.insert(name.to_string(), at);
                g.by_rev.insert((at, name.to_string()));
            }
            None => {
                g.ids.remove(name);
            }
        };
        g.digest = identities_digest(&g.ids);
    };
    for kv in kvs {
        set(&kv.key, Some(&kv.value), kv.mod_revision);
    }
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(rev + 1);
    let mut w = etcd.watch(&prefix, opts).await.expect("watch");
    while let Ok(Some(resp)) = w.stream.message().await {
        for ev in resp.events() {
            if let Some(kv) = ev.kv() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                set(
                    &key,
                    (ev.event_type() == EventType::Put).then(|| kv.value()),
                    kv.mod_revision(),
                );
            }
        }
    }
}

/// etcd's counters: watch events sent, bytes sent to clients.
fn counters(endpoint: &str) -> (f64, f64) {
    let addr = endpoint.trim_start_matches("http://");
    let mut body = String::new();
    if let Ok(mut s) = std::net::TcpStream::connect(addr) {
        let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        let _ = s.read_to_string(&mut body);
    }
    let sum = |name: &str| {
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (
        sum("etcd_debugging_mvcc_events_total"),
        sum("etcd_network_client_grpc_sent_bytes_total"),
    )
}

/// A process's CPU seconds (user + system) and RSS in MiB.
fn cpu_rss(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0;
    (cpu, rss)
}

/// etcd's counters and the manager's CPU over `window`.
struct Window {
    events: f64,
    bytes: f64,
    cpu: f64,
    secs: f64,
}

fn measure<T>(endpoint: &str, pid: u32, f: impl FnOnce() -> T) -> (T, Window) {
    let (e0, b0) = counters(endpoint);
    let (c0, _) = cpu_rss(pid);
    let t = Instant::now();
    let out = f();
    let secs = t.elapsed().as_secs_f64();
    let (e1, b1) = counters(endpoint);
    let (c1, _) = cpu_rss(pid);
    let w = Window {
        events: e1 - e0,
        bytes: b1 - b0,
        cpu: c1 - c0,
        secs,
    };
    (out, w)
}

fn cli(endpoint: &str, args: &[&str]) {
    let out = Command::new(BIN)
        .args(args)
        .args(["--etcd-endpoints", endpoint])
        .output()
        .expect("run calico-ipsec");
    assert!(
        out.status.success(),
        "calico-ipsec {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn epochs(rt: &tokio::runtime::Runtime, etcd: &Etcd) -> Vec<(u32, EpochState)> {
    rt.block_on(IpsecStore::new(etcd).epochs_lenient())
        .map(|(e, _)| e.iter().map(|(r, _)| (r.epoch, r.state)).collect())
        .unwrap_or_default()
}

fn row(n: usize) -> String {
    let server = etcd_server::EtcdServer::start();
    let endpoint = server.endpoint.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let kek_path = dir.path().join("kek");
    let kek = Kek::generate().expect("kek");
    kek.write_new(&kek_path).expect("kek file");
    let config = ClusterConfig {
        overlap_seconds: 0,
        rotation_interval_seconds: 0,
        ..ClusterConfig::default()
    };
    support::load(&endpoint, &kek, n, &config);
    let mut manager: Child = Command::new(BIN)
        .args(["manager", "--etcd-endpoints", &endpoint, "--kek-file"])
        .arg(&kek_path)
        .args([
            "--id",
            "m1",
            "--listen",
            "none",
            "--lease-ttl-seconds",
            "15",
        ])
        .stdout(Stdio::null())
        .stderr(match std::env::var_os("BENCH_SCALE_MANAGER_LOG") {
            Some(p) => std::fs::File::create(p).map_or_else(|_| Stdio::null(), Stdio::from),
            None => Stdio::null(),
        })
        .spawn()
        .expect("manager");
    let pid = manager.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let shared = Arc::new(Shared::default());
    let ready = Arc::new(());
    let started = Instant::now();
    let clients: Vec<Etcd> = (0..n.div_ceil(PER_CONNECTION))
        .map(|_| {
            rt.block_on(Etcd::connect(&support::settings(&endpoint)))
                .expect("connect")
        })
        .collect();
    rt.spawn(follow_ids(clients[0].clone(), Arc::clone(&shared)));
    for i in 0..n {
        let etcd = clients[i / PER_CONNECTION].clone();
        rt.spawn(node(
            etcd,
            format!("node-{}", i + 1),
            Arc::clone(&shared),
            Arc::clone(&ready),
        ));
    }
    while Arc::strong_count(&ready) > 1 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ids_secs = started.elapsed().as_secs_f64();
    let etcd = clients[0].clone();
    let live = || {
        rt.block_on(IpsecStore::new(&etcd).statuses())
            .map(|s| s.len())
            .unwrap_or(0)
    };
    while live() < n {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let (_, idle_off) = measure(&endpoint, pid, || {
        std::thread::sleep(Duration::from_secs(10))
    });
    let (_, enable) = measure(&endpoint, pid, || {
        cli(&endpoint, &["enable", "--wait", "--timeout-seconds", "600"])
    });
    std::thread::sleep(Duration::from_secs(3));
    let (_, idle) = measure(&endpoint, pid, || {
        std::thread::sleep(Duration::from_secs(10))
    });
    let (_, rss) = cpu_rss(pid);
    // The floor for one round of N status writes: every simulated node's
    // connection writes a status-sized value for each of its nodes at
    // once, as a step's acknowledgements do, with no manager involved.
    let floor = {
        let value = serde_json::to_vec(&NodeStatus::default()).unwrap_or_default();
        let t = Instant::now();
        rt.block_on(async {
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n {
                let (etcd, value) = (clients[i / PER_CONNECTION].clone(), value.clone());
                tasks.push(tokio::spawn(async move {
                    let key = format!("/bench/floor/node-{i}");
                    let _ = etcd.put(&key, value.clone(), None).await;
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
        t.elapsed().as_secs_f64()
    };
    let kek_arg = kek_path.to_string_lossy().into_owned();
    // Who used the 2 cores during the rotation: the manager (in the
    // window), etcd and this process (the simulated nodes).
    let others = || {
        let etcd_cpu = server.pid().map_or(0.0, |p| cpu_rss(p).0);
        (etcd_cpu, cpu_rss(std::process::id()).0)
    };
    let before = others();
    let (_, rotation) = measure(&endpoint, pid, || {
        cli(&endpoint, &["keys", "rotate", "--kek-file", &kek_arg]);
        let deadline = Instant::now() + Duration::from_secs(600);
        while Instant::now() < deadline {
            let e = epochs(&rt, &etcd);
            if e.len() == 1 && e[0] == (2, EpochState::Active) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let after = others();
    let etcd_cores = (after.0 - before.0) / rotation.secs;
    let sim_cores = (after.1 - before.1) / rotation.secs;
    // One node's new incarnation (a reboot): every node converges with the
    // new identities, node-1 and every peer hand over through the leader's
    // aggregate, until every status says the new record is settled.
    let (_, reboot) = measure(&endpoint, pid, || {
        let at = rt.block_on(async {
            let s = IpsecStore::new(&etcd);
            let (mut ident, rev) = s.identity("node-1").await.ok()?;
            ident.incarnation += 1;
            s.publish_identity("node-1", &ident, rev).await.ok()?
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let settled = || {
            shared
                .settled
                .lock()
                .map(|g| g.len() == n && g.values().all(|s| at.is_some_and(|a| *s >= a)))
                .unwrap_or(false)
        };
        while Instant::now() < deadline && !settled() {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            settled(),
            "{n} nodes: the hand-over after node-1's new incarnation did not settle within 120 s"
        );
    });
    let _ = manager.kill();
    let _ = manager.wait();
    rt.shutdown_timeout(Duration::from_secs(1));
    let per_node = |w: &Window, x: f64| x / w.secs / n as f64;
    format!(
        "| {n} | {ids_secs:.1} s | {:.2} / {:.0} B | {:.2} / {:.0} B | {:.1} % | {rss:.0} MiB | {:.1} s ({:.0} ev, {:.1} MB) | {:.1} s ({:.0} ev, {:.1} MB) | {:.1} % | {etcd_cores:.2} / {sim_cores:.2} | {floor:.2} s | {:.1} | {:.1} s ({:.0} ev, {:.1} MB) |",
        per_node(&idle_off, idle_off.events),
        per_node(&idle_off, idle_off.bytes),
        per_node(&idle, idle.events),
        per_node(&idle, idle.bytes),
        idle.cpu / idle.secs * 100.0,
        enable.secs,
        enable.events,
        enable.bytes / 1e6,
        rotation.secs,
        rotation.events,
        rotation.bytes / 1e6,
        rotation.cpu / rotation.secs * 100.0,
        rotation.secs / floor,
        reboot.secs,
        reboot.events,
        reboot.bytes / 1e6,
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("BENCH_SCALE_NODES")
        .unwrap_or_else(|_| "100 1000 5000".into())
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    println!("| nodes | ids and incarnations, all nodes | idle (off): events/node/s / bytes/node/s | idle (enforce): events/node/s / bytes/node/s | manager CPU idle | manager RSS | enable --wait (etcd events, bytes sent) | rotation, overlap 0 (events, bytes) | manager CPU in rotation | etcd / simulator cores in rotation | N status puts at once (floor) | rotation / floor | one node's new incarnation, until every node settled (events, bytes) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        println!("{}", row(n));
    }
}
