//! The agent's `/metrics` against a dump of the kernel, in the VM (`make
//! bench` boots it). With 1,000 peers installed (IPIP, enforce: 2,000
//! states and 3,000 policies) and the agent running, alternating in one run:
//! - a scrape of `/metrics` (an HTTP GET from this process, the whole
//!   answer read);
//! - `ip -s xfrm state`, the plain dump an operator would run (a process,
//!   output discarded);
//! - our own dump of the kernel's states and policies, in process (what
//!   every scrape cost before the agent served the counts its kernel
//!   notifications keep current).

#[path = "../tests/common/etcd.rs"]
mod etcd_server;
mod support;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use calico_ipsec::keys::Kek;
use calico_ipsec::xfrm::kernel::Xfrm;
use serde_json::json;
use support::{median, setup, time};

const LISTEN: &str = "127.0.0.1:9099";

/// GET `path` from the agent: (status line, body).
fn get(path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(LISTEN)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    ))
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    support::require_vm();
    for m in ["esp4", "xfrm_user", "gcm", "seqiv", "ipip"] {
        let _ = Command::new("modprobe").arg(m).status();
    }
    let peers: usize = std::env::var("E2E_BENCH_SCRAPE_PEERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let rounds: usize = std::env::var("E2E_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        * 10;
    let bin =
        std::env::var("CALICO_IPSEC").unwrap_or_else(|_| env!("CARGO_BIN_EXE_calico-ipsec").into());
    let tmp = tempfile::tempdir().expect("tempdir");
    let kek_path = tmp.path().join("kek");
    let kek = Kek::generate().expect("kek");
    kek.write_new(&kek_path).expect("kek file");
    let server = etcd_server::EtcdServer::start();
    setup(&server.endpoint, peers, &kek, "Always");
    let conf = tmp.path().join("conf.json");
    let entry = json!({
        "type": "calico-ipsec", "name": "bench", "cniVersion": "1.0.0",
        "etcd_endpoints": server.endpoint, "nodename": "node-1",
        "kek_file": kek_path, "state_dir": tmp.path().join("state"),
        "log_level": "warning", "etcd_timeout_ms": 30000, "ext_mtu": 1500,
    });
    std::fs::write(&conf, entry.to_string()).expect("conf");
    let _agent = Agent(
        Command::new(&bin)
            .args(["agent", "--config"])
            .arg(&conf)
            .args(["--listen", LISTEN, "--lease-ttl-seconds", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("agent"),
    );
    // Ready: the first convergence installed every peer's SAs.
    let want = format!("calico_ipsec_xfrm_states{{dir=\"out\"}} {peers}");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok((_, body)) = get("/metrics") {
            if body.contains(&want) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the agent did not converge");
        std::thread::sleep(Duration::from_millis(500));
    }
    let held = Xfrm::open().expect("xfrm").held().expect("dump");
    let (states, policies) = (held.states.len(), held.policies.len());

    let (mut scrape, mut ip, mut dump) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    for _ in 0..rounds {
        let start = Instant::now();
        let (status, body) = get("/metrics").expect("scrape");
        scrape.push(start.elapsed());
        assert!(status.contains(" 200 "), "{status}");
        bytes = body.len();
        let mut c = Command::new("ip");
        c.args(["-s", "xfrm", "state"]);
        ip.push(time(c));
        let start = Instant::now();
        let h = Xfrm::open().and_then(|mut x| x.held()).expect("dump");
        dump.push(start.elapsed());
        assert_eq!(h.states.len(), states);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (s, i, d) = (median(&mut scrape), median(&mut ip), median(&mut dump));
    let mut table = String::new();
    let _ = writeln!(
        table,
        "/metrics with {peers} peers ({states} states, {policies} policies; median of {rounds}; VM: Debian 6.1 under qemu TCG)\n\
         {:<44} {:>10} {:>8}\n\
         {:<44} {:>8.2}ms {:>7.3}x\n\
         {:<44} {:>8.2}ms {:>7.3}x\n\
         {:<44} {:>8.2}ms {:>7.3}x\n\
         (a scrape is {bytes} bytes)",
        "",
        "time",
        "ratio",
        "scrape of the agent's /metrics",
        ms(s),
        ms(s) / ms(i),
        "ip -s xfrm state (baseline)",
        ms(i),
        1.0,
        "in-process dump of states and policies",
        ms(d),
        ms(d) / ms(i),
    );
    print!("{table}");
    if let Ok(out) = std::env::var("E2E_OUT") {
        let _ = std::fs::write(Path::new(&out).join("bench-scrape.txt"), &table);
    }
}
