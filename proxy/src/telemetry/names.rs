//! Metric names, in one place so the README, the dashboards and the code agree.

use metrics::Recorder;

use super::Registry;

pub const HTTP_REQUESTS_TOTAL: &str = "trellis_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "trellis_http_request_duration_seconds";
pub const RATE_LIMITED_TOTAL: &str = "trellis_rate_limited_total";
pub const DOWNSTREAM_CONNECTIONS_TOTAL: &str = "trellis_downstream_connections_total";
pub const DOWNSTREAM_CONNECTIONS_ACTIVE: &str = "trellis_downstream_connections_active";
pub const LISTENER_CONNECTIONS_REFUSED_TOTAL: &str = "trellis_listener_connections_refused_total";
pub const PROTOCOL_DETECTION_TOTAL: &str = "trellis_protocol_detection_total";
pub const CAPTURE_UNKNOWN_DESTINATION_TOTAL: &str = "trellis_capture_unknown_destination_total";
pub const UPSTREAM_REQUESTS_TOTAL: &str = "trellis_upstream_requests_total";
pub const UPSTREAM_REQUEST_DURATION: &str = "trellis_upstream_request_duration_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "trellis_upstream_errors_total";
pub const RETRIES_TOTAL: &str = "trellis_retries_total";
pub const CIRCUIT_BREAKER_OVERFLOWS_TOTAL: &str = "trellis_circuit_breaker_overflows_total";
pub const TIMEOUTS_TOTAL: &str = "trellis_timeouts_total";
pub const CONFIG_UPDATES_TOTAL: &str = "trellis_config_updates_total";
pub const ACCESS_LOG_LINES_TOTAL: &str = "trellis_access_log_lines_total";
pub const DRAIN_CUT_REQUESTS_TOTAL: &str = "trellis_drain_cut_requests_total";
pub const TLS_HANDSHAKES_TOTAL: &str = "trellis_tls_handshakes_total";
pub const TLS_CERTIFICATE_RELOADS_TOTAL: &str = "trellis_tls_certificate_reloads_total";
pub const IDENTITY_RENEWALS_TOTAL: &str = "trellis_identity_renewals_total";
pub const IDENTITY_CERTIFICATE_EXPIRY: &str = "trellis_identity_certificate_expiry_seconds";
pub const MESH_TLS_HANDSHAKES_TOTAL: &str = "trellis_mesh_tls_handshakes_total";
pub const MESH_PLAINTEXT_REFUSED_TOTAL: &str = "trellis_mesh_plaintext_refused_total";
pub const MESH_TCP_DENIED_TOTAL: &str = "trellis_mesh_tcp_denied_total";

// Read from the running config at scrape time.
pub const CONFIG_VERSION: &str = "trellis_config_version";
pub const READY: &str = "trellis_ready";
pub const TLS_CERTIFICATE_EXPIRY: &str = "trellis_tls_certificate_expiry_seconds";
pub const TCP_CONNECTIONS_TOTAL: &str = "trellis_tcp_connections_total";
pub const TCP_BYTES_SENT_TOTAL: &str = "trellis_tcp_bytes_sent_total";
pub const TCP_BYTES_RECEIVED_TOTAL: &str = "trellis_tcp_bytes_received_total";
pub const PANIC_PICKS_TOTAL: &str = "trellis_upstream_panic_picks_total";
pub const EJECTIONS_TOTAL: &str = "trellis_endpoint_ejections_total";
pub const ENDPOINT_HEALTHY: &str = "trellis_endpoint_healthy";
pub const ENDPOINT_EJECTED: &str = "trellis_endpoint_ejected";
pub const ENDPOINT_ACTIVE: &str = "trellis_endpoint_active_requests";

