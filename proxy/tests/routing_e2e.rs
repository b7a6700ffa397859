//! Routing and redirects end to end: requests written as raw bytes through a real proxy to real
//! upstreams that name themselves, so the route that answered is visible on the wire.

mod common;

use std::net::SocketAddr;

use common::*;

/// Sends `GET <target>` with `host` and the extra header lines exactly as written, and reads the
/// whole answer (the request asks the proxy to close the connection after it).
async fn raw_get(addr: SocketAddr, host: &str, target: &str, extra: &str) -> RawResponse {
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    raw_request(addr, &request, target).await
}

/// `/t/me` (which needs `x-me`) ranks above `/t/{id}`; a request to `/t/me` without the header
/// must reach `/t/{id}`'s upstream, not the catch-all's.
#[tokio::test]
async fn a_template_whose_conditions_fail_falls_through_to_the_next_template() {
    let (me, _) = echo_upstream("me").await;
    let (id, _) = echo_upstream("id").await;
    let (all, _) = echo_upstream("all").await;
    let routes = r#"          - name: me
            match: { path: { template: "/t/me" }, headers: [{ name: x-me }] }
            forward: { cluster: me }
          - name: id
            match: { path: { template: "/t/{id}" } }
            forward: { cluster: id }
          - name: all
            forward: { cluster: all }"#;
    let clusters = format!(
        "  - {{ name: me, endpoints: [\"{me}\"] }}\n  - {{ name: id, endpoints: [\"{id}\"] }}\n  - {{ name: all, endpoints: [\"{all}\"] }}\n"
    );
    let (_proxy, addr) = start_proxy(&config(routes, &clusters)).await;

    let cases = [
        ("/t/me", "x-me: 1\r\n", "me"),
        ("/t/me", "", "id"),
        ("/t/me", "x-other: 1\r\n", "id"),
        ("/t/42", "x-me: 1\r\n", "id"),
        ("/t/me/x", "", "all"),
    ];
    for (target, extra, want) in cases {
        let resp = raw_get(addr, "routing.test", target, extra).await;
        assert_eq!(resp.status, 200, "{target} {extra:?}: {}", resp.head);
        assert_eq!(
            resp.header("x-upstream"),
            Some(want),
            "{target} {extra:?}: {}",
            resp.head
        );
    }
}

/// The Gateway API's HTTPRequestRedirectFilter port rules: with neither scheme nor port the
/// Location carries the listener's port, whatever the Host header says; a scheme alone implies
/// its well-known port; 80 for http and 443 for https are never written.
#[tokio::test]
async fn redirect_ports_follow_the_gateway_api() {
    let routes = r#"          - name: bare
            match: { path: { prefix: /bare } }
            redirect: { host: elsewhere.test }
          - name: keep-host
            match: { path: { prefix: /keep } }
            redirect: { prefix: /kept }
          - name: https
            match: { path: { prefix: /https } }
            redirect: { scheme: https }
          - name: https-port
            match: { path: { prefix: /sport } }
            redirect: { scheme: https, port: 8443 }
          - name: https-443
            match: { path: { prefix: /s443 } }
            redirect: { scheme: https, port: 443 }
          - name: port-80
            match: { path: { prefix: /p80 } }
            redirect: { port: 80 }
          - name: port-81
            match: { path: { prefix: /p81 } }
            redirect: { port: 81 }
          - name: http-443
            match: { path: { prefix: /h443 } }
            redirect: { scheme: http, port: 443 }"#;
    let (_proxy, addr) = start_proxy(&config(routes, "  []\n")).await;
    let port = addr.port();

    let cases = [
        // No scheme, no port: the listener's port, not the Host header's.
        (
            "r.test:1234",
            "/bare/x?q=1",
            format!("http://elsewhere.test:{port}/bare/x?q=1"),
        ),
        (
            "r.test",
            "/bare",
            format!("http://elsewhere.test:{port}/bare"),
        ),
        (
            "r.test:1234",
            "/keep/a/",
            format!("http://r.test:{port}/kept/a/"),
        ),
        (
            "r.test:1234",
            "/keep/",
            format!("http://r.test:{port}/kept/"),
        ),
        ("r.test:1234", "/keep", format!("http://r.test:{port}/kept")),
        // A scheme alone: its well-known port, which is not written.
        (
            "r.test:1234",
            "/https/x",
            "https://r.test/https/x".to_owned(),
        ),
        // An explicit port wins and is written unless it is the scheme's default.
        (
            "r.test:1234",
            "/sport",
            "https://r.test:8443/sport".to_owned(),
        ),
        ("r.test:1234", "/s443", "https://r.test/s443".to_owned()),
        ("r.test:1234", "/p80", "http://r.test/p80".to_owned()),
        ("r.test", "/p81", "http://r.test:81/p81".to_owned()),
        ("r.test", "/h443", "http://r.test:443/h443".to_owned()),
    ];
    for (host, target, want) in cases {
        let resp = raw_get(addr, host, target, "").await;
        assert_eq!(resp.status, 302, "{host} {target}: {}", resp.head);
        assert_eq!(
            resp.header("location"),
            Some(want.as_str()),
            "{host} {target}: {}",
            resp.head
        );
    }
}

/// A prefix rewrite and a prefix redirect apply the same Gateway API `ReplacePrefixMatch` table:
/// the upstream sees the path the Location names.
#[tokio::test]
async fn prefix_rewrites_and_redirects_share_the_replace_prefix_table() {
    let (up, _) = echo_upstream("up").await;
    let mut routes = String::new();
    for (name, to) in [("xyz", "/xyz"), ("xyzs", "/xyz/"), ("root", "/")] {
        routes.push_str(&format!(
            "          - name: rw-{name}
            match: {{ path: {{ prefix: /rw-{name}/foo }} }}
            forward: {{ cluster: up }}
            filters: {{ rewrite: {{ prefix: \"{to}\" }} }}
          - name: rd-{name}
            match: {{ path: {{ prefix: /rd-{name}/foo/ }} }}
            redirect: {{ prefix: \"{to}\", status: 301 }}
"
        ));
    }
    let clusters = format!("  - {{ name: up, endpoints: [\"{up}\"] }}\n");
    let (_proxy, addr) = start_proxy(&config(routes.trim_end(), &clusters)).await;
    let port = addr.port();
    let client = h1_client();

    // (route, path after the route's prefix, the path either way)
    let rows = [
        ("xyz", "/bar", "/xyz/bar"),
        ("xyz", "", "/xyz"),
        ("xyz", "/", "/xyz/"),
        ("xyz", "/bar/", "/xyz/bar/"),
        ("xyzs", "/bar", "/xyz/bar"),
        ("xyzs", "", "/xyz"),
        ("xyzs", "/", "/xyz/"),
        ("root", "/bar", "/bar"),
        ("root", "", "/"),
        ("root", "/", "/"),
    ];
    for (name, rest, want) in rows {
        let rewritten = format!("/rw-{name}/foo{rest}");
        let (resp, body) = get(&client, &format!("http://{addr}{rewritten}?k=v")).await;
        assert_eq!(resp.status(), 200, "{rewritten}");
        assert_eq!(seen(&body).uri, format!("{want}?k=v"), "{rewritten}");

        let redirected = format!("/rd-{name}/foo{rest}");
        let resp = raw_get(addr, "r.test", &format!("{redirected}?k=v"), "").await;
        assert_eq!(resp.status, 301, "{redirected}: {}", resp.head);
        assert_eq!(
            resp.header("location"),
            Some(format!("http://r.test:{port}{want}?k=v").as_str()),
            "{redirected}"
        );
    }
}
