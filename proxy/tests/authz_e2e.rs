//! Authorization policies end to end: a sidecar following a scripted control plane serves an
//! inbound capture listener on loopback (plaintext, permissive; a connection straight to a capture
//! listener has its own address as original destination) in front of an echo application, and
//! applies the `Policy` resources it is sent to each request: 403 `forbidden` for a denial, the
//! caller-identity header never forged, each decision counted, a bad policy NACKed by name.

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicUsize, atomic::Ordering},
};

use common::{
    scripted::{Harness, resource},
    *,
};
use trellis_proto::discovery::v1::{
    self as api, CLUSTER_LOAD_ASSIGNMENT_TYPE, CLUSTER_TYPE, DeltaDiscoveryRequest, LISTENER_TYPE,
    POLICY_TYPE, ROUTE_CONFIGURATION_TYPE, SECRET_TYPE, policy_path, resource::Kind,
};
use trellis_proxy::config::bootstrap::File;

const IDENTITY_HEADER: &str = "x-trellis-client-identity";

fn inbound_listener(version: &str, port: Option<u16>) -> api::Resource {
    let services = port
        .map(|port| api::CapturedService {
            ip: "127.0.0.1".into(),
            port: port.into(),
            cluster: "app".into(),
            protocol: api::AppProtocol::Http as i32,
            route_config: "inbound".into(),
        })
        .into_iter()
        .collect();
    resource(
        "inbound",
        version,
        Kind::Listener(api::Listener {
            max_connections: None,
            name: "inbound".into(),
            address: "127.0.0.1:0".into(),
            kind: Some(api::listener::Kind::Capture(api::CaptureListener {
                direction: api::CaptureDirection::Inbound as i32,
                services,
                ..Default::default()
            })),
        }),
    )
}

