//! A scripted discovery server in process: the test decides every response and reads every
//! request (subscriptions, ACKs, NACKs) the proxy's control-plane client sends.

use std::{pin::Pin, sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::discovery::v1::{
    self as api, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    aggregated_discovery_server::{AggregatedDiscovery, AggregatedDiscoveryServer},
    resource::Kind,
};
use trellis_proxy::{
    Proxy,
    config::{
        bootstrap::File,
        xds::{Client, XdsSettings},
    },
};

pub type Responses = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;
pub type NewStream = (mpsc::Receiver<DeltaDiscoveryRequest>, Responses);

/// Each new stream hands the test its request receiver and a response sender.
struct Scripted {
    streams: mpsc::Sender<NewStream>,
}

#[tonic::async_trait]
impl AggregatedDiscovery for Scripted {
    type DeltaResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

    async fn delta_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let (req_tx, req_rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(Ok(r)) = inbound.next().await {
                if req_tx.send(r).await.is_err() {
                    return;
                }
            }
        });
        let (resp_tx, resp_rx) = mpsc::channel(64);
        self.streams.send((req_rx, resp_tx)).await.unwrap();
        Ok(Response::new(Box::pin(ReceiverStream::new(resp_rx))))
    }
}

/// A proxy following a scripted control plane.
pub struct Harness {
    pub proxy: Arc<Proxy>,
    pub streams: mpsc::Receiver<NewStream>,
    pub requests: mpsc::Receiver<DeltaDiscoveryRequest>,
    pub responses: Responses,
    nonce: u32,
    settle: bool,
    _static: watch::Sender<Arc<File>>,
}

impl Harness {
    /// A sidecar proxy with an empty bootstrap file, connected.
    pub async fn start() -> Harness {
        Harness::start_with(File::default()).await
    }

    /// A sidecar proxy serving `static_part` (a bootstrap file's own resources) beside the
    /// control plane's.
    pub async fn start_with(static_part: File) -> Harness {
        Harness::start_client(static_part, api::Role::Sidecar, |c| c).await
    }

    /// A proxy with `role` (a gateway serves Gateway "gw") and a client `edit` sets up.
    pub async fn start_client(
        static_part: File,
        role: api::Role,
        edit: impl FnOnce(Client) -> Client,
    ) -> Harness {
        let (streams_tx, mut streams) = mpsc::channel(4);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServer::new(Scripted {
                    streams: streams_tx,
                }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let proxy = Proxy::new();
        let settings = XdsSettings {
            address: addr.to_string(),
            node: api::Node {
                id: "test-proxy".into(),
                role: role as i32,
                namespace: "default".into(),
                gateway_name: if role == api::Role::Gateway {
                    "gw".into()
                } else {
                    String::new()
                },
                ..Default::default()
            },
            ..Default::default()
        };
        let (static_tx, static_rx) = watch::channel(Arc::new(static_part));
        tokio::spawn(edit(Client::new(proxy.clone(), settings, static_rx)).run());
        let (requests, responses) = tokio::time::timeout(Duration::from_secs(5), streams.recv())
            .await
            .expect("the proxy connects")
            .unwrap();
        Harness {
            proxy,
            streams,
            requests,
            responses,
            nonce: 0,
            settle: false,
            _static: static_tx,
        }
    }

    /// After each ACK or NACK, [`send`](Self::send) also collects the requests the proxy queues
    /// within 50 ms (subscription changes follow an ACK at once), so the next read starts clean.
    pub fn settling(mut self) -> Self {
        self.settle = true;
        self
    }

    pub async fn next_request(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(Duration::from_secs(5), self.requests.recv())
            .await
            .expect("a request within 5s")
            .expect("stream open")
    }

    /// The first request of each of `types` on the current stream, in any order; other
    /// requests before them are dropped.
    pub async fn subscriptions(&mut self, types: &[&str]) -> Vec<DeltaDiscoveryRequest> {
        let mut out: Vec<DeltaDiscoveryRequest> = Vec::new();
        while out.len() < types.len() {
            let r = self.next_request().await;
            if types.contains(&r.type_url.as_str()) && !out.iter().any(|o| o.type_url == r.type_url)
            {
                out.push(r);
            }
        }
        out
    }

    /// Drops the stream, as a control plane restarting does, and waits for the proxy to open a
    /// new one.
    pub async fn reconnect(&mut self) {
        let (closed, _) = mpsc::channel(1);
        self.responses = closed;
        let (requests, responses) =
            tokio::time::timeout(Duration::from_secs(10), self.streams.recv())
                .await
                .expect("the proxy reconnects")
                .unwrap();
        self.requests = requests;
        self.responses = responses;
    }

    /// Sends a response and returns the proxy's ACK/NACK for it, with the other requests sent
    /// meanwhile (subscription changes).
    pub async fn send(
        &mut self,
        type_url: &str,
        resources: Vec<api::Resource>,
        removed: Vec<String>,
    ) -> (DeltaDiscoveryRequest, Vec<DeltaDiscoveryRequest>) {
        self.nonce += 1;
        let nonce = format!("n{}", self.nonce);
        self.responses
            .send(Ok(DeltaDiscoveryResponse {
                type_url: type_url.into(),
                resources,
                removed_resources: removed,
                nonce: nonce.clone(),
                system_version_info: String::new(),
            }))
            .await
            .unwrap();
        let mut others = Vec::new();
        loop {
            let r = self.next_request().await;
            if r.response_nonce == nonce {
                assert_eq!(r.type_url, type_url);
                while self.settle
                    && let Ok(Some(more)) =
                        tokio::time::timeout(Duration::from_millis(50), self.requests.recv()).await
                {
                    others.push(more);
                }
                return (r, others);
            }
            others.push(r);
        }
    }
}

pub fn resource(name: &str, version: &str, kind: Kind) -> api::Resource {
    api::Resource {
        name: name.into(),
        version: version.into(),
        kind: Some(kind),
    }
}
