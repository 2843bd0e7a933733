//! The tests' CNI client (`tests/common/chain.rs`) as a command, for the
//! shell suites in the VM (`tests/e2e/lib.sh`): the same libcni semantics as
//! the Rust tests, written once.
//!
//! ```text
//! cni_client ADD|CHECK|DEL --conflist FILE --node NS --cid ID --netns PATH
//!            --cache FILE [--ifname IF] [--cni-path DIR:DIR...]
//! ```
//!
//! ADD prints the chain's result and caches it in `--cache`; CHECK and DEL
//! pass the cached result as `prevResult` (DEL without one when the cache is
//! missing). A failing plugin's output (its CNI error) is printed on stdout
//! and the exit status is 1; a usage or file error exits with 2.

#[path = "../tests/common/chain.rs"]
mod chain;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chain::Chain;
use serde_json::Value;

struct Args {
    verb: String,
    conflist: PathBuf,
    node: String,
    cid: String,
    netns: PathBuf,
    cache: PathBuf,
    ifname: String,
    cni_path: Vec<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let verb = it.next().ok_or("a verb: ADD, CHECK or DEL")?;
    let (mut conflist, mut node, mut cid, mut netns, mut cache) = (None, None, None, None, None);
    let mut ifname = "eth0".to_string();
    let mut cni_path = vec![PathBuf::from(chain::DEBIAN_CNI_DIR)];
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--conflist" => conflist = Some(PathBuf::from(value)),
            "--node" => node = Some(value),
            "--cid" => cid = Some(value),
            "--netns" => netns = Some(PathBuf::from(value)),
            "--cache" => cache = Some(PathBuf::from(value)),
            "--ifname" => ifname = value,
            "--cni-path" => cni_path = std::env::split_paths(&value).collect(),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(Args {
        verb,
        conflist: need(conflist, "--conflist")?,
        node: need(node, "--node")?,
        cid: need(cid, "--cid")?,
        netns: need(netns, "--netns")?,
        cache: need(cache, "--cache")?,
        ifname,
        cni_path,
    })
}

fn need<T>(v: Option<T>, flag: &str) -> Result<T, String> {
    v.ok_or_else(|| format!("{flag} is required"))
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn run(a: &Args) -> Result<Result<(), chain::Exec>, String> {
    let mut chain = Chain::new(read_json(&a.conflist)?, Path::new("/nonexistent"), &a.node);
    chain.cni_path.clone_from(&a.cni_path);
    match a.verb.as_str() {
        "ADD" => Ok(chain.add(&a.cid, &a.netns, &a.ifname).and_then(|result| {
            let text = result.to_string();
            println!("{text}");
            std::fs::write(&a.cache, format!("{text}\n")).map_err(|e| chain::Exec {
                ok: false,
                json: None,
                stdout: format!("cannot cache the result in {}: {e}", a.cache.display()),
            })
        })),
        "CHECK" => {
            chain.cached = Some(read_json(&a.cache)?);
            Ok(chain.check(&a.cid, &a.netns, &a.ifname))
        }
        "DEL" => {
            chain.cached = read_json(&a.cache).ok();
            let r = chain.del(&a.cid, Some(&a.netns), &a.ifname);
            if r.is_ok() {
                let _ = std::fs::remove_file(&a.cache);
            }
            Ok(r)
        }
        other => Err(format!("unknown verb {other}: ADD, CHECK or DEL")),
    }
}

fn main() -> ExitCode {
    let outcome = parse().and_then(|a| run(&a));
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(failed)) => {
            println!("{}", failed.stdout.trim());
            ExitCode::from(1)
        }
        Err(usage) => {
            eprintln!("cni_client: {usage}");
            ExitCode::from(2)
        }
    }
}
