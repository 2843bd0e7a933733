//! The plugin behind real CNI plugins (ptp + host-local standing in for
//! calico), in real network namespaces, driven like libcni drives a conflist.

mod common;

use common::*;
use serde_json::{json, Value};

/// ADD clamps, passes the result on, CHECK passes and then catches drift,
/// DEL twice and DEL without a netns all succeed, at each version.
fn full_lifecycle(version: &str) {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = plugin_dir(tmp.path());
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let mut chain = Chain::new(ptp_conflist(version, tmp.path(), json!({})), &bin, &node);
    let cid = unique("ctr");

    let result = chain.add(&cid, &pod.path(), "eth0").expect("ADD succeeds");

    // The pod interface and its host veth are lowered to the exact bound.
    assert_eq!(pod.mtu("eth0"), 1446, "pod MTU clamped to the ESP bound");
    let host_veth = result["interfaces"][0]["name"]
        .as_str()
        .expect("host veth name");
    assert_eq!(node.mtu(host_veth), 1446, "host veth clamped too");

    // Our result is the previous plugin's result, in the same version.
    assert_eq!(result, chain.per_plugin[0], "result passed on untouched");
    assert_eq!(result["cniVersion"], version);

    // A backup of the original MTUs exists, mode 0600.
    let backup = tmp.path().join("state").join(format!("{cid}_eth0.json"));
    let saved: Value = serde_json::from_slice(&std::fs::read(&backup).expect("backup exists"))
        .expect("backup JSON");
    assert_eq!(saved["pod_mtu"], 1500);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&backup)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    if version != "0.3.0" && version != "0.3.1" {
        chain
            .check(&cid, &pod.path(), "eth0")
            .expect("CHECK passes after ADD");
        pod.ip(&["link", "set", "dev", "eth0", "mtu", "1480"]);
        let err = chain
            .check(&cid, &pod.path(), "eth0")
            .expect_err("CHECK catches an MTU above the bound");
        assert_eq!(err.code(), Some(102), "{:?}", err.json);
        let msg = err
            .json
            .as_ref()
            .and_then(|j| j["msg"].as_str())
            .unwrap_or_default();
        assert!(msg.contains("1480") && msg.contains("1446"), "{msg}");
        pod.ip(&["link", "set", "dev", "eth0", "mtu", "1446"]);
    }

    chain
        .del(&cid, Some(&pod.path()), "eth0")
        .expect("DEL succeeds");
    assert!(!backup.exists(), "DEL removes the backup");
    assert!(!pod.has_link("eth0"), "ptp removed the pod veth");
    chain
        .del(&cid, Some(&pod.path()), "eth0")
        .expect("second DEL succeeds");
    chain
        .del(&cid, None, "eth0")
        .expect("DEL without CNI_NETNS succeeds");
    let no_prev = Chain {
        cached: None,
        per_plugin: vec![],
        conflist: chain.conflist.clone(),
        cni_path: chain.cni_path.clone(),
        node: chain.node.clone(),
    };
    no_prev
        .del(&cid, Some(&pod.path()), "eth0")
        .expect("DEL without prevResult succeeds");
    drop(pod);
    chain
        .del(&cid, Some(std::path::Path::new("/run/netns/gone")), "eth0")
        .expect("DEL with a vanished netns succeeds");
}

#[test]
fn lifecycle_cni_0_3_1() {
    full_lifecycle("0.3.1");
}

#[test]
fn lifecycle_cni_0_4_0() {
    full_lifecycle("0.4.0");
}

#[test]
fn lifecycle_cni_1_0_0() {
    full_lifecycle("1.0.0");
}

#[test]
fn lifecycle_cni_1_1_0() {
    full_lifecycle("1.1.0");
}

