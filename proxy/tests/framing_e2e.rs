//! End to end: message framing survives the proxy in both directions. A GET body is forwarded,
//! the HTTP parser's own refusals say who refused, HEAD over HTTP/2 carries no DATA, and an
//! upstream response with broken framing is never relayed as a clean one.

mod common;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const FORWARD_ALL: &str = "          - { name: all, forward: { cluster: up } }";

fn cluster(endpoint: SocketAddr) -> String {
    format!("  - {{ name: up, connect_timeout: 1s, endpoints: [\"{endpoint}\"] }}\n")
}

/// Sends raw bytes on a fresh connection and reads until the proxy closes it (at most 10 s).
/// Returns what was read and whether the connection was closed in time.
async fn exchange(addr: SocketAddr, request: &[u8]) -> (Vec<u8>, bool) {
    raw_exchange(addr, request, Duration::from_secs(10)).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The value of header `name` in the first raw response head of `response`.
fn header_of<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The body of a raw HTTP/1.1 response with a Content-Length.
fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

async fn proxy_to_echo() -> (std::sync::Arc<trellis_proxy::Proxy>, SocketAddr) {
    let (up, _) = echo_upstream("up").await;
    start_proxy(&config(FORWARD_ALL, &cluster(up))).await
}

#[tokio::test]
async fn a_get_body_is_forwarded_whatever_its_framing() {
    let (_proxy, addr) = proxy_to_echo().await;
    let cases: &[(&str, &[u8])] = &[
        (
            "chunked GET",
            b"GET /g HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "GET with a length",
            b"GET /g HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
        ),
        (
            "chunked HEAD",
            b"HEAD /g HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\n",
        ),
    ];
    for (what, request) in cases {
        let (got, _) = exchange(addr, request).await;
        let got = text(&got);
        assert_eq!(status_of(&got), 200, "{what}: {got}");
        if request.starts_with(b"HEAD") {
            // No body comes back for HEAD; the upstream's length for the GET does.
            assert!(body_of(&got).is_empty(), "{what}: {got}");
            continue;
        }
        let seen = seen(&Bytes::from(body_of(&got).to_owned()));
        assert_eq!(seen.body, "hello", "{what}: the upstream got {seen:?}");
    }
}

#[tokio::test]
async fn the_parsers_own_refusals_carry_the_reason() {
    let (_proxy, addr) = proxy_to_echo().await;
    let long_uri = format!("GET /{} HTTP/1.1\r\nhost: a\r\n\r\n", "a".repeat(70_000));
    let many_headers = format!(
        "GET / HTTP/1.1\r\nhost: a\r\n{}\r\n",
        (0..200)
            .map(|i| format!("x-h{i}: v\r\n"))
            .collect::<String>()
    );
    let huge_head = format!(
        "GET / HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "b".repeat(600_000)
    );
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("bad request line", b"GET\r\n\r\n".to_vec(), 400),
        (
            "bad method",
            b"G@T / HTTP/1.1\r\nhost: a\r\n\r\n".to_vec(),
            400,
        ),
        (
            "bad version",
            b"GET / HTTP/9.9\r\nhost: a\r\n\r\n".to_vec(),
            400,
        ),
        (
            "header without colon",
            b"GET / HTTP/1.1\r\nhost: a\r\nbroken\r\n\r\n".to_vec(),
            400,
        ),
        (
            "bad content-length",
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1x\r\n\r\n".to_vec(),
            400,
        ),
        ("too many headers", many_headers.into_bytes(), 431),
        ("oversized head", huge_head.into_bytes(), 431),
        ("too long a target", long_uri.into_bytes(), 414),
    ];
    for (what, request, status) in cases {
        let (got, closed) = exchange(addr, &request).await;
        let got = text(&got);
        assert_eq!(status_of(&got), status, "{what}: {got}");
        let reason = header_of(&got, "x-trellis-error");
        assert!(
            reason.is_some_and(|r| !r.is_empty()),
            "{what}: no reason in {got}"
        );
        assert!(closed, "{what}: the connection stays open");
    }
    // A normal exchange after them is untouched.
    let (got, _) = exchange(
        addr,
        b"GET /ok HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    let got = text(&got);
    assert_eq!(status_of(&got), 200, "{got}");
    assert_eq!(header_of(&got, "x-trellis-error"), None);
}

#[tokio::test]
async fn an_empty_400_of_a_route_is_not_taken_for_the_parsers() {
    let routes = "          - { name: d, direct_response: { status: 400 } }";
    let (_proxy, addr) = start_proxy(&config(routes, "  []")).await;
    // Pipelined, so that the second head is already read when the first answer is written.
    let (got, _) = exchange(
        addr,
        b"GET /a HTTP/1.1\r\nhost: a\r\n\r\nGET /b HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    let got = text(&got);
    assert_eq!(got.matches("HTTP/1.1 400 Bad Request").count(), 2, "{got}");
    assert!(!got.contains("x-trellis-error"), "{got}");
}

/// One HTTP/2 request by the `h2` crate; returns the response head, whether the HEADERS frame
/// ended the stream, and the DATA received.
async fn h2_request(
    addr: SocketAddr,
    method: Method,
    path: &str,
) -> (http::response::Parts, bool, Bytes) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("a response within 10s")
        .expect("a response, not a stream error");
    let (parts, mut body) = resp.into_parts();
    let ended_with_headers = body.is_end_stream();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("DATA, not a stream error");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    (parts, ended_with_headers, Bytes::from(data))
}

#[tokio::test]
async fn head_over_http2_carries_no_data_but_the_length_of_the_get() {
    let routes = [
        "          - { name: direct, match: { path: { prefix: /direct } }, \
         direct_response: { status: 200, body: hello-direct } }",
        "          - { name: gone, match: { path: { prefix: /gone } }, forward: { cluster: dead } }",
    ]
    .join("\n");
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let clusters = format!("  - {{ name: dead, connect_timeout: 1s, endpoints: [\"{dead}\"] }}\n");
    let (_proxy, addr) = start_proxy(&config(&routes, &clusters)).await;

    for path in ["/direct", "/gone", "/nowhere"] {
        let (get, _, get_body) = h2_request(addr, Method::GET, path).await;
        assert!(!get_body.is_empty(), "{path}: GET has a body");
        let (head, ended, head_body) = h2_request(addr, Method::HEAD, path).await;
        assert_eq!(head.status, get.status, "{path}");
        assert!(ended, "{path}: HEAD's HEADERS frame must end the stream");
        assert!(head_body.is_empty(), "{path}: HEAD got DATA {head_body:?}");
        assert_eq!(
            head.headers
                .get("content-length")
                .map(|v| v.to_str().unwrap()),
            Some(get_body.len().to_string().as_str()),
            "{path}: HEAD carries the GET's length"
        );
    }
    // The 503 and 404 are the proxy's own.
    let (gone, _, _) = h2_request(addr, Method::HEAD, "/gone").await;
    assert_eq!(gone.status, StatusCode::SERVICE_UNAVAILABLE);
}

/// An upstream that answers every connection's first request with `response`, then closes.
async fn scripted_upstream(response: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(response).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Whether a raw HTTP/1.1 response relayed by the proxy is complete by its own framing.
fn complete_by_framing(response: &str) -> bool {
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        return false;
    };
    let chunked = header_of(head, "transfer-encoding").is_some();
    let length = header_of(head, "content-length").and_then(|v| v.parse::<usize>().ok());
    match (chunked, length) {
        (true, Some(_)) => false,
        (true, None) => body.ends_with("0\r\n\r\n"),
        (false, Some(n)) => body.len() == n,
        (false, None) => false,
    }
}

#[tokio::test]
async fn broken_upstream_framing_is_never_relayed_as_clean() {
    let cases: [(&str, &'static [u8]); 2] = [
        (
            "both length and chunked",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "body shorter than its length",
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b",
        ),
    ];
    for (what, response) in cases {
        let up = scripted_upstream(response).await;
        let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster(up))).await;
        let (got, closed) = exchange(
            addr,
            b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .await;
        let got = text(&got);
        assert!(closed, "{what}: the connection is not closed");
        let status = status_of(&got);
        assert!(
            status == 502 || (status == 200 && !complete_by_framing(&got)),
            "{what}: relayed as a clean response: {got:?}"
        );
        let chunked = header_of(&got, "transfer-encoding").is_some();
        let length = header_of(&got, "content-length").is_some();
        assert!(!(chunked && length), "{what}: contradictory framing: {got}");
    }
}

#[tokio::test]
async fn a_body_shorter_than_its_length_resets_the_http2_stream() {
    let up = scripted_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b").await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster(up))).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::get(format!("http://{addr}/")).body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let read = async {
        let mut body = resp.await.expect("the head is relayed").into_body();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            match chunk {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(e) => return (data, Some(e)),
            }
        }
        (data, None)
    };
    let (data, error) = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the stream ends within 10s");
    let error = error.unwrap_or_else(|| panic!("the stream ended cleanly after {data:?}"));
    assert!(error.is_reset(), "{error}");
}

