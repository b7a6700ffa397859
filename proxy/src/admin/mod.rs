//! The admin server: health, metrics and introspection for operators, on its own port (by default
//! 127.0.0.1:15000). It exposes the running config and can drain the proxy, so it refuses a
//! non-loopback address unless the operator opts in.
//!
//! | path | what |
//! | --- | --- |
//! | `GET /ready` | 200 once the first config is applied, every listener it holds is bound and serving, and (with `--identity-token-file`) the first workload certificate has arrived; 503 otherwise (naming what it waits for), and from a drain on |
//! | `GET /live` | 200 while the process serves |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /config_dump` | the configuration in force, with its version, secrets redacted (JSON) |
//! | `GET /clusters` | clusters and endpoints with health, ejection, active requests, weights (JSON) |
//! | `POST /drain` | readiness off, listeners close, HTTP connections shut down gracefully (in-flight requests finish); the process keeps running |
//!
//! Every request must name a loopback `Host` (421 otherwise), so a DNS-rebound page cannot reach
//! it; every non-GET must carry `x-trellis-admin: 1` and no sign of a cross-origin browser request
//! (403 otherwise).

pub mod dump;
pub mod lifecycle;

use std::{convert::Infallible, io, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};

pub use lifecycle::Lifecycle;

use crate::{Proxy, listener::fds, telemetry};

/// Tops up the descriptor reserve when dropped (at the end of an admin connection).
struct RefillOnDrop;

impl Drop for RefillOnDrop {
    fn drop(&mut self) {
        fds::fill_reserve();
    }
}

pub const DEFAULT_ADDRESS: &str = "127.0.0.1:15000";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "admin address {address} is not a loopback address; the admin API can drain the proxy and \
         shows its config, so pass --admin-allow-remote to serve it beyond this host"
    )]
    NotLoopback { address: SocketAddr },
    #[error("cannot bind the admin address {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Binds the admin address; a non-loopback one only with `allow_remote`.
pub async fn bind(address: SocketAddr, allow_remote: bool) -> Result<TcpListener, AdminError> {
    if !address.ip().is_loopback() && !allow_remote {
        return Err(AdminError::NotLoopback { address });
    }
    TcpListener::bind(address)
        .await
        .map_err(|source| AdminError::Bind { address, source })
}

/// What the admin handlers read and act on.
#[derive(Debug, Clone)]
pub struct Admin {
    pub proxy: Arc<Proxy>,
    pub lifecycle: Arc<Lifecycle>,
}

impl Admin {
    pub fn new(proxy: Arc<Proxy>, lifecycle: Arc<Lifecycle>) -> Self {
        Admin { proxy, lifecycle }
    }