/// DEL of our plugin alone restores the MTUs Calico gave, from the backup.
#[test]
fn del_restores_the_original_mtu() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = plugin_dir(tmp.path());
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let mut chain = Chain::new(ptp_conflist("1.0.0", tmp.path(), json!({})), &bin, &node);
    let cid = unique("ctr");
    let result = chain.add(&cid, &pod.path(), "eth0").expect("ADD");
    let host_veth = result["interfaces"][0]["name"]
        .as_str()
        .expect("host veth")
        .to_string();

    let entry = ipsec_entry(tmp.path(), json!({}));
    let ours = Chain {
        conflist: json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [entry]}),
        cni_path: chain.cni_path.clone(),
        node: chain.node.clone(),
        per_plugin: vec![],
        cached: chain.cached.clone(),
    };
    ours.del(&cid, Some(&pod.path()), "eth0").expect("our DEL");
    assert_eq!(pod.mtu("eth0"), 1500, "pod MTU restored");
    assert_eq!(node.mtu(&host_veth), 1500, "host veth MTU restored");
    chain
        .del(&cid, Some(&pod.path()), "eth0")
        .expect("chain DEL");
}

/// An interface already at or below the bound is left alone: never raised.
#[test]
fn never_raises_an_mtu() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = plugin_dir(tmp.path());
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let mut conflist = ptp_conflist("1.0.0", tmp.path(), json!({}));
    conflist["plugins"][0]["mtu"] = json!(1400);
    let mut chain = Chain::new(conflist, &bin, &node);
    let cid = unique("ctr");
    chain.add(&cid, &pod.path(), "eth0").expect("ADD");
    assert_eq!(pod.mtu("eth0"), 1400);
    assert!(
        !tmp.path()
            .join("state")
            .join(format!("{cid}_eth0.json"))
            .exists(),
        "nothing changed, so nothing to back up"
    );
    chain.del(&cid, Some(&pod.path()), "eth0").expect("DEL");
}

/// Without ext_mtu, the bound comes from the node's uplink matching Felix's pattern.
#[test]
fn detects_the_underlay_mtu() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = plugin_dir(tmp.path());
    let node = Netns::new("node");
    // This kernel has no dummy driver; veth ends stand in for NICs, and their
    // peers are named so that Felix's pattern does not match them.
    node.ip(&[
        "link", "add", "ens5", "mtu", "1400", "type", "veth", "peer", "name", "xpeer0",
    ]);
    node.ip(&[
        "link", "add", "eth9", "mtu", "9000", "type", "veth", "peer", "name", "xpeer1",
    ]);
    node.ip(&[
        "link", "add", "eth8", "mtu", "1300", "type", "veth", "peer", "name", "xpeer2",
    ]);
    for l in ["ens5", "eth9", "xpeer0", "xpeer1"] {
        node.ip(&["link", "set", l, "up"]);
    }
    // eth8 stays down, so its smaller MTU must not count.
    let pod = Netns::new("pod");
    let mut conflist = ptp_conflist("1.0.0", tmp.path(), json!({}));
    conflist["plugins"][1]
        .as_object_mut()
        .expect("entry")
        .remove("ext_mtu");
    let mut chain = Chain::new(conflist, &bin, &node);
    let cid = unique("ctr");
    chain.add(&cid, &pod.path(), "eth0").expect("ADD");
    // The smallest matching up link is ens5 at 1400: floor4(1400-52)-2 = 1346.
    assert_eq!(pod.mtu("eth0"), 1346);

    // The CLI agrees, run in the same node namespace.
    let out = sh(&["ip", "netns", "exec", &node.name, PLUGIN, "mtu"]);
    assert_eq!(out.trim(), "1346");
    chain.del(&cid, Some(&pod.path()), "eth0").expect("DEL");
}

