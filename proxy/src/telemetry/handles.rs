//! Metric handles built once per listener, (listener, route) and cluster, so that recording on the
//! request path is an atomic add on a handle already in hand: no key building, no registry lookup,
//! no allocation. Labels come from configured names only, never from what clients send.

use std::{
    collections::HashSet,
    sync::{Arc, OnceLock},
};

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};

use super::{access_log::AccessLogSender, names, registry};

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

fn counter(name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
    registry().register_counter(&key(name, labels), &META)
}

fn gauge(name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
    registry().register_gauge(&key(name, labels), &META)
}

fn histogram(name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
    registry().register_histogram(&key(name, labels), &META)
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}

/// `1xx` … `5xx`, the `class` label of a status code.
pub fn status_class(code: u16) -> &'static str {
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(code: u16) -> usize {
    usize::from(code / 100).clamp(1, 5) - 1
}

/// Everything a listener records, plus where its access log lines go.
#[derive(Debug)]
pub struct ListenerTelemetry {
    pub name: Arc<str>,
    pub connections_total: Counter,
    pub connections_active: Gauge,
    /// Requests that matched no route (or failed before routing): empty `vhost` and `route`.
    pub unrouted: Arc<RouteMetrics>,
    pub access_log: Option<AccessLogSender>,
    refused: [Counter; Refused::ALL.len()],
}

/// Why a listener refused (or could not accept) a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The listener's `max_connections` were open: accepted and closed at once.
    MaxConnections,
    /// `accept` failed with EMFILE or ENFILE; the connection waits in the backlog.
    FdExhausted,
    /// A capture listener's connection whose destination is the listener itself and no entry
    /// of its table: passing it through would connect to itself again and again.
    Loop,
}

impl Refused {
    const ALL: [Refused; 3] = [Refused::MaxConnections, Refused::FdExhausted, Refused::Loop];

    fn label(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::FdExhausted => "fd_exhausted",
            Refused::Loop => "loop",
        }
    }
}

/// How a capture listener took a connection's protocol: the `protocol` label of
/// `trellis_protocol_detection_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Tls,
    /// Opaque bytes.
    Tcp,
}

impl Detected {
    const ALL: [Detected; 4] = [
        Detected::Http1,
        Detected::Http2,
        Detected::Tls,
        Detected::Tcp,
    ];

    fn label(self) -> &'static str {
        match self {
            Detected::Http1 => "http1",
            Detected::Http2 => "http2",
            Detected::Tls => "tls",
            Detected::Tcp => "tcp",
        }
    }
}

/// Why: the `reason` label of `trellis_protocol_detection_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectionReason {
    /// Told by the first bytes.
    Detected,
    /// The port's protocol was declared: nothing was read.
    Declared,
    /// The client sent nothing conclusive within the detection timeout (opaque TCP).
    Timeout,
}

impl DetectionReason {
    const ALL: [DetectionReason; 3] = [
        DetectionReason::Detected,
        DetectionReason::Declared,
        DetectionReason::Timeout,
    ];

    fn label(self) -> &'static str {
        match self {
            DetectionReason::Detected => "detected",
            DetectionReason::Declared => "declared",
            DetectionReason::Timeout => "timeout",
        }
    }
}

/// The handles of a capture listener, built with its table: only capture listeners have these
/// series.
#[derive(Debug)]
pub struct CaptureMetrics {
    detection: [[Counter; DetectionReason::ALL.len()]; Detected::ALL.len()],
    /// Connections to a destination not in the table, by action: allow, block.
    unknown: [Counter; 2],
    /// Inbound connections closed for not being mesh mTLS.
    plaintext_refused: Counter,
    /// Inbound TCP connections closed by authorization policy.
    tcp_denied: Counter,
}

