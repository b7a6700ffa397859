//! Connections to one endpoint: a stack of idle HTTP/1.1 connections, or one shared HTTP/2
//! connection that carries many streams.
//!
//! We keep our own pool rather than hyper-util's legacy client because the proxy picks the
//! endpoint itself (the legacy client pools by URI authority and would connect to the `Host`), and
//! because it lets a request that never reached a stale pooled connection be sent again on a fresh
//! one.

use std::{
    io,
    mem::MaybeUninit,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{HeaderMap, Request, Response, header};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    breaker::{Breakers, ConnectionSlot, Limit},
    endpoint::now_ms,
};
use crate::{
    config::model::UpstreamProtocol,
    http::body::{RequestBody, ResponseBody, UpstreamBody},
    identity::{
        SpiffeId,
        mtls::{AppProtocol, MeshTls},
    },
    tls::client::{Alpn, ClientTls},
};

/// How rustls words a fatal alert from the peer (`rustls::Error::AlertReceived`), for errors that
/// reach us as text only.
const ALERT_RECEIVED: &str = "received fatal alert";

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when released.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;

/// A pooled connection idle at least this long is checked for a close from the upstream before
/// it is reused. Under steady load connections come back within microseconds and the check would
/// be a wasted system call per request; no server's keep-alive timeout is this short.
const CHECK_AFTER_IDLE: Duration = Duration::from_millis(20);

/// An upstream closing a connection idle for less than this is not timing out keep-alive (it
/// closes after every response, or went away): nothing is learned from it.
const MIN_LEARNED_IDLE: Duration = Duration::from_millis(50);

/// How long a keep-alive timeout learned from an upstream's closes is trusted; a restarted
/// upstream that closed everything at once must not shorten the pool's connections for good.
const LEARNED_TTL_MS: u64 = 10 * 60 * 1000;

/// How long before an upstream's keep-alive timeout (announced or observed) its connection is
/// retired: a quarter of it, at most a second. A request sent as the upstream's timer fires is
/// lost with the connection, and for a POST nothing can safely send it again.
fn retire_before(upstream_timeout: Duration) -> Duration {
    upstream_timeout - (upstream_timeout / 4).min(Duration::from_secs(1))
}

/// The `timeout=N` of a `Keep-Alive` response header (seconds), if any.
fn keep_alive_timeout(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all("keep-alive")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|param| {
            let (name, value) = param.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("timeout") {
                return None;
            }
            value.trim().trim_matches('"').parse::<u64>().ok()
        })
        .map(Duration::from_secs)
}

