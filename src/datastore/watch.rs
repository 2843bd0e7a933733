//! One etcd watch per key prefix, each resuming after a reconnect from the
//! last revision it delivered, and re-reading its prefix only when etcd has
//! compacted that revision away, or when etcd's revision is found below it
//! (a datastore wiped and re-initialised, or restored from a snapshot: a
//! watch from a revision etcd has not reached yet would wait in silence).
//!
//! A watch lives on one member. When that member dies, hangs (another
//! request of this process timed out on it, or HTTP/2 keep-alive found it)
//! or loses its leader (it cancels the watch, since every request asks for
//! a leader), the watch is reopened on another.

use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;

use crate::datastore::etcd::{Etcd, Kv};

/// How often a watch checks whether its member has been found dead or hung.
const MEMBER_CHECK: Duration = Duration::from_millis(500);

/// etcd's revision, when a watch's creation reply shows it below `delivered`:
/// the store went back in time, and everything read from it must be read
/// again.
fn went_back(resp: &etcd_client::WatchResponse, delivered: i64) -> Option<i64> {
    if !resp.created() {
        return None;
    }
    let now = resp.header()?.revision();
    (now < delivered).then_some(now)
}

/// One change inside a prefix, in the order etcd applied it.
#[derive(Debug, Clone)]
pub enum Change {
    /// A key was written.
    Put(Kv),
    /// A key was deleted.
    Delete(String),
}

/// What a prefix's watcher tells the agent.
#[derive(Debug)]
pub enum WatchMsg {
    /// The whole prefix as read at `revision` (first read, or after a compaction).
    Reset {
        /// Which prefix.
        idx: usize,
        /// Every key under it.
        kvs: Vec<Kv>,
        /// The revision of the read.
        revision: i64,
    },
    /// Changes up to `revision`.
    Changes {
        /// Which prefix.
        idx: usize,
        /// The changes, in order.
        changes: Vec<Change>,
        /// The highest revision delivered.
        revision: i64,
    },
    /// The watch is established (again).
    Up {
        /// Which prefix.
        idx: usize,
    },
    /// etcd could not be reached; the watcher retries.
    Down {
        /// Which prefix.
        idx: usize,
        /// What failed.
        reason: String,
    },
}

impl WatchMsg {
    /// The prefix the message is about.
    pub fn idx(&self) -> usize {
        match self {
            WatchMsg::Reset { idx, .. }
            | WatchMsg::Changes { idx, .. }
            | WatchMsg::Up { idx }
            | WatchMsg::Down { idx, .. } => *idx,
        }
    }
}

/// Marks watch `idx` of `down` up again: true when it had been down (then
/// logged), so that whoever keeps the cache looks at the prefix again.
pub fn mark_up(down: &mut [bool], idx: usize) -> bool {
    let was = down.get_mut(idx).is_some_and(std::mem::take);
    if was {
        tracing::info!(idx, "etcd watch resumed");
    }
    was
}

/// Marks watch `idx` of `down` down: true when it was up until now.
pub fn mark_down(down: &mut [bool], idx: usize) -> bool {
    down.get_mut(idx)
        .is_some_and(|d| !std::mem::replace(d, true))
}

