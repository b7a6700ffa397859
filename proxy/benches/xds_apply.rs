//! How long a proxy holding many clusters takes to apply one endpoint change, through the real
//! discovery client against a scripted in-process control plane.
//!
//!   cargo bench -p trellis-proxy --bench xds_apply -- [CLUSTERS] [CHANGES]
//!
//! The proxy is fed CLUSTERS clusters (each with one endpoint), one route configuration with a
//! route per cluster, and one listener. Then CHANGES times one ClusterLoadAssignment is sent with
//! a new endpoint address; each is timed from the send to the proxy's ACK. Printed: the initial
//! load time and the median, min and max of the changes, then the same figures for the compile
//! step alone (`Compiled::build` of such a change against the version in force). Nothing is ever
//! sent to the endpoints.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::discovery::v1::{
    self as api, CLUSTER_LOAD_ASSIGNMENT_TYPE, CLUSTER_TYPE, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, LISTENER_TYPE, ROUTE_CONFIGURATION_TYPE,
    aggregated_discovery_server::{AggregatedDiscovery, AggregatedDiscoveryServer},
    resource::Kind,
};
use trellis_proxy::{
    Proxy,
    config::{
        Compiled,
        model::Endpoint,
        xds::{Client, XdsSettings},
    },
};

type Responses = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

/// Hands each new stream's request receiver and response sender to the bench.
struct Scripted {
    streams: mpsc::Sender<(mpsc::Receiver<DeltaDiscoveryRequest>, Responses)>,
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
        self.streams
            .send((req_rx, resp_tx))
            .await
            .map_err(|_| Status::unavailable("bench gone"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(resp_rx))))
    }
}

struct Stream1 {
    requests: mpsc::Receiver<DeltaDiscoveryRequest>,
    responses: Responses,
    nonce: u32,
}

impl Stream1 {
    /// Sends one response and waits for its ACK; panics on a NACK (the bench would be measuring
    /// the wrong thing).
    async fn send(&mut self, type_url: &str, resources: Vec<api::Resource>) -> Duration {
        self.nonce += 1;
        let nonce = format!("n{}", self.nonce);
        let started = Instant::now();
        self.responses
            .send(Ok(DeltaDiscoveryResponse {
                type_url: type_url.into(),
                resources,
                removed_resources: Vec::new(),
                nonce: nonce.clone(),
                system_version_info: String::new(),
            }))
            .await
            .expect("stream open");
        loop {
            let r = tokio::time::timeout(Duration::from_secs(120), self.requests.recv())
                .await
                .expect("an answer within 120 s")
                .expect("stream open");
            if r.response_nonce == nonce {
                let elapsed = started.elapsed();
                assert!(r.error_detail.is_none(), "NACK: {:?}", r.error_detail);
                return elapsed;
            }
        }
    }
}

fn resource(name: &str, version: &str, kind: Kind) -> api::Resource {
    api::Resource {
        name: name.into(),
        version: version.into(),
        kind: Some(kind),
    }
}

fn cluster_name(i: usize) -> String {
    format!("svc-{i}")
}

/// A distinct loopback address per cluster and version; never connected to.
fn endpoint(i: usize, version: usize) -> SocketAddr {
    let port = 10_000 + ((i * 7 + version) % 50_000) as u16;
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn assignment(i: usize, version: usize) -> api::Resource {
    let name = cluster_name(i);
    resource(
        &name,
        &version.to_string(),
        Kind::ClusterLoadAssignment(api::ClusterLoadAssignment {
            cluster_name: name.clone(),
            endpoints: vec![api::Endpoint {
                address: endpoint(i, version).to_string(),
                weight: 1,
                health: api::EndpointHealth::Ready as i32,
                identity: String::new(),
            }],
        }),
    )
}

fn route_config(clusters: usize) -> api::Resource {
    let routes = (0..clusters)
        .map(|i| api::Route {
            name: format!("r{i}"),
            r#match: Some(api::RouteMatch {
                path: Some(api::route_match::Path::Prefix(format!("/svc-{i}"))),
                ..Default::default()
            }),
            action: Some(api::route::Action::Forward(api::ForwardAction {
                clusters: vec![api::WeightedCluster {
                    cluster: cluster_name(i),
                    weight: 1,
                }],
            })),
            ..Default::default()
        })
        .collect();
    resource(
        "rc",
        "1",
        Kind::RouteConfiguration(api::RouteConfiguration {
            name: "rc".into(),
            virtual_hosts: vec![api::VirtualHost {
                name: "all".into(),
                domains: vec!["*".into()],
                routes,
                ..Default::default()
            }],
        }),
    )
}