/// Whether a response ends its connection (`Connection: close`).
fn closes_connection(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, #[source] io::Error),
    /// The TLS handshake failed: a certificate not trusted or not for the name, no protocol in
    /// common, or the upstream closed. The request never reached the upstream.
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(SocketAddr, #[source] io::Error),
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(SocketAddr, #[source] hyper::Error),
    #[error("request to {0} failed: {1}")]
    Send(SocketAddr, #[source] hyper::Error),
    /// The connection closed before any byte of the request was written.
    #[error("connection to {0} closed before the request was sent: {1}")]
    NotSent(SocketAddr, #[source] hyper::Error),
    #[error("too many requests wait for a connection to {0} ({limit})", limit = .1.as_str())]
    Overflow(SocketAddr, Limit),
}

/// Connection settings that, when they change, need a new pool.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSettings {
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// `None`: plain TCP. Compared by its settings, so a cluster whose TLS changed gets a new
    /// pool and no connection made under the old settings is reused.
    pub tls: Option<Arc<ClientTls>>,
    /// Mesh mTLS to a meshed endpoint (when `tls` is `None` and this proxy holds an identity).
    pub mesh: Option<MeshTarget>,
}

/// Mesh mTLS towards one meshed endpoint: this proxy's configs and the SPIFFE ID the endpoint
/// must present.
#[derive(Clone, Debug)]
pub struct MeshTarget {
    pub tls: Arc<MeshTls>,
    pub expected: SpiffeId,
}

/// A pool is kept while the endpoint is expected to be the same peer under the same identity.
impl PartialEq for MeshTarget {
    fn eq(&self, other: &Self) -> bool {
        self.expected == other.expected && Arc::ptr_eq(&self.tls, &other.tls)
    }
}

#[derive(Debug)]
pub struct EndpointPool {
    address: SocketAddr,
    settings: PoolSettings,
    breakers: Arc<Breakers>,
    idle_h1: Mutex<Vec<(http1::SendRequest<RequestBody>, Arc<IdleClock>)>>,
    h2: Mutex<Option<(http2::SendRequest<RequestBody>, Arc<IdleClock>)>>,
    learned: Arc<LearnedTimeout>,
}

/// The shortest idle time after which the upstream was seen to close a pooled connection itself:
/// its keep-alive timeout, when it does not announce one.
#[derive(Debug)]
pub struct LearnedTimeout {
    /// `u64::MAX` while nothing has been learned.
    idle_ms: AtomicU64,
    seen_at_ms: AtomicU64,
}

impl LearnedTimeout {
    fn new() -> Self {
        LearnedTimeout {
            idle_ms: AtomicU64::new(u64::MAX),
            seen_at_ms: AtomicU64::new(0),
        }
    }

    fn observe(&self, idle: Duration) {
        if idle < MIN_LEARNED_IDLE {
            return;
        }
        let now = now_ms();
        let ms = idle.as_millis() as u64;
        if now.saturating_sub(self.seen_at_ms.load(Ordering::Acquire)) > LEARNED_TTL_MS {
            self.idle_ms.store(ms, Ordering::Release);
        } else {
            self.idle_ms.fetch_min(ms, Ordering::AcqRel);
        }
        self.seen_at_ms.store(now, Ordering::Release);
    }

    /// The upstream's keep-alive timeout as learned, if it is recent enough to trust.
    fn get(&self) -> Option<Duration> {
        let ms = self.idle_ms.load(Ordering::Acquire);
        let fresh =
            now_ms().saturating_sub(self.seen_at_ms.load(Ordering::Acquire)) <= LEARNED_TTL_MS;
        (ms != u64::MAX && fresh).then(|| Duration::from_millis(ms))
    }
}

/// When a connection last had no request in flight; its task closes it after the idle timeout.
#[derive(Debug)]
pub struct IdleClock {
    active: AtomicU32,
    idle_since_ms: AtomicU64,
    /// The idle time the upstream announced it allows (`Keep-Alive: timeout=N`), in ms;
    /// `u64::MAX` if it said nothing.
    announced_ms: AtomicU64,
    /// Set when the proxy itself gave the connection up, so its end teaches nothing about the
    /// upstream.
    retired: AtomicBool,
    /// The socket, to look for a close from the upstream before reuse. Weak: hyper's connection
    /// task owns the socket, and it closes when that task ends.
    socket: OnceLock<Weak<TcpStream>>,
}

impl IdleClock {
    /// A clock for a connection made for a request: busy.
    fn busy() -> Arc<Self> {
        Arc::new(IdleClock {
            active: AtomicU32::new(1),
            idle_since_ms: AtomicU64::new(0),
            announced_ms: AtomicU64::new(u64::MAX),
            retired: AtomicBool::new(false),
            socket: OnceLock::new(),
        })
    }

    /// How long the connection has had no request in flight; `None` while it has one.
    fn idle_for(&self) -> Option<Duration> {
        (self.active.load(Ordering::Acquire) == 0).then(|| {
            Duration::from_millis(
                now_ms().saturating_sub(self.idle_since_ms.load(Ordering::Acquire)),
            )
        })
    }

    /// The longest this connection may stay idle: the pool's idle timeout, shortened to retire
    /// it before the upstream's keep-alive timeout, announced or learned, runs out.
    fn limit(&self, idle_timeout: Duration, learned: &LearnedTimeout) -> Duration {
        let announced = match self.announced_ms.load(Ordering::Acquire) {
            u64::MAX => None,
            ms => Some(Duration::from_millis(ms)),
        };
        [announced, learned.get()]
            .into_iter()
            .flatten()
            .map(retire_before)
            .fold(idle_timeout, Duration::min)
    }

    /// Whether the upstream has closed the connection or sent bytes nobody asked for (either
    /// way it cannot take a request): a non-blocking peek at the socket. Hyper's connection task
    /// notices a close too, but only once it runs; a request handed over before that is written
    /// to a closed connection and, once written, may not be sent again.
    fn upstream_closed(&self) -> bool {
        let Some(socket) = self.socket.get().and_then(Weak::upgrade) else {
            return false;
        };
        let mut byte = [MaybeUninit::<u8>::uninit(); 1];
        // EOF, unasked-for bytes and errors all mean the connection cannot take a request.
        !matches!(
            socket2::SockRef::from(&*socket).peek(&mut byte),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }

    fn enter(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
    }

    fn leave(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since_ms.store(now_ms(), Ordering::Release);
        }
    }

    /// Resolves once the connection has been idle for its limit (see [`IdleClock::limit`]).
    async fn expired(&self, timeout: Duration, learned: &LearnedTimeout) {
        loop {
            let limit = self.limit(timeout, learned);
            let wait = match self.idle_for() {
                None => limit,
                Some(idle_for) => match limit.checked_sub(idle_for) {
                    Some(left) if !left.is_zero() => left,
                    _ => {
                        self.retired.store(true, Ordering::Release);
                        return;
                    }
                },
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A TCP stream shared with the pool, which peeks at it before reuse (see
/// [`IdleClock::upstream_closed`]).
#[derive(Debug)]
struct SharedStream(Arc<TcpStream>);

/// Zeroing hyper's whole read buffer for every read would cost more than the read.
const MAX_READ: usize = 64 * 1024;

thread_local! {
    /// Where a [`SharedStream`] reads before copying into hyper's buffer. hyper hands over its
    /// buffer uninitialised on every read, and without `unsafe` it can only be written by
    /// zeroing the whole of it first (as much as 64 KiB, most of a small exchange's cost); one
    /// scratch buffer per thread is read into without zeroing and only the bytes that came are
    /// copied.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl AsyncRead for SharedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        use bytes::BufMut;
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            let want = buf.remaining().min(MAX_READ);
            let read = SCRATCH.with_borrow_mut(|scratch| {
                scratch.clear();
                scratch.reserve(want);
                let n = self.0.try_read_buf(&mut (&mut *scratch).limit(want))?;
                buf.put_slice(&scratch[..n]);
                Ok::<_, io::Error>(n)
            });
            match read {
                Ok(_) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// What an upstream response body gives back when it ends: an HTTP/1.1 connection to its pool,
/// or an HTTP/2 stream's share of its connection's activity.
#[derive(Debug)]
pub enum PoolReturn {
    Http1 {
        pool: Arc<EndpointPool>,
        sender: http1::SendRequest<RequestBody>,
        clock: Arc<IdleClock>,
        /// False when the response said `Connection: close`.
        reusable: bool,
    },
    Http2(StreamGuard),
}

/// Counts an HTTP/2 stream as activity on its connection until dropped.
#[derive(Debug)]
pub struct StreamGuard(Arc<IdleClock>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl PoolReturn {
    pub fn release(self) {
        let PoolReturn::Http1 {
            pool,
            sender,
            clock,
            reusable,
        } = self
        else {
            return;
        };
        clock.leave();
        if !reusable {
            clock.retired.store(true, Ordering::Release);
            return;
        }
        if sender.is_closed() {
            return;
        }
        {
            let mut idle = pool.idle_h1.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() >= MAX_IDLE_PER_ENDPOINT {
                clock.retired.store(true, Ordering::Release);
                return;
            }
            idle.push((sender, clock));
        }
        pool.breakers.connection_idle();
    }
}

impl EndpointPool {
    pub fn new(address: SocketAddr, settings: PoolSettings, breakers: Arc<Breakers>) -> Self {
        EndpointPool {
            address,
            settings,
            breakers,
            idle_h1: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            learned: Arc::new(LearnedTimeout::new()),
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Mesh mTLS towards this endpoint, if it is meshed and this proxy holds an identity.
    pub fn mesh(&self) -> Option<&MeshTarget> {
        self.settings.mesh.as_ref()
    }

    /// Whether a pool built with these settings can be kept across a config update.
    pub fn same_settings(&self, settings: &PoolSettings, breakers: &Arc<Breakers>) -> bool {
        self.settings == *settings && Arc::ptr_eq(&self.breakers, breakers)
    }

    /// Sends a request and returns the response head; the body streams as it arrives.
    ///
    /// HTTP/1.1 requests must carry an origin-form URI and a `Host` header; HTTP/2 requests an
    /// absolute URI whose authority becomes `:authority`.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        match self.settings.protocol {
            UpstreamProtocol::Http1 => self.send_h1(req).await,
            UpstreamProtocol::Http2 => self.send_h2(req).await,
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        loop {
            let (mut sender, clock, reused) = match self.checkout_idle().await {
                Some((s, clock)) => (s, clock, true),
                // Boxed: connecting is rare on a warm pool, and inline it would make every
                // request's future (and hyper's per-connection slot for it) larger.
                None => match Box::pin(self.connect_h1_pooled()).await? {
                    Connected::New(s, clock) => (s, clock, false),
                    // A pooled connection came free while we waited for a slot.
                    Connected::Idle => continue,
                },
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    if let Some(timeout) = keep_alive_timeout(resp.headers()) {
                        let ms = timeout.as_millis().min(u128::from(u64::MAX - 1)) as u64;
                        clock.announced_ms.store(ms, Ordering::Release);
                    }
                    let ret = PoolReturn::Http1 {
                        pool: self.clone(),
                        reusable: !closes_connection(resp.headers()),
                        sender,
                        clock,
                    };
                    return Ok(
                        resp.map(|b| ResponseBody::Upstream(UpstreamBody::new(b, Some(ret))))
                    );
                }
                Err(mut e) => {
                    clock.leave();
                    if !reused && let Some(refused) = self.tls_refusal(e.error()) {
                        return Err(refused);
                    }
                    match e.take_message() {
                        // The pooled connection closed before any byte of the request was
                        // written: the request never reached the upstream, so it is safe to
                        // send again.
                        Some(back) if reused => req = back,
                        Some(_) => {
                            return Err(UpstreamError::NotSent(self.address, e.into_error()));
                        }
                        None => return Err(UpstreamError::Send(self.address, e.into_error())),
                    }
                }
            }
        }
    }

    async fn checkout_idle(&self) -> Option<(http1::SendRequest<RequestBody>, Arc<IdleClock>)> {
        loop {
            let (mut sender, clock) = self
                .idle_h1
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()?;
            if sender.is_closed() {
                continue;
            }
            // The connection task retires connections on time, but it may not have run yet.
            let idle_for = clock.idle_for().unwrap_or_default();
            if idle_for >= clock.limit(self.settings.idle_timeout, &self.learned) {
                clock.retired.store(true, Ordering::Release);
                continue;
            }
            if idle_for >= CHECK_AFTER_IDLE && clock.upstream_closed() {
                self.learned.observe(idle_for);
                tracing::debug!(address = %self.address, ?idle_for, "pooled connection closed by the upstream");
                continue;
            }
            clock.enter();
            if sender.ready().await.is_ok() {
                return Some((sender, clock));
            }
            clock.leave();
        }
    }

    fn has_idle(&self) -> bool {
        !self
            .idle_h1
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    async fn connect_h1_pooled(&self) -> Result<Connected, UpstreamError> {
        let slot = match self.breakers.connection(|| self.has_idle()).await {
            Ok(Some(slot)) => slot,
            Ok(None) => return Ok(Connected::Idle),
            Err(limit) => return Err(UpstreamError::Overflow(self.address, limit)),
        };
        let clock = IdleClock::busy();
        let sender = self.connect_h1_pooled_conn(slot, clock.clone()).await?;
        Ok(Connected::New(sender, clock))
    }

    async fn send_h2(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let shared = self
            .h2
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|(s, _)| !s.is_closed())
            .cloned();
        let fresh = shared.is_none();
        let (mut sender, clock) = match shared {
            Some(pair) => {
                pair.1.enter();
                pair
            }
            None => {
                let slot = Box::pin(self.breakers.connection_slot())
                    .await
                    .map_err(|limit| UpstreamError::Overflow(self.address, limit))?;
                let clock = IdleClock::busy();
                let s = Box::pin(self.connect_h2(slot, clock.clone())).await?;
                *self.h2.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((s.clone(), clock.clone()));
                (s, clock)
            }
        };
        let guard = StreamGuard(clock);
        let refused = |e: &hyper::Error| self.tls_refusal(e).filter(|_| fresh);
        sender
            .ready()
            .await
            .map_err(|e| refused(&e).unwrap_or_else(|| UpstreamError::Send(self.address, e)))?;
        let resp = sender.send_request(req).await.map_err(|e| {
            if let Some(refused) = refused(&e) {
                return refused;
            }
            // Canceled: the connection went away before the stream was opened.
            if e.is_canceled() {
                UpstreamError::NotSent(self.address, e)
            } else {
                UpstreamError::Send(self.address, e)
            }
        })?;
        Ok(resp
            .map(|b| ResponseBody::Upstream(UpstreamBody::new(b, Some(PoolReturn::Http2(guard))))))
    }

    /// The deadline of a new connection: TCP connect and TLS handshake share `connect_timeout`.
    fn connect_deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.settings.connect_timeout
    }

    async fn connect(&self, deadline: tokio::time::Instant) -> Result<TcpStream, UpstreamError> {
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(self.address))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(self.address))?
            .map_err(|e| UpstreamError::Connect(self.address, e))?;
        // Small requests and responses must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// The TLS handshake over a new connection, by the connect deadline.
    async fn handshake_tls<IO>(
        &self,
        tls: &ClientTls,
        io: IO,
        alpn: Alpn,
        deadline: tokio::time::Instant,
    ) -> Result<tokio_rustls::client::TlsStream<IO>, UpstreamError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout_at(deadline, tls.connect(io, self.address, alpn)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => {
                // Worth a warning: it is a certificate, trust or protocol mismatch far more
                // often than a passing network fault, and it fails every request until fixed.
                tracing::warn!(
                    endpoint = %self.address,
                    server_name = ?tls.server_name(self.address),
                    error = %e,
                    "TLS handshake with upstream failed"
                );
                Err(UpstreamError::Tls(self.address, e))
            }
            Err(_) => Err(UpstreamError::ConnectTimeout(self.address)),
        }
    }

    /// Mesh mTLS over a new connection, by the connect deadline.
    async fn handshake_mesh<IO>(
        &self,
        mesh: &MeshTarget,
        io: IO,
        protocol: AppProtocol,
        deadline: tokio::time::Instant,
    ) -> Result<tokio_rustls::client::TlsStream<IO>, UpstreamError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let connect = mesh.tls.connect(io, self.address, &mesh.expected, protocol);
        match tokio::time::timeout_at(deadline, connect).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(UpstreamError::Tls(
                self.address,
                io::Error::new(io::ErrorKind::InvalidData, e),
            )),
            Err(_) => Err(UpstreamError::ConnectTimeout(self.address)),
        }
    }

    /// A TLS error on a connection's first exchange: under TLS 1.3 the server judges the client's
    /// certificate after the client has finished its side of the handshake, so a refused (or
    /// missing) client certificate surfaces as an alert when the first request is sent. The
    /// server read no request under it: it is a failed handshake, counted and retried as one.
    fn tls_refusal(&self, e: &hyper::Error) -> Option<UpstreamError> {
        if self.settings.tls.is_none() && self.settings.mesh.is_none() {
            return None;
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            // Only a fatal alert from the server: a session it ended, unlike a record that went
            // bad after it may have read the request. tokio-rustls wraps the `rustls::Error` in
            // an `InvalidData` I/O error; HTTP/2 passes on only that error's kind and message.
            let tls = s
                .downcast_ref::<io::Error>()
                .filter(|io| io.kind() == io::ErrorKind::InvalidData)
                .and_then(|io| match io.get_ref().and_then(|e| e.downcast_ref()) {
                    Some(rustls::Error::AlertReceived(_)) => Some(io.to_string()),
                    Some(_) => None,
                    None => Some(io.to_string()).filter(|m| m.starts_with(ALERT_RECEIVED)),
                });
            if let Some(tls) = tls {
                tracing::warn!(endpoint = %self.address, error = %tls, "upstream refused the TLS session");
                return Some(UpstreamError::Tls(
                    self.address,
                    io::Error::new(io::ErrorKind::InvalidData, tls),
                ));
            }
            source = s.source();
        }
        None
    }

    /// A pooled HTTP/1.1 connection: its socket is shared with `clock`, so the pool can peek at
    /// it before reuse, and its task retires it when idle for too long.
    async fn connect_h1_pooled_conn(
        &self,
        slot: ConnectionSlot,
        clock: Arc<IdleClock>,
    ) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let deadline = self.connect_deadline();
        let stream = Arc::new(self.connect(deadline).await?);
        // Under TLS the peek sees records: a close_notify or unasked-for data means the
        // connection cannot take a request either.
        let _ = clock.socket.set(Arc::downgrade(&stream));
        let io = SharedStream(stream);
        match (&self.settings.tls, &self.settings.mesh) {
            (None, None) => self.serve_h1_pooled(io, slot, clock).await,
            (Some(tls), _) => {
                let io = self.handshake_tls(tls, io, Alpn::Http1, deadline).await?;
                self.serve_h1_pooled(io, slot, clock).await
            }
            (None, Some(mesh)) => {
                let io = self
                    .handshake_mesh(mesh, io, AppProtocol::Http1, deadline)
                    .await?;
                self.serve_h1_pooled(io, slot, clock).await
            }
        }
    }

    /// HTTP/1.1 over a new pooled connection, plain or TLS: generic, so the plain path keeps
    /// its own code with no dispatch per read or write.
    async fn serve_h1_pooled<IO>(
        &self,
        io: IO,
        slot: ConnectionSlot,
        clock: Arc<IdleClock>,
    ) -> Result<http1::SendRequest<RequestBody>, UpstreamError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Handshake(self.address, e))?;
        let address = self.address;
        let idle_timeout = self.settings.idle_timeout;
        let learned = self.learned.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                r = conn => {
                    // Closed while idle, and not by the proxy: the upstream's keep-alive timeout.
                    if let Some(idle_for) = clock.idle_for()
                        && !clock.retired.load(Ordering::Acquire)
                    {
                        learned.observe(idle_for);
                    }
                    if let Err(e) = r {
                        tracing::debug!(%address, error = %e, "upstream HTTP/1.1 connection ended");
                    }
                }
                _ = clock.expired(idle_timeout, &learned) => {
                    tracing::debug!(%address, "idle upstream connection closed");
                }
            }
        });
        Ok(sender)
    }

    /// Opens an HTTP/1.1 connection for an upgrade; it is never pooled.
    async fn connect_h1_upgrade(
        &self,
        slot: ConnectionSlot,
    ) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let deadline = self.connect_deadline();
        let stream = self.connect(deadline).await?;
        match (&self.settings.tls, &self.settings.mesh) {
            (None, None) => self.serve_h1_upgrade(stream, slot).await,
            (Some(tls), _) => {
                let io = self
                    .handshake_tls(tls, stream, Alpn::Http1, deadline)
                    .await?;
                self.serve_h1_upgrade(io, slot).await
            }
            (None, Some(mesh)) => {
                let io = self
                    .handshake_mesh(mesh, stream, AppProtocol::Http1, deadline)
                    .await?;
                self.serve_h1_upgrade(io, slot).await
            }
        }
    }

    async fn serve_h1_upgrade<IO>(
        &self,
        io: IO,
        slot: ConnectionSlot,
    ) -> Result<http1::SendRequest<RequestBody>, UpstreamError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Handshake(self.address, e))?;
        let address = self.address;
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%address, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn connect_h2(
        &self,
        slot: ConnectionSlot,
        clock: Arc<IdleClock>,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let deadline = self.connect_deadline();
        let stream = self.connect(deadline).await?;
        match (&self.settings.tls, &self.settings.mesh) {
            (None, None) => self.serve_h2(stream, slot, clock).await,
            (Some(tls), _) => {
                let io = self
                    .handshake_tls(tls, stream, Alpn::Http2, deadline)
                    .await?;
                self.serve_h2(io, slot, clock).await
            }
            (None, Some(mesh)) => {
                let io = self
                    .handshake_mesh(mesh, stream, AppProtocol::Http2, deadline)
                    .await?;
                self.serve_h2(io, slot, clock).await
            }
        }
    }

    async fn serve_h2<IO>(
        &self,
        io: IO,
        slot: ConnectionSlot,
        clock: Arc<IdleClock>,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Handshake(self.address, e))?;
        let address = self.address;
        let idle_timeout = self.settings.idle_timeout;
        let learned = self.learned.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%address, error = %e, "upstream HTTP/2 connection ended");
                },
                _ = clock.expired(idle_timeout, &learned) => {
                    tracing::debug!(%address, "idle upstream connection closed");
                }
            }
        });
        Ok(sender)
    }

    /// Sends an HTTP/1.1 upgrade request (WebSocket) on a connection of its own, which is never
    /// pooled: after a `101` it belongs to the tunnel.
    pub async fn send_upgrade(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let slot = self
            .breakers
            .connection_slot()
            .await
            .map_err(|limit| UpstreamError::Overflow(self.address, limit))?;
        let mut sender = self.connect_h1_upgrade(slot).await?;
        sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Send(self.address, e))
    }
}

