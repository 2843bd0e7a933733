//! Asking a daemon's HTTP endpoint, and checking its metrics with promtool.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `GET path` on 127.0.0.1:`port`: the status code and body; `None` when
/// nothing answers.
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// Polls `GET path` until it answers `code`, for up to `secs`; the body.
pub fn wait_for(port: u16, path: &str, code: u16, secs: u64) -> String {
    wait_for_text(port, path, code, "", secs)
}

/// Polls `GET path` until it answers `code` with a body that contains
/// `text`, for up to `secs`; the body. A probe may give one honest reason
/// before another (a failed convergence before the stale grace ends), so a
/// test that wants a given reason waits for it.
pub fn wait_for_text(port: u16, path: &str, code: u16, text: &str, secs: u64) -> String {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    while Instant::now() < end {
        last = get(port, path);
        if let Some((c, body)) = &last {
            if *c == code && body.contains(text) {
                return body.clone();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{path} did not answer {code} with {text:?} within {secs}s; last answer: {last:?}");
}

/// Runs `promtool check metrics` (Debian's `prometheus` package) on `text`
/// and fails the test with its complaints.
pub fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is not installed: apt-get install prometheus (make deps does)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- the exposition:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