impl CaptureMetrics {
    pub fn new(listener: &str) -> Self {
        CaptureMetrics {
            detection: Detected::ALL.map(|p| {
                DetectionReason::ALL.map(|r| {
                    counter(
                        names::PROTOCOL_DETECTION_TOTAL,
                        &[
                            ("listener", listener),
                            ("protocol", p.label()),
                            ("reason", r.label()),
                        ],
                    )
                })
            }),
            unknown: ["allow", "block"].map(|action| {
                counter(
                    names::CAPTURE_UNKNOWN_DESTINATION_TOTAL,
                    &[("listener", listener), ("action", action)],
                )
            }),
            plaintext_refused: counter(
                names::MESH_PLAINTEXT_REFUSED_TOTAL,
                &[("listener", listener)],
            ),
            tcp_denied: counter(names::MESH_TCP_DENIED_TOTAL, &[("listener", listener)]),
        }
    }

    /// An inbound connection that was not mesh mTLS, closed.
    pub fn plaintext_refused(&self) {
        self.plaintext_refused.increment(1);
    }

    /// An inbound TCP connection denied by policy, closed.
    pub fn tcp_denied(&self) {
        self.tcp_denied.increment(1);
    }

    pub fn detected(&self, protocol: Detected, reason: DetectionReason) {
        self.detection[protocol as usize][reason as usize].increment(1);
    }

    /// A connection to an unknown destination, passed through (`allowed`) or closed.
    pub fn unknown_destination(&self, allowed: bool) {
        self.unknown[usize::from(!allowed)].increment(1);
    }
}

impl ListenerTelemetry {
    pub fn new(name: Arc<str>, access_log: Option<AccessLogSender>) -> Self {
        let l = &[("listener", &*name)];
        ListenerTelemetry {
            connections_total: counter(names::DOWNSTREAM_CONNECTIONS_TOTAL, l),
            connections_active: gauge(names::DOWNSTREAM_CONNECTIONS_ACTIVE, l),
            unrouted: Arc::new(RouteMetrics::new(&name, "", "")),
            refused: Refused::ALL.map(|r| {
                counter(
                    names::LISTENER_CONNECTIONS_REFUSED_TOTAL,
                    &[("listener", &name), ("reason", r.label())],
                )
            }),
            access_log,
            name,
        }
    }

    pub fn connection_refused(&self, reason: Refused) {
        self.refused[reason as usize].increment(1);
    }

    /// Counts a connection as open until the returned guard drops.
    pub fn connection_opened(&self) -> ConnectionGuard {
        self.connections_total.increment(1);
        self.connections_active.increment(1.0);
        ConnectionGuard(self.connections_active.clone())
    }
}

/// Decrements the listener's active connections when the connection ends.
#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Distinct status codes a route keeps handles for; a route answering with more codes than this
/// still counts correctly, through the registry (slower, allocating).
const CODE_SLOTS: usize = 16;

/// The handles of one route as seen through one listener.
#[derive(Debug)]
pub struct RouteMetrics {
    listener: Arc<str>,
    vhost: Arc<str>,
    route: Arc<str>,
    /// Filled on first use of each status code; lock-free afterwards.
    codes: [OnceLock<(u16, Counter)>; CODE_SLOTS],
    pub duration: Histogram,
    pub rate_limited: Counter,
}

impl RouteMetrics {
    fn new(listener: &str, vhost: &str, route: &str) -> Self {
        let l = &[("listener", listener), ("vhost", vhost), ("route", route)];
        RouteMetrics {
            listener: listener.into(),
            vhost: vhost.into(),
            route: route.into(),
            codes: std::array::from_fn(|_| OnceLock::new()),
            duration: histogram(names::HTTP_REQUEST_DURATION, l),
            rate_limited: counter(names::RATE_LIMITED_TOTAL, l),
        }
    }

    /// The route's name (empty for requests that matched none).
    pub fn route_name(&self) -> Option<&Arc<str>> {
        (!self.route.is_empty()).then_some(&self.route)
    }

