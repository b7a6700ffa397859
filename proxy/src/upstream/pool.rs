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
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use http::{Request, Response};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

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
}

#[derive(Debug)]
pub struct EndpointPool {
    address: SocketAddr,
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    idle_h1: Mutex<Vec<http1::SendRequest<RequestBody>>>,
    h2: Mutex<Option<http2::SendRequest<RequestBody>>>,
}

/// Hands an HTTP/1.1 connection back to its pool once its response has been read to the end.
#[derive(Debug)]
pub struct PoolReturn {
    pool: Arc<EndpointPool>,
    sender: http1::SendRequest<RequestBody>,
}

impl PoolReturn {
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self
            .pool
            .idle_h1
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push(self.sender);
        }
    }
}

impl EndpointPool {
    pub fn new(address: SocketAddr, protocol: UpstreamProtocol, connect_timeout: Duration) -> Self {
        EndpointPool {
            address,
            protocol,
            connect_timeout,
            idle_h1: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Whether a pool built with these settings can be kept across a config update.
    pub fn same_settings(&self, protocol: UpstreamProtocol, connect_timeout: Duration) -> bool {
        self.protocol == protocol && self.connect_timeout == connect_timeout
    }

    /// Sends a request and returns the response head; the body streams as it arrives.
    ///
    /// HTTP/1.1 requests must carry an origin-form URI and a `Host` header; HTTP/2 requests an
    /// absolute URI whose authority becomes `:authority`.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        match self.protocol {
            UpstreamProtocol::Http1 => self.send_h1(req).await,
            UpstreamProtocol::Http2 => self.send_h2(req).await,
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        loop {
            let (mut sender, reused) = match self.checkout_idle().await {
                Some(s) => (s, true),
                None => (self.connect_h1(false).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let ret = PoolReturn {
                        pool: self.clone(),
                        sender,
                    };
                    return Ok(
                        resp.map(|b| ResponseBody::Upstream(UpstreamBody::new(b, Some(ret))))
                    );
                }
                Err(mut e) => match e.take_message() {
                    // The pooled connection closed before any byte of the request was written:
                    // the request never reached the upstream, so it is safe to send again.
                    Some(back) if reused => req = back,
                    _ => return Err(UpstreamError::Send(self.address, e.into_error())),
                },
            }
        }
    }

    async fn checkout_idle(&self) -> Option<http1::SendRequest<RequestBody>> {
        loop {
            let mut sender = self
                .idle_h1
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()?;
            if sender.is_closed() {
                continue;
            }
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
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
            .filter(|s| !s.is_closed())
            .cloned();
        let mut sender = match shared {
            Some(s) => s,
            None => {
                let s = self.connect_h2().await?;
                *self.h2.lock().unwrap_or_else(PoisonError::into_inner) = Some(s.clone());
                s
            }
        };
        sender
            .ready()
            .await
            .map_err(|e| UpstreamError::Send(self.address, e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Send(self.address, e))?;
        Ok(resp.map(|b| ResponseBody::Upstream(UpstreamBody::new(b, None))))
    }

    async fn connect(&self) -> Result<TokioIo<TcpStream>, UpstreamError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.address))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(self.address))?
            .map_err(|e| UpstreamError::Connect(self.address, e))?;
        // Small requests and responses must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }

    async fn connect_h1(
        &self,
        upgrades: bool,
    ) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Handshake(self.address, e))?;
        let address = self.address;
        tokio::spawn(async move {
            let result = if upgrades {
                conn.with_upgrades().await
            } else {
                conn.await
            };
            if let Err(e) = result {
                tracing::debug!(%address, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn connect_h2(&self) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Handshake(self.address, e))?;
        let address = self.address;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%address, error = %e, "upstream HTTP/2 connection ended");
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
        let mut sender = self.connect_h1(true).await?;
        sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Send(self.address, e))
    }
}