pub(super) fn describe(r: &Registry) {
    let counters = [
        (
            HTTP_REQUESTS_TOTAL,
            "Downstream HTTP responses by listener, virtual host, route, status code and class.",
        ),
        (
            RATE_LIMITED_TOTAL,
            "Requests refused by a rate limit, by route.",
        ),
        (
            DOWNSTREAM_CONNECTIONS_TOTAL,
            "Downstream connections accepted, by listener.",
        ),
        (
            LISTENER_CONNECTIONS_REFUSED_TOTAL,
            "Connections a listener closed at once or could not accept, by listener and reason: \
             max_connections, fd_exhausted (accept failed for want of file descriptors), loop (a \
             capture listener's connection to itself).",
        ),
        (
            PROTOCOL_DETECTION_TOTAL,
            "Capture listeners' connections by listener, protocol (http1, http2, tls, tcp) and \
             reason: detected (from the first bytes), declared (the port's protocol), timeout \
             (nothing conclusive within the detection timeout: tcp).",
        ),
        (
            CAPTURE_UNKNOWN_DESTINATION_TOTAL,
            "Capture listeners' connections to a destination not in their table, by listener and \
             action: allow (passed through), block (closed).",
        ),
        (
            UPSTREAM_REQUESTS_TOTAL,
            "Upstream responses by cluster and status class.",
        ),
        (
            UPSTREAM_ERRORS_TOTAL,
            "Upstream exchanges that failed without a response, by cluster and reason.",
        ),
        (
            RETRIES_TOTAL,
            "Retry decisions by cluster: attempted, budget_exhausted, not_replayable.",
        ),
        (
            CIRCUIT_BREAKER_OVERFLOWS_TOTAL,
            "Requests refused because a cluster's circuit breaker was full.",
        ),
        (
            TIMEOUTS_TOTAL,
            "Deadlines that fired, by cluster and kind: connect, response, idle.",
        ),
        (
            TLS_HANDSHAKES_TOTAL,
            "TLS handshakes on terminating listeners, by listener, version, ALPN and outcome: \
             success, no_certificate, protocol_version, bad_client_certificate, timeout, other.",
        ),
        (
            TLS_CERTIFICATE_RELOADS_TOTAL,
            "Certificate files reread after a change, by listener and outcome: loaded, error \
             (the previous certificate stays in use).",
        ),
        (
            IDENTITY_RENEWALS_TOTAL,
            "Workload identity certificate requests to the controller, by outcome: success, \
             failure (the current certificate stays in use; retried with backoff).",
        ),
        (
            MESH_TLS_HANDSHAKES_TOTAL,
            "Mesh mTLS handshakes by direction (outbound: originated to a meshed endpoint; \
             inbound: terminated on a capture listener) and result: ok, error.",
        ),
        (
            MESH_PLAINTEXT_REFUSED_TOTAL,
            "Inbound capture connections closed because they were not mesh mTLS (strict mode, \
             or a failed mesh handshake), by listener.",
        ),
        (
            MESH_TCP_DENIED_TOTAL,
            "Inbound TCP connections closed because authorization policy denied them, by \
             listener.",
        ),
        (
            CONFIG_UPDATES_TOTAL,
            "Configuration updates by result: applied (ACK) or rejected (NACK).",
        ),
        (
            ACCESS_LOG_LINES_TOTAL,
            "Access log lines written, or dropped because the writer fell behind.",
        ),
        (
            DRAIN_CUT_REQUESTS_TOTAL,
            "Requests still unfinished when the drain timeout ended: answered 503 drain-timeout \
             if no response head had been sent, ended otherwise.",
        ),
    ];
    for (name, help) in counters {
        r.describe_counter(name.into(), None, help.into());
    }
    r.describe_gauge(
        DOWNSTREAM_CONNECTIONS_ACTIVE.into(),
        None,
        "Downstream connections open now, by listener.".into(),
    );
    r.describe_histogram(
        HTTP_REQUEST_DURATION.into(),
        None,
        "Time from request head to the end of the response body, by route.".into(),
    );
    r.describe_histogram(
        UPSTREAM_REQUEST_DURATION.into(),
        None,
        "Time from sending upstream to the response head, by cluster.".into(),
    );
}
