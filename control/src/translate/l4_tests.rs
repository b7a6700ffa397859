//! Gateway listeners of protocol TLS and TCP with TLSRoute and TCPRoute, table-style: what each
//! combination translates to (a TCP listener, terminated or not, or an SNI passthrough
//! listener), and the conditions of listeners and routes that cannot be served.

use std::collections::BTreeMap;

use base64::Engine;
use trellis_proto::discovery::v1::{self as api, listener, resource::Kind};

use super::*;
use crate::{
    resource::{ResourceType, Snapshot},
    source::manifest::parse_documents,
};

fn catalog(yaml: &str) -> Catalog {
    Catalog::from_manifests(&parse_documents(yaml).expect("test manifests parse"))
}

fn node() -> NodeInfo {
    NodeInfo {
        id: "edge-1".into(),
        role: Role::Gateway,
        namespace: "shop".into(),
        service_account: "gw".into(),
        labels: BTreeMap::new(),
        gateway: Some(ObjectKey::new("shop", "edge")),
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Services `db` (5432) and `api-a`, `api-b` (443), and the `kubernetes.io/tls` Secret
/// `edge-tls`.
fn services() -> String {
    let c = rcgen::generate_simple_self_signed(vec!["db.example.com".to_owned()]).unwrap();
    let mut out = String::new();
    for (name, port) in [("db", 5432), ("api-a", 443), ("api-b", 443)] {
        out.push_str(&format!(
            "kind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  ports: [{{port: {port}}}]\n---\n"
        ));
    }
    out.push_str(&format!(
        "kind: Secret\nmetadata: {{name: edge-tls, namespace: shop}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64(&c.cert.pem()),
        b64(&c.signing_key.serialize_pem())
    ));
    out
}

const GATEWAY: &str = "
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  listeners:
    - name: db-tls
      port: 5433
      protocol: TLS
      tls: {mode: Terminate, certificateRefs: [{name: edge-tls}]}
    - name: pass
      port: 8443
      protocol: TLS
      tls: {mode: Passthrough}
    - {name: db, port: 5432, protocol: TCP}
";

fn kind_of(s: &Snapshot, name: &str) -> Option<listener::Kind> {
    match &s.get(ResourceType::Listener, name)?.resource.kind {
        Some(Kind::Listener(l)) => l.kind.clone(),
        other => panic!("{other:?}"),
    }
}

fn diagnostics(c: &Catalog) -> Vec<String> {
    object_diagnostics(c)
        .iter()
        .map(|d| {
            format!(
                "{}: {}={} {}: {}",
                d.object(),
                d.condition,
                d.status,
                d.reason,
                d.message
            )
        })
        .collect()
}

#[test]
fn tls_and_tcp_listeners_translate_with_their_routes() {
    let routes = "
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: db-tls, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: db-tls}]
  rules: [{backendRefs: [{name: db, port: 5432}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: db, namespace: shop}
spec:
  parentRefs: [{name: edge, port: 5432}]
  rules: [{backendRefs: [{name: db, port: 5432, weight: 1}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: a, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: pass}]
  hostnames: [a.example.com, \"*.a.example.com\"]
  rules: [{backendRefs: [{name: api-a, port: 443}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: b, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: pass}]
  hostnames: [b.example.com]
  rules: [{backendRefs: [{name: api-b, port: 443}]}]
";
    let c = catalog(&format!("{}---{GATEWAY}{routes}", services()));
    let s = translate(&c, &node());
    assert_eq!(diagnostics(&c), Vec::<String>::new());

    let Some(listener::Kind::Tcp(terminated)) = kind_of(&s, "gateway/shop/edge:5433") else {
        panic!("{:?}", kind_of(&s, "gateway/shop/edge:5433"));
    };
    assert_eq!(terminated.cluster, "shop/db:5432");
    assert_eq!(
        terminated.tls.expect("TLS is terminated").certificates,
        [api::ServerCertificate {
            server_names: vec![],
            secret: "shop/edge-tls".into(),
        }]
    );
    assert!(s.get(ResourceType::Secret, "shop/edge-tls").is_some());

    let Some(listener::Kind::Tcp(plain)) = kind_of(&s, "gateway/shop/edge:5432") else {
        panic!("{:?}", kind_of(&s, "gateway/shop/edge:5432"));
    };
    assert_eq!((plain.cluster.as_str(), plain.tls), ("shop/db:5432", None));

    let Some(listener::Kind::TlsPassthrough(sni)) = kind_of(&s, "gateway/shop/edge:8443") else {
        panic!("{:?}", kind_of(&s, "gateway/shop/edge:8443"));
    };
    assert_eq!(
        sni.routes,
        [
            api::SniRoute {
                server_names: vec!["*.a.example.com".into(), "a.example.com".into()],
                cluster: "shop/api-a:443".into(),
            },
            api::SniRoute {
                server_names: vec!["b.example.com".into()],
                cluster: "shop/api-b:443".into(),
            },
        ]
    );
    assert_eq!(sni.default_cluster, "");
    for cluster in ["shop/db:5432", "shop/api-a:443", "shop/api-b:443"] {
        assert!(s.get(ResourceType::Cluster, cluster).is_some(), "{cluster}");
    }
    // No HTTP route configuration for L4 ports.
    assert!(s.of_type(ResourceType::RouteConfiguration).is_empty());
}

#[test]
fn l4_routes_that_cannot_be_served_get_gateway_api_conditions() {
    let routes = "
---
kind: TCPRoute
metadata: {name: on-passthrough, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: pass}]
  rules: [{backendRefs: [{name: db, port: 5432}]}]
---
kind: TCPRoute
metadata: {name: no-listener, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: nope}]
  rules: [{backendRefs: [{name: db, port: 5432}]}]
---
kind: TCPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: db}]
  rules: [{backendRefs: [{name: db, port: 5432, weight: 1}, {name: api-a, port: 443, weight: 1}]}]
---
kind: TLSRoute
metadata: {name: missing, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: pass}]
  hostnames: [m.example.com]
  rules: [{backendRefs: [{name: ghost, port: 443}]}]
---
kind: TLSRoute
metadata: {name: foreign, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: pass}]
  hostnames: [f.example.com]
  rules: [{backendRefs: [{name: api, namespace: other, port: 443}]}]
