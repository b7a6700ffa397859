//! What the controller knows about its proxies and sources, for operators: a registry the
//! streams and the file source write to, and its JSON form served on the admin endpoint.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::diagnostics::{self, Diagnostic};

/// The admin endpoint's `GET /status` document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Connected proxies, by stream id.
    pub proxies: Vec<ProxyStatus>,
    /// Manifest files currently rejected (they serve their last good content).
    pub source_errors: Vec<SourceError>,
    /// Parts of objects the controller cannot use (Gateway API conditions where they exist).
    #[serde(default)]
    pub problems: Vec<Diagnostic>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub stream_id: u64,
    pub node_id: String,
    pub role: String,
    pub namespace: String,
    pub gateway: Option<String>,
    pub connected_since_unix_ms: u64,
    /// By resource type: "clusters", "endpoints", "listeners", "routes".
    pub types: BTreeMap<String, TypeStatus>,
    /// Why the proxy is not (fully) configured, e.g. its Gateway does not exist.
    #[serde(default)]
    pub problems: Vec<Diagnostic>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TypeStatus {
    /// "*" (wildcard), "N names", or "no".
    pub subscribed: String,
    /// Name → version the proxy has ACKed.
    pub acked: BTreeMap<String, String>,
    pub last_acked_nonce: String,
    /// Nonce of the response awaiting ACK, if any.
    pub pending_nonce: Option<String>,
    /// Resources (changes and removals) sent and not yet ACKed.
    pub pending: usize,
    /// Changes waiting for the ordering rules (e.g. routes waiting for a cluster ACK).
    pub held_back: usize,
    pub last_nack: Option<Nack>,
    /// Whether the proxy's latest answer for the type was a NACK (a later ACK clears it).
    #[serde(default)]
    pub nacked: bool,
    /// Resources the proxy refused and still holds an older version of (or none), by name,
    /// with the NACK's line about each.
    #[serde(default)]
    pub refused: BTreeMap<String, String>,
    /// Requests ignored because their nonce was not the latest.
    pub stale_ignored: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nack {
    pub nonce: String,
    pub message: String,
    pub at_unix_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceError {
    pub file: String,
    pub line: usize,
    pub reason: String,
    pub at_unix_ms: u64,
}

/// Shared by the streams, the source and the admin endpoint. A plain mutex: writes are a few
/// per stream event and reads are operator requests, never on a proxy's request path.
#[derive(Debug, Default)]
pub struct Registry {
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
    source_errors: Mutex<BTreeMap<String, SourceError>>,
    problems: Mutex<Vec<Diagnostic>>,
    next_stream: AtomicU64,
    ready: AtomicBool,
}

impl Registry {
    /// Adds a stream; the guard removes it when the stream ends.
    pub fn register(&self, mut status: ProxyStatus) -> StreamGuard<'_> {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed) + 1;
        status.stream_id = id;
        lock(&self.proxies).insert(id, status);
        StreamGuard { registry: self, id }
    }

    pub fn set_source_error(&self, file: &str, line: usize, reason: &str) {
        lock(&self.source_errors).insert(
            file.to_owned(),
            SourceError {
                file: file.to_owned(),
                line,
                reason: reason.to_owned(),
                at_unix_ms: unix_ms(SystemTime::now()),
            },
        );
    }

    pub fn clear_source_error(&self, file: &str) {
        lock(&self.source_errors).remove(file);
    }

    pub fn retain_source_errors(&self, mut keep: impl FnMut(&str) -> bool) {
        lock(&self.source_errors).retain(|file, _| keep(file));
    }

    /// Replaces the object diagnostics, logging what appeared and what cleared.
    pub fn set_problems(&self, problems: Vec<Diagnostic>) {
        let mut current = lock(&self.problems);
        diagnostics::log_changes(&current, &problems);
        *current = problems;
    }

    /// Ready: the catalog has been read once and the discovery server is listening.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn report(&self) -> StatusReport {
        StatusReport {
            proxies: lock(&self.proxies).values().cloned().collect(),
            source_errors: lock(&self.source_errors).values().cloned().collect(),
            problems: lock(&self.problems).clone(),
        }
    }
}

/// A registered stream; updates its entry, removes it on drop.
#[derive(Debug)]
pub struct StreamGuard<'a> {
    registry: &'a Registry,
    id: u64,
}

