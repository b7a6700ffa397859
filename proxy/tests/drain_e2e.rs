//! Graceful drain: SIGTERM on the binary and POST /drain in process. Requests in flight finish
//! (HTTP/1.1 with `Connection: close`, HTTP/2 after GOAWAY), idle connections close, listeners
//! refuse new connections, and the process exits 0 once connections are gone or at the drain
//! timeout. Reloads, by contrast, leave open streams alone.

mod common;

use std::{
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{process::Running, *};
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use trellis_proto::echo::v1::{EchoRequest, echo_client::EchoClient};
use trellis_proxy::config::validate;

/// Listener `main` forwarding everything to `up`, with `route` settings added to the route.
fn forward_config(up: SocketAddr, route: &str) -> String {
    config(
        &format!("          - {{ name: up, forward: {{ cluster: up }}{route} }}"),
        &format!("  - {{ name: up, endpoints: [\"{up}\"] }}"),
    )
}

type Conn = JoinHandle<hyper::Result<()>>;

async fn h1_connect(addr: SocketAddr) -> (http1::SendRequest<Full<Bytes>>, Conn) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    (send, tokio::spawn(conn))
}

/// Sends `GET path` on an HTTP/1.1 connection; returns the response head and whole body.
async fn h1_get(
    send: &mut http1::SendRequest<Full<Bytes>>,
    path: &str,
) -> hyper::Result<(http::response::Parts, Bytes)> {
    send.ready().await?;
    let req = Request::get(path)
        .header(header::HOST, "test")
        .body(Full::default())
        .unwrap();
    let (parts, body) = send.send_request(req).await?.into_parts();
    Ok((parts, body.collect().await?.to_bytes()))
}

/// Waits (at most `limit`) for the proxy to end a client connection.
async fn closed_within(conn: Conn, limit: Duration, what: &str) -> hyper::Result<()> {
    tokio::time::timeout(limit, conn)
        .await
        .unwrap_or_else(|_| panic!("{what}: connection still open after {limit:?}"))
        .unwrap()
}

async fn refuses_connections(addr: SocketAddr) {
    eventually(
        Duration::from_secs(5),
        "listener refuses connections",
        || async { TcpStream::connect(addr).await.is_err() },
    )
    .await;
}

fn is_close(parts: &http::response::Parts) -> bool {
    parts
        .headers
        .get(header::CONNECTION)
        .is_some_and(|v| v == "close")
}

#[tokio::test]
async fn sigterm_finishes_the_request_in_flight_then_exits() {
    let (up, seen_requests) = echo_upstream("up").await;
    let (proxy, addr, _dir) =
        Running::with_config(&forward_config(up, ""), &["--drain-timeout", "20s"]);

    // A keep-alive connection that has served a request and sits idle.
    let (mut idle, idle_conn) = h1_connect(addr).await;
    assert_eq!(h1_get(&mut idle, "/first").await.unwrap().0.status, 200);

    // A request the upstream answers after a second.
    let (mut busy, busy_conn) = h1_connect(addr).await;
    let in_flight = tokio::spawn(async move { h1_get(&mut busy, "/slow/1000").await });
    eventually(
        Duration::from_secs(5),
        "the upstream has the request",
        || {
            let n = seen_requests.load(Ordering::SeqCst);
            async move { n == 2 }
        },
    )
    .await;

    proxy.terminate();
    let signalled = Instant::now();
    refuses_connections(addr).await;
    closed_within(
        idle_conn,
        Duration::from_secs(5),
        "idle keep-alive connection",
    )
    .await
    .expect("a graceful close");

    let (resp, body) = in_flight
        .await
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(seen(&body).uri, "/slow/1000");
    assert!(is_close(&resp), "draining: {:?}", resp.headers);
    closed_within(
        busy_conn,
        Duration::from_secs(5),
        "connection after its response",
    )
    .await
    .expect("a graceful close");

    // Nothing left open: the process exits at once rather than at the 20 s drain timeout.
    let (status, exited) = proxy.exited_within(Duration::from_secs(15)).await;
    assert!(status.success(), "a drained exit is 0, got {status:?}");
    assert!(exited - signalled < Duration::from_secs(15));
}