    fn code_counter(&self, code: u16) -> Counter {
        let code_text = code.to_string();
        counter(
            names::HTTP_REQUESTS_TOTAL,
            &[
                ("listener", &self.listener),
                ("vhost", &self.vhost),
                ("route", &self.route),
                ("code", code_text.as_str()),
                ("class", status_class(code)),
            ],
        )
    }

    /// Counts one response with this status code.
    pub fn count_response(&self, code: u16) {
        let start = usize::from(code) % CODE_SLOTS;
        for i in 0..CODE_SLOTS {
            let slot = &self.codes[(start + i) % CODE_SLOTS];
            let (c, counter) = slot.get_or_init(|| (code, self.code_counter(code)));
            if *c == code {
                counter.increment(1);
                return;
            }
        }
        self.code_counter(code).increment(1);
    }
}

/// Listeners that share a route configuration each get their own handles for its routes; this
/// many are kept inline in the route, more fall back to building handles per request.
const LISTENER_SLOTS: usize = 4;

/// Lives in each compiled [`Route`](crate::http::route::Route): the route's handles per
/// listener, built on the first request through that listener.
#[derive(Debug, Default)]
pub struct RouteTelemetry {
    slots: [OnceLock<Arc<RouteMetrics>>; LISTENER_SLOTS],
}

impl RouteTelemetry {
    pub fn get(&self, listener: &str, vhost: &str, route: &str) -> Arc<RouteMetrics> {
        for slot in &self.slots {
            let m = slot.get_or_init(|| Arc::new(RouteMetrics::new(listener, vhost, route)));
            if &*m.listener == listener {
                return m.clone();
            }
        }
        Arc::new(RouteMetrics::new(listener, vhost, route))
    }
}

/// The families a [`RouteMetrics`] records into; their series carry `listener`, `vhost`, `route`.
const ROUTE_FAMILIES: [&str; 3] = [
    names::HTTP_REQUESTS_TOTAL,
    names::HTTP_REQUEST_DURATION,
    names::RATE_LIMITED_TOTAL,
];

/// Drops the series of these (listener, virtual host, route) triples: the configuration in force
/// no longer serves them.
pub fn forget_routes(removed: &HashSet<(&str, &str, &str)>) {
    if removed.is_empty() {
        return;
    }
    registry().retain(&ROUTE_FAMILIES, |labels| {
        let get = |name: &str| labels.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        match (get("listener"), get("vhost"), get("route")) {
            (Some(l), Some(vh), Some(r)) => !removed.contains(&(l, vh, r)),
            _ => true,
        }
    });
}

/// The families a [`ClusterMetrics`] records into; their series carry `cluster`.
const CLUSTER_FAMILIES: [&str; 6] = [
    names::UPSTREAM_REQUESTS_TOTAL,
    names::UPSTREAM_REQUEST_DURATION,
    names::UPSTREAM_ERRORS_TOTAL,
    names::RETRIES_TOTAL,
    names::CIRCUIT_BREAKER_OVERFLOWS_TOTAL,
    names::TIMEOUTS_TOTAL,
];

/// Drops the series of these clusters: the configuration in force no longer holds them.
pub fn forget_clusters(removed: &HashSet<&str>) {
    if removed.is_empty() {
        return;
    }
    registry().retain(&CLUSTER_FAMILIES, |labels| {
        !labels
            .iter()
            .any(|(k, v)| *k == "cluster" && removed.contains(v))
    });
}

/// Why a deadline fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutKind {
    /// No connection to the endpoint in time.
    Connect,
    /// No response head within the route's timeout.
    Response,
    /// A TCP connection moved no bytes for its idle timeout.
    Idle,
    /// One try of a request got no response head within the retry policy's per-try timeout.
    PerTry,
}

