//! The discovery gRPC service: one task per proxy stream. Whenever the catalog changes (a `watch`
//! channel fans changes out) each task takes its node class's translation ([`Translations`],
//! computed once per class) and lets [`delta::DeltaState`] decide what to send.

pub mod delta;
mod shared;
pub mod tls;

pub use shared::Translations;

use std::{net::SocketAddr, sync::Arc, time::Duration, time::SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::discovery::v1::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    aggregated_discovery_server::{AggregatedDiscovery, AggregatedDiscoveryServer},
};

use crate::{
    catalog::Catalog,
    status::{ProxyStatus, Registry, StreamGuard, unix_ms},
    translate::{self, NodeInfo},
};
use delta::{DeltaState, Outcome};

/// Responses a stream may queue before its task waits for the proxy to read.
const STREAM_BUFFER: usize = 16;
/// After a stop, how long connections get to close once their streams were ended; past it they
/// are dropped, so a proxy that never closes cannot hold the process up.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct DiscoveryService {
    catalog: watch::Receiver<Arc<Catalog>>,
    registry: Arc<Registry>,
    /// Set once to end every open stream from the server side.
    stopping: watch::Sender<bool>,
    /// One translation per class of node and catalog, shared by the streams.
    translations: Arc<Translations>,
}

impl DiscoveryService {
    pub fn new(catalog: watch::Receiver<Arc<Catalog>>, registry: Arc<Registry>) -> Self {
        DiscoveryService {
            catalog,
            registry,
            stopping: watch::Sender::new(false),
            translations: Arc::default(),
        }
    }

    /// Ends every open stream (with `UNAVAILABLE`, which proxies reconnect on) and refuses new
    /// ones; what `serve` does when its shutdown future completes.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    pub fn into_server(self) -> AggregatedDiscoveryServer<Self> {
        AggregatedDiscoveryServer::new(self)
    }
}

#[tonic::async_trait]
impl AggregatedDiscovery for DiscoveryService {
    type DeltaResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaResourcesStream>, Status> {
        let peer = request.remote_addr();
        let stopping = self.stopping.subscribe();
        if *stopping.borrow() {
            return Err(Status::unavailable(SHUTTING_DOWN));
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(run_stream(
            request.into_inner(),
            tx,
            self.catalog.clone(),
            self.registry.clone(),
            self.translations.clone(),
            peer,
            stopping,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

type Tx = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

const SHUTTING_DOWN: &str = "the controller is shutting down; reconnect";

async fn run_stream(
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: Tx,
    mut catalog: watch::Receiver<Arc<Catalog>>,
    registry: Arc<Registry>,
    translations: Arc<Translations>,
    peer: Option<SocketAddr>,
    mut stopping: watch::Receiver<bool>,
) {
    let first = tokio::select! {
        first = inbound.message() => first,
        _ = stopping.wait_for(|s| *s) => {
            let _ = tx.try_send(Err(Status::unavailable(SHUTTING_DOWN)));
            return;
        }
    };
    let first = match first {
        Ok(Some(first)) => first,
        Ok(None) | Err(_) => return,
    };
    let node = match first.node.as_ref().map(NodeInfo::try_from) {
        Some(Ok(node)) => node,
        Some(Err(e)) => {
            let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
            return;
        }
        None => {
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "the first request must carry `node`",
                )))
                .await;
            return;
        }
    };
    tracing::info!(
        node = node.id,
        role = node.role.as_str(),
        ?peer,
        "proxy connected"
    );
    let guard = registry.register(ProxyStatus {
        node_id: node.id.clone(),
        role: node.role.as_str().to_owned(),
        namespace: node.namespace.clone(),
        gateway: node.gateway.as_ref().map(ToString::to_string),
        connected_since_unix_ms: unix_ms(SystemTime::now()),
        ..ProxyStatus::default()
    });

    let current = catalog.borrow_and_update().clone();
    let mut snapshot = translations.get(&current, &node).await;
    report_node_problems(&guard, &current, &node, true);
    let mut state = DeltaState::default();
    let mut next = Some(first);
    loop {
        if let Some(req) = next.take() {
            match state.on_request(&req, &snapshot, SystemTime::now()) {
                Outcome::Nack => tracing::warn!(
                    node = node.id,
                    type_url = req.type_url,
                    nonce = req.response_nonce,
                    reason = req.error_detail.as_ref().map(|e| e.message.as_str()),
                    "proxy rejected an update"
                ),
                Outcome::Stale => tracing::debug!(
                    node = node.id,
                    type_url = req.type_url,
                    nonce = req.response_nonce,
                    "stale nonce ignored"
                ),
                Outcome::UnknownType => tracing::debug!(
                    node = node.id,
                    type_url = req.type_url,
                    "request for a type not served; ignored"
                ),
                Outcome::Ack | Outcome::Subscribed => {}
            }
        }
        for response in state.next_responses(&snapshot) {
            tracing::debug!(
                node = node.id,
                type_url = response.type_url,
                nonce = response.nonce,
                resources = response.resources.len(),
                removed = response.removed_resources.len(),
                "sending"
            );
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
        }
        guard.update(state.status());

        // Outside the `select!`: its other futures (one borrows the stop flag) live until it
        // ends, and must not be held across the translation's await.
        let mut retranslate = false;
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(req)) => next = Some(req),
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(node = node.id, %status, "stream error");
                    break;
                }
            },
            changed = catalog.changed() => {
                if changed.is_err() {
                    break;
                }
                retranslate = true;
            }
            () = tx.closed() => break,
            _ = stopping.wait_for(|s| *s) => {
                // Ending the response stream is what lets the server's graceful shutdown
                // finish: it waits for every open stream.
                let _ = tx.try_send(Err(Status::unavailable(SHUTTING_DOWN)));
                tracing::info!(node = node.id, "stream ended: shutting down");
                return;
            }
        }
        if retranslate {
            let current = catalog.borrow_and_update().clone();
            snapshot = translations.get(&current, &node).await;
            report_node_problems(&guard, &current, &node, false);
        }
    }
    tracing::info!(node = node.id, "proxy disconnected");
}

