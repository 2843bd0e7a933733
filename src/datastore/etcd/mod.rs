//! A thin etcd v3 client: endpoints and TLS as Calico configures them, every
//! request bounded by a timeout and failed over between the cluster's
//! members ([`failover`]), and errors that say which endpoints failed.

mod failover;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, KvClient, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use serde::{Deserialize, Serialize};

use crate::config::EtcdConfig;

pub use failover::MAX_ATTEMPT;

/// Default bound on connecting to etcd and on each request.
pub use crate::config::DEFAULT_ETCD_TIMEOUT as DEFAULT_TIMEOUT;

/// The largest reply accepted (tonic's default, 4 MiB, is too small for the
/// Calico nodes of a big cluster).
const MAX_REPLY_BYTES: usize = 1 << 30;

/// An etcd failure, naming the endpoint or key.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoints were configured.
    #[error("no etcd endpoints configured: set etcd_endpoints (or ETCD_ENDPOINTS)")]
    NoEndpoints,
    /// A TLS file could not be read.
    #[error("reading the etcd TLS file {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// etcd did not answer in time, or refused the connection.
    #[error("etcd at {endpoints} is unreachable: {reason}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// What happened.
        reason: String,
    },
    /// A request failed after connecting.
    #[error("etcd {op} failed: {reason}")]
    Request {
        /// What was being done, with the key.
        op: String,
        /// What etcd or the transport said.
        reason: String,
    },
    /// The request named a lease etcd no longer knows (it expired).
    #[error("etcd {op} failed: the lease expired (etcd no longer knows it)")]
    LeaseNotFound {
        /// What was being done, with the key.
        op: String,
    },
}

impl EtcdError {
    /// Whether trying again later may succeed (etcd down or slow).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, EtcdError::Unreachable { .. })
    }
}

/// Everything needed to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// The members' endpoints, CA, client certificate and client key, as in
    /// Calico's conflist.
    pub config: EtcdConfig,
    /// Bound on connecting to one member.
    pub connect_timeout: Duration,
    /// Bound on each request, failovers included.
    pub request_timeout: Duration,
    /// Where to remember the member that answered last, across processes.
    pub hint_file: Option<PathBuf>,
}

impl EtcdSettings {
    /// Settings from a conflist's etcd fields, bounding each request by `timeout`.
    pub fn from_config(c: &EtcdConfig, timeout: Duration) -> Self {
        Self {
            config: c.clone(),
            connect_timeout: timeout,
            request_timeout: timeout,
            hint_file: None,
        }
    }

    /// The same settings, remembering the member that answered in `path`.
    pub fn with_hint_file(mut self, path: PathBuf) -> Self {
        self.hint_file = Some(path);
        self
    }
}

/// A client of every member, with a per-request time budget.
#[derive(Clone)]
pub struct Etcd {
    members: Arc<failover::Members>,
    endpoints: String,
}

/// A watch stream on one member.
pub struct Watching {
    /// The stream.
    pub stream: WatchStream,
    /// The member's endpoint, for messages.
    pub endpoint: String,
    member: usize,
    /// The member's failure count when the watch was opened.
    failures: u64,
}

/// One key and its value from a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The raw value.
    pub value: Vec<u8>,
    /// The revision that last modified it.
    pub mod_revision: i64,
    /// The lease it is bound to (0: none).
    pub lease: i64,
}

/// One range of a read-only transaction: a key, or every key under a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range<'a> {
    /// The key or prefix.
    pub key: &'a str,
    /// True for every key starting with `key`.
    pub prefix: bool,
}

/// A range's mark: its number of keys and the newest modification revision
/// among them. Any put in the range raises the revision; any delete lowers
/// the count (a delete with a put raises the revision), so an unchanged mark
/// means an unchanged range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Keys in the range.
    pub count: i64,
    /// The newest `mod_revision` among them (0 when empty).
    pub max_mod_revision: i64,
}

impl Mark {
    /// The mark of keys already read.
    pub fn of(kvs: &[Kv]) -> Self {
        Self {
            count: i64::try_from(kvs.len()).unwrap_or(i64::MAX),
            max_mod_revision: kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or(0),
        }
    }
}

/// The header of a reply: which cluster answered, at which revision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// The etcd cluster's id.
    pub cluster_id: u64,
    /// The store revision the reads saw.
    pub revision: i64,
}

