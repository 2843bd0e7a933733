//! The state directory against a hostile or confused filesystem, through the
//! real binary in real namespaces: links planted where the plugin writes or
//! reads are never followed, a forged backup never raises a pod's MTU, and a
//! container ID of any valid length works.

mod common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use common::*;
use serde_json::json;

fn only_ours(chain: &Chain, tmp: &Path) -> Chain {
    let entry = ipsec_entry(tmp, json!({}));
    Chain {
        conflist: json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [entry]}),
        cni_path: chain.cni_path.clone(),
        node: chain.node.clone(),
        per_plugin: vec![],
        cached: chain.cached.clone(),
    }
}

/// A 250-character container ID (valid for runtimes) clamps and restores
/// like any other, with a short state file name.
#[test]
fn a_250_character_container_id_adds_and_deletes() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = plugin_dir(tmp.path());
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let mut chain = Chain::new(ptp_conflist("1.0.0", tmp.path(), json!({})), &bin, &node);
    let cid = format!("{}{}", unique("c"), "a".repeat(250));
    let cid = &cid[..250];
    chain.add(cid, &pod.path(), "eth0").expect("ADD");
    assert_eq!(pod.mtu("eth0"), 1446, "clamped");
    let state = tmp.path().join("state");
    let names: Vec<String> = std::fs::read_dir(&state)
        .expect("state dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].len() < 64, "short name: {}", names[0]);
    only_ours(&chain, tmp.path())
        .del(cid, Some(&pod.path()), "eth0")
        .expect("our DEL");
    assert_eq!(pod.mtu("eth0"), 1500, "restored");
    assert_eq!(std::fs::read_dir(&state).expect("state dir").count(), 0);
    chain
        .del(cid, Some(&pod.path()), "eth0")
        .expect("chain DEL");
}

/// ADD writes its backup beside a planted link at the old fixed temporary
/// name, never through it: the file outside keeps its content and mode.
#[test]
fn add_never_writes_through_a_planted_link() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = plugin_dir(tmp.path());
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let mut chain = Chain::new(ptp_conflist("1.0.0", tmp.path(), json!({})), &bin, &node);
    let cid = unique("ctr");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    let outside = tmp.path().join("outside.conf");
    std::fs::write(&outside, b"precious\n").expect("write");
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    symlink(&outside, state.join(format!("{cid}_eth0.json.tmp"))).expect("link");
    chain.add(&cid, &pod.path(), "eth0").expect("ADD");
    assert_eq!(std::fs::read(&outside).expect("read"), b"precious\n");
    let mode = std::fs::metadata(&outside)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644, "mode untouched");
    let backup = state.join(format!("{cid}_eth0.json"));
    let meta = std::fs::symlink_metadata(&backup).expect("backup");
    assert!(meta.is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    chain.del(&cid, Some(&pod.path()), "eth0").expect("DEL");
}

/// A backup replaced by a link to JSON that claims pod_mtu 9000 is moved
/// aside, not followed: DEL succeeds and the pod stays at the bound.
#[test]
fn a_linked_backup_never_raises_the_pod() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = plugin_dir(tmp.path());
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let mut chain = Chain::new(ptp_conflist("1.0.0", tmp.path(), json!({})), &bin, &node);
    let cid = unique("ctr");
    chain.add(&cid, &pod.path(), "eth0").expect("ADD");
    let backup = tmp.path().join("state").join(format!("{cid}_eth0.json"));
    let mut forged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&backup).expect("backup")).expect("json");
    forged["pod_mtu"] = json!(9000);
    let elsewhere = tmp.path().join("forged.json");
    std::fs::write(&elsewhere, forged.to_string()).expect("write");
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::remove_file(&backup).expect("rm");
    symlink(&elsewhere, &backup).expect("link");

    only_ours(&chain, tmp.path())
        .del(&cid, Some(&pod.path()), "eth0")
        .expect("DEL succeeds");
    assert_eq!(pod.mtu("eth0"), 1446, "never raised from a linked backup");
    let aside = backup.with_extension("json.corrupt");
    assert!(std::fs::symlink_metadata(&aside)
        .expect("moved aside")
        .file_type()
        .is_symlink());
    assert!(elsewhere.exists(), "the link's target is untouched");
    let log = std::fs::read_to_string(tmp.path().join("calico-ipsec.log")).expect("log");
    assert!(log.contains("symbolic link"), "the log says why");
    chain
        .del(&cid, Some(&pod.path()), "eth0")
        .expect("chain DEL");
}

/// A log_file_path that is a link is not followed: the plugin logs to
/// stderr instead and the link's target is untouched.
#[test]
fn a_linked_log_file_is_not_followed() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = plugin_dir(tmp.path());
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"").expect("write");
    let log = tmp.path().join("calico-ipsec.log");
    symlink(&victim, &log).expect("link");
    let mut chain = Chain::new(ptp_conflist("1.0.0", tmp.path(), json!({})), &bin, &node);
    let cid = unique("ctr");
    chain
        .add(&cid, &pod.path(), "eth0")
        .expect("ADD still succeeds");
    assert_eq!(
        std::fs::read(&victim).expect("read"),
        b"",
        "nothing written through the link"
    );
    chain.del(&cid, Some(&pod.path()), "eth0").expect("DEL");
}
