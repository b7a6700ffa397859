//! Path normalisation end to end: request targets sent as raw bytes, so that no client library
//! tidies them first, through a real proxy to a real upstream that reports the path it saw.

mod common;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use common::*;

/// Denies `/public/admin` and `/admin` with a 403 of their own, rewrites `/api` to `/v1`, and
/// forwards everything else to `up`.
fn guarded_config(up: SocketAddr) -> String {
    let routes = r#"          - name: deny-public-admin
            match: { path: { prefix: /public/admin } }
            direct_response: { status: 403, body: "denied public admin\n" }
          - name: deny-admin
            match: { path: { prefix: /admin } }
            direct_response: { status: 403, body: "denied admin\n" }
          - name: api
            match: { path: { prefix: /api } }
            forward: { cluster: up }
            filters: { rewrite: { prefix: /v1 } }
          - name: all
            forward: { cluster: up }"#;
    let clusters = format!("  - {{ name: up, connect_timeout: 1s, endpoints: [\"{up}\"] }}\n");
    config(routes, &clusters)
}

/// Sends `GET <target>` exactly as written and reads the whole answer (the request asks the
/// proxy to close the connection after it).
async fn raw_get(addr: SocketAddr, target: &str) -> RawResponse {
    let request = format!("GET {target} HTTP/1.1\r\nHost: paths.test\r\nConnection: close\r\n\r\n");
    raw_request(addr, &request, target).await
}

fn served(count: &AtomicUsize) -> usize {
    count.load(Ordering::SeqCst)
}

#[tokio::test]
async fn hostile_spellings_of_a_denied_path_never_reach_the_upstream() {
    let (up, count) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&guarded_config(up)).await;

    // Each spelling either lands on a deny route (403 with its body) or is refused (400).
    let cases = [
        ("/public//admin", 403, "denied public admin"),
        ("/public/./admin", 403, "denied public admin"),
        ("/public/%61dmin", 403, "denied public admin"),
        ("/public/%2e%2e/admin", 403, "denied admin"),
        ("/public/../admin", 403, "denied admin"),
        ("/public/%2E%2e/%61dmin/x", 403, "denied admin"),
        ("/api/../admin", 403, "denied admin"),
        ("/api/%2e%2E/admin", 403, "denied admin"),
        ("//admin", 403, "denied admin"),
        ("/public/admin%2f", 400, ""),
        ("/public/..%2fadmin", 400, ""),
        ("/public/..%5cadmin", 400, ""),
        ("/public/..\\admin", 400, ""),
        ("/public/%zz/admin", 400, ""),
    ];
    for (target, status, body) in cases {
        let resp = raw_get(addr, target).await;
        assert_eq!(
            resp.status, status,
            "{target}: {}\n{}",
            resp.head, resp.body
        );
        if status == 403 {
            assert_eq!(resp.body.trim_end(), body, "{target}");
        } else {
            assert_eq!(
                resp.header("x-trellis-error"),
                Some("invalid-path"),
                "{target}: {}",
                resp.head
            );
        }
    }
    assert_eq!(served(&count), 0, "a hostile spelling reached the upstream");
}

#[tokio::test]
async fn the_normalised_path_is_what_the_upstream_sees() {
    let (up, count) = echo_upstream("up").await;
    let (_proxy, addr) = start_proxy(&guarded_config(up)).await;

    let cases = [
        // `..` never climbs above the root.
        ("/../../etc", "/etc"),
        ("/..", "/"),
        ("/a/b/../../../c", "/c"),
        // Unreserved escapes are decoded, other escapes keep their meaning with upper-case hex.
        ("/%7euser/%41b%2d", "/~user/Ab-"),
        ("/x%3fy/%c3%a9", "/x%3Fy/%C3%A9"),
        // `%25` is a literal percent sign: decoded once, never twice.
        ("/a%252e%252e/b", "/a%252e%252e/b"),
        // The trailing slash stays; merged slashes and dot segments go.
        ("/a//b///c/", "/a/b/c/"),
        ("/a/./b/.", "/a/b/"),
        // The query is not the path: it is kept as sent.
        ("/q/./x?next=/../admin&p=%2f", "/q/x?next=/../admin&p=%2f"),
        // A prefix rewrite applies to the normalised path.
        ("/api/./users/../items", "/v1/items"),
        ("/api/", "/v1/"),
    ];
    for (target, want) in cases {
        let resp = raw_get(addr, target).await;
        assert_eq!(resp.status, 200, "{target}: {}\n{}", resp.head, resp.body);
        let seen: Seen = serde_json::from_str(&resp.body)
            .unwrap_or_else(|e| panic!("{target}: upstream JSON: {e}: {}", resp.body));
        assert_eq!(seen.uri, want, "{target}");
    }
    assert_eq!(served(&count), cases.len());
}