enum Connected {
    New(http1::SendRequest<RequestBody>, Arc<IdleClock>),
    /// No new connection: a pooled one is free.
    Idle,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn reads_the_upstreams_keep_alive_word() {
        let t = |v| keep_alive_timeout(&headers(&[("keep-alive", v)]));
        assert_eq!(t("timeout=5, max=100"), Some(Duration::from_secs(5)));
        assert_eq!(t("max=100, Timeout = 2"), Some(Duration::from_secs(2)));
        assert_eq!(t("max=100"), None);
        assert_eq!(t("timeout=soon"), None);
        assert!(closes_connection(&headers(&[(
            "connection",
            "keep-alive, Close"
        )])));
        assert!(!closes_connection(&headers(&[(
            "connection",
            "keep-alive"
        )])));
    }

    #[test]
    fn retires_ahead_of_the_upstreams_timeout() {
        assert_eq!(
            retire_before(Duration::from_secs(1)),
            Duration::from_millis(750)
        );
        assert_eq!(
            retire_before(Duration::from_secs(5)),
            Duration::from_secs(4)
        );
        assert_eq!(
            retire_before(Duration::from_secs(75)),
            Duration::from_secs(74)
        );
        let clock = IdleClock::busy();
        let learned = LearnedTimeout::new();
        assert_eq!(
            clock.limit(Duration::from_secs(4), &learned),
            Duration::from_secs(4)
        );
        clock.announced_ms.store(2000, Ordering::Release);
        assert_eq!(
            clock.limit(Duration::from_secs(4), &learned),
            Duration::from_millis(1500)
        );
        learned.observe(Duration::from_millis(300));
        assert_eq!(
            clock.limit(Duration::from_secs(4), &learned),
            Duration::from_millis(225)
        );
        learned.observe(Duration::from_millis(10));
        assert_eq!(
            learned.get(),
            Some(Duration::from_millis(300)),
            "a close right after a response is not a keep-alive timeout"
        );
    }

    /// An HTTP/2 connection passes on a TLS alert as text: if rustls words it otherwise, a
    /// refused client certificate would read as a reset.
    #[test]
    fn rustls_words_a_fatal_alert_as_expected() {
        let e = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        assert!(e.to_string().starts_with(ALERT_RECEIVED), "{e}");
    }

    /// The peek sees the upstream's close as soon as the FIN has arrived, whether or not anyone
    /// has read the socket.
    #[tokio::test]
    async fn a_peek_sees_the_upstream_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = Arc::new(
            TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap(),
        );
        let (server, _) = listener.accept().await.unwrap();
        let clock = IdleClock::busy();
        assert!(!clock.upstream_closed(), "no socket yet: nothing to see");
        clock.socket.set(Arc::downgrade(&stream)).unwrap();
        assert!(!clock.upstream_closed(), "open and quiet");
        drop(server);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !clock.upstream_closed() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "close not seen within 5s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
