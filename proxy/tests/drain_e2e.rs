//! Graceful drain: SIGTERM on the binary and POST /drain in process. Requests in flight finish
//! (HTTP/1.1 with `Connection: close`, HTTP/2 after GOAWAY), idle connections close once their
//! client is quiet, requests that clients keep sending are answered, listeners accept for the
//! drain delay and then refuse new connections, and the process exits 0 once connections are gone
//! or at the drain timeout, where what is left is answered 503 `drain-timeout`. Reloads, by
//! contrast, leave open streams alone.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
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
    let (proxy, addr, _dir) = Running::with_config(
        &forward_config(up, ""),
        &["--drain-timeout", "20s", "--drain-delay", "0"],
    );

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

/// What one keep-alive client saw: requests it wrote, responses it read, and the requests it
/// wrote on an open connection that never got a response.
#[derive(Debug, Default)]
struct Talk {
    written: usize,
    answered: usize,
    lost: Vec<String>,
}

/// How a request written on a connection ended.
enum Exchanged {
    /// A whole response; `close` if it said `Connection: close`.
    Answered { close: bool },
    /// The connection ended (or failed) before a whole response: the request is lost.
    Lost(String),
}

/// Writes one GET on `stream` and reads its whole response (heads and `Content-Length` bodies
/// only: the echo upstream sends nothing else).
async fn exchange(stream: &mut TcpStream, path: &str) -> Exchanged {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return Exchanged::Lost(format!("write failed: {e}"));
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                let close = head
                    .lines()
                    .any(|l| l.starts_with("connection:") && l.contains("close"));
                return Exchanged::Answered { close };
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Err(_) => return Exchanged::Lost("no response within 10s".into()),
            Ok(Ok(0)) => return Exchanged::Lost(format!("closed after {} bytes", got.len())),
            Ok(Err(e)) => return Exchanged::Lost(format!("read failed: {e}")),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A client that keeps one keep-alive connection busy with GETs, a few milliseconds apart, and
/// reconnects whenever a response says `Connection: close`, until a reconnect is refused (the
/// listener has closed: not a loss), `max` requests, or `until`.
async fn talking_client(
    addr: SocketAddr,
    id: usize,
    max: usize,
    until: Instant,
    signalled: Arc<AtomicBool>,
) -> Talk {
    let mut talk = Talk::default();
    let mut conn: Option<TcpStream> = None;
    // Whether the current connection was opened after the signal (during the drain delay).
    let mut opened = "";
    while talk.written < max && Instant::now() < until {
        let stream = match &mut conn {
            Some(s) => s,
            None => match TcpStream::connect(addr).await {
                Ok(s) => {
                    opened = if signalled.load(Ordering::SeqCst) {
                        " (connection opened after the signal)"
                    } else {
                        ""
                    };
                    conn.insert(s)
                }
                Err(_) => break,
            },
        };
        talk.written += 1;
        match exchange(stream, &format!("/talk/{id}/{}", talk.written)).await {
            Exchanged::Answered { close } => {
                talk.answered += 1;
                if close {
                    conn = None;
                }
            }
            Exchanged::Lost(why) => {
                talk.lost.push(format!(
                    "client {id} request {}: {why}{opened}",
                    talk.written
                ));
                conn = None;
            }
        }
        // Clients pause between requests, as real ones do: that is when an idle connection
        // closed by the proxy races the next request.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=20))).await;
    }
    talk
}

/// Drain runs for the SIGTERM test: `DRAIN_RUNS` (default 2), so the 10-run figure can be
/// measured with the same test.
fn drain_runs() -> usize {
    std::env::var("DRAIN_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_loses_no_request_of_clients_still_talking() {
    let (up, seen_requests) = echo_upstream("up").await;
    let clients = 10;
    let mut lost = Vec::new();
    for run in 1..=drain_runs() {
        let (proxy, addr, _dir) = Running::with_config(
            &forward_config(up, ""),
            &["--drain-timeout", "10s", "--drain-delay", "300ms"],
        );
        let until = Instant::now() + Duration::from_secs(15);
        let signalled = Arc::new(AtomicBool::new(false));
        let talkers: Vec<_> = (0..clients)
            .map(|id| tokio::spawn(talking_client(addr, id, 5_000, until, signalled.clone())))
            .collect();
        // Every client is talking before the signal.
        let before = seen_requests.load(Ordering::SeqCst);
        eventually(Duration::from_secs(5), "clients are talking", || {
            let n = seen_requests.load(Ordering::SeqCst);
            async move { n >= before + 20 * clients }
        })
        .await;
        signalled.store(true, Ordering::SeqCst);
        proxy.terminate();
        let (status, _) = proxy.exited_within(Duration::from_secs(15)).await;
        assert!(status.success(), "run {run}: exit {status:?}");
        let (mut written, mut answered) = (0, 0);
        let mut run_lost = Vec::new();
        for t in talkers {
            let talk = t.await.unwrap();
            written += talk.written;
            answered += talk.answered;
            run_lost.extend(talk.lost);
        }
        println!(
            "run {run}: {written} requests written, {answered} answered, {} lost",
            run_lost.len()
        );
        lost.extend(run_lost.into_iter().map(|l| format!("run {run}: {l}")));
    }
    assert!(lost.is_empty(), "requests lost: {lost:#?}");
}

#[tokio::test]
async fn sigterm_answers_a_request_cut_by_the_drain_timeout_with_503_and_logs_it() {
    let (up, seen_requests) = echo_upstream("up").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = forward_config(up, ", timeout: 0").replace(
        r#"address: "127.0.0.1:0" }"#,
        &format!(
            r#"address: "127.0.0.1:0", access_log: "{}" }}"#,
            log.display()
        ),
    );
    let (proxy, addr, _dir) =
        Running::with_config(&yaml, &["--drain-timeout", "500ms", "--drain-delay", "0"]);
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
    let (resp, body) = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the client sees the answer")
        .unwrap()
        .expect("the cut request is answered, not dropped");
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(resp.headers["x-trellis-error"], "drain-timeout");
    assert!(is_close(&resp), "{:?}", resp.headers);
    let lines = std::fs::read_to_string(&log).unwrap();
    let cut: Vec<_> = lines
        .lines()
        .filter(|l| l.contains("/slow/60000"))
        .collect();
    assert_eq!(
        cut.len(),
        1,
        "one access log line for the cut request: {lines}"
    );
    assert!(
        cut[0].contains(r#""status":503"#) && cut[0].contains(r#""error":"drain-timeout""#),
        "{}",
        cut[0]
    );
}

/// The admin address from the binary's start-up line.
fn admin_addr(proxy: &Running) -> SocketAddr {
    let line = proxy.wait_for("trellis-proxy started");
    line.split("admin=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the start-up line names the admin address")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn during_the_drain_delay_readiness_is_off_and_new_connections_are_served() {
    let (up, _) = echo_upstream("up").await;
    let (proxy, addr, _dir) = Running::with_config(
        &forward_config(up, ""),
        &["--drain-delay", "30s", "--drain-timeout", "30s"],
    );
    let admin = admin_addr(&proxy);
    let client = h1_client();
    assert_eq!(
        get(&client, &format!("http://{admin}/ready"))
            .await
            .0
            .status(),
        StatusCode::OK
    );

    proxy.terminate();
    eventually(Duration::from_secs(5), "readiness off", || {
        let client = client.clone();
        async move {
            get(&client, &format!("http://{admin}/ready"))
                .await
                .0
                .status()
                == StatusCode::SERVICE_UNAVAILABLE
        }
    })
    .await;
    // Still inside the 30 s delay: a new connection is accepted and served, and told to close.
    let (mut send, conn) = h1_connect(addr).await;
    let (resp, body) = h1_get(&mut send, "/during-delay")
        .await
        .expect("a new connection is served during the drain delay");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(seen(&body).uri, "/during-delay");
    assert!(is_close(&resp), "draining: {:?}", resp.headers);
    closed_within(
        conn,
        Duration::from_secs(5),
        "connection after its response",
    )
    .await
    .expect("a graceful close");

    // A second signal exits at once, long before the delay and the timeout are over.
    let signalled = Instant::now();
    proxy.terminate();
    let (status, exited) = proxy.exited_within(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(exited - signalled < Duration::from_secs(5));
}

#[tokio::test]
async fn a_second_sigint_exits_at_once_during_the_drain_timeout() {
    let (up, seen_requests) = echo_upstream("up").await;
    let (proxy, addr, _dir) = Running::with_config(
        &forward_config(up, ", timeout: 0"),
        &["--drain-delay", "0", "--drain-timeout", "60s"],
    );
    let (mut send, _conn) = h1_connect(addr).await;
    let _in_flight = tokio::spawn(async move { h1_get(&mut send, "/slow/60000").await });
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
    proxy.wait_for("listeners closed");
    let signalled = Instant::now();
    proxy.signal("-INT");
    let (status, exited) = proxy.exited_within(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(exited - signalled < Duration::from_secs(5));
}

#[tokio::test]
async fn the_cut_answers_waiting_requests_and_counts_every_cut_request() {
    let (up, seen_requests) = echo_upstream("up").await;
    let stalled = endless_body_upstream().await;
    let yaml = config(
        "          - { name: s, match: { path: { prefix: /stream } }, forward: { cluster: stalled }, timeout: 0 }
          - { name: up, forward: { cluster: up }, timeout: 0 }",
        &format!(
            "  - {{ name: up, endpoints: [\"{up}\"] }}
  - {{ name: stalled, endpoints: [\"{stalled}\"] }}"
        ),
    );
    let (proxy, addr) = start_proxy(&yaml).await;
    let (admin, _lifecycle) = start_admin(&proxy).await;
    let cut_before = metric(
        &scrape(admin).await,
        "trellis_drain_cut_requests_total",
        &[],
    )
    .unwrap_or(0.0);

    // One request waits for its response head; another streams a body that never ends.
    let (mut waiting, _c1) = h1_connect(addr).await;
    let waiting = tokio::spawn(async move { h1_get(&mut waiting, "/slow/60000").await });
    let (mut streamer, _c2) = h1_connect(addr).await;
    streamer.ready().await.unwrap();
    let resp = streamer
        .send_request(
            Request::get("/stream")
                .header(header::HOST, "test")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .expect("the streaming response head");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    eventually(
        Duration::from_secs(5),
        "the first upstream has the waiting request",
        || {
            let n = seen_requests.load(Ordering::SeqCst);
            async move { n == 1 }
        },
    )
    .await;

    assert!(proxy.drain().await);
    assert!(proxy.cut().await);
    assert!(!proxy.cut().await, "a second cut is a no-op");
    let (resp, _) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting request is answered")
        .unwrap()
        .expect("a response");
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers["x-trellis-error"], "drain-timeout");
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the streaming response is ended");
    assert!(
        rest.is_err(),
        "a cut body ends in an error, not a clean end"
    );
    tokio::time::timeout(Duration::from_secs(5), proxy.drained())
        .await
        .expect("every connection finished");
    let cut_after = metric(
        &scrape(admin).await,
        "trellis_drain_cut_requests_total",
        &[],
    )
    .unwrap_or(0.0);
    assert_eq!(cut_after - cut_before, 2.0, "both cut requests are counted");
}

/// An HTTP/1.1 upstream that sends a response head and a first chunk, then nothing more.
async fn endless_body_upstream() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n",
                    )
                    .await;
                // Keep the connection open, silent, until the peer goes.
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    addr
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

#[tokio::test]
async fn an_idle_keep_alive_connection_is_answered_after_the_drain_starts() {
    let (up, _) = echo_upstream("up").await;
    let (proxy, addr) = start_proxy(&forward_config(up, "")).await;
    let (mut idle, idle_conn) = h1_connect(addr).await;
    assert_eq!(h1_get(&mut idle, "/before").await.unwrap().0.status, 200);

    // The client, idle at the signal, writes its next request right after it: the proxy has
    // not closed the connection under it.
    assert!(proxy.drain().await);
    refuses_connections(addr).await;
    let (resp, body) = h1_get(&mut idle, "/after")
        .await
        .expect("a request on a connection open at the drain is answered");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(seen(&body).uri, "/after");
    assert!(is_close(&resp), "draining: {:?}", resp.headers);
    closed_within(
        idle_conn,
        Duration::from_secs(5),
        "connection after its response",
    )
    .await
    .expect("a graceful close");

    // On another proxy, a client that stays quiet is closed once quiet for a second.
    let (quiet_proxy, quiet_addr) = start_proxy(&forward_config(up, "")).await;
    let (mut quiet, quiet_conn) = h1_connect(quiet_addr).await;
    assert_eq!(h1_get(&mut quiet, "/before").await.unwrap().0.status, 200);
    let drained_at = Instant::now();
    assert!(quiet_proxy.drain().await);
    closed_within(
        quiet_conn,
        Duration::from_secs(5),
        "a quiet idle connection",
    )
    .await
    .expect("a graceful close");
    assert!(
        drained_at.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before the client was quiet for a second",
        drained_at.elapsed()
    );
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

#[test]
fn a_drain_delay_in_the_file_that_is_not_a_duration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    let yaml = format!(
        "drain_delay: \"5\"\n{}",
        forward_config("127.0.0.1:9".parse().unwrap(), "")
    );
    std::fs::write(&path, yaml).unwrap();
    let out = common::process::output_within(
        std::process::Command::new(common::process::BIN).args([
            "--config",
            path.to_str().unwrap(),
            "--admin",
            "127.0.0.1:0",
        ]),
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {stderr}");
    assert!(
        stderr.contains(r#"drain_delay: "5": "5" is not a duration"#),
        "{stderr}"
    );
}
