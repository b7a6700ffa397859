//! Mesh identity in translation, table-style: which endpoints carry a SPIFFE ID, the inbound
//! mTLS mode and its label precedence, and which AuthorizationPolicies reach which sidecar.

use std::collections::BTreeMap;

use trellis_proto::discovery::v1::{self as api, listener, resource::Kind};

use super::*;
use crate::{
    diagnostics::Diagnostic,
    resource::{ResourceType, Snapshot},
    source::manifest::parse_documents,
};

const TD: &str = "mesh.test";

fn catalog(yaml: &str) -> Catalog {
    Catalog::from_manifests(&parse_documents(yaml).expect("test manifests parse"))
}

fn with_ca() -> Context {
    Context {
        trust_domain: Some(TD.into()),
    }
}

fn node(role: Role, namespace: &str, labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        id: "pod-1".into(),
        role,
        namespace: namespace.into(),
        service_account: "web".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        gateway: (role == Role::Gateway).then(|| ObjectKey::new("shop", "ingress")),
    }
}

fn sidecar(labels: &[(&str, &str)]) -> NodeInfo {
    node(Role::Sidecar, "shop", labels)
}

/// Address → identity of a cluster's endpoints.
fn identities(s: &Snapshot, cluster: &str) -> BTreeMap<String, String> {
    match &s
        .get(ResourceType::ClusterLoadAssignment, cluster)
        .expect(cluster)
        .resource
        .kind
    {
        Some(Kind::ClusterLoadAssignment(c)) => c
            .endpoints
            .iter()
            .map(|e| (e.address.clone(), e.identity.clone()))
            .collect(),
        other => panic!("{other:?}"),
    }
}

const SERVICE: &str = "
kind: Service
metadata: {name: b, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: b}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

const GATEWAY: &str = "
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec:
  listeners: [{name: web, port: 80, protocol: HTTP}]
---
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{name: ingress}]
  rules: [{backendRefs: [{name: b, port: 80}]}]
";

/// The slice of Service `b`: 10.0.0.1 → Pod b-1 (shop), 10.0.0.2 → Pod b-2 in namespace
/// `other`, 10.0.0.3 without a targetRef, 10.0.0.4 → a Pod the manifests do not hold.
fn slice(annotations: &str) -> String {
    format!(
        "
kind: EndpointSlice
metadata:
  name: b-1
  namespace: shop
  labels: {{kubernetes.io/service-name: b}}
  annotations: {{{annotations}}}
ports: [{{name: http, port: 8080}}]
endpoints:
  - addresses: [10.0.0.1]
    targetRef: {{kind: Pod, name: b-1, uid: 1234}}
  - addresses: [10.0.0.2]
    targetRef: {{kind: Pod, name: b-2, namespace: other}}
  - addresses: [10.0.0.3]
  - addresses: [10.0.0.4]
    targetRef: {{kind: Pod, name: gone}}
"
    )
}

fn pod(name: &str, namespace: &str, labels: &str, spec: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}
spec: {{{spec}}}
"
    )
}