/// GC removes the state of attachments the runtime no longer lists; STATUS
/// reports readiness and code 50 when the bound cannot be found.
#[test]
fn gc_and_status_at_1_1_0() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = plugin_dir(tmp.path());
    let node = Netns::new("node");
    let pods = [Netns::new("pod"), Netns::new("pod")];
    let mut chain = Chain::new(ptp_conflist("1.1.0", tmp.path(), json!({})), &bin, &node);
    let cids = [unique("ctr"), unique("ctr")];
    for (cid, pod) in cids.iter().zip(&pods) {
        chain.add(cid, &pod.path(), "eth0").expect("ADD");
    }
    let state = tmp.path().join("state");
    let file = |c: &str| state.join(format!("{c}_eth0.json"));
    assert!(file(&cids[0]).exists() && file(&cids[1]).exists());

    chain.gc(&[(&cids[0], "eth0")]).expect("GC");
    assert!(
        file(&cids[0]).exists(),
        "a valid attachment keeps its state"
    );
    assert!(
        !file(&cids[1]).exists(),
        "a stale attachment's state is removed"
    );

    chain.status().expect("STATUS ready");

    let mut broken = ptp_conflist(
        "1.1.0",
        tmp.path(),
        json!({"mtu_iface_pattern": "^nomatch$"}),
    );
    broken["plugins"][1]
        .as_object_mut()
        .expect("entry")
        .remove("ext_mtu");
    let chain2 = Chain::new(broken, &bin, &node);
    let err = chain2.status().expect_err("STATUS not ready");
    assert_eq!(err.code(), Some(50), "{:?}", err.json);
}

/// Both shapes of Calico's result, fed as prevResult with a real veth pair
/// named the way Calico names it.
#[test]
fn calico_result_shapes() {
    require_root();
    for (file, version) in [
        ("result-0.3.1-calico-v3.31.json", "0.3.1"),
        ("result-0.3.1-calico-legacy.json", "0.3.1"),
        ("result-1.0.0-calico.json", "1.0.0"),
        ("result-1.0.0-calico.json", "1.1.0"),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let bin = plugin_dir(tmp.path());
        let node = Netns::new("node");
        let pod = Netns::new("pod");
        // Calico's veth: host side cali + 11 hex in the node, eth0 in the pod, MTU 1480.
        node.ip(&[
            "link",
            "add",
            "cali5f2a9c03d41",
            "mtu",
            "1480",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pod.name,
        ]);
        node.ip(&["link", "set", "cali5f2a9c03d41", "up"]);
        pod.ip(&["link", "set", "eth0", "mtu", "1480", "up"]);

        let mut prev = fixture(file);
        let sandbox = pod.path().to_string_lossy().into_owned();
        for iface in prev["interfaces"].as_array_mut().expect("interfaces") {
            if iface.get("sandbox").is_some() {
                iface["sandbox"] = json!(sandbox);
            }
        }
        prev["cniVersion"] = json!(version);
        let chain = Chain {
            conflist: json!({"cniVersion": version, "name": "k8s-pod-network",
                             "plugins": [ipsec_entry(tmp.path(), json!({}))]}),
            cni_path: vec![bin.clone()],
            node: node.name.clone(),
            per_plugin: vec![],
            cached: Some(prev.clone()),
        };
        let entry = chain.conflist["plugins"][0].clone();
        let mut conf = entry.clone();
        conf["name"] = json!("k8s-pod-network");
        conf["cniVersion"] = json!(version);
        conf["prevResult"] = prev.clone();
        let cid = unique("ctr");
        let out = chain.exec(
            "calico-ipsec",
            "ADD",
            &[
                ("CNI_CONTAINERID", &cid),
                ("CNI_NETNS", &sandbox),
                ("CNI_IFNAME", "eth0"),
            ],
            &conf,
        );
        assert!(out.ok, "{file}: {}", out.stdout);
        assert_eq!(pod.mtu("eth0"), 1446, "{file}: pod clamped");
        assert_eq!(
            node.mtu("cali5f2a9c03d41"),
            1446,
            "{file}: host veth clamped"
        );

        let mut expect = prev.clone();
        for iface in expect["interfaces"].as_array_mut().expect("interfaces") {
            if iface.get("mtu").is_some() {
                iface["mtu"] = json!(1446);
            }
        }
        assert_eq!(
            out.json.as_ref(),
            Some(&expect),
            "{file}: result passed on, MTU updated"
        );
        if version != "0.3.1" {
            chain.check(&cid, &pod.path(), "eth0").expect("CHECK");
        }
        chain.del(&cid, Some(&pod.path()), "eth0").expect("DEL");
        assert_eq!(pod.mtu("eth0"), 1480, "{file}: DEL restored the MTU");
    }
}