/// Watches `prefix` for ever, sending what it sees to `tx`; ends when `tx`
/// is closed.
pub async fn watch_prefix(etcd: Etcd, idx: usize, prefix: String, tx: mpsc::Sender<WatchMsg>) {
    let mut revision: Option<i64> = None;
    let mut backoff = Duration::from_millis(100);
    let max_backoff = Duration::from_secs(2);
    loop {
        if tx.is_closed() {
            return;
        }
        let rev = match revision {
            Some(r) => r,
            None => match etcd.get_prefix(&prefix, false).await {
                Ok((r, kvs)) => {
                    if tx
                        .send(WatchMsg::Reset {
                            idx,
                            kvs,
                            revision: r,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    revision = Some(r);
                    r
                }
                Err(e) => {
                    let _ = tx
                        .send(WatchMsg::Down {
                            idx,
                            reason: e.to_string(),
                        })
                        .await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max_backoff);
                    continue;
                }
            },
        };
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1)
            .with_progress_notify();
        let mut watching = match etcd.watch(&prefix, opts).await {
            Ok(w) => w,
            Err(e) => {
                let _ = tx
                    .send(WatchMsg::Down {
                        idx,
                        reason: e.to_string(),
                    })
                    .await;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
                continue;
            }
        };
        tracing::debug!(prefix = %prefix, member = %watching.endpoint, "watching");
        let mut announced = false;
        let mut check = tokio::time::interval(MEMBER_CHECK);
        loop {
            let next = tokio::select! {
                next = watching.stream.message() => next,
                _ = check.tick() => {
                    if etcd.member_failed_since(&watching) {
                        // Another request found this member dead or hung:
                        // its watch may be silent without an error.
                        let reason = format!("watch {prefix}: {} stopped answering", watching.endpoint);
                        let _ = tx.send(WatchMsg::Down { idx, reason }).await;
                        break;
                    }
                    continue;
                }
            };
            match next {
                Ok(Some(resp)) => {
                    if let Some(now) = went_back(&resp, rev) {
                        tracing::warn!(
                            prefix = %prefix,
                            delivered = rev,
                            etcd_revision = now,
                            "etcd's revision is below the one this watch delivered (the datastore was re-initialised or restored from a snapshot); re-reading the prefix"
                        );
                        revision = None;
                        break;
                    }
                    if !announced {
                        announced = true;
                        backoff = Duration::from_millis(100);
                        if tx.send(WatchMsg::Up { idx }).await.is_err() {
                            return;
                        }
                    }
                    if resp.compact_revision() > 0 {
                        tracing::warn!(
                            prefix = %prefix,
                            from = rev + 1,
                            compacted = resp.compact_revision(),
                            "etcd compacted the revisions this watch needed; re-reading the prefix"
                        );
                        revision = None;
                        break;
                    }
                    if resp.canceled() {
                        tracing::warn!(prefix = %prefix, member = %watching.endpoint, reason = resp.cancel_reason(), "etcd cancelled the watch; resuming on another member");
                        etcd.watch_failed(&watching, resp.cancel_reason());
                        break;
                    }
                    let mut changes = Vec::with_capacity(resp.events().len());
                    let mut high = revision.unwrap_or(rev);
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        high = high.max(kv.mod_revision());
                        changes.push(match ev.event_type() {
                            EventType::Put => Change::Put(Kv {
                                key,
                                value: kv.value().to_vec(),
                                mod_revision: kv.mod_revision(),
                                lease: kv.lease(),
                            }),
                            EventType::Delete => Change::Delete(key),
                        });
                    }
                    // A progress notification (no events, for this watch,
                    // not its creation): every event up to the header's
                    // revision has been delivered. A creation reply, or a
                    // reply to a progress request (watch id -1; etcd 3.4
                    // sends it even while the watch is catching up), says
                    // nothing about what was delivered.
                    if changes.is_empty() && !resp.created() && resp.watch_id() >= 0 {
                        if let Some(h) = resp.header() {
                            high = high.max(h.revision());
                        }
                    }
                    revision = Some(high);
                    if !changes.is_empty()
                        && tx
                            .send(WatchMsg::Changes {
                                idx,
                                changes,
                                revision: high,
                            })
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
                Ok(None) => {
                    let reason = format!("watch {prefix} on {}: stream ended", watching.endpoint);
                    etcd.watch_failed(&watching, &reason);
                    let _ = tx.send(WatchMsg::Down { idx, reason }).await;
                    break;
                }
                Err(e) => {
                    let reason = format!("watch {prefix} on {}: {e}", watching.endpoint);
                    etcd.watch_failed(&watching, &reason);
                    let _ = tx.send(WatchMsg::Down { idx, reason }).await;
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max_backoff);
    }
}
