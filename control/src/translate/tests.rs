//! Catalog → resources, table-style: each case is manifests, a node, and what must hold.

use std::collections::BTreeMap;

use trellis_proto::discovery::v1::{self as api, listener, resource::Kind, route};

use super::*;
use crate::{
    resource::{ResourceType, Snapshot},
    source::manifest::parse_documents,
};

fn catalog(yaml: &str) -> Catalog {
    Catalog::from_manifests(&parse_documents(yaml).expect("test manifests parse"))
}

fn sidecar(labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        id: "pod-1.shop".into(),
        role: Role::Sidecar,
        namespace: "shop".into(),
        service_account: "web".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        gateway: None,
    }
}

fn gateway() -> NodeInfo {
    NodeInfo {
        id: "gw-1".into(),
        role: Role::Gateway,
        namespace: "shop".into(),
        service_account: "gw".into(),
        labels: BTreeMap::new(),
        gateway: Some(ObjectKey::new("shop", "ingress")),
    }
}

fn names(s: &Snapshot, t: ResourceType) -> Vec<&str> {
    s.of_type(t).keys().map(String::as_str).collect()
}

fn cluster(s: &Snapshot, name: &str) -> api::Cluster {
    match &s
        .get(ResourceType::Cluster, name)
        .expect(name)
        .resource
        .kind
    {
        Some(Kind::Cluster(c)) => c.clone(),
        other => panic!("{other:?}"),
    }
}

fn endpoints(s: &Snapshot, name: &str) -> Vec<(String, i32)> {
    match &s
        .get(ResourceType::ClusterLoadAssignment, name)
        .expect(name)
        .resource
        .kind
    {
        Some(Kind::ClusterLoadAssignment(c)) => c
            .endpoints
            .iter()
            .map(|e| (e.address.clone(), e.health))
            .collect(),
        other => panic!("{other:?}"),
    }
}

fn listener(s: &Snapshot, name: &str) -> api::Listener {
    match &s
        .get(ResourceType::Listener, name)
        .expect(name)
        .resource
        .kind
    {
        Some(Kind::Listener(l)) => l.clone(),
        other => panic!("{other:?}"),
    }
}

fn route_config(s: &Snapshot, name: &str) -> api::RouteConfiguration {
    match &s
        .get(ResourceType::RouteConfiguration, name)
        .expect(name)
        .resource
        .kind
    {
        Some(Kind::RouteConfiguration(r)) => r.clone(),
        other => panic!("{other:?}"),
    }
}

fn forward(r: &api::Route) -> Vec<(String, u32)> {
    match &r.action {
        Some(route::Action::Forward(f)) => f
            .clusters
            .iter()
            .map(|c| (c.cluster.clone(), c.weight))
            .collect(),
        other => panic!("{other:?}"),
    }
}

const WEB: &str = "
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

const DB: &str = "
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.13
  ports: [{name: postgres, port: 5432}]
";

const HEADLESS: &str = "
kind: Service
metadata: {name: stateful, namespace: shop}
spec:
  clusterIP: None
  ports: [{name: http, port: 80}]
";

const API: &str = "
kind: Service
metadata: {name: api, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: grpc, port: 9090, appProtocol: kubernetes.io/h2c}]
";

fn slice(service: &str, endpoints: &str) -> String {
    format!(
        "
kind: EndpointSlice
metadata:
  name: {service}-x
  namespace: shop
  labels: {{kubernetes.io/service-name: {service}}}
ports: [{{name: http, port: 8080}}]
endpoints: {endpoints}
"
    )
}

type Check = fn(&Snapshot);
type SidecarCase = (
    &'static str,
    String,
    Vec<(&'static str, &'static str)>,
    Check,
);

