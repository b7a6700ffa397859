//! Incremental compile: what an update keeps from the version in force. An endpoint change
//! rebuilds that one cluster and no route table; unchanged clusters and tables are the same
//! objects; rate-limit buckets survive a route change.

use std::{net::SocketAddr, sync::Arc};

use trellis_proxy::config::{Compiled, Config, model::Endpoint, validate};

fn base() -> Config {
    validate::from_yaml(
        r#"
listeners:
  - { name: l, address: "127.0.0.1:0" }
route_configs:
  - name: rc
    virtual_hosts:
      - name: vh
        domains: ["*"]
        rate_limit: { max_tokens: 5, tokens_per_fill: 1, fill_interval: 1s }
        routes:
          - name: to-a
            match: { path: { prefix: /a } }
            forward: { cluster: a }
            rate_limit: { max_tokens: 3, tokens_per_fill: 1, fill_interval: 1s }
          - { name: to-b, match: { path: { prefix: /b } }, forward: { cluster: b } }
clusters:
  - { name: a, endpoints: ["127.0.0.1:1001"] }
  - { name: b, endpoints: ["127.0.0.1:1002"] }
"#,
    )
    .unwrap_or_else(|e| panic!("test config invalid: {e}"))
}

fn with_endpoint(mut config: Config, cluster: &str, address: &str) -> Config {
    let mut clusters = config.clusters.to_vec();
    let c = clusters.iter_mut().find(|c| &*c.name == cluster).unwrap();
    c.endpoints = vec![Endpoint {
        address: address.parse::<SocketAddr>().unwrap(),
        weight: 1,
        identity: None,
    }]
    .into();
    config.clusters = clusters.into();
    config
}

fn same<T>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b)
}

#[test]
fn an_endpoint_change_rebuilds_one_cluster_and_no_route_table() {
    let v1 = Compiled::build(base().into(), 1, None).unwrap();
    let v2 = Compiled::build(
        with_endpoint(base(), "a", "127.0.0.1:2001").into(),
        2,
        Some(&v1),
    )
    .unwrap();
    assert!(same(
        v1.http_routes("l").unwrap(),
        v2.http_routes("l").unwrap()
    ));
    assert!(same(&v1.clusters["b"], &v2.clusters["b"]));
    assert!(!same(&v1.clusters["a"], &v2.clusters["a"]));
    assert_eq!(
        v2.clusters["a"].endpoints[0].address,
        "127.0.0.1:2001".parse::<SocketAddr>().unwrap()
    );
    // Counters and breakers carry over to the rebuilt cluster.
    assert!(same(&v1.clusters["a"].stats, &v2.clusters["a"].stats));
    assert!(same(&v1.clusters["a"].breakers, &v2.clusters["a"].breakers));
    // Buckets are the same objects, tokens and all.
    for (key, bucket) in &v1.rate_limiters {
        assert!(same(bucket, &v2.rate_limiters[key]), "{key}");
    }
    assert_eq!(v2.rate_limiters.len(), 2);
}

#[test]
fn the_reused_table_finds_each_version_s_cluster_by_slot() {
    let v1 = Compiled::build(base().into(), 1, None).unwrap();
    let v2 = Compiled::build(
        with_endpoint(base(), "a", "127.0.0.1:2001").into(),
        2,
        Some(&v1),
    )
    .unwrap();
    let routes = v2.http_routes("l").unwrap();
    let headers = http::HeaderMap::new();
    let head = trellis_proxy::http::router::RequestHead {
        host: "x",
        path: "/a/1",
        query: None,
        method: &http::Method::GET,
        headers: &headers,
    };
    let route = routes.route(&head).expect("route to-a");
    let trellis_proxy::http::route::RouteAction::Forward(backends) = &route.action else {
        panic!("to-a forwards");
    };
    let slot = backends.pick().expect("one target");
    let in_v1 = v1.backend(slot).and_then(|b| b.cluster.clone()).unwrap();
    let in_v2 = v2.backend(slot).and_then(|b| b.cluster.clone()).unwrap();
    assert!(same(&in_v1, &v1.clusters["a"]));
    assert!(same(&in_v2, &v2.clusters["a"]));
    assert_eq!(&*v2.backend(slot).unwrap().name, "a");
}

#[test]
fn a_route_change_rebuilds_its_table_and_keeps_the_buckets() {
    let v1 = Compiled::build(base().into(), 1, None).unwrap();
    let mut changed = base();
    let mut rcs = changed.route_configs.to_vec();
    let mut vhs = rcs[0].virtual_hosts.to_vec();
    let mut routes = vhs[0].routes.to_vec();
    routes[1].timeout = Some(std::time::Duration::from_secs(3));
    vhs[0].routes = routes.into();
    rcs[0].virtual_hosts = vhs.into();
    changed.route_configs = rcs.into();
    let v2 = Compiled::build(changed.into(), 2, Some(&v1)).unwrap();
    assert!(!same(
        v1.http_routes("l").unwrap(),
        v2.http_routes("l").unwrap()
    ));
    assert!(same(&v1.clusters["a"], &v2.clusters["a"]));
    assert!(same(&v1.clusters["b"], &v2.clusters["b"]));
    for (key, bucket) in &v1.rate_limiters {
        assert!(same(bucket, &v2.rate_limiters[key]), "{key}");
    }
}

#[test]
fn slots_stay_put_while_names_come_and_go() {
    let v1 = Compiled::build(base().into(), 1, None).unwrap();
    let slot_of = |c: &Compiled, name: &str| {
        (0u32..16)
            .map(trellis_proxy::http::route::Slot)
            .find(|s| c.backend(*s).is_some_and(|b| &*b.name == name))
    };
    let a = slot_of(&v1, "a").unwrap();
    let b = slot_of(&v1, "b").unwrap();
    assert_ne!(a, b);
    // A third cluster arrives, unused by any route: a and b keep their slots.
    let mut more = base();
    let mut clusters = more.clusters.to_vec();
    let mut c = clusters[0].clone();
    c.name = "c".into();
    clusters.push(c);
    more.clusters = clusters.into();
    let v2 = Compiled::build(more.into(), 2, Some(&v1)).unwrap();
    assert_eq!(slot_of(&v2, "a"), Some(a));
    assert_eq!(slot_of(&v2, "b"), Some(b));
    assert!(slot_of(&v2, "c").is_some());
    // Cluster b disappears while a route still names it: its slot stays, with no cluster.
    let mut fewer = base();
    fewer.clusters = fewer
        .clusters
        .iter()
        .filter(|c| &*c.name != "b")
        .cloned()
        .collect::<Vec<_>>()
        .into();
    let v3 = Compiled::build(fewer.into(), 3, Some(&v2)).unwrap();
    assert_eq!(slot_of(&v3, "b"), Some(b));
    assert!(v3.backend(b).unwrap().cluster.is_none());
    assert!(slot_of(&v3, "c").is_none());
}
