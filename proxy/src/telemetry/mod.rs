//! Telemetry: Prometheus metrics (handles built off the request path), access logs written by a
//! background task, and the process's `tracing` subscriber.
//!
//! Every metric lives in one process-wide [`Registry`]; [`render`] produces the admin `/metrics`
//! page from it plus figures read from the running config at scrape time (cluster and endpoint
//! state that already lives in atomics, so the request path records nothing twice).

pub mod access_log;
pub mod handles;
pub mod identity;
pub mod logging;
pub mod mesh;
pub mod names;
pub mod registry;
mod scrape;
pub mod tls;

use std::sync::OnceLock;

use metrics::{Counter, Key, Label, Metadata, Recorder};

pub use access_log::AccessLogSender;
pub use handles::{
    CaptureMetrics, ClusterMetrics, ConnectionGuard, Detected, DetectionReason, ListenerTelemetry,
    Refused, RetryOutcome, RouteMetrics, RouteTelemetry, TimeoutKind, status_class,
};
pub use registry::Registry;
pub use scrape::render;

/// The process-wide registry every handle records into.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let r = Registry::default();
        names::describe(&r);
        r
    })
}

/// Makes the registry the `metrics` crate's global recorder, so `metrics::counter!` and friends
/// anywhere in the process show up on `/metrics`. Idempotent.
pub fn install_global_recorder() {
    // An error means a recorder is already installed (ours, by an earlier call).
    let _ = metrics::set_global_recorder(registry());
}

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

fn global_counter(
    cell: &'static OnceLock<Counter>,
    name: &'static str,
    labels: &[(&'static str, &'static str)],
) -> &'static Counter {
    cell.get_or_init(|| {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, *v)).collect();
        registry().register_counter(&Key::from_parts(name, labels), &META)
    })
}

/// A configuration update was accepted and published (for the control plane: ACKed).
pub fn config_applied(version: u64) {
    static C: OnceLock<Counter> = OnceLock::new();
    global_counter(&C, names::CONFIG_UPDATES_TOTAL, &[("result", "applied")]).increment(1);
    tracing::debug!(version, "configuration applied");
}

/// A configuration update was refused; the previous one stays (for the control plane: NACKed).
pub fn config_rejected() {
    static C: OnceLock<Counter> = OnceLock::new();
    global_counter(&C, names::CONFIG_UPDATES_TOTAL, &[("result", "rejected")]).increment(1);
}

/// One resource of a discovery response was refused (NACKed by name); `kind` is one of
/// `cluster`, `endpoints`, `listener`, `route_config`, `secret`, `policy`, `unknown`.
pub fn xds_resource_rejected(kind: &str) {
    const NAME: &str = "trellis_xds_resources_rejected_total";
    static CLUSTER: OnceLock<Counter> = OnceLock::new();
    static ENDPOINTS: OnceLock<Counter> = OnceLock::new();
    static LISTENER: OnceLock<Counter> = OnceLock::new();
    static ROUTE_CONFIG: OnceLock<Counter> = OnceLock::new();
    static SECRET: OnceLock<Counter> = OnceLock::new();
    static POLICY: OnceLock<Counter> = OnceLock::new();
    static UNKNOWN: OnceLock<Counter> = OnceLock::new();
    let (cell, label) = match kind {
        "cluster" => (&CLUSTER, "cluster"),
        "endpoints" => (&ENDPOINTS, "endpoints"),
        "listener" => (&LISTENER, "listener"),
        "route_config" => (&ROUTE_CONFIG, "route_config"),
        "secret" => (&SECRET, "secret"),
        "policy" => (&POLICY, "policy"),
        _ => (&UNKNOWN, "unknown"),
    };
    global_counter(cell, NAME, &[("type", label)]).increment(1);
}

pub(crate) fn access_log_dropped() -> &'static Counter {
    static C: OnceLock<Counter> = OnceLock::new();
    global_counter(&C, names::ACCESS_LOG_LINES_TOTAL, &[("outcome", "dropped")])
}

pub(crate) fn access_log_written() -> &'static Counter {
    static C: OnceLock<Counter> = OnceLock::new();
    global_counter(&C, names::ACCESS_LOG_LINES_TOTAL, &[("outcome", "written")])
}

/// A request was still unfinished when the drain timeout ended.
pub(crate) fn drain_cut_request() {
    static C: OnceLock<Counter> = OnceLock::new();
    global_counter(&C, names::DRAIN_CUT_REQUESTS_TOTAL, &[]).increment(1);
}
