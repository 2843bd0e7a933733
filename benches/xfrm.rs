//! XFRM convergence against iproute2, in the VM (`make bench` boots it: the
//! machine's own kernel has no ESP). Every figure is measured in the same run
//! as its baseline, alternating, so machine noise hits both.
//!
//! For 100, 1,000 and 5,000 peers (etcd loaded with that many Calico nodes,
//! each with a published identity, phase enforce, one epoch):
//! - `calico-ipsec converge` from an empty kernel: a whole process that
//!   connects to etcd, reads the snapshot, unseals the epoch, derives every
//!   key and installs every state and policy;
//! - `ip -batch` installing the same objects (same addresses, SPIs, reqids,
//!   ESN, window, priority; keys random), one process;
//! - per-object `ip xfrm ...` calls, one process per object (up to 1,000
//!   peers: at 5,000 it would take the better part of an hour under TCG).
//!
//! The same with P-256 key agreement (`ipip+p256`, 1,000 and 5,000 peers,
//! every peer's public key published): on top, a MAC and a point check per
//! peer's key and an ECDH per peer, against the same `ip -batch` objects.
//!
//! Then a no-op ADD with 1,000 peers installed: calico-ipsec's ADD (reads
//! etcd, dumps the kernel, finds nothing to change) against the reference
//! `tuning` plugin's ADD setting the MTU, on the same pod.

#[path = "../tests/common/etcd.rs"]
mod etcd_server;
mod support;

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use calico_ipsec::datastore::etcd::Etcd;
use calico_ipsec::datastore::ipsec::{Identity, Phase};
use calico_ipsec::datastore::snapshot;
use calico_ipsec::keys::Kek;
use calico_ipsec::keys::{SaKey, SecretBytes};
use calico_ipsec::xfrm::kernel::Xfrm;
use calico_ipsec::xfrm::{Action, Desired, Dir, Held, Inputs, Mode, Plan, PRIORITY};
use serde_json::json;
use support::{median, rt, settings, setup, time};

const ME: &str = "node-1";

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .status()
        .expect("spawn");
    assert!(st.success(), "{args:?}");
}

fn flush() {
    sh(&["ip", "xfrm", "policy", "flush"]);
    sh(&["ip", "xfrm", "state", "flush"]);
}

fn held() -> (usize, usize) {
    let h = Xfrm::open().expect("xfrm").held().expect("dump");
    (h.states.len(), h.policies.len())
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("random");
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn mode(m: Mode) -> &'static str {
    match m {
        Mode::Transport => "transport",
        Mode::Tunnel => "tunnel",
    }
}

/// The same objects calico-ipsec installs, as `ip -batch` lines.
fn batch_lines(d: &Desired) -> Vec<String> {
    let mut out = Vec::new();
    for s in d.states.values() {
        out.push(format!(
            "xfrm state add src {} dst {} proto esp spi 0x{:08x} reqid {} mode {} \
             replay-window 128 flag esn aead rfc4106(gcm(aes)) 0x{} {}",
            s.src,
            s.dst,
            s.spi,
            s.reqid,
            mode(s.lane.mode()),
            random_hex(20),
            s.icv_bits
        ));
    }
    for p in d.policies.values() {
        let dir = match p.dir {
            Dir::Out => "out",
            Dir::In => "in",
            Dir::Fwd => "fwd",
        };
        let mut l = format!("xfrm policy add src {} dst {}", p.sel.src, p.sel.dst);
        if p.sel.proto != 0 {
            let _ = write!(l, " proto {}", p.sel.proto);
        }
        if p.sel.dport != 0 {
            let _ = write!(l, " dport {}", p.sel.dport);
        }
        let _ = write!(l, " dir {dir} priority {PRIORITY}");
        match p.action {
            Action::Block => l.push_str(" action block"),
            Action::Allow(t) => {
                let _ = write!(
                    l,
                    " tmpl src {} dst {} proto esp reqid {} mode {}{}",
                    t.src,
                    t.dst,
                    t.reqid,
                    mode(t.mode),
                    if t.optional { " level use" } else { "" }
                );
            }
        }
        out.push(l);
    }
    out
}

