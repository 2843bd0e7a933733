//! A real three-member etcd cluster (Debian's etcd-server) on free loopback
//! ports, each member in its own temporary data directory, with the faults a
//! real cluster sees: a member killed (SIGKILL) and respawned, hung (SIGSTOP)
//! and resumed (SIGCONT), or cut off from its peers (a minority member that
//! lost its leader) and healed.
//!
//! Peer traffic goes through a proxy per member (the advertised peer URL),
//! which tells the connecting member by the socket's owner (/proc) and can
//! drop everything to and from one member: a network partition without
//! touching the host's firewall. Everything is killed on drop.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::etcd::free_port;

struct Node {
    name: String,
    data: PathBuf,
    client_port: u16,
    peer_port: u16,
    proxy_port: u16,
    child: Option<Child>,
    stopped: bool,
}

#[derive(Default)]
struct Links {
    /// Members cut off from the others.
    isolated: HashSet<usize>,
    /// Proxied connections: (from member, to member, the two sockets).
    conns: Vec<(Option<usize>, usize, TcpStream, TcpStream)>,
    /// Each member's pid, to tell who connects.
    pids: Vec<Option<u32>>,
}

/// A running three-member cluster.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    links: Arc<Mutex<Links>>,
    stop: Arc<AtomicBool>,
    initial_cluster: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The inode of the loopback socket connected from `from_port` to `to_port`,
/// as this thread's network namespace lists it.
fn socket_inode(from_port: u16, to_port: u16) -> Option<String> {
    let local = format!("0100007F:{from_port:04X}");
    let remote = format!("0100007F:{to_port:04X}");
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && f[1] == local && f[2] == remote).then(|| f[9].to_string())
    })
}

