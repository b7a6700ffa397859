//! Sidecar capture: connections that iptables redirected to a capture listener. Each one's
//! original destination picks an entry of the listener's service table; the entry's protocol,
//! declared or detected from the first bytes, decides between the HTTP server (routed by the
//! entry's route configuration) and TCP proxying to the entry's cluster. A destination not in
//! the table is passed through (outbound: where it was going; inbound: the application on
//! loopback) or closed.

pub mod detect;
pub mod original_dst;
mod prefixed;
mod serve;

use std::sync::Arc;

pub use prefixed::Prefixed;
pub use serve::{Connection, serve};

use crate::{
    config::model::Capture, identity::mtls::MeshTls, telemetry::CaptureMetrics, upstream::Cluster,
};

/// A capture listener compiled against one configuration version.
#[derive(Debug)]
pub struct CaptureTable {
    pub model: Capture,
    /// One per `model.services` entry, in the same order.
    pub entries: Box<[CaptureEntry]>,
    pub metrics: CaptureMetrics,
    /// This proxy's mesh mTLS, when it runs with a workload identity: inbound connections that
    /// offer the mesh ALPN are terminated with it.
    pub mesh: Option<Arc<MeshTls>>,
}

/// What an entry of the service table resolved to.
#[derive(Debug)]
pub struct CaptureEntry {
    /// `None`: the configuration holds no cluster of that name (its connections are closed).
    pub cluster: Option<Arc<Cluster>>,
    /// The key of its route table in `Compiled::http_routes`, for HTTP connections.
    pub routes: Arc<str>,
}

/// The source address of the inbound side's connections to the pod's own address (a port no
/// Service names), which the rules of `trellis-proxy iptables` leave alone: without it such a
/// connection would be redirected to the inbound listener again, and again. IPv4 only: `lo`
/// has no such IPv6 address.
pub const INBOUND_PASSTHROUGH_SOURCE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);
