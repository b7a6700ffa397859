//! End to end: HTTP/2 clients get 1xx responses. An upstream's `103 Early Hints` reaches an
//! HTTP/2 client ahead of the final response, `expect: 100-continue` gets its `100` as soon as
//! the request is forwarded, and neither disturbs the connection's header compression.

mod common;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const FORWARD_ALL: &str = "          - { name: all, forward: { cluster: up } }";

fn cluster(endpoint: SocketAddr) -> String {
    format!("  - {{ name: up, connect_timeout: 1s, endpoints: [\"{endpoint}\"] }}\n")
}

/// A keep-alive HTTP/1.1 upstream that answers each request with `103 Early Hints` naming the
/// request's path in its `link`, then `200` whose body is the path. Its response headers vary
/// by path, so that the proxy's HPACK encoder keeps adding to its dynamic table.
async fn hints_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = read_head(&mut stream, &mut buf).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < length {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..length);
                    let answer = format!(
                        "HTTP/1.1 103 Early Hints\r\nlink: <{path}.css>; rel=preload\r\n\r\n\
                         HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-path: {path}\r\n\r\n{path}",
                        path.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads until `buf` holds a complete head; returns its length with the blank line.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn h2_connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            panic!("the client's connection failed: {e}");
        }
    });
    client.ready().await.unwrap()
}

/// The 1xx responses of a stream, up to its final response (at most 10 s).
async fn interim(resp: &mut h2::client::ResponseFuture) -> Vec<Response<()>> {
    let mut got = Vec::new();
    let collect = async {
        while let Some(r) = std::future::poll_fn(|cx| resp.poll_informational(cx)).await {
            got.push(r.expect("a 1xx, not a stream error"));
        }
    };
    tokio::time::timeout(Duration::from_secs(10), collect)
        .await
        .expect("the final response within 10 s");
    got
}

/// The final response and its whole body.
async fn finish(resp: h2::client::ResponseFuture) -> (http::response::Parts, Bytes) {
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("a response within 10 s")
        .expect("a response, not a stream error");
    let (parts, mut body) = resp.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("DATA, not a stream error");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    (parts, Bytes::from(data))
}

fn get(path: &str) -> Request<()> {
    Request::get(format!("http://test{path}")).body(()).unwrap()
}

fn link(resp: &Response<()>) -> Option<&str> {
    resp.headers().get("link").and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn early_hints_reach_an_http2_client_before_the_response() {
    let up = hints_upstream().await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster(up))).await;
    let mut client = h2_connect(addr).await;
    let (mut resp, _) = client.send_request(get("/page"), true).unwrap();
    let hints = interim(&mut resp).await;
    assert_eq!(hints.len(), 1, "one 103 before the response: {hints:?}");
    assert_eq!(hints[0].status(), StatusCode::EARLY_HINTS);
    assert_eq!(link(&hints[0]), Some("</page.css>; rel=preload"));
    let (parts, body) = finish(resp).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "/page");
}

#[tokio::test]
async fn early_hints_on_many_streams_of_one_connection_all_decode() {
    let up = hints_upstream().await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster(up))).await;
    let mut client = h2_connect(addr).await;
    // Rounds of concurrent streams, then more on the same connection: the final heads go
    // through hyper's encoder and its dynamic table between the hints, so a hint that touched
    // the table would make later heads decode wrong (or fail).
    for round in 0..4 {
        let mut streams = Vec::new();
        for i in 0..8 {
            let path = format!("/r{round}/s{i}");
            client = client.ready().await.expect("connection open");
            let (resp, _) = client.send_request(get(&path), true).unwrap();
            streams.push((path, resp));
        }
        for (path, mut resp) in streams {
            let hints = interim(&mut resp).await;
            assert_eq!(hints.len(), 1, "{path}: {hints:?}");
            assert_eq!(hints[0].status(), StatusCode::EARLY_HINTS, "{path}");
            let want = format!("<{path}.css>; rel=preload");
            assert_eq!(link(&hints[0]), Some(want.as_str()), "{path}");
            let (parts, body) = finish(resp).await;
            assert_eq!(parts.status, StatusCode::OK, "{path}");
            assert_eq!(
                parts.headers.get("x-path").and_then(|v| v.to_str().ok()),
                Some(path.as_str()),
                "{path}: the final head decodes to its own headers"
            );
            assert_eq!(body, path);
        }
    }
}

