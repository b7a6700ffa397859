//! Access logs: one JSON line per HTTP request or TCP connection, written off the request path.
//!
//! A request hands a small record of values it already holds (reference-counted headers and URI,
//! numbers) to a bounded channel with `try_send`; a writer task per destination formats and
//! writes. When the writer falls behind, lines are dropped and counted
//! (`trellis_access_log_lines_total{outcome="dropped"}`): a slow disk never slows requests.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderValue, Method, Uri, Version};
use serde::Serialize;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt, BufWriter},
    sync::mpsc,
};

use crate::config::model::AccessLog;

/// Lines buffered per destination before new ones are dropped.
pub const CHANNEL_CAPACITY: usize = 1024;

/// One finished HTTP exchange or TCP connection.
#[derive(Debug)]
pub enum Record {
    Http(HttpRecord),
    Tcp(TcpRecord),
}

#[derive(Debug)]
pub struct HttpRecord {
    pub time: SystemTime,
    pub listener: Arc<str>,
    pub route: Option<Arc<str>>,
    pub cluster: Option<Arc<str>>,
    pub method: Method,
    pub uri: Uri,
    pub host: Option<HeaderValue>,
    pub version: Version,
    pub status: u16,
    pub duration: Duration,
    pub upstream: Option<SocketAddr>,
    pub bytes_sent: u64,
    pub retries: u32,
    pub error: Option<&'static str>,
    pub request_id: Option<HeaderValue>,
    pub trace_id: Option<[u8; 16]>,
}

#[derive(Debug)]
pub struct TcpRecord {
    pub time: SystemTime,
    pub listener: Arc<str>,
    pub cluster: Option<Arc<str>>,
    pub downstream: SocketAddr,
    pub upstream: Option<SocketAddr>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration: Duration,
    pub error: Option<&'static str>,
}

/// Where a listener's lines go. Cloning it is cheap; every listener with the same destination
/// shares one writer.
#[derive(Clone, Debug)]
pub struct AccessLogSender {
    tx: mpsc::Sender<Record>,
}

impl AccessLogSender {
    /// Queues a line, or drops and counts it when the writer is behind. Never waits.
    pub fn send(&self, record: Record) {
        if self.tx.try_send(record).is_err() {
            super::access_log_dropped().increment(1);
        }
    }
}

/// Writers by destination, reused across config updates. Locked only when a config is applied.
static WRITERS: Mutex<Vec<(AccessLog, AccessLogSender)>> = Mutex::new(Vec::new());

/// The sender for `destination`, starting its writer task if none runs. Call within a Tokio
/// runtime.
pub fn sender(destination: &AccessLog) -> AccessLogSender {
    let mut writers = WRITERS.lock().unwrap_or_else(PoisonError::into_inner);
    // A writer whose runtime ended (tests start many) or whose file failed to open is replaced.
    writers.retain(|(_, s)| !s.tx.is_closed());
    if let Some((_, s)) = writers.iter().find(|(d, _)| d == destination) {
        return s.clone();
    }
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    tokio::spawn(write_loop(destination.clone(), rx));
    let s = AccessLogSender { tx };
    writers.push((destination.clone(), s.clone()));
    s
}

async fn write_loop(destination: AccessLog, rx: mpsc::Receiver<Record>) {
    match &destination {
        AccessLog::Stdout => drain(rx, tokio::io::stdout()).await,
        AccessLog::File(path) => {
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&**path)
                .await;
            match file {
                Ok(f) => drain(rx, f).await,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot open the access log; its lines are dropped");
                }
            }
        }
    }
}

/// How long the writer lets lines gather before writing them out. Writing per line cost a
/// wake-up and a `write` per request (about a third of the proxy's throughput on one core);
/// batching makes it one of each per window. At 50k lines/s a window fills half the queue.
const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Writes lines in batches, flushing once the queue stays empty for a window.
async fn drain(mut rx: mpsc::Receiver<Record>, out: impl AsyncWrite + Unpin) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let mut line = Vec::with_capacity(1024);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        loop {
            while let Some(record) = next.take().or_else(|| rx.try_recv().ok()) {
                line.clear();
                format(&record, &mut line);
                if let Err(e) = out.write_all(&line).await {
                    tracing::error!(error = %e, "access log write failed");
                    return;
                }
                super::access_log_written().increment(1);
            }
            tokio::time::sleep(BATCH_WINDOW).await;
            if rx.is_empty() {
                break;
            }
        }
        if let Err(e) = out.flush().await {
            tracing::error!(error = %e, "access log flush failed");
            return;
        }
    }
}