/// Which member owns the socket connected from `from_port` to `to_port`.
fn owner(links: &Mutex<Links>, from_port: u16, to_port: u16) -> Option<usize> {
    let inode = socket_inode(from_port, to_port)?;
    let want = format!("socket:[{inode}]");
    let pids = lock(links).pids.clone();
    pids.iter().enumerate().find_map(|(i, pid)| {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", (*pid)?)).ok()?;
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
            .then_some(i)
    })
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16384];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Forwards connections to member `dst`'s advertised peer port to its real one.
fn proxy(
    listener: TcpListener,
    dst: usize,
    real: u16,
    links: Arc<Mutex<Links>>,
    stop: Arc<AtomicBool>,
) {
    let proxy_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    while !stop.load(Ordering::Relaxed) {
        let (conn, peer) = match listener.accept() {
            Ok(c) => c,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let _ = conn.set_nonblocking(false);
        let src = owner(&links, peer.port(), proxy_port);
        let cut = {
            let l = lock(&links);
            l.isolated.contains(&dst) || src.is_some_and(|s| l.isolated.contains(&s))
        };
        if cut {
            let _ = conn.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(upstream) = TcpStream::connect(("127.0.0.1", real)) else {
            let _ = conn.shutdown(Shutdown::Both);
            continue;
        };
        let (Ok(c2), Ok(u2)) = (conn.try_clone(), upstream.try_clone()) else {
            continue;
        };
        if let (Ok(c3), Ok(u3)) = (conn.try_clone(), upstream.try_clone()) {
            lock(&links).conns.push((src, dst, c3, u3));
        }
        std::thread::spawn(move || pipe(conn, upstream));
        std::thread::spawn(move || pipe(u2, c2));
    }
}

impl EtcdCluster {
    /// Starts three members and waits until the cluster is healthy.
    pub fn start() -> Self {
        assert!(
            Path::new("/usr/bin/etcd").exists(),
            "etcd is not installed (apt-get install etcd-server etcd-client)"
        );
        // Data on tmpfs where there is one: three members fsync a lot.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("tempdir");
        let links = Arc::new(Mutex::new(Links::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut nodes = Vec::new();
        for i in 0..3 {
            let listener = TcpListener::bind("127.0.0.1:0").expect("proxy port");
            let proxy_port = listener.local_addr().expect("addr").port();
            let peer_port = free_port();
            let (l, s) = (Arc::clone(&links), Arc::clone(&stop));
            std::thread::spawn(move || proxy(listener, i, peer_port, l, s));
            nodes.push(Node {
                name: format!("m{i}"),
                data: dir.path().join(format!("m{i}")),
                client_port: free_port(),
                peer_port,
                proxy_port,
                child: None,
                stopped: false,
            });
        }
        lock(&links).pids = vec![None; 3];
        let initial_cluster = nodes
            .iter()
            .map(|n| format!("{}=http://127.0.0.1:{}", n.name, n.proxy_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            dir,
            nodes,
            links,
            stop,
            initial_cluster,
        };
        for i in 0..3 {
            c.spawn(i);
        }
        c.wait_healthy(None);
        c
    }

    fn spawn(&mut self, i: usize) {
        let n = &self.nodes[i];
        let client = format!("http://127.0.0.1:{}", n.client_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", n.name)))
            .expect("log file");
        let child = Command::new("/usr/bin/etcd")
            .args(["--name", &n.name, "--data-dir"])
            .arg(&n.data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", n.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", n.proxy_port))
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new", "--initial-cluster-token"])
            .arg(self.dir.path().file_name().expect("dir name"))
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn etcd");
        lock(&self.links).pids[i] = Some(child.id());
        self.nodes[i].child = Some(child);
        self.nodes[i].stopped = false;
    }

    /// The members' client URLs, in order.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("http://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// The client URLs, comma-separated as in `etcd_endpoints`.
    pub fn endpoints_csv(&self) -> String {
        self.endpoints().join(",")
    }

    /// etcdctl against the given members.
    pub fn etcdctl_at(&self, members: &[usize], args: &[&str]) -> std::process::Output {
        let eps = self.endpoints();
        let eps: Vec<&str> = members.iter().map(|&i| eps[i].as_str()).collect();
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--dial-timeout",
                "1s",
                "--command-timeout",
                "2s",
                "--endpoints",
            ])
            .arg(eps.join(","))
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    /// The members that are up (neither killed nor hung).
    fn up(&self) -> Vec<usize> {
        (0..3)
            .filter(|&i| self.nodes[i].child.is_some() && !self.nodes[i].stopped)
            .collect()
    }

    /// Waits until `member` (or every member that is up) reports healthy.
    pub fn wait_healthy(&self, member: Option<usize>) {
        let members = member.map_or_else(|| self.up(), |m| vec![m]);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if self
                .etcdctl_at(&members, &["endpoint", "health"])
                .status
                .success()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let logs: String = self
            .nodes
            .iter()
            .map(|n| {
                std::fs::read_to_string(self.dir.path().join(format!("{}.log", n.name)))
                    .unwrap_or_default()
            })
            .collect();
        panic!("etcd members {members:?} did not become healthy: {logs}");
    }

    /// The member that is raft leader now, as the members that are up say.
    pub fn leader(&self) -> Option<usize> {
        let out = self.etcdctl_at(&self.up(), &["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let rows = v.as_array()?;
        let leader = rows.iter().find_map(|r| r["Status"]["leader"].as_u64())?;
        let eps = self.endpoints();
        rows.iter()
            .find(|r| r["Status"]["header"]["member_id"].as_u64() == Some(leader))
            .and_then(|r| r["Endpoint"].as_str())
            .and_then(|e| eps.iter().position(|x| x == e))
    }

    /// SIGKILLs a member, keeping its data.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        lock(&self.links).pids[i] = None;
    }

    /// Starts a killed member again on its data and waits until it is healthy.
    pub fn respawn(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy(Some(i));
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.nodes[i].child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// SIGSTOPs a member: TCP still connects, nothing answers.
    pub fn hang(&mut self, i: usize) {
        self.signal(i, "-STOP");
        self.nodes[i].stopped = true;
    }

    /// SIGCONTs a hung member.
    pub fn resume(&mut self, i: usize) {
        self.signal(i, "-CONT");
        self.nodes[i].stopped = false;
    }

    /// Cuts a member off from its peers (clients still reach it).
    pub fn isolate(&self, i: usize) {
        let mut l = lock(&self.links);
        l.isolated.insert(i);
        for (src, dst, a, b) in &l.conns {
            if *dst == i || *src == Some(i) {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
        l.conns
            .retain(|(src, dst, _, _)| *dst != i && *src != Some(i));
    }

    /// Reconnects an isolated member.
    pub fn heal(&self, i: usize) {
        lock(&self.links).isolated.remove(&i);
    }

    /// Whether `member` knows a raft leader (as its status says).
    pub fn has_leader(&self, member: usize) -> bool {
        let out = self.etcdctl_at(&[member], &["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v[0]["Status"]["leader"].as_u64().is_some_and(|l| l != 0)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for i in 0..3 {
            if self.nodes[i].stopped {
                self.resume(i);
            }
            self.kill(i);
        }
        let l = lock(&self.links);
        for (_, _, a, b) in &l.conns {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}