#[test]
fn endpoint_identity_comes_from_the_target_pod_or_the_slice_annotation() {
    let meshed = "trellis.io/sidecar: \"true\"";
    let all = |a: &str, b: &str, c: &str, d: &str| -> BTreeMap<String, String> {
        [
            ("10.0.0.1:8080", a),
            ("10.0.0.2:8080", b),
            ("10.0.0.3:8080", c),
            ("10.0.0.4:8080", d),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    };
    let id = |ns: &str, sa: &str| format!("spiffe://{TD}/ns/{ns}/sa/{sa}");
    let pods = format!(
        "{}---{}",
        pod(
            "b-1",
            "shop",
            meshed,
            "serviceAccountName: b-sa, containers: [{name: app, image: b}]"
        ),
        pod("b-2", "other", meshed, "")
    );
    let cases: Vec<(&str, String, Context, BTreeMap<String, String>)> = vec![
        (
            "no Pods, no annotation: nothing meshed",
            slice(""),
            with_ca(),
            all("", "", "", ""),
        ),
        (
            "meshed Pods: their account, in their namespace (default account when unset)",
            format!("{}---{pods}", slice("")),
            with_ca(),
            all(&id("shop", "b-sa"), &id("other", "default"), "", ""),
        ),
        (
            "the annotation covers endpoints without a Pod targetRef only",
            format!("{}---{pods}", slice("trellis.io/service-account: legacy")),
            with_ca(),
            all(
                &id("shop", "b-sa"),
                &id("other", "default"),
                &id("shop", "legacy"),
                "",
            ),
        ),
        (
            "a Pod without the sidecar label is plaintext",
            format!(
                "{}---{}---{}",
                slice(""),
                pod("b-1", "shop", "app: b", "serviceAccountName: b-sa"),
                pod("b-2", "other", "trellis.io/sidecar: \"false\"", "")
            ),
            with_ca(),
            all("", "", "", ""),
        ),
        (
            "a sidecar without capture cannot terminate mesh TLS: plaintext",
            format!(
                "{}---{}---{}",
                slice(""),
                pod(
                    "b-1",
                    "shop",
                    "trellis.io/sidecar: \"true\", trellis.io/capture: none",
                    ""
                ),
                pod(
                    "b-2",
                    "other",
                    "trellis.io/sidecar: \"true\", trellis.io/capture: iptables",
                    ""
                )
            ),
            with_ca(),
            all("", &id("other", "default"), "", ""),
        ),
        (
            "without a CA nothing is meshed",
            format!("{}---{pods}", slice("trellis.io/service-account: legacy")),
            Context::default(),
            all("", "", "", ""),
        ),
        (
            "an annotation that is not an account name meshes nothing",
            slice("trellis.io/service-account: Not/An-Account"),
            with_ca(),
            all("", "", "", ""),
        ),
    ];
    for (name, yaml, context, want) in cases {
        let c = catalog(&format!("{SERVICE}---{yaml}"));
        for labels in [&[][..], &[("trellis.io/capture", "none")][..]] {
            let s = translate_in(&context, &c, &sidecar(labels));
            assert_eq!(identities(&s, "shop/b:80"), want, "{name} {labels:?}");
        }
        // A gateway holds no mesh certificate: it always dials plaintext.
        let c = catalog(&format!("{SERVICE}---{GATEWAY}---{yaml}"));
        let s = translate_in(&context, &c, &node(Role::Gateway, "shop", &[]));
        assert_eq!(
            identities(&s, "shop/b:80"),
            all("", "", "", ""),
            "{name}: gateway"
        );
    }
}

#[test]
fn a_pod_losing_its_sidecar_label_is_plaintext_again() {
    let meshed = pod(
        "b-1",
        "shop",
        "trellis.io/sidecar: \"true\"",
        "serviceAccountName: b",
    );
    let plain = pod("b-1", "shop", "app: b", "serviceAccountName: b");
    let before = translate_in(
        &with_ca(),
        &catalog(&format!("{SERVICE}---{}---{meshed}", slice(""))),
        &sidecar(&[]),
    );
    let after = translate_in(
        &with_ca(),
        &catalog(&format!("{SERVICE}---{}---{plain}", slice(""))),
        &sidecar(&[]),
    );
    assert_eq!(
        identities(&before, "shop/b:80")["10.0.0.1:8080"],
        format!("spiffe://{TD}/ns/shop/sa/b")
    );
    assert_eq!(identities(&after, "shop/b:80")["10.0.0.1:8080"], "");
    let version = |s: &Snapshot| {
        s.get(ResourceType::ClusterLoadAssignment, "shop/b:80")
            .unwrap()
            .version()
            .to_owned()
    };
    assert_ne!(version(&before), version(&after), "the change is sent");
}

#[test]
fn a_bad_service_account_annotation_is_reported_on_the_slice() {
    let d = object_diagnostics(&catalog(&format!(
        "{SERVICE}---{}",
        slice("trellis.io/service-account: Not/An-Account")
    )));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].object(), "EndpointSlice shop/b-1");
    assert_eq!(d[0].reason, "Invalid");
    assert!(
        d[0].message.starts_with(
            "annotation trellis.io/service-account: service_account: \"Not/An-Account\""
        ),
        "{}",
        d[0].message
    );
}

