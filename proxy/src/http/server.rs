//! Serving downstream connections: HTTP/1.1 and HTTP/2 cleartext on the same port, under the
//! listener's connection limits, until the client, a limit or a drain ends them.
//!
//! Three clocks run per connection:
//! - idle: no request in flight for `idle_timeout` → graceful shutdown;
//! - head: an HTTP/1.1 request head must be complete within `header_read_timeout` of its first
//!   byte (of the connection's start, for the first request) → the connection is closed;
//! - age: `max_connection_age` × a random factor in [0.9, 1.1] → graceful shutdown.
//!
//! The socket also speaks for hyper where hyper cannot: it adds `x-trellis-error` to hyper's own
//! HTTP/1 answers to unparseable heads, and writes 1xx responses (Early Hints, and on HTTP/2 the
//! `100 Continue`) between hyper's messages or frames: see [`informational`].
//!
//! Graceful shutdown is hyper's: HTTP/1.1 closes an idle connection at once, otherwise answers the
//! request in flight with `Connection: close` and then closes; HTTP/2 sends GOAWAY and lets the
//! open streams finish. A drain does not close an idle HTTP/1.1 connection at once, as that races
//! the client's next request: see [`drain`] for what it does instead.

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

mod drain;
mod framing;
mod informational;
mod parse_error;

pub use self::informational::Informational;

use self::{
    drain::{CUT_FLUSH, DRAIN_QUIET, cut_answer},
    framing::Framing,
    informational::{H2Streams, Inbound, Outbound, PendingInformational, STREAM_ID_NAME, Scanned},
    parse_error::{PARSER_REFUSALS, parser_refusal},
};
use super::{
    body::ResponseBody,
    error::ERROR_HEADER,
    forward::{ConnContext, handle},
    headers::{ALLOWED_METHODS, Refusal, Screened, screen},
    observe::{Exchange, ObservedBody},
};
use crate::{
    config::model::HttpConnection, listener::drain::DrainWatch, telemetry::ListenerTelemetry,
};

/// What a client sends first on an HTTP/2 prior-knowledge connection.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper's default HTTP/2 header list limit.
const H2_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// The most the stream id field adds to a header list (RFC 9113 §6.5.2: name, value, 32).
const STREAM_ID_FIELD_SIZE: u32 = 32 + STREAM_ID_NAME.len() as u32 + 10;

/// Connection settings shared by every connection of every listener.
pub fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper's own header-read timer also runs while a keep-alive connection waits for its next
    // request, which would cap idle time at the header timeout; `Downstream` times a head from
    // its first byte instead.
    b.http1().timer(TokioTimer::new()).header_read_timeout(None);
    // The timer drives HTTP/2 keep-alive. The socket adds one field to each request head (the
    // stream id, see `informational`): the limit grows by its size, so clients keep theirs.
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(H2_HEADER_LIST_SIZE + STREAM_ID_FIELD_SIZE);
    b
}

