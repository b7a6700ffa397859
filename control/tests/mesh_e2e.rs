//! End to end: the real `trellis-control` binary watching a manifests directory, real proxies
//! (in process) fed by it, real upstreams. Edits to the manifests change traffic; at least 100
//! changes under load drop nothing; a controller restart loses nothing.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::{net::TcpListener, sync::watch};
use trellis_proto::{discovery::v1 as api, echo::v1 as echo};
use trellis_proxy::{
    Proxy,
    config::xds::{Client, XdsSettings},
};

const WAIT: Duration = Duration::from_secs(15);
const BIN: &str = env!("CARGO_BIN_EXE_trellis-control");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP upstream answering with `x-upstream: <name>`; counts requests.
async fn upstream(name: &'static str) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let c = c.clone();
                    async move {
                        c.fetch_add(1, Ordering::SeqCst);
                        let _ = req.into_body().collect().await;
                        let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                        r.headers_mut().insert("x-upstream", name.parse().unwrap());
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (port, count)
}

async fn ws_upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() || ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A gRPC echo upstream (bidirectional streaming is what the test uses).
#[derive(Clone)]
struct Echo;

type EchoStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<echo::EchoResponse, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl echo::echo_server::Echo for Echo {
    async fn unary(
        &self,
        r: tonic::Request<echo::EchoRequest>,
    ) -> Result<tonic::Response<echo::EchoResponse>, tonic::Status> {
        Ok(tonic::Response::new(echo::EchoResponse {
            message: r.into_inner().message,
            server: "grpc".into(),
        }))
    }
    type ServerStreamStream = EchoStream;
    async fn server_stream(
        &self,
        _: tonic::Request<echo::EchoRequest>,
    ) -> Result<tonic::Response<EchoStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not used here"))
    }
    type BidiStreamStream = EchoStream;
    async fn bidi_stream(
        &self,
        r: tonic::Request<tonic::Streaming<echo::EchoRequest>>,
    ) -> Result<tonic::Response<EchoStream>, tonic::Status> {
        let out = r.into_inner().map(|m| {
            m.map(|m| echo::EchoResponse {
                message: m.message,
                server: "grpc".into(),
            })
        });
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

async fn grpc_upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(echo::echo_server::EchoServer::new(Echo))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    port
}

fn service(name: &str, ip: &str, port: u16, app_protocol: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  clusterIP: {ip}\n  ports:\n    - {{name: http, port: {port}, targetPort: {port}, appProtocol: {app_protocol}}}\n---\n"
    )
}

/// One EndpointSlice per upstream: every upstream is 127.0.0.1 with its own port.
fn slice(service: &str, id: &str, port: u16, ready: bool) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-{id}\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints:\n  - addresses: [127.0.0.1]\n    conditions: {{ready: {ready}}}\n---\n"
    )
}

fn gateway(port: u16) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: demo}}\nspec:\n  gatewayClassName: trellis\n  listeners:\n    - {{name: web, port: {port}, protocol: HTTP}}\n"
    )
}

fn route(weight_a: u32, weight_b: u32, extra_rule: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web, namespace: demo}}\nspec:\n  parentRefs: [{{name: ingress}}]\n  rules:\n{extra_rule}    - matches: [{{path: {{type: PathPrefix, value: /trellis.echo.v1.Echo}}}}]\n      backendRefs: [{{name: grpc, port: 9001}}]\n    - matches: [{{path: {{type: PathPrefix, value: /ws}}}}]\n      backendRefs: [{{name: ws, port: 9000}}]\n    - backendRefs:\n        - {{name: a, port: 8080, weight: {weight_a}}}\n        - {{name: b, port: 8080, weight: {weight_b}}}\n"
    )
}

struct Mesh {
    dir: tempfile::TempDir,
    listen: u16,
    admin: u16,
    gateway_port: u16,
    controller: Option<Child>,
}

impl Mesh {
    fn write(&self, file: &str, text: &str) {
        // Write then rename, as editors and kubectl-style tools do: the controller never reads a
        // half-written file.
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(file)).unwrap();
    }

    fn start_controller(&mut self) {
        let child = Command::new(BIN)
            .args([
                "serve",
                "--manifests",
                self.dir.path().to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{}", self.listen),
                "--admin",
                &format!("127.0.0.1:{}", self.admin),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.controller = Some(child);
    }

    fn stop_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop_controller();
    }
}