#[test]
fn sidecar_cases() {
    let cases: Vec<SidecarCase> = vec![
        (
            "capture none: http port: cluster, endpoints, http listener with a default route",
            format!("{WEB}---{}", slice("web", "[{addresses: [10.0.0.2]}, {addresses: [10.0.0.1]}]")),
            vec![],
            |s| {
                assert_eq!(names(s, ResourceType::Cluster), ["shop/web:80"]);
                let c = cluster(s, "shop/web:80");
                assert_eq!(c.protocol(), api::UpstreamProtocol::Http1);
                assert_eq!(c.connect_timeout_ms, 5_000);
                assert_eq!(
                    endpoints(s, "shop/web:80"),
                    [("10.0.0.1:8080".into(), 1), ("10.0.0.2:8080".into(), 1)]
                );
                let l = listener(s, "outbound/shop/web:80");
                assert_eq!(l.address, "10.96.0.10:80");
                assert_eq!(
                    l.kind,
                    Some(listener::Kind::Http(api::HttpListener {
                        route_config: "outbound/shop/web:80".into(),
                        ..Default::default()
                    }))
                );
                let rc = route_config(s, "outbound/shop/web:80");
                assert_eq!(rc.virtual_hosts[0].domains, ["*"]);
                assert_eq!(forward(&rc.virtual_hosts[0].routes[0]), [("shop/web:80".into(), 1)]);
            },
        ),
        (
            "capture none: tcp port: tcp listener, no route config",
            DB.to_owned(),
            vec![],
            |s| {
                let l = listener(s, "outbound/shop/db:5432");
                assert!(matches!(l.kind, Some(listener::Kind::Tcp(ref t)) if t.cluster == "shop/db:5432"));
                assert!(s.of_type(ResourceType::RouteConfiguration).is_empty());
            },
        ),
        (
            "capture none: headless service: cluster but no listener",
            HEADLESS.to_owned(),
            vec![],
            |s| {
                assert_eq!(names(s, ResourceType::Cluster), ["shop/stateful:80"]);
                assert!(s.of_type(ResourceType::Listener).is_empty());
            },
        ),
        (
            "h2c appProtocol: http2 cluster",
            API.to_owned(),
            vec![],
            |s| assert_eq!(cluster(s, "shop/api:9090").protocol(), api::UpstreamProtocol::Http2),
        ),
        (
            "terminating endpoints excluded while any is ready",
            format!(
                "{WEB}---{}",
                slice(
                    "web",
                    "[{addresses: [10.0.0.1], conditions: {ready: true}},
                      {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}},
                      {addresses: [10.0.0.3], conditions: {ready: false}}]"
                )
            ),
            vec![],
            |s| assert_eq!(endpoints(s, "shop/web:80"), [("10.0.0.1:8080".into(), 1)]),
        ),
        (
            "serving terminating endpoints used when none is ready",
            format!(
                "{WEB}---{}",
                slice(
                    "web",
                    "[{addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}},
                      {addresses: [10.0.0.3], conditions: {ready: false, serving: false, terminating: true}}]"
                )
            ),
            vec![],
            |s| assert_eq!(endpoints(s, "shop/web:80"), [("10.0.0.2:8080".into(), 2)]),
        ),
        (
            "GAMMA route replaces the default route, weights carried",
            format!(
                "{WEB}---{DB}---
kind: HTTPRoute
metadata: {{name: split, namespace: shop}}
spec:
  parentRefs: [{{kind: Service, group: '', name: web, port: 80}}]
  rules:
    - matches: [{{path: {{type: Exact, value: /x}}, method: POST, headers: [{{name: x-a, value: b}}]}}]
      backendRefs: [{{name: web, weight: 3}}, {{name: missing, port: 80}}]
      timeouts: {{request: 2s}}
"
            ),
            vec![],
            |s| {
                let rc = route_config(s, "outbound/shop/web:80");
                let routes = &rc.virtual_hosts[0].routes;
                assert_eq!(routes.len(), 1);
                let r = &routes[0];
                assert_eq!(r.name, "shop/split/0/0");
                // The missing backend keeps its share under its would-be name, with no
                // cluster: the proxy answers that share 500.
                assert_eq!(
                    forward(r),
                    [("shop/web:80".into(), 3), ("shop/missing:80".into(), 1)]
                );
                assert!(s.get(ResourceType::Cluster, "shop/missing:80").is_none());
                assert_eq!(r.timeout_ms, Some(2_000));
                assert_eq!(r.retry, None, "no retry stanza: the proxy's default policy");
                let m = r.r#match.as_ref().unwrap();
                assert_eq!(m.path, Some(api::route_match::Path::Exact("/x".into())));
                assert_eq!(m.method, "POST");
                assert_eq!(m.headers[0].name, "x-a");
            },
        ),
        (
            "retry and backendRequest become the route's retry policy; the rest left to the proxy",
            format!(
                "{WEB}---
kind: HTTPRoute
metadata: {{name: retries, namespace: shop}}
spec:
  parentRefs: [{{kind: Service, group: '', name: web, port: 80}}]
  rules:
    - matches: [{{path: {{value: /full}}}}]
      backendRefs: [{{name: web}}]
      retry: {{codes: [502, 503], attempts: 3, backoff: 50ms}}
      timeouts: {{request: 10s, backendRequest: 2s}}
    - matches: [{{path: {{value: /off}}}}]
      backendRefs: [{{name: web}}]
      retry: {{attempts: 0}}
    - matches: [{{path: {{value: /per-try}}}}]
      backendRefs: [{{name: web}}]
      timeouts: {{backendRequest: 1500ms}}
    - matches: [{{path: {{value: /codes-only}}}}]
      backendRefs: [{{name: web}}]
      retry: {{codes: [504]}}
"
            ),
            vec![],
            |s| {
                let rc = route_config(s, "outbound/shop/web:80");
                let retry = |name: &str| {
                    rc.virtual_hosts[0]
                        .routes
                        .iter()
                        .find(|r| r.name == name)
                        .expect(name)
                        .retry
                        .clone()
                };
                let full = &rc.virtual_hosts[0].routes[0];
                assert_eq!(full.timeout_ms, Some(10_000));
                assert_eq!(
                    retry("shop/retries/0/0"),
                    Some(api::RetryPolicy {
                        attempts: Some(3),
                        backoff_ms: 50,
                        codes: vec![502, 503],
                        per_try_timeout_ms: 2_000,
                        ..Default::default()
                    })
                );
                assert_eq!(
                    retry("shop/retries/1/0"),
                    Some(api::RetryPolicy {
                        attempts: Some(0),
                        ..Default::default()
                    })
                );
                assert_eq!(
                    retry("shop/retries/2/0"),
                    Some(api::RetryPolicy {
                        per_try_timeout_ms: 1_500,
                        ..Default::default()
                    })
                );
                // No attempts: unset, so the proxy's default count.
                assert_eq!(
                    retry("shop/retries/3/0"),
                    Some(api::RetryPolicy {
                        codes: vec![504],
                        ..Default::default()
                    })
                );
            },
        ),
        (
            "capture none: inbound listener for a selecting service, bound on the pod IP",
            WEB.to_owned(),
            vec![("app", "web"), ("trellis.io/pod-ip", "10.0.0.1")],
            |s| {
                let l = listener(s, "inbound/8080");
                assert_eq!(l.address, "10.0.0.1:8080");
                assert_eq!(endpoints(s, "inbound/8080"), [("127.0.0.1:8080".into(), 1)]);
            },
        ),
        (
            "capture none: no inbound listener without the pod-ip label",
            WEB.to_owned(),
            vec![("app", "web")],
            |s| assert!(s.get(ResourceType::Listener, "inbound/8080").is_none()),
        ),
    ];
    for (name, yaml, labels, check) in cases {
        eprintln!("case: {name}");
        let mut labels = labels;
        // The per-ClusterIP listeners are the opt-in mode for machines without iptables.
        if name.starts_with("capture none:") {
            labels.push(("trellis.io/capture", "none"));
        }
        check(&translate(&catalog(&yaml), &sidecar(&labels)));
    }
}