/// Puts the proxy's own problems (e.g. its Gateway does not exist) in its status entry, and
/// logs them when the proxy connects and whenever they change.
fn report_node_problems(
    guard: &StreamGuard<'_>,
    catalog: &Catalog,
    node: &NodeInfo,
    connecting: bool,
) {
    let problems = translate::node_diagnostics(catalog, node);
    let changed = guard.set_problems(&problems);
    if !(changed || connecting) {
        return;
    }
    for d in &problems {
        tracing::warn!(
            node = node.id,
            condition = d.condition,
            reason = d.reason,
            message = d.message,
            "proxy cannot be configured"
        );
    }
    if problems.is_empty() && changed {
        tracing::info!(node = node.id, "proxy configuration problem resolved");
    }
}

/// Serves the discovery service on `listener` until `shutdown` completes; then ends every open
/// stream and returns once their connections closed, or after [`STOP_GRACE`] at the latest.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: DiscoveryService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    serve_with_identity(listener, service, None, shutdown).await
}

/// [`serve`], with the mesh identity service (`trellis.identity.v1.Identity`) on the same port
/// when the controller runs a CA.
pub async fn serve_with_identity(
    listener: tokio::net::TcpListener,
    service: DiscoveryService,
    identity: Option<crate::identity::IdentityService>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    serve_secured(listener, service, identity, None, shutdown).await
}

/// [`serve_with_identity`], over TLS when `tls` is given: discovery and identity share the port
/// and its TLS (proxies send their tokens there).
pub async fn serve_secured(
    listener: tokio::net::TcpListener,
    service: DiscoveryService,
    identity: Option<crate::identity::IdentityService>,
    tls: Option<tls::DiscoveryTls>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    match tls {
        None => {
            // Without TCP_NODELAY each unary response (a Certify answer) waited for the
            // client's delayed ACK: ~40 ms per certificate.
            let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |s| {
                s.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            });
            serve_incoming(incoming, service, identity, shutdown).await
        }
        Some(tls) => {
            let incoming = ReceiverStream::new(tls.incoming(listener));
            serve_incoming(incoming, service, identity, shutdown).await
        }
    }
}

async fn serve_incoming<IO, IE>(
    incoming: impl tokio_stream::Stream<Item = Result<IO, IE>>,
    service: DiscoveryService,
    identity: Option<crate::identity::IdentityService>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stopper = service.clone();
    let mut stopped = service.stopping.subscribe();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("stopping: ending every discovery stream");
        stopper.stop();
    };
    let server = tonic::transport::Server::builder()
        .add_service(service.into_server())
        .add_optional_service(identity.map(|i| i.into_server()))
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        _ = stopped.wait_for(|s| *s) => {}
    }
    match tokio::time::timeout(STOP_GRACE, &mut server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                grace = ?STOP_GRACE,
                "connections still open after their streams were ended; closing them"
            );
            Ok(())
        }
    }
}