/// Serves one accepted connection until the client closes it, a limit in `limits` ends it, or a
/// drain shuts it down. `drain` is held until the connection (or the tunnel it was upgraded to)
/// is gone.
/// `stream` is the accepted socket, or the TLS session on it; the caller sets `TCP_NODELAY`.
/// `builder` decides the protocols: one that speaks both tells them apart by the HTTP/2 preface.
pub async fn serve<S>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: S,
    ctx: ConnContext,
    limits: HttpConnection,
    mut drain: DrainWatch,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let cut = drain.cut_watch();
    let io = Downstream::new(
        stream,
        activity.clone(),
        limits.header_read_timeout,
        // The same connection: counted once in the drain.
        drain.share(),
    )
    .with_telemetry(ctx.telemetry.clone())
    .expecting(ctx.negotiated);
    let ctx = Arc::new(ctx);
    let service = service_fn({
        let activity = activity.clone();
        let cut = cut.clone();
        move |mut req: Request<hyper::body::Incoming>| {
            // Counted here, not in the future: hyper calls the service as soon as the head is
            // parsed, which is when the head clock must stop.
            let request = activity.request_started();
            // No 1xx for HTTP/1.0 clients (RFC 9110 §15.2). On HTTP/2 the socket told the
            // stream id in a field of the head, which never goes further.
            if req.version() == Version::HTTP_11 {
                let number = activity.started.load(Ordering::SeqCst);
                let informational = Informational::http1(activity.clone(), number);
                req.extensions_mut().insert(informational);
            } else if req.version() == Version::HTTP_2
                && let Some(informational) = Informational::http2(activity.clone(), &mut req)
            {
                req.extensions_mut().insert(informational);
            }
            let ctx = ctx.clone();
            let stream = (req.version() == Version::HTTP_2).then(|| activity.h2_stream_started());
            // hyper leaves HEAD to the service on HTTP/2 (on HTTP/1.1 it writes no body itself).
            let h2_head = req.version() == Version::HTTP_2 && req.method() == Method::HEAD;
            let activity = activity.clone();
            let mut cut = cut.clone();
            async move {
                let version = req.version();
                // Kept for the answer if the drain timeout cuts the request before its response.
                let cut_exchange = Exchange::start(&ctx, &req);
                let answer = async {
                    match screen(req.method(), req.uri(), req.version(), req.headers()) {
                        // A connection closed for its resets gets no more upstream work while
                        // its GOAWAY is on the way.
                        _ if stream.is_some() && request.0.reset_abuse.load(Ordering::SeqCst) => {
                            answer_locally(&ctx, &req, Screened::Refuse(RESET_ABUSE))
                        }
                        Screened::Proceed => handle(&ctx, req).await,
                        screened => answer_locally(&ctx, &req, screened),
                    }
                };
                let (mut resp, was_cut) = tokio::select! {
                    resp = answer => (resp, false),
                    _ = cut.cut() => (cut_answer(&ctx, cut_exchange, version), true),
                };
                // A response to a request that arrives during a drain tells the client to close:
                // hyper then closes the connection after it, with no request left behind.
                if version <= Version::HTTP_11
                    && activity.draining.load(Ordering::SeqCst)
                    && resp.status() != StatusCode::SWITCHING_PROTOCOLS
                {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                if let Some(stream) = stream {
                    stream.answered();
                }
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    request.upgraded();
                }
                if h2_head {
                    without_body(&mut resp);
                }
                if version <= Version::HTTP_11 && looks_like_parser_refusal(&resp) {
                    activity.lookalikes.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, Infallible>(resp.map(|body| InFlightBody {
                    inner: body,
                    request: Some(request),
                    cut_counted: was_cut,
                }))
            }
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);

    let age = limits
        .max_connection_age
        .map(|age| activity.epoch + age.mul_f64(0.9 + 0.2 * fastrand::f64()));
    let mut idle_check = activity.epoch + limits.idle_timeout;
    let mut closing = false;
    // While an HTTP/1 connection drains: when to look again whether its client has gone quiet.
    let mut quiet_check: Option<Instant> = None;
    // Once the drain timeout has cut the drain: when the connection is dropped, whatever it does.
    let mut cut_deadline: Option<Instant> = None;
    let mut cut = cut;
    loop {
        let why = tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "downstream connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(idle_check), if !closing => {
                // Requests move the idle deadline without waking this task; it is checked when
                // the previous deadline passes.
                match activity.idle_deadline(limits.idle_timeout) {
                    Some(deadline) if deadline <= Instant::now() => "idle timeout",
                    Some(deadline) => {
                        idle_check = deadline;
                        continue;
                    }
                    None => {
                        idle_check = Instant::now() + limits.idle_timeout;
                        continue;
                    }
                }
            }
            _ = tokio::time::sleep_until(age.unwrap_or(idle_check)), if age.is_some() && !closing => {
                "max connection age"
            }
            _ = drain.signaled(), if !closing && quiet_check.is_none() => {
                activity.drain_started();
                if activity.http2.load(Ordering::SeqCst) {
                    "drain"
                } else {
                    quiet_check = Some(Instant::now() + DRAIN_QUIET);
                    continue;
                }
            }
            _ = tokio::time::sleep_until(quiet_check.unwrap_or(idle_check)), if quiet_check.is_some() && !closing => {
                // Detection may have found HTTP/2 since the drain started: its GOAWAY is safe.
                if activity.http2.load(Ordering::SeqCst) {
                    "drain"
                } else {
                    match activity.quiet_deadline(DRAIN_QUIET) {
                        Some(deadline) if deadline <= Instant::now() => "drain: the client is quiet",
                        Some(deadline) => {
                            quiet_check = Some(deadline);
                            continue;
                        }
                        None => {
                            quiet_check = Some(Instant::now() + DRAIN_QUIET);
                            continue;
                        }
                    }
                }
            }
            _ = cut.cut(), if cut_deadline.is_none() => {
                activity.drain_started();
                activity.cut.store(true, Ordering::SeqCst);
                // Time for the 503s of the cut requests to go out; bodies still streaming then
                // are ended.
                cut_deadline = Some(Instant::now() + CUT_FLUSH);
                if closing {
                    continue;
                }
                "drain timeout"
            }
            _ = tokio::time::sleep_until(cut_deadline.unwrap_or(idle_check)), if cut_deadline.is_some() => {
                tracing::debug!("drain timeout: ending the downstream connection");
                return;
            }
            _ = activity.reset_abuse_seen.notified(), if !closing => "premature stream resets",
        };
        tracing::debug!(reason = why, "closing downstream connection gracefully");
        conn.as_mut().graceful_shutdown();
        closing = true;
    }
}

