//! etcd is a cluster: one client per member, and every request tried on
//! one member at a time until one answers.
//!
//! - Each attempt has a deadline that is a slice of the request's budget (at
//!   most [`MAX_ATTEMPT`]), so a hung member (TCP connects, nothing answers)
//!   costs one slice, and a dead one (connection refused) almost nothing.
//! - Members are tried starting with the one that answered last; one that
//!   failed recently goes last. Requests that follow avoid a bad member.
//! - A short-lived process (the CNI plugin) cannot remember that across
//!   invocations, so the member that answered last is kept in a small hint
//!   file (in the state directory), written only when it changes.
//! - Every request carries `hasleader=true` (etcd's `--require-leader`): a
//!   member that lost its leader refuses it at once, and cancels a watch,
//!   instead of serving stale data; the request moves to another member.
//! - When no member answers (an election in progress), the request goes
//!   round again until its budget is spent, members that hung last.
//!
//! Writes are retried on another member only when the first did not answer.
//! Every write here is idempotent or a compare-and-swap, so a write that did
//! land before its member stopped answering reads, on retry, as a lost race,
//! which every caller already handles.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::{EtcdError, EtcdSettings};

/// The longest a single attempt on one member may take when others remain.
pub const MAX_ATTEMPT: Duration = Duration::from_millis(500);
/// How long a member that failed is tried after the others.
const SUSPECT_FOR: Duration = Duration::from_secs(30);
/// Pause between two rounds over members that all failed fast.
const ROUND_PAUSE: Duration = Duration::from_millis(100);
/// HTTP/2 keep-alive on long-lived connections: finds a hung member under an
/// open watch. etcd refuses pings closer than 5 s (`--grpc-keepalive-min-time`).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(6);
/// How long a keep-alive ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest hint file read.
const HINT_MAX_BYTES: u64 = 1024;

struct Member {
    endpoint: String,
    /// Requests ask for a leader (`hasleader`).
    client: Client,
    /// The same member without that requirement, for serializable reads
    /// while no member has a leader (connected only when used).
    leaderless: Client,
    failed_at: Mutex<Option<Instant>>,
    /// How many times it failed to answer (watches on it check this).
    failures: AtomicU64,
}

impl Member {
    fn suspect(&self, now: Instant) -> bool {
        lock(&self.failed_at).is_some_and(|t| now.duration_since(t) < SUSPECT_FOR)
    }
}

/// The cluster's members and the order to try them in.
pub(super) struct Members {
    members: Vec<Member>,
    /// The member that answered last.
    preferred: AtomicUsize,
    /// The member the hint file names (as read or last written).
    hinted: Mutex<Option<usize>>,
    hint_file: Option<PathBuf>,
    budget: Duration,
    slice: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read_tls(path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::TlsFile {
        path: path.to_path_buf(),
        source,
    })
}

/// How one attempt failed.
enum Failure {
    /// The member did not answer usefully: try another.
    Unavailable(String),
    /// The member answered with an error every member would give.
    Refused(etcd_client::Error),
}

fn classify(e: etcd_client::Error) -> Failure {
    let unavailable = match &e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        // A lease keep-alive or watch stream that broke; not etcd's answer
        // that the lease is gone (the client turns a TTL of 0 into
        // "lease not found"): that is an answer, see [`lease_not_found`].
        etcd_client::Error::LeaseKeepAliveError(_) => !lease_not_found(&e),
        etcd_client::Error::WatchError(_) => true,
        // Codes named by text: tonic is not a direct dependency. A status
        // with a source was made on this side from a transport failure (a
        // connection the member broke: "Unknown", "transport error"); one
        // that etcd sent has none.
        etcd_client::Error::GRpcStatus(status) => {
            matches!(
                format!("{:?}", status.code()).as_str(),
                "Unavailable" | "DeadlineExceeded" | "Cancelled"
            ) || std::error::Error::source(status).is_some()
        }
        _ => false,
    };
    if unavailable {
        Failure::Unavailable(e.to_string())
    } else {
        Failure::Refused(e)
    }
}

/// Whether etcd answered that the lease a request named does not exist
/// (`NotFound`, "etcdserver: requested lease not found").
fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}", status.code()) == "NotFound"
                && status.message().contains("lease not found")
        }
        // A keep-alive answered with a TTL of 0: the lease expired.
        etcd_client::Error::LeaseKeepAliveError(msg) => msg == "lease not found",
        _ => false,
    }
}

