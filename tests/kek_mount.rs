//! The KEK as kubelet mounts it: a symlink farm (`kek -> ..data/kek`,
//! `..data -> ..<timestamp>/`), the file root:fsGroup and 0440 when the pod
//! has an fsGroup (the manager), root:root 0400 without (agent, init
//! container). Each reader runs as the real binary, as the user the
//! manifest gives it (`setpriv`), against a real etcd. A FIFO fails fast.

mod common;

use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use calico_ipsec::config::EtcdConfig;
use calico_ipsec::datastore::etcd::{Etcd, EtcdSettings};
use calico_ipsec::datastore::ipsec::{
    config_key, encode, identities_digest, nodeid_key, now_rfc3339, Identity, IpsecStore,
    NodeStatus, Phase,
};
use common::etcd::EtcdServer;
use common::{require_root, PLUGIN};

/// Lays `text` out in `dir` exactly as kubelet mounts a Secret key `kek`;
/// returns the path a container is given (`dir/kek`, a link).
fn kubelet_mount(dir: &Path, text: &[u8], gid: u32, mode: u32) -> PathBuf {
    let ts = "..2026_11_29_10_00_00.123456789";
    std::fs::create_dir_all(dir.join(ts)).expect("mkdir");
    for d in [dir, &dir.join(ts)] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let file = dir.join(ts).join("kek");
    std::fs::write(&file, text).expect("write");
    chown(&file, Some(0), Some(gid)).expect("chown");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod");
    symlink(ts, dir.join("..data")).expect("link");
    symlink("..data/kek", dir.join("kek")).expect("link");
    dir.join("kek")
}

/// A temporary directory others can traverse (tempfile makes them 0700).
fn open_tempdir() -> tempfile::TempDir {
    let t = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    t
}

/// The binary as uid 65534, primary gid 65534, with supplementary `groups`.
fn as_nobody(groups: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534"]);
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        c.arg(format!("--groups={groups}"));
    }
    c.arg(PLUGIN);
    c
}

