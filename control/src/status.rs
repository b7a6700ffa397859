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

/// The admin endpoint's `GET /status` document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Connected proxies, by stream id.
    pub proxies: Vec<ProxyStatus>,
    /// Manifest files currently rejected (they serve their last good content).
    pub source_errors: Vec<SourceError>,
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

/// The report as an operator's table: one line per proxy and type.
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
                    format!("{ago}s ago: {}", n.message)
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
    }
    if report.proxies.is_empty() {
        out.push_str("(no proxies connected)\n");
    }
    for e in &report.source_errors {
        let _ = writeln!(out, "source error: {}:{}: {}", e.file, e.line, e.reason);
    }
    out
}
