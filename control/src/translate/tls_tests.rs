//! TLS translation, table-style: HTTPS Gateway listeners and their certificateRefs, the Secret
//! resources a gateway gets (and no other proxy does), BackendTLSPolicy, and the diagnostics
//! with Gateway API reasons. Certificates are generated here with rcgen.

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

fn gateway_node(name: &str) -> NodeInfo {
    NodeInfo {
        id: format!("{name}-1"),
        role: Role::Gateway,
        namespace: "shop".into(),
        service_account: "gw".into(),
        labels: BTreeMap::new(),
        gateway: Some(ObjectKey::new("shop", name)),
    }
}

fn sidecar() -> NodeInfo {
    NodeInfo {
        id: "pod-1.shop".into(),
        role: Role::Sidecar,
        namespace: "shop".into(),
        service_account: "web".into(),
        labels: BTreeMap::new(),
        gateway: None,
    }
}

/// A self-signed certificate and its key, PEM.
fn certificate(name: &str) -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem())
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A `kubernetes.io/tls` Secret manifest with base64 `data`.
fn tls_secret(namespace: &str, name: &str, chain: &str, key: &str) -> String {
    format!(
        "kind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64(chain),
        b64(key)
    )
}

const WEB: &str = "
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{name: ingress}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
";

/// Gateway `ingress` with an HTTPS listener on 8443 naming `refs`.
fn https_gateway(refs: &str) -> String {
    format!(
        "kind: Gateway
metadata: {{name: ingress, namespace: shop}}
spec:
  listeners:
    - {{name: web, port: 8080, protocol: HTTP}}
    - name: https
      port: 8443
      protocol: HTTPS
      hostname: shop.example.com
      tls: {{mode: Terminate, certificateRefs: [{refs}]}}
"
    )
}

fn tls_of(s: &Snapshot, name: &str) -> Option<api::ListenerTls> {
    match &s.get(ResourceType::Listener, name)?.resource.kind {
        Some(Kind::Listener(api::Listener {
            kind: Some(listener::Kind::Http(h)),
            ..
        })) => h.tls.clone(),
        other => panic!("{other:?}"),
    }
}

fn secret_of(s: &Snapshot, name: &str) -> Option<api::Secret> {
    match &s.get(ResourceType::Secret, name)?.resource.kind {
        Some(Kind::Secret(sec)) => Some(sec.clone()),
        other => panic!("{other:?}"),
    }
}

fn diagnostics(c: &Catalog) -> Vec<String> {
    object_diagnostics(c)
        .iter()
        .map(|d| format!("{}: {}={} {}", d.object(), d.condition, d.status, d.reason))
        .collect()
}

#[test]
fn an_https_listener_terminates_with_its_secret_served_to_its_gateway_only() {
    let (chain, key) = certificate("shop.example.com");
    let yaml = format!(
        "{WEB}---\n{}---\n{}---\nkind: Gateway\nmetadata: {{name: other, namespace: shop}}\nspec:\n  listeners: [{{name: web, port: 80, protocol: HTTP}}]\n",
        https_gateway("{name: shop-tls}"),
        tls_secret("shop", "shop-tls", &chain, &key)
    );
    let c = catalog(&yaml);
    let s = translate(&c, &gateway_node("ingress"));
    let tls = tls_of(&s, "gateway/shop/ingress:8443").expect("the HTTPS port terminates TLS");
    assert_eq!(
        tls.certificates,
        [api::ServerCertificate {
            server_names: vec!["shop.example.com".into()],
            secret: "shop/shop-tls".into(),
        }]
    );
    assert_eq!(
        tls_of(&s, "gateway/shop/ingress:8080"),
        None,
        "HTTP stays cleartext"
    );
    let secret = secret_of(&s, "shop/shop-tls").expect("the Secret resource");
    assert_eq!(
        (
            secret.certificate_chain.as_str(),
            secret.private_key.as_str()
        ),
        (chain.as_str(), key.as_str())
    );
    // The listener names its secret, so the stream sends it only once the secret is ACKed.
    let entry = s
        .get(ResourceType::Listener, "gateway/shop/ingress:8443")
        .unwrap();
    assert_eq!(entry.secrets.iter().collect::<Vec<_>>(), ["shop/shop-tls"]);
    assert!(diagnostics(&c).is_empty(), "{:?}", diagnostics(&c));

    for other in [gateway_node("other"), sidecar()] {
        let s = translate(&c, &other);
        assert!(
            s.of_type(ResourceType::Secret).is_empty(),
            "{} got a Secret its Gateway does not reference",
            other.id
        );
    }
}