fn capture(s: &Snapshot, name: &str) -> (String, api::CaptureListener) {
    let l = listener(s, name);
    match l.kind {
        Some(listener::Kind::Capture(c)) => (l.address, c),
        other => panic!("{name}: {other:?}"),
    }
}

fn entry(
    ip: &str,
    port: u32,
    cluster: &str,
    protocol: api::AppProtocol,
    rc: &str,
) -> api::CapturedService {
    api::CapturedService {
        ip: ip.into(),
        port,
        cluster: cluster.into(),
        protocol: protocol.into(),
        route_config: rc.into(),
    }
}

const PROTOCOLS: &str = "
kind: Service
metadata: {name: mixed, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, 'fd00::20']
  ports:
    - {name: web, port: 80, appProtocol: http}
    - {name: grpc-api, port: 81}
    - {name: h2, port: 82, appProtocol: kubernetes.io/h2c}
    - {name: raw, port: 83, appProtocol: tcp}
    - {name: tls, port: 84}
    - {name: mysql, port: 3306}
";

#[test]
fn sidecar_capture_cases() {
    use api::AppProtocol as P;
    let cases: Vec<SidecarCase> = vec![
        (
            "one outbound capture listener maps each ClusterIP:port; no listener per ClusterIP",
            format!("{WEB}---{DB}---{HEADLESS}---{API}"),
            vec![],
            |s| {
                assert_eq!(
                    names(s, ResourceType::Listener),
                    ["capture/inbound", "capture/outbound"]
                );
                let (address, c) = capture(s, "capture/outbound");
                assert_eq!(address, "0.0.0.0:15001");
                assert_eq!(c.direction(), api::CaptureDirection::Outbound);
                assert_eq!(c.unknown_destination(), api::UnknownDestination::Allow);
                // Catalog order (namespace/name), then port; the headless service has no entry.
                assert_eq!(
                    c.services,
                    [
                        entry("10.96.0.11", 9090, "shop/api:9090", P::Http2, "outbound/shop/api:9090"),
                        // A port of unknown protocol with no route attached: detection decides,
                        // and HTTP goes to the cluster with no route configuration.
                        entry("10.96.0.13", 5432, "shop/db:5432", P::Detect, ""),
                        entry("10.96.0.10", 80, "shop/web:80", P::Http, "outbound/shop/web:80"),
                    ]
                );
                // The HTTP ports keep their GAMMA route configuration under today's name.
                assert_eq!(
                    names(s, ResourceType::RouteConfiguration),
                    ["outbound/shop/api:9090", "outbound/shop/web:80"]
                );
                let rc = route_config(s, "outbound/shop/web:80");
                assert_eq!(forward(&rc.virtual_hosts[0].routes[0]), [("shop/web:80".into(), 1)]);
                // The clusters stay, headless included (routes may name it).
                assert_eq!(
                    names(s, ResourceType::Cluster),
                    ["shop/api:9090", "shop/db:5432", "shop/stateful:80", "shop/web:80"]
                );
                // No Service selects this pod: an inbound listener with no entries, which
                // passes every connection to the application (default allow).
                let (address, c) = capture(s, "capture/inbound");
                assert_eq!(address, "0.0.0.0:15006");
                assert_eq!(c.direction(), api::CaptureDirection::Inbound);
                assert!(c.services.is_empty());
                assert_eq!(c.unknown_destination(), api::UnknownDestination::Allow);
            },
        ),
        (
            "declared protocols from appProtocol or the port name; IPv4 and IPv6 ClusterIPs",
            PROTOCOLS.to_owned(),
            vec![],
            |s| {
                let (_, c) = capture(s, "capture/outbound");
                let mut want = Vec::new();
                for ip in ["10.96.0.20", "fd00::20"] {
                    want.extend([
                        entry(ip, 80, "shop/mixed:80", P::Http, "outbound/shop/mixed:80"),
                        entry(ip, 81, "shop/mixed:81", P::Http2, "outbound/shop/mixed:81"),
                        entry(ip, 82, "shop/mixed:82", P::Http2, "outbound/shop/mixed:82"),
                        entry(ip, 83, "shop/mixed:83", P::Tcp, ""),
                        entry(ip, 84, "shop/mixed:84", P::Tls, ""),
                        entry(ip, 3306, "shop/mixed:3306", P::Detect, ""),
                    ]);
                }
                want.sort_by_key(|e| e.port);
                let mut got = c.services.clone();
                got.sort_by_key(|e| e.port);
                assert_eq!(got, want);
            },
        ),
        (
            "only TCP ports are captured: a DNS Service's 53/UDP beside 53/TCP is one entry",
            "
kind: Service
metadata: {name: dns, namespace: shop}
spec:
  clusterIP: 10.96.0.53
  selector: {app: dns}
  ports:
    - {name: dns, port: 53, protocol: UDP}
    - {name: dns-tcp, port: 53, protocol: TCP}
    - {name: metrics, port: 9153, protocol: TCP}
    - {name: sctp, port: 9999, protocol: SCTP}
"
            .to_owned(),
            vec![("app", "dns")],
            |s| {
                let (_, c) = capture(s, "capture/outbound");
                let got: Vec<(String, u32)> =
                    c.services.iter().map(|e| (e.ip.clone(), e.port)).collect();
                assert_eq!(
                    got,
                    [("10.96.0.53".to_owned(), 53), ("10.96.0.53".to_owned(), 9153)]
                );
                let (_, c) = capture(s, "capture/inbound");
                let ports: Vec<u32> = c.services.iter().map(|e| e.port).collect();
                assert_eq!(ports, [53, 9153]);
            },
        ),
        (
            "a detected port with a GAMMA route attached gets its route configuration",
            format!(
                "{DB}---
kind: HTTPRoute
metadata: {{name: r, namespace: shop}}
spec:
  parentRefs: [{{kind: Service, group: '', name: db, port: 5432}}]
  rules: [{{backendRefs: [{{name: db, port: 5432}}]}}]
"
            ),
            vec![],
            |s| {
                let (_, c) = capture(s, "capture/outbound");
                assert_eq!(
                    c.services,
                    [entry("10.96.0.13", 5432, "shop/db:5432", P::Detect, "outbound/shop/db:5432")]
                );
                let rc = route_config(s, "outbound/shop/db:5432");
                assert_eq!(rc.virtual_hosts[0].routes[0].name, "shop/r/0/0");
            },
        ),
        (
            "inbound: an entry per target port of the selecting Services, to the app on loopback",
            format!(
                "{WEB}---
kind: Service
metadata: {{name: web-admin, namespace: shop}}
spec:
  clusterIP: 10.96.0.12
  selector: {{app: web}}
  ports: [{{name: admin, port: 9000, appProtocol: tcp}}, {{name: http, port: 8081, targetPort: 8080}}]
---
kind: Service
metadata: {{name: other, namespace: shop}}
spec:
  clusterIP: 10.96.0.14
  selector: {{app: other}}
  ports: [{{port: 7000}}]
"
            ),
            vec![("app", "web")],
            |s| {
                let (_, c) = capture(s, "capture/inbound");
                assert_eq!(
                    c.services,
                    [
                        entry("", 8080, "inbound/8080", P::Http, ""),
                        entry("", 9000, "inbound/9000", P::Tcp, ""),
                    ]
                );
                assert_eq!(endpoints(s, "inbound/8080"), [("127.0.0.1:8080".into(), 1)]);
                assert_eq!(endpoints(s, "inbound/9000"), [("127.0.0.1:9000".into(), 1)]);
                assert!(s.get(ResourceType::Cluster, "inbound/7000").is_none());
            },
        ),
        (
            "node labels move the capture ports and the bind address, and block unknown destinations",
            WEB.to_owned(),
            vec![
                ("trellis.io/outbound-port", "15101"),
                ("trellis.io/inbound-port", "15106"),
                ("trellis.io/bind-ip", "::"),
                ("trellis.io/outbound-policy", "block"),
            ],
            |s| {
                let (address, c) = capture(s, "capture/outbound");
                assert_eq!(address, "[::]:15101");
                assert_eq!(c.unknown_destination(), api::UnknownDestination::Block);
                let (address, c) = capture(s, "capture/inbound");
                assert_eq!(address, "[::]:15106");
                assert_eq!(c.unknown_destination(), api::UnknownDestination::Allow);
            },
        ),
        (
            "bad label values fall back to the defaults",
            WEB.to_owned(),
            vec![
                ("trellis.io/outbound-port", "0"),
                ("trellis.io/inbound-port", "http"),
                ("trellis.io/bind-ip", "localhost"),
                ("trellis.io/outbound-policy", "deny"),
            ],
            |s| {
                let (address, c) = capture(s, "capture/outbound");
                assert_eq!(address, "0.0.0.0:15001");
                assert_eq!(c.unknown_destination(), api::UnknownDestination::Allow);
                assert_eq!(capture(s, "capture/inbound").0, "0.0.0.0:15006");
            },
        ),
    ];
    for (name, yaml, labels, check) in cases {
        eprintln!("case: {name}");
        check(&translate(&catalog(&yaml), &sidecar(&labels)));
    }
}