fn inbound_mode(s: &Snapshot) -> Option<api::InboundMtls> {
    match &s
        .get(ResourceType::Listener, "capture/inbound")?
        .resource
        .kind
    {
        Some(Kind::Listener(api::Listener {
            kind: Some(listener::Kind::Capture(c)),
            ..
        })) => Some(c.mtls()),
        other => panic!("{other:?}"),
    }
}

fn namespace(label: Option<&str>) -> String {
    match label {
        Some(v) => format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{trellis.io/mtls: {v}}}}}\n"
        ),
        None => "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n".to_owned(),
    }
}

/// Name, the pod's label, the namespace's label, the mode, the node's problems.
type MtlsCase = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    api::InboundMtls,
    Vec<String>,
);

#[test]
fn inbound_mtls_mode_pod_label_then_namespace_label_then_permissive() {
    use api::InboundMtls::{Permissive, Strict};
    let using = |fallback: &str| {
        vec![format!(
            "node label trellis.io/mtls=\"STRICT\" is not \"strict\" or \"permissive\"; using {fallback}"
        )]
    };
    let cases: Vec<MtlsCase> = vec![
        ("no labels", None, None, Permissive, vec![]),
        ("pod strict", Some("strict"), None, Strict, vec![]),
        ("namespace strict", None, Some("strict"), Strict, vec![]),
        (
            "pod wins over namespace",
            Some("permissive"),
            Some("strict"),
            Permissive,
            vec![],
        ),
        (
            "pod strict, namespace permissive",
            Some("strict"),
            Some("permissive"),
            Strict,
            vec![],
        ),
        (
            "bad pod label, no namespace label",
            Some("STRICT"),
            None,
            Permissive,
            using("permissive"),
        ),
        (
            "bad pod label falls back to the namespace",
            Some("STRICT"),
            Some("strict"),
            Strict,
            using("strict (the label of Namespace shop)"),
        ),
        (
            "bad namespace label: permissive",
            None,
            Some("on"),
            Permissive,
            vec![],
        ),
    ];
    for (name, pod_label, ns_label, want, problems) in cases {
        let c = catalog(&namespace(ns_label));
        let labels: Vec<(&str, &str)> = pod_label
            .map(|v| ("trellis.io/mtls", v))
            .into_iter()
            .collect();
        let node = sidecar(&labels);
        let s = translate(&c, &node);
        assert_eq!(inbound_mode(&s), Some(want), "{name}");
        let got: Vec<String> = node_diagnostics(&c, &node)
            .into_iter()
            .map(|d| d.message)
            .collect();
        assert_eq!(got, problems, "{name}");
    }
    // Another namespace's label does not apply.
    let c = catalog(&namespace(Some("strict")));
    let s = translate(&c, &node(Role::Sidecar, "other", &[]));
    assert_eq!(inbound_mode(&s), Some(Permissive));
}

#[test]
fn a_bad_namespace_mtls_label_is_reported_on_the_namespace() {
    let d = object_diagnostics(&catalog(&namespace(Some("on"))));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].object(), "Namespace shop");
    assert_eq!(d[0].reason, "InvalidLabel");
    assert!(
        d[0].message
            .starts_with("label trellis.io/mtls=\"on\" is not"),
        "{}",
        d[0].message
    );
}

#[test]
fn mtls_without_capture_is_reported() {
    let c = catalog(&namespace(None));
    let node = sidecar(&[
        ("trellis.io/capture", "none"),
        ("trellis.io/mtls", "strict"),
    ]);
    let s = translate(&c, &node);
    assert_eq!(inbound_mode(&s), None, "no capture listener");
    let got: Vec<String> = node_diagnostics(&c, &node)
        .into_iter()
        .map(|d| d.message)
        .collect();
    assert_eq!(
        got,
        [
            "node label trellis.io/mtls=\"strict\" has no effect with trellis.io/capture=\"none\": \
          mesh mTLS is terminated by the inbound capture listener"
        ]
    );
}

