//! Mesh identity over a real discovery stream: a sidecar receives the AuthorizationPolicies that
//! select it as Policy resources, follows their edits and removals, and sees its endpoints'
//! SPIFFE IDs follow the Pods behind them.

mod common;

use common::{Controller, ENDPOINTS, POLICIES, Proxy};
use trellis_proto::discovery::v1::{self as api, resource::Kind};

async fn sidecar(controller: &Controller, id: &str) -> Proxy {
    let mut proxy = Proxy::connect(controller, Proxy::sidecar_node(id)).await;
    proxy.subscribe_all().await;
    proxy.subscribe(POLICIES, &[]).await;
    proxy.settle(controller, true).await;
    proxy
}

fn policy(proxy: &Proxy, name: &str) -> Option<api::Policy> {
    match proxy.resource(POLICIES, name)? {
        Kind::Policy(p) => Some(p.clone()),
        other => panic!("{other:?}"),
    }
}

const POLICY: &str = "
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: only-a, namespace: shop}
spec:
  action: ALLOW
  rules:
  - name: a
    from: {identities: ['spiffe://cluster.local/ns/shop/sa/a']}
    to: {methods: [GET], paths: [{prefix: /public}]}
";

#[tokio::test]
async fn a_sidecar_receives_policy_edits_and_removals() {
    let controller = Controller::start().await;
    let mut proxy = sidecar(&controller, "sidecar-policy").await;
    assert!(proxy.held.get(POLICIES).is_none_or(|p| p.is_empty()));

    controller.write("policy.yaml", POLICY);
    let log = proxy.settle(&controller, true).await;
    assert!(
        log.contains(&common::seen(POLICIES, &["shop/only-a"], &[])),
        "{log:?}"
    );
    let first = policy(&proxy, "shop/only-a").unwrap();
    assert_eq!(first.action(), api::PolicyAction::Allow);
    assert_eq!(first.rules[0].methods, ["GET"]);
    // Nothing else changed, so nothing else was sent.
    assert!(
        log.iter().all(|(t, _, _)| *t == POLICIES),
        "only the policy: {log:?}"
    );

    controller.edit("policy.yaml", "methods: [GET]", "methods: [GET, HEAD]");
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [common::seen(POLICIES, &["shop/only-a"], &[])]);
    assert_eq!(
        policy(&proxy, "shop/only-a").unwrap().rules[0].methods,
        ["GET", "HEAD"]
    );

    // An invalid edit: reported on the object, and the policy is withdrawn (never sent in part).
    controller.edit("policy.yaml", "prefix: /public", "prefix: public");
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [common::seen(POLICIES, &[], &["shop/only-a"])]);
    let report = controller
        .wait_status("the invalid policy reported", |r| {
            r.problems
                .iter()
                .any(|d| d.kind == "AuthorizationPolicy" && d.name == "only-a")
        })
        .await;
    let problem = report
        .problems
        .iter()
        .find(|d| d.kind == "AuthorizationPolicy")
        .unwrap();
    assert_eq!(problem.reason, "Invalid");
    assert!(
        problem
            .message
            .starts_with("spec.rules[0].to.paths[0].prefix: \"public\""),
        "{}",
        problem.message
    );

    controller.write("policy.yaml", POLICY);
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [common::seen(POLICIES, &["shop/only-a"], &[])]);

    std::fs::remove_file(controller.path("policy.yaml")).unwrap();
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [common::seen(POLICIES, &[], &["shop/only-a"])]);
    assert!(policy(&proxy, "shop/only-a").is_none());
}

#[tokio::test]
async fn policies_of_other_workloads_and_namespaces_are_not_sent() {
    let controller = Controller::start().await;
    let mut proxy = sidecar(&controller, "sidecar-other").await;
    controller.write(
        "policy.yaml",
        &format!(
            "{}---{}---{POLICY}",
            POLICY.replace("namespace: shop", "namespace: other"),
            POLICY
                .replace("name: only-a", "name: for-b")
                .replace("spec:\n", "spec:\n  selector: {matchLabels: {app: b}}\n")
        ),
    );
    proxy.settle(&controller, true).await;
    let held: Vec<&String> = proxy.held[POLICIES].keys().collect();
    assert_eq!(held, ["shop/only-a"]);
    // A gateway subscribing to policies gets none.
    let mut gateway = Proxy::connect(&controller, Proxy::gateway_node("gw")).await;
    gateway.subscribe_all().await;
    gateway.subscribe(POLICIES, &[]).await;
    let log = gateway.settle(&controller, true).await;
    assert!(log.iter().all(|(t, _, _)| *t != POLICIES), "{log:?}");
}

const MESHED: &str = "
apiVersion: v1
kind: Service
metadata: {name: b, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 80, targetPort: 8080}]
---
kind: EndpointSlice
metadata:
  name: b-x
  namespace: shop
  labels: {kubernetes.io/service-name: b}
ports: [{name: http, port: 8080}]
endpoints:
  - addresses: [10.0.3.1]
    targetRef: {kind: Pod, name: b-1}
---
apiVersion: v1
kind: Pod
metadata: {name: b-1, namespace: shop, labels: {trellis.io/sidecar: 'true'}}
spec: {serviceAccountName: b, containers: [{name: app, image: b}]}
";

fn identity(proxy: &Proxy) -> Option<String> {
    match proxy.resource(ENDPOINTS, "shop/b:80")? {
        Kind::ClusterLoadAssignment(c) => Some(c.endpoints[0].identity.clone()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn endpoint_identities_follow_the_pods_when_the_controller_runs_a_ca() {
    let controller = Controller::start_with_trust_domain(Some("mesh.test")).await;
    controller.write("meshed.yaml", MESHED);
    let mut proxy = Proxy::connect(&controller, Proxy::sidecar_node("sidecar-id")).await;
    proxy.subscribe_all().await;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while identity(&proxy).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no endpoints for b");
        proxy.settle(&controller, false).await;
    }
    assert_eq!(identity(&proxy).unwrap(), "spiffe://mesh.test/ns/shop/sa/b");

    // The Pod loses its sidecar: the endpoint is plaintext again, and only it changes.
    controller.edit("meshed.yaml", "trellis.io/sidecar: 'true'", "app: b");
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [common::seen(ENDPOINTS, &["shop/b:80"], &[])]);
    assert_eq!(identity(&proxy).unwrap(), "");

    // Without a CA the same manifests mesh nothing.
    let plain = Controller::start().await;
    plain.write("meshed.yaml", MESHED);
    let mut proxy = Proxy::connect(&plain, Proxy::sidecar_node("sidecar-plain")).await;
    proxy.subscribe_all().await;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while identity(&proxy).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no endpoints for b");
        proxy.settle(&plain, false).await;
    }
    assert_eq!(identity(&proxy).unwrap(), "");
}