fn range_options(r: &Range<'_>) -> GetOptions {
    let opts = GetOptions::new().with_serializable();
    if r.prefix {
        opts.with_prefix()
    } else {
        opts
    }
}

fn describe_ranges(ranges: &[Range<'_>]) -> String {
    ranges
        .iter()
        .map(|r| format!("{}{}", r.key, if r.prefix { "*" } else { "" }))
        .collect::<Vec<_>>()
        .join(" ")
}

fn to_kv(kv: etcd_client::KeyValue) -> Kv {
    let mod_revision = kv.mod_revision();
    let lease = kv.lease();
    let (key, value) = kv.into_key_value();
    Kv {
        lease,
        key: String::from_utf8(key)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        value,
        mod_revision,
    }
}

fn kv(c: &Client) -> KvClient {
    c.kv_client().max_decoding_message_size(MAX_REPLY_BYTES)
}

impl Etcd {
    /// Runs `f` on the members in turn until one answers, within the budget.
    async fn call<T, F, Fut>(&self, op: &str, f: F) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.members.call(op, false, f).await.map(|(v, _)| v)
    }

    /// Runs a transaction on the members in turn.
    async fn run_txn(&self, op: &str, txn: Txn) -> Result<etcd_client::TxnResponse, EtcdError> {
        self.call(op, |c| {
            let txn = txn.clone();
            async move { kv(&c).txn(txn).await }
        })
        .await
    }

    /// Runs a read-only transaction of serializable reads, which may be
    /// answered without a leader when no member has one.
    async fn read_txn(&self, op: &str, txn: Txn) -> Result<etcd_client::TxnResponse, EtcdError> {
        let (resp, _) = self
            .members
            .call(op, true, |c| {
                let txn = txn.clone();
                async move { kv(&c).txn(txn).await }
            })
            .await?;
        Ok(resp)
    }

    /// Reads every range in one serializable transaction: one round trip,
    /// one revision for all of them. Returns the keys of each range, in order.
    pub async fn read_ranges(
        &self,
        ranges: &[Range<'_>],
    ) -> Result<(Header, Vec<Vec<Kv>>), EtcdError> {
        let ops: Vec<TxnOp> = ranges
            .iter()
            .map(|r| TxnOp::get(r.key, Some(range_options(r))))
            .collect();
        let op = format!("read {}", describe_ranges(ranges));
        let (header, gets) = self.gets(&op, ops).await?;
        let out = gets
            .into_iter()
            .map(|mut g| g.take_kvs().into_iter().map(to_kv).collect())
            .collect();
        Ok((header, out))
    }

    /// Runs `ops` (range reads only) in one transaction and returns each
    /// read's reply, in order; any other reply, or a missing one, is an error.
    async fn gets(
        &self,
        op: &str,
        ops: Vec<TxnOp>,
    ) -> Result<(Header, Vec<etcd_client::GetResponse>), EtcdError> {
        let n = ops.len();
        let resp = self.read_txn(op, Txn::new().and_then(ops)).await?;
        let header = header_of(resp.header());
        let mut out = Vec::with_capacity(n);
        for r in resp.op_responses() {
            match r {
                TxnOpResponse::Get(g) => out.push(g),
                _ => return Err(unexpected(op)),
            }
        }
        if out.len() != n {
            return Err(unexpected(op));
        }
        Ok((header, out))
    }

    /// The [`Mark`] of every range, in one serializable transaction that
    /// returns no values: per range, the count and the one key modified last.
    pub async fn marks(&self, ranges: &[Range<'_>]) -> Result<(Header, Vec<Mark>), EtcdError> {
        let ops: Vec<TxnOp> = ranges
            .iter()
            .map(|r| {
                let opts = range_options(r)
                    .with_keys_only()
                    .with_sort(SortTarget::Mod, SortOrder::Descend)
                    .with_limit(1);
                TxnOp::get(r.key, Some(opts))
            })
            .collect();
        let op = format!("mark {}", describe_ranges(ranges));
        let (header, gets) = self.gets(&op, ops).await?;
        let out = gets
            .iter()
            .map(|g| Mark {
                count: g.count(),
                max_mod_revision: g.kvs().first().map_or(0, |kv| kv.mod_revision()),
            })
            .collect();
        Ok((header, out))
    }

    /// Prepares a client of every member; connections are made by the
    /// first requests, so this fails only on bad settings.
    pub async fn connect(s: &EtcdSettings) -> Result<Self, EtcdError> {
        let members = failover::Members::new(s).await?;
        Ok(Self {
            members: Arc::new(members),
            endpoints: s.config.endpoints.join(","),
        })
    }

    /// Reads every key under `prefix`; `serializable` reads from the local
    /// member without a quorum round trip. Returns the store revision too.
    pub async fn get_prefix(
        &self,
        prefix: &str,
        serializable: bool,
    ) -> Result<(i64, Vec<Kv>), EtcdError> {
        let mut opts = GetOptions::new().with_prefix();
        if serializable {
            opts = opts.with_serializable();
        }
        let (resp, _) = self
            .members
            .call(&format!("get {prefix}*"), serializable, |c| {
                let opts = opts.clone();
                async move { kv(&c).get(prefix, Some(opts)).await }
            })
            .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| Kv {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
                lease: kv.lease(),
            })
            .collect();
        Ok((rev, kvs))
    }

    /// The keys under `prefix`, without their values (serializable).
    pub async fn get_prefix_keys(&self, prefix: &str) -> Result<Vec<String>, EtcdError> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_serializable();
        let (resp, _) = self
            .members
            .call(&format!("get {prefix}* (keys)"), true, |c| {
                let opts = opts.clone();
                async move { kv(&c).get(prefix, Some(opts)).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect())
    }

    /// True when a key under `prefix` was last modified strictly between
    /// revisions `after` and `before` (a linearizable read that returns
    /// only those keys, without values).
    pub async fn modified_between(
        &self,
        prefix: &str,
        after: i64,
        before: i64,
    ) -> Result<bool, EtcdError> {
        if before - after <= 1 {
            return Ok(false);
        }
        let opts = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_min_mod_revision(after + 1)
            .with_max_mod_revision(before - 1);
        let (resp, _) = self
            .members
            .call(
                &format!("get {prefix}* (keys modified in {after}..{before})"),
                false,
                |c| {
                    let opts = opts.clone();
                    async move { kv(&c).get(prefix, Some(opts)).await }
                },
            )
            .await?;
        Ok(!resp.kvs().is_empty())
    }

    /// Reads every key under `prefix` with the lease each is bound to (0: none).
    pub async fn get_prefix_leased(&self, prefix: &str) -> Result<Vec<(Kv, i64)>, EtcdError> {
        let opts = GetOptions::new().with_prefix();
        let (resp, _) = self
            .members
            .call(&format!("get {prefix}*"), false, |c| {
                let opts = opts.clone();
                async move { kv(&c).get(prefix, Some(opts)).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                let item = Kv {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                };
                (item, kv.lease())
            })
            .collect())
    }

    /// Reads one key.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let resp = self
            .call(&format!("get {key}"), |c| async move {
                kv(&c).get(key, None).await
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| Kv {
            key: key.to_string(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }))
    }

    /// Writes one key, optionally bound to a lease.
    pub async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<(), EtcdError> {
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        self.call(&format!("put {key}"), |c| {
            let (value, opts) = (value.clone(), opts.clone());
            async move { kv(&c).put(key, value, opts).await }
        })
        .await
        .map(|_| ())
    }

    /// Writes every `(key, value)` only if none of the keys exists yet.
    /// Returns false, writing nothing, when one does.
    pub async fn create_all(&self, items: &[(&str, Vec<u8>)]) -> Result<bool, EtcdError> {
        let cmp: Vec<Compare> = items
            .iter()
            .map(|(k, _)| Compare::version(*k, CompareOp::Equal, 0))
            .collect();
        let ops: Vec<TxnOp> = items
            .iter()
            .map(|(k, v)| TxnOp::put(*k, v.clone(), None))
            .collect();
        let op = format!("create {}", items.first().map(|i| i.0).unwrap_or_default());
        let resp = self
            .run_txn(&op, Txn::new().when(cmp).and_then(ops))
            .await?;
        Ok(resp.succeeded())
    }

    /// Writes every `(key, value)` in one transaction (etcd allows 128 by default).
    pub async fn put_all(&self, items: &[(&str, Vec<u8>)]) -> Result<(), EtcdError> {
        let ops: Vec<TxnOp> = items
            .iter()
            .map(|(k, v)| TxnOp::put(*k, v.clone(), None))
            .collect();
        let op = format!("put {} keys", items.len());
        self.run_txn(&op, Txn::new().and_then(ops))
            .await
            .map(|_| ())
    }

    /// Replaces `key` only if it was last modified at `mod_revision`
    /// (0: only if it does not exist). Returns false when it changed.
    pub async fn compare_and_put(
        &self,
        key: &str,
        mod_revision: i64,
        value: Vec<u8>,
    ) -> Result<bool, EtcdError> {
        Ok(self
            .compare_and_put_at(key, mod_revision, value)
            .await?
            .is_some())
    }

    /// [`Etcd::compare_and_put`], returning the key's new `mod_revision`
    /// when written (`None` when it had changed).
    pub async fn compare_and_put_at(
        &self,
        key: &str,
        mod_revision: i64,
        value: Vec<u8>,
    ) -> Result<Option<i64>, EtcdError> {
        let cmp = if mod_revision == 0 {
            Compare::version(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, mod_revision)
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(key, value, None)]);
        let resp = self.run_txn(&format!("update {key}"), txn).await?;
        // A transaction that wrote has its put's revision in the header.
        Ok(resp.succeeded().then(|| header_of(resp.header()).revision))
    }

    /// Opens a watch on the first member that answers. A member without a
    /// leader refuses it, and cancels it when it loses its leader later.
    pub async fn watch(&self, key: &str, opts: WatchOptions) -> Result<Watching, EtcdError> {
        let (stream, member) = self
            .members
            .call(&format!("watch {key}"), false, |c| {
                let opts = opts.clone();
                async move { c.watch_client().watch(key, Some(opts)).await }
            })
            .await?;
        Ok(Watching {
            stream,
            endpoint: self.members.endpoint(member).to_string(),
            member,
            failures: self.members.failures(member),
        })
    }

    /// Records that a watch's member stopped answering: the next requests
    /// and watches try the other members first.
    pub fn watch_failed(&self, w: &Watching, reason: &str) {
        self.members.failed(w.member, reason);
    }

    /// Whether a request found the watch's member dead or hung since the
    /// watch was opened.
    pub fn member_failed_since(&self, w: &Watching) -> bool {
        self.members.failures(w.member) != w.failures
    }

    /// The endpoints, as one string for messages.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Runs a transaction; `op` names it in errors. Returns whether its
    /// comparisons held.
    pub async fn txn(&self, op: &str, txn: Txn) -> Result<bool, EtcdError> {
        Ok(self.run_txn(op, txn).await?.succeeded())
    }

    /// Deletes one key; true when it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, EtcdError> {
        let resp = self
            .call(&format!("delete {key}"), |c| async move {
                kv(&c).delete(key, None).await
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    /// Refreshes a lease once; returns its remaining TTL in seconds (0 or
    /// less when it has expired).
    pub async fn keep_alive_once(&self, lease: i64) -> Result<i64, EtcdError> {
        let op = format!("lease keep-alive {lease:x}");
        self.call(&op, |c| async move {
            let (mut keeper, mut stream) = c.lease_client().keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.map_or(0, |resp| resp.ttl()))
        })
        .await
    }

    /// Revokes a lease (its keys vanish).
    pub async fn revoke_lease(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("lease revoke", |c| async move {
            c.lease_client().revoke(lease).await
        })
        .await
        .map(|_| ())
    }

    /// Grants a lease of `ttl` seconds.
    pub async fn grant_lease(&self, ttl: i64) -> Result<i64, EtcdError> {
        let resp = self
            .call("lease grant", |c| async move {
                c.lease_client().grant(ttl, None).await
            })
            .await?;
        Ok(resp.id())
    }
}

fn header_of(h: Option<&etcd_client::ResponseHeader>) -> Header {
    h.map_or_else(Header::default, |h| Header {
        cluster_id: h.cluster_id(),
        revision: h.revision(),
    })
}

fn unexpected(op: &str) -> EtcdError {
    EtcdError::Request {
        op: op.to_string(),
        reason: "the reply does not answer every range".into(),
    }
}
