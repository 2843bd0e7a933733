//! `calico-ipsec install` and `uninstall` through the built binary, on
//! temporary CNI directories: Calico's real conflists from the fixtures and
//! variants of them, and a real etcd for the WireGuard check.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use common::etcd::EtcdServer;
use common::PLUGIN;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/calico");

fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{name}")).expect("fixture")
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args` (no CNI_COMMAND, so it is the CLI).
fn run(args: &[&str]) -> Run {
    let out = Command::new(PLUGIN)
        .args(args)
        .env_remove("CNI_COMMAND")
        .output()
        .expect("run calico-ipsec");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A temporary node: a CNI conf dir, a bin dir, and an empty interface list.
struct Node {
    tmp: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        for d in ["net.d", "bin", "sys-class-net"] {
            std::fs::create_dir_all(tmp.path().join(d)).expect("mkdir");
        }
        Node { tmp }
    }

    fn conf_dir(&self) -> PathBuf {
        self.tmp.path().join("net.d")
    }

    fn bin_dir(&self) -> PathBuf {
        self.tmp.path().join("bin")
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.conf_dir().join(name);
        std::fs::write(&p, text).expect("write conflist");
        p
    }

    /// `install` with the etcd check off (the fixtures name an etcd that is not here).
    fn install(&self, extra: &[&str]) -> Run {
        let conf = self.conf_dir();
        let sys = self.tmp.path().join("sys-class-net");
        let mut args = vec![
            "install",
            "--conf-dir",
            conf.to_str().expect("utf8"),
            "--sys-class-net",
            sys.to_str().expect("utf8"),
        ];
        if !extra.contains(&"--with-datastore-check") {
            args.push("--skip-datastore-check");
        }
        args.extend(extra.iter().filter(|a| **a != "--with-datastore-check"));
        run(&args)
    }

    fn uninstall(&self, extra: &[&str]) -> Run {
        let conf = self.conf_dir();
        let mut args = vec!["uninstall", "--conf-dir", conf.to_str().expect("utf8")];
        args.extend(extra);
        run(&args)
    }
}

/// Content, inode and mtime: enough to tell that a file was not rewritten.
fn stamp(p: &Path) -> (Vec<u8>, u64, i64, i64) {
    let m = std::fs::metadata(p).expect("stat");
    (
        std::fs::read(p).expect("read"),
        m.ino(),
        m.mtime(),
        m.mtime_nsec(),
    )
}

fn plugins(p: &Path) -> Vec<Value> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("JSON");
    v["plugins"].as_array().expect("plugins").clone()
}

fn types(p: &Path) -> Vec<String> {
    plugins(p)
        .iter()
        .map(|x| x["type"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn fixture_install_is_exact_idempotent_and_uninstall_restores_the_bytes() {
    let node = Node::new();
    let original = fixture_text("10-calico.conflist");
    let path = node.write("10-calico.conflist", &original);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");

    let r = node.install(&[]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("installed: calico-ipsec entry"),
        "{}",
        r.stdout
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        fixture_text("10-calico-with-ipsec.conflist")
    );
    assert_eq!(
        std::fs::metadata(&path).expect("stat").mode() & 0o777,
        0o640,
        "mode kept"
    );

    let before = stamp(&path);
    let r = node.install(&[]);
    assert!(
        r.ok && r.stdout.contains("unchanged"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(stamp(&path), before, "a second install writes nothing");

    let r = node.uninstall(&[]);
    assert!(
        r.ok && r.stdout.contains("removed"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(std::fs::read_to_string(&path).expect("read"), original);
    assert_eq!(
        std::fs::metadata(&path).expect("stat").mode() & 0o777,
        0o640
    );

    let before = stamp(&path);
    let r = node.uninstall(&[]);
    assert!(r.ok && r.stdout.contains("unchanged"), "{}", r.stdout);
    assert_eq!(stamp(&path), before, "a second uninstall writes nothing");

    // No temp files left behind; only uninstall's mark, which tells a
    // running agent not to put the entry back.
    let names: Vec<_> = std::fs::read_dir(node.conf_dir())
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n != "calico-ipsec")
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let marker = node.conf_dir().join("calico-ipsec/uninstalled");
    assert!(marker.exists(), "uninstall leaves its mark");
    assert!(node.install(&[]).ok);
    assert!(!marker.exists(), "install removes the mark");
}

#[test]
fn fixture_already_holding_our_entry_is_left_alone() {
    let node = Node::new();
    let path = node.write(
        "10-calico.conflist",
        &fixture_text("10-calico-with-ipsec.conflist"),
    );
    let before = stamp(&path);
    let r = node.install(&[]);
    assert!(
        r.ok && r.stdout.contains("unchanged"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(stamp(&path), before);
    let r = node.uninstall(&[]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        fixture_text("10-calico.conflist")
    );
}

#[test]
fn cni_1_0_0_with_several_plugins() {
    let node = Node::new();
    let text = serde_json::to_string_pretty(&json!({
        "name": "k8s-pod-network",
        "cniVersion": "1.0.0",
        "plugins": [
            {"type": "calico", "datastore_type": "etcdv3",
             "etcd_endpoints": "http://127.0.0.1:2379", "ipam": {"type": "calico-ipam"}},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}},
            {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
            {"type": "tuning", "sysctl": {"net.core.somaxconn": "500"}}
        ]
    }))
    .expect("render")
        + "\n";
    let path = node.write("10-calico.conflist", &text);
    let r = node.install(&[]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        types(&path),
        ["calico", "calico-ipsec", "bandwidth", "portmap", "tuning"]
    );
    let ours = &plugins(&path)[1];
    assert_eq!(ours["etcd_endpoints"], "http://127.0.0.1:2379");
    assert!(
        ours.get("etcd_key_file").is_none(),
        "only fields Calico has"
    );
    let installed = std::fs::read_to_string(&path).expect("read");
    assert!(
        installed.contains("\n    {\n      \"type\": \"calico-ipsec\""),
        "{installed}"
    );
    node.uninstall(&[]);
    assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
}

#[test]
fn stale_etcd_fields_in_our_entry_are_updated() {
    let node = Node::new();
    let stale = fixture_text("10-calico-with-ipsec.conflist").replace(
        "\"type\": \"calico-ipsec\",",
        "\"type\": \"calico-ipsec\",\n   \"ext_mtu\": 9000,",
    );
    // Calico moved to new endpoints and dropped client certificates.
    let calico_moved = stale
        .replacen("https://10.0.0.5:2379", "https://10.0.0.6:2379", 1)
        .replacen(
            "   \"etcd_key_file\": \"/etc/cni/net.d/calico-tls/etcd-key\",\n   \"etcd_cert_file\": \"/etc/cni/net.d/calico-tls/etcd-cert\",\n",
            "",
            1,
        );
    let path = node.write("10-calico.conflist", &calico_moved);
    let r = node.install(&[]);
    assert!(
        r.ok && r.stdout.contains("installed"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    let p = plugins(&path);
    assert_eq!(p[1]["etcd_endpoints"], "https://10.0.0.6:2379");
    assert!(p[1].get("etcd_key_file").is_none());
    assert!(p[1].get("etcd_cert_file").is_none());
    assert_eq!(
        p[1]["etcd_ca_cert_file"],
        "/etc/cni/net.d/calico-tls/etcd-ca"
    );
    assert_eq!(p[1]["ext_mtu"], 9000, "the operator's own fields are kept");
    assert_eq!(p.len(), 3);
}

#[test]
fn kubernetes_datastore_is_refused_and_nothing_written() {
    let node = Node::new();
    let kdd = fixture_text("10-calico.conflist").replace(
        "\"type\": \"calico\",",
        "\"type\": \"calico\",\n   \"datastore_type\": \"kubernetes\",",
    );
    let path = node.write("10-calico.conflist", &kdd);
    let before = stamp(&path);
    let r = node.install(&["--bin-dir", node.bin_dir().to_str().expect("utf8")]);
    assert!(!r.ok);
    assert!(
        r.stderr.contains("Kubernetes API datastore"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("not installed"), "{}", r.stderr);
    assert_eq!(stamp(&path), before);
    assert!(
        !node.bin_dir().join("calico-ipsec").exists(),
        "no binary either"
    );
}

#[test]
fn wireguard_interface_on_the_node_is_refused() {
    let node = Node::new();
    let path = node.write("10-calico.conflist", &fixture_text("10-calico.conflist"));
    std::fs::create_dir(node.tmp.path().join("sys-class-net/wireguard.cali")).expect("mkdir");
    let before = stamp(&path);
    let r = node.install(&[]);
    assert!(!r.ok);
    assert!(
        r.stderr.contains("WireGuard") && r.stderr.contains("wireguard.cali"),
        "{}",
        r.stderr
    );
    assert_eq!(stamp(&path), before);
}

#[test]
fn wireguard_in_felix_configuration_is_refused_through_real_etcd() {
    let etcd = EtcdServer::start();
    let node = Node::new();
    let text = fixture_text("10-calico.conflist")
        .replace("https://10.0.0.5:2379", &etcd.endpoint)
        .replace(
            "   \"etcd_key_file\": \"/etc/cni/net.d/calico-tls/etcd-key\",\n   \"etcd_cert_file\": \"/etc/cni/net.d/calico-tls/etcd-cert\",\n   \"etcd_ca_cert_file\": \"/etc/cni/net.d/calico-tls/etcd-ca\",\n",
            "",
        );
    let path = node.write("10-calico.conflist", &text);
    let key = "/calico/resources/v3/projectcalico.org/felixconfigurations/node.node-2";
    etcd.put(
        key,
        r#"{"kind":"FelixConfiguration","apiVersion":"projectcalico.org/v3","metadata":{"name":"node.node-2"},"spec":{"wireguardEnabled":true}}"#,
    );
    let before = stamp(&path);
    let r = node.install(&["--with-datastore-check"]);
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("FelixConfiguration node.node-2 sets spec.wireguardEnabled to true"),
        "{}",
        r.stderr
    );
    assert_eq!(stamp(&path), before);

    etcd.put(
        key,
        r#"{"kind":"FelixConfiguration","apiVersion":"projectcalico.org/v3","metadata":{"name":"node.node-2"},"spec":{"wireguardEnabled":false}}"#,
    );
    let r = node.install(&["--with-datastore-check"]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(types(&path), ["calico", "calico-ipsec", "portmap"]);
}

#[test]
fn unreachable_etcd_fails_the_check_with_a_way_out() {
    let node = Node::new();
    // A loopback port with nothing listening.
    let port = common::etcd::free_port();
    let text = format!(
        r#"{{"cniVersion":"0.3.1","plugins":[{{"type":"calico","etcd_endpoints":"http://127.0.0.1:{port}"}}]}}"#
    );
    let path = node.write("10-calico.conflist", &text);
    let r = node.install(&["--with-datastore-check", "--etcd-timeout-ms", "300"]);
    assert!(!r.ok);
    assert!(r.stderr.contains("--skip-datastore-check"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
}

#[test]
fn no_calico_conflist_and_malformed_json_are_clear_errors() {
    let node = Node::new();
    let r = node.install(&[]);
    assert!(!r.ok);
    assert!(r.stderr.contains("no *.conflist in"), "{}", r.stderr);

    node.write(
        "05-bridge.conflist",
        r#"{"cniVersion":"0.3.1","plugins":[{"type":"bridge"}]}"#,
    );
    let r = node.install(&[]);
    assert!(!r.ok && r.stderr.contains("\"calico\""), "{}", r.stderr);

    let broken = "{\n \"plugins\": [\n  {\"type\": \"calico\",}\n ]\n}\n";
    let path = node.write("10-calico.conflist", broken);
    let r = node.install(&[]);
    assert!(!r.ok);
    assert!(
        r.stderr.contains("10-calico.conflist") && r.stderr.contains("not valid JSON"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("line 3"), "names the place: {}", r.stderr);
    assert_eq!(std::fs::read_to_string(&path).expect("read"), broken);
}

#[test]
fn the_first_calico_conflist_by_name_is_chosen() {
    let node = Node::new();
    let other = r#"{"cniVersion":"0.3.1","plugins":[{"type":"bridge"}]}"#;
    node.write("05-bridge.conflist", other);
    node.write("10-calico.conf", r#"{"type":"calico"}"#);
    let first = node.write("20-calico.conflist", &fixture_text("10-calico.conflist"));
    let second = node.write("30-calico.conflist", &fixture_text("10-calico.conflist"));
    let r = node.install(&[]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("20-calico.conflist"), "{}", r.stdout);
    assert_eq!(types(&first), ["calico", "calico-ipsec", "portmap"]);
    assert_eq!(types(&second), ["calico", "portmap"]);
    assert_eq!(
        std::fs::read_to_string(node.conf_dir().join("05-bridge.conflist")).expect("read"),
        other
    );
}

#[test]
fn binary_and_kek_are_copied_once_and_dry_run_writes_nothing() {
    let node = Node::new();
    let path = node.write("10-calico.conflist", &fixture_text("10-calico.conflist"));
    let kek_src = node.tmp.path().join("secret-kek");
    std::fs::write(&kek_src, format!("{}\n", "ab".repeat(32))).expect("write");
    std::fs::set_permissions(&kek_src, std::fs::Permissions::from_mode(0o400)).expect("chmod");
    let kek_dst = node.tmp.path().join("host/calico-ipsec/kek");
    let bin = node.bin_dir();

    let before = stamp(&path);
    let r = node.install(&["--dry-run", "--kek-file", kek_dst.to_str().expect("utf8")]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains(kek_dst.to_str().expect("utf8")),
        "{}",
        r.stdout
    );
    assert_eq!(stamp(&path), before, "dry run writes nothing");

    let args = [
        "--bin-dir",
        bin.to_str().expect("utf8"),
        "--kek-file",
        kek_dst.to_str().expect("utf8"),
        "--kek-from",
        kek_src.to_str().expect("utf8"),
    ];
    let r = node.install(&args);
    assert!(r.ok, "{}", r.stderr);
    let copied = bin.join("calico-ipsec");
    assert_eq!(
        std::fs::read(&copied).expect("read"),
        std::fs::read(PLUGIN).expect("read")
    );
    assert_eq!(
        std::fs::metadata(&copied).expect("stat").mode() & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::metadata(&kek_dst).expect("stat").mode() & 0o777,
        0o600
    );
    assert_eq!(
        plugins(&path)[1]["kek_file"],
        kek_dst.to_str().expect("utf8")
    );

    let (bin_before, kek_before) = (stamp(&copied), stamp(&kek_dst));
    let r = node.install(&args);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout.matches("unchanged").count(), 3, "{}", r.stdout);
    assert_eq!(stamp(&copied), bin_before);
    assert_eq!(stamp(&kek_dst), kek_before);

    // A KEK that is not 64 hex characters is refused.
    std::fs::set_permissions(&kek_src, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(&kek_src, "short\n").expect("write");
    let r = node.install(&args);
    assert!(!r.ok && r.stderr.contains("64 hex"), "{}", r.stderr);

    let r = node.uninstall(&["--remove-kek"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(!kek_dst.exists());
    assert!(
        copied.exists(),
        "the binary stays: pods set up with it are torn down by it"
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        fixture_text("10-calico.conflist")
    );
}

/// A one-shot fake Kubernetes API on loopback: answers each connection with
/// the next canned response and hands back the requests it saw.
fn fake_api(responses: Vec<String>) -> (String, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for response in responses {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).expect("read");
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            s.write_all(response.as_bytes()).expect("write");
        }
        seen
    });
    (url, handle)
}

fn http(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.0 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn prestop_uninstall_acts_only_when_the_daemonset_is_deleted() {
    let node = Node::new();
    let path = node.write(
        "10-calico.conflist",
        &fixture_text("10-calico-with-ipsec.conflist"),
    );
    let sa = node.tmp.path().join("sa");
    std::fs::create_dir(&sa).expect("mkdir");
    std::fs::write(sa.join("token"), "tok-123\n").expect("write");
    std::fs::write(sa.join("namespace"), "kube-system").expect("write");

    let live = r#"{"kind":"DaemonSet","metadata":{"name":"calico-ipsec-node"}}"#;
    let deleting = r#"{"kind":"DaemonSet","metadata":{"name":"calico-ipsec-node","deletionTimestamp":"2026-11-21T13:00:00Z"}}"#;
    let (url, server) = fake_api(vec![
        http("200 OK", live),
        http("500 Internal Server Error", "{}"),
        http("200 OK", deleting),
        http("404 Not Found", r#"{"kind":"Status"}"#),
    ]);
    let prestop = |url: &str| {
        node.uninstall(&[
            "--only-if-daemonset-deleted",
            "calico-ipsec-node",
            "--kube-api-url",
            url,
            "--service-account-dir",
            sa.to_str().expect("utf8"),
        ])
    };
    let installed = fixture_text("10-calico-with-ipsec.conflist");

    // A restart or a rolling update: the entry stays.
    let r = prestop(&url);
    assert!(
        r.ok && r.stdout.contains("kept"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(std::fs::read_to_string(&path).expect("read"), installed);

    // No clear answer: the entry stays, and the hook says why.
    let r = prestop(&url);
    assert!(
        !r.ok && r.stderr.contains("kept the calico-ipsec entry"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read_to_string(&path).expect("read"), installed);

    // Foreground deletion: removed.
    let r = prestop(&url);
    assert!(
        r.ok && r.stdout.contains("being deleted"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        fixture_text("10-calico.conflist")
    );

    // Background deletion (kubectl delete's default): gone, and nothing left to remove.
    let r = prestop(&url);
    assert!(
        r.ok && r.stdout.contains("is gone (HTTP 404)"),
        "{}{}",
        r.stdout,
        r.stderr
    );

    let seen = server.join().expect("server");
    assert!(seen[0].starts_with(
        "GET /apis/apps/v1/namespaces/kube-system/daemonsets/calico-ipsec-node HTTP/1.1\r\n"
    ));
    assert!(seen[0]
        .to_ascii_lowercase()
        .contains("authorization: bearer tok-123\r\n"));

    // Nothing listening: kept.
    node.write("10-calico.conflist", &installed);
    let port = common::etcd::free_port();
    let r = prestop(&format!("http://127.0.0.1:{port}"));
    assert!(!r.ok && r.stderr.contains("kept"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&path).expect("read"), installed);
}

/// The production path: HTTPS with the service account's CA, against OpenSSL's
/// own server (`s_server -WWW` serves files from its directory).
#[test]
fn prestop_check_speaks_tls_with_the_service_account_ca() {
    let node = Node::new();
    let path = node.write(
        "10-calico.conflist",
        &fixture_text("10-calico-with-ipsec.conflist"),
    );
    let dir = node.tmp.path().join("pki");
    std::fs::create_dir(&dir).expect("mkdir");
    let (tls, srv_crt, srv_key) = common::etcd::make_certs(&dir);
    let sa = node.tmp.path().join("sa");
    std::fs::create_dir(&sa).expect("mkdir");
    std::fs::write(sa.join("token"), "tok").expect("write");
    std::fs::write(sa.join("namespace"), "kube-system").expect("write");
    std::fs::copy(&tls.ca, sa.join("ca.crt")).expect("copy");
    let www = node.tmp.path().join("www");
    let ds_dir = www.join("apis/apps/v1/namespaces/kube-system/daemonsets");
    std::fs::create_dir_all(&ds_dir).expect("mkdir");
    std::fs::write(
        ds_dir.join("calico-ipsec-node"),
        r#"{"kind":"DaemonSet","metadata":{"name":"calico-ipsec-node"}}"#,
    )
    .expect("write");

    let port = common::etcd::free_port();
    let mut server = Command::new("openssl")
        .current_dir(&www)
        .args(["s_server", "-quiet", "-WWW", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&srv_crt)
        .arg("-key")
        .arg(&srv_key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn openssl s_server");
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "s_server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let url = format!("https://127.0.0.1:{port}");
    let prestop = |sa: &Path| {
        node.uninstall(&[
            "--only-if-daemonset-deleted",
            "calico-ipsec-node",
            "--kube-api-url",
            &url,
            "--service-account-dir",
            sa.to_str().expect("utf8"),
        ])
    };
    let live = prestop(&sa);
    // A CA that did not sign the server: refused, so the entry stays.
    let other = node.tmp.path().join("sa-other");
    std::fs::create_dir(&other).expect("mkdir");
    for f in ["token", "namespace"] {
        std::fs::copy(sa.join(f), other.join(f)).expect("copy");
    }
    // A fresh, unrelated CA (and certificates) written into `other`.
    common::etcd::make_certs(&other);
    let untrusted = prestop(&other);
    std::fs::write(
        ds_dir.join("calico-ipsec-node"),
        r#"{"kind":"DaemonSet","metadata":{"name":"calico-ipsec-node","deletionTimestamp":"2026-11-21T13:00:00Z"}}"#,
    )
    .expect("write");
    let deleting = prestop(&sa);
    let _ = server.kill();
    let _ = server.wait();

    assert!(
        live.ok && live.stdout.contains("kept"),
        "{}{}",
        live.stdout,
        live.stderr
    );
    assert!(
        !untrusted.ok && untrusted.stderr.contains("kept"),
        "{}",
        untrusted.stderr
    );
    assert!(
        deleting.ok && deleting.stdout.contains("being deleted"),
        "{}{}",
        deleting.stdout,
        deleting.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        fixture_text("10-calico.conflist")
    );
}