/// What became of a retry decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    Attempted,
    /// Allowed by policy but the retry budget was spent.
    BudgetExhausted,
    /// The request body was already streamed and cannot be sent again.
    NotReplayable,
    /// Allowed by policy and budget but the cluster's `max_retries` were all in flight.
    Overflow,
    /// The upstream's `Retry-After` asked for a longer wait than the policy's `backoff.max`.
    RetryAfterTooLong,
}

/// Upstream error reasons (the `x-trellis-error` values an upstream exchange can end with).
const UPSTREAM_ERRORS: [&str; 13] = [
    "connect-failure",
    // A connect failure at the TLS handshake (see `ProxyError::reason`).
    "tls-handshake",
    "connect-timeout",
    "upstream-timeout",
    "upstream-reset",
    "upstream-protocol-error",
    // The response head was relayed, then its body failed: cut by the upstream, or shorter than
    // its length.
    "upstream-body-error",
    "upgrade-unsupported",
    "no-endpoint",
    "per-try-timeout",
    // A try given up because its endpoint stopped answering anything (see
    // `Cluster::stalled_while_peers_answer`).
    "upstream-stalled",
    "refused-stream",
    "overflow",
];

/// The handles of one cluster; kept across config updates with the cluster.
#[derive(Debug)]
pub struct ClusterMetrics {
    requests: [Counter; 5],
    pub duration: Histogram,
    errors: [Counter; UPSTREAM_ERRORS.len()],
    retries: [Counter; 5],
    pub circuit_breaker_overflows: Counter,
    timeouts: [Counter; 4],
}

impl ClusterMetrics {
    pub fn new(cluster: &str) -> Self {
        let c = ("cluster", cluster);
        ClusterMetrics {
            requests: CLASSES
                .map(|class| counter(names::UPSTREAM_REQUESTS_TOTAL, &[c, ("class", class)])),
            duration: histogram(names::UPSTREAM_REQUEST_DURATION, &[c]),
            errors: UPSTREAM_ERRORS
                .map(|reason| counter(names::UPSTREAM_ERRORS_TOTAL, &[c, ("reason", reason)])),
            retries: [
                "attempted",
                "budget_exhausted",
                "not_replayable",
                "overflow",
                "retry_after_too_long",
            ]
            .map(|outcome| counter(names::RETRIES_TOTAL, &[c, ("outcome", outcome)])),
            circuit_breaker_overflows: counter(names::CIRCUIT_BREAKER_OVERFLOWS_TOTAL, &[c]),
            timeouts: ["connect", "response", "idle", "per_try"]
                .map(|kind| counter(names::TIMEOUTS_TOTAL, &[c, ("kind", kind)])),
        }
    }

    /// An upstream answered with this status.
    pub fn response(&self, code: u16) {
        self.requests[class_index(code)].increment(1);
    }

    /// An upstream exchange failed; `reason` is the error's `x-trellis-error` value.
    pub fn error(&self, reason: &str) {
        if let Some(i) = UPSTREAM_ERRORS.iter().position(|r| *r == reason) {
            self.errors[i].increment(1);
        }
    }

    pub fn retry(&self, outcome: RetryOutcome) {
        self.retries[outcome as usize].increment(1);
    }

    pub fn timeout(&self, kind: TimeoutKind) {
        self.timeouts[kind as usize].increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(status_class(204), "2xx");
        assert_eq!(CLASSES[class_index(503)], "5xx");
        assert_eq!(CLASSES[class_index(101)], "1xx");
    }

    #[test]
    fn more_codes_than_slots_still_count() {
        let m = RouteMetrics::new("unit-codes", "v", "r");
        for code in 200..240 {
            m.count_response(code);
            m.count_response(code);
        }
        let mut out = String::new();
        registry().render(&mut out);
        for code in 200..240 {
            let line = format!(
                "trellis_http_requests_total{{listener=\"unit-codes\",vhost=\"v\",route=\"r\",code=\"{code}\",class=\"2xx\"}} 2\n"
            );
            assert!(out.contains(&line), "missing {line}");
        }
    }
}
