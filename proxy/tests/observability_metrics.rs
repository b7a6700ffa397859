//! `/metrics` after known traffic: exact counter values and label sets, read by parsing the
//! exposition format. Each test uses its own listener, route and cluster names: the registry is
//! process-wide and tests run in parallel.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn http_config(listener: &str, cluster: &str, endpoint: &str) -> String {
    format!(
        r#"
listeners:
  - {{ name: {listener}, address: "127.0.0.1:0" }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: vh
        domains: ["*"]
        routes:
          - {{ name: ok, match: {{ path: {{ prefix: /ok }} }}, forward: {{ cluster: {cluster} }} }}
          - {{ name: fail, match: {{ path: {{ prefix: /status }} }}, forward: {{ cluster: {cluster} }} }}
          - {{ name: hello, match: {{ path: {{ exact: /hello }} }}, direct_response: {{ status: 200, body: hi }} }}
clusters:
  - {{ name: {cluster}, endpoints: ["{endpoint}"] }}
"#
    )
}

#[tokio::test]
async fn http_requests_are_counted_by_route_code_and_cluster() {
    let (up, _) = echo_upstream("up").await;
    let (proxy, addr) = start_named(&http_config("m1", "m1-backend", &up.to_string()), "m1").await;
    let (admin, _) = start_admin(&proxy).await;
    let client = h1_client();
    for _ in 0..3 {
        assert_eq!(
            get(&client, &format!("http://{addr}/ok")).await.0.status(),
            200
        );
    }
    for _ in 0..2 {
        let (resp, _) = get(&client, &format!("http://{addr}/status/503")).await;
        assert_eq!(resp.status(), 503);
    }
    assert_eq!(
        get(&client, &format!("http://{addr}/hello"))
            .await
            .0
            .status(),
        200
    );
    assert_eq!(
        get(&client, &format!("http://{addr}/nowhere"))
            .await
            .0
            .status(),
        404
    );

    let m = scrape(admin).await;
    let mut requests = series(&m, "trellis_http_requests_total", &[("listener", "m1")]);
    requests.sort_by(|a, b| a.0.cmp(&b.0));
    let l = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut v: Vec<_> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        v.sort();
        v
    };
    let mut expected = vec![
        (
            l(&[
                ("listener", "m1"),
                ("vhost", "vh"),
                ("route", "ok"),
                ("code", "200"),
                ("class", "2xx"),
            ]),
            3.0,
        ),
        (
            l(&[
                ("listener", "m1"),
                ("vhost", "vh"),
                ("route", "fail"),
                ("code", "503"),
                ("class", "5xx"),
            ]),
            2.0,
        ),
        (
            l(&[
                ("listener", "m1"),
                ("vhost", "vh"),
                ("route", "hello"),
                ("code", "200"),
                ("class", "2xx"),
            ]),
            1.0,
        ),
        (
            l(&[
                ("listener", "m1"),
                ("vhost", ""),
                ("route", ""),
                ("code", "404"),
                ("class", "4xx"),
            ]),
            1.0,
        ),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(requests, expected);

    let upstream: Vec<_> = series(
        &m,
        "trellis_upstream_requests_total",
        &[("cluster", "m1-backend")],
    )
    .into_iter()
    .filter(|(_, v)| *v > 0.0)
    .collect();
    assert_eq!(
        upstream,
        vec![
            (l(&[("cluster", "m1-backend"), ("class", "2xx")]), 3.0),
            (l(&[("cluster", "m1-backend"), ("class", "5xx")]), 2.0),
        ]
    );
    assert_eq!(
        metric(
            &m,
            "trellis_upstream_request_duration_seconds_count",
            &[("cluster", "m1-backend")]
        ),
        Some(5.0)
    );
    let errors: f64 = series(
        &m,
        "trellis_upstream_errors_total",
        &[("cluster", "m1-backend")],
    )
    .iter()
    .map(|(_, v)| v)
    .sum();
    assert_eq!(errors, 0.0);
    assert_eq!(metric(&m, "trellis_config_version", &[]), Some(1.0));
    assert_eq!(
        metric(
            &m,
            "trellis_endpoint_healthy",
            &[("cluster", "m1-backend"), ("endpoint", &up.to_string())]
        ),
        Some(1.0)
    );

    // Durations are recorded when each response body ends, just after the client has it.
    let route_ok = [("listener", "m1"), ("vhost", "vh"), ("route", "ok")];
    eventually(
        Duration::from_secs(5),
        "three durations for route ok",
        || async {
            let m = scrape(admin).await;
            metric(&m, "trellis_http_request_duration_seconds_count", &route_ok) == Some(3.0)
        },
    )
    .await;
    let m = scrape(admin).await;
    let mut le = route_ok.to_vec();
    le.push(("le", "+Inf"));
    assert_eq!(
        metric(&m, "trellis_http_request_duration_seconds_bucket", &le),
        Some(3.0)
    );
    let conns = metric(
        &m,
        "trellis_downstream_connections_total",
        &[("listener", "m1")],
    )
    .unwrap();
    assert!(conns >= 1.0, "{conns}");
}

