//! The proxy's control-plane client against a scripted in-process discovery server: ACK, NACK
//! with the validator's reason (old config keeps serving), removal, warming order and reconnect
//! with the versions held.

mod common;

use std::{net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use common::*;
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
    config::xds::{Client, XdsSettings},
};

type Responses = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

/// Each new stream hands the test its request receiver and a response sender.
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
        self.streams.send((req_rx, resp_tx)).await.unwrap();
        Ok(Response::new(Box::pin(ReceiverStream::new(resp_rx))))
    }
}

struct Harness {
    proxy: Arc<Proxy>,
    streams: mpsc::Receiver<(mpsc::Receiver<DeltaDiscoveryRequest>, Responses)>,
    requests: mpsc::Receiver<DeltaDiscoveryRequest>,
    responses: Responses,
    nonce: u32,
    _static: watch::Sender<Arc<trellis_proxy::config::bootstrap::File>>,
}

impl Harness {
    async fn start() -> Harness {
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
                role: api::Role::Sidecar as i32,
                namespace: "default".into(),
                ..Default::default()
            },
        };
        let (static_tx, static_rx) = watch::channel(Arc::default());
        tokio::spawn(Client::new(proxy.clone(), settings, static_rx).run());
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
            _static: static_tx,
        }
    }

    async fn next_request(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(Duration::from_secs(5), self.requests.recv())
            .await
            .expect("a request within 5s")
            .expect("stream open")
    }

    /// Sends a response and returns the proxy's ACK/NACK for it, skipping subscription requests
    /// (returned separately).
    async fn send(
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
                // Subscription changes follow the ACK immediately; collect what is queued.
                while let Ok(Some(more)) =
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

fn resource(name: &str, version: &str, kind: Kind) -> api::Resource {
    api::Resource {
        name: name.into(),
        version: version.into(),
        kind: Some(kind),
    }
}

fn cluster(name: &str) -> api::Resource {
    resource(
        name,
        "1",
        Kind::Cluster(api::Cluster {
            name: name.into(),
            protocol: api::UpstreamProtocol::Http1 as i32,
            ..Default::default()
        }),
    )
}

fn endpoints(name: &str, version: &str, addrs: &[SocketAddr]) -> api::Resource {
    resource(
        name,
        version,
        Kind::ClusterLoadAssignment(api::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: addrs
                .iter()
                .map(|a| api::Endpoint {
                    address: a.to_string(),
                    weight: 1,
                    health: api::EndpointHealth::Ready as i32,
                })
                .collect(),
        }),
    )
}

fn http_listener(name: &str, route_config: &str) -> api::Resource {
    resource(
        name,
        "1",
        Kind::Listener(api::Listener {
            name: name.into(),
            address: "127.0.0.1:0".into(),
            kind: Some(api::listener::Kind::Http(api::HttpListener {
                route_config: route_config.into(),
                ..Default::default()
            })),
        }),
    )
}