impl Members {
    /// One lazily connected client per endpoint; no I/O happens here.
    pub(super) async fn new(s: &EtcdSettings) -> Result<Self, EtcdError> {
        let endpoints = &s.config.endpoints;
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let budget = s.request_timeout;
        let slice = if endpoints.len() > 1 {
            MAX_ATTEMPT.min(budget / 2)
        } else {
            budget
        };
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(s.connect_timeout.min(slice))
            .with_require_leader(true)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(false);
        let wants_tls = endpoints.iter().any(|e| e.starts_with("https://"))
            || s.config.ca_cert_file.is_some()
            || s.config.cert_file.is_some();
        if wants_tls {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &s.config.ca_cert_file {
                tls = tls.ca_certificate(Certificate::from_pem(read_tls(ca)?));
            }
            if let (Some(cert), Some(key)) = (&s.config.cert_file, &s.config.key_file) {
                tls = tls.identity(Identity::from_pem(read_tls(cert)?, read_tls(key)?));
            }
            opts = opts.with_tls(tls);
        }
        let mut members = Vec::with_capacity(endpoints.len());
        for ep in endpoints {
            let connect = |opts: ConnectOptions| async move {
                Client::connect([ep.as_str()], Some(opts))
                    .await
                    .map_err(|e| EtcdError::Unreachable {
                        endpoints: ep.clone(),
                        reason: e.to_string(),
                    })
            };
            let client = connect(opts.clone()).await?;
            let leaderless = connect(opts.clone().with_require_leader(false)).await?;
            members.push(Member {
                endpoint: ep.clone(),
                client,
                leaderless,
                failed_at: Mutex::new(None),
                failures: AtomicU64::new(0),
            });
        }
        let hinted = s
            .hint_file
            .as_deref()
            .and_then(read_hint)
            .and_then(|h| members.iter().position(|m| m.endpoint == h));
        Ok(Self {
            members,
            preferred: AtomicUsize::new(hinted.unwrap_or(0)),
            hinted: Mutex::new(hinted),
            hint_file: s.hint_file.clone(),
            budget,
            slice,
        })
    }

    /// The endpoint of member `i`.
    pub(super) fn endpoint(&self, i: usize) -> &str {
        self.members.get(i).map_or("", |m| m.endpoint.as_str())
    }

    /// The members in the order to try: the one that answered last, then
    /// the others in configured order, suspects last.
    fn order(&self) -> Vec<usize> {
        let n = self.members.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let now = Instant::now();
        let mut order: Vec<usize> = (0..n).map(|k| (first + k) % n).collect();
        order.sort_by_key(|&i| self.members[i].suspect(now));
        order
    }

    /// How many times member `i` failed to answer.
    pub(super) fn failures(&self, i: usize) -> u64 {
        self.members
            .get(i)
            .map_or(0, |m| m.failures.load(Ordering::Relaxed))
    }

    /// Records that member `i` failed to answer: later requests try it last.
    pub(super) fn failed(&self, i: usize, reason: &str) {
        let Some(m) = self.members.get(i) else { return };
        m.failures.fetch_add(1, Ordering::Relaxed);
        let was = lock(&m.failed_at).replace(Instant::now());
        if self.members.len() > 1 && (was.is_none() || self.preferred.load(Ordering::Relaxed) == i)
        {
            tracing::info!(member = %m.endpoint, reason, "etcd member did not answer; using the others first");
        }
    }

    fn answered(&self, i: usize) {
        let Some(m) = self.members.get(i) else { return };
        *lock(&m.failed_at) = None;
        self.preferred.store(i, Ordering::Relaxed);
        let mut hinted = lock(&self.hinted);
        if *hinted != Some(i) {
            *hinted = Some(i);
            if let Some(path) = &self.hint_file {
                if let Err(e) = write_hint(path, &m.endpoint) {
                    tracing::debug!(path = %path.display(), error = %e, "cannot record the etcd member that answered");
                }
            }
        }
    }

