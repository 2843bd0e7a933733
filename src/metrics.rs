//! Prometheus text exposition, and the HTTP endpoint (hyper, HTTP/1.1) for
//! `/metrics` and the health probes, shared by the agent and the manager.
//!
//! The endpoint answers GET only and ignores request bodies; it serves
//! numbers and names, never keys.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
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
/// dropped. A connection has 5 s to send its request head.
pub async fn serve<F>(listener: TcpListener, handler: Arc<F>)
where
    F: Fn(&str) -> Reply + Send + Sync + 'static,
{
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (code, body) = respond(req.method(), req.uri().path(), handler.as_ref());
                async move { Ok::<_, Infallible>(response(code, body)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false)
                .serve_connection(TokioIo::new(sock), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "metrics endpoint: connection failed");
            }
        });
    }
}

fn response(code: u16, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = "text/plain; version=0.0.4; charset=utf-8".parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Asks the handler about a GET; refuses every other method.
fn respond<F: Fn(&str) -> Reply>(method: &Method, path: &str, handler: &F) -> Reply {
    if method == Method::GET {
        handler(path)
    } else {
        (405, "only GET is served\n".into())
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
    fn only_get_is_served() {
        let h = |p: &str| (200, p.to_string());
        assert_eq!(respond(&Method::GET, "/metrics", &h).1, "/metrics");
        assert_eq!(respond(&Method::POST, "/metrics", &h).0, 405);
    }

    #[tokio::test]
    async fn serves_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(|p: &str| (200, format!("path {p}\n")));
        let server = tokio::spawn(serve(listener, handler));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /metrics?x=1 HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("text/plain; version=0.0.4"), "{text}");
        assert!(text.ends_with("path /metrics\n"), "{text}");
        server.abort();
    }
}
