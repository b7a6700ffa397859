//! A small run of the control-plane scale benchmark (`benches/controlplane.rs`) that checks
//! correctness, not timing: N = 100 services, M = 20 simulated sidecar streams connecting at
//! once to the real `trellis-control` process; every stream converges to a full configuration,
//! streams in the same namespace hold the same resources at the same versions, and an endpoint
//! change reaches every stream.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use trellis_control::simulate::{self, Catalog, ControllerProcess, ProxyStats, SimOptions};
use trellis_proto::discovery::v1 as api;

const BOUND: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_streams_converge_to_the_same_versions() {
    let catalog = Catalog {
        services: 100,
        endpoints_per_service: 10,
        namespaces: 4,
        gateways: 2,
        route_every: 10,
    };
    let dir = tempfile::tempdir().unwrap();
    catalog.write(dir.path()).unwrap();
    let controller = ControllerProcess::spawn(env!("CARGO_BIN_EXE_trellis-control"), dir.path());
    let started = Instant::now();
    while !controller.ready().await {
        assert!(started.elapsed() < BOUND, "controller never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stats: Vec<Arc<ProxyStats>> = (0..20).map(|_| Arc::default()).collect();
    for (i, s) in stats.iter().enumerate() {
        let options = SimOptions {
            node: simulate::sidecar_node(&format!("sim-{i}"), &format!("ns-{}", i % 4)),
            track_versions: true,
            start_delay: Duration::ZERO,
            max_message: 4 << 20,
        };
        tokio::spawn(simulate::run(
            controller.grpc,
            options,
            s.clone(),
            stopped.clone(),
        ));
    }
    let deadline = Instant::now() + BOUND;
    while stats.iter().any(|s| s.full_at().is_none()) {
        assert!(
            Instant::now() < deadline,
            "not every stream got a full configuration"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // One endpoint change reaches every stream.
    let cluster = catalog.cluster_of(42);
    for s in &stats {
        s.watch(api::CLUSTER_LOAD_ASSIGNMENT_TYPE, &cluster);
    }
    let tmp = dir.path().join(".change.tmp");
    std::fs::write(&tmp, catalog.service_yaml(42, 1)).unwrap();
    std::fs::rename(&tmp, dir.path().join(catalog.file_of(42))).unwrap();
    let deadline = Instant::now() + BOUND;
    while stats
        .iter()
        .any(|s| s.watched().and_then(|w| w.acked_at).is_none())
    {
        assert!(
            Instant::now() < deadline,
            "the endpoint change did not reach every stream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Streams of one namespace hold the same resources at the same versions, and hold every
    // cluster (sidecars see every Service today) with its endpoints.
    let held: Vec<_> = stats
        .iter()
        .map(|s| s.versions.lock().unwrap().clone())
        .collect();
    for (i, h) in held.iter().enumerate() {
        let same_namespace = &held[i % 4];
        assert_eq!(h, same_namespace, "sim-{i} differs from sim-{}", i % 4);
        let clusters = h.get(api::CLUSTER_TYPE).map_or(0, |c| c.len());
        let endpoints = h
            .get(api::CLUSTER_LOAD_ASSIGNMENT_TYPE)
            .map_or(0, |c| c.len());
        assert!(clusters >= 100, "sim-{i} holds {clusters} clusters");
        assert_eq!(
            clusters, endpoints,
            "sim-{i}: an endpoint assignment per cluster"
        );
    }
    assert_eq!(
        stats
            .iter()
            .map(|s| s.failed_attempts.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>(),
        0,
        "no stream failed"
    );
    let _ = stop.send(true);
}
