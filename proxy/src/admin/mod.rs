//! The admin server: health, metrics and introspection for operators, on its own port (by default
//! 127.0.0.1:15000). It exposes the running config and can drain the proxy, so it refuses a
//! non-loopback address unless the operator opts in.
//!
//! | path | what |
//! | --- | --- |
//! | `GET /ready` | 200 once the first config is applied and every listener it holds is bound and serving; 503 otherwise (naming each listener that does not serve), and from a drain on |
//! | `GET /live` | 200 while the process serves |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /config_dump` | the configuration in force, with its version, secrets redacted (JSON) |
//! | `GET /clusters` | clusters and endpoints with health, ejection, active requests, weights (JSON) |
//! | `POST /drain` | readiness off, listeners close, HTTP connections shut down gracefully (in-flight requests finish); the process keeps running |

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

use crate::{Proxy, telemetry};

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
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let admin = self.clone();
                tokio::spawn(async move {
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

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let store = self.proxy.store();
        let get = matches!(*req.method(), Method::GET | Method::HEAD);
        match (req.uri().path(), get, req.method() == Method::POST) {
            ("/ready", true, _) => {
                if self.lifecycle.is_ready(store) {
                    text(StatusCode::OK, "ready\n")
                } else if self.lifecycle.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
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
                let ready = self.lifecycle.is_ready(store);
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