#[tokio::test]
async fn sigterm_exits_at_the_drain_timeout_when_a_request_is_slower() {
    let (up, seen_requests) = echo_upstream("up").await;
    let (proxy, addr, _dir) = Running::with_config(
        &forward_config(up, ", timeout: 0"),
        &["--drain-timeout", "500ms"],
    );
    let (mut send, _conn) = h1_connect(addr).await;
    let in_flight = tokio::spawn(async move { h1_get(&mut send, "/slow/60000").await });
    eventually(
        Duration::from_secs(5),
        "the upstream has the request",
        || {
            let n = seen_requests.load(Ordering::SeqCst);
            async move { n == 1 }
        },
    )
    .await;

    proxy.terminate();
    let signalled = Instant::now();
    let (status, exited) = proxy.exited_within(Duration::from_secs(15)).await;
    assert!(
        status.success(),
        "an exit at the drain timeout is 0, got {status:?}"
    );
    assert!(
        exited - signalled >= Duration::from_millis(400),
        "exited after {:?}, before the drain timeout",
        exited - signalled
    );
    let result = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the client sees the connection end")
        .unwrap();
    assert!(result.is_err(), "cut at the timeout, not answered");
}

#[tokio::test]
async fn post_drain_turns_readiness_off_and_stops_accepting() {
    let (up, seen_requests) = echo_upstream("up").await;
    let (proxy, addr) = start_proxy(&forward_config(up, "")).await;
    let (admin, _lifecycle) = start_admin(&proxy).await;
    let admin_client = h1_client();
    assert_eq!(
        get(&admin_client, &format!("http://{admin}/ready"))
            .await
            .0
            .status(),
        StatusCode::OK
    );

    let (mut send, conn) = h1_connect(addr).await;
    let in_flight = tokio::spawn(async move { h1_get(&mut send, "/slow/1000").await });
    eventually(
        Duration::from_secs(5),
        "the upstream has the request",
        || {
            let n = seen_requests.load(Ordering::SeqCst);
            async move { n == 1 }
        },
    )
    .await;

    let (resp, _) = send_admin_drain(admin).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (ready, body) = get(&admin_client, &format!("http://{admin}/ready")).await;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&body[..], b"draining\n");
    refuses_connections(addr).await;

    let (resp, _) = in_flight
        .await
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(resp.status, StatusCode::OK);
    assert!(is_close(&resp), "draining: {:?}", resp.headers);
    closed_within(
        conn,
        Duration::from_secs(5),
        "connection after its response",
    )
    .await
    .expect("a graceful close");
    tokio::time::timeout(Duration::from_secs(5), proxy.drained())
        .await
        .expect("every connection finished");

    // The proxy keeps running (admin answers), and an update does not reopen listeners.
    assert_eq!(
        get(&admin_client, &format!("http://{admin}/live"))
            .await
            .0
            .status(),
        StatusCode::OK
    );
    let config = validate::from_yaml(&forward_config(up, ", timeout: 5s")).unwrap();
    proxy.apply(config).await.expect("updates still apply");
    assert_eq!(proxy.listener_addr("main").await, None);
}

