//! The typed configuration: what the bootstrap file and (later) the control-plane stream both turn
//! into after validation. Plain data: no sockets, no counters; `compile` builds runtime state.

use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};

/// A whole, validated proxy configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub listeners: Arc<[Listener]>,
    pub route_configs: Arc<[RouteConfig]>,
    pub clusters: Arc<[Cluster]>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    pub name: Arc<str>,
    pub address: SocketAddr,
    pub kind: ListenerKind,
    /// Where this listener's access log lines go; `None`: no access log.
    pub access_log: Option<AccessLog>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLog {
    Stdout,
    File(Arc<std::path::Path>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum ListenerKind {
    /// HTTP/1.1 and HTTP/2 cleartext (prior knowledge) on the same port, routed by the named
    /// route configuration.
    Http { route_config: Arc<str> },
    /// Every connection goes to an endpoint of one cluster (the ClusterIP model).
    Tcp(TcpProxy),
    /// TLS left encrypted: the ClientHello's server name picks the cluster.
    TlsPassthrough(SniProxy),
}

#[derive(Clone, Debug, PartialEq)]
pub struct TcpProxy {
    pub cluster: Arc<str>,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SniProxy {
    pub routes: Arc<[SniRoute]>,
    /// Where a ClientHello without a server name, or with an unknown one, goes; closed if none.
    pub default_cluster: Option<Arc<str>>,
    pub idle_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SniRoute {
    pub server_names: Arc<[DomainMatch]>,
    pub cluster: Arc<str>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouteConfig {
    pub name: Arc<str>,
    pub virtual_hosts: Arc<[VirtualHost]>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VirtualHost {
    pub name: Arc<str>,
    pub domains: Arc<[DomainMatch]>,
    pub routes: Arc<[Route]>,
}

/// How a virtual host claims a request's host (port stripped, compared case-insensitively).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DomainMatch {
    /// `api.example.com`
    Exact(Arc<str>),
    /// `*.example.com`, stored as `.example.com`: matches any name ending in it, not the bare
    /// domain.
    Suffix(Arc<str>),
    /// `*`
    Any,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub name: Arc<str>,
    pub matcher: RouteMatch,
    pub action: Action,
    pub filters: Filters,
    /// Time allowed from sending the request upstream to receiving the response head.
    pub timeout: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub headers: Arc<[HeaderMatch]>,
    pub query: Arc<[QueryMatch]>,
    pub method: Option<Method>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PathMatch {
    /// The whole path equals this.
    Exact(Arc<str>),
    /// Path-segment prefix: `/api` matches `/api`, `/api/` and `/api/x` but not `/apix`.
    /// Stored without a trailing slash (except for `/`).
    Prefix(Arc<str>),
    /// A `matchit` template such as `/users/{id}` or `/files/{*rest}`.
    Template(Arc<str>),
    /// A regular expression that must match the whole path.
    Regex(Pattern),
}

#[derive(Clone, Debug, PartialEq)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: ValueMatch,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QueryMatch {
    pub name: Arc<str>,
    pub value: ValueMatch,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ValueMatch {
    Exact(Arc<str>),
    /// Must match the whole value.
    Regex(Pattern),
    Present,
    Absent,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Forward to one of these clusters, chosen per request in proportion to the weights.
    Forward(Arc<[WeightedCluster]>),
    Redirect(Redirect),
    DirectResponse(DirectResponse),
}

#[derive(Clone, Debug, PartialEq)]
pub struct WeightedCluster {
    pub cluster: Arc<str>,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Redirect {
    pub scheme: Option<Scheme>,
    pub host: Option<Arc<str>>,
    pub port: Option<u16>,
    pub path: Option<PathRewrite>,
    pub status: StatusCode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A new path for a redirect or a rewrite.
#[derive(Clone, Debug, PartialEq)]
pub enum PathRewrite {
    /// Replace the whole path.
    Full(Arc<str>),
    /// Replace the part the route's prefix match matched (needs a prefix path match).
    Prefix(Arc<str>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct DirectResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filters {
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    pub rewrite: Option<Rewrite>,
}

/// Header edits, applied in the order remove, set, add.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeaderEdits {
    pub add: Arc<[(HeaderName, HeaderValue)]>,
    pub set: Arc<[(HeaderName, HeaderValue)]>,
    pub remove: Arc<[HeaderName]>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rewrite {
    pub path: Option<PathRewrite>,
    pub host: Option<HeaderValue>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    pub name: Arc<str>,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub endpoints: Arc<[Endpoint]>,
    pub lb: LbPolicy,
    pub health_check: Option<HealthCheck>,
    pub outlier_detection: Option<OutlierDetection>,
    /// When fewer than this percentage of endpoints are healthy, balance across all of them.
    pub panic_threshold_percent: u8,
}

/// How a cluster picks an endpoint: per request for HTTP, per connection for TCP.
#[derive(Clone, Debug, PartialEq)]
pub enum LbPolicy {
    /// Smooth weighted round robin.
    RoundRobin,
    /// Weighted random.
    Random,
    /// Power of two choices by outstanding requests, weighted.
    LeastRequest,
    /// Power of two choices by peak-EWMA latency × outstanding requests (Linkerd's default).
    PeakEwma { decay: Duration },
    /// Consistent hashing on a ring (Ketama-style); `min_ring_size` virtual nodes at least.
    RingHash { key: HashKey, min_ring_size: u32 },
    /// Maglev consistent hashing; `table_size` must be prime.
    Maglev { key: HashKey, table_size: u32 },
}

/// What a consistent-hash balancer hashes. With no value (header or cookie absent) the pick is
/// random.
#[derive(Clone, Debug, PartialEq)]
pub enum HashKey {
    Header(HeaderName),
    Cookie(Arc<str>),
    SourceIp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Passes in a row that bring an unhealthy endpoint back.
    pub healthy_threshold: u32,
    /// Failures in a row that take a healthy endpoint out.
    pub unhealthy_threshold: u32,
    /// Up to this much is added at random to each interval, so checks spread out.
    pub jitter: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub enum HealthCheckKind {
    /// The endpoint accepts a TCP connection.
    Tcp,
    /// `GET path` answers with one of the expected statuses.
    Http {
        path: Arc<str>,
        host: Option<Arc<str>>,
        /// Inclusive ranges; default 200..=299.
        expected_statuses: Arc<[(u16, u16)]>,
    },
    /// `grpc.health.v1.Health/Check` answers SERVING (over h2c).
    Grpc { service: Arc<str> },
}

/// Passive health: endpoints that fail in a row are ejected for a while.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses (including connect failures) that eject; `None` disables.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502/503/504 and connect failures that eject; `None` disables.
    pub consecutive_gateway_errors: Option<u32>,
    /// An ejection lasts this × the number of times the endpoint has been ejected.
    pub base_ejection_time: Duration,
    /// Ejection time never exceeds this.
    pub max_ejection_time: Duration,
    /// At most this percentage of a cluster's endpoints is ejected at once.
    pub max_ejection_percent: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
}

/// A compiled regular expression that compares by its source text, so config stays `PartialEq`.
#[derive(Clone)]
pub struct Pattern(pub regex::Regex);

impl Pattern {
    /// Compiles `source` anchored at both ends: config regexes match whole values.
    pub fn full_match(source: &str) -> Result<Self, regex::Error> {
        regex::Regex::new(&format!("^(?:{source})$")).map(Pattern)
    }

    pub fn is_match(&self, text: &str) -> bool {
        self.0.is_match(text)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.0.as_str())
    }
}
