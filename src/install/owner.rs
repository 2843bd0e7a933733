//! Is our DaemonSet being deleted? Asked of the Kubernetes API from inside a
//! pod, with the pod's service account, by the agent's preStop hook.
//!
//! A preStop hook runs whenever a pod stops: on `kubectl delete -f`, but also
//! on a rolling update, an eviction or a restart. Only the first should remove
//! our conflist entry; otherwise pods created during an update would miss the
//! MTU clamp. With `kubectl delete` (background propagation) the DaemonSet is
//! gone before its pods stop; with foreground propagation it carries a
//! `deletionTimestamp`. Both mean "remove".

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Where Kubernetes mounts a pod's service account token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The most of a response we read.
const MAX_RESPONSE: usize = 4 << 20;

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

    /// One GET with hyper over TCP (and rustls for https), bounded by
    /// `timeout`; the body is read up to [`MAX_RESPONSE`].
    fn get(&self, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>), String> {
        let rt = crate::runtime::current_thread().map_err(|e| e.to_string())?;
        rt.block_on(async {
            tokio::time::timeout(timeout, self.get_async(path))
                .await
                .map_err(|_| format!("no answer within {timeout:?}"))?
        })
    }

    async fn get_async(&self, path: &str) -> Result<(u16, Vec<u8>), String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| e.to_string())?;
        let request = Request::get(path)
            .header(hyper::header::HOST, self.host.as_str())
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, "calico-ipsec")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        if self.scheme_https {
            let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                .map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(self.tls_config()?))
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            exchange(TokioIo::new(tls), request).await
        } else {
            exchange(TokioIo::new(tcp), request).await
        }
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
        Ok(
            rustls::ClientConfig::builder_with_provider(crate::keys::crypto::tls_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

/// Sends the request on one HTTP/1.1 connection and reads the answer.
async fn exchange<T>(io: T, request: Request<Empty<Bytes>>) -> Result<(u16, Vec<u8>), String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    driver.abort();
    Ok((status, body.to_vec()))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot API server answering `reply` to the first request.
    fn api(reply: &'static str) -> String {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = c.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert!(String::from_utf8_lossy(&got).contains("authorization: Bearer tok"));
            c.write_all(reply.as_bytes()).unwrap();
        });
        url
    }

    fn sa_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("token"), "tok\n").unwrap();
        std::fs::write(d.path().join("namespace"), "kube-system\n").unwrap();
        d
    }

    #[test]
    fn chunked_and_plain_answers_through_hyper() {
        let sa = sa_dir();
        let url = api("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"metadata\":{\"de\r\n1f;x=y\r\nletionTimestamp\":\"2026-01-01\"}}\r\n0\r\n\r\n");
        let k = KubeApi::in_cluster(sa.path(), Some(&url)).unwrap();
        assert_eq!(
            k.daemonset("calico-ipsec", Duration::from_secs(5)).unwrap(),
            DaemonSetState::Deleting
        );
        let url = api("HTTP/1.0 404 Not Found\r\nContent-Length: 2\r\n\r\n{}");
        let k = KubeApi::in_cluster(sa.path(), Some(&url)).unwrap();
        assert_eq!(
            k.daemonset("calico-ipsec", Duration::from_secs(5)).unwrap(),
            DaemonSetState::Gone(404)
        );
        let url = api("HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n");
        let k = KubeApi::in_cluster(sa.path(), Some(&url)).unwrap();
        assert!(k.daemonset("calico-ipsec", Duration::from_secs(5)).is_err());
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
