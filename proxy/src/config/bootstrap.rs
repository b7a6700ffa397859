//! The bootstrap YAML file, as written by people. These types stop at `validate`, which turns them
//! into the typed [`Config`](super::model::Config); nothing else reads them.

use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub route_configs: Vec<RouteConfig>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    /// The control plane to take further listeners, routes and clusters from.
    pub xds: Option<Xds>,
    /// Certificates, keys and CA bundles held inline, referred to by name from `tls:` blocks
    /// (`secret:`). The discovery API's `Secret` resources arrive here too.
    #[serde(default)]
    pub secrets: Vec<Secret>,
    /// On SIGTERM, how long readiness is off while the listeners still accept, before they
    /// close, e.g. `5s` (`--drain-delay` wins; read at start).
    pub drain_delay: Option<String>,
}

/// PEM material under a name. A certificate secret has `certificate_chain` and `private_key`; a
/// CA secret has `ca_bundle`; one secret may hold both.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    pub name: String,
    /// PEM: the leaf certificate first, then its intermediates.
    pub certificate_chain: Option<String>,
    /// PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC). Never logged, dumped or echoed in an error.
    pub private_key: Option<crate::tls::material::SecretString>,
    /// PEM: trusted CA certificates (for client certificates, or for upstream servers).
    pub ca_bundle: Option<String>,
}

/// Where a certificate and its key come from: a pair of PEM files (watched and reloaded when they
/// change) or a named secret.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSource {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub secret: Option<String>,
}

/// `tls:` on an `http` or `tcp` listener: TLS is terminated here.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Chosen by the ClientHello's server name: exact names first, then `*.` wildcards.
    pub certificates: Vec<ServerCertificate>,
    /// A ClientHello without a server name, or with one no certificate names: `default` (the
    /// certificate with no `server_names`, else the first) or `refuse`. Default `default`.
    pub unknown_server_name: Option<String>,
    /// ALPN protocols offered, in preference order. Default `[h2, http/1.1]` on `http`
    /// listeners, none on `tcp`.
    pub alpn: Option<Vec<String>>,
    /// `"1.2"` (default) or `"1.3"`.
    pub min_version: Option<String>,
    /// Verify client certificates against a CA bundle.
    pub client_certificate: Option<ClientCertificate>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerCertificate {
    /// Exact names and `*.suffix` wildcards; empty: the default certificate.
    #[serde(default)]
    pub server_names: Vec<String>,
    #[serde(flatten)]
    pub source: CertificateSource,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertificate {
    /// `require` (default) or `optional`.
    pub mode: Option<String>,
    /// PEM file of trusted CAs, or a secret's `ca_bundle`; exactly one.
    pub ca_file: Option<String>,
    pub ca_secret: Option<String>,
}

/// `tls:` on a cluster: connections to its endpoints are TLS.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// The server name sent and verified; default: the endpoint's `hostname`, else its IP.
    pub sni: Option<String>,
    /// Trusted CAs: a PEM file or a secret's `ca_bundle`; neither: the system's roots.
    pub ca_file: Option<String>,
    pub ca_secret: Option<String>,
    /// A client certificate to present (mutual TLS).
    pub client_certificate: Option<CertificateSource>,
    /// Extra names accepted in the server's certificate besides `sni`.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// Names the server's certificate must carry one of, instead of `sni` (which is still
    /// sent): Gateway API BackendTLSPolicy `subjectAltNames`.
    #[serde(default)]
    pub verify_subject_alt_names: Vec<SubjectAltName>,
}

/// One entry of `verify_subject_alt_names`: exactly one of the two.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectAltName {
    pub hostname: Option<String>,
    pub uri: Option<String>,
}