#[test]
fn sidecar_capture_label_problems_name_the_label() {
    let (_, problems) = sidecar::settings(&sidecar(&[
        ("trellis.io/outbound-port", "0"),
        ("trellis.io/capture", "ebpf"),
        ("trellis.io/outbound-policy", "deny"),
    ]));
    assert_eq!(
        problems,
        [
            "node label trellis.io/capture=\"ebpf\" is not \"iptables\" or \"none\"; using iptables",
            "node label trellis.io/outbound-policy=\"deny\" is not \"allow\" or \"block\"; using allow",
            "node label trellis.io/outbound-port=\"0\" is not a port (1-65535); using 15001",
        ]
    );
}

const GATEWAY: &str = "
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec:
  listeners:
    - {name: web, port: 8080, protocol: HTTP, hostname: '*.example.com'}
    - {name: admin, port: 8080, protocol: HTTP, hostname: admin.internal}
    - {name: udp, port: 8443, protocol: UDP}
";

#[test]
fn gateway_cases() {
    let cases: Vec<(&str, String, Check)> = vec![
        (
            "no Gateway in the catalog: nothing",
            WEB.to_owned(),
            |s| assert!(s.is_empty()),
        ),
        (
            "one listener per port, vhosts by hostname, clusters only for backends",
            format!(
                "{WEB}---{DB}---{GATEWAY}---
kind: HTTPRoute
metadata: {{name: shop, namespace: shop}}
spec:
  parentRefs: [{{name: ingress, sectionName: web}}]
  hostnames: [shop.example.com, other.org]
  rules:
    - backendRefs: [{{name: web, port: 80}}]
---
kind: HTTPRoute
metadata: {{name: ops, namespace: shop}}
spec:
  parentRefs: [{{name: ingress}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /status/}}}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {{scheme: https, statusCode: 301, path: {{type: ReplacePrefixMatch, replacePrefixMatch: /health}}}}
---
kind: HTTPRoute
metadata: {{name: elsewhere, namespace: shop}}
spec:
  parentRefs: [{{name: other-gateway}}]
  rules: [{{backendRefs: [{{name: db, port: 5432}}]}}]
"
            ),
            |s| {
                assert_eq!(names(s, ResourceType::Listener), ["gateway/shop/ingress:8080"]);
                assert_eq!(listener(s, "gateway/shop/ingress:8080").address, "0.0.0.0:8080");
                assert_eq!(names(s, ResourceType::Cluster), ["shop/web:80"]);
                assert_eq!(names(s, ResourceType::ClusterLoadAssignment), ["shop/web:80"]);
                let rc = route_config(s, "gateway/shop/ingress:8080");
                let hosts: Vec<_> = rc.virtual_hosts.iter().map(|v| v.name.as_str()).collect();
                assert_eq!(hosts, ["*.example.com", "admin.internal", "shop.example.com"]);
                let shop = &rc.virtual_hosts[2];
                assert_eq!(forward(&shop.routes[0]), [("shop/web:80".into(), 1)]);
                let ops = &rc.virtual_hosts[1].routes[0];
                assert_eq!(
                    ops.r#match.as_ref().unwrap().path,
                    Some(api::route_match::Path::Prefix("/status".into()))
                );
                let Some(route::Action::Redirect(redirect)) = &ops.action else {
                    panic!("{ops:?}")
                };
                assert_eq!(redirect.status, 301);
                assert_eq!(redirect.scheme, "https");
                assert_eq!(
                    redirect.path,
                    Some(api::redirect_action::Path::Prefix("/health".into()))
                );
            },
        ),
        (
            "filters: header edits and rewrite; an unknown backend keeps its name, no cluster",
            format!(
                "{WEB}---{GATEWAY}---
kind: HTTPRoute
metadata: {{name: edits, namespace: shop}}
spec:
  parentRefs: [{{name: ingress, sectionName: admin}}]
  rules:
    - filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {{set: [{{name: x-env, value: prod}}], add: [{{name: x-tag, value: a}}], remove: [x-secret]}}
        - type: ResponseHeaderModifier
          responseHeaderModifier: {{remove: [server]}}
        - type: URLRewrite
          urlRewrite: {{hostname: web.internal, path: {{type: ReplaceFullPath, replaceFullPath: /index}}}}
      backendRefs: [{{name: web, port: 80}}]
    - matches: [{{queryParams: [{{type: RegularExpression, name: id, value: '[0-9]+'}}]}}]
      backendRefs: [{{name: nope, port: 80}}]
"
            ),
            |s| {
                let rc = route_config(s, "gateway/shop/ingress:8080");
                assert_eq!(rc.virtual_hosts.len(), 1);
                let routes = &rc.virtual_hosts[0].routes;
                let f = routes[0].filters.as_ref().unwrap();
                let req = f.request_headers.as_ref().unwrap();
                assert_eq!(req.set[0].name, "x-env");
                assert_eq!(req.add[0].value, "a");
                assert_eq!(req.remove, ["x-secret"]);
                assert_eq!(f.response_headers.as_ref().unwrap().remove, ["server"]);
                let rw = f.rewrite.as_ref().unwrap();
                assert_eq!(rw.host, "web.internal");
                assert_eq!(rw.path, Some(api::rewrite::Path::FullPath("/index".into())));
                assert_eq!(forward(&routes[1]), [("shop/nope:80".into(), 1)]);
                assert_eq!(names(s, ResourceType::Cluster), ["shop/web:80"]);
                // The route does not wait for (or hold) a cluster that will not come.
                let entry = s.get(ResourceType::RouteConfiguration, "gateway/shop/ingress:8080");
                assert_eq!(*entry.unwrap().clusters, ["shop/web:80".to_owned()].into());
                let q = &routes[1].r#match.as_ref().unwrap().query[0];
                assert_eq!(
                    q.value.as_ref().unwrap().kind,
                    Some(api::value_match::Kind::Regex("[0-9]+".into()))
                );
            },
        ),
    ];
    for (name, yaml, check) in cases {
        eprintln!("case: {name}");
        check(&translate(&catalog(&yaml), &gateway()));
    }
}

