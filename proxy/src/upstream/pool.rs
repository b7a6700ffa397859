//! Connections to one endpoint: a stack of idle HTTP/1.1 connections, or one shared HTTP/2
//! connection that carries many streams.
//!
//! We keep our own pool rather than hyper-util's legacy client because the proxy picks the
//! endpoint itself (the legacy client pools by URI authority and would connect to the `Host`), and
//! because it lets a request that never reached a stale pooled connection be sent again on a fresh
//! one.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use http::{Request, Response};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{
    breaker::{Breakers, ConnectionSlot, Limit},
    endpoint::now_ms,
};
use crate::{
    config::model::UpstreamProtocol,
    http::body::{RequestBody, ResponseBody, UpstreamBody},
};

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when released.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, #[source] io::Error),
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

#[derive(Debug)]
pub struct EndpointPool {
    address: SocketAddr,
    settings: PoolSettings,
    breakers: Arc<Breakers>,
    idle_h1: Mutex<Vec<(http1::SendRequest<RequestBody>, Arc<IdleClock>)>>,
    h2: Mutex<Option<(http2::SendRequest<RequestBody>, Arc<IdleClock>)>>,
}

/// When a connection last had no request in flight; its task closes it after the idle timeout.
#[derive(Debug)]
pub struct IdleClock {
    active: AtomicU32,
    idle_since_ms: AtomicU64,
}

impl IdleClock {
    /// A clock for a connection made for a request: busy.
    fn busy() -> Arc<Self> {
        Arc::new(IdleClock {
            active: AtomicU32::new(1),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    fn enter(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
    }

    fn leave(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since_ms.store(now_ms(), Ordering::Release);
        }
    }

    /// Resolves once the connection has been idle for `timeout`.
    async fn expired(&self, timeout: Duration) {
        loop {
            let wait = if self.active.load(Ordering::Acquire) > 0 {
                timeout
            } else {
                let idle_for = Duration::from_millis(
                    now_ms().saturating_sub(self.idle_since_ms.load(Ordering::Acquire)),
                );
                match timeout.checked_sub(idle_for) {
                    Some(left) if !left.is_zero() => left,
                    _ => return,
                }
            };
            tokio::time::sleep(wait).await;
        }
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
        } = self
        else {
            return;
        };
        clock.leave();
        if sender.is_closed() {
            return;
        }
        {
            let mut idle = pool.idle_h1.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() >= MAX_IDLE_PER_ENDPOINT {
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
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
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
                    let ret = PoolReturn::Http1 {
                        pool: self.clone(),
                        sender,
                        clock,
                    };
                    return Ok(
                        resp.map(|b| ResponseBody::Upstream(UpstreamBody::new(b, Some(ret))))
                    );
                }
                Err(mut e) => {
                    clock.leave();
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
        let sender = self.connect_h1(false, slot, Some(clock.clone())).await?;
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
        sender
            .ready()
            .await
            .map_err(|e| UpstreamError::Send(self.address, e))?;
        let resp = sender.send_request(req).await.map_err(|e| {
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

    async fn connect(&self) -> Result<TokioIo<TcpStream>, UpstreamError> {
        let stream = tokio::time::timeout(
            self.settings.connect_timeout,
            TcpStream::connect(self.address),
        )
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(self.address))?
        .map_err(|e| UpstreamError::Connect(self.address, e))?;
        // Small requests and responses must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }

    /// Opens an HTTP/1.1 connection; with a clock, it closes after the idle timeout.
    async fn connect_h1(
        &self,
        upgrades: bool,
        slot: ConnectionSlot,
        clock: Option<Arc<IdleClock>>,
    ) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Handshake(self.address, e))?;
        let address = self.address;
        let idle_timeout = self.settings.idle_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let result = match (upgrades, clock) {
                (true, _) => conn.with_upgrades().await,
                (false, None) => conn.await,
                (false, Some(clock)) => tokio::select! {
                    r = conn => r,
                    _ = clock.expired(idle_timeout) => {
                        tracing::debug!(%address, "idle upstream connection closed");
                        Ok(())
                    }
                },
            };
            if let Err(e) = result {
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
        let io = self.connect().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Handshake(self.address, e))?;
        let address = self.address;
        let idle_timeout = self.settings.idle_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%address, error = %e, "upstream HTTP/2 connection ended");
                },
                _ = clock.expired(idle_timeout) => {
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
        let mut sender = self.connect_h1(true, slot, None).await?;
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