const FULL_POLICY: &str = "
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: public-get, namespace: shop}
spec:
  selector: {matchLabels: {app: b}}
  action: ALLOW
  rules:
  - name: a-may-get
    from: {identities: [\"spiffe://cluster.local/ns/shop/sa/a\", \"spiffe://cluster.local/ns/ops/sa/*\"], cidrs: [10.0.0.0/8, \"fd00::/8\", 192.168.1.1]}
    to: {ports: [8080], methods: [GET], paths: [{prefix: /public}, {exact: /health}]}
  - {}
";

fn policies(s: &Snapshot) -> Vec<&str> {
    s.of_type(ResourceType::Policy)
        .keys()
        .map(String::as_str)
        .collect()
}

#[test]
fn a_policy_becomes_one_resource_with_every_condition() {
    let s = translate(&catalog(FULL_POLICY), &sidecar(&[("app", "b")]));
    let Some(Kind::Policy(p)) = &s
        .get(ResourceType::Policy, "shop/public-get")
        .unwrap()
        .resource
        .kind
    else {
        panic!("not a policy");
    };
    use api::policy_path::Kind as P;
    let path = |k| api::PolicyPath { kind: Some(k) };
    assert_eq!(
        *p,
        api::Policy {
            name: "shop/public-get".into(),
            action: api::PolicyAction::Allow.into(),
            rules: vec![
                api::PolicyRule {
                    name: "a-may-get".into(),
                    source_identities: vec![
                        "spiffe://cluster.local/ns/shop/sa/a".into(),
                        "spiffe://cluster.local/ns/ops/sa/*".into()
                    ],
                    source_cidrs: vec![
                        "10.0.0.0/8".into(),
                        "fd00::/8".into(),
                        "192.168.1.1".into()
                    ],
                    destination_ports: vec![8080],
                    methods: vec!["GET".into()],
                    paths: vec![
                        path(P::Prefix("/public".into())),
                        path(P::Exact("/health".into()))
                    ],
                },
                api::PolicyRule {
                    name: "rules[1]".into(),
                    ..Default::default()
                },
            ],
        }
    );
    assert!(object_diagnostics(&catalog(FULL_POLICY)).is_empty());
}

#[test]
fn policies_select_sidecars_by_namespace_and_labels() {
    let yaml = "
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: all, namespace: shop}
spec: {action: DENY, rules: [{from: {cidrs: [10.9.0.0/16]}}]}
---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: empty-selector, namespace: shop}
spec: {selector: {}, action: DENY, rules: [{to: {ports: [9]}}]}
---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: b-only, namespace: shop}
spec: {selector: {matchLabels: {app: b, tier: back}}, action: ALLOW, rules: [{}]}
---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: elsewhere, namespace: other}
spec: {action: ALLOW, rules: [{}]}
---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec: {action: ALLOW, rules: []}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: istio, namespace: shop}
spec: {action: ALLOW, rules: [{}], whatever: {}}
";
    let c = catalog(yaml);
    let cases: Vec<(&str, NodeInfo, Vec<&str>)> = vec![
        (
            "no labels: the namespace-wide ones (the broken one as deny-all)",
            sidecar(&[]),
            vec!["shop/all", "shop/broken", "shop/empty-selector"],
        ),
        (
            "one selector label of two is not enough",
            sidecar(&[("app", "b")]),
            vec!["shop/all", "shop/broken", "shop/empty-selector"],
        ),
        (
            "every selector label",
            sidecar(&[("app", "b"), ("tier", "back"), ("x", "y")]),
            vec![
                "shop/all",
                "shop/b-only",
                "shop/broken",
                "shop/empty-selector",
            ],
        ),
        (
            "another namespace",
            node(Role::Sidecar, "other", &[("app", "b"), ("tier", "back")]),
            vec!["other/elsewhere"],
        ),
        (
            "a gateway gets none",
            node(Role::Gateway, "shop", &[("app", "b")]),
            vec![],
        ),
        (
            "without capture the policies still come",
            sidecar(&[("trellis.io/capture", "none")]),
            vec!["shop/all", "shop/broken", "shop/empty-selector"],
        ),
    ];
    for (name, node, want) in cases {
        assert_eq!(policies(&translate(&c, &node)), want, "{name}");
    }
    // Sent, but the sidecar has no inbound capture listener to enforce them: each is named.
    let problems = super::sidecar::label_problems(&c, &sidecar(&[("trellis.io/capture", "none")]));
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(
        problems[0]
            .starts_with("AuthorizationPolicy shop/all selects this sidecar but is not enforced"),
        "{problems:?}"
    );
    assert!(super::sidecar::label_problems(&c, &sidecar(&[])).is_empty());
}