#[tokio::test]
async fn a_body_cut_by_the_upstream_is_logged_and_counted_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let up = scripted_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b").await;
    let yaml = format!(
        r#"
listeners:
  - {{ name: cut, address: "127.0.0.1:0", access_log: "{log}" }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: vh
        domains: ["*"]
        routes:
          - {{ name: all, forward: {{ cluster: cut-up }} }}
clusters:
  - {{ name: cut-up, connect_timeout: 1s, endpoints: ["{up}"] }}
"#,
        log = log.display()
    );
    let (_proxy, addr) = start_named(&yaml, "cut").await;
    let errors = || {
        let samples = parse_exposition(&trellis_proxy::telemetry::render(None, false));
        metric(
            &samples,
            "trellis_upstream_errors_total",
            &[("cluster", "cut-up"), ("reason", "upstream-body-error")],
        )
        .unwrap_or(0.0)
    };
    let before = errors();
    let (got, closed) = exchange(
        addr,
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(closed);
    assert!(!complete_by_framing(&text(&got)), "{}", text(&got));

    eventually(Duration::from_secs(5), "an access log line", || async {
        std::fs::read_to_string(&log).is_ok_and(|l| !l.is_empty())
    })
    .await;
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line["error"], "upstream-body-error", "{line}");
    assert_eq!(errors() - before, 1.0);
}

