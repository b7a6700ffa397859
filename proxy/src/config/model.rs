//! The typed configuration: what the bootstrap file and (later) the control-plane stream both turn
//! into after validation. Plain data: no sockets, no counters; `compile` builds runtime state.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};

/// A whole, validated proxy configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub listeners: Arc<[Listener]>,
    pub route_configs: Arc<[RouteConfig]>,
    pub clusters: Arc<[Cluster]>,
    /// Certificates, keys and CA bundles by name, for `tls:` blocks that name a secret.
    pub secrets: Arc<[Secret]>,
}

impl Config {
    /// The secret of this name.
    pub fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets.iter().find(|s| &*s.name == name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    pub name: Arc<str>,
    pub address: SocketAddr,
    pub kind: ListenerKind,
    /// Where this listener's access log lines go; `None`: no access log.
    pub access_log: Option<AccessLog>,
    /// TCP and TLS passthrough listeners: new connections beyond this rate are closed at once.
    pub rate_limit: Option<TokenBucket>,
    /// Connections open at once; a connection beyond it is accepted and closed at once.
    pub max_connections: u32,
}

impl Listener {
    /// Generous, like a per-listener limit in Envoy's overload manager, yet finite: a flood
    /// stops here instead of at the descriptor limit, where it would starve every listener.
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 100_000;
}

/// Downstream connection limits of an HTTP listener.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpConnection {
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// An HTTP/1.1 request head must arrive in full within this much time of its first byte (and
    /// of the connection's start, for the first request).
    pub header_read_timeout: Duration,
    /// Connections older than this (±10% jitter) are closed gracefully: `Connection: close` on
    /// the next HTTP/1.1 response, GOAWAY on HTTP/2. `None`: no limit.
    pub max_connection_age: Option<Duration>,
    /// What `%2F`, `%5C` and `\` in a request path do (see `http::normalize`).
    pub escaped_slashes: EscapedSlashes,
}

/// What to do with `%2F`, `%5C` and `\` in a path. Servers disagree on whether they separate
/// segments, so a route check on one reading can be escaped by an upstream using the other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// Refuse the request with 400 `invalid-path`.
    #[default]
    Reject,
    /// Answer 307 with the path as `UnescapeAndForward` would forward it.
    Redirect,
    /// Decode them to `/` (a backslash too) and normalise the result.
    UnescapeAndForward,
    /// Forward them as sent (escapes with upper-case hex); they separate no segment when routing.
    KeepUnchanged,
}

impl EscapedSlashes {
    /// The spellings of the bootstrap file's `path_normalization.escaped_slashes`.
    pub const NAMES: [(&'static str, EscapedSlashes); 4] = [
        ("reject", EscapedSlashes::Reject),
        ("redirect", EscapedSlashes::Redirect),
        ("unescape_and_forward", EscapedSlashes::UnescapeAndForward),
        ("keep_unchanged", EscapedSlashes::KeepUnchanged),
    ];

    pub fn from_name(name: &str) -> Option<EscapedSlashes> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, e)| *e)
    }

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, e)| *e == self)
            .map_or("reject", |(n, _)| n)
    }
}

/// A token bucket: `max_tokens` to start with and at most, `tokens_per_fill` added every
/// `fill_interval`. Each request (or TCP connection) takes one token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenBucket {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
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
    Http {
        route_config: Arc<str>,
        connection: HttpConnection,
        /// Terminate TLS; ALPN decides between HTTP/2 and HTTP/1.1.
        tls: Option<ServerTls>,
    },
    /// Every connection goes to an endpoint of one cluster (the ClusterIP model).
    Tcp(TcpProxy),
    /// TLS left encrypted: the ClientHello's server name picks the cluster.
    TlsPassthrough(SniProxy),
    /// A sidecar's capture listener: connections redirected by iptables, each sent where its
    /// original destination says.
    Capture(Capture),
}

/// Connections redirected to a sidecar: each one's original destination is looked up in
/// `services`; what is not there is passed through or closed.
#[derive(Clone, Debug, PartialEq)]
pub struct Capture {
    pub direction: CaptureDirection,
    /// The first entry whose ip (`None`: any) and port match a destination wins.
    pub services: Arc<[CapturedService]>,
    pub unknown_destination: UnknownDestination,
    /// How long to wait for a client's first bytes when the protocol is detected; a client
    /// silent that long is proxied as opaque TCP (server-speaks-first protocols).
    pub detection_timeout: Duration,
    /// Connections proxied as TCP with no bytes either way for this long are closed.
    pub idle_timeout: Duration,
    /// Inbound only: whether connections that are not mesh mTLS are served. Outbound capture
    /// ignores it (what it originates is decided per endpoint).
    pub mtls: InboundMtls,
}

