//! The proxy's control-plane client against a scripted in-process discovery server: ACK, NACK
//! naming each refused resource and field (its last good version keeps serving, the rest of the
//! response applies), removal, warming order, readiness, and reconnect with the versions held.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::mpsc;

use common::{
    scripted::{Harness, resource},
    *,
};
use trellis_proto::discovery::v1::{
    self as api, CLUSTER_LOAD_ASSIGNMENT_TYPE, CLUSTER_TYPE, DeltaDiscoveryRequest, LISTENER_TYPE,
    ROUTE_CONFIGURATION_TYPE, resource::Kind,
};

fn cluster(name: &str) -> api::Resource {
    resource(
        name,
        "1",
        Kind::Cluster(api::Cluster {
            name: name.into(),
            protocol: api::UpstreamProtocol::Http1 as i32,
            ..Default::default()
        }),
    )
}

fn endpoints(name: &str, version: &str, addrs: &[SocketAddr]) -> api::Resource {
    resource(
        name,
        version,
        Kind::ClusterLoadAssignment(api::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: addrs
                .iter()
                .map(|a| api::Endpoint {
                    address: a.to_string(),
                    weight: 1,
                    health: api::EndpointHealth::Ready as i32,
                    identity: String::new(),
                })
                .collect(),
        }),
    )
}

fn http_listener(name: &str, route_config: &str) -> api::Resource {
    resource(
        name,
        "1",
        Kind::Listener(api::Listener {
            max_connections: None,
            name: name.into(),
            address: "127.0.0.1:0".into(),
            kind: Some(api::listener::Kind::Http(api::HttpListener {
                route_config: route_config.into(),
                ..Default::default()
            })),
        }),
    )
}