/// Makes a response to HEAD: the same head, with the length the GET would have, and no body, so
/// that HTTP/2 ends the stream with the HEADERS frame (RFC 9110 §9.3.2, RFC 9113 §8.1).
fn without_body(resp: &mut Response<ObservedBody>) {
    if let Some(len) = resp.body().size_hint().exact()
        && !resp.headers().contains_key(header::CONTENT_LENGTH)
        && !resp.body().is_end_stream()
    {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    resp.body_mut().discard();
}

/// Whether hyper would write this response exactly as it writes its own answer to an
/// unparseable head, so the socket must not mistake it for one.
fn looks_like_parser_refusal(resp: &Response<ObservedBody>) -> bool {
    PARSER_REFUSALS
        .iter()
        .any(|(status, _, _)| resp.status().as_u16() == *status)
        && resp.body().size_hint().exact() == Some(0)
}

/// Answers a request the proxy does not route: a refusal, or `OPTIONS *`. Counted and logged
/// like any other unrouted request. A refused HTTP/1 request's body is never read, so its
/// connection is closed after the answer: where that body ends is unknown or untrusted.
fn answer_locally<B>(
    ctx: &ConnContext,
    req: &Request<B>,
    screened: Screened,
) -> Response<ObservedBody> {
    let mut exchange = Exchange::start(ctx, req);
    let resp = match screened {
        Screened::Refuse(refusal) => {
            tracing::debug!(reason = refusal.reason, "request refused before routing");
            exchange.error = Some(refusal.reason);
            refusal_response(&refusal, req.version())
        }
        Screened::OptionsAsterisk | Screened::Proceed => {
            let mut resp = Response::new(ResponseBody::empty());
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
            resp
        }
    };
    exchange.finish(ctx, resp)
}

/// The answer for a refused request; on HTTP/1 it closes the connection.
fn refusal_response(refusal: &Refusal, version: Version) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(format!("{}\n", refusal.message)));
    *resp.status_mut() = refusal.status;
    let h = resp.headers_mut();
    h.insert(ERROR_HEADER, HeaderValue::from_static(refusal.reason));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if refusal.status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
    }
    if version <= Version::HTTP_11 {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Requests on one connection, shared by its service, its response bodies and its socket.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Requests started so far: the head clock stops when this moves.
    started: AtomicU64,
    /// When `in_flight` last fell to zero, in nanoseconds since `epoch`.
    idle_since: AtomicU64,
    /// The connection switched protocols: its bytes are no longer HTTP heads.
    upgraded: AtomicBool,
    /// HTTP/2 streams started and reset by the client before their response, recently: both
    /// are halved whenever the streams reach twice the window, so old behaviour fades.
    h2_streams: Mutex<(u32, u32)>,
    /// The client resets too many streams: the connection is being closed.
    reset_abuse: AtomicBool,
    reset_abuse_seen: tokio::sync::Notify,
    /// 1xx heads for the request in flight.
    informational: Mutex<PendingInformational>,
    /// Responses of the service that hyper writes byte for byte like its own parse-error
    /// answers, not yet written: the socket leaves that many such answers alone.
    lookalikes: AtomicU64,
    /// The socket reader to wake when the connection turns idle with part of a pipelined head
    /// already read, so that its head clock starts even if hyper does not read again.
    reader: Mutex<Option<Waker>>,
    /// The client spoke the HTTP/2 preface.
    http2: AtomicBool,
    /// Part of an HTTP/1.1 request head has been read and the rest has not.
    mid_head: AtomicBool,
    /// The proxy drains: HTTP/1 responses say `Connection: close`.
    draining: AtomicBool,
    /// While draining: when bytes last came from the client, in nanoseconds since `epoch`.
    heard: AtomicU64,
    /// The drain timeout ended: requests still unfinished are cut.
    cut: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
            reader: Mutex::new(None),
            h2_streams: Mutex::new((0, 0)),
            reset_abuse: AtomicBool::new(false),
            reset_abuse_seen: tokio::sync::Notify::new(),
            lookalikes: AtomicU64::new(0),
            informational: Mutex::new(PendingInformational::default()),
            http2: AtomicBool::new(false),
            mid_head: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            heard: AtomicU64::new(0),
            cut: AtomicBool::new(false),
        }
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    fn h2_stream_started(self: &Arc<Self>) -> H2Stream {
        let mut counts = self.h2_streams.lock().unwrap_or_else(|e| e.into_inner());
        counts.0 += 1;
        if counts.0 >= 2 * RESET_WINDOW {
            *counts = (counts.0 / 2, counts.1 / 2);
        }
        H2Stream {
            activity: self.clone(),
            answered: false,
        }
    }

    /// A stream was reset before its response head: past the threshold, the connection is
    /// closed with GOAWAY, as a client that opens and cancels streams costs upstream work (and,
    /// for HTTP/1.1 upstreams, a connection) each time while sending almost nothing itself.
    fn h2_premature_reset(&self) {
        let abusive = {
            let mut counts = self.h2_streams.lock().unwrap_or_else(|e| e.into_inner());
            counts.1 += 1;
            counts.0 >= RESET_WINDOW && counts.1 * 2 > counts.0
        };
        if abusive && !self.reset_abuse.swap(true, Ordering::SeqCst) {
            metrics::counter!("trellis_http2_premature_reset_closes_total").increment(1);
            if warn_allowed() {
                tracing::warn!(
                    "closing an HTTP/2 connection whose client reset more than half of its \
                     recent streams before their response (further such closes are logged at \
                     most once per 10 s)"
                );
            }
            self.reset_abuse_seen.notify_one();
        }
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }

    /// When the connection turns idle for too long; `None` while a request is in flight.
    fn idle_deadline(&self, idle_timeout: Duration) -> Option<Instant> {
        if !self.is_idle() {
            return None;
        }
        let since = Duration::from_nanos(self.idle_since.load(Ordering::SeqCst));
        Some(self.epoch + since + idle_timeout)
    }
}