/// What an inbound capture listener does with connections that are not mesh mTLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InboundMtls {
    /// Mesh mTLS and plaintext are both served (migration).
    #[default]
    Permissive,
    /// Only mesh mTLS; anything else is closed, counted. Without a workload identity nothing is
    /// served.
    Strict,
}

impl InboundMtls {
    pub fn name(self) -> &'static str {
        match self {
            InboundMtls::Permissive => "permissive",
            InboundMtls::Strict => "strict",
        }
    }
}

impl Capture {
    /// One second: a server-speaks-first protocol (MySQL, SMTP) waits that long once per
    /// connection for its greeting, while a client that takes longer than that to send its first
    /// request still works, as opaque TCP without routes. Istio's first choice was 100 ms, which
    /// sent slow HTTP clients to TCP under load; Linkerd's 10 s stalls server-first protocols.
    pub const DEFAULT_DETECTION_TIMEOUT: Duration = Duration::from_secs(1);

    /// The entry a connection to `destination` belongs to: the first whose ip (any, when unset)
    /// and port match. An IPv4 address seen through an IPv6 socket (`::ffff:a.b.c.d`) matches
    /// its IPv4 entries.
    pub fn find(&self, destination: SocketAddr) -> Option<(usize, &CapturedService)> {
        let ip = destination.ip().to_canonical();
        self.services
            .iter()
            .enumerate()
            .find(|(_, s)| s.port == destination.port() && s.ip.is_none_or(|want| want == ip))
    }
}

/// Which of a pod's connections a capture listener receives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CaptureDirection {
    /// Connections the pod's application opens (iptables OUTPUT chain).
    #[default]
    Outbound,
    /// Connections made to the pod (iptables PREROUTING chain).
    Inbound,
}

impl CaptureDirection {
    pub fn name(self) -> &'static str {
        match self {
            CaptureDirection::Outbound => "outbound",
            CaptureDirection::Inbound => "inbound",
        }
    }
}

/// What a connection to a destination not in `services` gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownDestination {
    /// To where it was going (inbound: the pod's own address, never loopback, so sockets bound
    /// to 127.0.0.1 only stay private to the pod).
    #[default]
    Allow,
    /// Closed at once.
    Block,
}

impl UnknownDestination {
    pub fn name(self) -> &'static str {
        match self {
            UnknownDestination::Allow => "allow",
            UnknownDestination::Block => "block",
        }
    }
}

/// One destination a capture listener knows.
#[derive(Clone, Debug, PartialEq)]
pub struct CapturedService {
    /// `None`: any address (inbound entries, which match by port).
    pub ip: Option<IpAddr>,
    pub port: u16,
    /// Receives the connections (TCP, TLS) or, for HTTP without a route configuration, every
    /// request.
    pub cluster: Arc<str>,
    pub protocol: AppProtocol,
    /// Routes HTTP requests (declared or detected); `None`: every request goes to `cluster`.
    pub route_config: Option<Arc<str>>,
}

/// A port's declared protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AppProtocol {
    /// Sniff each connection's first bytes.
    #[default]
    Detect,
    /// HTTP/1.1 (an HTTP/2 prior-knowledge preface is still recognised).
    Http,
    /// HTTP/2 cleartext with prior knowledge.
    Http2,
    /// Opaque bytes, no wait.
    Tcp,
    /// TLS the application handles itself: opaque bytes, no wait.
    Tls,
}