/// An HTTP/1.1 + h2c upstream that answers with the request trailers it received, one
/// `name=value` line each.
async fn trailer_upstream() -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async {
                    let collected = req.into_body().collect().await;
                    let lines = collected
                        .ok()
                        .and_then(|c| c.trailers().cloned())
                        .map(|t| {
                            t.iter()
                                .map(|(k, v)| format!("{k}={}\n", v.to_str().unwrap_or("?")))
                                .collect::<String>()
                        })
                        .unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        lines,
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn request_trailers_pass_the_routes_header_filters() {
    let up = trailer_upstream().await;
    let routes = r#"          - name: edits
            forward: { cluster: up }
            filters:
              request_headers:
                set: [{ name: x-set, value: fixed }]
                remove: [x-secret]"#;
    for protocol in ["http1", "http2"] {
        let clusters = format!("  - {{ name: up, protocol: {protocol}, endpoints: [\"{up}\"] }}\n");
        let (_proxy, addr) = start_proxy(&config(routes, &clusters)).await;
        let (got, _) = exchange(
            addr,
            b"POST /t HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\
              trailer: x-secret, x-set, x-ok\r\nconnection: close\r\n\r\n\
              5\r\nhello\r\n0\r\nx-secret: s\r\nx-set: client\r\nx-ok: 1\r\n\r\n",
        )
        .await;
        let got = text(&got);
        assert_eq!(status_of(&got), 200, "{protocol}: {got}");
        let body = body_of(&got);
        assert!(
            !body.contains("x-secret"),
            "{protocol}: a removed header came back: {body}"
        );
        assert!(
            !body.contains("x-set=client"),
            "{protocol}: a set header was overridden: {body}"
        );
        assert!(
            body.contains("x-ok=1"),
            "{protocol}: other trailers go through: {body}"
        );
    }
}

#[tokio::test]
async fn early_hints_from_the_upstream_reach_an_http1_client() {
    let up = scripted_upstream(
        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
          HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster(up))).await;
    let (got, _) = exchange(
        addr,
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    let got = text(&got);
    let (hints, last) = got
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head: {got}"));
    assert!(hints.starts_with("HTTP/1.1 103 Early Hints\r\n"), "{got}");
    assert_eq!(header_of(hints, "link"), Some("</style.css>; rel=preload"));
    assert!(last.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(last.ends_with("\r\n\r\nok"), "{got}");

    // Pipelined requests each get their hints ahead of their own answer.
    let (got, _) = exchange(
        addr,
        b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\nGET /2 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    let got = text(&got);
    let heads: Vec<&str> = got
        .split("\r\n\r\n")
        .filter_map(|part| {
            part.rsplit("HTTP/1.1 ")
                .next()
                .filter(|_| part.contains("HTTP/1.1 "))
        })
        .map(|line| &line[..3])
        .collect();
    assert_eq!(heads, ["103", "200", "103", "200"], "{got}");

    // HTTP/1.0 clients get no 1xx (RFC 9110 §15.2).
    let (got, _) = exchange(addr, b"GET / HTTP/1.0\r\nhost: a\r\n\r\n").await;
    let got = text(&got);
    assert!(got.starts_with("HTTP/1.0 200 OK\r\n"), "{got}");

    // An HTTP/2 client gets the final answer intact (its 103: tests/h2_informational_e2e.rs).
    let (resp, _, body) = h2_request(addr, Method::GET, "/").await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(body, "ok");
}