---
kind: Service
metadata: {name: api, namespace: other}
spec:
  ports: [{port: 443}]
";
    let c = catalog(&format!("{}---{GATEWAY}{routes}", services()));
    assert_eq!(
        diagnostics(&c),
        [
            "TCPRoute shop/no-listener parentRefs[0]: Accepted=False NoMatchingParent: Gateway \
             shop/edge has no listener named \"nope\"",
            "TCPRoute shop/on-passthrough parentRefs[0]: Accepted=False NotAllowedByListeners: \
             no listener of Gateway shop/edge it names takes a TCPRoute (TCP and TLS Terminate \
             listeners do)",
            "TCPRoute shop/split rules: Accepted=False UnsupportedValue: 2 backendRefs: each \
             connection of a TCPRoute goes to one backend (the proxy forwards a listener or \
             server name to one cluster); give one backendRef",
            "TLSRoute shop/foreign rules[0].backendRefs[0]: ResolvedRefs=False RefNotPermitted: \
             Service other/api is in another namespace and no ReferenceGrant in other lets \
             TLSRoutes of shop refer to it",
            "TLSRoute shop/missing rules[0].backendRefs[0]: ResolvedRefs=False BackendNotFound: \
             Service shop/ghost does not exist; its connections are refused",
        ]
    );
    let s = translate(&c, &node());
    // The TCP listener whose only route is refused has nothing to forward to.
    assert_eq!(kind_of(&s, "gateway/shop/edge:5432"), None);
    // Nor the passthrough listener whose routes all are.
    assert_eq!(kind_of(&s, "gateway/shop/edge:8443"), None);

    // Granted, the cross-namespace backend is served.
    let grant = "
---
kind: ReferenceGrant
metadata: {name: tls-routes, namespace: other}
spec:
  from: [{group: gateway.networking.k8s.io, kind: TLSRoute, namespace: shop}]
  to: [{group: '', kind: Service}]