fn routes(name: &str, version: &str, cluster: &str, path_regex: Option<&str>) -> api::Resource {
    let path = path_regex.map(|r| api::route_match::Path::Regex(r.into()));
    resource(
        name,
        version,
        Kind::RouteConfiguration(api::RouteConfiguration {
            name: name.into(),
            virtual_hosts: vec![api::VirtualHost {
                name: "all".into(),
                domains: vec!["*".into()],
                routes: vec![api::Route {
                    name: "r".into(),
                    r#match: Some(api::RouteMatch {
                        path,
                        ..Default::default()
                    }),
                    action: Some(api::route::Action::Forward(api::ForwardAction {
                        clusters: vec![api::WeightedCluster {
                            cluster: cluster.into(),
                            weight: 1,
                        }],
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }),
    )
}

/// `routes(...)` with its one route changed by `edit`.
fn routes_with(name: &str, version: &str, edit: impl FnOnce(&mut api::Route)) -> api::Resource {
    let mut r = routes(name, version, "a", None);
    let Some(Kind::RouteConfiguration(rc)) = &mut r.kind else {
        unreachable!()
    };
    edit(&mut rc.virtual_hosts[0].routes[0]);
    r
}

fn subscribed(reqs: &[DeltaDiscoveryRequest], type_url: &str) -> Vec<String> {
    reqs.iter()
        .filter(|r| r.type_url == type_url)
        .flat_map(|r| r.resource_names_subscribe.clone())
        .collect()
}

async fn who(addr: SocketAddr) -> String {
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    resp.headers().get("x-upstream").map_or_else(
        || format!("status {}", resp.status()),
        |v| v.to_str().unwrap().into(),
    )
}

/// Brings the harness to a served listener `l` → routes `r` → cluster `a` (upstream "a").
async fn serve_basic(h: &mut Harness) -> SocketAddr {
    // The first requests: wildcard clusters and listeners, node on the first only.
    let first = h.next_request().await;
    assert_eq!(first.type_url, CLUSTER_TYPE);
    assert_eq!(first.node.as_ref().unwrap().id, "test-proxy");
    let second = h.next_request().await;
    assert_eq!(second.type_url, LISTENER_TYPE);
    assert!(second.node.is_none());

    let (up_a, _) = echo_upstream("a").await;
    let (ack, subs) = h.send(CLUSTER_TYPE, vec![cluster("a")], vec![]).await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert_eq!(subscribed(&subs, CLUSTER_LOAD_ASSIGNMENT_TYPE), ["a"]);
    let (ack, _) = h
        .send(
            CLUSTER_LOAD_ASSIGNMENT_TYPE,
            vec![endpoints("a", "1", &[up_a])],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (ack, subs) = h
        .send(LISTENER_TYPE, vec![http_listener("l", "r")], vec![])
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert_eq!(subscribed(&subs, ROUTE_CONFIGURATION_TYPE), ["r"]);
    // Warming: without its routes the listener is not served.
    assert!(h.proxy.listener_addr("l").await.is_none());
    let (ack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes("r", "1", "a", None)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let addr = h.proxy.listener_addr("l").await.expect("listener served");
    assert_eq!(who(addr).await, "a");
    addr
}

#[tokio::test]
async fn acks_warms_and_serves() {
    let mut h = Harness::start().await.settling();
    serve_basic(&mut h).await;
}

#[tokio::test]
async fn nack_names_the_problem_and_keeps_serving() {
    let mut h = Harness::start().await.settling();
    let addr = serve_basic(&mut h).await;
    let (nack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes("r", "2", "a", Some("("))],
            vec![],
        )
        .await;
    let message = nack.error_detail.expect("NACK").message;
    assert!(
        message.starts_with(
            r#"route config "r": virtual_hosts[0].routes[0].match.path.regex: regex "(" does not compile"#
        ) && !message.contains('\n'),
        "one line naming the resource and the field: {message}"
    );
    assert_eq!(who(addr).await, "a", "the previous routes keep serving");
    // A route to a cluster the proxy does not hold is not refused: that backend's share is
    // answered at request time (as in Envoy and the Gateway API).
    let (ack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes("r", "3", "missing", None)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let status = who(addr).await;
    assert!(status.starts_with("status 5"), "{status}");
    // A resource of the wrong kind is refused too.
    let (nack, _) = h
        .send(CLUSTER_TYPE, vec![http_listener("x", "r")], vec![])
        .await;
    assert!(
        nack.error_detail
            .unwrap()
            .message
            .contains("does not match")
    );
}

#[tokio::test]
async fn retry_policy_from_the_wire_is_served_or_nacked_by_field() {
    let mut h = Harness::start().await.settling();
    let addr = serve_basic(&mut h).await;
    let served_retry = |h: &Harness| {
        let compiled = h.proxy.store().load().expect("a config is served");
        compiled.config.route_configs[0].virtual_hosts[0].routes[0]
            .retry
            .clone()
    };

    let (ack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes_with("r", "2", |r| {
                r.retry = Some(api::RetryPolicy {
                    attempts: Some(1),
                    retry_on: vec!["gateway-error".into()],
                    codes: vec![429],
                    per_try_timeout_ms: 500,
                    ..Default::default()
                });
                r.rate_limit = Some(api::TokenBucket {
                    max_tokens: 1_000,
                    ..Default::default()
                });
            })],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let policy = served_retry(&h);
    assert_eq!(policy.attempts, 1);
    assert_eq!(&*policy.status_codes, [429]);
    assert_eq!(policy.per_try_timeout, Some(Duration::from_millis(500)));
    assert_eq!(who(addr).await, "a");

    for (edit, field, problem) in [
        (
            (|r: &mut api::Route| {
                r.retry = Some(api::RetryPolicy {
                    retry_on: vec!["sometimes".into()],
                    ..Default::default()
                })
            }) as fn(&mut api::Route),
            "retry.retry_on[0]",
            r#"unknown condition "sometimes""#,
        ),
        (
            |r: &mut api::Route| r.rate_limit = Some(api::TokenBucket::default()),
            "rate_limit.max_tokens",
            "must be at least 1",
        ),
    ] {
        let (nack, _) = h
            .send(
                ROUTE_CONFIGURATION_TYPE,
                vec![routes_with("r", "3", edit)],
                vec![],
            )
            .await;
        let message = nack.error_detail.expect("NACK").message;
        assert!(
            message.contains(&format!(
                r#"route config "r": virtual_hosts[0].routes[0].{field}: {problem}"#
            )),
            "{message}"
        );
        assert_eq!(served_retry(&h), policy, "the previous routes keep serving");
    }
}

#[tokio::test]
async fn route_change_waits_for_the_new_clusters_endpoints() {
    let mut h = Harness::start().await.settling();
    let addr = serve_basic(&mut h).await;
    let (up_b, _) = echo_upstream("b").await;
    let (ack, subs) = h.send(CLUSTER_TYPE, vec![cluster("b")], vec![]).await;
    assert!(ack.error_detail.is_none());
    assert_eq!(subscribed(&subs, CLUSTER_LOAD_ASSIGNMENT_TYPE), ["b"]);
    // Routes to b arrive before b's endpoints: ACKed, but the old routes keep serving.
    let (ack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes("r", "2", "b", None)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none());
    assert_eq!(who(addr).await, "a");
    let (ack, _) = h
        .send(
            CLUSTER_LOAD_ASSIGNMENT_TYPE,
            vec![endpoints("b", "1", &[up_b])],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none());
    assert_eq!(who(addr).await, "b");
}

#[tokio::test]
async fn removals_take_effect() {
    let mut h = Harness::start().await.settling();
    let addr = serve_basic(&mut h).await;
    // Endpoint removal within the assignment: no endpoint left.
    let (ack, _) = h
        .send(
            CLUSTER_LOAD_ASSIGNMENT_TYPE,
            vec![endpoints("a", "2", &[])],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none());
    assert_eq!(who(addr).await, "status 503 Service Unavailable");
    // Listener removal: the port closes and the route subscription is dropped.
    let (ack, subs) = h.send(LISTENER_TYPE, vec![], vec!["l".into()]).await;
    assert!(ack.error_detail.is_none());
    assert!(
        subs.iter().any(
            |r| r.type_url == ROUTE_CONFIGURATION_TYPE && r.resource_names_unsubscribe == ["r"]
        )
    );
    assert!(h.proxy.listener_addr("l").await.is_none());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn reconnects_with_held_versions_and_keeps_serving() {
    let mut h = Harness::start().await.settling();
    let addr = serve_basic(&mut h).await;
    // The server drops the stream.
    let (closed_tx, _) = mpsc::channel(1);
    h.responses = closed_tx;
    let (mut requests, responses) = tokio::time::timeout(Duration::from_secs(10), h.streams.recv())
        .await
        .expect("the proxy reconnects")
        .unwrap();
    assert_eq!(
        who(addr).await,
        "a",
        "served while the control plane is away"
    );
    let mut firsts = Vec::new();
    for _ in 0..4 {
        firsts.push(
            tokio::time::timeout(Duration::from_secs(5), requests.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let by_type = |t: &str| firsts.iter().find(|r| r.type_url == t).unwrap().clone();
    assert!(
        firsts[0].node.is_some(),
        "a new stream starts with the node"
    );
    assert_eq!(by_type(CLUSTER_TYPE).initial_resource_versions["a"], "1");
    assert_eq!(by_type(LISTENER_TYPE).initial_resource_versions["l"], "1");
    let cla = by_type(CLUSTER_LOAD_ASSIGNMENT_TYPE);
    assert_eq!(cla.resource_names_subscribe, ["a"]);
    assert_eq!(cla.initial_resource_versions["a"], "1");
    assert_eq!(
        by_type(ROUTE_CONFIGURATION_TYPE).initial_resource_versions["r"],
        "1"
    );
    drop(responses);
}

fn weighted_routes(
    name: &str,
    version: &str,
    clusters: &[&str],
    path_regex: Option<&str>,
) -> api::Resource {
    let mut r = routes(name, version, clusters[0], path_regex);
    let Some(Kind::RouteConfiguration(rc)) = &mut r.kind else {
        unreachable!()
    };
    let Some(api::route::Action::Forward(f)) = &mut rc.virtual_hosts[0].routes[0].action else {
        unreachable!()
    };
    f.clusters = clusters
        .iter()
        .map(|c| api::WeightedCluster {
            cluster: (*c).into(),
            weight: 1,
        })
        .collect();
    r
}

fn listener_at(name: &str, address: &str, route_config: &str) -> api::Resource {
    let mut l = http_listener(name, route_config);
    let Some(Kind::Listener(inner)) = &mut l.kind else {
        unreachable!()
    };
    inner.address = address.into();
    l
}

/// Answers of `count` requests to `addr`, by upstream (or status).
async fn spread(addr: SocketAddr, count: usize) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..count {
        *seen.entry(who(addr).await).or_default() += 1;
    }
    seen
}

fn is_ready(h: &Harness) -> bool {
    trellis_proxy::admin::Lifecycle::default().is_ready(h.proxy.store())
}

fn rejected_total(kind: &str) -> f64 {
    let text = trellis_proxy::telemetry::render(None, false);
    metric(
        &parse_exposition(&text),
        "trellis_xds_resources_rejected_total",
        &[("type", kind)],
    )
    .unwrap_or(0.0)
}

/// The edit "route rule path regex `(` AND backendRef hello-v2 → hello-v1" as the controller sends
/// it: hello-v2's Cluster and ClusterLoadAssignment removed, then the bad RouteConfiguration. The
/// route is refused by name; nothing else is, and the listener keeps serving its last good routes,
/// hello-v2 included (kept, frozen with its endpoints, while a served route uses it).
#[tokio::test]
async fn bad_route_with_backend_switch_keeps_the_listener_serving() {
    let mut h = Harness::start().await.settling();
    let _ = h.next_request().await;
    let _ = h.next_request().await;
    let (v1, _) = echo_upstream("hello-v1").await;
    let (v2, _) = echo_upstream("hello-v2").await;
    let (ack, _) = h
        .send(
            CLUSTER_TYPE,
            vec![cluster("hello-v1"), cluster("hello-v2")],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (ack, _) = h
        .send(
            CLUSTER_LOAD_ASSIGNMENT_TYPE,
            vec![
                endpoints("hello-v1", "1", &[v1]),
                endpoints("hello-v2", "1", &[v2]),
            ],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (ack, _) = h
        .send(LISTENER_TYPE, vec![http_listener("gw", "r")], vec![])
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (ack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![weighted_routes("r", "1", &["hello-v1", "hello-v2"], None)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let addr = h.proxy.listener_addr("gw").await.expect("listener served");
    assert!(is_ready(&h));
    let before = spread(addr, 20).await;
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["hello-v1", "hello-v2"],
        "{before:?}"
    );

    let rejected = rejected_total("route_config");
    let (ack, _) = h.send(CLUSTER_TYPE, vec![], vec!["hello-v2".into()]).await;
    assert!(
        ack.error_detail.is_none(),
        "the cluster removal is accepted: {ack:?}"
    );
    let (ack, _) = h
        .send(
            CLUSTER_LOAD_ASSIGNMENT_TYPE,
            vec![],
            vec!["hello-v2".into()],
        )
        .await;
    assert!(
        ack.error_detail.is_none(),
        "the endpoints removal is accepted: {ack:?}"
    );
    let (nack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![weighted_routes("r", "2", &["hello-v1"], Some("("))],
            vec![],
        )
        .await;
    let message = nack.error_detail.expect("the route is refused").message;
    assert!(
        message.starts_with(
            r#"route config "r": virtual_hosts[0].routes[0].match.path.regex: regex "(" does not compile"#
        ) && message.lines().count() == 1,
        "{message}"
    );
    assert!(rejected_total("route_config") > rejected);

    // The listener is still bound and serves the last good routes, hello-v2 included.
    assert_eq!(h.proxy.listener_addr("gw").await, Some(addr));
    let after = spread(addr, 20).await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["hello-v1", "hello-v2"],
        "{after:?}"
    );
    assert!(is_ready(&h), "/ready stays honest: the listener serves");

    // A good version of the edit moves all traffic to hello-v1 and lets hello-v2 go.
    let (ack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![weighted_routes("r", "3", &["hello-v1"], None)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert_eq!(
        spread(addr, 10).await.keys().collect::<Vec<_>>(),
        ["hello-v1"]
    );
    let compiled = h.proxy.store().load().unwrap();
    assert!(
        !compiled.clusters.contains_key("hello-v2"),
        "no served route uses hello-v2 now"
    );
}

/// Each resource of a response is checked on its own: the bad ones are refused by name, one line
/// each, and the good ones apply.
#[tokio::test]
async fn one_bad_resource_is_refused_alone() {
    let mut h = Harness::start().await.settling();
    let addr = serve_basic(&mut h).await;
    let mut bad = cluster("bad");
    if let Some(Kind::Cluster(c)) = &mut bad.kind {
        c.protocol = 99;
    }
    let rejected = rejected_total("cluster");
    let (nack, subs) = h.send(CLUSTER_TYPE, vec![cluster("b"), bad], vec![]).await;
    let message = nack.error_detail.expect("NACK").message;
    assert!(
        message.starts_with(r#"cluster "bad": protocol: "#) && message.lines().count() == 1,
        "{message}"
    );
    assert!(rejected_total("cluster") > rejected);
    assert_eq!(
        subscribed(&subs, CLUSTER_LOAD_ASSIGNMENT_TYPE),
        ["b"],
        "the good cluster is held"
    );

    // Two route configs in one response: the bad one is refused, the good one applies.
    let (up_b, _) = echo_upstream("b").await;
    let (ack, _) = h
        .send(
            CLUSTER_LOAD_ASSIGNMENT_TYPE,
            vec![endpoints("b", "1", &[up_b])],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (ack, _) = h
        .send(LISTENER_TYPE, vec![http_listener("l2", "r2")], vec![])
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (nack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![
                routes("r", "2", "b", Some("(")),
                routes("r2", "1", "b", None),
            ],
            vec![],
        )
        .await;
    let message = nack.error_detail.expect("NACK").message;
    assert!(message.starts_with(r#"route config "r": "#), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
    assert_eq!(who(addr).await, "a", "r keeps its last good version");
    let addr2 = h.proxy.listener_addr("l2").await.expect("l2 served");
    assert_eq!(who(addr2).await, "b");

    // A listener without a kind is refused by name; its sibling in the response is served.
    let (nack, _) = h
        .send(
            LISTENER_TYPE,
            vec![
                resource(
                    "broken",
                    "1",
                    Kind::Listener(api::Listener {
                        max_connections: None,
                        name: "broken".into(),
                        address: "127.0.0.1:0".into(),
                        kind: None,
                    }),
                ),
                http_listener("l3", "r"),
            ],
            vec![],
        )
        .await;
    let message = nack.error_detail.expect("NACK").message;
    assert!(
        message.starts_with(r#"listener "broken": kind: "#),
        "{message}"
    );
    let addr3 = h.proxy.listener_addr("l3").await.expect("l3 served");
    assert_eq!(who(addr3).await, "a");
}

/// `/ready` is 503 while a listener the configuration holds is not serving, and says which.
#[tokio::test]
async fn readiness_names_a_listener_that_is_not_serving() {
    let mut h = Harness::start().await.settling();
    serve_basic(&mut h).await;
    let (admin, _) = start_admin(&h.proxy).await;
    let ready = |admin| async move {
        let (resp, body) = get(&h1_client(), &format!("http://{admin}/ready")).await;
        (
            resp.status().as_u16(),
            String::from_utf8_lossy(&body).into_owned(),
        )
    };
    assert_eq!(ready(admin).await.0, 200);

    let (ack, _) = h
        .send(LISTENER_TYPE, vec![http_listener("l2", "r2")], vec![])
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (status, body) = ready(admin).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(r#"listener "l2" not serving: waiting for route config "r2""#),
        "{body}"
    );
    assert_eq!(
        metric(&scrape(admin).await, "trellis_ready", &[]),
        Some(0.0)
    );

    let (ack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes("r2", "1", "a", None)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert_eq!(ready(admin).await, (200, "ready\n".to_owned()));
    assert_eq!(
        metric(&scrape(admin).await, "trellis_ready", &[]),
        Some(1.0)
    );

    // A route config naming a cluster whose endpoints have not arrived keeps l2 warming on its
    // last good routes: it serves, so readiness stays.
    let (ack, _) = h.send(CLUSTER_TYPE, vec![cluster("c")], vec![]).await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (ack, _) = h
        .send(LISTENER_TYPE, vec![http_listener("l4", "r4")], vec![])
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (ack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes("r4", "1", "c", None)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (status, body) = ready(admin).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(r#"listener "l4" not serving: waiting for the endpoints of cluster "c""#),
        "{body}"
    );

    // A listener whose first route config is refused says so, rather than that it waits.
    let (ack, _) = h
        .send(LISTENER_TYPE, vec![http_listener("l5", "r5")], vec![])
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (nack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes("r5", "1", "a", Some("("))],
            vec![],
        )
        .await;
    assert!(nack.error_detail.is_some());
    let (_, body) = ready(admin).await;
    assert!(
        body.contains(
            r#"listener "l5" not serving: route config "r5" was refused: virtual_hosts[0].routes[0].match.path.regex: regex "(" does not compile"#
        ),
        "{body}"
    );
}

/// A listener whose address is taken is refused by name; the rest of the response applies, and
/// readiness says which listener does not serve.
#[tokio::test]
async fn a_listener_that_cannot_bind_is_refused_alone() {
    let mut h = Harness::start().await.settling();
    serve_basic(&mut h).await;
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let (nack, _) = h
        .send(
            LISTENER_TYPE,
            vec![
                listener_at("l2", &taken_addr, "r"),
                listener_at("l3", "127.0.0.1:0", "r"),
            ],
            vec![],
        )
        .await;
    let message = nack.error_detail.expect("NACK").message;
    assert!(
        message.starts_with(&format!(
            r#"listener "l2": address: cannot bind {taken_addr}: "#
        )) && message.lines().count() == 1,
        "{message}"
    );
    let addr3 = h.proxy.listener_addr("l3").await.expect("l3 served");
    assert_eq!(who(addr3).await, "a");
    assert!(h.proxy.listener_addr("l2").await.is_none());
    assert!(!is_ready(&h));
    let reasons = h.proxy.store().not_serving();
    assert!(
        reasons.iter().any(|r| r.starts_with(&format!(
            r#"listener "l2" not serving: address: cannot bind {taken_addr}"#
        ))),
        "{reasons:?}"
    );
    // Once the address is free, the next update binds it.
    drop(taken);
    let (ack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes("r", "2", "a", None)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert!(h.proxy.listener_addr("l2").await.is_some());
    assert!(is_ready(&h));

    // Two listeners given one address: the second is refused by name, the first serves.
    let l2 = h.proxy.listener_addr("l2").await.unwrap().to_string();
    let (nack, _) = h
        .send(
            LISTENER_TYPE,
            vec![
                listener_at("l9", &l2, "r"),
                listener_at("l8", "127.0.0.1:0", "r"),
            ],
            vec![],
        )
        .await;
    let message = nack.error_detail.expect("NACK").message;
    assert_eq!(
        message,
        format!(r#"listener "l9": address: {l2} is used by listener "l2""#)
    );
    assert!(h.proxy.listener_addr("l8").await.is_some());
    assert_eq!(h.proxy.listener_addr("l2").await.unwrap().to_string(), l2);
}

/// A bootstrap file valid on its own stays valid beside the control plane's route configs: its
/// listener without `route_config` keeps the file's only route config.
#[tokio::test]
async fn static_part_stays_valid_beside_dynamic_route_configs() {
    let file = trellis_proxy::config::bootstrap::parse(
        r#"
xds: { address: "127.0.0.1:1" }
listeners:
  - { name: s, address: "127.0.0.1:0" }
route_configs:
  - name: local
    virtual_hosts:
      - name: vh
        domains: ["*"]
        routes:
          - { name: hi, direct_response: { status: 200, body: hi } }
"#,
    )
    .unwrap();
    let mut h = Harness::start_with(file).await.settling();
    serve_basic(&mut h).await;
    let s = h
        .proxy
        .listener_addr("s")
        .await
        .expect("the static listener serves");
    let (resp, body) = get(&h1_client(), &format!("http://{s}/")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body, "hi");
}

/// Log lines written while it is installed on this thread.
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A gateway proxy that the control plane sends no listener says what to check.
#[tokio::test]
async fn a_gateway_without_listeners_logs_a_hint() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The test's runtime is single-threaded, so the client's task logs on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let mut h = Harness::start_client(Default::default(), api::Role::Gateway, |c| {
        c.no_listener_hint_after(Duration::from_millis(200))
    })
    .await
    .settling();
    let _ = h.next_request().await;
    let (ack, _) = h.send(CLUSTER_TYPE, vec![cluster("a")], vec![]).await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let hint = "check that the Gateway named by --gateway exists";
    eventually(Duration::from_secs(5), "the hint is logged", || {
        let logs = logs.clone();
        async move { String::from_utf8_lossy(&logs.0.lock().unwrap()).contains(hint) }
    })
    .await;
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(text.contains("WARN"), "{text}");
    assert!(text.contains("gateway=gw"), "{text}");
}