/// The floor: the same plan applied in this process through the project's
/// own netlink layer, in one batch per stage, keys random (no etcd, no
/// unsealing, no key derivation, no process start).
fn floor(d: &Desired) -> Duration {
    let plan = Plan::diff(d, &Held::default());
    let mut x = Xfrm::open().expect("xfrm");
    let start = std::time::Instant::now();
    x.apply(&plan, &Held::default(), |_| {
        let mut k = vec![0u8; 20];
        getrandom::fill(&mut k).map_err(|e| e.to_string())?;
        Ok(SaKey(SecretBytes::new(k)))
    })
    .expect("apply");
    start.elapsed()
}

struct Row {
    mode: &'static str,
    peers: usize,
    objects: usize,
    ours: Duration,
    batch: Duration,
    per_object: Option<Duration>,
    floor: Duration,
}

/// What node-1 installs; with `agreement`, as once every node's epoch key
/// is verified (node-1's own included).
fn desired(endpoint: &str, agreement: bool) -> Desired {
    let snap = rt()
        .block_on(async {
            let etcd = Etcd::connect(&settings(endpoint)).await?;
            snapshot::read(&etcd).await
        })
        .expect("snapshot");
    let me = Identity {
        id: 1,
        incarnation: 1,
        boot_id: String::new(),
    };
    let ready: std::collections::BTreeMap<u32, std::collections::BTreeSet<String>> = snap
        .epochs
        .iter()
        .filter(|_| agreement)
        .map(|e| (e.epoch, snap.topology.nodes.keys().cloned().collect()))
        .collect();
    Desired::compute(&Inputs {
        topology: &snap.topology,
        me: ME,
        my_identity: Some(&me),
        identities: &snap.identities,
        phase: Phase::Enforce,
        epochs: &snap.epochs,
        icv_bits: 128,
        agreement: &ready,
    })
    .expect("desired")
}

