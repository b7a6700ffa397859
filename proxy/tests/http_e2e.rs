//! End to end through a real proxy to real upstreams on 127.0.0.1: HTTP/1.1, h2c, header edits,
//! rewrites, redirects, weighted splits and the error mapping.

mod common;

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::Full;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

fn cluster(name: &str, protocol: &str, endpoints: &[std::net::SocketAddr]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "  - {{ name: {name}, protocol: {protocol}, connect_timeout: 1s, endpoints: [{}] }}\n",
        eps.join(", ")
    )
}

const FORWARD_ALL: &str = "          - { name: all, forward: { cluster: up } }";

#[tokio::test]
async fn http1_forwarding_sets_forwarding_headers_and_strips_hop_by_hop() {
    let (up, _) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &cluster("up", "http1", &[up]))).await;

    let req = Request::get(format!("http://{addr}/hello?x=1"))
        .header("host", "svc.example.com")
        .header("connection", "x-hop")
        .header("x-hop", "must-go")
        .header("proxy-connection", "keep-alive")
        .header("x-forwarded-for", "10.1.2.3")
        .body(Full::default())
        .unwrap();
    let (resp, body) = send(&h1_client(), req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(resp.headers()["x-upstream"], "up");
    let seen = seen(&body);
    assert_eq!(seen.uri, "/hello?x=1");
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.header("host"), Some("svc.example.com"));
    assert_eq!(seen.header("x-forwarded-for"), Some("10.1.2.3, 127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-hop"), None);
    assert_eq!(seen.header("proxy-connection"), None);
    let id = seen.header("x-request-id").expect("x-request-id generated");
    assert_eq!(id.len(), 36);

    // An incoming request id is kept.
    let req = Request::get(format!("http://{addr}/"))
        .header("x-request-id", "abc-123")
        .body(Full::default())
        .unwrap();
    let (_, body) = send(&h1_client(), req).await;
    assert_eq!(common::seen(&body).header("x-request-id"), Some("abc-123"));
}

#[tokio::test]
async fn h2c_downstream_and_h2_upstream_in_all_combinations() {
    let (up, _) = echo_upstream("up").await;
    for upstream_protocol in ["http1", "http2"] {
        let (_proxy, addr) = start_proxy(&config(
            FORWARD_ALL,
            &cluster("up", upstream_protocol, &[up]),
        ))
        .await;
        for (client, want_version) in [
            (h1_client(), Version::HTTP_11),
            (h2_client(), Version::HTTP_2),
        ] {
            let req = Request::post(format!("http://{addr}/p?q=1"))
                .header("host", "api.test")
                .body(Full::new(Bytes::from_static(b"payload")))
                .unwrap();
            let (resp, body) = send(&client, req).await;
            assert_eq!(resp.status(), StatusCode::OK, "{upstream_protocol}");
            assert_eq!(resp.version(), want_version);
            let seen = seen(&body);
            assert_eq!(seen.body, "payload");
            assert_eq!(seen.method, "POST");
            let want_upstream = if upstream_protocol == "http2" {
                "HTTP/2.0"
            } else {
                "HTTP/1.1"
            };
            assert_eq!(seen.version, want_upstream);
            // Over h2 the client's `:authority` (the address it dialled) is the host, and wins
            // over a `Host` header (RFC 9113 §8.3.1).
            let want_host = if want_version == Version::HTTP_2 {
                addr.to_string()
            } else {
                "api.test".to_owned()
            };
            if upstream_protocol == "http2" {
                assert_eq!(seen.uri, format!("http://{want_host}/p?q=1"));
            } else {
                assert_eq!(seen.uri, "/p?q=1");
                assert_eq!(seen.header("host"), Some(want_host.as_str()));
            }
        }
    }
}

#[tokio::test]
async fn header_edits_apply_to_requests_and_responses() {
    let (up, _) = echo_upstream("up").await;
    let routes = r#"          - name: edits
            forward: { cluster: up }
            filters:
              request_headers:
                add: [{ name: x-added, value: a1 }, { name: x-multi, value: second }]
                set: [{ name: x-set, value: fixed }]
                remove: [x-drop]
              response_headers:
                add: [{ name: x-resp-added, value: r1 }]
                set: [{ name: x-upstream, value: overridden }]
                remove: [x-upstream-secret]"#;
    let (_proxy, addr) = start_proxy(&config(routes, &cluster("up", "http1", &[up]))).await;
    let req = Request::get(format!("http://{addr}/"))
        .header("x-set", "client")
        .header("x-drop", "gone")
        .header("x-multi", "first")
        .body(Full::default())
        .unwrap();
    let (resp, body) = send(&h1_client(), req).await;
    let seen = seen(&body);
    assert_eq!(seen.header("x-added"), Some("a1"));
    assert_eq!(seen.header("x-set"), Some("fixed"));
    assert_eq!(seen.header("x-drop"), None);
    assert_eq!(seen.header_all("x-multi"), vec!["first", "second"]);
    assert_eq!(resp.headers()["x-resp-added"], "r1");
    assert_eq!(resp.headers()["x-upstream"], "overridden");
    assert!(resp.headers().get("x-upstream-secret").is_none());
}

