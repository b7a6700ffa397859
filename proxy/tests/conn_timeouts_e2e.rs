//! Downstream connection limits through a real proxy: the idle timeout (which spares a request in
//! flight), the header read timeout (timed from a head's first byte, not while idle), the
//! maximum connection age (`Connection: close` on HTTP/1.1, GOAWAY on HTTP/2) and the connection
//! rate limit of a TCP listener.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

/// One HTTP listener `main` with `listener` settings added, a catch-all virtual host with a
/// direct `/` route and a forward of everything else to `up`.
fn http_config(listener: &str, up: SocketAddr) -> String {
    format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", {listener} }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - {{ name: hi, match: {{ path: {{ exact: / }} }}, direct_response: {{ status: 200, body: hi }} }}
          - {{ name: up, forward: {{ cluster: up }} }}
clusters:
  - {{ name: up, endpoints: ["{up}"] }}
"#
    )
}

type Conn = JoinHandle<hyper::Result<()>>;

async fn h1_connect(addr: SocketAddr) -> (http1::SendRequest<Full<Bytes>>, Conn) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    (send, tokio::spawn(conn))
}

async fn h2_connect(addr: SocketAddr) -> (http2::SendRequest<Full<Bytes>>, Conn) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    (send, tokio::spawn(conn))
}

fn h1_get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header(header::HOST, "test")
        .body(Full::default())
        .unwrap()
}

/// Sends a request on an HTTP/1.1 connection and reads the whole response.
async fn h1_send(
    send: &mut http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (http::response::Parts, Bytes) {
    send.ready().await.expect("connection open");
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("response within 10s")
        .expect("response");
    let (parts, body) = resp.into_parts();
    (parts, body.collect().await.expect("body").to_bytes())
}

/// Waits (at most `limit`) for the proxy to end a client connection.
async fn closed_within(conn: Conn, limit: Duration, what: &str) -> hyper::Result<()> {
    tokio::time::timeout(limit, conn)
        .await
        .unwrap_or_else(|_| panic!("{what}: connection still open after {limit:?}"))
        .unwrap()
}

#[tokio::test]
async fn idle_timeout_closes_an_idle_keep_alive_connection() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&http_config("idle_timeout: 300ms", up)).await;
    let (mut send, conn) = h1_connect(addr).await;
    let (resp, body) = h1_send(&mut send, h1_get("/")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(&body[..], b"hi");
    assert!(
        resp.headers
            .get(header::CONNECTION)
            .is_none_or(|v| v != "close"),
        "kept alive"
    );
    let idle_from = Instant::now();
    closed_within(conn, Duration::from_secs(10), "idle connection")
        .await
        .expect("a graceful close");
    assert!(
        idle_from.elapsed() >= Duration::from_millis(200),
        "closed after {:?}, before the idle timeout",
        idle_from.elapsed()
    );
}

#[tokio::test]
async fn idle_timeout_spares_a_request_in_flight() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&http_config("idle_timeout: 300ms", up)).await;
    let (mut send, conn) = h1_connect(addr).await;
    // The upstream takes more than three idle timeouts to answer.
    let (resp, body) = h1_send(&mut send, h1_get("/slow/1000")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(seen(&body).uri, "/slow/1000");
    // Once idle, the connection goes.
    closed_within(conn, Duration::from_secs(10), "idle after the response")
        .await
        .expect("a graceful close");
}

/// Reads until the proxy closes the connection (EOF or reset); panics after `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "connection still open after {limit:?}");
    got
}

#[tokio::test]
async fn header_read_timeout_closes_a_half_sent_head() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&http_config("header_read_timeout: 300ms", up)).await;

    // A head that never ends.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nx-slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    let got = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "closed after {:?}, before the header read timeout",
        started.elapsed()
    );
    assert!(
        !got.starts_with(b"HTTP/1.1 200"),
        "no response to a head that never ended: {:?}",
        String::from_utf8_lossy(&got)
    );

    // A client that connects and sends nothing is bounded the same way.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    read_until_closed(&mut silent, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn header_read_timeout_does_not_run_while_a_connection_is_idle() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&http_config("header_read_timeout: 200ms", up)).await;
    let (mut send, conn) = h1_connect(addr).await;
    assert_eq!(h1_send(&mut send, h1_get("/")).await.0.status, 200);
    // Idle for several header timeouts (the idle timeout is an hour): still open.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!conn.is_finished(), "an idle keep-alive connection stays");
    let (resp, body) = h1_send(&mut send, h1_get("/")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(&body[..], b"hi");
}

#[tokio::test]
async fn max_connection_age_closes_http1_after_its_response() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&http_config("max_connection_age: 300ms", up)).await;
    let (mut send, conn) = h1_connect(addr).await;
    // In flight when the connection comes of age: answered in full, with `Connection: close`.
    let (resp, body) = h1_send(&mut send, h1_get("/slow/1500")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(seen(&body).uri, "/slow/1500");
    assert_eq!(
        resp.headers.get(header::CONNECTION).map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    closed_within(conn, Duration::from_secs(10), "old HTTP/1.1 connection")
        .await
        .expect("a graceful close");
}

#[tokio::test]
async fn max_connection_age_sends_goaway_to_http2() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&http_config("max_connection_age: 300ms", up)).await;
    let (mut send, conn) = h2_connect(addr).await;
    send.ready().await.unwrap();
    let req = Request::get(format!("http://{addr}/slow/1500"))
        .body(Full::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("response within 10s")
        .expect("the stream open before GOAWAY completes");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(seen(&body).uri, "/slow/1500");
    // GOAWAY then a clean close once the stream is done: the client's connection ends without
    // an error, and takes no new streams.
    closed_within(conn, Duration::from_secs(10), "old HTTP/2 connection")
        .await
        .expect("a graceful close");
    assert!(send.ready().await.is_err(), "no new streams after GOAWAY");
}

#[tokio::test]
async fn tcp_listener_rate_limit_closes_connections_beyond_the_bucket() {
    let up = tcp_echo_upstream().await;
    let (_proxy, addr) = start_proxy(&format!(
        r#"
listeners:
  - name: main
    address: "127.0.0.1:0"
    protocol: tcp
    cluster: echo
    rate_limit: {{ max_tokens: 2, tokens_per_fill: 1, fill_interval: 1h }}
clusters:
  - {{ name: echo, endpoints: ["{up}"] }}
"#
    ))
    .await;
    // Connections are accepted in order: each waits for its echo before the next connects.
    let mut kept = Vec::new();
    for i in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let msg = format!("hello {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .expect("echo within 5s")
            .unwrap();
        assert_eq!(buf, msg.as_bytes());
        kept.push(s);
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    let _ = third.write_all(b"hello 2").await; // may already see the close
    let got = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(got.is_empty(), "no echo beyond the bucket: {got:?}");
    // The first two are unaffected.
    kept[0].write_all(b"still").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), kept[0].read_exact(&mut buf))
        .await
        .expect("echo within 5s")
        .unwrap();
    assert_eq!(&buf, b"still");
}