    /// Runs `f` on one member after another until one answers, within the
    /// budget. Returns the answer and the member that gave it.
    ///
    /// `stale_ok` (serializable reads): when most members say they have no
    /// leader (the cluster is electing one), ask again without the
    /// requirement: nothing can commit meanwhile, and an ADD need not wait
    /// out the election. A member cut off alone still is not read: the
    /// others have a leader.
    pub(super) async fn call<T, F, Fut>(
        &self,
        op: &str,
        stale_ok: bool,
        mut f: F,
    ) -> Result<(T, usize), EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let start = Instant::now();
        let mut order = self.order();
        let mut failures: Vec<String> = Vec::new();
        let mut need_leader = true;
        // A majority of members without a leader means no write can commit
        // anywhere until the election ends (a hung member among the rest
        // cannot be leading one), so a serializable read is as current as
        // waiting would make it.
        let n = order.len();
        let electing =
            |need_leader: bool, leaderless: usize| stale_ok && need_leader && leaderless * 2 > n;
        'rounds: loop {
            let mut timed_out = Vec::new();
            let mut leaderless = 0;
            for &i in &order {
                let left = self.budget.saturating_sub(start.elapsed());
                if left.is_zero() {
                    break 'rounds;
                }
                // Never more than a slice, even on the last member: a write
                // proposed while the cluster elects a leader is dropped by
                // etcd and answered only after its own 7 s timeout, while
                // the same write proposed again a moment later succeeds.
                let slice = left.min(self.slice);
                let m = &self.members[i];
                let client = if need_leader {
                    &m.client
                } else {
                    &m.leaderless
                };
                let reason = match tokio::time::timeout(slice, f(client.clone())).await {
                    Ok(Ok(v)) => {
                        self.answered(i);
                        return Ok((v, i));
                    }
                    Ok(Err(e)) => match classify(e) {
                        Failure::Refused(e) if lease_not_found(&e) => {
                            self.answered(i);
                            return Err(EtcdError::LeaseNotFound { op: op.to_string() });
                        }
                        Failure::Refused(e) => {
                            self.answered(i);
                            return Err(EtcdError::Request {
                                op: op.to_string(),
                                reason: format!("{} ({})", e, m.endpoint),
                            });
                        }
                        Failure::Unavailable(reason) => {
                            if reason.contains("no leader") {
                                leaderless += 1;
                            }
                            reason
                        }
                    },
                    Err(_) => {
                        timed_out.push(i);
                        format!("no answer within {}ms", slice.as_millis())
                    }
                };
                tracing::debug!(op, member = %m.endpoint, %reason, "etcd attempt failed");
                self.failed(i, &reason);
                let line = format!("{}: {reason}", m.endpoint);
                if !failures.contains(&line) {
                    failures.push(line);
                }
                // Enough members are electing: the rest (perhaps hung)
                // need not be waited for.
                if electing(need_leader, leaderless) {
                    break;
                }
            }
            // Round again (an election, a restart), members that did not
            // answer at all last.
            if start.elapsed() + ROUND_PAUSE >= self.budget {
                break;
            }
            order.sort_by_key(|i| timed_out.contains(i));
            if electing(need_leader, leaderless) {
                tracing::info!(
                    op,
                    leaderless,
                    members = n,
                    "most etcd members have no leader (an election): reading without one"
                );
                need_leader = false;
                continue;
            }
            tokio::time::sleep(ROUND_PAUSE).await;
        }
        Err(EtcdError::Unreachable {
            endpoints: self
                .members
                .iter()
                .map(|m| m.endpoint.as_str())
                .collect::<Vec<_>>()
                .join(","),
            reason: format!(
                "{op}: no member answered within {}ms ({})",
                self.budget.as_millis(),
                failures.join("; ")
            ),
        })
    }
}

/// The endpoint a hint file names, if it is a small regular file.
fn read_hint(path: &Path) -> Option<String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    f.take(HINT_MAX_BYTES).read_to_string(&mut text).ok()?;
    Some(text.trim().to_string())
}

/// Replaces the hint file: a fresh temporary file beside it, renamed over it.
fn write_hint(path: &Path, endpoint: &str) -> std::io::Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}.{nanos}", std::process::id()));
    let tmp = PathBuf::from(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(endpoint.as_bytes())?;
        f.write_all(b"\n")?;
        std::fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_round_trips_and_ignores_links_and_junk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("etcd-member");
        assert_eq!(read_hint(&p), None);
        write_hint(&p, "http://127.0.0.1:2379").expect("write");
        assert_eq!(read_hint(&p).as_deref(), Some("http://127.0.0.1:2379"));
        write_hint(&p, "http://127.0.0.2:2379").expect("rewrite");
        assert_eq!(read_hint(&p).as_deref(), Some("http://127.0.0.2:2379"));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).expect("symlink");
        assert_eq!(read_hint(&link), None, "a symlink is not followed");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("ls").count(),
            2,
            "no temporary file left behind"
        );
    }
}