fn main() {
    support::require_vm();
    for m in ["esp4", "xfrm_user", "gcm", "seqiv"] {
        let _ = Command::new("modprobe").arg(m).status();
    }
    let rounds: usize = std::env::var("E2E_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let sizes = |var: &str, default: &str| -> Vec<usize> {
        std::env::var(var)
            .unwrap_or_else(|_| default.into())
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect()
    };
    // IPIP everywhere (transport mode), and no encapsulation (tunnel mode
    // over the pod blocks: per peer 4 states and 5 policies in enforce).
    // And IPIP with P-256 key agreement: an ECDH per peer, a MAC and a
    // point check per public key, on top of the same objects.
    let runs: Vec<(&'static str, usize, bool)> = sizes("E2E_BENCH_PEERS", "100 1000 5000")
        .into_iter()
        .map(|n| ("Always", n, false))
        .chain(
            sizes("E2E_BENCH_NATIVE_PEERS", "1000")
                .into_iter()
                .map(|n| ("Never", n, false)),
        )
        .chain(
            sizes("E2E_BENCH_AGREEMENT_PEERS", "1000 5000")
                .into_iter()
                .map(|n| ("Always", n, true)),
        )
        .collect();
    let tmp = tempfile::tempdir().expect("tempdir");
    let kek_path = tmp.path().join("kek");
    let kek = Kek::generate().expect("kek");
    kek.write_new(&kek_path).expect("kek file");
    // The binary under test: CALICO_IPSEC (`make bench` passes the static
    // musl build the image ships), else this build's.
    let bin_path =
        std::env::var("CALICO_IPSEC").unwrap_or_else(|_| env!("CARGO_BIN_EXE_calico-ipsec").into());
    let bin = bin_path.as_str();
    let kind = Command::new("file")
        .args(["-b", bin])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let kind = kind
        .split(", BuildID")
        .next()
        .unwrap_or_default()
        .to_string();
    let entry = |endpoint: &str, dir: &str| {
        json!({
            "type": "calico-ipsec", "name": "bench", "cniVersion": "1.0.0",
            "etcd_endpoints": endpoint, "nodename": ME,
            "kek_file": kek_path, "state_dir": tmp.path().join(dir),
            "agreement_dir": tmp.path().join("agreement"),
            "log_file_path": tmp.path().join("plugin.log"), "log_level": "warning",
            "etcd_timeout_ms": 30000, "ext_mtu": 1500,
        })
    };
    let mut rows = Vec::new();
    for &(pool_mode, peers, agreement) in &runs {
        // A fresh etcd per size.
        let server = etcd_server::EtcdServer::start();
        if agreement {
            // node-1 keeps its epoch key across the rounds (a restart, not
            // a reboot): the first round makes and publishes it.
            let _ = std::fs::remove_dir_all(tmp.path().join("agreement"));
            support::setup_agreement(&server.endpoint, peers, &kek, pool_mode);
        } else {
            setup(&server.endpoint, peers, &kek, pool_mode);
        }
        let want = desired(&server.endpoint, agreement);
        let lines = batch_lines(&want);
        let batch_file = tmp.path().join("batch");
        std::fs::write(&batch_file, lines.join("\n") + "\n").expect("batch");
        // Warm-up, untimed: the kernel instantiates and self-tests
        // rfc4106(gcm(aes)) on first use (seconds under TCG).
        flush();
        let mut c = Command::new("ip");
        c.arg("-batch").arg(&batch_file);
        time(c);
        let mut ours = Vec::new();
        let mut batch = Vec::new();
        let mut floors = Vec::new();
        for r in 0..rounds {
            flush();
            floors.push(floor(&want));
            assert_eq!(
                held(),
                (want.states.len(), want.policies.len()),
                "the floor installed all"
            );
            flush();
            // A fresh state dir each round: a new ledger, so a new incarnation
            // is published, exactly like a node's first start.
            let conf = tmp.path().join("conf.json");
            std::fs::write(
                &conf,
                entry(&server.endpoint, &format!("state-{peers}-{agreement}-{r}")).to_string(),
            )
            .expect("conf");
            let mut c = Command::new(bin);
            c.args(["converge", "--config"]).arg(&conf);
            if std::env::var_os("E2E_BENCH_LOG").is_some() {
                c.stdout(Stdio::inherit());
                let start = std::time::Instant::now();
                assert!(c.status().expect("spawn").success());
                ours.push(start.elapsed());
            } else {
                ours.push(time(c));
            }
            assert_eq!(
                held(),
                (want.states.len(), want.policies.len()),
                "converge installed all"
            );
            flush();
            let mut c = Command::new("ip");
            c.arg("-batch").arg(&batch_file);
            batch.push(time(c));
            assert_eq!(
                held(),
                (want.states.len(), want.policies.len()),
                "ip -batch installed all"
            );
        }
        let per_object = (peers <= 1000 && pool_mode == "Always" && !agreement).then(|| {
            flush();
            let start = std::time::Instant::now();
            for l in &lines {
                sh(&std::iter::once("ip")
                    .chain(l.split(' '))
                    .collect::<Vec<_>>());
            }
            let d = start.elapsed();
            assert_eq!(held(), (want.states.len(), want.policies.len()));
            d
        });
        let row = Row {
            mode: match (pool_mode, agreement) {
                ("Always", true) => "ipip+p256",
                ("Always", false) => "ipip",
                _ => "none",
            },
            peers,
            objects: lines.len(),
            ours: median(&mut ours),
            batch: median(&mut batch),
            per_object,
            floor: median(&mut floors),
        };
        eprintln!(
            "{pool_mode} {peers} peers: ours {:?}, ip -batch {:?}, floor {:?}, per-object {:?}",
            row.ours, row.batch, row.floor, row.per_object
        );
        rows.push(row);
    }

    // No-op ADD with 1,000 peers against tuning's ADD, on one pod.
    let server = etcd_server::EtcdServer::start();
    let noop = noop_add(
        &server.endpoint,
        &kek,
        &entry(&server.endpoint, "noop"),
        bin,
        rounds * 10,
    );

    let mut table = String::new();
    let _ = writeln!(
        table,
        "calico-ipsec: {bin}\n  ({kind})\n\
         XFRM convergence from empty (median of {rounds}; VM: Debian 6.1 under qemu TCG)\n\
         {:>9} {:>6} {:>8} {:>12} {:>12} {:>8} {:>12} {:>9} {:>14} {:>10}",
        "encap",
        "peers",
        "objects",
        "calico-ipsec",
        "ip -batch",
        "ratio",
        "floor",
        "vs floor",
        "per-object ip",
        "speed-up"
    );
    for r in &rows {
        let _ = writeln!(
            table,
            "{:>9} {:>6} {:>8} {:>10.1}ms {:>10.1}ms {:>7.2}x {:>10.1}ms {:>8.2}x {:>14} {:>10}",
            r.mode,
            r.peers,
            r.objects,
            ms(r.ours),
            ms(r.batch),
            ms(r.ours) / ms(r.batch),
            ms(r.floor),
            ms(r.ours) / ms(r.floor),
            r.per_object
                .map_or("-".into(), |d| format!("{:.0}ms", ms(d))),
            r.per_object
                .map_or("-".into(), |d| format!("{:.0}x", ms(d) / ms(r.ours)))
        );
    }
    if let Some(n) = noop {
        let _ = writeln!(
            table,
            "\nNo-op ADD with 1000 peers (median of {} each)\n{:<34} {:>12} {:>10} {:>8}",
            rounds * 10,
            "address-space randomisation",
            "calico-ipsec",
            "tuning",
            "ratio"
        );
        for (label, (ours, tuning)) in [
            ("on (as deployed)", n.deployed),
            ("off for both processes", n.fixed),
        ] {
            let _ = writeln!(
                table,
                "{label:<34} {:>10.1}ms {:>8.1}ms {:>7.2}x",
                ms(ours),
                ms(tuning),
                ms(ours) / ms(tuning)
            );
        }
    }
    print!("{table}");
    if let Ok(out) = std::env::var("E2E_OUT") {
        let _ = std::fs::write(Path::new(&out).join("bench-xfrm.txt"), &table);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The no-op ADD's medians, (calico-ipsec, tuning).
struct Noop {
    /// As deployed: address-space randomisation on.
    deployed: (Duration, Duration),
    /// Randomisation off for both processes.
    fixed: (Duration, Duration),
}

/// Alternates tuning ADD and calico-ipsec ADD on one pod with 1,000 peers
/// converged, with randomisation on and then off.
fn noop_add(
    endpoint: &str,
    kek: &Kek,
    entry: &serde_json::Value,
    bin: &str,
    rounds: usize,
) -> Option<Noop> {
    setup(endpoint, 1000, kek, "Always");
    flush();
    let pod = "benchpod";
    let _ = Command::new("ip").args(["netns", "del", pod]).status();
    sh(&["ip", "netns", "add", pod]);
    sh(&[
        "ip", "link", "add", "bench0", "mtu", "1500", "type", "veth", "peer", "name", "eth0",
        "netns", pod,
    ]);
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "bench0"}, {"name": "eth0", "sandbox": format!("/run/netns/{pod}")}],
        "ips": [{"address": "10.128.0.2/32", "interface": 1}],
    });
    let run = |ty: &str, conf: &serde_json::Value| {
        let mut c = Command::new(ty);
        c.env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "bench")
            .env("CNI_NETNS", format!("/run/netns/{pod}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni");
        let conf = conf.to_string();
        move || {
            let start = std::time::Instant::now();
            let mut child = c
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn");
            {
                use std::io::Write;
                let mut stdin = child.stdin.take().expect("stdin");
                stdin.write_all(conf.as_bytes()).expect("stdin");
            }
            let st = child.wait().expect("wait");
            assert!(st.success(), "ADD failed");
            start.elapsed()
        }
    };
    let mut ours_conf = entry.clone();
    ours_conf["prevResult"] = prev.clone();
    let tuning_conf = json!({
        "type": "tuning", "name": "bench", "cniVersion": "1.0.0", "mtu": 1446, "prevResult": prev,
    });
    let mut ours_run = run(bin, &ours_conf);
    let mut tuning_run = run("/usr/lib/cni/tuning", &tuning_conf);
    // The first ADD converges from empty; every later one is a no-op.
    ours_run();
    let (before, _) = held();
    let mut pass = || {
        let (mut ours, mut tuning) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            tuning.push(tuning_run());
            ours.push(ours_run());
        }
        (median(&mut ours), median(&mut tuning))
    };
    let deployed = pass();
    // The same again with address-space randomisation off for both
    // processes (inherited from this one, as `setarch -R` does): TCG caches
    // the translation of code by virtual address, so a PIE binary loaded at a
    // new random base has its code translated anew by every process, while a
    // position-dependent one (the Go plugins) reuses it. On hardware,
    // randomisation costs nothing measurable; `make bench`'s host ADD bench
    // shows both settings side by side.
    support::no_aslr();
    let fixed = pass();
    assert_eq!(held().0, before, "a no-op ADD changes nothing");
    let _ = Command::new("ip").args(["netns", "del", pod]).status();
    Some(Noop { deployed, fixed })
}