#[tokio::test]
async fn upstream_failures_are_counted_by_reason() {
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let (proxy, addr) = start_named(&http_config("m2", "m2-dead", &dead.to_string()), "m2").await;
    let (admin, _) = start_admin(&proxy).await;
    for _ in 0..2 {
        let (resp, _) = get(&h1_client(), &format!("http://{addr}/ok")).await;
        assert_eq!(resp.status(), 503);
    }
    let m = scrape(admin).await;
    let failed: Vec<_> = series(
        &m,
        "trellis_upstream_errors_total",
        &[("cluster", "m2-dead")],
    )
    .into_iter()
    .filter(|(_, v)| *v > 0.0)
    .collect();
    assert_eq!(
        failed,
        vec![(
            vec![
                ("cluster".to_owned(), "m2-dead".to_owned()),
                ("reason".to_owned(), "connect-failure".to_owned())
            ],
            // Counted per try: each request is tried three times (two default retries).
            6.0
        )]
    );
    assert_eq!(
        metric(
            &m,
            "trellis_retries_total",
            &[("cluster", "m2-dead"), ("outcome", "attempted")]
        ),
        Some(4.0)
    );
    assert_eq!(
        metric(
            &m,
            "trellis_http_requests_total",
            &[
                ("listener", "m2"),
                ("vhost", "vh"),
                ("route", "ok"),
                ("code", "503"),
                ("class", "5xx")
            ]
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn tcp_bytes_and_connections_per_cluster() {
    let echo = tcp_echo_upstream().await;
    let yaml = format!(
        r#"
listeners:
  - {{ name: m3, address: "127.0.0.1:0", protocol: tcp, cluster: m3-echo }}
clusters:
  - {{ name: m3-echo, endpoints: ["{echo}"] }}
"#
    );
    let (proxy, addr) = start_named(&yaml, "m3").await;
    let (admin, _) = start_admin(&proxy).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    drop(s);

    let c = [("cluster", "m3-echo")];
    eventually(
        Duration::from_secs(5),
        "connection closed on the proxy",
        || async {
            let m = scrape(admin).await;
            metric(
                &m,
                "trellis_downstream_connections_active",
                &[("listener", "m3")],
            ) == Some(0.0)
        },
    )
    .await;
    let m = scrape(admin).await;
    assert_eq!(metric(&m, "trellis_tcp_connections_total", &c), Some(1.0));
    assert_eq!(metric(&m, "trellis_tcp_bytes_sent_total", &c), Some(5.0));
    assert_eq!(
        metric(&m, "trellis_tcp_bytes_received_total", &c),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &m,
            "trellis_downstream_connections_total",
            &[("listener", "m3")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn config_updates_are_counted() {
    let before = scrape_registry();
    trellis_proxy::telemetry::config_applied(7);
    trellis_proxy::telemetry::config_rejected();
    trellis_proxy::telemetry::config_rejected();
    let after = scrape_registry();
    let get = |m: &[Sample], r| {
        metric(m, "trellis_config_updates_total", &[("result", r)]).unwrap_or(0.0)
    };
    assert_eq!(get(&after, "applied") - get(&before, "applied"), 1.0);
    assert_eq!(get(&after, "rejected") - get(&before, "rejected"), 2.0);
}

fn scrape_registry() -> Vec<Sample> {
    parse_exposition(&trellis_proxy::telemetry::render(None, false))
}

/// A configuration with a route and a cluster removed no longer shows their series; what stays
/// keeps its counts.
#[tokio::test]
async fn series_of_removed_clusters_and_routes_are_dropped() {
    let (up, _) = echo_upstream("up").await;
    let yaml = |with_gone: bool| {
        let (gone_route, gone_cluster) = if with_gone {
            (
                "          - { name: gone, match: { path: { prefix: /gone } }, forward: { cluster: m6-gone } }\n",
                format!("  - {{ name: m6-gone, endpoints: [\"{up}\"] }}\n"),
            )
        } else {
            ("", String::new())
        };
        format!(
            r#"
listeners:
  - {{ name: m6, address: "127.0.0.1:0" }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: vh
        domains: ["*"]
        routes:
{gone_route}          - {{ name: kept, match: {{ path: {{ prefix: /kept }} }}, forward: {{ cluster: m6-kept }} }}
clusters:
{gone_cluster}  - {{ name: m6-kept, endpoints: ["{up}"] }}
"#
        )
    };
    let (proxy, addr) = start_named(&yaml(true), "m6").await;
    let (admin, _) = start_admin(&proxy).await;
    let client = h1_client();
    for path in ["/gone", "/kept", "/kept"] {
        let (resp, _) = get(&client, &format!("http://{addr}{path}")).await;
        assert_eq!(resp.status(), 200, "{path}");
    }
    let gone_route = [("listener", "m6"), ("vhost", "vh"), ("route", "gone")];
    let kept_route = [("listener", "m6"), ("vhost", "vh"), ("route", "kept")];
    let gone_cluster = [("cluster", "m6-gone")];
    let with_labels = |m: &[Sample], having: &[(&str, &str)]| -> usize {
        m.iter()
            .filter(|s| {
                having
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .count()
    };
    let m = scrape(admin).await;
    assert!(with_labels(&m, &gone_route) > 0);
    assert!(with_labels(&m, &gone_cluster) > 0);
    assert_eq!(
        metric(
            &m,
            "trellis_upstream_requests_total",
            &[("cluster", "m6-gone"), ("class", "2xx")]
        ),
        Some(1.0)
    );

    let config = trellis_proxy::config::validate::from_yaml(&yaml(false)).unwrap();
    proxy.apply(config).await.expect("config applies");
    let m = scrape(admin).await;
    let left: Vec<_> = m
        .iter()
        .filter(|s| {
            s.labels.get("cluster").map(String::as_str) == Some("m6-gone")
                || s.labels.get("route").map(String::as_str) == Some("gone")
        })
        .map(|s| s.name.clone())
        .collect();
    assert!(left.is_empty(), "series left behind: {left:?}");
    assert_eq!(
        metric(
            &m,
            "trellis_http_requests_total",
            &[
                ("listener", "m6"),
                ("vhost", "vh"),
                ("route", "kept"),
                ("code", "200"),
                ("class", "2xx")
            ]
        ),
        Some(2.0)
    );
    assert!(with_labels(&m, &kept_route) > 0);
    assert_eq!(
        metric(
            &m,
            "trellis_upstream_requests_total",
            &[("cluster", "m6-kept"), ("class", "2xx")]
        ),
        Some(2.0)
    );

    // Served again, the cluster counts from zero.
    proxy
        .apply(trellis_proxy::config::validate::from_yaml(&yaml(true)).unwrap())
        .await
        .expect("config applies");
    let (resp, _) = get(&client, &format!("http://{addr}/gone")).await;
    assert_eq!(resp.status(), 200);
    let m = scrape(admin).await;
    assert_eq!(
        metric(
            &m,
            "trellis_upstream_requests_total",
            &[("cluster", "m6-gone"), ("class", "2xx")]
        ),
        Some(1.0)
    );
}