#[tokio::test]
async fn a_refused_path_is_access_logged_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let (up, count) = echo_upstream("up").await;
    let yaml = guarded_config(up).replace(
        r#"address: "127.0.0.1:0" }"#,
        &format!(
            r#"address: "127.0.0.1:0", access_log: "{}" }}"#,
            log.display()
        ),
    );
    let (_proxy, addr) = start_proxy(&yaml).await;

    let resp = raw_get(addr, "/public/..%2fadmin?x=1").await;
    assert_eq!(resp.status, 400, "{}", resp.head);
    let lines = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(5), "an access log line", || async {
        !lines().is_empty()
    })
    .await;
    let line = &lines()[0];
    assert_eq!(line["status"], 400);
    assert_eq!(line["error"], "invalid-path");
    // The log shows what the client sent, not what it would have been normalised to.
    assert_eq!(line["path"], "/public/..%2fadmin");
    assert_eq!(served(&count), 0);
}

/// The listener setting `path_normalization.escaped_slashes` chooses what `%2F`, `%5C` and `\`
/// do; the default (no setting) refuses them.
#[tokio::test]
async fn the_listener_chooses_what_escaped_slashes_do() {
    let (up, count) = echo_upstream("up").await;
    let with = |action: &str| {
        guarded_config(up).replace(
            r#"address: "127.0.0.1:0" }"#,
            &format!(
                r#"address: "127.0.0.1:0", path_normalization: {{ escaped_slashes: {action} }} }}"#
            ),
        )
    };
    let target = "/public%2fadmin";

    let (_p, reject) = start_proxy(&with("reject")).await;
    let resp = raw_get(reject, target).await;
    assert_eq!(resp.status, 400, "{}", resp.head);
    assert_eq!(resp.header("x-trellis-error"), Some("invalid-path"));

    // Decoded, the path is the denied one: the deny route answers, the upstream sees nothing.
    let (_p, unescape) = start_proxy(&with("unescape_and_forward")).await;
    let resp = raw_get(unescape, target).await;
    assert_eq!(resp.status, 403, "{}", resp.head);

    let (_p, redirect) = start_proxy(&with("redirect")).await;
    let resp = raw_get(redirect, "/files/a%2Fb?x=1").await;
    assert_eq!(resp.status, 307, "{}", resp.head);
    assert_eq!(resp.header("location"), Some("/files/a/b?x=1"));
    assert_eq!(served(&count), 0);

    // Kept as sent: one segment to the router, forwarded with its escape.
    let (_p, keep) = start_proxy(&with("keep_unchanged")).await;
    let resp = raw_get(keep, "/files/a%2fb").await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    let seen: Seen = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(seen.uri, "/files/a%2Fb");
    assert_eq!(served(&count), 1);
}

#[test]
fn an_unknown_escaped_slash_action_is_refused_by_field() {
    let yaml = guarded_config("127.0.0.1:9".parse().unwrap()).replace(
        r#"address: "127.0.0.1:0" }"#,
        r#"address: "127.0.0.1:0", path_normalization: { escaped_slashes: decode } }"#,
    );
    let file = trellis_proxy::config::bootstrap::parse(&yaml).unwrap();
    let err = trellis_proxy::config::validate::validate(file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listeners[0].path_normalization.escaped_slashes")
            && err.contains("\"decode\""),
        "{err}"
    );
}