#[test]
fn string_data_is_accepted_and_a_changed_secret_has_a_new_version() {
    let (chain, key) = certificate("shop.example.com");
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    let secret = format!(
        "kind: Secret\nmetadata: {{name: shop-tls, namespace: shop}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&chain),
        indent(&key)
    );
    let yaml = format!(
        "{WEB}---\n{}---\n{secret}",
        https_gateway("{name: shop-tls}")
    );
    let s = translate(&catalog(&yaml), &gateway_node("ingress"));
    let first = s
        .get(ResourceType::Secret, "shop/shop-tls")
        .expect("served");
    assert_eq!(
        secret_of(&s, "shop/shop-tls").unwrap().certificate_chain,
        chain
    );

    let (chain2, key2) = certificate("shop.example.com");
    let yaml2 = format!(
        "{WEB}---\n{}---\n{}",
        https_gateway("{name: shop-tls}"),
        tls_secret("shop", "shop-tls", &chain2, &key2)
    );
    let s2 = translate(&catalog(&yaml2), &gateway_node("ingress"));
    let second = s2.get(ResourceType::Secret, "shop/shop-tls").unwrap();
    assert_ne!(
        first.version(),
        second.version(),
        "rotation is a new version"
    );
    assert_eq!(
        s.get(ResourceType::Listener, "gateway/shop/ingress:8443")
            .unwrap()
            .version(),
        s2.get(ResourceType::Listener, "gateway/shop/ingress:8443")
            .unwrap()
            .version(),
        "the listener is unchanged by a rotation"
    );
}

/// (case, extra manifests, certificateRefs, whether the listener is served, diagnostics).
#[test]
fn certificate_refs_that_do_not_resolve_are_reported() {
    let (chain, key) = certificate("shop.example.com");
    let (_, other_key) = certificate("shop.example.com");
    let good = tls_secret("shop", "shop-tls", &chain, &key);
    let shared = tls_secret("certs", "shared", &chain, &key);
    let grant = "kind: ReferenceGrant
metadata: {name: gateways-read-certs, namespace: certs}
spec:
  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: shop}]
  to: [{group: '', kind: Secret}]
";
    let section = "Gateway shop/ingress listeners[https].tls.certificateRefs[0]";
    let cases: Vec<(&str, String, &str, bool, Vec<String>)> = vec![
        (
            "a missing Secret",
            String::new(),
            "{name: nope}",
            false,
            vec![format!(
                "{section}: ResolvedRefs=False InvalidCertificateRef"
            )],
        ),
        (
            "a Secret of another type",
            "kind: Secret\nmetadata: {name: opaque, namespace: shop}\ndata: {a: YQ==}\n".into(),
            "{name: opaque}",
            false,
            vec![format!(
                "{section}: ResolvedRefs=False InvalidCertificateRef"
            )],
        ),
        (
            "a key of another certificate: served (the proxy refuses it by name, keeping the \
             version it held) and reported",
            tls_secret("shop", "bad", &chain, &other_key),
            "{name: bad}",
            true,
            vec![format!(
                "{section}: ResolvedRefs=False InvalidCertificateRef"
            )],
        ),
        (
            "not PEM at all",
            tls_secret("shop", "junk", "junk", "junk"),
            "{name: junk}",
            true,
            vec![format!(
                "{section}: ResolvedRefs=False InvalidCertificateRef"
            )],
        ),
        (
            "another kind",
            good.clone(),
            "{kind: ConfigMap, name: shop-tls}",
            false,
            vec![format!(
                "{section}: ResolvedRefs=False InvalidCertificateRef"
            )],
        ),
        (
            "another namespace without a ReferenceGrant",
            shared.clone(),
            "{name: shared, namespace: certs}",
            false,
            vec![format!("{section}: ResolvedRefs=False RefNotPermitted")],
        ),
        (
            "another namespace with a ReferenceGrant",
            format!("{shared}---\n{grant}"),
            "{name: shared, namespace: certs}",
            true,
            vec![],
        ),
        (
            "a grant for another namespace does not count",
            format!(
                "{shared}---\n{}",
                grant.replace("namespace: shop", "namespace: other")
            ),
            "{name: shared, namespace: certs}",
            false,
            vec![format!("{section}: ResolvedRefs=False RefNotPermitted")],
        ),
        ("a good one", good.clone(), "{name: shop-tls}", true, vec![]),
    ];
    for (name, extra, refs, served, want) in cases {
        let yaml = format!("{WEB}---\n{}---\n{extra}", https_gateway(refs));
        let c = catalog(&yaml);
        let s = translate(&c, &gateway_node("ingress"));
        assert_eq!(
            s.get(ResourceType::Listener, "gateway/shop/ingress:8443")
                .is_some(),
            served,
            "case: {name}"
        );
        assert_eq!(diagnostics(&c), want, "case: {name}");
        // No message carries key material.
        for d in object_diagnostics(&c) {
            for k in [&key, &other_key] {
                for line in k.lines().filter(|l| !l.starts_with("-----")) {
                    assert!(!d.message.contains(line), "case {name}: {d}");
                }
            }
        }
    }
    // Messages say what is wrong, naming the object and field.
    let yaml = format!(
        "{WEB}---\n{}---\n{}",
        https_gateway("{name: bad}"),
        tls_secret("shop", "bad", &chain, &other_key)
    );
    let d = &object_diagnostics(&catalog(&yaml))[0];
    assert_eq!(
        d.message,
        "Secret shop/bad: tls.key does not match the certificate in tls.crt"
    );
    let yaml = format!("{WEB}---\n{}", https_gateway("{name: nope}"));
    let d = &object_diagnostics(&catalog(&yaml))[0];
    assert_eq!(d.message, "Secret shop/nope does not exist");
}

