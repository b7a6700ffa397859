//! End to end: the request an upstream receives is well formed whatever the downstream sent —
//! a Host is always present, and headers are translated correctly between HTTP versions.

mod common;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn cluster(protocol: &str, endpoint: SocketAddr) -> String {
    format!(
        "  - {{ name: up, protocol: {protocol}, connect_timeout: 1s, endpoints: [\"{endpoint}\"] }}\n"
    )
}

const FORWARD_ALL: &str = "          - { name: all, forward: { cluster: up } }";

/// Sends raw bytes, reads until the peer closes (bounded), and returns what came back.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut out))
        .await
        .expect("the proxy answers and closes within 10s")
        .expect("read");
    out
}

/// The JSON body of a raw HTTP/1.x response (no chunking: the echo answer has a length).
fn raw_body(resp: &[u8]) -> Bytes {
    let text = String::from_utf8_lossy(resp);
    assert!(
        text.starts_with("HTTP/1.") && text[9..].starts_with("200"),
        "{text}"
    );
    let (_, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    Bytes::from(body.to_owned())
}

/// Sends one HTTP/2 GET with `:method`, `:scheme` and `:path` but no `:authority` — a request no
/// client library will build — and returns the response's status byte and DATA payload.
async fn h2_get_without_authority(addr: SocketAddr) -> (u8, Bytes) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // empty SETTINGS
    // HEADERS on stream 1, END_STREAM | END_HEADERS; HPACK static :method GET, :scheme http, :path /.
    out.extend_from_slice(&[0, 0, 3, 0x1, 0x5, 0, 0, 0, 1, 0x82, 0x86, 0x84]);
    conn.write_all(&out).await.unwrap();

    let mut status = 0;
    let mut body = Vec::new();
    let read = async {
        loop {
            let mut head = [0u8; 9];
            conn.read_exact(&mut head).await.expect("a frame header");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            conn.read_exact(&mut payload)
                .await
                .expect("a frame payload");
            let (kind, flags, stream) = (head[3], head[4], head[8]);
            match (kind, stream) {
                // SETTINGS from the server: acknowledge them.
                (0x4, 0) if flags & 1 == 0 => conn
                    .write_all(&[0, 0, 0, 0x4, 0x1, 0, 0, 0, 0])
                    .await
                    .unwrap(),
                (0x1, 1) => {
                    status = payload[0];
                    if flags & 1 == 1 {
                        return;
                    }
                }
                (0x0, 1) => {
                    body.extend_from_slice(&payload);
                    if flags & 1 == 1 {
                        return;
                    }
                }
                (0x3, 1) | (0x7, _) => panic!("the proxy refused the stream: {payload:?}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response within 10s");
    (status, Bytes::from(body))
}

#[tokio::test]
async fn http10_request_without_host_reaches_an_http1_upstream_with_a_host() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster("http1", up))).await;

    let resp = raw_exchange(addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    let seen = seen(&raw_body(&resp));
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.header("host"), Some(up.to_string().as_str()));
}

#[tokio::test]
async fn http2_request_without_authority_reaches_an_http1_upstream_with_a_host() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster("http1", up))).await;

    let (status, body) = h2_get_without_authority(addr).await;
    // HPACK static index 8 is `:status 200`.
    assert_eq!(status, 0x88, "{}", String::from_utf8_lossy(&body));
    assert_eq!(seen(&body).header("host"), Some(up.to_string().as_str()));
}

#[tokio::test]
async fn http2_authority_becomes_the_host_of_an_http1_upstream_request() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster("http1", up))).await;

    let req = Request::get(format!("http://{addr}/a"))
        .body(Full::default())
        .unwrap();
    let (resp, body) = send(&h2_client(), req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = seen(&body);
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.header_all("host"), vec![addr.to_string().as_str()]);
}

#[tokio::test]
async fn http2_cookie_headers_are_joined_for_an_http1_upstream() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster("http1", up))).await;

    let req = Request::get(format!("http://{addr}/c"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(Full::default())
        .unwrap();
    let (resp, body) = send(&h2_client(), req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(seen(&body).header_all("cookie"), vec!["a=1; b=2; c=3"]);
}

#[tokio::test]
async fn every_connection_header_line_names_hop_by_hop_headers() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster("http1", up))).await;

    let resp = raw_exchange(
        addr,
        b"GET /h HTTP/1.1\r\nHost: svc\r\nConnection: x-one\r\nConnection: close, x-two\r\n\
          x-one: 1\r\nx-two: 2\r\nx-kept: 3\r\n\r\n",
    )
    .await;
    let seen = seen(&raw_body(&resp));
    assert_eq!(seen.header("x-one"), None);
    assert_eq!(seen.header("x-two"), None);
    assert_eq!(seen.header("x-kept"), Some("3"));
}