/// A gateway proxy in process, fed by the controller; returns once its listener serves.
/// Several gateways on one machine bind different loopback addresses (`bind_ip`).
async fn gateway_proxy(mesh: &Mesh, id: &str, bind_ip: &str) -> (Arc<Proxy>, SocketAddr) {
    let proxy = Proxy::new();
    let settings = XdsSettings {
        address: format!("127.0.0.1:{}", mesh.listen),
        node: api::Node {
            id: id.into(),
            role: api::Role::Gateway as i32,
            namespace: "demo".into(),
            gateway_name: "ingress".into(),
            labels: [("trellis.io/bind-ip".to_owned(), bind_ip.to_owned())].into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let (static_tx, static_rx) = watch::channel(Arc::default());
    // The static part never changes here; keep its sender alive with the client.
    let client = Client::new(proxy.clone(), settings, static_rx);
    tokio::spawn(async move {
        client.run().await;
        drop(static_tx);
    });
    let name = format!("gateway/demo/ingress:{}", mesh.gateway_port);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(addr) = proxy.listener_addr(&name).await {
            return (proxy, addr);
        }
        assert!(
            Instant::now() < deadline,
            "gateway listener {name} never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type TestClient = HttpClient<HttpConnector, Full<Bytes>>;

fn client() -> TestClient {
    HttpClient::builder(TokioExecutor::new()).build_http()
}

async fn who(client: &TestClient, addr: SocketAddr, path: &str) -> Result<String, String> {
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(format!("http://{addr}{path}").parse().unwrap()),
    )
    .await
    .map_err(|_| "timeout".to_owned())?
    .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    let who = resp
        .headers()
        .get("x-upstream")
        .map(|v| v.to_str().unwrap().to_owned());
    let _ = resp.into_body().collect().await;
    match who {
        Some(w) if status.is_success() => Ok(w),
        _ => Err(format!("status {status}")),
    }
}

async fn eventually_who(client: &TestClient, addr: SocketAddr, path: &str, want: &str) {
    let deadline = Instant::now() + WAIT;
    let mut last = Err(String::new());
    while Instant::now() < deadline {
        last = who(client, addr, path).await;
        if last.as_deref() == Ok(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{path} never reached {want}; last answer {last:?}");
}

async fn mesh() -> (Mesh, [(u16, Arc<AtomicUsize>); 3], u16, u16) {
    let a = upstream("a").await;
    let a2 = upstream("a2").await;
    let b = upstream("b").await;
    let ws = ws_upstream().await;
    let grpc = grpc_upstream().await;
    let mut mesh = Mesh {
        dir: tempfile::tempdir().unwrap(),
        listen: free_port(),
        admin: free_port(),
        gateway_port: free_port(),
        controller: None,
    };
    let services = service("a", "10.96.0.1", 8080, "http")
        + &service("b", "10.96.0.2", 8080, "http")
        + &service("ws", "10.96.0.3", 9000, "http")
        + &service("grpc", "10.96.0.4", 9001, "grpc");
    mesh.write("services.yaml", &services);
    mesh.write(
        "endpoints.yaml",
        &(slice("a", "1", a.0, true)
            + &slice("b", "1", b.0, true)
            + &slice("ws", "1", ws, true)
            + &slice("grpc", "1", grpc, true)),
    );
    mesh.write("gateway.yaml", &gateway(mesh.gateway_port));
    mesh.write("route.yaml", &route(1, 0, ""));
    mesh.start_controller();
    (mesh, [a, a2, b], ws, grpc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_manifest_edits() {
    let (mesh, [a, a2, b], ws, grpc) = mesh().await;
    let (_proxy, addr) = gateway_proxy(&mesh, "gw-1", "127.0.0.1").await;
    let c = client();
    eventually_who(&c, addr, "/", "a").await;

    // Add an endpoint to a: it starts taking traffic.
    let endpoints = |a2_ready: bool| {
        slice("a", "1", a.0, true)
            + &slice("a", "2", a2.0, a2_ready)
            + &slice("b", "1", b.0, true)
            + &slice("ws", "1", ws, true)
            + &slice("grpc", "1", grpc, true)
    };
    mesh.write("endpoints.yaml", &endpoints(true));
    eventually_who(&c, addr, "/", "a2").await;
    // Mark it not ready: it leaves rotation and stays out.
    mesh.write("endpoints.yaml", &endpoints(false));
    let deadline = Instant::now() + WAIT;
    loop {
        let mut seen = Vec::new();
        for _ in 0..20 {
            seen.push(who(&c, addr, "/").await.unwrap());
        }
        if seen.iter().all(|w| w == "a") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a2 still receives traffic: {seen:?}"
        );
    }
    // Shift the weights to b.
    mesh.write("route.yaml", &route(0, 1, ""));
    eventually_who(&c, addr, "/", "b").await;
    // Add a rule for a new path.
    let extra = "    - matches: [{path: {type: PathPrefix, value: /only-a}}]\n      backendRefs: [{name: a, port: 8080}]\n";
    mesh.write("route.yaml", &route(0, 1, extra));
    eventually_who(&c, addr, "/only-a/x", "a").await;
    assert_eq!(who(&c, addr, "/").await.unwrap(), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_drop_under_load_through_100_changes_and_a_controller_restart() {
    let (mut mesh, [a, a2, b], ws, grpc) = mesh().await;
    let (_proxy, addr) = gateway_proxy(&mesh, "gw-load", "127.0.0.1").await;
    let c = client();
    eventually_who(&c, addr, "/", "a").await;

    // Long-lived streams opened before any change.
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/chat"))
        .await
        .expect("WebSocket through the gateway");

    let mut grpc_client = echo::echo_client::EchoClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (grpc_tx, grpc_rx) = tokio::sync::mpsc::channel(1);
    let mut grpc_replies = grpc_client
        .bidi_stream(tokio_stream::wrappers::ReceiverStream::new(grpc_rx))
        .await
        .expect("gRPC stream through the gateway")
        .into_inner();
    let grpc_roundtrip = |text: &'static str| {
        let tx = grpc_tx.clone();
        async move {
            tx.send(echo::EchoRequest {
                message: text.into(),
                fail_with_code: 0,
            })
            .await
            .unwrap();
        }
    };
    grpc_roundtrip("before").await;
    assert_eq!(
        grpc_replies.message().await.unwrap().unwrap().message,
        "before"
    );

    // Bounded load: 4 connections, each sending requests back to back until `stop`.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (c, stop) = (client(), stop.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, Vec::new());
            // At most 20,000 requests per connection, whatever happens.
            for _ in 0..20_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match who(&c, addr, "/").await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }));
    }

    // 100 changes: endpoints added and removed, weights shifted.
    let started = Instant::now();
    for i in 0..100u32 {
        if i % 2 == 0 {
            let a2_ready = i % 4 == 0;
            mesh.write(
                "endpoints.yaml",
                &(slice("a", "1", a.0, true)
                    + &slice("a", "2", a2.0, a2_ready)
                    + &slice("b", "1", b.0, true)
                    + &slice("ws", "1", ws, true)
                    + &slice("grpc", "1", grpc, true)),
            );
        } else {
            mesh.write("route.yaml", &route(1 + i % 7, 1 + (i * 3) % 5, ""));
        }
        if i == 50 {
            // The controller goes away and comes back mid-load.
            mesh.stop_controller();
            tokio::time::sleep(Duration::from_millis(300)).await;
            mesh.start_controller();
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // Let the last changes land, then stop the load.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut failed) = (0, Vec::new());
    for w in workers {
        let (o, f) = w.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    println!(
        "zero-drop: {ok} requests succeeded, {} failed, over {:?} with 100 changes and a controller restart",
        failed.len(),
        started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "failed requests: {:?}",
        &failed[..failed.len().min(10)]
    );
    assert!(ok > 500, "the load ran: {ok}");
    // Traffic after the restart reaches both services the weights name.
    let mut seen = HashMap::new();
    for _ in 0..100 {
        *seen.entry(who(&c, addr, "/").await.unwrap()).or_insert(0) += 1;
    }
    assert!(seen.contains_key("b"), "{seen:?}");
    // The WebSocket opened before the changes is still alive.
    socket
        .send(tokio_tungstenite::tungstenite::Message::text("still here"))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "still here");
    // So is the gRPC stream.
    grpc_roundtrip("after").await;
    let reply = tokio::time::timeout(Duration::from_secs(5), grpc_replies.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.message, "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_route_is_nacked_and_shown_in_status() {
    let (mesh, ..) = mesh().await;
    let (_proxy, addr) = gateway_proxy(&mesh, "gw-nack", "127.0.0.1").await;
    let c = client();
    eventually_who(&c, addr, "/", "a").await;
    let bad = "    - matches: [{path: {type: RegularExpression, value: \"(\"}}]\n      backendRefs: [{name: b, port: 8080}]\n";
    mesh.write("route.yaml", &route(1, 0, bad));
    let deadline = Instant::now() + WAIT;
    loop {
        let out = Command::new(BIN)
            .args([
                "status",
                "--json",
                "--admin",
                &format!("127.0.0.1:{}", mesh.admin),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("gw-nack") && text.contains("does not compile") {
            break;
        }
        assert!(Instant::now() < deadline, "no NACK in status: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The previous routes keep serving.
    assert_eq!(who(&c, addr, "/").await.unwrap(), "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_to_ack_latency_across_proxies() {
    let (mesh, [a, a2, b], ws, grpc) = mesh().await;
    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(
            gateway_proxy(&mesh, &format!("gw-{i}"), &format!("127.0.0.{}", i + 1))
                .await
                .0,
        );
    }
    let mut samples = Vec::new();
    for i in 0..20 {
        let mut watches: Vec<_> = proxies.iter().map(|p| p.store().subscribe()).collect();
        for w in &mut watches {
            w.borrow_and_update();
        }
        let t0 = Instant::now();
        mesh.write(
            "endpoints.yaml",
            &(slice("a", "1", a.0, true)
                + &slice("a", "2", a2.0, i % 2 == 0)
                + &slice("b", "1", b.0, true)
                + &slice("ws", "1", ws, true)
                + &slice("grpc", "1", grpc, true)),
        );
        for w in &mut watches {
            tokio::time::timeout(WAIT, w.changed())
                .await
                .expect("every proxy applies the edit")
                .unwrap();
        }
        samples.push(t0.elapsed());
    }
    samples.sort();
    println!(
        "edit → applied and ACKed on all 3 proxies over 20 edits: median {:?}, worst {:?}",
        samples[samples.len() / 2],
        samples[samples.len() - 1]
    );
}

/// What one invalid edit breaks, and where the controller must show it.
#[derive(Clone, Copy, Debug)]
enum Invalid {
    /// A regex the proxy cannot compile: NACKed by the proxy, shown as a refusal.
    Regex,
    /// A backendRef to a Service that does not exist: a `BackendNotFound` problem.
    MissingBackend,
    /// A misspelt field (`backendRef`): the file is refused as a source error.
    UnknownField,
    /// A duration the Gateway API grammar does not allow: a source error.
    BadDuration,
}

impl Invalid {
    const ALL: [Invalid; 4] = [
        Invalid::Regex,
        Invalid::MissingBackend,
        Invalid::UnknownField,
        Invalid::BadDuration,
    ];

    /// An extra rule placed first in the HTTPRoute. None of them matches `/`, which the load uses.
    fn rule(self) -> &'static str {
        match self {
            Invalid::Regex => {
                "    - matches: [{path: {type: RegularExpression, value: \"(\"}}]\n      backendRefs: [{name: b, port: 8080}]\n"
            }
            Invalid::MissingBackend => {
                "    - matches: [{path: {type: PathPrefix, value: /missing}}]\n      backendRefs: [{name: nosuch, port: 8080}]\n"
            }
            Invalid::UnknownField => {
                "    - matches: [{path: {type: PathPrefix, value: /typo}}]\n      backendRef: [{name: b, port: 8080}]\n"
            }
            Invalid::BadDuration => {
                "    - matches: [{path: {type: PathPrefix, value: /slow}}]\n      timeouts: {request: 10 parsecs}\n      backendRefs: [{name: b, port: 8080}]\n"
            }
        }
    }

    /// The metric that must count it, read from the controller's `/metrics`.
    fn metric(self) -> &'static str {
        match self {
            Invalid::Regex => "trellis_control_nacked",
            Invalid::MissingBackend => "trellis_control_object_problems",
            Invalid::UnknownField | Invalid::BadDuration => "trellis_control_source_errors",
        }
    }

    fn shown(self, report: &trellis_control::status::StatusReport, node: &str) -> bool {
        match self {
            Invalid::Regex => report.proxies.iter().any(|p| {
                p.node_id == node
                    && p.types.get("routes").is_some_and(|t| {
                        t.nacked && t.refused.values().any(|m| m.contains("does not compile"))
                    })
            }),
            Invalid::MissingBackend => report
                .problems
                .iter()
                .any(|d| d.reason == "BackendNotFound" && d.message.contains("nosuch")),
            Invalid::UnknownField => report
                .source_errors
                .iter()
                .any(|e| e.file.ends_with("route.yaml") && e.reason.contains("backendRef")),
            Invalid::BadDuration => report
                .source_errors
                .iter()
                .any(|e| e.file.ends_with("route.yaml") && e.reason.contains("timeouts")),
        }
    }
}

/// Sum of a metric's samples (any labels) in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Everything the proxy holds is ACKed and nothing is refused or reported as a problem.
fn clean(report: &trellis_control::status::StatusReport, node: &str) -> bool {
    report.source_errors.is_empty()
        && report.problems.is_empty()
        && report.proxies.iter().any(|p| {
            p.node_id == node
                && p.types
                    .values()
                    .all(|t| t.pending == 0 && !t.nacked && t.refused.is_empty())
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_valid_and_invalid_edits_drops_nothing() {
    let (mesh, ..) = mesh().await;
    let node = "gw-churn";
    let (proxy, addr) = gateway_proxy(&mesh, node, "127.0.0.1").await;
    let c = client();
    eventually_who(&c, addr, "/", "a").await;
    let admin: SocketAddr = format!("127.0.0.1:{}", mesh.admin).parse().unwrap();
    let lifecycle = trellis_proxy::admin::Lifecycle::default();
    assert!(lifecycle.is_ready(proxy.store()), "ready before the churn");

    // Bounded load: 4 keep-alive connections, back to back, until `stop`.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (c, stop) = (client(), stop.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, Vec::new());
            for _ in 0..50_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match who(&c, addr, "/").await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }));
    }
    // Readiness sampled throughout: it must never drop, as every listener keeps serving.
    let sampler = tokio::spawn({
        let (proxy, stop) = (proxy.clone(), stop.clone());
        async move {
            let (mut samples, mut not_ready) = (0usize, 0usize);
            while !stop.load(Ordering::SeqCst) && samples < 100_000 {
                samples += 1;
                if !lifecycle.is_ready(proxy.store()) {
                    not_ready += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (samples, not_ready)
        }
    });

    // 70 edits: 50 valid weight changes and 20 invalid ones, each kind alone and combined with a
    // weight change.
    let started = Instant::now();
    let (mut valid, mut invalid) = (0, 0);
    for i in 0..70u32 {
        let weights = (1 + i % 3, 1 + (i * 2) % 5);
        let broken = (i % 7 == 1 || i % 7 == 4).then(|| {
            let kind = Invalid::ALL[invalid % 4];
            let combined = (invalid / 4) % 2 == 1;
            invalid += 1;
            (kind, combined)
        });
        let deadline = Instant::now() + WAIT;
        match broken {
            None => {
                valid += 1;
                mesh.write("route.yaml", &route(weights.0, weights.1, ""));
                loop {
                    let report = trellis_control::admin::fetch_status(admin).await.unwrap();
                    if clean(&report, node) {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "edit {i} (valid) never settled: {report:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Some((kind, combined)) => {
                let (wa, wb) = if combined { weights } else { (1, 1) };
                mesh.write("route.yaml", &route(wa, wb, kind.rule()));
                loop {
                    let report = trellis_control::admin::fetch_status(admin).await.unwrap();
                    let (_, metrics) = trellis_control::admin::get(admin, "/metrics")
                        .await
                        .unwrap();
                    let counted = metric_sum(&String::from_utf8_lossy(&metrics), kind.metric());
                    if kind.shown(&report, node) && counted > 0.0 {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "edit {i} ({kind:?}, combined {combined}) not shown: metric {counted}, {report:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut failed) = (0, Vec::new());
    for w in workers {
        let (o, f) = w.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    let (samples, not_ready) = sampler.await.unwrap();
    println!(
        "churn: {valid} valid and {invalid} invalid edits in {took:?}; {ok} requests answered, {} failed; readiness sampled {samples} times, not ready {not_ready}",
        failed.len()
    );
    assert_eq!((valid, invalid), (50, 20));
    assert!(
        failed.is_empty(),
        "failed requests: {:?}",
        &failed[..failed.len().min(10)]
    );
    assert!(ok > 200, "the load ran: {ok}");
    assert_eq!(not_ready, 0, "readiness dropped during the churn");
}
