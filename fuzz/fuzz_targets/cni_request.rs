//! Fuzzes everything that parses outside input: the CNI request (stdin),
//! our config entry, and prevResult, including the version conversion of the
//! result. The first byte picks the CNI verb; the rest is stdin.
//! Any panic is a bug: parsing must end in Ok or a CNI error.

#![no_main]

use calico_ipsec::cni::{self, result, CniVersion, Command, Env};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stdin)) = data.split_first() else {
        return;
    };
    let command = [
        Command::Add,
        Command::Del,
        Command::Check,
        Command::Gc,
        Command::Status,
    ][sel as usize % 5];
    let env = Env {
        command,
        container_id: Some("fuzz".into()),
        netns: Some("/run/netns/fuzz".into()),
        ifname: Some("eth0".into()),
        refused: None,
    };
    let Ok(raw) = cni::parse_stdin(stdin) else {
        return;
    };
    match cni::parse_request(env, raw) {
        Ok(req) => {
            if let Some(prev) = &req.prev_result {
                for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
                    let v = CniVersion::parse(v).expect("supported");
                    let out = result::render(prev, v, &[]);
                    // A rendered result must itself be a valid result.
                    result::validate(&out).expect("render keeps a result valid");
                }
            }
        }
        Err(e) => {
            assert!(!e.msg.is_empty(), "every error tells the operator something");
            assert!(e.code > 0);
        }
    }
});
