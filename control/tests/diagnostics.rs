//! Diagnostics through the real controller server: a manifest edit that leaves a backendRef
//! unresolved is served (the route keeps that backend's share, no Cluster for it), shown in
//! `/status` and `/metrics`, and clears when fixed; a gateway proxy for a missing Gateway is
//! told so until the Gateway appears.

mod common;

use common::*;
use trellis_proto::discovery::v1::{self as api, resource::Kind};

const ROUTE: &str = "gateway/shop/ingress:8080";

fn split(proxy: &Proxy) -> Vec<(String, u32)> {
    let Some(Kind::RouteConfiguration(rc)) = proxy.resource(ROUTES, ROUTE) else {
        panic!("no route config {ROUTE}")
    };
    let vhost = rc
        .virtual_hosts
        .iter()
        .find(|v| v.name == "shop.example.com")
        .expect("the storefront's virtual host");
    let Some(api::route::Action::Forward(f)) = &vhost.routes[1].action else {
        panic!("{vhost:?}")
    };
    f.clusters
        .iter()
        .map(|c| (c.cluster.clone(), c.weight))
        .collect()
}

async fn metrics(controller: &Controller) -> String {
    let (status, body) = trellis_control::admin::get(controller.admin, "/metrics")
        .await
        .unwrap();
    assert!(status.is_success());
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn a_missing_backend_is_served_as_its_share_shown_and_cleared() {
    let controller = Controller::start().await;
    let mut proxy = Proxy::connect(&controller, Proxy::gateway_node("gw-diag")).await;
    proxy.subscribe_all().await;
    proxy.settle(&controller, true).await;
    assert_eq!(split(&proxy), [("shop/web:80".to_owned(), 1)]);

    // A second backend whose Service does not exist, beside the one that does.
    controller.edit(
        "gateway.yaml",
        "    - backendRefs: [{name: web, port: 80}]",
        "    - backendRefs: [{name: web, port: 80, weight: 3}, {name: nope, port: 80}]",
    );
    proxy.settle(&controller, true).await;
    assert_eq!(
        split(&proxy),
        [
            ("shop/web:80".to_owned(), 3),
            ("shop/nope:80".to_owned(), 1)
        ]
    );
    assert!(proxy.resource(CLUSTER, "shop/nope:80").is_none());
    let report = controller
        .wait_status("the missing backend reported", |r| !r.problems.is_empty())
        .await;
    let d = &report.problems[0];
    assert_eq!(
        (
            d.kind.as_str(),
            d.name.as_str(),
            d.section.as_deref(),
            d.condition.as_str(),
            d.status.as_str(),
            d.reason.as_str()
        ),
        (
            "HTTPRoute",
            "storefront",
            Some("rules[1].backendRefs[1]"),
            "ResolvedRefs",
            "False",
            "BackendNotFound"
        )
    );
    let text = metrics(&controller).await;
    assert!(
        text.contains(
            "trellis_control_object_problems{kind=\"HTTPRoute\",reason=\"BackendNotFound\"} 1\n"
        ),
        "{text}"
    );

    // Fixed: the diagnostic and its series go, the route holds only the real backend.
    controller.edit("gateway.yaml", ", {name: nope, port: 80}", "");
    proxy.settle(&controller, true).await;
    assert_eq!(split(&proxy), [("shop/web:80".to_owned(), 3)]);
    controller
        .wait_status("the problem cleared", |r| r.problems.is_empty())
        .await;
    assert!(!metrics(&controller).await.contains("BackendNotFound"));
}

#[tokio::test]
async fn a_gateway_proxy_is_told_its_gateway_is_missing_until_it_exists() {
    let controller = Controller::start().await;
    let mut node = Proxy::gateway_node("gw-lost");
    node.gateway_name = "edge".into();
    let mut proxy = Proxy::connect(&controller, node).await;
    proxy.subscribe_all().await;
    let report = controller
        .wait_status("the proxy's problem", |r| {
            r.proxies.iter().any(|p| !p.problems.is_empty())
        })
        .await;
    let d = &report.proxies[0].problems[0];
    assert_eq!(
        (d.condition.as_str(), d.reason.as_str()),
        ("Configured", "GatewayNotFound")
    );
    assert!(d.message.contains("Gateway shop/edge"), "{}", d.message);
    assert!(metrics(&controller).await.contains(
        "trellis_control_object_problems{kind=\"Proxy\",reason=\"GatewayNotFound\"} 1\n"
    ));

    // The Gateway appears: the proxy gets its listener and the problem clears.
    let gateway = std::fs::read_to_string(controller.path("gateway.yaml")).unwrap();
    controller.write("edge.yaml", &gateway.replace("name: ingress", "name: edge"));
    proxy.settle(&controller, true).await;
    assert!(proxy.resource(LISTENER, "gateway/shop/edge:8080").is_some());
    controller
        .wait_status("the proxy's problem cleared", |r| {
            r.proxies.iter().all(|p| p.problems.is_empty())
        })
        .await;
}