fn run(mut c: Command, server: &EtcdServer) -> Output {
    c.env_clear()
        .env("ETCD_ENDPOINTS", &server.endpoint)
        .output()
        .expect("run calico-ipsec")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `keys init` as root: the KEK file's text, epoch 1 in etcd.
fn init(server: &EtcdServer, dir: &Path, rotation_seconds: &str) -> Vec<u8> {
    let kek = dir.join("created-kek");
    let mut c = Command::new(PLUGIN);
    c.args([
        "keys",
        "init",
        "--rotation-interval-seconds",
        rotation_seconds,
    ])
    .arg("--kek-file")
    .arg(&kek);
    let out = run(c, server);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::read(&kek).expect("kek")
}

fn settings(server: &EtcdServer) -> EtcdSettings {
    EtcdSettings::from_config(
        &EtcdConfig {
            endpoints: vec![server.endpoint.clone()],
            ..EtcdConfig::default()
        },
        Duration::from_secs(2),
    )
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A live node agent's leased status, as the manager needs one to rotate.
fn stand_in_agent(server: &EtcdServer) {
    block_on(async {
        let etcd = Etcd::connect(&settings(server)).await.expect("connect");
        let ident = Identity {
            id: 1,
            incarnation: 1,
            boot_id: "b".into(),
        };
        etcd.put(&nodeid_key("node-1"), encode(&ident), None)
            .await
            .expect("identity");
        let ids = [("node-1".to_string(), ident)].into_iter().collect();
        let status = NodeStatus {
            id: 1,
            incarnation: 1,
            installed_epochs: vec![1],
            acked_phase: Phase::Off,
            acked_generation: 0,
            active_epoch: Some(1),
            heartbeat: now_rfc3339(),
            stale: false,
            identities: identities_digest(&ids),
            handover: false,
            kek: String::new(),
            lost_epochs: vec![],
            seal: 2,
            ..Default::default()
        };
        let lease = etcd.grant_lease(120).await.expect("lease");
        IpsecStore::new(&etcd)
            .put_status("node-1", &status, lease)
            .await
            .expect("status");
    });
}

fn epochs(server: &EtcdServer) -> usize {
    let mut c = Command::new(PLUGIN);
    c.args(["keys", "show", "--json"]);
    let out = run(c, server);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
        .expect("json")
        .len()
}

/// The manager as shipped (uid 65534, fsGroup 65534, defaultMode 0400, so
/// the KEK is root:65534 0440 behind links) reads the KEK and rotates.
#[test]
fn the_manager_as_shipped_reads_a_kubelet_mounted_kek_and_rotates() {
    require_root();
    let server = EtcdServer::start();
    let tmp = open_tempdir();
    let kek = init(&server, tmp.path(), "1");
    stand_in_agent(&server);
    let mounted = kubelet_mount(&tmp.path().join("vol"), &kek, 65534, 0o440);
    let log = tmp.path().join("manager.log");
    let mut c = as_nobody("65534");
    c.args(["manager", "--id", "m1", "--listen", "none"])
        .args(["--lease-ttl-seconds", "2", "--interval-ms", "100"])
        .arg("--kek-file")
        .arg(&mounted)
        .env_clear()
        .env("ETCD_ENDPOINTS", &server.endpoint)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"));
    let mut child = c.spawn().expect("start manager");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut rotated = false;
    while Instant::now() < deadline && !rotated {
        std::thread::sleep(Duration::from_millis(200));
        rotated = epochs(&server) >= 2;
    }
    let _ = child.kill();
    let _ = child.wait();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(rotated, "no scheduled rotation within 20 s:\n{logged}");
    assert!(!logged.contains("cannot be read"), "{logged}");
}

/// A non-root CLI user in the file's group (fsGroup 2000 as a supplementary
/// group) reads it; one outside the group is told what to fix.
#[test]
fn a_user_in_the_fsgroup_reads_it_and_others_are_told_why_not() {
    require_root();
    let server = EtcdServer::start();
    let tmp = open_tempdir();
    let kek = init(&server, tmp.path(), "86400");
    let mounted = kubelet_mount(&tmp.path().join("vol"), &kek, 2000, 0o440);

    let mut c = as_nobody("2000");
    c.args(["keys", "rotate", "--kek-file"]).arg(&mounted);
    let out = run(c, &server);
    assert!(out.status.success(), "in the group: {}", text(&out));
    assert_eq!(epochs(&server), 2);

    let mut c = as_nobody("");
    c.args(["keys", "rotate", "--kek-file"]).arg(&mounted);
    let out = run(c, &server);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("permission denied") && said.contains("fsGroup"),
        "{said}"
    );
    assert_eq!(epochs(&server), 2, "nothing added");
}

/// The init container (root, no fsGroup: root:root 0400 behind links) and a
/// pod with an fsGroup (0440) both copy the KEK to the host, 0600.
#[test]
fn install_copies_a_kubelet_mounted_kek() {
    require_root();
    let tmp = open_tempdir();
    let key = format!("{}\n", "5a".repeat(32));
    for (name, gid, mode) in [("root", 0, 0o400), ("fsgroup", 2000, 0o440)] {
        let conf = tmp.path().join(name).join("net.d");
        let sys = tmp.path().join(name).join("sys-class-net");
        std::fs::create_dir_all(&conf).expect("mkdir");
        std::fs::create_dir_all(&sys).expect("mkdir");
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calico/10-calico.conflist");
        std::fs::copy(fixture, conf.join("10-calico.conflist")).expect("copy");
        let mounted = kubelet_mount(
            &tmp.path().join(name).join("vol"),
            key.as_bytes(),
            gid,
            mode,
        );
        let host_kek = tmp.path().join(name).join("host/kek");
        let out = Command::new(PLUGIN)
            .args(["install", "--skip-datastore-check", "--conf-dir"])
            .arg(&conf)
            .arg("--sys-class-net")
            .arg(&sys)
            .arg("--kek-file")
            .arg(&host_kek)
            .arg("--kek-from")
            .arg(&mounted)
            .output()
            .expect("install");
        assert!(out.status.success(), "{name}: {}", text(&out));
        let meta = std::fs::symlink_metadata(&host_kek).expect("copied");
        assert!(meta.is_file(), "{name}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
        assert_eq!(
            std::fs::read_to_string(&host_kek).expect("read"),
            key,
            "{name}"
        );
    }
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

/// A FIFO as the KEK fails each reader fast with a message that names it:
/// the CLI, the init container and the plugin (before, opening it blocked
/// forever, and an ADD held the node lock meanwhile).
#[test]
fn a_fifo_kek_fails_fast_everywhere() {
    require_root();
    let server = EtcdServer::start();
    server.load_fixture(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calico/etcd-3-nodes.json"),
    );
    let tmp = open_tempdir();
    init(&server, tmp.path(), "86400");
    let fifo = tmp.path().join("kek-fifo");
    mkfifo(&fifo);

    let started = Instant::now();
    let mut c = Command::new(PLUGIN);
    c.args(["keys", "rotate", "--kek-file"]).arg(&fifo);
    let out = run(c, &server);
    assert!(
        !out.status.success() && text(&out).contains("is a FIFO"),
        "{}",
        text(&out)
    );
    let conf = tmp.path().join("net.d");
    std::fs::create_dir_all(&conf).expect("mkdir");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calico/10-calico.conflist"),
        conf.join("10-calico.conflist"),
    )
    .expect("copy");
    let out = Command::new(PLUGIN)
        .args(["install", "--skip-datastore-check", "--kek-from"])
        .arg(&fifo)
        .arg("--kek-file")
        .arg(tmp.path().join("host-kek"))
        .arg("--conf-dir")
        .arg(&conf)
        .arg("--sys-class-net")
        .arg(tmp.path())
        .output()
        .expect("install");
    assert!(
        !out.status.success() && text(&out).contains("is a FIFO"),
        "{}",
        text(&out)
    );

    // Encryption on, so a convergence needs the KEK for node-1's SAs.
    block_on(async {
        let etcd = Etcd::connect(&settings(&server)).await.expect("connect");
        let mut cfg = IpsecStore::new(&etcd)
            .config()
            .await
            .expect("read")
            .expect("initialised");
        cfg.phase = Phase::Encrypt;
        cfg.target_phase = Phase::Encrypt;
        etcd.put(&config_key(), encode(&cfg), None)
            .await
            .expect("phase");
    });
    // The plugin's STATUS (read-only) needs the KEK while encryption is on.
    let conf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "k8s-pod-network",
        "type": "calico-ipsec",
        "etcd_endpoints": server.endpoint,
        "nodename": "node-1",
        "kek_file": fifo,
        "state_dir": tmp.path().join("state"),
        "log_file_path": tmp.path().join("plugin.log"),
        "ext_mtu": 1500,
    });
    let out = common::exec_in(
        "",
        Path::new(PLUGIN),
        "STATUS",
        "/usr/lib/cni",
        &[],
        conf.to_string().as_bytes(),
    );
    assert!(!out.ok, "{}", out.stdout);
    assert_eq!(out.code(), Some(50), "{}", out.stdout);
    assert!(out.stdout.contains("is a FIFO"), "{}", out.stdout);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

/// kubelet's update of a mounted Secret: a new timestamped directory, then
/// `..data` swapped to it by one rename.
fn kubelet_update(dir: &Path, text: &[u8]) {
    let ts = "..2026_12_06_10_00_00.987654321";
    std::fs::create_dir_all(dir.join(ts)).expect("mkdir");
    std::fs::set_permissions(dir.join(ts), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let file = dir.join(ts).join("kek");
    std::fs::write(&file, text).expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).expect("chmod");
    symlink(ts, dir.join("..data_tmp")).expect("link");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
}

/// The status record's `kek` of `node`.
fn reported_kek(server: &EtcdServer, node: &str) -> String {
    block_on(async {
        let etcd = Etcd::connect(&settings(server)).await.expect("connect");
        IpsecStore::new(&etcd)
            .statuses()
            .await
            .expect("statuses")
            .into_iter()
            .find(|(n, _)| n == node)
            .map(|(_, s)| s.kek)
            .unwrap_or_default()
    })
}

/// KEK rotation as shipped: the agent runs with `--kek-from` the kubelet
/// mount and the plugin's copy as the entry's `kek_file`. When kubelet
/// swaps `..data` to the new KEK, the copy follows (atomically, 0600, a
/// regular file), the status reports the copy's fingerprint, and
/// `rotate-kek --finish` waits for exactly that.
#[test]
fn the_plugins_kek_copy_follows_a_kubelet_update_and_finish_waits_for_it() {
    require_root();
    let server = EtcdServer::start();
    server.load_fixture(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/calico/etcd-3-nodes.json"
    )));
    let tmp = open_tempdir();
    let old = init(&server, tmp.path(), "86400");
    let mount_dir = tmp.path().join("vol");
    let mounted = kubelet_mount(&mount_dir, &old, 0, 0o400);
    let copy = tmp.path().join("net.d/calico-ipsec/kek");
    let conflist = tmp.path().join("10-calico.conflist");
    let entry = serde_json::json!({
        "name": "k8s-pod-network", "cniVersion": "0.3.1",
        "plugins": [
            {"type": "calico"},
            {"type": "calico-ipsec", "etcd_endpoints": server.endpoint, "nodename": "node-1",
             "kek_file": copy, "state_dir": tmp.path().join("state"),
             "agreement_dir": tmp.path().join("agreement"),
             "log_file_path": tmp.path().join("cni.log")}
        ]
    });
    std::fs::write(&conflist, entry.to_string()).expect("conflist");
    let log = tmp.path().join("agent.log");
    let mut agent = Command::new(PLUGIN)
        .arg("agent")
        .arg("--config")
        .arg(&conflist)
        .arg("--kek-from")
        .arg(&mounted)
        .args([
            "--listen",
            "none",
            "--lease-ttl-seconds",
            "3",
            "--resync-seconds",
            "2",
        ])
        .env_remove("NODENAME")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("agent");
    let wait = |what: &str, ok: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !ok() {
            if t.elapsed() > Duration::from_secs(30) {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("{what}: not within 30 s; agent log:\n{said}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let fp = |text: &[u8]| {
        let f = tmp.path().join("fp");
        std::fs::write(&f, text).expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        calico_ipsec::keys::Kek::load(&f)
            .expect("kek")
            .fingerprint()
    };
    let old_fp = fp(&old);
    wait("the copy made at start", &|| {
        std::fs::read(&copy).ok().as_deref() == Some(&old[..])
    });
    wait("the status reports the copy's KEK", &|| {
        reported_kek(&server, "node-1") == old_fp
    });

    // Step 1 of a KEK rotation, then the Secret changes.
    let new_file = tmp.path().join("new-kek");
    let mut c = Command::new(PLUGIN);
    c.args(["keys", "rotate-kek", "--kek-file"])
        .arg(tmp.path().join("created-kek"))
        .arg("--new-kek-file")
        .arg(&new_file);
    let out = run(c, &server);
    assert!(out.status.success(), "{}", text(&out));
    let new = std::fs::read(&new_file).expect("new KEK");
    let new_fp = fp(&new);
    assert_ne!(new_fp, old_fp);
    let finish = || {
        let mut c = Command::new(PLUGIN);
        c.args(["keys", "rotate-kek", "--finish", "--kek-file"])
            .arg(tmp.path().join("created-kek"))
            .arg("--new-kek-file")
            .arg(&new_file);
        run(c, &server)
    };
    let early = finish();
    assert!(
        !early.status.success(),
        "finish before any node holds the new KEK"
    );
    assert!(text(&early).contains("node-1"), "{}", text(&early));

    kubelet_update(&mount_dir, &new);
    wait("the copy follows the Secret", &|| {
        std::fs::read(&copy).ok().as_deref() == Some(&new[..])
    });
    let meta = std::fs::symlink_metadata(&copy).expect("stat");
    assert!(
        meta.file_type().is_file(),
        "a regular file, not a link into the mount"
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    wait("the status reports the new KEK", &|| {
        reported_kek(&server, "node-1") == new_fp
    });
    let done = finish();
    assert!(done.status.success(), "{}", text(&done));
    let _ = agent.kill();
    let _ = agent.wait();
}