/// The diagnostics of a policy with this spec, and whether it was sent as written (`false`:
/// the deny-all that stands in for an invalid policy was sent instead).
fn check(spec: &str) -> (Vec<Diagnostic>, bool) {
    let c = catalog(&format!(
        "apiVersion: trellis.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {spec}\n"
    ));
    let snapshot = translate(&c, &sidecar(&[]));
    let sent = snapshot.of_type(ResourceType::Policy);
    assert_eq!(sent.len(), 1, "{spec}: one policy is always sent");
    let as_written = match sent.values().next().unwrap().resource.kind.as_ref() {
        Some(Kind::Policy(p)) => *p != super::policy::deny_all(&ObjectKey::new("shop", "p")),
        other => panic!("{spec}: not a policy: {other:?}"),
    };
    (object_diagnostics(&c), as_written)
}

#[test]
fn every_invalid_policy_is_reported_and_sent_as_deny_all() {
    let cases = [
        ("{rules: [{}]}", "spec.action is required (ALLOW or DENY)"),
        (
            "{action: allow, rules: [{}]}",
            "spec.action: \"allow\" is not ALLOW or DENY",
        ),
        (
            "{action: ALLOW}",
            "spec.rules is empty; a policy needs at least one rule",
        ),
        (
            "{action: DENY, rules: []}",
            "spec.rules is empty; a policy needs at least one rule",
        ),
        (
            "{action: ALLOW, rules: [{name: x}, {name: x}]}",
            "spec.rules[1].name: \"x\" is not a rule name",
        ),
        (
            "{action: ALLOW, rules: [{name: ''}]}",
            "spec.rules[0].name: \"\" is not a rule name",
        ),
        (
            "{action: ALLOW, rules: [{name: 'rules[1]'}, {}]}",
            "spec.rules[1].name: \"rules[1]\" is not a rule name",
        ),
        (
            "{action: ALLOW, rules: [{from: {identities: ['spiffe://td/ns/shop/sa/a', 'shop/a']}}]}",
            "spec.rules[0].from.identities[1]: \"shop/a\" is not an identity",
        ),
        (
            "{action: ALLOW, rules: [{from: {identities: ['spiffe://td/ns/*/sa/*']}}]}",
            "spec.rules[0].from.identities[0]: \"spiffe://td/ns/*/sa/*\" is not an identity",
        ),
        (
            "{action: ALLOW, rules: [{from: {identities: ['spiffe://td/ns/shop/sa/a*']}}]}",
            "spec.rules[0].from.identities[0]: \"spiffe://td/ns/shop/sa/a*\" is not an identity",
        ),
        (
            "{action: ALLOW, rules: [{from: {identities: ['spiffe://td/ns/shop/sa/a/b']}}]}",
            "spec.rules[0].from.identities[0]: \"spiffe://td/ns/shop/sa/a/b\" is not an identity",
        ),
        (
            "{action: ALLOW, rules: [{from: {identities: ['spiffe:///ns/shop/sa/a']}}]}",
            "spec.rules[0].from.identities[0]: \"spiffe:///ns/shop/sa/a\" is not an identity",
        ),
        (
            "{action: ALLOW, rules: [{}, {from: {cidrs: [10.0.0.0/33]}}]}",
            "spec.rules[1].from.cidrs[0]: \"10.0.0.0/33\" is not a CIDR",
        ),
        (
            "{action: ALLOW, rules: [{from: {cidrs: [10.0.0/8]}}]}",
            "spec.rules[0].from.cidrs[0]: \"10.0.0/8\" is not a CIDR",
        ),
        (
            "{action: ALLOW, rules: [{from: {cidrs: ['fd00::/129']}}]}",
            "spec.rules[0].from.cidrs[0]: \"fd00::/129\" is not a CIDR",
        ),
        (
            "{action: ALLOW, rules: [{from: {cidrs: ['10.0.0.0/+8']}}]}",
            "spec.rules[0].from.cidrs[0]: \"10.0.0.0/+8\" is not a CIDR",
        ),
        (
            "{action: ALLOW, rules: [{to: {ports: [80, 0]}}]}",
            "spec.rules[0].to.ports[1]: 0 is not a port (1-65535)",
        ),
        (
            "{action: ALLOW, rules: [{to: {ports: [65536]}}]}",
            "spec.rules[0].to.ports[0]: 65536 is not a port (1-65535)",
        ),
        (
            "{action: ALLOW, rules: [{to: {methods: ['']}}]}",
            "spec.rules[0].to.methods[0]: \"\" is not an HTTP method",
        ),
        (
            "{action: ALLOW, rules: [{to: {methods: ['GET POST']}}]}",
            "spec.rules[0].to.methods[0]: \"GET POST\" is not an HTTP method",
        ),
        (
            "{action: ALLOW, rules: [{to: {paths: [{prefix: public}]}}]}",
            "spec.rules[0].to.paths[0].prefix: \"public\" does not start with \"/\"",
        ),
        (
            "{action: ALLOW, rules: [{to: {paths: [{exact: ''}]}}]}",
            "spec.rules[0].to.paths[0].exact: \"\" does not start with \"/\"",
        ),
        (
            "{action: ALLOW, rules: [{to: {paths: [{prefix: /api//v1}]}}]}",
            "spec.rules[0].to.paths[0].prefix: \"/api//v1\" holds an empty segment",
        ),
        (
            "{action: ALLOW, rules: [{to: {paths: [{exact: /a/./b}]}}]}",
            "spec.rules[0].to.paths[0].exact: \"/a/./b\" holds a dot segment",
        ),
        (
            "{action: DENY, rules: [{to: {paths: [{prefix: /a/..}]}}]}",
            "spec.rules[0].to.paths[0].prefix: \"/a/..\" holds a dot segment",
        ),
        (
            "{action: ALLOW, rules: [{to: {paths: [{exact: /files/%7euser}]}}]}",
            "spec.rules[0].to.paths[0].exact: \"/files/%7euser\" holds a '%' that is not followed",
        ),
        (
            "{action: ALLOW, rules: [{to: {paths: [{exact: /files/%7Euser}]}}]}",
            "spec.rules[0].to.paths[0].exact: \"/files/%7Euser\" escapes an unreserved character",
        ),
        (
            "{action: ALLOW, rules: [{to: {paths: [{exact: '/q?x=1'}]}}]}",
            "spec.rules[0].to.paths[0].exact: \"/q?x=1\" holds '?' or '#'",
        ),
        (
            "{action: ALLOW, rules: [{to: {paths: [{}]}}]}",
            "spec.rules[0].to.paths[0]: set exactly one of exact and prefix",
        ),
        (
            "{action: ALLOW, rules: [{to: {paths: [{exact: /a, prefix: /b}]}}]}",
            "spec.rules[0].to.paths[0]: set exactly one of exact and prefix",
        ),
    ];
    for (spec, message) in cases {
        let (d, sent) = check(spec);
        assert!(!sent, "{spec}: sent as written");
        assert_eq!(d.len(), 1, "{spec}: {d:?}");
        assert_eq!(d[0].object(), "AuthorizationPolicy shop/p", "{spec}");
        assert_eq!(
            (d[0].condition.as_str(), d[0].reason.as_str()),
            ("Accepted", "Invalid")
        );
        assert!(
            d[0].message.starts_with(message),
            "{spec}: {}",
            d[0].message
        );
        assert!(
            d[0].message
                .ends_with("; every call to the workloads it selects is denied until it is fixed"),
            "{}",
            d[0].message
        );
    }
    // The edges that are fine.
    for spec in [
        "{action: ALLOW, rules: [{from: {identities: ['*', 'spiffe://td/ns/shop/sa/*']}}]}",
        "{action: DENY, rules: [{to: {ports: [1, 65535], methods: [GET, PURGE, M-SEARCH]}}]}",
        "{action: ALLOW, rules: [{from: {cidrs: ['::1', '0.0.0.0/0', '::/0']}}]}",
        "{action: ALLOW, rules: [{to: {paths: [{prefix: /}, {exact: /}]}}]}",
        "{action: ALLOW, rules: [{to: {paths: [{prefix: /a%2Fb/}, {exact: /%20x}]}}]}",
        "{action: ALLOW, rules: [{from: {}, to: {}}]}",
    ] {
        assert_eq!(check(spec), (vec![], true), "{spec}");
    }
}