#[tokio::test]
async fn expect_100_continue_over_http2_gets_its_100_before_the_body_is_sent() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster(up))).await;
    let mut client = h2_connect(addr).await;
    // The field that tells the proxy a request's stream is its own: a client's copy is no help.
    let req = Request::post("http://test/upload")
        .header("expect", "100-continue")
        .header("content-length", "5")
        .header("x-trellis-h2-stream", "99")
        .body(())
        .unwrap();
    let (mut resp, mut body) = client.send_request(req, false).unwrap();
    // A client waits a while (curl: 1 s by default) before sending the body anyway; this one
    // never does, so only a 100 moves the exchange on.
    let first = tokio::time::timeout(
        Duration::from_secs(5),
        std::future::poll_fn(|cx| resp.poll_informational(cx)),
    )
    .await
    .expect("a 100 within 5 s, without the body")
    .expect("a 1xx before any final response")
    .expect("a 1xx, not a stream error");
    assert_eq!(first.status(), StatusCode::CONTINUE);
    body.send_data(Bytes::from_static(b"hello"), true).unwrap();
    assert!(interim(&mut resp).await.is_empty(), "one 100 only");
    let (parts, got) = finish(resp).await;
    assert_eq!(parts.status, StatusCode::OK);
    let seen = seen(&got);
    assert_eq!(seen.body, "hello");
    assert_eq!(seen.header("x-trellis-h2-stream"), None);
    assert_eq!(seen.header("expect"), Some("100-continue"));
}

#[tokio::test]
async fn no_100_without_expect_without_body_or_for_a_local_answer() {
    let (up, _) = echo_upstream("up").await;
    let routes = "          - { name: deny, match: { path: { prefix: /denied } }, \
                  direct_response: { status: 403, body: no } }\n\
                  \x20         - { name: all, forward: { cluster: up } }";
    let (_proxy, addr) = start_proxy(&config(routes, &cluster(up))).await;
    let mut client = h2_connect(addr).await;

    // A body without the expectation.
    let req = Request::post("http://test/plain").body(()).unwrap();
    let (mut resp, mut body) = client.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"data"), true).unwrap();
    assert!(interim(&mut resp).await.is_empty());
    let (parts, got) = finish(resp).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(seen(&got).body, "data");

    // The expectation without a body (HEAD, and a POST ended with its head).
    for method in [Method::HEAD, Method::POST] {
        client = client.ready().await.unwrap();
        let req = Request::builder()
            .method(method.clone())
            .uri("http://test/nobody")
            .header("expect", "100-continue")
            .body(())
            .unwrap();
        let (mut resp, _) = client.send_request(req, true).unwrap();
        assert!(interim(&mut resp).await.is_empty(), "{method}");
        let (parts, _) = finish(resp).await;
        assert_eq!(parts.status, StatusCode::OK, "{method}");
    }

    // A request the proxy answers itself: its body is never read, so no 100 invites it.
    client = client.ready().await.unwrap();
    let req = Request::post("http://test/denied")
        .header("expect", "100-continue")
        .header("content-length", "5")
        .body(())
        .unwrap();
    let (mut resp, _body) = client.send_request(req, false).unwrap();
    assert!(interim(&mut resp).await.is_empty());
    let (parts, got) = finish(resp).await;
    assert_eq!(parts.status, StatusCode::FORBIDDEN);
    assert_eq!(got, "no");
}

/// Runs curl over HTTP/2 prior knowledge, verbose, bounded by its own `--max-time`.
async fn curl(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-v", "--http2-prior-knowledge", "--max-time", "15"])
            .args(&args)
            .output()
            .expect("curl runs")
    })
    .await
    .expect("curl's thread")
}

/// curl's HTTP/2 (nghttp2) checks header compression strictly, and is what people debug with.
/// (One URL per run: this curl fails to reuse a prior-knowledge connection on its own.)
#[tokio::test]
async fn curl_sees_early_hints_and_100_continue_over_http2() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: curl is not installed; the h2-client tests above cover the same");
        return;
    }
    let up = hints_upstream().await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster(up))).await;
    let out = curl(vec![format!("http://{addr}/c0")]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/c0", "{stderr}");
    let statuses: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("< HTTP/2 "))
        .map(str::trim)
        .collect();
    assert_eq!(statuses, ["103", "200"], "{stderr}");
    assert!(
        stderr.contains("< link: </c0.css>; rel=preload"),
        "{stderr}"
    );

    // Expect: 100-continue with a body: the 100 comes well before curl's own 10 s timer.
    let (echo, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster(echo))).await;
    let started = tokio::time::Instant::now();
    let out = curl(
        [
            "-H",
            "expect: 100-continue",
            "--expect100-timeout",
            "10",
            "--data-binary",
            "payload",
        ]
        .into_iter()
        .map(String::from)
        .chain([format!("http://{addr}/upload")])
        .collect(),
    )
    .await;
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl failed: {stderr}");
    assert!(stderr.contains("< HTTP/2 100"), "{stderr}");
    assert!(
        elapsed < Duration::from_secs(5),
        "took {elapsed:?}: curl waited out its timer"
    );
    assert_eq!(
        seen(&Bytes::from(out.stdout)).body,
        "payload",
        "the upstream got the body"
    );
}