/// The fewest recent HTTP/2 streams on which the premature reset ratio is judged.
const RESET_WINDOW: u32 = 100;

/// The answer to streams opened on a connection that is being closed for its resets.
const RESET_ABUSE: Refusal = Refusal {
    status: StatusCode::SERVICE_UNAVAILABLE,
    reason: "premature-resets",
    message: "the connection is closing: too many streams were reset",
};

/// Whether a process-wide rate-limited warning may be logged now: at most one per 10 s.
fn warn_allowed() -> bool {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let now = EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64;
    let next = NEXT.load(Ordering::Relaxed);
    now >= next
        && NEXT
            .compare_exchange(next, now + 10_000, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// An HTTP/2 stream until its response head is ready; dropped before that, the client reset it
/// (hyper drops the service future on RST_STREAM).
struct H2Stream {
    activity: Arc<Activity>,
    answered: bool,
}

impl H2Stream {
    fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if !self.answered {
            self.activity.h2_premature_reset();
        }
    }
}

/// One request in flight, from its parsed head to the end (or drop) of its response body.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl InFlight {
    fn upgraded(&self) {
        self.0.upgraded.store(true, Ordering::SeqCst);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        // Stamped before the count falls, and only ever forward, so whoever sees zero in flight
        // sees the latest end.
        let now = a.epoch.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        a.idle_since.fetch_max(now, Ordering::SeqCst);
        if a.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && let Some(reader) = a.reader.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            reader.wake();
        }
    }
}