fn main() {
    // `cargo bench` passes `--bench`; the figures are the positional arguments.
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .filter_map(|a| a.parse().ok())
        .collect();
    let clusters = args.first().copied().unwrap_or(10_000);
    let changes = args.get(1).copied().unwrap_or(10).max(1);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(clusters, changes));
}

async fn run(clusters: usize, changes: usize) {
    let (streams_tx, mut streams) = mpsc::channel(4);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                AggregatedDiscoveryServer::new(Scripted {
                    streams: streams_tx,
                })
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let proxy = Proxy::new();
    let settings = XdsSettings {
        address: addr.to_string(),
        node: api::Node {
            id: "bench-proxy".into(),
            role: api::Role::Sidecar as i32,
            namespace: "default".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let (_static_tx, static_rx) = watch::channel(Arc::default());
    tokio::spawn(Client::new(proxy.clone(), settings, static_rx).run());
    let (requests, responses) = tokio::time::timeout(Duration::from_secs(10), streams.recv())
        .await
        .expect("the proxy connects")
        .expect("a stream");
    let mut s = Stream1 {
        requests,
        responses,
        nonce: 0,
    };

    let started = Instant::now();
    let cluster_resources = (0..clusters)
        .map(|i| {
            let name = cluster_name(i);
            resource(
                &name,
                "1",
                Kind::Cluster(api::Cluster {
                    name: name.clone(),
                    protocol: api::UpstreamProtocol::Http1 as i32,
                    ..Default::default()
                }),
            )
        })
        .collect();
    s.send(CLUSTER_TYPE, cluster_resources).await;
    s.send(
        CLUSTER_LOAD_ASSIGNMENT_TYPE,
        (0..clusters).map(|i| assignment(i, 0)).collect(),
    )
    .await;
    s.send(
        LISTENER_TYPE,
        vec![resource(
            "l",
            "1",
            Kind::Listener(api::Listener {
                max_connections: None,
                name: "l".into(),
                address: "127.0.0.1:0".into(),
                kind: Some(api::listener::Kind::Http(api::HttpListener {
                    route_config: "rc".into(),
                    ..Default::default()
                })),
            }),
        )],
    )
    .await;
    s.send(ROUTE_CONFIGURATION_TYPE, vec![route_config(clusters)])
        .await;
    let initial = started.elapsed();
    assert!(
        proxy.listener_addr("l").await.is_some(),
        "the listener is served after the initial load"
    );
    let version_before = proxy.store().load().map_or(0, |c| c.version);

    let mut times = Vec::with_capacity(changes);
    for n in 0..changes {
        let i = (n * 7_919) % clusters;
        times.push(
            s.send(CLUSTER_LOAD_ASSIGNMENT_TYPE, vec![assignment(i, n + 1)])
                .await,
        );
    }
    let version_after = proxy.store().load().map_or(0, |c| c.version);
    assert_eq!(
        version_after,
        version_before + changes as u64,
        "every change was published"
    );

    // The compile step alone, on the same configuration: one cluster's endpoint changed,
    // compiled against the version in force (what `Proxy::apply` does after validation).
    let current = proxy.store().load().expect("a version in force");
    let mut compile_times = Vec::with_capacity(changes);
    for n in 0..changes {
        let mut config = (*current.config).clone();
        let mut clusters = config.clusters.to_vec();
        let i = (n * 7_919) % clusters.len();
        clusters[i].endpoints = vec![Endpoint {
            address: endpoint(i, changes + n + 1),
            weight: 1,
            identity: None,
        }]
        .into();
        config.clusters = clusters.into();
        let started = Instant::now();
        let compiled = Compiled::build(Arc::new(config), current.version + 1, Some(&current))
            .expect("compiles");
        compile_times.push(started.elapsed());
        drop(compiled);
    }
    compile_times.sort();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("xds_apply: {clusters} clusters, 1 route config with {clusters} routes, 1 listener");
    println!("initial load: {:.1} ms", ms(initial));
    println!(
        "one endpoint change, send to ACK, {changes} changes: median {:.1} ms (min {:.1}, max {:.1})",
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1])
    );
    println!(
        "of which compiling (Compiled::build alone, same change): median {:.1} ms (min {:.1}, max {:.1})",
        ms(compile_times[compile_times.len() / 2]),
        ms(compile_times[0]),
        ms(compile_times[compile_times.len() - 1])
    );
}
