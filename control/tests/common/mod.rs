//! A controller in process on 127.0.0.1:0 over a copy of the fixtures, and a scripted proxy that
//! speaks the discovery protocol the way `discovery.proto` asks.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use trellis_control::{admin, server, source::file::ManifestDir, status};
use trellis_proto::discovery::v1::{
    self as api, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    aggregated_discovery_client::AggregatedDiscoveryClient, resource::Kind,
};

pub const CLUSTER: &str = api::CLUSTER_TYPE;
pub const ENDPOINTS: &str = api::CLUSTER_LOAD_ASSIGNMENT_TYPE;
pub const LISTENER: &str = api::LISTENER_TYPE;
pub const ROUTES: &str = api::ROUTE_CONFIGURATION_TYPE;
pub const SECRETS: &str = api::SECRET_TYPE;
pub const POLICIES: &str = api::POLICY_TYPE;

/// Bound on every wait: a test fails rather than hangs.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Controller {
    pub dir: tempfile::TempDir,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    _stop: oneshot::Sender<()>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Controller {
    pub async fn start() -> Controller {
        Self::start_with_trust_domain(None).await
    }

    /// A controller that marks meshed endpoints with SPIFFE IDs in `trust_domain`, as one
    /// running a CA does.
    pub async fn start_with_trust_domain(trust_domain: Option<&str>) -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mesh");
        for entry in std::fs::read_dir(fixtures).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        let registry = Arc::new(status::Registry::default());
        let (catalog, watch_task) = ManifestDir::new(dir.path(), registry.clone())
            .watch()
            .await
            .unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let admin_addr = admin_listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = server::DiscoveryService::new(catalog, registry.clone())
            .with_trust_domain(trust_domain.map(str::to_owned));
        let grpc_task = tokio::spawn(async move {
            server::serve(grpc, service, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let admin_task = tokio::spawn(admin::serve(admin_listener, registry.clone()));
        registry.set_ready();
        Controller {
            dir,
            grpc: grpc_addr,
            admin: admin_addr,
            _stop: stop,
            _tasks: vec![watch_task, grpc_task, admin_task],
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Replaces a file the way editors do: write a hidden temporary file, then rename it.
    pub fn write(&self, file: &str, text: &str) {
        let tmp = self.path(&format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.path(file)).unwrap();
    }

    pub fn edit(&self, file: &str, from: &str, to: &str) {
        let text = std::fs::read_to_string(self.path(file)).unwrap();
        assert!(text.contains(from), "{file} has no {from:?}");
        self.write(file, &text.replacen(from, to, 1));
    }

    pub async fn status(&self) -> status::StatusReport {
        admin::fetch_status(self.admin).await.unwrap()
    }

    /// Waits (bounded) until the status satisfies `check`.
    pub async fn wait_status(
        &self,
        what: &str,
        check: impl Fn(&status::StatusReport) -> bool,
    ) -> status::StatusReport {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let report = self.status().await;
            if check(&report) {
                return report;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {report:#?}"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One response as a test compares it: type, resource names, removed names.
pub type Seen = (&'static str, Vec<String>, Vec<String>);

pub fn short(type_url: &str) -> &'static str {
    match type_url {
        CLUSTER => CLUSTER,
        ENDPOINTS => ENDPOINTS,
        LISTENER => LISTENER,
        ROUTES => ROUTES,
        SECRETS => SECRETS,
        POLICIES => POLICIES,
        other => panic!("unexpected type {other}"),
    }
}

pub struct Proxy {
    pub id: String,
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    inbound: Streaming<DeltaDiscoveryResponse>,
    /// type → name → (version, resource) the proxy holds.
    pub held: BTreeMap<&'static str, BTreeMap<String, (String, Option<Kind>)>>,
    /// When set, the next response of this type is NACKed with this message.
    pub nack_next: Option<(&'static str, String)>,
    /// Auto-subscribe endpoints and routes for what arrives (as a real proxy does).
    pub follow: bool,
}

impl Proxy {
    pub fn sidecar_node(id: &str) -> api::Node {
        api::Node {
            id: id.into(),
            role: api::Role::Sidecar.into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            // These tests follow the per-ClusterIP listeners; the capture listeners are
            // covered by the translation's own tests.
            labels: [("trellis.io/capture".to_owned(), "none".to_owned())].into(),
            ..Default::default()
        }
    }

    pub fn gateway_node(id: &str) -> api::Node {
        api::Node {
            id: id.into(),
            role: api::Role::Gateway.into(),
            namespace: "shop".into(),
            gateway_name: "ingress".into(),
            ..Default::default()
        }
    }

    /// Opens a stream; `node` goes in a first request for clusters (with `initial` versions).
    pub async fn connect(controller: &Controller, node: api::Node) -> Proxy {
        let mut client = AggregatedDiscoveryClient::connect(format!("http://{}", controller.grpc))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(64);
        let id = node.id.clone();
        tx.send(DeltaDiscoveryRequest {
            node: Some(node),
            ..Default::default()
        })
        .await
        .unwrap();
        let inbound = client
            .delta_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Proxy {
            id,
            tx,
            inbound,
            held: BTreeMap::new(),
            nack_next: None,
            follow: true,
        }
    }

    pub async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    /// Subscribes to a type, with the versions held (as after a reconnect).
    pub async fn subscribe(&self, type_url: &str, names: &[String]) {
        let initial = self
            .held
            .get(short(type_url))
            .map(|m| m.iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect())
            .unwrap_or_default();
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: names.to_vec(),
            initial_resource_versions: initial,
            ..Default::default()
        })
        .await;
    }

    /// Wildcard subscriptions for clusters, listeners and secrets, and by-name ones for what is
    /// held.
    pub async fn subscribe_all(&self) {
        self.subscribe(CLUSTER, &[]).await;
        self.subscribe(LISTENER, &[]).await;
        self.subscribe(SECRETS, &[]).await;
        let held = |t| {
            self.held
                .get(t)
                .map(|m: &BTreeMap<String, _>| m.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let endpoints = held(ENDPOINTS);
        if !endpoints.is_empty() {
            self.subscribe(ENDPOINTS, &endpoints).await;
        }
        let routes = held(ROUTES);
        if !routes.is_empty() {
            self.subscribe(ROUTES, &routes).await;
        }
    }

    /// The next response, bounded by WAIT.
    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, self.inbound.message())
            .await
            .expect("a response in time")
            .expect("stream ok")
            .expect("stream open")
    }

    /// Applies a response to `held`, then ACKs or NACKs it and subscribes to what it names.
    pub async fn handle(&mut self, r: &DeltaDiscoveryResponse) -> Seen {
        let t = short(&r.type_url);
        let seen = (
            t,
            r.resources.iter().map(|x| x.name.clone()).collect(),
            r.removed_resources.clone(),
        );
        if let Some((nack_type, message)) = self.nack_next.take_if(|(nt, _)| *nt == t) {
            let _ = nack_type;
            self.send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                error_detail: Some(api::ErrorDetail { message }),
                ..Default::default()
            })
            .await;
            return seen;
        }
        let held = self.held.entry(t).or_default();
        let mut follow = Vec::new();
        for x in &r.resources {
            held.insert(x.name.clone(), (x.version.clone(), x.kind.clone()));
            match &x.kind {
                Some(Kind::Cluster(c)) => follow.push(c.name.clone()),
                Some(Kind::Listener(l)) => {
                    if let Some(api::listener::Kind::Http(h)) = &l.kind {
                        follow.push(h.route_config.clone());
                    }
                }
                _ => {}
            }
        }
        for name in &r.removed_resources {
            held.remove(name);
        }
        // Subscriptions before the ACK: once the controller has processed the ACK it has seen
        // them too, which is what `settle` relies on.
        if self.follow && !follow.is_empty() {
            let (follow_type, have) = if t == CLUSTER {
                (ENDPOINTS, self.held.get(ENDPOINTS))
            } else {
                (ROUTES, self.held.get(ROUTES))
            };
            let new: Vec<String> = follow
                .into_iter()
                .filter(|n| have.is_none_or(|h| !h.contains_key(n)))
                .collect();
            if !new.is_empty() {
                self.send(DeltaDiscoveryRequest {
                    type_url: follow_type.into(),
                    resource_names_subscribe: new,
                    ..Default::default()
                })
                .await;
            }
        }
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
        seen
    }

    /// Receives and handles responses until the controller reports this proxy settled (nothing
    /// pending or held back); `expect_some` first waits for at least one response.
    pub async fn settle(&mut self, controller: &Controller, expect_some: bool) -> Vec<Seen> {
        let mut log = Vec::new();
        if expect_some {
            let r = self.recv().await;
            log.push(self.handle(&r).await);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not settle: {log:?}",
                self.id
            );
            match tokio::time::timeout(Duration::from_millis(20), self.inbound.message()).await {
                Ok(message) => {
                    let r = message.expect("stream ok").expect("stream open");
                    log.push(self.handle(&r).await);
                    continue;
                }
                Err(_elapsed) => {}
            }
            let report = controller.status().await;
            let settled = report.proxies.iter().any(|p| {
                p.node_id == self.id
                    && !p.types.is_empty()
                    && p.types.values().all(|t| t.pending == 0 && t.held_back == 0)
            });
            if settled {
                return log;
            }
        }
    }

    pub fn version(&self, t: &'static str, name: &str) -> Option<&str> {
        self.held.get(t)?.get(name).map(|(v, _)| v.as_str())
    }

    pub fn resource(&self, t: &'static str, name: &str) -> Option<&Kind> {
        self.held.get(t)?.get(name)?.1.as_ref()
    }
}

pub fn seen(t: &'static str, names: &[&str], removed: &[&str]) -> Seen {
    (
        t,
        names.iter().map(|s| s.to_string()).collect(),
        removed.iter().map(|s| s.to_string()).collect(),
    )
}