/// A response body that keeps its request counted as in flight until it ends or is dropped.
#[derive(Debug)]
pub struct InFlightBody {
    inner: ObservedBody,
    request: Option<InFlight>,
    /// The response is the drain timeout's own answer, already counted as cut.
    cut_counted: bool,
}

impl Body for InFlightBody {
    type Data = <ObservedBody as Body>::Data;
    type Error = <ObservedBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.request = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for InFlightBody {
    fn drop(&mut self) {
        // Dropped unfinished after the drain timeout: the connection was ended under it.
        if let Some(request) = &self.request
            && !self.cut_counted
            && !self.inner.is_end_stream()
            && request.0.cut.load(Ordering::SeqCst)
        {
            self.inner.ended_by(drain::DRAIN_TIMEOUT.reason);
            crate::telemetry::drain_cut_request();
        }
    }
}

/// Which protocol the client speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// This many bytes of the HTTP/2 preface seen so far.
    Detecting(usize),
    Http1,
    Http2,
}

/// The accepted socket, with the HTTP/1.1 head clock: armed when a head's first byte arrives on
/// an idle connection (and at the start, for the first head), stopped when the head is parsed,
/// checked whenever a read has to wait. Expiry fails the read, and hyper closes the connection
/// without a response.
#[derive(Debug)]
struct Downstream<S> {
    inner: S,
    activity: Arc<Activity>,
    header_read_timeout: Duration,
    protocol: Protocol,
    /// The head deadline; reset rather than reallocated for each head.
    head_timer: Pin<Box<Sleep>>,
    /// While the head clock runs: the count of started requests when it was armed.
    head: Option<u64>,
    /// Where the HTTP/1.1 byte stream stands between messages, to tell a pipelined partial head
    /// hyper already holds from an idle keep-alive connection.
    framing: Framing,
    /// hyper's answer to an unparseable head, being written with the reason added.
    refusal: Option<Rewritten>,
    /// The request count when hyper last flushed with nothing of its own left to write, and
    /// whether it wrote since: 1xx heads go out only while hyper is between messages.
    between_messages: Option<u64>,
    /// Where refusals written for hyper are counted, as unrouted responses.
    telemetry: Option<Arc<ListenerTelemetry>>,
    /// The protocol ALPN settled, if TLS did: the other one is refused, not sniffed.
    expected: Option<Protocol>,
    /// HTTP/2: the client's frames as read, hyper's as written, and the streams they open and
    /// close, for the 1xx frames of [`informational`]. Followed from the first byte, before the
    /// preface is known: an HTTP/2-only server writes its SETTINGS before reading anything.
    inbound: Inbound,
    outbound: Outbound,
    h2: H2Streams,
    /// Read bytes already scanned, for hyper's next reads (after an inserted field).
    scanned: Vec<u8>,
    /// The start of a client frame head, read but not yet given to hyper.
    held: Vec<u8>,
    /// Keeps the connection counted as open, upgraded tunnels included.
    _open: DrainWatch,
}