/// `xds:` in the bootstrap file; command-line flags override each field.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xds {
    /// `host:port` of trellis-control's discovery endpoint.
    pub address: Option<String>,
    pub node_id: Option<String>,
    /// `gateway` or `sidecar`.
    pub role: Option<String>,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    /// For a gateway: the Gateway resource it serves.
    pub gateway: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// PEM CA bundle trusted for the controller's certificate; with it the proxy connects with
    /// TLS (as with an `https://` address).
    pub ca_file: Option<std::path::PathBuf>,
    /// The name the controller's certificate must carry (default: the address's host).
    pub server_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub address: String,
    /// `http` (default), `tcp`, `tls_passthrough` or `capture`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// `http`: the route configuration.
    pub route_config: Option<String>,
    /// `tcp`: the cluster every connection goes to.
    pub cluster: Option<String>,
    /// `tls_passthrough`: server names → clusters.
    #[serde(default)]
    pub sni: Vec<SniRoute>,
    /// `tls_passthrough`: where unknown or missing server names go (else the connection closes).
    pub default_cluster: Option<String>,
    /// Close a connection idle this long (default 1h): no bytes either way for `tcp` and
    /// `tls_passthrough`, no request in flight for `http`.
    pub idle_timeout: Option<String>,
    /// `http`: time allowed for an HTTP/1.1 request head to arrive (default 30s).
    pub header_read_timeout: Option<String>,
    /// `http`: close connections this old, gracefully and with ±10% jitter (default: never).
    pub max_connection_age: Option<String>,
    /// `http`: how request paths are normalised before routing.
    pub path_normalization: Option<PathNormalization>,
    /// `stdout` or a file path: one JSON line per request or TCP connection.
    pub access_log: Option<String>,
    /// `tcp`, `tls_passthrough`: a token bucket for new connections.
    pub rate_limit: Option<RateLimit>,
    /// Connections open at once (default 100000); beyond it new ones are closed at once.
    pub max_connections: Option<u32>,
    /// `http`, `tcp`: terminate TLS with these certificates.
    pub tls: Option<ListenerTls>,
    /// `capture`: `outbound` (default) or `inbound`.
    pub direction: Option<String>,
    /// `capture`: the destinations it knows, looked up by each connection's original
    /// destination; the first match wins.
    #[serde(default)]
    pub services: Vec<CapturedService>,
    /// `capture`: what a destination not in `services` gets: `allow` (default; passed through)
    /// or `block` (closed).
    pub unknown_destination: Option<String>,
    /// `capture`: how long to wait for a client's first bytes before proxying it as opaque TCP
    /// (default 1s).
    pub detection_timeout: Option<String>,
    /// `capture`, inbound: `permissive` (default; mesh mTLS and plaintext) or `strict` (mesh mTLS
    /// only).
    pub mtls: Option<String>,
}

/// `services: [{ ip: 10.96.0.10, port: 80, cluster: web, protocol: http, route_config: web }]`
/// on a `capture` listener.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapturedService {
    /// Original destination IP; unset or empty: any address (inbound entries).
    #[serde(default)]
    pub ip: String,
    /// Original destination port, 1-65535.
    pub port: u32,
    /// The cluster that receives the connections (or, for HTTP without `route_config`, every
    /// request).
    pub cluster: String,
    /// `detect` (default), `http`, `http2`, `tcp` or `tls`.
    pub protocol: Option<String>,
    /// HTTP: the route configuration that routes the requests; unset: all go to `cluster`.
    pub route_config: Option<String>,
}

/// `path_normalization: { escaped_slashes: reject }`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathNormalization {
    /// `%2F`, `%5C` and `\` in a path: `reject` (default, 400), `redirect` (307 to the path with
    /// them decoded), `unescape_and_forward` or `keep_unchanged`.
    pub escaped_slashes: Option<String>,
}

/// `rate_limit: { max_tokens: 100, tokens_per_fill: 10, fill_interval: 1s }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// The bucket's size: the largest burst.
    pub max_tokens: u32,
    /// Tokens added each `fill_interval` (default `max_tokens`).
    pub tokens_per_fill: Option<u32>,
    /// Default 1s.
    pub fill_interval: Option<String>,
}

/// `retry:` on a route or a virtual host.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Tries after the first (default 2); 0 turns retries off.
    pub attempts: Option<u32>,
    /// Conditions (default connect-failure, refused-stream, reset).
    pub retry_on: Option<Vec<String>>,
    /// Response statuses to retry as well.
    #[serde(default)]
    pub status_codes: Vec<u16>,
    pub per_try_timeout: Option<String>,
    pub backoff: Option<Backoff>,
    /// Retry POST/PATCH and other non-idempotent methods after the upstream may have seen them.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Largest request body kept for replay, e.g. `64KiB` (the default).
    pub replay_buffer: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// Default 25ms.
    pub base: Option<String>,
    /// Default 10 × base.
    pub max: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakers {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Percent of the recent request rate that retries may add (default 20).
    pub percent: Option<f64>,
    /// Retries always allowed per second (default 10).
    pub min_retries_per_second: Option<u32>,
    /// How far back requests and retries are counted (default 10s).
    pub window: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniRoute {
    pub server_names: Vec<String>,
    pub cluster: String,
}

fn default_protocol() -> String {
    "http".to_owned()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The default retry policy of its routes.
    pub retry: Option<Retry>,
    pub rate_limit: Option<RateLimit>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matcher: RouteMatch,
    pub forward: Option<Forward>,
    pub redirect: Option<Redirect>,
    pub direct_response: Option<DirectResponse>,
    #[serde(default)]
    pub filters: Filters,
    /// The whole exchange, retries included (default 15s; 0 turns it off).
    pub timeout: Option<String>,
    /// Replaces the virtual host's policy.
    pub retry: Option<Retry>,
    pub rate_limit: Option<RateLimit>,
    /// `Upgrade` protocols tunnelled for this route (default `[websocket]`); a request offering
    /// any other is forwarded as a plain request, its `Upgrade` removed.
    pub upgrades: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query: Vec<ValueMatch>,
    pub method: Option<String>,
}

/// Exactly one of the fields.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub template: Option<String>,
    pub regex: Option<String>,
}

