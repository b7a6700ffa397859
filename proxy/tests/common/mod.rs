//! Real servers and clients on 127.0.0.1 for end-to-end tests.
#![allow(dead_code)]

pub mod process;
pub mod scripted;

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Status, Streaming};
use trellis_proto::echo::v1::{
    EchoRequest, EchoResponse,
    echo_server::{Echo, EchoServer},
};
use trellis_proxy::{Proxy, config::validate};

/// Starts a proxy from YAML whose only listener is named `main`; returns it and its address.
pub async fn start_proxy(yaml: &str) -> (Arc<Proxy>, SocketAddr) {
    let config = validate::from_yaml(yaml).unwrap_or_else(|e| panic!("test config invalid: {e}"));
    let proxy = Proxy::new();
    proxy.apply(config).await.expect("config applies");
    let addr = proxy.listener_addr("main").await.expect("listener main");
    (proxy, addr)
}

/// A proxy config with one listener `main`, one catch-all virtual host holding `routes`, and
/// `clusters`. Both are YAML list items, indented for their position.
pub fn config(routes: &str, clusters: &str) -> String {
    format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0" }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
{routes}
clusters:
{clusters}
"#
    )
}

/// What the echo upstream saw, returned as its JSON body.
#[derive(Debug, serde::Deserialize)]
pub struct Seen {
    pub server: String,
    pub method: String,
    pub uri: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// An HTTP/1.1 + h2c upstream that answers every request with a JSON description of it.
/// A path ending in `/slow/<ms>` waits before answering; `/status/<code>` answers with that status.
/// Returns its address and a counter of requests served.
pub async fn echo_upstream(name: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name: Arc<str> = name.into();
    let count = Arc::new(AtomicUsize::new(0));
    let served = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let name = name.clone();
            let served = served.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    served.fetch_add(1, Ordering::SeqCst);
                    echo(name.clone(), req)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

async fn echo(name: Arc<str>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    if let Some((_, ms)) = path.split_once("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    let status = path
        .split_once("/status/")
        .and_then(|(_, c)| c.parse().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    let seen = serde_json::json!({
        "server": &*name,
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "version": format!("{:?}", parts.version),
        "headers": parts.headers.iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("?")))
            .collect::<Vec<_>>(),
        "body": String::from_utf8_lossy(&body),
    });
    let mut resp = Response::new(Full::new(Bytes::from(seen.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert("content-type", "application/json".parse().unwrap());
    h.insert("x-upstream", name.parse().unwrap());
    h.insert("x-upstream-secret", "s".parse().unwrap());
    Ok(resp)
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn h1_client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends a request and returns status, headers and the whole body.
pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> (Response<()>, Bytes) {
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("response within 10s")
        .expect("request succeeds");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (Response::from_parts(parts, ()), body)
}

pub async fn get(client: &TestClient, url: &str) -> (Response<()>, Bytes) {
    send(client, Request::get(url).body(Full::default()).unwrap()).await
}

pub fn seen(body: &Bytes) -> Seen {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("upstream JSON: {e}: {}", String::from_utf8_lossy(body)))
}

/// A WebSocket server that echoes every message back.
pub async fn ws_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// The gRPC echo service: answers with the request's message and its own name.
#[derive(Clone)]
pub struct EchoService {
    pub name: String,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoResponse>, Status> {
        let req = request.into_inner();
        if req.fail_with_code != 0 {
            return Err(Status::new(req.fail_with_code.into(), "asked to fail"));
        }
        Ok(tonic::Response::new(EchoResponse {
            message: req.message,
            server: self.name.clone(),
        }))
    }

    type ServerStreamStream = ResponseStream;

    async fn server_stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Self::ServerStreamStream>, Status> {
        let req = request.into_inner();
        let name = self.name.clone();
        let items = (0..3).map(move |i| {
            Ok(EchoResponse {
                message: format!("{}-{i}", req.message),
                server: name.clone(),
            })
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(items))))
    }

    type BidiStreamStream = ResponseStream;

    async fn bidi_stream(
        &self,
        request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<Self::BidiStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let name = self.name.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(Ok(req)) = inbound.next().await {
                let resp = EchoResponse {
                    message: req.message,
                    server: name.clone(),
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

pub async fn grpc_upstream(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = EchoServer::new(EchoService { name: name.into() });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

/// Knobs of a [`controlled_upstream`], changed by the test while it runs.
#[derive(Debug, Default)]
pub struct Behavior {
    /// Answer every request with this status (0: 200).
    pub status: std::sync::atomic::AtomicU16,
    /// Wait this long before answering.
    pub delay_ms: std::sync::atomic::AtomicU64,
    /// `/healthz` answers 503 when set.
    pub unhealthy: std::sync::atomic::AtomicBool,
}

/// An HTTP/1.1 upstream whose status, latency and health the test controls. `/healthz` requests
/// are not counted.
pub async fn controlled_upstream(name: &str) -> (SocketAddr, Arc<Behavior>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let behavior = Arc::new(Behavior::default());
    let count = Arc::new(AtomicUsize::new(0));
    let (b, c, name): (_, _, Arc<str>) = (behavior.clone(), count.clone(), name.into());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (b, c, name) = (b.clone(), c.clone(), name.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (b, c, name) = (b.clone(), c.clone(), name.clone());
                    async move {
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                        resp.headers_mut()
                            .insert("x-upstream", name.parse().unwrap());
                        if req.uri().path() == "/healthz" {
                            if b.unhealthy.load(Ordering::SeqCst) {
                                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            }
                            return Ok::<_, Infallible>(resp);
                        }
                        c.fetch_add(1, Ordering::SeqCst);
                        let delay = b.delay_ms.load(Ordering::SeqCst);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        let status = b.status.load(Ordering::SeqCst);
                        if status != 0 {
                            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                        }
                        Ok(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, behavior, count)
}

/// Polls `cond` every 20 ms for at most `limit`; panics with `what` if it never holds.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {limit:?}");
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (comments skipped, label values unescaped); panics on a line
/// that is not a valid sample, so a malformed exposition fails the test.
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("bad sample line: {line:?}"),
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        let mut labels = std::collections::BTreeMap::new();
        let mut rest = rest;
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end = loop {
                let Some(&(start, c)) = chars.peek() else {
                    panic!("unterminated labels in {line:?}")
                };
                if c == '}' {
                    break start + 1;
                }
                if c == ',' {
                    chars.next();
                    continue;
                }
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line:?}");
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(c) => value.push(c),
                            None => panic!("{line:?}"),
                        },
                        Some('"') => break,
                        Some(c) => value.push(c),
                        None => panic!("unterminated label value in {line:?}"),
                    }
                }
                assert!(
                    labels.insert(key, value).is_none(),
                    "duplicate label in {line:?}"
                );
            };
            rest = &body[end..];
        }
        let value = rest.trim();
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    samples
}

/// The samples named `name` whose labels include every pair of `having`, as (labels, value).
pub fn series(
    samples: &[Sample],
    name: &str,
    having: &[(&str, &str)],
) -> Vec<(Vec<(String, String)>, f64)> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            having
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| (s.labels.clone().into_iter().collect(), s.value))
        .collect()
}

/// The value of the sample with exactly these labels.
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// Starts an admin server for `proxy` on 127.0.0.1:0.
pub async fn start_admin(proxy: &Arc<Proxy>) -> (SocketAddr, Arc<trellis_proxy::admin::Lifecycle>) {
    let listener = trellis_proxy::admin::bind("127.0.0.1:0".parse().unwrap(), false)
        .await
        .expect("admin binds");
    let addr = listener.local_addr().unwrap();
    let lifecycle = Arc::new(trellis_proxy::admin::Lifecycle::default());
    trellis_proxy::admin::Admin::new(proxy.clone(), lifecycle.clone()).spawn(listener);
    (addr, lifecycle)
}

/// Scrapes the admin `/metrics` page and parses it.
pub async fn scrape(admin: SocketAddr) -> Vec<Sample> {
    let (resp, body) = get(&h1_client(), &format!("http://{admin}/metrics")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
    );
    parse_exposition(std::str::from_utf8(&body).expect("UTF-8 exposition"))
}

/// Starts a proxy from YAML and returns it with the address of listener `listener`.
pub async fn start_named(yaml: &str, listener: &str) -> (Arc<Proxy>, SocketAddr) {
    let config = validate::from_yaml(yaml).unwrap_or_else(|e| panic!("test config invalid: {e}"));
    let proxy = Proxy::new();
    proxy.apply(config).await.expect("config applies");
    let addr = proxy.listener_addr(listener).await.expect("listener bound");
    (proxy, addr)
}

/// A TCP server that echoes every byte back.
pub async fn tcp_echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Sends raw bytes on a fresh connection and reads until the proxy closes it (at most `limit`).
/// Returns what was read and whether the proxy closed the connection in time.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> (Vec<u8>, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    stream.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (got, closed)
}

/// A whole HTTP/1.1 answer read as raw bytes.
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `request` exactly as written on a connection of its own and reads the whole answer
/// (the request asks the proxy to close the connection after it); `what` names it in panics.
pub async fn raw_request(addr: SocketAddr, request: &str, what: &str) -> RawResponse {
    let (got, closed) = raw_exchange(addr, request.as_bytes(), Duration::from_secs(10)).await;
    assert!(closed, "{what}: no complete answer within 10s");
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: no response head in {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no status in {head:?}"));
    RawResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}