async fn send_admin_drain(admin: SocketAddr) -> (http::Response<()>, Bytes) {
    send(
        &h1_client(),
        Request::post(format!("http://{admin}/drain"))
            .header("x-trellis-admin", "1")
            .body(Full::default())
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn drain_sends_goaway_to_http2_after_its_stream() {
    let (up, seen_requests) = echo_upstream("up").await;
    let (proxy, addr) = start_proxy(&forward_config(up, "")).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    send.ready().await.unwrap();
    let req = Request::get(format!("http://{addr}/slow/1000"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = tokio::spawn(send.send_request(req));
    eventually(
        Duration::from_secs(5),
        "the upstream has the request",
        || {
            let n = seen_requests.load(Ordering::SeqCst);
            async move { n == 1 }
        },
    )
    .await;

    assert!(proxy.drain().await);
    let resp = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("response within 10s")
        .unwrap()
        .expect("the stream open before GOAWAY completes");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(seen(&body).uri, "/slow/1000");
    closed_within(
        conn,
        Duration::from_secs(5),
        "HTTP/2 connection after GOAWAY",
    )
    .await
    .expect("a graceful close");
    assert!(send.ready().await.is_err(), "no new streams after GOAWAY");
    tokio::time::timeout(Duration::from_secs(5), proxy.drained())
        .await
        .expect("every connection finished");
}

/// WebSocket on `/chat`, gRPC on the echo service, a direct answer on `/version`; no route
/// timeout on the long-lived ones.
fn streams_config(
    ws: SocketAddr,
    grpc: SocketAddr,
    version: &str,
    connect_timeout: &str,
) -> String {
    config(
        &format!(
            r#"          - {{ name: v, match: {{ path: {{ exact: /version }} }}, direct_response: {{ status: 200, body: "{version}" }} }}
          - {{ name: grpc, match: {{ path: {{ prefix: /trellis.echo.v1.Echo }} }}, forward: {{ cluster: grpc }}, timeout: 0 }}
          - {{ name: ws, match: {{ path: {{ prefix: /chat }} }}, forward: {{ cluster: ws }}, timeout: 0 }}"#
        ),
        &format!(
            r#"  - {{ name: ws, protocol: http1, connect_timeout: {connect_timeout}, endpoints: ["{ws}"] }}
  - {{ name: grpc, protocol: http2, connect_timeout: {connect_timeout}, endpoints: ["{grpc}"] }}"#
        ),
    )
}

#[tokio::test]
async fn websocket_and_grpc_stream_survive_a_reload() {
    let ws_up = ws_upstream().await;
    let grpc_up = grpc_upstream("grpc-up").await;
    let (proxy, addr) = start_proxy(&streams_config(ws_up, grpc_up, "one", "1s")).await;

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat"))
        .await
        .expect("WebSocket handshake through the proxy");
    let mut grpc = EchoClient::connect(format!("http://{addr}")).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut inbound = grpc
        .bidi_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let exchange = |round: &'static str| {
        let tx = tx.clone();
        async move {
            tx.send(EchoRequest {
                message: round.into(),
                fail_with_code: 0,
            })
            .await
            .unwrap();
        }
    };

    for round in ["before-1", "before-2"] {
        ws.send(Message::text(round)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("WebSocket echo within 5s")
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(round));
        exchange(round).await;
        let reply = tokio::time::timeout(Duration::from_secs(5), inbound.message())
            .await
            .expect("gRPC reply within 5s")
            .unwrap()
            .expect("a reply");
        assert_eq!(reply.message, round);
    }

    // A reload that changes the routes and both clusters.
    let config = validate::from_yaml(&streams_config(ws_up, grpc_up, "two", "2s")).unwrap();
    proxy.apply(config).await.expect("reload applies");
    let (_, body) = get(&h1_client(), &format!("http://{addr}/version")).await;
    assert_eq!(&body[..], b"two", "the reload is in force");

    for round in ["after-1", "after-2"] {
        ws.send(Message::text(round)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("WebSocket echo within 5s after the reload")
            .unwrap()
            .expect("the WebSocket is still open");
        assert_eq!(echoed, Message::text(round));
        exchange(round).await;
        let reply = tokio::time::timeout(Duration::from_secs(5), inbound.message())
            .await
            .expect("gRPC reply within 5s after the reload")
            .expect("the stream is still open")
            .expect("a reply");
        assert_eq!(reply.message, round);
    }
    ws.close(None).await.unwrap();
    drop(tx);
    assert!(inbound.message().await.unwrap().is_none());
}