impl AppProtocol {
    /// The spellings of the bootstrap file's `services[].protocol`.
    pub const NAMES: [(&'static str, AppProtocol); 5] = [
        ("detect", AppProtocol::Detect),
        ("http", AppProtocol::Http),
        ("http2", AppProtocol::Http2),
        ("tcp", AppProtocol::Tcp),
        ("tls", AppProtocol::Tls),
    ];

    pub fn from_name(name: &str) -> Option<AppProtocol> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
    }

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("detect", |(n, _)| n)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TcpProxy {
    pub cluster: Arc<str>,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Terminate TLS and proxy the cleartext bytes.
    pub tls: Option<ServerTls>,
}

/// Named PEM material, checked by validation (the chain parses, matches its key, is in date).
#[derive(Clone, Debug, PartialEq)]
pub struct Secret {
    pub name: Arc<str>,
    pub certificate_chain: Option<Arc<str>>,
    pub private_key: Option<crate::tls::material::SecretString>,
    pub ca_bundle: Option<Arc<str>>,
}

/// TLS terminated on a listener.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerTls {
    /// At least one; chosen by the ClientHello's server name.
    pub certificates: Arc<[ServerCertificate]>,
    pub unknown_server_name: UnknownServerName,
    /// ALPN protocol names offered, in preference order; empty: no ALPN.
    pub alpn: Arc<[Arc<str>]>,
    pub min_version: TlsVersion,
    pub client_certificate: Option<ClientCertificate>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerCertificate {
    /// Lower-case exact names and `*.suffix` wildcards (one label deep); empty: the default.
    pub server_names: Arc<[Arc<str>]>,
    pub source: CertificateSource,
}

/// Where a certificate and its key come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CertificateSource {
    /// PEM files, watched and reloaded when they change.
    Files {
        cert_file: Arc<std::path::Path>,
        key_file: Arc<std::path::Path>,
    },
    /// A secret's `certificate_chain` and `private_key`.
    Secret(Arc<str>),
}

/// Where a CA bundle comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CaSource {
    File(Arc<std::path::Path>),
    /// A secret's `ca_bundle`.
    Secret(Arc<str>),
}

/// What a ClientHello whose server name no certificate claims (or that has none) gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownServerName {
    /// The certificate without server names, else the first.
    #[default]
    Default,
    /// The handshake fails with an `unrecognized_name` alert.
    Refuse,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    #[default]
    Tls12,
    Tls13,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClientCertificate {
    pub mode: ClientCertificateMode,
    pub ca: CaSource,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientCertificateMode {
    /// A handshake without a certificate the CAs vouch for fails.
    #[default]
    Require,
    /// A client may present none; one it presents must verify.
    Optional,
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
    /// One bucket for every request to this virtual host.
    pub rate_limit: Option<TokenBucket>,
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
    /// Time allowed for the whole exchange: from the request's arrival to the end of the
    /// response body, retries included. `None`: no limit.
    pub timeout: Option<Duration>,
    /// The route's own policy, else its virtual host's, else the default.
    pub retry: RetryPolicy,
    /// A bucket for this route's requests (checked before the virtual host's).
    pub rate_limit: Option<TokenBucket>,
    /// `Upgrade` protocol names (lower case, without version) this route tunnels.
    pub upgrades: Arc<[Arc<str>]>,
}

impl Route {
    /// Only WebSocket unless a route says otherwise, as in Envoy: a tunnel to an arbitrary
    /// protocol (h2c, TLS) would carry traffic no route filter or limit applies to.
    pub const DEFAULT_UPGRADES: [&'static str; 1] = ["websocket"];
}

/// When and how a forwarded request is tried again.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Tries after the first; 0 turns retries off (stale pooled connections are still retried).
    pub attempts: u32,
    pub retry_on: RetryOn,
    /// Response statuses that are retried, besides those `retry_on` names.
    pub status_codes: Arc<[u16]>,
    /// Time allowed for each try to produce a response head. `None`: only the route timeout.
    pub per_try_timeout: Option<Duration>,
    /// Exponential backoff with full jitter: try n waits a random time in
    /// `[0, min(max, base × 2^(n-1))]`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Retry non-idempotent methods (POST, PATCH) on conditions where the upstream may have seen
    /// the request. Connect failures and refused streams are retried whatever the method.
    pub retry_non_idempotent: bool,
    /// A request body up to this many bytes is kept so it can be sent again; larger bodies are
    /// not retried.
    pub replay_buffer: usize,
}

/// Retry conditions, as a set of flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RetryOn(pub u16);

impl RetryOn {
    /// Any 5xx response, and any failure to get a response.
    pub const FIVE_XX: RetryOn = RetryOn(1);
    /// 502, 503, 504, and failures to get a response.
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    /// No connection: refused, unreachable or timed out.
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 2);
    /// The connection or stream was reset, or closed, before a response head.
    pub const RESET: RetryOn = RetryOn(1 << 3);
    /// The HTTP/2 upstream refused the stream (REFUSED_STREAM): it never processed it.
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 4);
    /// gRPC status codes from a trailers-only response.
    pub const GRPC_CANCELLED: RetryOn = RetryOn(1 << 5);
    pub const GRPC_DEADLINE_EXCEEDED: RetryOn = RetryOn(1 << 6);
    pub const GRPC_RESOURCE_EXHAUSTED: RetryOn = RetryOn(1 << 7);
    pub const GRPC_UNAVAILABLE: RetryOn = RetryOn(1 << 8);
    /// The names used in config files.
    pub const NAMES: [(&'static str, RetryOn); 9] = [
        ("5xx", RetryOn::FIVE_XX),
        ("gateway-error", RetryOn::GATEWAY_ERROR),
        ("connect-failure", RetryOn::CONNECT_FAILURE),
        ("reset", RetryOn::RESET),
        ("refused-stream", RetryOn::REFUSED_STREAM),
        ("cancelled", RetryOn::GRPC_CANCELLED),
        ("deadline-exceeded", RetryOn::GRPC_DEADLINE_EXCEEDED),
        ("resource-exhausted", RetryOn::GRPC_RESOURCE_EXHAUSTED),
        ("unavailable", RetryOn::GRPC_UNAVAILABLE),
    ];

    pub fn contains(self, other: RetryOn) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    pub fn union(self, other: RetryOn) -> RetryOn {
        RetryOn(self.0 | other.0)
    }
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
    /// A pooled upstream connection with no request for this long is closed.
    pub idle_timeout: Duration,
    pub circuit_breakers: CircuitBreakers,
    /// `None`: retries are limited only by the routes' policies and `max_retries`.
    pub retry_budget: Option<RetryBudget>,
    /// `None`: plain TCP to the endpoints.
    pub tls: Option<UpstreamTls>,
}

