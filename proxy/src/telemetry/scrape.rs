//! The `/metrics` page: the registry, then figures that already live in the running config's
//! atomics (cluster counters, endpoint health), read at scrape time rather than recorded twice.

use std::sync::atomic::Ordering;

use super::{
    names,
    registry::{header, sample},
};
use crate::{
    config::Compiled,
    upstream::{ClusterStats, EndpointState},
};

/// A metric read from each cluster's counters: name, help, type, reader.
type ClusterFigure = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ClusterStats) -> u64,
);
/// A gauge read from each endpoint's state: name, help, reader.
type EndpointFigure = (&'static str, &'static str, fn(&EndpointState) -> f64);

/// Renders every metric in the Prometheus text format (version 0.0.4).
pub fn render(compiled: Option<&Compiled>, ready: bool) -> String {
    let mut out = String::with_capacity(16 * 1024);
    super::registry().render(&mut out);

    header(
        &mut out,
        names::READY,
        Some("1 when /ready answers 200."),
        "gauge",
    );
    sample(&mut out, names::READY, &[], if ready { 1.0 } else { 0.0 });
    super::identity::render(&mut out);
    let Some(compiled) = compiled else {
        return out;
    };
    header(
        &mut out,
        names::CONFIG_VERSION,
        Some("Version of the configuration in force."),
        "gauge",
    );
    sample(
        &mut out,
        names::CONFIG_VERSION,
        &[],
        compiled.version as f64,
    );

    let mut clusters: Vec<_> = compiled.clusters.values().collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    let per_cluster: [ClusterFigure; 5] = [
        (
            names::TCP_CONNECTIONS_TOTAL,
            "TCP connections proxied, by cluster.",
            "counter",
            |s| s.connections_total.load(Ordering::Relaxed),
        ),
        (
            names::TCP_BYTES_SENT_TOTAL,
            "TCP bytes sent to the cluster's endpoints.",
            "counter",
            |s| s.bytes_sent.load(Ordering::Relaxed),
        ),
        (
            names::TCP_BYTES_RECEIVED_TOTAL,
            "TCP bytes received from the cluster's endpoints.",
            "counter",
            |s| s.bytes_received.load(Ordering::Relaxed),
        ),
        (
            names::PANIC_PICKS_TOTAL,
            "Endpoint picks made in panic mode (too few endpoints available).",
            "counter",
            |s| s.panic_picks.load(Ordering::Relaxed),
        ),
        (
            names::EJECTIONS_TOTAL,
            "Outlier ejections, by cluster.",
            "counter",
            |s| s.ejections_total.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, kind, read) in per_cluster {
        header(&mut out, name, Some(help), kind);
        for c in &clusters {
            sample(
                &mut out,
                name,
                &[("cluster", &c.name)],
                read(&c.stats) as f64,
            );
        }
    }
    let per_endpoint: [EndpointFigure; 3] = [
        (
            names::ENDPOINT_HEALTHY,
            "1 when the endpoint passes active health checks.",
            |s| f64::from(u8::from(s.is_healthy())),
        ),
        (
            names::ENDPOINT_EJECTED,
            "1 while outlier detection keeps the endpoint out.",
            |s| f64::from(u8::from(s.is_ejected())),
        ),
        (
            names::ENDPOINT_ACTIVE,
            "Requests (HTTP) or connections (TCP) in flight on the endpoint.",
            |s| f64::from(s.active()),
        ),
    ];
    for (name, help, read) in per_endpoint {
        header(&mut out, name, Some(help), "gauge");
        for c in &clusters {
            for e in c.endpoints.iter() {
                let address = e.address.to_string();
                sample(
                    &mut out,
                    name,
                    &[("cluster", &c.name), ("endpoint", &address)],
                    read(&e.state),
                );
            }
        }
    }
    header(
        &mut out,
        names::TLS_CERTIFICATE_EXPIRY,
        Some(
            "Seconds until the certificate's notAfter (negative once expired), by listener and certificate (its first server name, or default), or by secret.",
        ),
        "gauge",
    );
    let now = std::time::SystemTime::now();
    let until = |t: std::time::SystemTime| match t.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    let mut listeners: Vec<_> = compiled.tls_servers().collect();
    listeners.sort_by(|a, b| a.0.cmp(b.0));
    for (listener, server) in listeners {
        for (name, not_after) in server.expiry() {
            sample(
                &mut out,
                names::TLS_CERTIFICATE_EXPIRY,
                &[("listener", listener), ("name", &name)],
                until(not_after),
            );
        }
    }
    for (secret, name, not_after) in compiled.secret_expiry() {
        sample(
            &mut out,
            names::TLS_CERTIFICATE_EXPIRY,
            &[("secret", secret), ("name", name)],
            until(*not_after),
        );
    }
    out
}