    /// Serves admin requests on `listener` until the task is aborted.
    pub fn spawn(self, listener: TcpListener) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    // Out of descriptors: give one of the reserve back and accept again at once,
                    // so operators can still see why.
                    Err(e) if fds::is_exhaustion(&e) && fds::release_one() => {
                        tracing::warn!(error = %e, "admin accept: out of file descriptors; using the reserve");
                        continue;
                    }
                    Err(e) => {
                        // Back off instead of spinning.
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        fds::fill_reserve();
                        continue;
                    }
                };
                let admin = self.clone();
                tokio::spawn(async move {
                    // Once this connection ends its descriptor may return to the reserve.
                    let _refill = RefillOnDrop;
                    let svc = service_fn(move |req| {
                        let admin = admin.clone();
                        async move { Ok::<_, Infallible>(admin.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
    }

    /// Ready: the lifecycle's conditions, and with a workload identity its first certificate
    /// (a sidecar without one can neither originate nor accept mesh mTLS).
    fn is_ready(&self) -> bool {
        self.lifecycle.is_ready(self.proxy.store()) && self.has_certificate()
    }

    fn has_certificate(&self) -> bool {
        self.proxy
            .identity()
            .is_none_or(|identity| identity.borrow().is_some())
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if let Err(reason) = check_host(&req) {
            return text(StatusCode::MISDIRECTED_REQUEST, reason);
        }
        if !matches!(*req.method(), Method::GET | Method::HEAD)
            && let Err(reason) = check_state_change(&req)
        {
            return text(StatusCode::FORBIDDEN, reason);
        }
        let store = self.proxy.store();
        let get = matches!(*req.method(), Method::GET | Method::HEAD);
        match (req.uri().path(), get, req.method() == Method::POST) {
            ("/ready", true, _) => {
                if self.is_ready() {
                    text(StatusCode::OK, "ready\n")
                } else if self.lifecycle.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if !self.has_certificate() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "waiting for the workload certificate\n",
                    )
                } else if store.load().is_none() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "no configuration yet\n")
                } else {
                    let mut body = store.not_serving().join("\n");
                    body.push('\n');
                    let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, "");
                    *resp.body_mut() = Full::new(Bytes::from(body));
                    resp
                }
            }
            ("/live", true, _) => text(StatusCode::OK, "live\n"),
            ("/metrics", true, _) => {
                let ready = self.is_ready();
                let body = telemetry::render(store.load().as_deref(), ready);
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            ("/config_dump", true, _) => match store.load() {
                Some(c) => json(&dump::config_dump(&c)),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "no configuration yet\n"),
            },
            ("/clusters", true, _) => match store.load() {
                Some(c) => json(&dump::clusters(&c)),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "no configuration yet\n"),
            },
            ("/drain", _, true) => {
                self.lifecycle.start_drain();
                if self.proxy.drain().await {
                    tracing::info!(
                        "drain requested: readiness off, listeners closed, connections closing"
                    );
                }
                text(StatusCode::OK, "draining\n")
            }
            ("/ready" | "/live" | "/metrics" | "/config_dump" | "/clusters" | "/drain", _, _) => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /ready /live /metrics /config_dump /clusters, POST /drain\n",
            ),
        }
    }
}

/// The header a state-changing call must carry. A browser cannot add it to a cross-origin request
/// without a CORS preflight, which this server never approves.
pub const ADMIN_HEADER: &str = "x-trellis-admin";

/// Serves only loopback `Host` values: a page on a rebound DNS name reaches this port with its own
/// name as Host, and is refused before it can read the config or drain the proxy.
fn check_host<B>(req: &Request<B>) -> Result<(), &'static str> {
    const REASON: &str = "misdirected request: the admin API answers only loopback Host values (127.0.0.1, localhost, [::1])\n";
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts
        .next()
        .map(|h| h.to_str().map_err(|_| REASON))
        .transpose()?;
    if hosts.next().is_some() {
        return Err(REASON);
    }
    let authority = req.uri().authority().map(|a| a.as_str());
    for h in host.into_iter().chain(authority) {
        if !is_loopback_host(h) {
            return Err(REASON);
        }
    }
    Ok(())
}

fn is_loopback_host(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let (name, port) = match host.strip_prefix("[::1]") {
        Some(rest) => ("[::1]", rest),
        None => match host.rfind(':') {
            Some(i) => (&host[..i], &host[i..]),
            None => (host.as_str(), ""),
        },
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
        });
    port_ok && matches!(name, "127.0.0.1" | "localhost" | "[::1]")
}

/// A state-changing call must carry `x-trellis-admin: 1` and nothing that marks it as a browser's
/// cross-origin request: an `Origin`, a `Sec-Fetch-Site` other than same-origin/none, or a form
/// content type (the kinds a page may send without a preflight).
fn check_state_change<B>(req: &Request<B>) -> Result<(), &'static str> {
    let h = req.headers();
    if h.get(ADMIN_HEADER).map(|v| v.as_bytes()) != Some(b"1") {
        return Err("forbidden: a state-changing admin call needs the header x-trellis-admin: 1\n");
    }
    if h.contains_key(header::ORIGIN) {
        return Err("forbidden: a browser request (it carries Origin) cannot change admin state\n");
    }
    if let Some(site) = h.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return Err(
            "forbidden: a cross-site browser request (Sec-Fetch-Site) cannot change admin state\n",
        );
    }
    if let Some(ct) = h.get(header::CONTENT_TYPE) {
        let ct = String::from_utf8_lossy(ct.as_bytes()).to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if matches!(
            essence,
            "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain"
        ) {
            return Err(
                "forbidden: a form content type (what a browser form sends) cannot change admin state\n",
            );
        }
    }
    Ok(())
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}