/// TLS originated towards a cluster's endpoints. The PEM text read at validation is kept, so a
/// changed file or secret makes a different cluster (and new connections), and equal text keeps
/// the pools.
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamTls {
    /// The server name sent (SNI) and verified; `None`: the endpoint's IP address is verified
    /// and no SNI is sent (an IP address may not be one).
    pub sni: Option<Arc<str>>,
    pub trust: UpstreamTrust,
    /// Presented when the upstream asks for a client certificate.
    pub client_certificate: Option<UpstreamClientCertificate>,
    /// Names also accepted in the upstream's certificate besides the server name.
    pub subject_alt_names: Arc<[Arc<str>]>,
    /// When not empty, the upstream's certificate must carry one of these instead of the server
    /// name (which is still sent).
    pub verify_subject_alt_names: Arc<[SubjectAltName]>,
}

/// A subject alternative name an upstream certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectAltName {
    /// Lower case; a `*.` wildcard in the certificate covers one label.
    Hostname(Arc<str>),
    /// Compared exactly.
    Uri(Arc<str>),
}

/// Which CAs an upstream's certificate must chain to.
#[derive(Clone, Debug, PartialEq)]
pub enum UpstreamTrust {
    /// The operating system's trust store.
    System,
    /// A PEM bundle, and where it came from (`file /etc/ca.pem`, `secret upstream-ca`).
    Bundle { source: Arc<str>, pem: Arc<str> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamClientCertificate {
    /// Where it came from (`files cert.pem, key.pem`, `secret client`), for dumps and logs.
    pub source: Arc<str>,
    pub chain_pem: Arc<str>,
    pub key_pem: crate::tls::material::SecretString,
}

/// Limits across all endpoints of a cluster; beyond them a request fails at once with 503
/// `overflow` instead of queueing without bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CircuitBreakers {
    /// Open upstream connections.
    pub max_connections: u32,
    /// Requests waiting for a connection because `max_connections` is reached.
    pub max_pending_requests: u32,
    /// Requests in flight (sent and not yet answered in full).
    pub max_requests: u32,
    /// Retries in flight.
    pub max_retries: u32,
}

/// Retries may add at most `ratio` of the requests of the last `window`, plus
/// `min_retries_per_second` (so a quiet cluster can still retry).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudget {
    pub ratio: f64,
    pub min_retries_per_second: u32,
    pub window: Duration,
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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    /// The SPIFFE ID the endpoint runs as when it is meshed: a proxy holding a workload
    /// identity reaches it over mesh mTLS and accepts only this peer. `None`: plaintext.
    pub identity: Option<crate::identity::SpiffeId>,
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
