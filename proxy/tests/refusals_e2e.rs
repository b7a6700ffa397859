//! Requests the proxy refuses before routing, sent as raw bytes through a real proxy: invalid or
//! doubled Host, a Host that disagrees with an absolute-form target, transfer codings other than
//! a lone `chunked`, an unrepresentable Content-Length, `CONNECT`; `OPTIONS *` answered by the
//! proxy; and an upstream's own `x-trellis-error` relayed under another name.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use bytes::Bytes;
use common::*;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Sends `request` on a fresh connection and reads until the proxy closes it (at most 5 s).
/// Returns what was read and whether the proxy closed the connection in time.
async fn exchange(addr: SocketAddr, request: &[u8]) -> (String, bool) {
    let (got, closed) = raw_exchange(addr, request, Duration::from_secs(5)).await;
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The value of header `name` in a raw response head, lowercase name match.
fn header_of<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn proxy_to_echo() -> (Arc<trellis_proxy::Proxy>, SocketAddr, Arc<AtomicUsize>) {
    let (up, count) = echo_upstream("up").await;
    let yaml = config(
        "          - { name: all, forward: { cluster: up } }",
        &format!("  - {{ name: up, endpoints: [\"{up}\"] }}"),
    );
    let (proxy, addr) = start_proxy(&yaml).await;
    (proxy, addr, count)
}

#[tokio::test]
async fn requests_refused_before_routing_carry_the_reason_and_close() {
    let (_proxy, addr, count) = proxy_to_echo().await;
    let cases: &[(&str, &[u8], u16, &str)] = &[
        (
            "space in host",
            b"GET / HTTP/1.1\r\nhost: ex ample.com\r\n\r\n",
            400,
            "invalid-host",
        ),
        (
            "userinfo in host",
            b"GET / HTTP/1.1\r\nhost: a@b\r\n\r\n",
            400,
            "invalid-host",
        ),
        (
            "slash in host",
            b"GET / HTTP/1.1\r\nhost: a/x\r\n\r\n",
            400,
            "invalid-host",
        ),
        (
            "empty host",
            b"GET / HTTP/1.1\r\nhost: \r\n\r\n",
            400,
            "invalid-host",
        ),
        (
            "host list",
            b"GET / HTTP/1.1\r\nhost: a, b\r\n\r\n",
            400,
            "invalid-host",
        ),
        (
            "non-numeric port",
            b"GET / HTTP/1.1\r\nhost: a:xy\r\n\r\n",
            400,
            "invalid-host",
        ),
        (
            "two host lines",
            b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
            400,
            "duplicate-host",
        ),
        (
            "host disagrees with an absolute-form target",
            b"GET http://a/x HTTP/1.1\r\nhost: b\r\n\r\n",
            400,
            "host-mismatch",
        ),
        (
            "a coding before chunked",
            b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            501,
            "unsupported-transfer-encoding",
        ),
        (
            "content-length of 2^63",
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 9223372036854775808\r\n\r\nabc",
            400,
            "invalid-content-length",
        ),
        (
            "connect",
            b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n",
            405,
            "connect-not-allowed",
        ),
    ];
    for (what, request, status, reason) in cases {
        let (response, closed) = exchange(addr, request).await;
        assert_eq!(status_of(&response), *status, "{what}: {response:?}");
        assert_eq!(
            header_of(&response, "x-trellis-error"),
            Some(*reason),
            "{what}: {response:?}"
        );
        assert!(closed, "{what}: the connection is closed after a refusal");
        if *status == 405 {
            assert!(
                header_of(&response, "allow").is_some(),
                "{what}: {response:?}"
            );
        }
    }
    assert_eq!(
        count.load(Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );

    // A lone `chunked` and a matching absolute-form target still go through.
    let (response, _) = exchange(
        addr,
        b"POST http://a/x HTTP/1.1\r\nhost: A:80\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&response), 200, "{response:?}");
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn options_asterisk_is_answered_by_the_proxy() {
    let (_proxy, addr, count) = proxy_to_echo().await;
    let (response, closed) = exchange(
        addr,
        b"OPTIONS * HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(closed);
    assert_eq!(status_of(&response), 200, "{response:?}");
    let allow = header_of(&response, "allow").expect("an Allow header");
    assert!(allow.contains("GET"), "{allow}");
    assert_eq!(count.load(Ordering::SeqCst), 0, "not routed upstream");
}

#[tokio::test]
async fn an_upstreams_error_header_is_not_relayed_as_the_proxys() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    let resp = Response::builder()
                        .status(503)
                        .header("x-trellis-error", "no-endpoint")
                        .body(Full::new(Bytes::from_static(b"down")))
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let yaml = config(
        "          - { name: all, forward: { cluster: up } }",
        &format!("  - {{ name: up, endpoints: [\"{up}\"] }}"),
    );
    let (_proxy, addr) = start_proxy(&yaml).await;
    let (response, _) = exchange(
        addr,
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&response), 503, "{response:?}");
    assert_eq!(
        header_of(&response, "x-trellis-error"),
        None,
        "{response:?}"
    );
    assert_eq!(
        header_of(&response, "x-trellis-upstream-error"),
        Some("no-endpoint"),
        "{response:?}"
    );
}

#[tokio::test]
async fn a_partial_pipelined_head_is_cut_at_the_header_read_timeout() {
    let (up, _) = echo_upstream("up").await;
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", header_read_timeout: 300ms }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - {{ name: all, forward: {{ cluster: up }} }}
clusters:
  - {{ name: up, endpoints: ["{up}"] }}
"#
    );
    let (_proxy, addr) = start_proxy(&yaml).await;
    let cases: &[(&str, &[u8])] = &[
        (
            "after a GET",
            b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\nx-slow: ",
        ),
        (
            "after a POST with a body",
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\n\r\nGET GET / HTTP/1.1\r\nho",
        ),
        (
            "after a chunked POST",
            b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n4\r\nGET \r\n0\r\n\r\nGET /",
        ),
    ];
    for (what, bytes) in cases {
        let started = std::time::Instant::now();
        let (response, closed) = exchange(addr, bytes).await;
        assert!(closed, "{what}: the partial head is still held after 5 s");
        assert_eq!(status_of(&response), 200, "{what}: {response:?}");
        assert_eq!(
            response.matches("HTTP/1.1 ").count(),
            1,
            "{what}: one response only: {response:?}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{what}: closed after {:?}, before the header read timeout",
            started.elapsed()
        );
    }
}