impl StreamGuard<'_> {
    pub fn update(&self, types: BTreeMap<String, TypeStatus>) {
        if let Some(p) = lock(&self.registry.proxies).get_mut(&self.id) {
            p.types = types;
        }
    }

    /// Replaces the proxy's own diagnostics; returns whether they changed.
    pub fn set_problems(&self, problems: &[Diagnostic]) -> bool {
        let mut proxies = lock(&self.registry.proxies);
        let Some(p) = proxies.get_mut(&self.id) else {
            return false;
        };
        if p.problems == problems {
            return false;
        }
        p.problems = problems.to_vec();
        true
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        lock(&self.registry.proxies).remove(&self.id);
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain status data; the data
/// is still worth showing.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The report as an operator's table: one line per proxy and type, then what proxies refused,
/// then every problem the controller knows of.
pub fn render_table(report: &StatusReport, now: SystemTime) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:<8} {:>8} {:<10} {:>6} {:>8} {:>5} LAST NACK",
        "NODE", "ROLE", "UPTIME", "TYPE", "ACKED", "PENDING", "HELD"
    );
    for p in &report.proxies {
        let uptime = unix_ms(now).saturating_sub(p.connected_since_unix_ms) / 1000;
        for (t, s) in &p.types {
            let nack = s.last_nack.as_ref().map_or_else(
                || "-".to_owned(),
                |n| {
                    let ago = unix_ms(now).saturating_sub(n.at_unix_ms) / 1000;
                    // One line per refused resource in the message: the first one here, all
                    // of them under REFUSED.
                    let first = n.message.lines().next().unwrap_or_default();
                    let more = n.message.lines().count().saturating_sub(1);
                    let more = if more > 0 {
                        format!(" (+{more} more)")
                    } else {
                        String::new()
                    };
                    let now = if s.nacked { "" } else { " (since ACKed)" };
                    format!("{ago}s ago{now}: {first}{more}")
                },
            );
            let _ = writeln!(
                out,
                "{:<28} {:<8} {:>7}s {:<10} {:>6} {:>8} {:>5} {}",
                p.node_id,
                p.role,
                uptime,
                t,
                s.acked.len(),
                s.pending,
                s.held_back,
                nack
            );
        }
        if p.types.is_empty() {
            let _ = writeln!(
                out,
                "{:<28} {:<8} {:>7}s {:<10}",
                p.node_id, p.role, uptime, "-"
            );
        }
    }
    if report.proxies.is_empty() {
        out.push_str("(no proxies connected)\n");
    }
    let refused: Vec<(&ProxyStatus, &String, &String, &String)> = report
        .proxies
        .iter()
        .flat_map(|p| {
            p.types
                .iter()
                .flat_map(move |(t, s)| s.refused.iter().map(move |(name, why)| (p, t, name, why)))
        })
        .collect();
    if !refused.is_empty() {
        out.push_str("\nREFUSED BY PROXIES (they keep the last version they accepted)\n");
        for (p, t, name, why) in refused {
            let _ = writeln!(out, "{} {t} {name:?}: {why}", p.node_id);
        }
    }
    let problems: Vec<&Diagnostic> = report
        .problems
        .iter()
        .chain(report.proxies.iter().flat_map(|p| &p.problems))
        .collect();
    if !report.source_errors.is_empty() || !problems.is_empty() {
        out.push_str("\nPROBLEMS\n");
    }
    for e in &report.source_errors {
        let _ = writeln!(
            out,
            "{}:{}: rejected, serving its last good content: {}",
            e.file, e.line, e.reason
        );
    }
    for d in problems {
        let _ = writeln!(out, "{d}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> StatusReport {
        let mut routes = TypeStatus {
            nacked: true,
            last_nack: Some(Nack {
                nonce: "3".into(),
                message: "route config \"r\": bad regex\nroute config \"s\": empty domain".into(),
                at_unix_ms: 1_000,
            }),
            ..TypeStatus::default()
        };
        routes
            .refused
            .insert("r".into(), "route config \"r\": bad regex".into());
        StatusReport {
            proxies: vec![ProxyStatus {
                stream_id: 1,
                node_id: "gw-1".into(),
                role: "gateway".into(),
                namespace: "shop".into(),
                gateway: Some("shop/edge".into()),
                connected_since_unix_ms: 1_000,
                types: [("routes".to_owned(), routes)].into(),
                problems: vec![Diagnostic::failed(
                    diagnostics::PROXY,
                    "shop",
                    "gw-1",
                    None,
                    diagnostics::CONFIGURED,
                    diagnostics::GATEWAY_NOT_FOUND,
                    "Gateway shop/edge (named by --gateway) does not exist".into(),
                )],
            }],
            source_errors: vec![SourceError {
                file: "/m/route.yaml".into(),
                line: 7,
                reason: "spec.rules[0]: unknown field `backendRef`".into(),
                at_unix_ms: 0,
            }],
            problems: vec![Diagnostic::failed(
                "HTTPRoute",
                "shop",
                "r",
                Some("rules[0].backendRefs[1]".into()),
                diagnostics::RESOLVED_REFS,
                diagnostics::BACKEND_NOT_FOUND,
                "Service shop/nope does not exist".into(),
            )],
        }
    }

    #[test]
    fn the_table_names_every_problem() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(11);
        let table = render_table(&report(), now);
        for line in [
            "routes",
            "10s ago: route config \"r\": bad regex (+1 more)",
            "REFUSED BY PROXIES",
            "gw-1 routes \"r\": route config \"r\": bad regex",
            "PROBLEMS",
            "/m/route.yaml:7: rejected, serving its last good content: spec.rules[0]: unknown field `backendRef`",
            "HTTPRoute shop/r rules[0].backendRefs[1]: ResolvedRefs=False BackendNotFound: Service shop/nope does not exist",
            "Proxy shop/gw-1: Configured=False GatewayNotFound: Gateway shop/edge (named by --gateway) does not exist",
        ] {
            assert!(table.contains(line), "no {line:?} in\n{table}");
        }
    }

    #[test]
    fn the_json_round_trips_and_names_fields() {
        let report = report();
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["problems"][0]["reason"], "BackendNotFound");
        assert_eq!(json["problems"][0]["condition"], "ResolvedRefs");
        assert_eq!(json["problems"][0]["status"], "False");
        assert_eq!(json["problems"][0]["section"], "rules[0].backendRefs[1]");
        assert_eq!(
            json["proxies"][0]["problems"][0]["reason"],
            "GatewayNotFound"
        );
        assert_eq!(
            json["proxies"][0]["types"]["routes"]["refused"]["r"],
            "route config \"r\": bad regex"
        );
        assert_eq!(json["proxies"][0]["types"]["routes"]["nacked"], true);
        let back: StatusReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
        // A report from an older controller (without the new fields) still reads.
        let old = r#"{"proxies": [], "source_errors": []}"#;
        assert_eq!(
            serde_json::from_str::<StatusReport>(old).unwrap(),
            StatusReport::default()
        );
    }
}