/// A header or query parameter condition: `name` plus exactly one of the value fields.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    pub exact: Option<String>,
    pub regex: Option<String>,
    pub present: Option<bool>,
}

/// `forward: { cluster: a }` or `forward: { clusters: [{ name: a, weight: 90 }, ...] }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    pub cluster: Option<String>,
    #[serde(default)]
    pub clusters: Vec<WeightedCluster>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedCluster {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Replace the whole path.
    pub path: Option<String>,
    /// Replace the matched prefix.
    pub prefix: Option<String>,
    #[serde(default = "default_redirect_status")]
    pub status: u16,
}

fn default_redirect_status() -> u16 {
    302
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default)]
    pub body: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    #[serde(default)]
    pub request_headers: HeaderEdits,
    #[serde(default)]
    pub response_headers: HeaderEdits,
    pub rewrite: Option<Rewrite>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default)]
    pub add: Vec<Header>,
    #[serde(default)]
    pub set: Vec<Header>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replace the whole path.
    pub path: Option<String>,
    /// Replace the matched prefix.
    pub prefix: Option<String>,
    pub host: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    #[serde(default = "default_upstream_protocol")]
    pub protocol: String,
    pub connect_timeout: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub lb: Lb,
    pub health_check: Option<HealthCheck>,
    pub outlier_detection: Option<OutlierDetection>,
    /// Percent; default 50, 0 disables.
    pub panic_threshold: Option<u8>,
    /// Close pooled connections idle this long (default 4s).
    pub idle_timeout: Option<String>,
    pub circuit_breakers: Option<CircuitBreakers>,
    pub retry_budget: Option<RetryBudget>,
    /// Originate TLS to the endpoints.
    pub tls: Option<ClusterTls>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lb {
    /// round_robin | random | least_request | peak_ewma (default) | ring_hash | maglev
    pub policy: Option<String>,
    pub hash_key: Option<HashKey>,
    pub min_ring_size: Option<u32>,
    pub table_size: Option<u32>,
    /// peak_ewma: how fast old latencies are forgotten (default 10s).
    pub decay: Option<String>,
}

/// Exactly one field.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashKey {
    pub header: Option<String>,
    pub cookie: Option<String>,
    pub source_ip: Option<bool>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub tcp: Option<TcpCheck>,
    pub http: Option<HttpCheck>,
    pub grpc: Option<GrpcCheck>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
    pub jitter: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub path: String,
    pub host: Option<String>,
    /// `200`, or a range as text: `"200-399"`.
    #[serde(default)]
    pub expected_statuses: Vec<StatusRange>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StatusRange {
    One(u16),
    Range(String),
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcCheck {
    #[serde(default)]
    pub service: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default = "default_true")]
    pub enabled: bool,
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u8>,
}

fn default_true() -> bool {
    true
}

fn default_upstream_protocol() -> String {
    "http1".to_owned()
}

/// `127.0.0.1:9000` or `{ address: 127.0.0.1:9000, weight: 2, identity: spiffe://td/ns/a/sa/b }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Endpoint {
    Address(String),
    Weighted {
        address: String,
        #[serde(default = "default_weight")]
        weight: u32,
        /// The SPIFFE ID of a meshed endpoint (reached over mesh mTLS).
        #[serde(default)]
        identity: Option<String>,
    },
}

/// Parses YAML text. serde_yaml's messages already name the field path and the line. An empty
/// document (no text, only comments, or `~`) is an empty file, which the caller may refuse.
pub fn parse(text: &str) -> Result<File, String> {
    serde_yaml::from_str::<Option<File>>(text)
        .map(Option::unwrap_or_default)
        .map_err(|e| e.to_string())
}
