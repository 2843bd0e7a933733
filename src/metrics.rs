//! Prometheus text exposition and a minimal HTTP/1.1 endpoint for
//! `/metrics` and the health probes, shared by the agent and the manager.
//!
//! The endpoint answers GET only, one request per connection, and never
//! reads more than a small header; it serves numbers and names, never keys.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A cumulative histogram with fixed upper bounds, in seconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram with these upper bounds (ascending; +Inf is implied).
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    /// How many observations were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Builds a text exposition, one metric family at a time.
#[derive(Debug, Default)]
pub struct Exposition(String);

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(l: &[(&str, &str)]) -> String {
    if l.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Exposition {
    /// Starts a family: its HELP and TYPE lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, l: &[(&str, &str)], v: f64) -> &mut Self {
        let _ = writeln!(self.0, "{name}{} {v}", labels(l));
        self
    }

    /// A whole gauge family with a single unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, v: f64) -> &mut Self {
        self.family(name, "gauge", help).sample(name, &[], v)
    }

    /// A whole counter family with a single unlabelled sample (its name ends in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, v: f64) -> &mut Self {
        self.family(name, "counter", help).sample(name, &[], v)
    }

    /// A whole histogram family.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) -> &mut Self {
        self.family(name, "histogram", help);
        for (b, c) in h.bounds.iter().zip(&h.counts) {
            let le = b.to_string();
            self.sample(&format!("{name}_bucket"), &[("le", &le)], *c as f64);
        }
        self.sample(&format!("{name}_bucket"), &[("le", "+Inf")], h.count as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum);
        self.sample(&format!("{name}_count"), &[], h.count as f64)
    }

    /// The text.
    pub fn finish(self) -> String {
        self.0
    }
}

/// What a handler answers: status code and body (text/plain).
pub type Reply = (u16, String);

/// Serves GET requests on `listener` with `handler(path)` until the task is
/// dropped. Each connection has 5 s to send its request line.
pub async fn serve<F>(listener: TcpListener, handler: Arc<F>)
where
    F: Fn(&str) -> Reply + Send + Sync + 'static,
{
    loop {
        let (mut sock, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = sock.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n")
                        || buf[..len].windows(2).any(|w| w == b"\n\n")
                    {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let (code, body) = respond(&buf[..len], handler.as_ref());
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                405 => "Method Not Allowed",
                503 => "Service Unavailable",
                _ => "Error",
            };
            let head = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if let Err(e) = async {
                sock.write_all(head.as_bytes()).await?;
                sock.write_all(body.as_bytes()).await?;
                sock.shutdown().await
            }
            .await
            {
                tracing::debug!(%peer, error = %e, "metrics endpoint: write failed");
            }
        });
    }
}

/// Parses the request line and asks the handler.
fn respond<F: Fn(&str) -> Reply>(req: &[u8], handler: &F) -> Reply {
    let text = String::from_utf8_lossy(req);
    let mut parts = text.lines().next().unwrap_or("").split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => {
            let path = path.split('?').next().unwrap_or(path);
            handler(path)
        }
        (Some(_), Some(_)) => (405, "only GET is served\n".into()),
        _ => (400, "bad request\n".into()),
    }
}

/// Binds the metrics address, naming it in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for /metrics: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.01, 0.1, 1.0]);
        for v in [0.005, 0.05, 0.05, 2.0] {
            h.observe(v);
        }
        let mut e = Exposition::default();
        e.histogram("t_seconds", "test", &h);
        let text = e.finish();
        assert!(text.contains("t_seconds_bucket{le=\"0.01\"} 1\n"), "{text}");
        assert!(text.contains("t_seconds_bucket{le=\"0.1\"} 3\n"), "{text}");
        assert!(text.contains("t_seconds_bucket{le=\"1\"} 3\n"), "{text}");
        assert!(text.contains("t_seconds_bucket{le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("t_seconds_count 4\n"), "{text}");
    }

    #[test]
    fn labels_are_escaped() {
        let mut e = Exposition::default();
        e.family("m", "gauge", "h")
            .sample("m", &[("a", "x\"y\\z")], 1.0);
        assert!(e.finish().contains("m{a=\"x\\\"y\\\\z\"} 1\n"));
    }

    #[test]
    fn request_lines() {
        let h = |p: &str| (200, p.to_string());
        assert_eq!(
            respond(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", &h).1,
            "/metrics"
        );
        assert_eq!(respond(b"POST /metrics HTTP/1.1\r\n\r\n", &h).0, 405);
        assert_eq!(respond(b"\xff\xfe", &h).0, 400);
    }
}