#[derive(Serialize)]
struct HttpLine<'a> {
    time: &'a str,
    kind: &'static str,
    listener: &'a str,
    method: &'a str,
    authority: Option<&'a str>,
    path: &'a str,
    protocol: &'static str,
    status: u16,
    duration_ms: f64,
    route: Option<&'a str>,
    cluster: Option<&'a str>,
    upstream: Option<String>,
    bytes_sent: u64,
    retries: u32,
    error: Option<&'static str>,
    request_id: Option<&'a str>,
    trace_id: Option<String>,
}

#[derive(Serialize)]
struct TcpLine<'a> {
    time: &'a str,
    kind: &'static str,
    listener: &'a str,
    downstream: String,
    cluster: Option<&'a str>,
    upstream: Option<String>,
    bytes_sent: u64,
    bytes_received: u64,
    duration_ms: f64,
    error: Option<&'static str>,
}

/// Formats one record as a JSON line (newline included).
pub fn format(record: &Record, out: &mut Vec<u8>) {
    let written = match record {
        Record::Http(r) => {
            let time = rfc3339(r.time);
            let authority = r
                .uri
                .authority()
                .map(|a| a.as_str())
                .or_else(|| r.host.as_ref().and_then(|h| h.to_str().ok()));
            serde_json::to_writer(
                &mut *out,
                &HttpLine {
                    time: &time,
                    kind: "http",
                    listener: &r.listener,
                    method: r.method.as_str(),
                    authority,
                    path: r.uri.path(),
                    protocol: match r.version {
                        Version::HTTP_2 => "HTTP/2",
                        Version::HTTP_10 => "HTTP/1.0",
                        Version::HTTP_09 => "HTTP/0.9",
                        _ => "HTTP/1.1",
                    },
                    status: r.status,
                    duration_ms: millis(r.duration),
                    route: r.route.as_deref(),
                    cluster: r.cluster.as_deref(),
                    upstream: r.upstream.map(|a| a.to_string()),
                    bytes_sent: r.bytes_sent,
                    retries: r.retries,
                    error: r.error,
                    request_id: r.request_id.as_ref().and_then(|v| v.to_str().ok()),
                    trace_id: r.trace_id.map(|t| hex(&t)),
                },
            )
        }
        Record::Tcp(r) => {
            let time = rfc3339(r.time);
            serde_json::to_writer(
                &mut *out,
                &TcpLine {
                    time: &time,
                    kind: "tcp",
                    listener: &r.listener,
                    downstream: r.downstream.to_string(),
                    cluster: r.cluster.as_deref(),
                    upstream: r.upstream.map(|a| a.to_string()),
                    bytes_sent: r.bytes_sent,
                    bytes_received: r.bytes_received,
                    duration_ms: millis(r.duration),
                    error: r.error,
                },
            )
        }
    };
    if written.is_ok() {
        out.push(b'\n');
    }
}

fn millis(d: Duration) -> f64 {
    // Microsecond resolution is plenty and keeps the numbers short.
    (d.as_micros() as f64) / 1000.0
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `2026-01-02T03:04:05.678Z`, without pulling in a date crate.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_123); // a leap year's Feb 29
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.123Z");
    }

    #[test]
    fn http_line_is_json_with_every_field() {
        let r = Record::Http(HttpRecord {
            time: UNIX_EPOCH,
            listener: "web".into(),
            route: Some("api".into()),
            cluster: Some("backend".into()),
            method: Method::POST,
            uri: Uri::from_static("/a/b?secret=1"),
            host: Some(HeaderValue::from_static("example.com")),
            version: Version::HTTP_11,
            status: 503,
            duration: Duration::from_micros(1500),
            upstream: Some("127.0.0.1:9".parse().unwrap()),
            bytes_sent: 12,
            retries: 0,
            error: Some("connect-failure"),
            request_id: Some(HeaderValue::from_static("rid")),
            trace_id: Some([0xab; 16]),
        });
        let mut out = Vec::new();
        format(&r, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["authority"], "example.com");
        assert_eq!(v["path"], "/a/b", "the query is left out");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["upstream"], "127.0.0.1:9");
        assert_eq!(v["trace_id"], "ab".repeat(16));
        assert_eq!(v["error"], "connect-failure");
    }
}
