//! ADD latency (phase off, on the host) against a real three-member etcd
//! cluster with one member hung (SIGSTOP), against the same cluster healthy,
//! in one run.
//!
//! Setup: a node namespace (which this process enters, with the cluster in
//! it), a pod created by the real `ptp` + `host-local`, `keys init`. Then, in
//! blocks that alternate, `calico-ipsec` ADD with ptp's result as prevResult:
//! a block with every member up, then a block with the member the node's
//! hint file names (the one ADDs go to first: the worst one to lose) hung.
//! The first ADD of a hung block pays one attempt slice on it; the rest go
//! straight to a live member. Run as root: `make bench`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::EtcdCluster;
use common::*;
use serde_json::json;

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    require_root();
    let per_side: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let blocks = 10usize;
    let per_block = per_side.div_ceil(blocks).max(1);
    let node = Netns::new("bcnode");
    node.enter();
    let pod = Netns::new("bcpod");
    let mut cluster = EtcdCluster::start();
    let eps = cluster.endpoints_csv();
    let tmp = tempfile::tempdir().expect("tempdir");
    let kek = tmp.path().join("kek");
    let out = std::process::Command::new(PLUGIN)
        .args(["keys", "init", "--kek-file"])
        .arg(&kek)
        .args(["--etcd-endpoints", &eps])
        .output()
        .expect("keys init");
    assert!(out.status.success(), "keys init: {out:?}");
    for (k, v) in fixture("etcd-3-nodes.json").as_object().expect("fixture") {
        let out = cluster.etcdctl_at(&[0, 1, 2], &["put", k, &v.to_string()]);
        assert!(out.status.success(), "put {k}: {out:?}");
    }
    let bin = plugin_dir(tmp.path());
    let extra = json!({"etcd_endpoints": eps, "kek_file": kek, "log_level": "warning"});
    let mut chain = Chain::new(
        ptp_conflist("1.0.0", tmp.path(), extra.clone()),
        &bin,
        &node,
    );
    let cid = unique("bench");
    chain
        .add(&cid, &pod.path(), "eth0")
        .expect("ptp + calico-ipsec ADD");
    let ns = pod.path().to_string_lossy().into_owned();
    let env = [
        ("CNI_CONTAINERID", cid.as_str()),
        ("CNI_NETNS", ns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let mut conf = ipsec_entry(tmp.path(), extra);
    conf["name"] = json!("k8s-pod-network");
    conf["cniVersion"] = json!("1.0.0");
    conf["prevResult"] = chain.per_plugin[0].clone();
    let hint = tmp.path().join("state/node/etcd-member");
    let run = || -> Duration {
        let start = Instant::now();
        let out = chain.exec("calico-ipsec", "ADD", &env, &conf);
        let took = start.elapsed();
        assert!(out.ok, "ADD failed: {}", out.stdout);
        took
    };
    for _ in 0..5 {
        run();
    }
    let (mut healthy, mut hung) = (Vec::new(), Vec::new());
    let mut hung_firsts = Vec::new();
    for _ in 0..blocks {
        for _ in 0..per_block {
            healthy.push(run());
        }
        let named = std::fs::read_to_string(&hint).unwrap_or_default();
        let victim = cluster
            .endpoints()
            .iter()
            .position(|e| e == named.trim())
            .unwrap_or(0);
        cluster.hang(victim);
        for k in 0..per_block {
            let d = run();
            if k == 0 {
                hung_firsts.push(d);
            }
            hung.push(d);
        }
        cluster.resume(victim);
        cluster.wait_healthy(None);
    }
    let (mh, mx) = (pct(&healthy, 0.5), pct(&hung, 0.5));
    let ratio = mx.as_secs_f64() / mh.as_secs_f64();
    let table = format!(
        "CNI ADD (phase off, host) against a 3-member etcd cluster, {blocks} alternating blocks of {per_block}\n\
         cluster                     median    p90       p99       max\n\
         healthy                     {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms\n\
         the hinted member hung      {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms\n\
         first ADD of each hung block (pays one attempt slice): median {:.0}ms, max {:.0}ms\n\
         ratio hung / healthy (median): {ratio:.2}x (target <= 1.5x)\n",
        ms(mh), ms(pct(&healthy, 0.9)), ms(pct(&healthy, 0.99)), ms(pct(&healthy, 1.0)),
        ms(mx), ms(pct(&hung, 0.9)), ms(pct(&hung, 0.99)), ms(pct(&hung, 1.0)),
        ms(pct(&hung_firsts, 0.5)), ms(pct(&hung_firsts, 1.0)),
    );
    print!("{table}");
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&out_dir);
    let _ = std::fs::write(out_dir.join("etcd_cluster.txt"), &table);
    chain.del(&cid, Some(&pod.path()), "eth0").expect("DEL");
}
