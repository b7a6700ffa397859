//! The admin API: readiness and drain, the config dump across a reload, live cluster state, and
//! the loopback-only default.

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use trellis_proxy::{
    Proxy,
    admin::{self, AdminError},
    config::validate,
};

async fn admin_get(admin: std::net::SocketAddr, path: &str) -> (StatusCode, Bytes) {
    let (resp, body) = get(&h1_client(), &format!("http://{admin}{path}")).await;
    (resp.status(), body)
}

async fn admin_json(admin: std::net::SocketAddr, path: &str) -> Value {
    let (status, body) = admin_get(admin, path).await;
    assert_eq!(status, StatusCode::OK, "{path}");
    serde_json::from_slice(&body).unwrap()
}

fn direct_config(listener: &str, cluster: &str) -> String {
    format!(
        r#"
listeners:
  - {{ name: {listener}, address: "127.0.0.1:0" }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: vh
        domains: ["*"]
        routes:
          - {{ name: hi, direct_response: {{ status: 200, body: hi }} }}
clusters:
  - {{ name: {cluster}, endpoints: ["127.0.0.1:9"] }}
"#
    )
}

#[tokio::test]
async fn ready_only_between_first_config_and_drain() {
    let proxy = Proxy::new();
    let (admin, lifecycle) = start_admin(&proxy).await;
    assert_eq!(
        admin_get(admin, "/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(admin_get(admin, "/live").await.0, StatusCode::OK);

    let config = validate::from_yaml(&direct_config("d1", "d1-c")).unwrap();
    proxy.apply(config).await.unwrap();
    assert_eq!(admin_get(admin, "/ready").await.0, StatusCode::OK);
    let m = scrape(admin).await;
    assert_eq!(metric(&m, "trellis_ready", &[]), Some(1.0));
    let addr = proxy.listener_addr("d1").await.unwrap();
    assert_eq!(
        get(&h1_client(), &format!("http://{addr}/"))
            .await
            .0
            .status(),
        200
    );

    assert_eq!(
        admin_get(admin, "/drain").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let drained = tokio::spawn({
        let lifecycle = lifecycle.clone();
        async move { lifecycle.draining().await }
    });
    let (resp, _) = send(
        &h1_client(),
        Request::post(format!("http://{admin}/drain"))
            .header("x-trellis-admin", "1")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .expect("drain notification")
        .unwrap();
    assert_eq!(
        admin_get(admin, "/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(admin_get(admin, "/live").await.0, StatusCode::OK);
    eventually(
        Duration::from_secs(5),
        "listener stops accepting",
        || async { tokio::net::TcpStream::connect(addr).await.is_err() },
    )
    .await;
}

#[tokio::test]
async fn config_dump_reflects_a_reload() {
    let (proxy, _) = start_named(&direct_config("d2", "d2-first"), "d2").await;
    let (admin, _) = start_admin(&proxy).await;
    let dump = admin_json(admin, "/config_dump").await;
    assert_eq!(dump["version"], 1);
    assert_eq!(dump["clusters"][0]["name"], "d2-first");
    assert_eq!(dump["listeners"][0]["name"], "d2");
    assert_eq!(
        dump["route_configs"][0]["virtual_hosts"][0]["routes"][0]["name"],
        "hi"
    );

    let next = validate::from_yaml(&direct_config("d2", "d2-second")).unwrap();
    assert_eq!(proxy.apply(next).await.unwrap(), 2);
    let dump = admin_json(admin, "/config_dump").await;
    assert_eq!(dump["version"], 2);
    let names: Vec<&str> = dump["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["d2-second"]);
    let m = scrape(admin).await;
    assert_eq!(metric(&m, "trellis_config_version", &[]), Some(2.0));
}

#[tokio::test]
async fn clusters_show_an_ejected_endpoint() {
    let (good, _, _) = controlled_upstream("good").await;
    let (bad, bad_b, _) = controlled_upstream("bad").await;
    bad_b.status.store(500, Ordering::SeqCst);
    let yaml = format!(
        r#"
listeners:
  - {{ name: d3, address: "127.0.0.1:0" }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: vh
        domains: ["*"]
        routes:
          - {{ name: all, forward: {{ cluster: d3-c }} }}
clusters:
  - name: d3-c
    lb: {{ policy: round_robin }}
    outlier_detection: {{ consecutive_5xx: 2, base_ejection_time: 5m }}
    endpoints: ["{good}", "{bad}"]
"#
    );
    let (proxy, addr) = start_named(&yaml, "d3").await;
    let (admin, _) = start_admin(&proxy).await;
    for _ in 0..6 {
        get(&h1_client(), &format!("http://{addr}/")).await;
    }
    let v = admin_json(admin, "/clusters").await;
    let cluster = &v["clusters"][0];
    assert_eq!(cluster["name"], "d3-c");
    assert_eq!(cluster["ejections_total"], 1);
    let endpoint = |a: std::net::SocketAddr| {
        cluster["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == a.to_string())
            .cloned()
            .unwrap()
    };
    let (g, b) = (endpoint(good), endpoint(bad));
    assert_eq!(
        (g["ejected"].clone(), b["ejected"].clone()),
        (false.into(), true.into())
    );
    assert_eq!(b["ejections"], 1);
    assert_eq!(
        (g["weight"].clone(), g["healthy"].clone()),
        (1.into(), true.into())
    );
    assert!(g["active_requests"].is_u64());

    let m = scrape(admin).await;
    let ejected = |a: std::net::SocketAddr| {
        metric(
            &m,
            "trellis_endpoint_ejected",
            &[("cluster", "d3-c"), ("endpoint", &a.to_string())],
        )
    };
    assert_eq!((ejected(good), ejected(bad)), (Some(0.0), Some(1.0)));
    assert_eq!(
        metric(
            &m,
            "trellis_endpoint_ejections_total",
            &[("cluster", "d3-c")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn admin_refuses_non_loopback_binds_unless_allowed() {
    let any = "0.0.0.0:0".parse().unwrap();
    match admin::bind(any, false).await {
        Err(AdminError::NotLoopback { address }) => assert_eq!(address, any),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(admin::bind(any, true).await.is_ok());
    assert!(
        admin::bind("127.0.0.1:0".parse().unwrap(), false)
            .await
            .is_ok()
    );
    assert!(admin::bind("[::1]:0".parse().unwrap(), false).await.is_ok() || !ipv6_available());
}

fn ipv6_available() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

#[tokio::test]
async fn unknown_admin_paths_are_404() {
    let proxy = Proxy::new();
    let (admin, _) = start_admin(&proxy).await;
    assert_eq!(admin_get(admin, "/nope").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        admin_get(admin, "/config_dump").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}
