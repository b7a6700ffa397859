//! The discovery stream end to end: an in-process controller over a manifests directory, and
//! scripted proxies on real gRPC streams.

mod common;

use common::*;
use trellis_proto::discovery::v1::{self as api, resource::Kind};

const ALL_CLUSTERS: [&str; 4] = [
    "shop/api-v2:8080",
    "shop/api:8080",
    "shop/db:5432",
    "shop/web:80",
];
const ALL_LISTENERS: [&str; 4] = [
    "outbound/shop/api-v2:8080",
    "outbound/shop/api:8080",
    "outbound/shop/db:5432",
    "outbound/shop/web:80",
];
const HTTP_ROUTES: [&str; 3] = [
    "outbound/shop/api-v2:8080",
    "outbound/shop/api:8080",
    "outbound/shop/web:80",
];

async fn converged_sidecar(controller: &Controller, id: &str) -> Proxy {
    let mut proxy = Proxy::connect(controller, Proxy::sidecar_node(id)).await;
    proxy.subscribe_all().await;
    proxy.settle(controller, true).await;
    proxy
}

#[tokio::test]
async fn initial_sync_orders_clusters_endpoints_listeners_routes() {
    let controller = Controller::start().await;
    let mut proxy = Proxy::connect(&controller, Proxy::sidecar_node("sidecar-1")).await;
    proxy.follow = false;
    proxy.subscribe_all().await;

    let clusters = proxy.recv().await;
    assert_eq!(clusters.type_url, CLUSTER);
    let names: Vec<_> = clusters.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ALL_CLUSTERS);
    assert!(clusters.resources.iter().all(|r| !r.version.is_empty()));

    // Endpoints follow the clusters; listeners wait for the cluster ACK.
    let endpoint_names: Vec<String> = ALL_CLUSTERS.iter().map(|s| s.to_string()).collect();
    proxy.subscribe(ENDPOINTS, &endpoint_names).await;
    let endpoints = proxy.recv().await;
    assert_eq!(endpoints.type_url, ENDPOINTS);
    assert_eq!(endpoints.resources.len(), 4);
    controller
        .wait_status("listeners held back for the cluster ACK", |r| {
            r.proxies[0]
                .types
                .get("listeners")
                .is_some_and(|t| t.held_back == 4)
        })
        .await;

    proxy.handle(&clusters).await;
    let listeners = proxy.recv().await;
    assert_eq!(listeners.type_url, LISTENER);
    let names: Vec<_> = listeners
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ALL_LISTENERS);
    proxy.handle(&endpoints).await;
    proxy.handle(&listeners).await;

    let routes: Vec<String> = HTTP_ROUTES.iter().map(|s| s.to_string()).collect();
    proxy.subscribe(ROUTES, &routes).await;
    let rds = proxy.recv().await;
    assert_eq!(rds.type_url, ROUTES);
    assert_eq!(rds.resources.len(), 3);
    proxy.handle(&rds).await;
    assert!(proxy.settle(&controller, false).await.is_empty());

    // The GAMMA route splits api traffic; the default route sends web to itself.
    let Some(Kind::RouteConfiguration(rc)) = proxy.resource(ROUTES, "outbound/shop/api:8080")
    else {
        panic!("api routes missing")
    };
    let Some(api::route::Action::Forward(f)) = &rc.virtual_hosts[0].routes[0].action else {
        panic!("{rc:?}")
    };
    let split: Vec<_> = f
        .clusters
        .iter()
        .map(|c| (c.cluster.as_str(), c.weight))
        .collect();
    assert_eq!(split, [("shop/api:8080", 90), ("shop/api-v2:8080", 10)]);

    // ACKs are recorded: the status holds exactly the versions the proxy holds.
    let report = controller.status().await;
    let acked = &report.proxies[0].types["clusters"].acked;
    for name in ALL_CLUSTERS {
        assert_eq!(
            acked.get(name).map(String::as_str),
            proxy.version(CLUSTER, name)
        );
    }
    assert_eq!(report.proxies[0].role, "sidecar");
}