/// Bytes written in place of bytes hyper gave: once all are out, hyper is told its own went.
#[derive(Debug)]
struct Rewritten {
    bytes: Vec<u8>,
    written: usize,
    replaces: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Downstream<S> {
    fn new(
        inner: S,
        activity: Arc<Activity>,
        header_read_timeout: Duration,
        open: DrainWatch,
    ) -> Self {
        Downstream {
            inner,
            activity,
            header_read_timeout,
            protocol: Protocol::Detecting(0),
            head_timer: Box::pin(tokio::time::sleep(header_read_timeout)),
            head: Some(0),
            framing: Framing::default(),
            refusal: None,
            between_messages: None,
            telemetry: None,
            expected: None,
            inbound: Inbound::default(),
            outbound: Outbound::default(),
            h2: H2Streams::default(),
            scanned: Vec::new(),
            held: Vec::new(),
            _open: open,
        }
    }

    /// Writes pending 1xx heads if hyper is between messages for the request they belong to;
    /// drops them if hyper has moved on or is about to write (`hyper_writing`) in the middle of
    /// a message. A head once started is always finished first.
    fn poll_informational(
        &mut self,
        cx: &mut Context<'_>,
        hyper_writing: bool,
    ) -> Poll<io::Result<()>> {
        if self.protocol == Protocol::Http2 {
            return self.poll_h2_informational(cx);
        }
        if self.protocol != Protocol::Http1 {
            return Poll::Ready(Ok(()));
        }
        let mut pending = self
            .activity
            .informational
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !pending
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            pending.waker = Some(cx.waker().clone());
        }
        if pending.bytes.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if pending.written == 0 && self.between_messages != Some(pending.request) {
            if hyper_writing || self.activity.started.load(Ordering::SeqCst) != pending.request {
                pending.bytes.clear();
            }
            return Poll::Ready(Ok(()));
        }
        while pending.written < pending.bytes.len() {
            let at = pending.written;
            match Pin::new(&mut self.inner).poll_write(cx, &pending.bytes[at..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => pending.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        pending.bytes.clear();
        pending.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes pending HTTP/2 1xx frames while hyper's output is between frames; drops those
    /// whose stream has had its final head or was reset. A frame once started is always
    /// finished first.
    fn poll_h2_informational(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut pending = self
            .activity
            .informational
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !pending
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            pending.waker = Some(cx.waker().clone());
        }
        let pending = &mut *pending;
        while let Some((stream, frames)) = pending.h2.front() {
            if pending.h2_written == 0 {
                if !self.h2.is_open(*stream) {
                    pending.h2.pop_front();
                    continue;
                }
                if !self.outbound.at_boundary() || !self.h2.may_encode() {
                    break;
                }
            }
            while pending.h2_written < frames.len() {
                let at = pending.h2_written;
                match Pin::new(&mut self.inner).poll_write(cx, &frames[at..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => pending.h2_written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            pending.h2.pop_front();
            pending.h2_written = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Scans the bytes just read into `buf` from `from` on as HTTP/2 frames: adds the stream id
    /// field where a new stream's head ends, and holds back a frame head cut by the read.
    /// Returns whether hyper has bytes to read.
    fn scan_h2(&mut self, buf: &mut ReadBuf<'_>, from: usize) -> bool {
        let mut rest = if self.held.is_empty() {
            match self
                .inbound
                .scan(&mut buf.filled_mut()[from..], &mut self.h2)
            {
                Scanned::All => return true,
                Scanned::Insert(at, field) => {
                    let rest = buf.filled()[from + at..].to_vec();
                    buf.set_filled(from + at);
                    self.scanned.extend_from_slice(&field);
                    rest
                }
                Scanned::Hold(at) => {
                    self.held.extend_from_slice(&buf.filled()[from + at..]);
                    buf.set_filled(from + at);
                    return at > 0;
                }
            }
        } else {
            // Rare: a frame head was cut by the last read. Scanned again from its start.
            let mut rest = std::mem::take(&mut self.held);
            rest.extend_from_slice(&buf.filled()[from..]);
            buf.set_filled(from);
            rest
        };
        let mut at = 0;
        loop {
            match self.inbound.scan(&mut rest[at..], &mut self.h2) {
                Scanned::All => {
                    self.scanned.extend_from_slice(&rest[at..]);
                    break;
                }
                Scanned::Insert(n, field) => {
                    self.scanned.extend_from_slice(&rest[at..at + n]);
                    self.scanned.extend_from_slice(&field);
                    at += n;
                }
                Scanned::Hold(n) => {
                    self.scanned.extend_from_slice(&rest[at..at + n]);
                    self.held.extend_from_slice(&rest[at + n..]);
                    break;
                }
            }
        }
        rest.clear();
        self.give_scanned(buf);
        buf.filled().len() > from
    }

    /// Moves scanned bytes into hyper's buffer, as many as fit.
    fn give_scanned(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.scanned.len().min(buf.remaining());
        buf.put_slice(&self.scanned[..n]);
        self.scanned.drain(..n);
    }

    fn with_telemetry(mut self, telemetry: Arc<ListenerTelemetry>) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    fn expecting(mut self, version: Option<Version>) -> Self {
        self.expected = version.map(|v| {
            if v == Version::HTTP_2 {
                Protocol::Http2
            } else {
                Protocol::Http1
            }
        });
        self
    }

    /// Whether the client's first bytes showed the protocol ALPN did not choose.
    fn speaks_other_than_negotiated(&self) -> bool {
        match (self.expected, self.protocol) {
            (Some(want), got @ (Protocol::Http1 | Protocol::Http2)) => want != got,
            _ => false,
        }
    }

    /// Starts rewriting `buf` if it is hyper's answer to a head it could not parse. Such an
    /// answer is only written when no request is in flight; a response of the service that would
    /// look the same was counted in `lookalikes` and is let through.
    fn catch_parser_refusal(&mut self, buf: &[u8]) {
        if self.refusal.is_some()
            || self.protocol != Protocol::Http1
            || self.activity.upgraded.load(Ordering::SeqCst)
            || !self.activity.is_idle()
        {
            return;
        }
        let Some((status, reason, line_end)) = parser_refusal(buf) else {
            return;
        };
        let lookalikes = &self.activity.lookalikes;
        if lookalikes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return;
        }
        tracing::debug!(status, reason, "request head refused by the HTTP/1 parser");
        if let Some(t) = &self.telemetry {
            t.unrouted.count_response(status);
        }
        let mut bytes = Vec::with_capacity(buf.len() + 40);
        bytes.extend_from_slice(&buf[..line_end]);
        bytes.extend_from_slice(ERROR_HEADER.as_bytes());
        bytes.extend_from_slice(b": ");
        bytes.extend_from_slice(reason.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        bytes.extend_from_slice(&buf[line_end..]);
        self.refusal = Some(Rewritten {
            bytes,
            written: 0,
            replaces: buf.len(),
        });
    }

    fn on_bytes(&mut self, read: &[u8]) {
        if let Protocol::Detecting(seen) = self.protocol {
            let n = read.len().min(H2_PREFACE.len() - seen);
            self.protocol = if read[..n] != H2_PREFACE[seen..seen + n] {
                Protocol::Http1
            } else if seen + n == H2_PREFACE.len() {
                // An idle HTTP/2 connection is normal; only the idle clock applies.
                self.head = None;
                self.activity.http2.store(true, Ordering::SeqCst);
                Protocol::Http2
            } else {
                Protocol::Detecting(seen + n)
            };
        }
        if self.protocol == Protocol::Http1 && !self.activity.upgraded.load(Ordering::SeqCst) {
            self.framing.feed(read);
            self.activity
                .mid_head
                .store(self.framing.in_partial_head(), Ordering::SeqCst);
            if self.head.is_none() && self.activity.is_idle() {
                self.arm_head_clock();
            }
        }
        if self.activity.draining.load(Ordering::Relaxed) {
            self.activity.heard_now();
        }
    }

    fn arm_head_clock(&mut self) {
        let started = self.activity.started.load(Ordering::SeqCst);
        let deadline = Instant::now() + self.header_read_timeout;
        self.head_timer.as_mut().reset(deadline);
        self.head = Some(started);
    }

    /// Part of a next head arrived with an earlier request (pipelining) and now waits for its
    /// end: its clock starts once the requests before it are answered, as hyper reads no further
    /// head until then.
    fn pipelined_head_waiting(&self) -> bool {
        self.protocol == Protocol::Http1
            && self.head.is_none()
            && self.framing.in_partial_head()
            && !self.activity.upgraded.load(Ordering::SeqCst)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Downstream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(armed_at) = this.head
            && this.activity.started.load(Ordering::SeqCst) != armed_at
        {
            this.head = None;
        }
        if this.pipelined_head_waiting() {
            if this.activity.is_idle() {
                this.arm_head_clock();
            } else {
                *this
                    .activity
                    .reader
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            }
        }
        if !this.scanned.is_empty() {
            this.give_scanned(buf);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.on_bytes(&buf.filled()[before..]);
                if this.speaks_other_than_negotiated() {
                    tracing::debug!(expected = ?this.expected, "client spoke another protocol than ALPN chose; closing");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the client does not speak the protocol ALPN chose",
                    )));
                }
                if this.protocol != Protocol::Http1 && !this.scan_h2(buf, before) {
                    // All of it was held back: read on (an empty read would mean the end).
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            Poll::Ready(Ok(())) if !this.held.is_empty() => {
                // The client closed with a frame head cut short: hyper sees it as it came.
                this.scanned = std::mem::take(&mut this.held);
                this.give_scanned(buf);
            }
            Poll::Pending
                if this.head.is_some() && this.head_timer.as_mut().poll(cx).is_ready() =>
            {
                this.head = None;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request head not received within the header read timeout",
                )));
            }
            _ => {}
        }
        polled
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Downstream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_informational(cx, !buf.is_empty()))?;
        if !buf.is_empty() {
            this.between_messages = None;
        }
        this.catch_parser_refusal(buf);
        let Some(r) = &mut this.refusal else {
            let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
            if this.protocol != Protocol::Http1
                && let Poll::Ready(Ok(n)) = polled
            {
                this.outbound.written(&buf[..n], &mut this.h2);
            }
            return polled;
        };
        // hyper offers the same bytes again until told they are written, so the rewritten
        // answer goes out whole before that.
        while r.written < r.bytes.len() {
            match Pin::new(&mut this.inner).poll_write(cx, &r.bytes[r.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(n)) => r.written += n,
                other => return other,
            }
        }
        let replaced = r.replaces.min(buf.len());
        this.refusal = None;
        Poll::Ready(Ok(replaced))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let writing = bufs.iter().any(|b| !b.is_empty());
        std::task::ready!(this.poll_informational(cx, writing))?;
        if writing {
            this.between_messages = None;
        }
        // A parse-error answer is one head, so it is the first buffer when it is written.
        if this.protocol == Protocol::Http1
            && let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && (this.refusal.is_some() || parser_refusal(first).is_some())
        {
            return Pin::new(this).poll_write(cx, first);
        }
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if this.protocol != Protocol::Http1
            && let Poll::Ready(Ok(mut n)) = polled
        {
            for b in bufs {
                let k = n.min(b.len());
                this.outbound.written(&b[..k], &mut this.h2);
                n -= k;
                if n == 0 {
                    break;
                }
            }
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // hyper flushes the socket itself only once its own buffer is empty.
        if this.refusal.is_none() && !this.activity.is_idle() {
            this.between_messages = Some(this.activity.started.load(Ordering::SeqCst));
        }
        std::task::ready!(this.poll_informational(cx, false))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