#[test]
fn translation_is_deterministic_and_versions_follow_content() {
    let yaml = format!("{WEB}---{}", slice("web", "[{addresses: [10.0.0.1]}]"));
    let a = translate(&catalog(&yaml), &sidecar(&[]));
    let b = translate(&catalog(&yaml), &sidecar(&[]));
    assert_eq!(a, b);
    let changed = format!("{WEB}---{}", slice("web", "[{addresses: [10.0.0.9]}]"));
    let c = translate(&catalog(&changed), &sidecar(&[]));
    let v = |s: &Snapshot, t, n| s.get(t, n).unwrap().version().to_owned();
    assert_eq!(
        v(&a, ResourceType::Cluster, "shop/web:80"),
        v(&c, ResourceType::Cluster, "shop/web:80")
    );
    assert_ne!(
        v(&a, ResourceType::ClusterLoadAssignment, "shop/web:80"),
        v(&c, ResourceType::ClusterLoadAssignment, "shop/web:80")
    );
}

#[test]
fn node_validation() {
    let node = |id: &str, role: api::Role, gw: &str| api::Node {
        id: id.into(),
        role: role.into(),
        gateway_name: gw.into(),
        namespace: "shop".into(),
        ..Default::default()
    };
    assert_eq!(
        NodeInfo::try_from(&node("", api::Role::Sidecar, "")),
        Err(NodeError::MissingId)
    );
    assert_eq!(
        NodeInfo::try_from(&node("a", api::Role::Unspecified, "")),
        Err(NodeError::BadRole(0))
    );
    assert_eq!(
        NodeInfo::try_from(&node("a", api::Role::Gateway, "")),
        Err(NodeError::MissingGateway)
    );
    let gw = NodeInfo::try_from(&node("a", api::Role::Gateway, "infra/edge")).unwrap();
    assert_eq!(gw.gateway, Some(ObjectKey::new("infra", "edge")));
    let gw = NodeInfo::try_from(&node("a", api::Role::Gateway, "edge")).unwrap();
    assert_eq!(gw.gateway, Some(ObjectKey::new("shop", "edge")));
}