#[tokio::test]
async fn nack_is_recorded_and_visible_in_status() {
    let controller = Controller::start().await;
    let mut proxy = converged_sidecar(&controller, "sidecar-nack").await;
    let before = proxy.version(ENDPOINTS, "shop/web:80").unwrap().to_owned();

    proxy.nack_next = Some((ENDPOINTS, "endpoints[0].address: rejected by test".into()));
    controller.edit("endpoints.yaml", "[10.0.0.2]", "[10.0.0.2, 10.0.0.3]");
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [seen(ENDPOINTS, &["shop/web:80"], &[])]);

    let report = controller.status().await;
    let endpoints = &report.proxies[0].types["endpoints"];
    let nack = endpoints.last_nack.as_ref().expect("NACK recorded");
    assert_eq!(nack.message, "endpoints[0].address: rejected by test");
    assert!(nack.at_unix_ms > 0);
    assert_eq!(
        endpoints.acked["shop/web:80"], before,
        "the ACKed version did not move"
    );

    // The raw JSON carries it too, as an operator would read it.
    let (status, body) = trellis_control::admin::get(controller.admin, "/status")
        .await
        .unwrap();
    assert!(status.is_success());
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        json["proxies"][0]["types"]["endpoints"]["last_nack"]["message"],
        "endpoints[0].address: rejected by test"
    );
    for (path, want) in [("/ready", 200), ("/live", 200), ("/nope", 404)] {
        let (status, _) = trellis_control::admin::get(controller.admin, path)
            .await
            .unwrap();
        assert_eq!(status.as_u16(), want, "{path}");
    }
}

#[tokio::test]
async fn file_edits_send_only_what_changed() {
    let controller = Controller::start().await;
    let mut proxy = converged_sidecar(&controller, "sidecar-edits").await;

    // Add an endpoint: that cluster's endpoints, nothing else.
    controller.edit("endpoints.yaml", "[10.0.0.2]", "[10.0.0.2, 10.0.0.3]");
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [seen(ENDPOINTS, &["shop/web:80"], &[])]);
    let Some(Kind::ClusterLoadAssignment(cla)) = proxy.resource(ENDPOINTS, "shop/web:80") else {
        panic!()
    };
    assert_eq!(cla.endpoints.len(), 3);

    // Remove one.
    controller.edit(
        "endpoints.yaml",
        "  - addresses: [10.0.0.2, 10.0.0.3]\n    conditions: {ready: true}\n",
        "",
    );
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [seen(ENDPOINTS, &["shop/web:80"], &[])]);
    let Some(Kind::ClusterLoadAssignment(cla)) = proxy.resource(ENDPOINTS, "shop/web:80") else {
        panic!()
    };
    assert_eq!(cla.endpoints.len(), 1);

    // Change the GAMMA route's weights: only that route configuration.
    controller.edit("mesh-routes.yaml", "weight: 90", "weight: 50");
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [seen(ROUTES, &["outbound/shop/api:8080"], &[])]);

    // A new HTTPRoute on the web Service.
    controller.write(
        "web-route.yaml",
        "kind: HTTPRoute
metadata: {name: web-canary, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: '', name: web, port: 80}]
  rules:
    - matches: [{headers: [{name: x-canary, value: 'true'}]}]
      backendRefs: [{name: api-v2, port: 8080}]
    - backendRefs: [{name: web, port: 80}]
",
    );
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [seen(ROUTES, &["outbound/shop/web:80"], &[])]);

    // Delete the db Service: its listener goes first, then the cluster, then its endpoints.
    let services = std::fs::read_to_string(controller.path("services.yaml")).unwrap();
    let without_db = services
        .split("---")
        .filter(|d| !d.contains("name: db"))
        .collect::<Vec<_>>()
        .join("---");
    controller.write("services.yaml", &without_db);
    let log = proxy.settle(&controller, true).await;
    assert_eq!(
        log,
        [
            seen(LISTENER, &[], &["outbound/shop/db:5432"]),
            seen(CLUSTER, &[], &["shop/db:5432"]),
            seen(ENDPOINTS, &[], &["shop/db:5432"]),
        ]
    );

    // Deleting a file removes what it held: the canary route goes, web falls back to default.
    std::fs::remove_file(controller.path("web-route.yaml")).unwrap();
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [seen(ROUTES, &["outbound/shop/web:80"], &[])]);
}

