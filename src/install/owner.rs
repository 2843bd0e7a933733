//! Is our DaemonSet being deleted? Asked of the Kubernetes API from inside a
//! pod, with the pod's service account, by the agent's preStop hook.
//!
//! A preStop hook runs whenever a pod stops: on `kubectl delete -f`, but also
//! on a rolling update, an eviction or a restart. Only the first should remove
//! our conflist entry; otherwise pods created during an update would miss the
//! MTU clamp. With `kubectl delete` (background propagation) the DaemonSet is
//! gone before its pods stop; with foreground propagation it carries a
//! `deletionTimestamp`. Both mean "remove".

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// Where Kubernetes mounts a pod's service account token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The most of a response we read.
const MAX_RESPONSE: u64 = 4 << 20;

/// What the API says about the DaemonSet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonSetState {
    /// It exists and is not being deleted: a restart or an update.
    Live,
    /// It has a `deletionTimestamp` (foreground deletion).
    Deleting,
    /// The API answered 404 (deleted), or 401/403: our service account or its
    /// binding, which ship in the same manifest, were deleted first.
    Gone(u16),
}

/// Why the question could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// Not in a pod.
    #[error("not running in a Kubernetes pod: {0} is not set")]
    NotInCluster(&'static str),
    /// A service account file is missing.
    #[error("reading {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The API could not be reached or answered oddly.
    #[error("Kubernetes API at {url}: {reason}")]
    Api {
        /// The API's URL.
        url: String,
        /// What happened.
        reason: String,
    },
}

/// The in-cluster Kubernetes API, as this pod's service account.
pub struct KubeApi {
    scheme_https: bool,
    host: String,
    port: u16,
    token: String,
    ca: Option<Vec<u8>>,
    namespace: String,
}

fn read_file(path: PathBuf) -> Result<Vec<u8>, OwnerError> {
    std::fs::read(&path).map_err(|source| OwnerError::File { path, source })
}

impl KubeApi {
    /// From `KUBERNETES_SERVICE_HOST`/`_PORT` (or `url`, e.g. `http://127.0.0.1:8080`
    /// for tests) and the service account files in `sa_dir`.
    pub fn in_cluster(sa_dir: &Path, url: Option<&str>) -> Result<Self, OwnerError> {
        let (scheme_https, host, port) = match url {
            Some(u) => parse_url(u).ok_or_else(|| OwnerError::Api {
                url: u.to_string(),
                reason: "not an http(s)://host:port URL".into(),
            })?,
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST")
                    .map_err(|_| OwnerError::NotInCluster("KUBERNETES_SERVICE_HOST"))?;
                let port = std::env::var("KUBERNETES_SERVICE_PORT")
                    .ok()
                    .and_then(|p| p.parse().ok())
                    .ok_or(OwnerError::NotInCluster("KUBERNETES_SERVICE_PORT"))?;
                (true, host, port)
            }
        };
        let token = String::from_utf8_lossy(&read_file(sa_dir.join("token"))?)
            .trim()
            .to_string();
        let namespace = String::from_utf8_lossy(&read_file(sa_dir.join("namespace"))?)
            .trim()
            .to_string();
        let ca = if scheme_https {
            Some(read_file(sa_dir.join("ca.crt"))?)
        } else {
            None
        };
        Ok(KubeApi {
            scheme_https,
            host,
            port,
            token,
            ca,
            namespace,
        })
    }

    /// The API's URL, for messages.
    pub fn url(&self) -> String {
        let scheme = if self.scheme_https { "https" } else { "http" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }

    /// This pod's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The state of DaemonSet `name` in this pod's namespace.
    pub fn daemonset(&self, name: &str, timeout: Duration) -> Result<DaemonSetState, OwnerError> {
        let path = format!(
            "/apis/apps/v1/namespaces/{}/daemonsets/{name}",
            self.namespace
        );
        let (status, body) = self.get(&path, timeout).map_err(|reason| OwnerError::Api {
            url: self.url(),
            reason,
        })?;
        match status {
            200 => {
                let v: Value = serde_json::from_slice(&body).map_err(|e| OwnerError::Api {
                    url: self.url(),
                    reason: format!("the DaemonSet is not JSON: {e}"),
                })?;
                if v["metadata"]["deletionTimestamp"].is_string() {
                    Ok(DaemonSetState::Deleting)
                } else {
                    Ok(DaemonSetState::Live)
                }
            }
            401 | 403 | 404 => Ok(DaemonSetState::Gone(status)),
            other => Err(OwnerError::Api {
                url: self.url(),
                reason: format!("GET {path} answered HTTP {other}"),
            }),
        }
    }

    /// One HTTP/1.0 GET (no keep-alive, no chunking), bounded by `timeout`.
    fn get(&self, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>), String> {
        let addr = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(timeout))
            .and_then(|()| tcp.set_write_timeout(Some(timeout)))
            .map_err(|e| e.to_string())?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: application/json\r\nUser-Agent: calico-ipsec\r\n\r\n",
            self.host, self.token
        );
        let raw = if self.scheme_https {
            let config = self.tls_config()?;
            let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                .map_err(|e| e.to_string())?;
            let conn =
                rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
            exchange(rustls::StreamOwned::new(conn, tcp), &request)?
        } else {
            exchange(tcp, &request)?
        };
        parse_response(&raw)
    }

    fn tls_config(&self) -> Result<rustls::ClientConfig, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca.as_deref().unwrap_or_default()) {
            let cert = cert.map_err(|e| format!("the service account CA: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("the service account CA: {e}"))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }
}

/// Writes the request and reads the whole response, up to `MAX_RESPONSE`.
fn exchange(mut s: impl Read + Write, request: &str) -> Result<Vec<u8>, String> {
    s.write_all(request.as_bytes())
        .and_then(|()| s.flush())
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    match s.take(MAX_RESPONSE).read_to_end(&mut raw) {
        Ok(_) => Ok(raw),
        // A server that closes without TLS close_notify: keep what arrived.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(raw),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_url(u: &str) -> Option<(bool, String, u16)> {
    let (https, rest) = if let Some(r) = u.strip_prefix("https://") {
        (true, r)
    } else {
        (false, u.strip_prefix("http://")?)
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((https, host.to_string(), port.parse().ok()?))
}

/// The status code and body of a raw HTTP/1.x response (de-chunked if need be).
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("an incomplete HTTP response")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a truncated chunk")?;
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "a bad chunk size")?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        out.extend_from_slice(rest.get(..size).ok_or("a truncated chunk")?);
        rest = rest.get(size + 2..).ok_or("a truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_plain_and_chunked() {
        let (s, b) = parse_response(b"HTTP/1.0 404 Not Found\r\nA: b\r\n\r\n{}").expect("parse");
        assert_eq!((s, b.as_slice()), (404, b"{}".as_slice()));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n";
        let (s, b) = parse_response(raw).expect("parse");
        assert_eq!((s, b.as_slice()), (200, b"{\"a\":1}".as_slice()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("https://[fd00::1]:443"),
            Some((true, "fd00::1".into(), 443))
        );
        assert_eq!(
            parse_url("http://127.0.0.1:8080/"),
            Some((false, "127.0.0.1".into(), 8080))
        );
        assert_eq!(parse_url("ftp://x:1"), None);
    }
}
