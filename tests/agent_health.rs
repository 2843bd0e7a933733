//! A real `calico-ipsec agent` on the host (phase off: it owns no XFRM
//! state) against a real etcd: its probes tell the truth, its metrics pass
//! `promtool check metrics`, and it puts its conflist entry back each time
//! Calico's install-cni rewrites the file, while a reader never sees half a
//! file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use calico_ipsec::install::{plan_uninstall, Edit};
use serde_json::{json, Value};

use common::etcd::{free_port, EtcdServer};
use common::probe;
use common::PLUGIN;

struct Agent {
    child: Child,
    port: u16,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent(conf_dir: &Path, log: &Path) -> Agent {
    let port = free_port();
    let child = Command::new(PLUGIN)
        .arg("agent")
        .arg("--conf-dir")
        .arg(conf_dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--lease-ttl-seconds", "3", "--resync-seconds", "2"])
        .args(["--stale-grace-seconds", "1"])
        .env_remove("NODENAME")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("start the agent");
    Agent { child, port }
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(PLUGIN)
        .args(args)
        .env_remove("CNI_COMMAND")
        .output()
        .expect("run calico-ipsec")
}

/// Calico's conflist as install-cni writes it, pointing at `endpoint`.
fn calico_text(endpoint: &str) -> String {
    let mut v = common::fixture("10-calico.conflist");
    let calico = &mut v["plugins"][0];
    calico["etcd_endpoints"] = json!(endpoint);
    for f in ["etcd_key_file", "etcd_cert_file", "etcd_ca_cert_file"] {
        calico.as_object_mut().expect("object").remove(f);
    }
    serde_json::to_string_pretty(&v).expect("render") + "\n"
}

/// The same with our entry (as `install` and an operator left it) after Calico's.
fn installed_text(tmp: &Path, endpoint: &str) -> String {
    let mut v: Value = serde_json::from_str(&calico_text(endpoint)).expect("json");
    let entry = common::ipsec_entry(
        tmp,
        json!({"etcd_endpoints": endpoint, "kek_file": tmp.join("kek")}),
    );
    v["plugins"]
        .as_array_mut()
        .expect("plugins")
        .insert(1, entry);
    serde_json::to_string_pretty(&v).expect("render") + "\n"
}

fn our_entry(text: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(text).ok()?;
    v["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["type"] == "calico-ipsec")
        .cloned()
}

/// Writes `text` as install-cni does: a new file, renamed over the old one.
fn install_cni_writes(path: &Path, text: &str, n: usize) {
    let tmp = path.with_file_name(format!(".calico-install-{n}.tmp"));
    std::fs::write(&tmp, text).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename over");
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A real etcd holding the 3-node Calico fixture and initialised keys (the
/// KEK in `tmp/kek`), and `tmp/net.d` with Calico's conflist holding our
/// entry. Returns the server and the conflist's path.
fn initialised(tmp: &Path) -> (EtcdServer, PathBuf) {
    let server = EtcdServer::start();
    server.load_fixture(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/calico/etcd-3-nodes.json"
    )));
    let kek = tmp.join("kek");
    let out = run(&[
        "keys",
        "init",
        "--kek-file",
        kek.to_str().expect("utf8"),
        "--etcd-endpoints",
        &server.endpoint,
    ]);
    assert!(out.status.success(), "{out:?}");
    let conf_dir = tmp.join("net.d");
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    let path = conf_dir.join("10-calico.conflist");
    std::fs::write(&path, installed_text(tmp, &server.endpoint)).expect("write conflist");
    (server, path)
}

#[test]
fn the_agent_puts_its_entry_back_after_every_rewrite_and_its_probes_tell_the_truth() {
    common::require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let tmp = dir.path();
    let (mut server, path) = initialised(tmp);
    let conf_dir = tmp.join("net.d");
    let installed = std::fs::read_to_string(&path).expect("read conflist");
    let wanted = our_entry(&installed).expect("our entry");
    let calico = calico_text(&server.endpoint);

    let a = agent(&conf_dir, &tmp.join("agent.log"));
    let body = probe::wait_for(a.port, "/readyz", 200, 30);
    assert_eq!(body, "ready\n");
    assert_eq!(probe::get(a.port, "/livez").map(|r| r.0), Some(200));
    assert_eq!(probe::get(a.port, "/healthz").map(|r| r.0), Some(200));

    // A reader that parses the file in a loop, as the runtime's libcni does.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads, path) = (Arc::clone(&stop), Arc::clone(&reads), path.clone());
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::Relaxed) {
                let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
                let v: Value = serde_json::from_str(&text)
                    .map_err(|e| format!("a reader saw a broken conflist ({e}):\n{text}"))?;
                if v["plugins"][0]["type"] != "calico" {
                    return Err(format!("a reader saw a conflist without Calico:\n{text}"));
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let mut slowest = Duration::ZERO;
    let mut total = Duration::ZERO;
    for n in 0..100 {
        install_cni_writes(&path, &calico, n);
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(&path).expect("read");
            if let Some(e) = our_entry(&text) {
                assert_eq!(e, wanted, "rewrite {n}: the entry came back changed");
                assert_eq!(
                    plan_uninstall(&text).expect("plan"),
                    Edit::Changed(calico.clone()),
                    "rewrite {n}: something besides our entry changed"
                );
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "rewrite {n}: the entry was not back within 1s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        slowest = slowest.max(t.elapsed());
        total += t.elapsed();
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader").expect("no broken read");
    eprintln!(
        "100 rewrites: entry back in {:?} on average, {:?} at most; {} reads, none broken",
        total / 100,
        slowest,
        reads.load(Ordering::Relaxed)
    );
    // The agent counts a repair just after its rename lands, so the file can
    // show the 100th entry a moment before /metrics counts it: wait a little,
    // then hold it to exactly 100 (a repair counted twice fails too).
    let t = Instant::now();
    let metrics = loop {
        let (_, metrics) = probe::get(a.port, "/metrics").expect("metrics");
        let n = metric(&metrics, "calico_ipsec_conflist_repairs_total");
        if n == Some(100.0) || t.elapsed() > Duration::from_secs(2) {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        metric(&metrics, "calico_ipsec_conflist_repairs_total"),
        Some(100.0)
    );
    probe::promtool_check(&metrics);

    // Uninstall (with install's flags) is not undone by the running agent.
    let bin_dir = tmp.join("bin");
    std::fs::create_dir_all(&bin_dir).expect("mkdir");
    std::fs::write(bin_dir.join("calico-ipsec"), "binary").expect("fake binary");
    let conf = conf_dir.to_str().expect("utf8");
    let bin = bin_dir.to_str().expect("utf8");
    let out = run(&["uninstall", "--conf-dir", conf, "--bin-dir", bin]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !bin_dir.join("calico-ipsec").exists(),
        "--bin-dir removes the binary"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(std::fs::read_to_string(&path).expect("read"), calico);
    // install takes over again, and the agent keeps the entry from then on.
    let sys = tmp.join("sys-class-net");
    std::fs::create_dir_all(&sys).expect("mkdir");
    let sys = sys.to_str().expect("utf8");
    let out = run(&[
        "install",
        "--conf-dir",
        conf,
        "--skip-datastore-check",
        "--sys-class-net",
        sys,
    ]);
    assert!(out.status.success(), "{out:?}");
    install_cni_writes(&path, &calico, 100);
    let t = Instant::now();
    while our_entry(&std::fs::read_to_string(&path).expect("read")).is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "not repaired after install"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // etcd gone: still alive, not ready once the grace has passed.
    server.stop();
    // A convergence may fail first and say so; the stale reason follows
    // once the grace has passed.
    probe::wait_for_text(a.port, "/readyz", 503, "has not followed etcd", 15);
    let (code, body) = probe::get(a.port, "/livez").expect("livez");
    assert_eq!(code, 200);
    assert!(body.contains("stale"), "{body}");
}

#[test]
fn an_agent_that_never_converged_is_alive_but_not_ready() {
    common::require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let tmp = dir.path();
    let conf_dir: PathBuf = tmp.join("net.d");
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    // Nothing listens there.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    std::fs::write(
        conf_dir.join("10-calico.conflist"),
        installed_text(tmp, &endpoint),
    )
    .expect("write conflist");
    let a = agent(&conf_dir, &tmp.join("agent.log"));
    probe::wait_for(a.port, "/livez", 200, 10);
    std::thread::sleep(Duration::from_secs(2));
    let (code, body) = probe::get(a.port, "/readyz").expect("readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("first convergence"), "{body}");
    let (_, metrics) = probe::get(a.port, "/metrics").expect("metrics");
    probe::promtool_check(&metrics);
}

/// The status keys under `nodes/`, read with etcdctl.
fn status_keys(endpoint: &str) -> String {
    let out = Command::new("etcdctl")
        .args(["--endpoints", endpoint, "get", "--prefix", "--keys-only"])
        .arg("/calico/ipsec/v1/nodes/")
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success(), "kill {sig} {pid}");
}

#[test]
fn a_status_lost_with_its_lease_is_published_again() {
    common::require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let tmp = dir.path();
    let (server, path) = initialised(tmp);
    let conf_dir = path.parent().expect("net.d").to_path_buf();
    let log = tmp.join("agent.log");
    let a = agent(&conf_dir, &log);
    let wait = |want: bool, secs: u64, what: &str| {
        let t = Instant::now();
        while status_keys(&server.endpoint).is_empty() == want {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(t.elapsed() < Duration::from_secs(secs), "{what}:\n{tail}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait(true, 30, "the agent publishes a status");
    // Stopped past its 3 s lease (as a starved or paused node): the record
    // goes with the lease. Once it runs again, the agent must see that and
    // publish anew: the record is written only on change, so nothing else
    // would bring it back.
    let pid = a.child.id();
    signal(pid, "-STOP");
    wait(false, 20, "the status goes with its lease");
    signal(pid, "-CONT");
    wait(
        true,
        10,
        "the status is published again once the agent runs",
    );
}