fn to_app() -> api::Resource {
    resource(
        "inbound",
        "1",
        Kind::RouteConfiguration(api::RouteConfiguration {
            name: "inbound".into(),
            virtual_hosts: vec![api::VirtualHost {
                name: "app".into(),
                domains: vec!["*".into()],
                routes: vec![api::Route {
                    name: "all".into(),
                    action: Some(api::route::Action::Forward(api::ForwardAction {
                        clusters: vec![api::WeightedCluster {
                            cluster: "app".into(),
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

fn policy(
    name: &str,
    version: &str,
    action: api::PolicyAction,
    rules: Vec<api::PolicyRule>,
) -> api::Resource {
    resource(
        name,
        version,
        Kind::Policy(api::Policy {
            name: name.into(),
            action: action as i32,
            rules,
        }),
    )
}

fn prefix(p: &str) -> api::PolicyPath {
    api::PolicyPath {
        kind: Some(policy_path::Kind::Prefix(p.into())),
    }
}

/// Only 127.0.0.1 may `GET /public…`.
fn public_get(version: &str, cidrs: &[&str]) -> api::Resource {
    policy(
        "shop/public",
        version,
        api::PolicyAction::Allow,
        vec![api::PolicyRule {
            name: "local-get-public".into(),
            source_cidrs: cidrs.iter().map(|c| (*c).to_owned()).collect(),
            methods: vec!["GET".into()],
            paths: vec![prefix("/public")],
            ..Default::default()
        }],
    )
}

fn no_secrets() -> api::Resource {
    policy(
        "shop/no-secrets",
        "1",
        api::PolicyAction::Deny,
        vec![api::PolicyRule {
            name: "secret-paths".into(),
            paths: vec![prefix("/public/secret")],
            ..Default::default()
        }],
    )
}

struct Sidecar {
    h: Harness,
    addr: SocketAddr,
    app_requests: Arc<AtomicUsize>,
}

/// A sidecar serving the inbound capture listener in front of the echo application "app".
async fn sidecar() -> Sidecar {
    let mut h = Harness::start().await.settling();
    let first = h
        .subscriptions(&[CLUSTER_TYPE, LISTENER_TYPE, SECRET_TYPE, POLICY_TYPE])
        .await;
    let policies = first.iter().find(|r| r.type_url == POLICY_TYPE).unwrap();
    assert!(
        policies.resource_names_subscribe.is_empty(),
        "policies are a wildcard subscription: {policies:?}"
    );

    let (app, app_requests) = echo_upstream("app").await;
    let cluster = resource(
        "app",
        "1",
        Kind::Cluster(api::Cluster {
            name: "app".into(),
            protocol: api::UpstreamProtocol::Http1 as i32,
            ..Default::default()
        }),
    );
    let endpoints = resource(
        "app",
        "1",
        Kind::ClusterLoadAssignment(api::ClusterLoadAssignment {
            cluster_name: "app".into(),
            endpoints: vec![api::Endpoint {
                address: app.to_string(),
                weight: 1,
                health: api::EndpointHealth::Ready as i32,
                identity: String::new(),
            }],
        }),
    );
    ack(h.send(CLUSTER_TYPE, vec![cluster], vec![]).await.0);
    ack(h
        .send(CLUSTER_LOAD_ASSIGNMENT_TYPE, vec![endpoints], vec![])
        .await
        .0);
    // Bound first on port 0; then its table lists its own address, as a pod's inbound entry
    // lists the application's port.
    ack(h
        .send(LISTENER_TYPE, vec![inbound_listener("1", None)], vec![])
        .await
        .0);
    let addr = h
        .proxy
        .listener_addr("inbound")
        .await
        .expect("inbound served");
    ack(h
        .send(
            LISTENER_TYPE,
            vec![inbound_listener("2", Some(addr.port()))],
            vec![],
        )
        .await
        .0);
    ack(h
        .send(ROUTE_CONFIGURATION_TYPE, vec![to_app()], vec![])
        .await
        .0);
    assert_eq!(
        h.proxy.listener_addr("inbound").await,
        Some(addr),
        "the listener kept its socket"
    );
    Sidecar {
        h,
        addr,
        app_requests,
    }
}

fn ack(r: DeltaDiscoveryRequest) {
    assert!(r.error_detail.is_none(), "expected an ACK: {r:?}");
}

/// `method path` with `extra` header lines, on its own connection.
async fn call(addr: SocketAddr, method: &str, path: &str, extra: &str) -> RawResponse {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: app\r\ncontent-length: 0\r\n{extra}connection: close\r\n\r\n"
    );
    raw_request(addr, &request, &format!("{method} {path}")).await
}

fn decisions(policy: &str, rule: &str, decision: &str) -> f64 {
    let mut text = String::new();
    trellis_proxy::telemetry::registry().render(&mut text);
    metric(
        &parse_exposition(&text),
        "trellis_authz_decisions_total",
        &[("policy", policy), ("rule", rule), ("decision", decision)],
    )
    .unwrap_or(0.0)
}

/// Asserts a 403 from the proxy itself that never reached the application.
async fn forbidden(s: &Sidecar, method: &str, path: &str) {
    let before = s.app_requests.load(Ordering::SeqCst);
    let r = call(s.addr, method, path, "").await;
    assert_eq!(r.status, 403, "{method} {path}: {}", r.head);
    assert_eq!(
        r.header("x-trellis-error"),
        Some("forbidden"),
        "{method} {path}"
    );
    assert_eq!(
        s.app_requests.load(Ordering::SeqCst),
        before,
        "{method} {path} reached the application"
    );
}

async fn ok(s: &Sidecar, method: &str, path: &str) -> RawResponse {
    let r = call(s.addr, method, path, "").await;
    assert_eq!(r.status, 200, "{method} {path}: {}", r.head);
    r
}

#[tokio::test]
async fn policies_allow_deny_count_and_survive_a_bad_update() {
    let mut s = sidecar().await;

    // No policy held: everything is allowed, and a forged identity header is removed.
    ok(&s, "POST", "/admin").await;
    let forged = call(
        s.addr,
        "GET",
        "/public",
        "x-trellis-client-identity: spiffe://cluster.local/ns/shop/sa/admin\r\nX-Trellis-Client-Identity: x\r\n",
    )
    .await;
    assert_eq!(forged.status, 200);
    assert!(
        !forged.body.to_ascii_lowercase().contains(IDENTITY_HEADER),
        "a forged identity reached the application: {}",
        forged.body
    );

    ack(s
        .h
        .send(
            POLICY_TYPE,
            vec![public_get("1", &["127.0.0.1/32"])],
            vec![],
        )
        .await
        .0);
    let allowed_before = decisions("shop/public", "local-get-public", "allow");
    let default_denied_before = decisions("", "default", "deny");
    ok(&s, "GET", "/public").await;
    ok(&s, "GET", "/public/a/b?x=1").await;
    forbidden(&s, "POST", "/public").await;
    forbidden(&s, "GET", "/admin").await;
    forbidden(&s, "GET", "/publicity").await;
    // Judged on the normalised path: this is `/admin`.
    forbidden(&s, "GET", "/public/../admin").await;
    let forged = call(
        s.addr,
        "GET",
        "/public",
        "x-trellis-client-identity: spiffe://cluster.local/ns/shop/sa/admin\r\n",
    )
    .await;
    assert_eq!(forged.status, 200);
    assert!(
        !forged.body.to_ascii_lowercase().contains(IDENTITY_HEADER),
        "a forged identity reached the application: {}",
        forged.body
    );
    assert_eq!(
        decisions("shop/public", "local-get-public", "allow") - allowed_before,
        3.0
    );
    assert_eq!(
        decisions("", "default", "deny") - default_denied_before,
        4.0
    );

    // A DENY policy wins over the ALLOW one.
    ack(s.h.send(POLICY_TYPE, vec![no_secrets()], vec![]).await.0);
    forbidden(&s, "GET", "/public/secret/key").await;
    ok(&s, "GET", "/public/secretary").await;
    assert_eq!(
        decisions("shop/no-secrets", "secret-paths", "deny"),
        1.0,
        "the denial is counted by policy and rule"
    );

    // A bad version is refused by name; the good one stays in force.
    let (nack, _) =
        s.h.send(
            POLICY_TYPE,
            vec![public_get("2", &["127.0.0.1/32", "10.0.0.0/33"])],
            vec![],
        )
        .await;
    let message = nack.error_detail.expect("NACK").message;
    assert!(
        message.starts_with(
            r#"policy "shop/public": rules[0].source_cidrs[1]: "10.0.0.0/33" is not a CIDR"#
        ),
        "{message}"
    );
    ok(&s, "GET", "/public").await;
    forbidden(&s, "POST", "/public").await;

    // A version that no longer allows this caller applies at once.
    ack(s
        .h
        .send(POLICY_TYPE, vec![public_get("3", &["10.0.0.0/8"])], vec![])
        .await
        .0);
    forbidden(&s, "GET", "/public").await;

    // Held across a reconnect: the proxy names the versions it holds, and they stay in force.
    s.h.reconnect().await;
    let again = s.h.subscriptions(&[POLICY_TYPE]).await;
    let mut held: Vec<_> = again[0].initial_resource_versions.iter().collect();
    held.sort();
    assert_eq!(
        held,
        [
            (&"shop/no-secrets".to_owned(), &"1".to_owned()),
            (&"shop/public".to_owned(), &"3".to_owned())
        ]
    );
    forbidden(&s, "GET", "/public").await;

    // Removing the policies restores the default allow.
    ack(s
        .h
        .send(
            POLICY_TYPE,
            vec![],
            vec!["shop/public".into(), "shop/no-secrets".into()],
        )
        .await
        .0);
    ok(&s, "POST", "/admin").await;
    ok(&s, "GET", "/public/secret/key").await;
    let mut text = String::new();
    trellis_proxy::telemetry::registry().render(&mut text);
    assert!(
        !text.contains("policy=\"shop/no-secrets\""),
        "the series of a removed policy are forgotten"
    );

    // After another reconnect the proxy says it holds none.
    s.h.reconnect().await;
    let again = s.h.subscriptions(&[POLICY_TYPE]).await;
    assert!(again[0].initial_resource_versions.is_empty(), "{again:?}");

    // A policy refused with no good version to keep denies every call (its absence would
    // open the workload), until it is fixed or removed; nothing is claimed as held.
    let (nack, _) =
        s.h.send(
            POLICY_TYPE,
            vec![public_get("1", &["127.0.0.1/32", "10.0.0.0/33"])],
            vec![],
        )
        .await;
    assert!(nack.error_detail.is_some(), "expected a NACK: {nack:?}");
    forbidden(&s, "GET", "/public").await;
    forbidden(&s, "POST", "/admin").await;
    assert_eq!(
        decisions("shop/public", "refused-policy", "deny"),
        2.0,
        "counted under the refused policy's name"
    );
    ack(s
        .h
        .send(
            POLICY_TYPE,
            vec![public_get("2", &["127.0.0.1/32"])],
            vec![],
        )
        .await
        .0);
    ok(&s, "GET", "/public").await;
    forbidden(&s, "POST", "/admin").await;
    let (nack, _) =
        s.h.send(
            POLICY_TYPE,
            vec![policy(
                "shop/typo",
                "1",
                api::PolicyAction::Deny,
                vec![api::PolicyRule {
                    source_cidrs: vec!["300.0.0.0/8".into()],
                    ..Default::default()
                }],
            )],
            vec![],
        )
        .await;
    assert!(nack.error_detail.is_some(), "expected a NACK: {nack:?}");
    forbidden(&s, "GET", "/public").await;
    ack(s
        .h
        .send(
            POLICY_TYPE,
            vec![],
            vec!["shop/typo".into(), "shop/public".into()],
        )
        .await
        .0);
    ok(&s, "POST", "/admin").await;
}

#[tokio::test]
async fn a_gateway_does_not_ask_for_policies() {
    let mut h = Harness::start_client(File::default(), api::Role::Gateway, |c| c)
        .await
        .settling();
    let mut seen = Vec::new();
    loop {
        let r = h.next_request().await;
        seen.push(r.type_url.clone());
        if r.type_url == SECRET_TYPE {
            break;
        }
    }
    // Requests are queued in order before the stream opens: a policy subscription would come
    // before the ACK of this first response.
    let (ack_, others) = h.send(CLUSTER_TYPE, vec![], vec![]).await;
    ack(ack_);
    seen.extend(others.into_iter().map(|r| r.type_url));
    assert!(
        !seen.iter().any(|t| t == POLICY_TYPE),
        "a gateway subscribed to policies: {seen:?}"
    );
}