#[tokio::test]
async fn rewrites_replace_prefix_full_path_and_host() {
    let (up, _) = echo_upstream("up").await;
    let routes = r#"          - name: prefix
            match: { path: { prefix: /api/v1 } }
            forward: { cluster: up }
            filters: { rewrite: { prefix: /v1, host: backend.internal } }
          - name: strip
            match: { path: { prefix: /strip } }
            forward: { cluster: up }
            filters: { rewrite: { prefix: / } }
          - name: full
            match: { path: { exact: /old } }
            forward: { cluster: up }
            filters: { rewrite: { path: /new/place } }"#;
    let (_proxy, addr) = start_proxy(&config(routes, &cluster("up", "http1", &[up]))).await;
    let client = h1_client();
    let cases = [
        ("/api/v1/users?id=7", "/v1/users?id=7", "backend.internal"),
        ("/api/v1", "/v1", "backend.internal"),
        ("/strip/a/b", "/a/b", "orig.test"),
        ("/strip", "/", "orig.test"),
        ("/old?k=v", "/new/place?k=v", "orig.test"),
    ];
    for (path, want_uri, want_host) in cases {
        let req = Request::get(format!("http://{addr}{path}"))
            .header("host", "orig.test")
            .body(Full::default())
            .unwrap();
        let (_, body) = send(&client, req).await;
        let seen = seen(&body);
        assert_eq!(seen.uri, want_uri, "{path}");
        assert_eq!(seen.header("host"), Some(want_host), "{path}");
    }
}

#[tokio::test]
async fn redirects_build_location_from_config_and_request() {
    let routes = r#"          - name: to-https
            match: { path: { prefix: /secure } }
            redirect: { scheme: https, status: 301 }
          - name: moved
            match: { path: { prefix: /old } }
            redirect: { prefix: /new, status: 308 }
          - name: elsewhere
            match: { path: { exact: /away } }
            redirect: { host: other.test, port: 8443, path: /landing, status: 307 }
          - name: found
            match: { path: { exact: /found } }
            redirect: { path: /there }
          - name: see-other
            match: { path: { exact: /form } }
            redirect: { path: /done, status: 303 }"#;
    let (_proxy, addr) = start_proxy(&config(routes, "  []")).await;
    let client = h1_client();
    // Without scheme or port the Location names the listener's port, not the Host header's
    // 8080 (Gateway API).
    let here = format!("http://site.test:{}", addr.port());
    let cases = [
        (
            "/secure/x?a=1",
            301,
            "https://site.test/secure/x?a=1".to_owned(),
        ),
        ("/old/page", 308, format!("{here}/new/page")),
        ("/old", 308, format!("{here}/new")),
        ("/away", 307, "http://other.test:8443/landing".to_owned()),
        ("/found", 302, format!("{here}/there")),
        ("/form", 303, format!("{here}/done")),
    ];
    for (path, status, location) in cases {
        let req = Request::get(format!("http://{addr}{path}"))
            .header("host", "site.test:8080")
            .body(Full::default())
            .unwrap();
        let (resp, _) = send(&client, req).await;
        assert_eq!(resp.status().as_u16(), status, "{path}");
        assert_eq!(resp.headers()["location"], location.as_str(), "{path}");
    }
}

