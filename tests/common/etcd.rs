//! A real etcd server (Debian's etcd-server) on free loopback ports, in a
//! temporary directory, optionally with TLS and client certificates made by
//! `openssl` at test time. Killed on drop.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// TLS files for a server and its clients.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The client certificate.
    pub cert: PathBuf,
    /// The client key.
    pub key: PathBuf,
}

/// A running etcd.
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The client URL.
    pub endpoint: String,
    /// Set for a TLS server.
    pub tls: Option<TlsFiles>,
}

impl EtcdServer {
    /// The etcd process's id (for its CPU in benchmarks).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate
/// in `dir`; returns the client files and the server certificate and key.
pub fn make_certs(dir: &Path) -> (TlsFiles, PathBuf, PathBuf) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=calico-ipsec-test-ca",
        ],
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("write ext");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    (
        TlsFiles {
            ca: dir.join("ca.crt"),
            cert: dir.join("client.crt"),
            key: dir.join("client.key"),
        },
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

/// Where Calico keeps its ClusterInformation in etcd.
pub const CLUSTER_INFORMATION: &str =
    "/calico/resources/v3/projectcalico.org/clusterinformations/default";

impl EtcdServer {
    /// Starts a plain-HTTP etcd, holding Calico's ClusterInformation (as
    /// calico-node leaves it: `keys init` needs its clusterGUID).
    pub fn start() -> Self {
        let s = Self::launch(false);
        s.put_cluster_information();
        s
    }

    /// Starts a plain-HTTP etcd that holds nothing at all.
    pub fn start_bare() -> Self {
        Self::launch(false)
    }

    /// Starts an etcd that requires TLS client certificates, holding
    /// Calico's ClusterInformation.
    pub fn start_tls() -> Self {
        let s = Self::launch(true);
        s.put_cluster_information();
        s
    }

    /// Writes Calico's ClusterInformation `default` with a clusterGUID.
    pub fn put_cluster_information(&self) {
        self.put(
            CLUSTER_INFORMATION,
            r#"{"kind":"ClusterInformation","apiVersion":"projectcalico.org/v3","metadata":{"name":"default"},"spec":{"clusterGUID":"3f0e6b1c2d4a4e8f9a1b2c3d4e5f6a7b","datastoreReady":true}}"#,
        );
    }

    fn launch(tls: bool) -> Self {
        assert!(
            Path::new("/usr/bin/etcd").exists(),
            "etcd is not installed (apt-get install etcd-server etcd-client)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let peer_port = free_port();
        let scheme = if tls { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{port}");
        let mut cmd = Command::new("/usr/bin/etcd");
        cmd.arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&endpoint)
            .arg("--advertise-client-urls")
            .arg(&endpoint)
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{peer_port}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{peer_port}"))
            .arg("--initial-cluster")
            .arg(format!("test=http://127.0.0.1:{peer_port}"))
            .arg("--log-level")
            .arg("error")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("etcd.log")).expect("log file"),
            ));
        let files = if tls {
            let (files, crt, key) = make_certs(dir.path());
            cmd.arg("--cert-file")
                .arg(crt)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(&files.ca)
                .arg("--client-cert-auth");
            Some(files)
        } else {
            None
        };
        let child = cmd.spawn().expect("spawn etcd");
        let mut s = EtcdServer {
            child: Some(child),
            dir,
            endpoint,
            tls: files,
        };
        s.wait_healthy();
        s
    }

    /// Runs etcdctl against this server with the given arguments.
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.endpoint);
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.cert)
                .arg("--key")
                .arg(&t.key);
        }
        cmd.args(args).output().expect("run etcdctl")
    }

    fn wait_healthy(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if self.etcdctl(&["endpoint", "health"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        panic!("etcd at {} did not become healthy: {log}", self.endpoint);
    }

    /// `etcdctl put KEY VALUE`.
    pub fn put(&self, key: &str, value: &str) {
        let out = self.etcdctl(&["put", key, value]);
        assert!(
            out.status.success(),
            "put {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Loads a fixture file (a JSON object of key to value), one put per key,
    /// values as compact JSON.
    pub fn load_fixture(&self, path: &Path) {
        let text = std::fs::read_to_string(path).expect("fixture");
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).expect("fixture JSON");
        for (k, v) in map {
            self.put(&k, &v.to_string());
        }
    }

    /// Stops the server (SIGKILL), keeping its data for a restart.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The manager that holds the leader record, waiting out a brief gap (a
/// lease hand-over, a tick slowed by a loaded machine) for up to 15 s.
pub async fn manager_leader(etcd: &calico_ipsec::datastore::etcd::Etcd) -> String {
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if let Ok(Some(kv)) = etcd.get("/calico/ipsec/v1/manager/leader").await {
            return String::from_utf8_lossy(&kv.value).into_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no manager leads within 15 s");
}