#[tokio::test]
async fn route_retry_and_backend_timeout_arrive_as_the_retry_policy() {
    let controller = Controller::start().await;
    let mut proxy = converged_sidecar(&controller, "sidecar-retry").await;

    controller.write(
        "web-retry.yaml",
        "kind: HTTPRoute
metadata: {name: web-retry, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: '', name: web, port: 80}]
  rules:
    - backendRefs: [{name: web, port: 80}]
      retry: {codes: [502, 503], attempts: 3, backoff: 100ms}
      timeouts: {request: 10s, backendRequest: 2s}
",
    );
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [seen(ROUTES, &["outbound/shop/web:80"], &[])]);
    let Some(Kind::RouteConfiguration(rc)) = proxy.resource(ROUTES, "outbound/shop/web:80") else {
        panic!("web routes missing")
    };
    let route = &rc.virtual_hosts[0].routes[0];
    assert_eq!(route.name, "shop/web-retry/0/0");
    // The request timeout bounds the whole exchange, retries included; backendRequest bounds
    // each try. What the HTTPRoute does not say stays unset, for the proxy's defaults.
    assert_eq!(route.timeout_ms, Some(10_000));
    assert_eq!(
        route.retry,
        Some(api::RetryPolicy {
            attempts: Some(3),
            backoff_ms: 100,
            codes: vec![502, 503],
            retry_on: vec![],
            per_try_timeout_ms: 2_000,
            backoff_max_ms: 0,
            retry_non_idempotent: false,
            replay_buffer_bytes: None,
        })
    );
    assert_eq!(route.rate_limit, None);
    assert_eq!(rc.virtual_hosts[0].retry, None);
    // Clusters leave circuit breakers and the retry budget to the proxy's defaults (on).
    let Some(Kind::Cluster(c)) = proxy.resource(CLUSTER, "shop/web:80") else {
        panic!("web cluster missing")
    };
    assert_eq!((c.circuit_breakers, c.retry_budget), (None, None));

    // Retries turned off explicitly: 0 is on the wire, not dropped as a default.
    controller.edit("web-retry.yaml", "attempts: 3", "attempts: 0");
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [seen(ROUTES, &["outbound/shop/web:80"], &[])]);
    let Some(Kind::RouteConfiguration(rc)) = proxy.resource(ROUTES, "outbound/shop/web:80") else {
        panic!("web routes missing")
    };
    let retry = rc.virtual_hosts[0].routes[0].retry.as_ref().unwrap();
    assert_eq!(retry.attempts, Some(0));
}

#[tokio::test]
async fn reconnect_sends_only_what_changed() {
    let controller = Controller::start().await;
    let proxy = converged_sidecar(&controller, "sidecar-reconnect").await;
    let held = proxy.held.clone();
    drop(proxy);

    // Nothing changed: a reconnect with the held versions gets nothing.
    let mut again = Proxy::connect(&controller, Proxy::sidecar_node("sidecar-reconnect-2")).await;
    again.held = held.clone();
    again.subscribe_all().await;
    assert!(again.settle(&controller, false).await.is_empty());
    drop(again);

    // While disconnected: an endpoint changes and the db Service goes away.
    controller.edit("endpoints.yaml", "[10.0.0.2]", "[10.0.0.2, 10.0.0.3]");
    let services = std::fs::read_to_string(controller.path("services.yaml")).unwrap();
    let without_db = services
        .split("---")
        .filter(|d| !d.contains("name: db"))
        .collect::<Vec<_>>()
        .join("---");
    controller.write("services.yaml", &without_db);
    controller
        .wait_status("no proxies left", |r| r.proxies.is_empty())
        .await;
    // Wait for the catalog to take the edits: a fresh proxy sees three clusters.
    let mut probe = converged_sidecar(&controller, "probe").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while probe.held[CLUSTER].len() != 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edits never arrived"
        );
        probe.settle(&controller, true).await;
    }

    let mut back = Proxy::connect(&controller, Proxy::sidecar_node("sidecar-reconnect-3")).await;
    back.held = held;
    back.subscribe_all().await;
    // Make before break: the listener's removal first, the cluster's once that is ACKed, and
    // the endpoints' removal after the cluster's. The endpoint change goes as soon as asked.
    let log = back.settle(&controller, true).await;
    assert_eq!(
        log,
        [
            seen(LISTENER, &[], &["outbound/shop/db:5432"]),
            seen(ENDPOINTS, &["shop/web:80"], &[]),
            seen(CLUSTER, &[], &["shop/db:5432"]),
            seen(ENDPOINTS, &[], &["shop/db:5432"]),
        ]
    );
}