#[test]
fn a_port_served_both_with_and_without_tls_is_a_conflict() {
    let (chain, key) = certificate("shop.example.com");
    let yaml = format!(
        "{WEB}---
kind: Gateway
metadata: {{name: ingress, namespace: shop}}
spec:
  listeners:
    - {{name: web, port: 8080, protocol: HTTP}}
    - {{name: https, port: 8080, protocol: HTTPS, tls: {{certificateRefs: [{{name: shop-tls}}]}}}}
    - {{name: pass, port: 9443, protocol: TLS, tls: {{mode: Passthrough}}}}
---
{}",
        tls_secret("shop", "shop-tls", &chain, &key)
    );
    let c = catalog(&yaml);
    assert_eq!(
        diagnostics(&c),
        // A passthrough listener with no TLSRoute is accepted (and serves nothing).
        ["Gateway shop/ingress listeners[https]: Accepted=False ProtocolConflict"]
    );
    let s = translate(&c, &gateway_node("ingress"));
    assert_eq!(tls_of(&s, "gateway/shop/ingress:8080"), None);
    assert!(s.of_type(ResourceType::Secret).is_empty());
}

#[test]
fn backend_tls_policy_gives_the_cluster_tls() {
    let (ca, _) = certificate("ca.internal");
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    let config_map = format!(
        "kind: ConfigMap\nmetadata: {{name: web-ca, namespace: shop}}\ndata:\n  ca.crt: |\n{}",
        indent(&ca)
    );
    let policy = |validation: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1alpha3
kind: BackendTLSPolicy
metadata: {{name: web-tls, namespace: shop}}
spec:
  targetRefs: [{{group: '', kind: Service, name: web}}]
  validation: {validation}
"
        )
    };
    let gw = "kind: Gateway\nmetadata: {name: ingress, namespace: shop}\nspec:\n  listeners: [{name: web, port: 8080, protocol: HTTP}]\n";

    let yaml = format!(
        "{WEB}---\n{gw}---\n{config_map}---\n{}",
        policy(
            "{hostname: web.internal, caCertificateRefs: [{group: '', kind: ConfigMap, name: web-ca}]}"
        )
    );
    let c = catalog(&yaml);
    assert!(diagnostics(&c).is_empty(), "{:?}", diagnostics(&c));
    let s = translate(&c, &gateway_node("ingress"));
    let cluster = match &s
        .get(ResourceType::Cluster, "shop/web:80")
        .unwrap()
        .resource
        .kind
    {
        Some(Kind::Cluster(c)) => c.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        cluster.tls,
        Some(api::UpstreamTls {
            sni: "web.internal".into(),
            ca_secret: "configmap/shop/web-ca".into(),
            client_certificate_secret: String::new(),
            subject_alt_names: vec![],
            verify_subject_alt_names: vec![],
        })
    );
    assert_eq!(
        secret_of(&s, "configmap/shop/web-ca").unwrap().ca_bundle,
        ca
    );
    assert!(
        translate(&c, &sidecar())
            .of_type(ResourceType::Secret)
            .is_empty(),
        "sidecars are not under the policy"
    );

    let yaml = format!(
        "{WEB}---\n{gw}---\n{}",
        policy("{hostname: web.internal, wellKnownCACertificates: System}")
    );
    let s = translate(&catalog(&yaml), &gateway_node("ingress"));
    let Some(Kind::Cluster(cluster)) = &s
        .get(ResourceType::Cluster, "shop/web:80")
        .unwrap()
        .resource
        .kind
    else {
        panic!()
    };
    let tls = cluster.tls.clone().expect("tls");
    assert_eq!(
        (tls.sni.as_str(), tls.ca_secret.as_str()),
        ("web.internal", "")
    );
    assert!(s.of_type(ResourceType::Secret).is_empty());

    // subjectAltNames: the certificate must carry one of them instead of the hostname.
    let yaml = format!(
        "{WEB}---\n{gw}---\n{}",
        policy(
            "{hostname: web.internal, wellKnownCACertificates: System, subjectAltNames: [{type: Hostname, hostname: web.shop.svc}, {type: URI, uri: 'spiffe://cluster.local/ns/shop/sa/web'}]}"
        )
    );
    let c = catalog(&yaml);
    assert!(diagnostics(&c).is_empty(), "{:?}", diagnostics(&c));
    let s = translate(&c, &gateway_node("ingress"));
    let Some(Kind::Cluster(cluster)) = &s
        .get(ResourceType::Cluster, "shop/web:80")
        .unwrap()
        .resource
        .kind
    else {
        panic!()
    };
    use api::subject_alt_name::Kind as San;
    assert_eq!(
        cluster.tls.as_ref().unwrap().verify_subject_alt_names,
        [
            api::SubjectAltName {
                kind: Some(San::Hostname("web.shop.svc".into()))
            },
            api::SubjectAltName {
                kind: Some(San::Uri("spiffe://cluster.local/ns/shop/sa/web".into()))
            },
        ]
    );

    for (validation, want) in [
        (
            "{hostname: web.internal, caCertificateRefs: [{kind: ConfigMap, name: nope}]}",
            "BackendTLSPolicy shop/web-tls: ResolvedRefs=False InvalidCACertificateRef",
        ),
        (
            "{hostname: web.internal}",
            "BackendTLSPolicy shop/web-tls: Accepted=False Invalid",
        ),
        (
            "{hostname: web.internal, wellKnownCACertificates: System, subjectAltNames: [{type: URI, hostname: a.b}]}",
            "BackendTLSPolicy shop/web-tls: Accepted=False Invalid",
        ),
        (
            "{hostname: web.internal, wellKnownCACertificates: System, subjectAltNames: [{type: IP, hostname: a.b}]}",
            "BackendTLSPolicy shop/web-tls: Accepted=False Invalid",
        ),
    ] {
        let yaml = format!("{WEB}---\n{gw}---\n{}", policy(validation));
        let c = catalog(&yaml);
        assert_eq!(diagnostics(&c), [want], "{validation}");
        let s = translate(&c, &gateway_node("ingress"));
        assert!(
            s.get(ResourceType::Cluster, "shop/web:80").is_none(),
            "{validation}: a backend whose TLS cannot be set up is not reached in cleartext"
        );
    }
}