fn routes(name: &str, version: &str, cluster: &str, path_regex: Option<&str>) -> api::Resource {
    let path = path_regex.map(|r| api::route_match::Path::Regex(r.into()));
    resource(
        name,
        version,
        Kind::RouteConfiguration(api::RouteConfiguration {
            name: name.into(),
            virtual_hosts: vec![api::VirtualHost {
                name: "all".into(),
                domains: vec!["*".into()],
                routes: vec![api::Route {
                    name: "r".into(),
                    r#match: Some(api::RouteMatch {
                        path,
                        ..Default::default()
                    }),
                    action: Some(api::route::Action::Forward(api::ForwardAction {
                        clusters: vec![api::WeightedCluster {
                            cluster: cluster.into(),
                            weight: 1,
                        }],
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }),
    )
}

/// `routes(...)` with its one route changed by `edit`.
fn routes_with(name: &str, version: &str, edit: impl FnOnce(&mut api::Route)) -> api::Resource {
    let mut r = routes(name, version, "a", None);
    let Some(Kind::RouteConfiguration(rc)) = &mut r.kind else {
        unreachable!()
    };
    edit(&mut rc.virtual_hosts[0].routes[0]);
    r
}

fn subscribed(reqs: &[DeltaDiscoveryRequest], type_url: &str) -> Vec<String> {
    reqs.iter()
        .filter(|r| r.type_url == type_url)
        .flat_map(|r| r.resource_names_subscribe.clone())
        .collect()
}

async fn who(addr: SocketAddr) -> String {
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    resp.headers().get("x-upstream").map_or_else(
        || format!("status {}", resp.status()),
        |v| v.to_str().unwrap().into(),
    )
}

/// Brings the harness to a served listener `l` → routes `r` → cluster `a` (upstream "a").
async fn serve_basic(h: &mut Harness) -> SocketAddr {
    // The first requests: wildcard clusters and listeners, node on the first only.
    let first = h.next_request().await;
    assert_eq!(first.type_url, CLUSTER_TYPE);
    assert_eq!(first.node.as_ref().unwrap().id, "test-proxy");
    let second = h.next_request().await;
    assert_eq!(second.type_url, LISTENER_TYPE);
    assert!(second.node.is_none());

    let (up_a, _) = echo_upstream("a").await;
    let (ack, subs) = h.send(CLUSTER_TYPE, vec![cluster("a")], vec![]).await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert_eq!(subscribed(&subs, CLUSTER_LOAD_ASSIGNMENT_TYPE), ["a"]);
    let (ack, _) = h
        .send(
            CLUSTER_LOAD_ASSIGNMENT_TYPE,
            vec![endpoints("a", "1", &[up_a])],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (ack, subs) = h
        .send(LISTENER_TYPE, vec![http_listener("l", "r")], vec![])
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert_eq!(subscribed(&subs, ROUTE_CONFIGURATION_TYPE), ["r"]);
    // Warming: without its routes the listener is not served.
    assert!(h.proxy.listener_addr("l").await.is_none());
    let (ack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes("r", "1", "a", None)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let addr = h.proxy.listener_addr("l").await.expect("listener served");
    assert_eq!(who(addr).await, "a");
    addr
}

#[tokio::test]
async fn acks_warms_and_serves() {
    let mut h = Harness::start().await;
    serve_basic(&mut h).await;
}

#[tokio::test]
async fn nack_names_the_problem_and_keeps_serving() {
    let mut h = Harness::start().await;
    let addr = serve_basic(&mut h).await;
    let (nack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes("r", "2", "a", Some("("))],
            vec![],
        )
        .await;
    let message = nack.error_detail.expect("NACK").message;
    assert!(
        message.contains(r#"route_configs[0] "r".virtual_hosts[0].routes[0].match.path.regex"#)
            && message.contains("does not compile"),
        "{message}"
    );
    assert_eq!(who(addr).await, "a", "the previous routes keep serving");
    // A route to a cluster the proxy does not have is refused, not left warming.
    let (nack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes("r", "3", "missing", None)],
            vec![],
        )
        .await;
    let message = nack.error_detail.expect("NACK").message;
    assert!(
        message.contains(r#"cluster "missing" is not defined"#),
        "{message}"
    );
    assert_eq!(who(addr).await, "a");
    // A resource of the wrong kind is refused too.
    let (nack, _) = h
        .send(CLUSTER_TYPE, vec![http_listener("x", "r")], vec![])
        .await;
    assert!(
        nack.error_detail
            .unwrap()
            .message
            .contains("does not match")
    );
}

#[tokio::test]
async fn retry_policy_from_the_wire_is_served_or_nacked_by_field() {
    let mut h = Harness::start().await;
    let addr = serve_basic(&mut h).await;
    let served_retry = |h: &Harness| {
        let compiled = h.proxy.store().load().expect("a config is served");
        compiled.config.route_configs[0].virtual_hosts[0].routes[0]
            .retry
            .clone()
    };

    let (ack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes_with("r", "2", |r| {
                r.retry = Some(api::RetryPolicy {
                    attempts: Some(1),
                    retry_on: vec!["gateway-error".into()],
                    codes: vec![429],
                    per_try_timeout_ms: 500,
                    ..Default::default()
                });
                r.rate_limit = Some(api::TokenBucket {
                    max_tokens: 1_000,
                    ..Default::default()
                });
            })],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let policy = served_retry(&h);
    assert_eq!(policy.attempts, 1);
    assert_eq!(&*policy.status_codes, [429]);
    assert_eq!(policy.per_try_timeout, Some(Duration::from_millis(500)));
    assert_eq!(who(addr).await, "a");

    for (edit, field, problem) in [
        (
            (|r: &mut api::Route| {
                r.retry = Some(api::RetryPolicy {
                    retry_on: vec!["sometimes".into()],
                    ..Default::default()
                })
            }) as fn(&mut api::Route),
            "retry.retry_on[0]",
            r#"unknown condition "sometimes""#,
        ),
        (
            |r: &mut api::Route| r.rate_limit = Some(api::TokenBucket::default()),
            "rate_limit.max_tokens",
            "must be at least 1",
        ),
    ] {
        let (nack, _) = h
            .send(
                ROUTE_CONFIGURATION_TYPE,
                vec![routes_with("r", "3", edit)],
                vec![],
            )
            .await;
        let message = nack.error_detail.expect("NACK").message;
        assert!(
            message.contains(&format!(
                r#"route_configs[0] "r".virtual_hosts[0].routes[0].{field}: {problem}"#
            )),
            "{message}"
        );
        assert_eq!(served_retry(&h), policy, "the previous routes keep serving");
    }
}

#[tokio::test]
async fn route_change_waits_for_the_new_clusters_endpoints() {
    let mut h = Harness::start().await;
    let addr = serve_basic(&mut h).await;
    let (up_b, _) = echo_upstream("b").await;
    let (ack, subs) = h.send(CLUSTER_TYPE, vec![cluster("b")], vec![]).await;
    assert!(ack.error_detail.is_none());
    assert_eq!(subscribed(&subs, CLUSTER_LOAD_ASSIGNMENT_TYPE), ["b"]);
    // Routes to b arrive before b's endpoints: ACKed, but the old routes keep serving.
    let (ack, _) = h
        .send(
            ROUTE_CONFIGURATION_TYPE,
            vec![routes("r", "2", "b", None)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none());
    assert_eq!(who(addr).await, "a");
    let (ack, _) = h
        .send(
            CLUSTER_LOAD_ASSIGNMENT_TYPE,
            vec![endpoints("b", "1", &[up_b])],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none());
    assert_eq!(who(addr).await, "b");
}

#[tokio::test]
async fn removals_take_effect() {
    let mut h = Harness::start().await;
    let addr = serve_basic(&mut h).await;
    // Endpoint removal within the assignment: no endpoint left.
    let (ack, _) = h
        .send(
            CLUSTER_LOAD_ASSIGNMENT_TYPE,
            vec![endpoints("a", "2", &[])],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none());
    assert_eq!(who(addr).await, "status 503 Service Unavailable");
    // Listener removal: the port closes and the route subscription is dropped.
    let (ack, subs) = h.send(LISTENER_TYPE, vec![], vec!["l".into()]).await;
    assert!(ack.error_detail.is_none());
    assert!(
        subs.iter().any(
            |r| r.type_url == ROUTE_CONFIGURATION_TYPE && r.resource_names_unsubscribe == ["r"]
        )
    );
    assert!(h.proxy.listener_addr("l").await.is_none());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn reconnects_with_held_versions_and_keeps_serving() {
    let mut h = Harness::start().await;
    let addr = serve_basic(&mut h).await;
    // The server drops the stream.
    let (closed_tx, _) = mpsc::channel(1);
    h.responses = closed_tx;
    let (mut requests, responses) = tokio::time::timeout(Duration::from_secs(10), h.streams.recv())
        .await
        .expect("the proxy reconnects")
        .unwrap();
    assert_eq!(
        who(addr).await,
        "a",
        "served while the control plane is away"
    );
    let mut firsts = Vec::new();
    for _ in 0..4 {
        firsts.push(
            tokio::time::timeout(Duration::from_secs(5), requests.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let by_type = |t: &str| firsts.iter().find(|r| r.type_url == t).unwrap().clone();
    assert!(
        firsts[0].node.is_some(),
        "a new stream starts with the node"
    );
    assert_eq!(by_type(CLUSTER_TYPE).initial_resource_versions["a"], "1");
    assert_eq!(by_type(LISTENER_TYPE).initial_resource_versions["l"], "1");
    let cla = by_type(CLUSTER_LOAD_ASSIGNMENT_TYPE);
    assert_eq!(cla.resource_names_subscribe, ["a"]);
    assert_eq!(cla.initial_resource_versions["a"], "1");
    assert_eq!(
        by_type(ROUTE_CONFIGURATION_TYPE).initial_resource_versions["r"],
        "1"
    );
    drop(responses);
}