#[tokio::test]
async fn stale_nonce_is_ignored() {
    let controller = Controller::start().await;
    let mut proxy = Proxy::connect(&controller, Proxy::sidecar_node("sidecar-stale")).await;
    proxy.subscribe_all().await;
    let first = proxy.recv().await;
    let old_nonce = first.nonce.clone();
    proxy.handle(&first).await;
    proxy.settle(&controller, false).await;

    // A NACK of an already-ACKed response: stale, so nothing is recorded or resent.
    proxy
        .send(api::DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            response_nonce: old_nonce,
            error_detail: Some(api::ErrorDetail {
                message: "late".into(),
            }),
            ..Default::default()
        })
        .await;
    let report = controller
        .wait_status("the stale request counted", |r| {
            r.proxies[0].types[&"clusters".to_string()].stale_ignored == 1
        })
        .await;
    assert!(report.proxies[0].types["clusters"].last_nack.is_none());
    assert_eq!(report.proxies[0].types["clusters"].acked.len(), 4);
    assert!(proxy.settle(&controller, false).await.is_empty());
}

#[tokio::test]
async fn broken_file_is_reported_and_last_good_content_serves() {
    let controller = Controller::start().await;
    let mut proxy = converged_sidecar(&controller, "sidecar-broken").await;

    // Written in place (a modify event, not a rename).
    std::fs::write(
        controller.path("endpoints.yaml"),
        "kind: EndpointSlice\nmetadata:\n  name: [unclosed\n",
    )
    .unwrap();
    let report = controller
        .wait_status("the broken file reported", |r| !r.source_errors.is_empty())
        .await;
    let error = &report.source_errors[0];
    assert!(error.file.ends_with("endpoints.yaml"), "{error:?}");
    assert!(error.line >= 2, "{error:?}");
    // The endpoints stay as they were: nothing is sent.
    assert!(proxy.settle(&controller, false).await.is_empty());
    assert!(proxy.version(ENDPOINTS, "shop/web:80").is_some());

    // A good edit elsewhere still flows, and fixing the file clears the error.
    controller.edit("mesh-routes.yaml", "weight: 90", "weight: 80");
    let log = proxy.settle(&controller, true).await;
    assert_eq!(log, [seen(ROUTES, &["outbound/shop/api:8080"], &[])]);
    let fixed = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mesh/endpoints.yaml"),
    )
    .unwrap();
    controller.write("endpoints.yaml", &fixed);
    controller
        .wait_status("the error cleared", |r| r.source_errors.is_empty())
        .await;
}

#[tokio::test]
async fn two_proxies_converge_gateway_and_sidecar() {
    let controller = Controller::start().await;
    let mut sidecar = converged_sidecar(&controller, "sidecar-a").await;
    let mut gateway = Proxy::connect(&controller, Proxy::gateway_node("gateway-a")).await;
    gateway.subscribe_all().await;
    let log = gateway.settle(&controller, true).await;
    assert_eq!(
        log,
        [
            seen(CLUSTER, &["shop/api:8080", "shop/web:80"], &[]),
            seen(ENDPOINTS, &["shop/api:8080", "shop/web:80"], &[]),
            seen(LISTENER, &["gateway/shop/ingress:8080"], &[]),
            seen(ROUTES, &["gateway/shop/ingress:8080"], &[]),
        ]
    );
    let Some(Kind::Listener(l)) = gateway.resource(LISTENER, "gateway/shop/ingress:8080") else {
        panic!()
    };
    assert_eq!(l.address, "0.0.0.0:8080");
    let Some(Kind::RouteConfiguration(rc)) = gateway.resource(ROUTES, "gateway/shop/ingress:8080")
    else {
        panic!()
    };
    assert_eq!(rc.virtual_hosts[0].domains, ["shop.example.com"]);
    assert_eq!(rc.virtual_hosts[0].routes[0].timeout_ms, Some(5_000));

    // One endpoint change reaches both.
    controller.edit("endpoints.yaml", "[10.0.0.2]", "[10.0.0.2, 10.0.0.4]");
    let (a, b) = tokio::join!(
        sidecar.settle(&controller, true),
        gateway.settle(&controller, true)
    );
    assert_eq!(a, [seen(ENDPOINTS, &["shop/web:80"], &[])]);
    assert_eq!(b, [seen(ENDPOINTS, &["shop/web:80"], &[])]);
    assert_eq!(
        sidecar.version(ENDPOINTS, "shop/web:80"),
        gateway.version(ENDPOINTS, "shop/web:80")
    );
    assert_eq!(controller.status().await.proxies.len(), 2);
}