#[test]
fn a_secret_manifest_never_shows_its_values() {
    let (chain, key) = certificate("shop.example.com");
    let c = catalog(&tls_secret("shop", "shop-tls", &chain, &key));
    let shown = format!("{c:?}");
    assert!(shown.contains("tls.key"), "{shown}");
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!shown.contains(line), "{shown}");
    }
    assert!(!shown.contains(&b64(&key)[..24]), "{shown}");
}

/// The example manifests users start from: the HTTPS listener resolves its test-only Secret, and
/// the TLS listener terminates with it and forwards its TCPRoute's connections.
#[test]
fn the_cluster_example_serves_https_with_its_secret() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster");
    let mut manifests = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
            manifests.extend(parse_documents(&std::fs::read_to_string(&path).unwrap()).unwrap());
        }
    }
    let c = Catalog::from_manifests(&manifests);
    assert!(diagnostics(&c).is_empty(), "{:?}", diagnostics(&c));
    let mut node = gateway_node("ingress");
    node.namespace = "demo".into();
    node.gateway = Some(ObjectKey::new("demo", "ingress"));
    let s = translate(&c, &node);
    let tls = tls_of(&s, "gateway/demo/ingress:8443").expect("the HTTPS listener");
    assert_eq!(tls.certificates[0].secret, "demo/hello-tls");
    assert!(secret_of(&s, "demo/hello-tls").is_some());
    assert!(
        s.get(
            ResourceType::RouteConfiguration,
            "gateway/demo/ingress:8443"
        )
        .is_some()
    );
    match &s
        .get(ResourceType::Listener, "gateway/demo/ingress:9443")
        .expect("the TLS listener")
        .resource
        .kind
    {
        Some(Kind::Listener(api::Listener {
            kind: Some(listener::Kind::Tcp(tcp)),
            ..
        })) => {
            assert_eq!(tcp.cluster, "demo/hello-v1:8080");
            assert_eq!(
                tcp.tls.as_ref().expect("terminated").certificates[0].secret,
                "demo/hello-tls"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// Client certificates at the gateway (GEP-91): the Gateway's `spec.tls.frontend` (default and
/// per port, Gateway API v1.3+) or a listener's older `tls.frontendValidation` name a ConfigMap
/// CA; the listener requires (AllowValidOnly) or asks for (AllowInsecureFallback) a client
/// certificate chaining to it, the CA served as a Secret resource. A CA that does not resolve
/// keeps the listener from being served without it.
#[test]
fn frontend_validation_asks_for_client_certificates() {
    let (chain, key) = certificate("shop.example.com");
    let (ca, _) = certificate("clients.internal");
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    let base = format!(
        "{WEB}---\n{}---\nkind: ConfigMap\nmetadata: {{name: clients, namespace: shop}}\ndata:\n  ca.crt: |\n{}",
        tls_secret("shop", "shop-tls", &chain, &key),
        indent(&ca)
    );
    let gateway = |tls: &str, listener_extra: &str| {
        format!(
            "kind: Gateway
metadata: {{name: ingress, namespace: shop}}
spec:
  tls: {tls}
  listeners:
    - name: https
      port: 8443
      protocol: HTTPS
      tls: {{certificateRefs: [{{name: shop-tls}}]{listener_extra}}}
    - name: other
      port: 9443
      protocol: HTTPS
      tls: {{certificateRefs: [{{name: shop-tls}}]}}
"
        )
    };
    let client_certificate = |yaml: &str, port: u16| {
        let c = catalog(yaml);
        let s = translate(&c, &gateway_node("ingress"));
        (
            diagnostics(&c),
            tls_of(&s, &format!("gateway/shop/ingress:{port}")).map(|t| t.client_certificate),
            secret_of(&s, "configmap/shop/clients").map(|s| s.ca_bundle),
        )
    };
    let require = |mode: api::ClientCertificateMode| {
        Some(Some(api::ClientCertificateValidation {
            mode: mode as i32,
            ca_secret: "configmap/shop/clients".into(),
        }))
    };

    // The default for every terminating listener.
    let yaml = format!(
        "{base}---\n{}",
        gateway(
            "{frontend: {default: {validation: {caCertificateRefs: [{kind: ConfigMap, name: clients}]}}}}",
            ""
        )
    );
    for port in [8443, 9443] {
        assert_eq!(
            client_certificate(&yaml, port),
            (
                vec![],
                require(api::ClientCertificateMode::Require),
                Some(ca.clone())
            ),
            "{port}"
        );
    }

    // Per port, with the insecure fallback; the other port keeps no validation.
    let yaml = format!(
        "{base}---\n{}",
        gateway(
            "{frontend: {default: {}, perPort: [{port: 8443, tls: {validation: {mode: AllowInsecureFallback, caCertificateRefs: [{kind: ConfigMap, name: clients}]}}}]}}",
            ""
        )
    );
    assert_eq!(
        client_certificate(&yaml, 8443).1,
        require(api::ClientCertificateMode::Optional)
    );
    assert_eq!(client_certificate(&yaml, 9443).1, Some(None));

    // The listener's own frontendValidation (before Gateway API v1.3).
    let yaml = format!(
        "{base}---\n{}",
        gateway(
            "{}",
            ", frontendValidation: {caCertificateRefs: [{kind: ConfigMap, name: clients}]}"
        )
    );
    assert_eq!(
        client_certificate(&yaml, 8443).1,
        require(api::ClientCertificateMode::Require)
    );
    assert_eq!(client_certificate(&yaml, 9443).1, Some(None));

    // A CA that does not resolve: reported, and the listener is not served without it.
    let yaml = format!(
        "{base}---\n{}",
        gateway(
            "{frontend: {default: {validation: {caCertificateRefs: [{kind: ConfigMap, name: nope}]}}}}",
            ""
        )
    );
    let (diagnostics, tls, _) = client_certificate(&yaml, 8443);
    assert_eq!(
        diagnostics,
        [
            "Gateway shop/ingress listeners[https].tls.frontendValidation: ResolvedRefs=False InvalidCACertificateRef",
            "Gateway shop/ingress listeners[other].tls.frontendValidation: ResolvedRefs=False InvalidCACertificateRef",
        ]
    );
    assert_eq!(tls, None);
}
