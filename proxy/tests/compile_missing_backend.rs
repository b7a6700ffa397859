//! A forward target naming a cluster the configuration does not hold: that target's share of
//! requests is answered 500 `x-trellis-error: backend-not-found` (the Gateway API's rule for an
//! invalid backendRef) and the rest still flows. The discovery path may deliver such a config;
//! here it is built by hand from a validated one, since the file validator refuses it.

mod common;

use std::{net::SocketAddr, sync::Arc};

use common::*;
use trellis_proxy::{
    Proxy,
    config::{Config, validate},
};

/// Routes `/split` half to `a`, half to `b`; `/only-b` all to `b`. Both clusters exist here.
fn config_with_both(a: SocketAddr, b: SocketAddr) -> Config {
    let yaml = config(
        "          - name: split\n            match: { path: { prefix: /split } }\n            forward: { clusters: [{ name: a, weight: 1 }, { name: b, weight: 1 }] }\n          - name: only-b\n            match: { path: { prefix: /only-b } }\n            forward: { cluster: b }\n",
        &format!(
            "  - {{ name: a, endpoints: [\"{a}\"] }}\n  - {{ name: b, endpoints: [\"{b}\"] }}\n"
        ),
    );
    validate::from_yaml(&yaml).unwrap_or_else(|e| panic!("test config invalid: {e}"))
}

/// The same config without cluster `b`: what validation would refuse, applied directly.
fn without_b(mut config: Config) -> Config {
    config.clusters = config
        .clusters
        .iter()
        .filter(|c| &*c.name != "b")
        .cloned()
        .collect::<Vec<_>>()
        .into();
    config
}

/// Counts (answered by `a`, 500 backend-not-found, anything else) over `n` requests.
async fn tally(addr: SocketAddr, path: &str, n: usize) -> (usize, usize, Vec<String>) {
    let client = h1_client();
    let (mut from_a, mut not_found, mut other) = (0, 0, Vec::new());
    for _ in 0..n {
        let (resp, _) = get(&client, &format!("http://{addr}{path}")).await;
        let error = resp
            .headers()
            .get("x-trellis-error")
            .map(|v| v.to_str().unwrap().to_owned());
        let upstream = resp
            .headers()
            .get("x-upstream")
            .map(|v| v.to_str().unwrap().to_owned());
        match (
            resp.status().as_u16(),
            error.as_deref(),
            upstream.as_deref(),
        ) {
            (200, None, Some("a")) => from_a += 1,
            (500, Some("backend-not-found"), None) => not_found += 1,
            (status, error, upstream) => other.push(format!("{status} {error:?} {upstream:?}")),
        }
    }
    (from_a, not_found, other)
}

async fn start(config: Config) -> (Arc<Proxy>, SocketAddr) {
    let proxy = Proxy::new();
    proxy.apply(config).await.expect("config applies");
    let addr = proxy.listener_addr("main").await.expect("listener main");
    (proxy, addr)
}

#[tokio::test]
async fn a_missing_backend_gets_its_share_as_500() {
    let (a, _) = echo_upstream("a").await;
    let (b, _) = echo_upstream("b").await;
    let (_proxy, addr) = start(without_b(config_with_both(a, b))).await;

    let (from_a, not_found, other) = tally(addr, "/split", 200).await;
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    // Half and half: a binomial(200, 0.5) falls outside 60..=140 with odds below 1e-8.
    assert!((60..=140).contains(&from_a), "a answered {from_a} of 200");
    assert_eq!(from_a + not_found, 200);

    let (from_a, not_found, other) = tally(addr, "/only-b", 20).await;
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    assert_eq!((from_a, not_found), (0, 20));
}

#[tokio::test]
async fn a_backend_that_comes_back_is_served_again() {
    let (a, _) = echo_upstream("a").await;
    let (b, _) = echo_upstream("b").await;
    let full = config_with_both(a, b);
    let (proxy, addr) = start(without_b(full.clone())).await;
    let (_, not_found, _) = tally(addr, "/only-b", 5).await;
    assert_eq!(not_found, 5);

    // The route configuration is unchanged, so its table is reused: the cluster is found
    // through the slot its name already had.
    proxy.apply(full).await.expect("config applies");
    let client = h1_client();
    for _ in 0..5 {
        let (resp, _) = get(&client, &format!("http://{addr}/only-b")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-upstream"], "b");
    }
}
