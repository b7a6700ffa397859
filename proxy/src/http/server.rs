//! Serving downstream connections: HTTP/1.1 and HTTP/2 cleartext on the same port, under the
//! listener's connection limits, until the client, a limit or a drain ends them.
//!
//! Three clocks run per connection:
//! - idle: no request in flight for `idle_timeout` → graceful shutdown;
//! - head: an HTTP/1.1 request head must be complete within `header_read_timeout` of its first
//!   byte (of the connection's start, for the first request) → the connection is closed;
//! - age: `max_connection_age` × a random factor in [0.9, 1.1] → graceful shutdown.
//!
//! Graceful shutdown is hyper's: HTTP/1.1 closes an idle connection at once, otherwise answers the
//! request in flight with `Connection: close` and then closes; HTTP/2 sends GOAWAY and lets the
//! open streams finish.

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};

use super::{
    body::ResponseBody,
    error::ERROR_HEADER,
    forward::{ConnContext, handle},
    headers::{ALLOWED_METHODS, Screened, screen},
    observe::{Exchange, ObservedBody},
};
use crate::{config::model::HttpConnection, listener::drain::DrainWatch};

/// What a client sends first on an HTTP/2 prior-knowledge connection.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connection settings shared by every connection of every listener.
pub fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper's own header-read timer also runs while a keep-alive connection waits for its next
    // request, which would cap idle time at the header timeout; `Downstream` times a head from
    // its first byte instead.
    b.http1().timer(TokioTimer::new()).header_read_timeout(None);
    // The timer drives HTTP/2 keep-alive.
    b.http2().timer(TokioTimer::new());
    b
}

/// Serves one accepted connection until the client closes it, a limit in `limits` ends it, or a
/// drain shuts it down. `drain` is held until the connection (or the tunnel it was upgraded to)
/// is gone.
pub async fn serve(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    ctx: ConnContext,
    limits: HttpConnection,
    mut drain: DrainWatch,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = Downstream::new(
        stream,
        activity.clone(),
        limits.header_read_timeout,
        drain.clone(),
    );
    let ctx = Arc::new(ctx);
    let service = service_fn({
        let activity = activity.clone();
        move |req| {
            // Counted here, not in the future: hyper calls the service as soon as the head is
            // parsed, which is when the head clock must stop.
            let request = activity.request_started();
            let ctx = ctx.clone();
            async move {
                let resp = match screen(req.method(), req.uri(), req.version(), req.headers()) {
                    Screened::Proceed => handle(&ctx, req).await,
                    screened => answer_locally(&ctx, &req, screened),
                };
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    request.upgraded();
                }
                Ok::<_, Infallible>(resp.map(|body| InFlightBody {
                    inner: body,
                    request: Some(request),
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
            _ = drain.signaled(), if !closing => "drain",
        };
        tracing::debug!(reason = why, "closing downstream connection gracefully");
        conn.as_mut().graceful_shutdown();
        closing = true;
    }
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
            if req.version() <= Version::HTTP_11 {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
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
}

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
        }
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
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
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in flight until it ends or is dropped.
#[derive(Debug)]
pub struct InFlightBody<B> {
    inner: B,
    request: Option<InFlight>,
}

impl<B: Body + Unpin> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
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
struct Downstream {
    inner: TcpStream,
    activity: Arc<Activity>,
    header_read_timeout: Duration,
    protocol: Protocol,
    /// The head deadline; reset rather than reallocated for each head.
    head_timer: Pin<Box<Sleep>>,
    /// While the head clock runs: the count of started requests when it was armed.
    head: Option<u64>,
    /// Keeps the connection counted as open, upgraded tunnels included.
    _open: DrainWatch,
}

impl Downstream {
    fn new(
        inner: TcpStream,
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
            _open: open,
        }
    }

    fn on_bytes(&mut self, read: &[u8]) {
        if let Protocol::Detecting(seen) = self.protocol {
            let n = read.len().min(H2_PREFACE.len() - seen);
            self.protocol = if read[..n] != H2_PREFACE[seen..seen + n] {
                Protocol::Http1
            } else if seen + n == H2_PREFACE.len() {
                // An idle HTTP/2 connection is normal; only the idle clock applies.
                self.head = None;
                Protocol::Http2
            } else {
                Protocol::Detecting(seen + n)
            };
        }
        if self.protocol == Protocol::Http1
            && self.head.is_none()
            && self.activity.is_idle()
            && !self.activity.upgraded.load(Ordering::SeqCst)
        {
            let started = self.activity.started.load(Ordering::SeqCst);
            let deadline = Instant::now() + self.header_read_timeout;
            self.head_timer.as_mut().reset(deadline);
            self.head = Some(started);
        }
    }
}

impl AsyncRead for Downstream {
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
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.on_bytes(&buf.filled()[before..]);
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

impl AsyncWrite for Downstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
