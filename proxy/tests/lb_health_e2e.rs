//! Balancing and health through a real proxy: latency-aware P2C, consistent hashing, active
//! health checks (HTTP, TCP, gRPC), outlier ejection and panic mode.

mod common;

use std::{collections::HashMap, net::SocketAddr, sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

fn lb_config(cluster_extra: &str, endpoints: &[SocketAddr]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    config(
        "          - { name: all, forward: { cluster: up } }",
        &format!(
            "  - name: up\n    endpoints: [{}]\n{cluster_extra}\n",
            eps.join(", ")
        ),
    )
}

/// Sends `n` requests from `concurrency` workers, each sending its share one after another;
/// returns how many each upstream answered, by `name:status`.
async fn spread(addr: SocketAddr, n: usize, concurrency: usize) -> HashMap<String, usize> {
    let client = h1_client();
    let url = format!("http://{addr}/");
    let workers = (0..concurrency).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..n / concurrency {
                let resp = get(&client, &url).await.0;
                let who = resp
                    .headers()
                    .get("x-upstream")
                    .map_or("proxy".into(), |v| v.to_str().unwrap().to_owned());
                seen.push(format!("{who}:{}", resp.status().as_u16()));
            }
            seen
        })
    });
    let mut counts = HashMap::new();
    for w in futures_util::future::join_all(workers).await {
        for key in w.unwrap() {
            *counts.entry(key).or_default() += 1;
        }
    }
    counts
}

#[tokio::test]
async fn p2c_policies_send_less_to_a_slow_endpoint() {
    for policy in ["least_request", "peak_ewma"] {
        let (fast, _, _) = controlled_upstream("fast").await;
        let (slow, slow_b, _) = controlled_upstream("slow").await;
        slow_b.delay_ms.store(40, Ordering::SeqCst);
        let (_proxy, addr) = start_proxy(&lb_config(
            &format!("    lb: {{ policy: {policy} }}"),
            &[fast, slow],
        ))
        .await;
        let counts = spread(addr, 400, 8).await;
        let slow_share = counts.get("slow:200").copied().unwrap_or(0);
        assert!(
            slow_share < 100,
            "{policy}: the slow endpoint got {slow_share} of 400: {counts:?}"
        );
    }
}