/// (manifests, expected diagnostics as `object: condition=status reason`).
#[test]
fn object_diagnostics_cases() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("a clean catalog has none", format!("{WEB}---{DB}"), vec![]),
        (
            "missing service, missing port, other kind (at weight 0 too); a resolvable ref is fine",
            format!(
                "{WEB}---{GATEWAY}---
kind: HTTPRoute
metadata: {{name: r, namespace: shop}}
spec:
  parentRefs: [{{name: ingress}}]
  rules:
    - backendRefs:
        - {{name: web, port: 80}}
        - {{name: nope, port: 80}}
        - {{name: web, port: 81}}
    - backendRefs:
        - {{group: example.com, kind: Bucket, name: b}}
        - {{name: gone, port: 80, weight: 0}}
"
            ),
            vec![
                "Gateway shop/ingress listeners[udp]: Accepted=False UnsupportedProtocol",
                "HTTPRoute shop/r rules[0].backendRefs[1]: ResolvedRefs=False BackendNotFound",
                "HTTPRoute shop/r rules[0].backendRefs[2]: ResolvedRefs=False BackendNotFound",
                "HTTPRoute shop/r rules[1].backendRefs[0]: ResolvedRefs=False InvalidKind",
                "HTTPRoute shop/r rules[1].backendRefs[1]: ResolvedRefs=False BackendNotFound",
            ],
        ),
        (
            "a portless backendRef on a GAMMA route takes the parent's port",
            format!(
                "{WEB}---
kind: Service
metadata: {{name: two, namespace: shop}}
spec:
  ports: [{{name: http, port: 80}}, {{name: admin, port: 81}}]
---
kind: HTTPRoute
metadata: {{name: mesh, namespace: shop}}
spec:
  parentRefs: [{{kind: Service, group: '', name: two, port: 80}}]
  rules: [{{backendRefs: [{{name: two}}]}}]
---
kind: HTTPRoute
metadata: {{name: edge, namespace: shop}}
spec:
  parentRefs: [{{name: ingress}}]
  rules: [{{backendRefs: [{{name: two}}]}}]
"
            ),
            vec!["HTTPRoute shop/edge rules[0].backendRefs[0]: ResolvedRefs=False BackendNotFound"],
        ),
    ];
    for (name, yaml, want) in cases {
        let got: Vec<String> = object_diagnostics(&catalog(&yaml))
            .iter()
            .map(|d| format!("{}: {}={} {}", d.object(), d.condition, d.status, d.reason))
            .collect();
        assert_eq!(got, want, "case: {name}");
    }
    // Messages name what is missing.
    let yaml = format!(
        "{GATEWAY}---\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  rules: [{{backendRefs: [{{name: nope, port: 80}}]}}]\n"
    );
    let all = object_diagnostics(&catalog(&yaml));
    assert!(
        all[0].message.contains("\"UDP\" on port 8443"),
        "{}",
        all[0]
    );
    assert!(
        all[1]
            .message
            .starts_with("Service shop/nope does not exist"),
        "{}",
        all[1]
    );
}

#[test]
fn a_gateway_proxy_without_its_gateway_is_told_so() {
    let none = node_diagnostics(&catalog(WEB), &gateway());
    assert_eq!(none.len(), 1);
    let d = &none[0];
    assert_eq!(
        (
            d.kind.as_str(),
            d.name.as_str(),
            d.condition.as_str(),
            d.reason.as_str()
        ),
        ("Proxy", "gw-1", "Configured", "GatewayNotFound")
    );
    assert!(
        d.message
            .starts_with("Gateway shop/ingress (named by --gateway) does not exist (the manifests define no Gateway)"),
        "{d}"
    );
    let other = GATEWAY.replace("name: ingress", "name: edge");
    let d = &node_diagnostics(&catalog(&other), &gateway())[0];
    assert!(d.message.contains("(Gateways defined: shop/edge)"), "{d}");
    assert!(node_diagnostics(&catalog(GATEWAY), &gateway()).is_empty());
    assert!(node_diagnostics(&catalog(WEB), &sidecar(&[])).is_empty());
}