";
    let c = catalog(&format!("{}---{GATEWAY}{routes}{grant}", services()));
    let s = translate(&c, &node());
    let Some(listener::Kind::TlsPassthrough(sni)) = kind_of(&s, "gateway/shop/edge:8443") else {
        panic!("{:?}", kind_of(&s, "gateway/shop/edge:8443"));
    };
    assert_eq!(
        sni.routes,
        [api::SniRoute {
            server_names: vec!["f.example.com".into()],
            cluster: "other/api:443".into(),
        }]
    );
}

#[test]
fn a_terminating_tls_listener_needs_a_certificate() {
    let gateway = "
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  listeners:
    - {name: bare, port: 5433, protocol: TLS, tls: {mode: Terminate}}
";
    let c = catalog(&format!("{}---{gateway}", services()));
    assert_eq!(
        diagnostics(&c),
        [
            "Gateway shop/edge listeners[bare]: ResolvedRefs=False InvalidCertificateRef: a TLS \
          listener that terminates needs tls.certificateRefs; the listener is not served"
        ]
    );
    assert_eq!(
        kind_of(&translate(&c, &node()), "gateway/shop/edge:5433"),
        None
    );
}

#[test]
fn l4_routes_parse_strictly() {
    let err = parse_documents(
        "kind: TCPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: edge}]\n  hostnames: [a]\n",
    )
    .unwrap_err();
    assert_eq!(err.line, 5, "{err}");
    assert!(
        err.reason.starts_with("spec: unknown field `hostnames`"),
        "{err}"
    );
    let err = parse_documents(
        "kind: TLSRoute\nmetadata: {name: r}\nspec:\n  rules:\n    - backendRef: [{name: a}]\n",
    )
    .unwrap_err();
    assert!(
        err.reason
            .starts_with("spec.rules[0]: unknown field `backendRef`"),
        "{err}"
    );
}

/// A passthrough listener forwards the client's own TLS; a backend a BackendTLSPolicy says to
/// reach over TLS cannot be reached that way (the proxy refuses a passthrough listener naming
/// a TLS cluster), so the route is reported and left out instead.
#[test]
fn a_passthrough_route_to_a_backend_under_backend_tls_policy_is_refused() {
    let yaml = format!(
        "{}---{GATEWAY}
---
kind: TLSRoute
metadata: {{name: a, namespace: shop}}
spec:
  parentRefs: [{{name: edge, sectionName: pass}}]
  hostnames: [a.example.com]
  rules: [{{backendRefs: [{{name: api-a, port: 443}}]}}]
---
kind: TLSRoute
metadata: {{name: b, namespace: shop}}
spec:
  parentRefs: [{{name: edge, sectionName: pass}}]
  hostnames: [b.example.com]
  rules: [{{backendRefs: [{{name: api-b, port: 443}}]}}]
---
kind: BackendTLSPolicy
metadata: {{name: api-a, namespace: shop}}
spec:
  targetRefs: [{{group: '', kind: Service, name: api-a}}]
  validation: {{hostname: api-a.internal, wellKnownCACertificates: System}}
",
        services()
    );
    let c = catalog(&yaml);
    assert_eq!(
        diagnostics(&c),
        [
            "TLSRoute shop/a rules[0].backendRefs[0]: ResolvedRefs=False UnsupportedValue: \
          Service shop/api-a is under BackendTLSPolicy shop/api-a, and a passthrough listener \
          forwards the client's own TLS; not served on listener pass of Gateway shop/edge"
        ]
    );
    let s = translate(&c, &node());
    let Some(listener::Kind::TlsPassthrough(sni)) = kind_of(&s, "gateway/shop/edge:8443") else {
        panic!("{:?}", kind_of(&s, "gateway/shop/edge:8443"));
    };
    assert_eq!(
        sni.routes,
        [api::SniRoute {
            server_names: vec!["b.example.com".into()],
            cluster: "shop/api-b:443".into(),
        }]
    );
}