async fn owner_of(addr: SocketAddr, key: &str, header: &str) -> String {
    let req = Request::get(format!("http://{addr}/"))
        .header(header, key)
        .body(Full::<Bytes>::default())
        .unwrap();
    let (resp, _) = send(&h1_client(), req).await;
    resp.headers()["x-upstream"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn consistent_hashing_keeps_keys_on_their_endpoint() {
    let mut ups = Vec::new();
    for name in ["e0", "e1", "e2", "e3"] {
        ups.push(controlled_upstream(name).await.0);
    }
    for policy in [
        "{ policy: ring_hash, hash_key: { header: x-user } }",
        "{ policy: maglev, hash_key: { header: x-user } }",
        "{ policy: ring_hash, hash_key: { cookie: session } }",
    ] {
        let (proxy, addr) = start_proxy(&lb_config(&format!("    lb: {policy}"), &ups)).await;
        let (header, fmt): (&str, fn(usize) -> String) = if policy.contains("cookie") {
            ("cookie", |i| format!("theme=dark; session=user-{i}"))
        } else {
            ("x-user", |i| format!("user-{i}"))
        };
        let mut owners = HashMap::new();
        for i in 0..40 {
            owners.insert(i, owner_of(addr, &fmt(i), header).await);
        }
        let distinct: std::collections::HashSet<_> = owners.values().collect();
        assert!(
            distinct.len() >= 3,
            "{policy}: keys spread over endpoints: {owners:?}"
        );
        for _ in 0..2 {
            for (i, owner) in &owners {
                assert_eq!(
                    &owner_of(addr, &fmt(*i), header).await,
                    owner,
                    "{policy}: key {i}"
                );
            }
        }
        // Adding an endpoint by reload moves only some keys.
        let extra = controlled_upstream("e4").await.0;
        let mut more = ups.clone();
        more.push(extra);
        let config = trellis_proxy::config::validate::from_yaml(&lb_config(
            &format!("    lb: {policy}"),
            &more,
        ))
        .unwrap();
        proxy.apply(config).await.unwrap();
        let mut moved = 0;
        for (i, owner) in &owners {
            let now = owner_of(addr, &fmt(*i), header).await;
            if &now != owner {
                assert_eq!(now, "e4", "{policy}: a moved key goes to the new endpoint");
                moved += 1;
            }
        }
        assert!(moved <= 20, "{policy}: {moved} of 40 keys moved");
    }
}

#[tokio::test]
async fn http_health_check_takes_endpoints_out_and_back() {
    let (a, a_b, _) = controlled_upstream("a").await;
    let (b, _, _) = controlled_upstream("b").await;
    let (_proxy, addr) = start_proxy(&lb_config(
        "    lb: { policy: round_robin }\n    health_check: { http: { path: /healthz }, interval: 50ms, timeout: 1s, unhealthy_threshold: 2, healthy_threshold: 2, jitter: 0 }",
        &[a, b],
    ))
    .await;
    let client = h1_client();
    let url = format!("http://{addr}/");
    let who = |client: TestClient, url: String| async move {
        get(&client, &url).await.0.headers()["x-upstream"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    a_b.unhealthy.store(true, Ordering::SeqCst);
    eventually(Duration::from_secs(5), "a leaves rotation", || async {
        let mut all_b = true;
        for _ in 0..6 {
            all_b &= who(client.clone(), url.clone()).await == "b";
        }
        all_b
    })
    .await;
    a_b.unhealthy.store(false, Ordering::SeqCst);
    eventually(Duration::from_secs(5), "a comes back", || async {
        who(client.clone(), url.clone()).await == "a"
    })
    .await;
}

#[tokio::test]
async fn tcp_health_check_marks_a_dead_endpoint() {
    let (alive, _, _) = controlled_upstream("alive").await;
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let (proxy, _addr) = start_proxy(&lb_config(
        "    outlier_detection: { enabled: false }\n    health_check: { tcp: {}, interval: 50ms, unhealthy_threshold: 1 }",
        &[alive, dead],
    ))
    .await;
    let store = proxy.store().clone();
    eventually(Duration::from_secs(5), "dead endpoint unhealthy", || {
        let store = store.clone();
        async move {
            let c = store.load().unwrap().clusters["up"].clone();
            !c.endpoints[1].state.is_healthy() && c.endpoints[0].state.is_healthy()
        }
    })
    .await;
}

#[tokio::test]
async fn grpc_health_check_follows_serving_status() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("echo", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let (proxy, _addr) = start_proxy(&lb_config(
        "    protocol: http2\n    health_check: { grpc: { service: echo }, interval: 50ms, unhealthy_threshold: 1, healthy_threshold: 1 }",
        &[up],
    ))
    .await;
    let store = proxy.store().clone();
    let healthy = move || {
        let store = store.clone();
        async move {
            store.load().unwrap().clusters["up"].endpoints[0]
                .state
                .is_healthy()
        }
    };
    reporter
        .set_service_status("echo", tonic_health::ServingStatus::NotServing)
        .await;
    eventually(Duration::from_secs(5), "NOT_SERVING marks it unhealthy", {
        let h = healthy.clone();
        move || {
            let h = h.clone();
            async move { !h().await }
        }
    })
    .await;
    reporter
        .set_service_status("echo", tonic_health::ServingStatus::Serving)
        .await;
    eventually(Duration::from_secs(5), "SERVING marks it healthy", healthy).await;
}

#[tokio::test]
async fn consecutive_5xx_eject_an_endpoint_until_its_time_is_up() {
    let (bad, bad_b, bad_count) = controlled_upstream("bad").await;
    let (good, _, _) = controlled_upstream("good").await;
    bad_b.status.store(500, Ordering::SeqCst);
    let (_proxy, addr) = start_proxy(&lb_config(
        "    lb: { policy: round_robin }\n    outlier_detection: { consecutive_5xx: 3, base_ejection_time: 600ms, max_ejection_percent: 50 }",
        &[bad, good],
    ))
    .await;
    let counts = spread(addr, 40, 1).await;
    assert_eq!(
        bad_count.load(Ordering::SeqCst),
        3,
        "ejected after 3 in a row: {counts:?}"
    );
    assert_eq!(counts.get("bad:500"), Some(&3));
    assert_eq!(counts.get("good:200"), Some(&37));
    // The ejection ends and the endpoint is tried again.
    bad_b.status.store(0, Ordering::SeqCst);
    eventually(Duration::from_secs(5), "ejection ends", || async {
        spread(addr, 2, 1).await.contains_key("bad:200")
    })
    .await;
}

#[tokio::test]
async fn panic_mode_uses_all_endpoints_and_can_be_disabled() {
    let (a, a_b, _) = controlled_upstream("a").await;
    let (b, b_b, _) = controlled_upstream("b").await;
    a_b.unhealthy.store(true, Ordering::SeqCst);
    b_b.unhealthy.store(true, Ordering::SeqCst);
    let hc =
        "    health_check: { http: { path: /healthz }, interval: 50ms, unhealthy_threshold: 1 }";
    let (proxy, addr) = start_proxy(&lb_config(
        &format!("    lb: {{ policy: round_robin }}\n{hc}"),
        &[a, b],
    ))
    .await;
    let store = proxy.store().clone();
    eventually(Duration::from_secs(5), "both unhealthy", || {
        let store = store.clone();
        async move {
            let c = store.load().unwrap().clusters["up"].clone();
            c.endpoints.iter().all(|e| !e.state.is_healthy())
        }
    })
    .await;
    // All unhealthy: rather than fail everything, traffic goes to all of them.
    let counts = spread(addr, 10, 1).await;
    assert_eq!(counts.get("a:200"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("b:200"), Some(&5), "{counts:?}");
    let panics = store.load().unwrap().clusters["up"]
        .stats
        .panic_picks
        .load(Ordering::Relaxed);
    assert!(panics >= 10);

    // With the threshold at 0 the proxy fails closed.
    let config = trellis_proxy::config::validate::from_yaml(&lb_config(
        &format!("    panic_threshold: 0\n{hc}"),
        &[a, b],
    ))
    .unwrap();
    proxy.apply(config).await.unwrap();
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-trellis-error"], "no-endpoint");
}
