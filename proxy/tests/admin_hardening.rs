//! The admin API's protections, with raw requests: loopback Host values only (DNS rebinding),
//! state-changing calls only with the non-simple `x-trellis-admin` header and never from a
//! cross-origin browser request, and header-edit values of sensitive names redacted in the dump.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use trellis_proxy::Proxy;

/// Sends one raw request (with `Connection: close`) and returns the status and the whole answer.
async fn raw(admin: SocketAddr, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("admin answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

fn get_with_host(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

fn post_drain(extra: &str) -> String {
    format!(
        "POST /drain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n{extra}Connection: close\r\n\r\n"
    )
}

#[tokio::test]
async fn only_loopback_host_values_are_served() {
    let proxy = Proxy::new();
    let (admin, _) = start_admin(&proxy).await;
    let port = admin.port();
    for host in [
        "127.0.0.1".to_string(),
        format!("127.0.0.1:{port}"),
        "localhost".into(),
        format!("LOCALHOST:{port}"),
        "[::1]".into(),
        format!("[::1]:{port}"),
    ] {
        let (status, text) = raw(admin, &get_with_host("/live", &host)).await;
        assert_eq!(status, 200, "Host {host}: {text}");
    }
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        "127.0.0.1.evil.example".into(),
        "localhost.evil.example".into(),
        // An IP literal that is not loopback; only the Host header names it, nothing is sent there.
        "0.0.0.0".into(),
        "::1".into(),
        "127.0.0.1:x".into(),
    ] {
        for path in ["/live", "/config_dump", "/metrics"] {
            let (status, text) = raw(admin, &get_with_host(path, &host)).await;
            assert_eq!(status, 421, "Host {host} on {path}: {text}");
            assert!(text.contains("loopback"), "a reason: {text}");
        }
    }
    // No Host at all (HTTP/1.0) is not a browser being rebound; nothing to check against.
    let (status, text) = raw(admin, "GET /live HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test]
async fn drain_needs_the_admin_header_and_refuses_browser_requests() {
    let proxy = Proxy::new();
    let (admin, lifecycle) = start_admin(&proxy).await;
    let refused = [
        // What a cross-origin page can send without a preflight: no custom header.
        post_drain(""),
        post_drain("x-trellis-admin: 0\r\n"),
        post_drain("x-trellis-admin: 1\r\nOrigin: http://evil.example\r\n"),
        post_drain("x-trellis-admin: 1\r\nOrigin: null\r\n"),
        post_drain("x-trellis-admin: 1\r\nSec-Fetch-Site: cross-site\r\n"),
        post_drain("x-trellis-admin: 1\r\nSec-Fetch-Site: same-site\r\n"),
        post_drain("x-trellis-admin: 1\r\nContent-Type: application/x-www-form-urlencoded\r\n"),
        post_drain("x-trellis-admin: 1\r\nContent-Type: multipart/form-data; boundary=x\r\n"),
        post_drain("x-trellis-admin: 1\r\nContent-Type: Text/Plain;charset=utf-8\r\n"),
    ];
    for req in &refused {
        let (status, text) = raw(admin, req).await;
        assert_eq!(status, 403, "{req:?}: {text}");
        assert!(
            text.contains("x-trellis-admin") || text.contains("browser"),
            "a reason: {text}"
        );
        assert!(!lifecycle.is_draining(), "refused request drained: {req:?}");
    }
    // Any other non-GET is held to the same rule before the method is even considered.
    let (status, _) = raw(
        admin,
        "PUT /ready HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 403);

    let (status, text) = raw(
        admin,
        &post_drain("x-trellis-admin: 1\r\nSec-Fetch-Site: same-origin\r\nContent-Type: application/json\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(lifecycle.is_draining());
}

#[tokio::test]
async fn config_dump_redacts_sensitive_header_edit_values() {
    let routes = r#"          - name: edits
            direct_response: { status: 200, body: hi }
            filters:
              request_headers:
                set:
                  - { name: authorization, value: Bearer s3cr3t-a }
                  - { name: x-api-key, value: s3cr3t-b }
                  - { name: x-visible, value: plain-value }
                add:
                  - { name: cookie, value: s3cr3t-c }
                  - { name: x-auth-token, value: s3cr3t-d }
                  - { name: x-client-secret, value: s3cr3t-e }
                  - { name: x-db-password, value: s3cr3t-f }
                  - { name: proxy-authorization, value: s3cr3t-g }
              response_headers:
                set: [{ name: set-cookie, value: s3cr3t-h }]"#;
    let (proxy, _) = start_proxy(&config(routes, "  []")).await;
    let (admin, _) = start_admin(&proxy).await;
    let (resp, body) = get(&h1_client(), &format!("http://{admin}/config_dump")).await;
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("s3cr3t"), "a sensitive value leaked: {text}");
    let dump: Value = serde_json::from_slice(&body).unwrap();
    let filters = &dump["route_configs"][0]["virtual_hosts"][0]["routes"][0]["filters"];
    let req = &filters["request_headers"];
    assert_eq!(req["set"][0]["name"], "authorization");
    assert_eq!(req["set"][0]["value"], "[redacted]");
    assert_eq!(req["set"][2]["value"], "plain-value");
    assert_eq!(req["add"][0]["value"], "[redacted]");
    assert_eq!(filters["response_headers"]["set"][0]["value"], "[redacted]");
}