#[tokio::test]
async fn direct_responses_answer_without_an_upstream() {
    let routes = r#"          - name: hello
            match: { path: { exact: /hello } }
            direct_response: { status: 200, body: "hi there\n" }
            filters: { response_headers: { set: [{ name: content-type, value: text/plain }] } }
          - name: teapot
            match: { path: { exact: /teapot } }
            direct_response: { status: 418 }"#;
    let (_proxy, addr) = start_proxy(&config(routes, "  []")).await;
    for client in [h1_client(), h2_client()] {
        let (resp, body) = get(&client, &format!("http://{addr}/hello")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/plain");
        assert_eq!(&body[..], b"hi there\n");
        let (resp, body) = get(&client, &format!("http://{addr}/teapot")).await;
        assert_eq!(resp.status().as_u16(), 418);
        assert!(body.is_empty());
    }
}

#[tokio::test]
async fn weighted_split_follows_weights() {
    let (a, _) = echo_upstream("a").await;
    let (b, _) = echo_upstream("b").await;
    let routes = "          - name: split
            forward: { clusters: [{ name: a, weight: 80 }, { name: b, weight: 20 }] }";
    let clusters = cluster("a", "http1", &[a]) + &cluster("b", "http1", &[b]);
    let (_proxy, addr) = start_proxy(&config(routes, &clusters)).await;
    let client = h1_client();
    let mut counts: HashMap<String, usize> = HashMap::new();
    const N: usize = 2000;
    for _ in 0..N {
        let (resp, _) = get(&client, &format!("http://{addr}/")).await;
        let who = resp.headers()["x-upstream"].to_str().unwrap().to_owned();
        *counts.entry(who).or_default() += 1;
    }
    // Binomial(2000, 0.2): sd ≈ 18; ±90 (5 sd) keeps this from flaking.
    let b_share = counts.get("b").copied().unwrap_or(0);
    assert!(
        (310..=490).contains(&b_share),
        "b got {b_share} of {N}: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), N);
}

#[tokio::test]
async fn round_robin_spreads_over_endpoints_by_weight() {
    let (a, ca) = echo_upstream("a").await;
    let (b, cb) = echo_upstream("b").await;
    let clusters = format!(
        "  - {{ name: up, lb: {{ policy: round_robin }}, endpoints: [{{ address: \"{a}\", weight: 3 }}, \"{b}\"] }}\n"
    );
    let (_proxy, addr) = start_proxy(&config(FORWARD_ALL, &clusters)).await;
    let client = h1_client();
    for _ in 0..400 {
        get(&client, &format!("http://{addr}/")).await;
    }
    assert_eq!(ca.load(std::sync::atomic::Ordering::SeqCst), 300);
    assert_eq!(cb.load(std::sync::atomic::Ordering::SeqCst), 100);
}

#[tokio::test]
async fn errors_map_to_status_and_reason() {
    let (up, _) = echo_upstream("up").await;
    // A port with nothing listening: bind, note the address, close.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    // An upstream that reads the request and closes without answering.
    let resetter = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reset_addr = resetter.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = resetter.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    // An upstream that answers with garbage.
    let garbage = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_addr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = garbage.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"NOT HTTP AT ALL\r\n\r\n").await;
        }
    });
    let routes = r#"          - { name: empty, match: { path: { prefix: /empty } }, forward: { cluster: empty } }
          - { name: closed, match: { path: { prefix: /closed } }, forward: { cluster: closed } }
          - { name: reset, match: { path: { prefix: /reset } }, forward: { cluster: reset } }
          - { name: garbage, match: { path: { prefix: /garbage } }, forward: { cluster: garbage } }
          - { name: slow, match: { path: { prefix: /slow } }, forward: { cluster: up }, timeout: 200ms }
          - { name: up, match: { path: { prefix: /up } }, forward: { cluster: up } }"#;
    let clusters = String::from("  - { name: empty, endpoints: [] }\n")
        + &cluster("closed", "http1", &[closed])
        + &cluster("reset", "http1", &[reset_addr])
        + &cluster("garbage", "http1", &[garbage_addr])
        + &cluster("up", "http1", &[up]);
    let (_proxy, addr) = start_proxy(&config(routes, &clusters)).await;
    let client = h1_client();
    let cases = [
        ("/nowhere", 404, "no-route"),
        ("/empty", 503, "no-endpoint"),
        ("/closed", 503, "connect-failure"),
        ("/reset", 502, "upstream-reset"),
        ("/garbage", 502, "upstream-protocol-error"),
        ("/slow/2000", 504, "upstream-timeout"),
    ];
    for (path, status, reason) in cases {
        let (resp, _) = get(&client, &format!("http://{addr}{path}")).await;
        assert_eq!(resp.status().as_u16(), status, "{path}");
        assert_eq!(resp.headers()["x-trellis-error"], reason, "{path}");
    }
    // An upstream's own error passes through untouched, without the proxy's reason header.
    let (resp, _) = get(&client, &format!("http://{addr}/up/status/503")).await;
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().get("x-trellis-error").is_none());
    // A fast request on the slow route is not cut.
    let (resp, _) = get(&client, &format!("http://{addr}/slow/10")).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let routes = "          - { name: d, direct_response: { status: 200, body: ok } }";
    let (_proxy, addr) = start_proxy(&config(routes, "  []")).await;
    // HTTP/1.1 without Host.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let text = read_head(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("x-trellis-error: bad-request"), "{text}");
    // Not HTTP at all.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"\x01\x02garbage\r\n\r\n").await.unwrap();
    let text = read_head(&mut s).await;
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    // HTTP/1.0 without Host is fine.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let text = read_head(&mut s).await;
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
}

async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn pooled_connections_are_reused() {
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Count upstream connections with a listener in front of the echo server.
    let (up, _) = echo_upstream("up").await;
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut down, _)) = front.accept().await {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut upc = TcpStream::connect(up).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut down, &mut upc).await;
            });
        }
    });
    let (_proxy, addr) =
        start_proxy(&config(FORWARD_ALL, &cluster("up", "http1", &[front_addr]))).await;
    let client = h1_client();
    for _ in 0..50 {
        let (resp, _) = get(&client, &format!("http://{addr}/")).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}
