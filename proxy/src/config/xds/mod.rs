//! The control-plane feed: one discovery stream to trellis-control. Each response is applied to a
//! copy of what the proxy holds, turned into the bootstrap file's types, and sent through the same
//! validate → compile → publish path as the file; it is ACKed if that succeeds and NACKed with
//! the validator's message otherwise (the old config keeps serving).
//!
//! Warming: a listener whose route configuration has not arrived, or that names a cluster whose
//! endpoints have not arrived, is not served yet; while it warms, the version last served (if any)
//! stays in place. So a route change never sends traffic to a cluster the proxy cannot reach yet.

mod convert;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use trellis_proto::discovery::v1::{
    self as api, CLUSTER_LOAD_ASSIGNMENT_TYPE, CLUSTER_TYPE, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, ErrorDetail, LISTENER_TYPE, ROUTE_CONFIGURATION_TYPE,
    aggregated_discovery_client::AggregatedDiscoveryClient, resource::Kind,
};

use super::{bootstrap as file, validate};
use crate::app::Proxy;

/// Where the control plane is and who this proxy is.
#[derive(Clone, Debug)]
pub struct XdsSettings {
    /// `host:port` (or a full `http://` URI).
    pub address: String,
    pub node: api::Node,
}

impl XdsSettings {
    /// From the bootstrap file's `xds:` section (after command-line overrides).
    pub fn from_bootstrap(x: &file::Xds) -> Result<Self, String> {
        let address = x
            .address
            .clone()
            .filter(|a| !a.is_empty())
            .ok_or("xds.address: the control plane address is required")?;
        let role = match x.role.as_deref().unwrap_or("sidecar") {
            "gateway" => api::Role::Gateway,
            "sidecar" => api::Role::Sidecar,
            other => {
                return Err(format!(
                    "xds.role: {other:?} is not \"gateway\" or \"sidecar\""
                ));
            }
        };
        if role == api::Role::Gateway && x.gateway.as_deref().unwrap_or("").is_empty() {
            return Err("xds.gateway: a gateway must name the Gateway resource it serves".into());
        }
        let node_id = x.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}.{}", host.trim(), std::process::id())
        });
        Ok(XdsSettings {
            address,
            node: api::Node {
                id: node_id,
                role: role as i32,
                namespace: x.namespace.clone().unwrap_or_else(|| "default".into()),
                service_account: x.service_account.clone().unwrap_or_default(),
                labels: x.labels.clone().into_iter().collect(),
                gateway_name: x.gateway.clone().unwrap_or_default(),
            },
        })
    }
}

/// Reconnect backoff: full jitter between zero and a cap that doubles from the base to the max.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Every resource the proxy holds, by type and name, with its version.
#[derive(Clone, Debug, Default)]
struct Held {
    clusters: BTreeMap<String, (String, api::Cluster)>,
    endpoints: BTreeMap<String, (String, api::ClusterLoadAssignment)>,
    listeners: BTreeMap<String, (String, api::Listener)>,
    routes: BTreeMap<String, (String, api::RouteConfiguration)>,
}

impl Held {
    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        fn v<T>(m: &BTreeMap<String, (String, T)>) -> HashMap<String, String> {
            m.iter()
                .map(|(k, (ver, _))| (k.clone(), ver.clone()))
                .collect()
        }
        match type_url {
            CLUSTER_TYPE => v(&self.clusters),
            CLUSTER_LOAD_ASSIGNMENT_TYPE => v(&self.endpoints),
            LISTENER_TYPE => v(&self.listeners),
            ROUTE_CONFIGURATION_TYPE => v(&self.routes),
            _ => HashMap::new(),
        }
    }

    /// Names the by-name types should be subscribed to: the endpoints of every held cluster, the
    /// route configurations of every held HTTP listener.
    fn wanted(&self, type_url: &str) -> BTreeSet<String> {
        match type_url {
            CLUSTER_LOAD_ASSIGNMENT_TYPE => self.clusters.keys().cloned().collect(),
            ROUTE_CONFIGURATION_TYPE => self
                .listeners
                .values()
                .filter_map(|(_, l)| match &l.kind {
                    Some(api::listener::Kind::Http(h)) => Some(h.route_config.clone()),
                    _ => None,
                })
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    /// Applies one response's additions and removals.
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Result<(), String> {
        let type_url = resp.type_url.as_str();
        for r in &resp.resources {
            let v = r.version.clone();
            let name = r.name.clone();
            match (type_url, &r.kind) {
                (CLUSTER_TYPE, Some(Kind::Cluster(c))) => {
                    self.clusters.insert(name, (v, c.clone()));
                }
                (CLUSTER_LOAD_ASSIGNMENT_TYPE, Some(Kind::ClusterLoadAssignment(c))) => {
                    self.endpoints.insert(name, (v, c.clone()));
                }
                (LISTENER_TYPE, Some(Kind::Listener(l))) => {
                    self.listeners.insert(name, (v, l.clone()));
                }
                (ROUTE_CONFIGURATION_TYPE, Some(Kind::RouteConfiguration(rc))) => {
                    self.routes.insert(name, (v, rc.clone()));
                }
                _ => {
                    return Err(format!(
                        "resource {:?}: its kind does not match the response type {type_url}",
                        r.name
                    ));
                }
            }
        }
        for name in &resp.removed_resources {
            match type_url {
                CLUSTER_TYPE => drop(self.clusters.remove(name)),
                CLUSTER_LOAD_ASSIGNMENT_TYPE => drop(self.endpoints.remove(name)),
                LISTENER_TYPE => drop(self.listeners.remove(name)),
                ROUTE_CONFIGURATION_TYPE => drop(self.routes.remove(name)),
                _ => {}
            }
        }
        Ok(())
    }
}

/// The part of the held resources that is served: every held cluster, and every listener whose
/// dependencies are all held (falling back to the version served before while a new one warms).
#[derive(Clone, Debug, Default)]
struct Served {
    listeners: BTreeMap<String, api::Listener>,
    routes: BTreeMap<String, api::RouteConfiguration>,
}

fn route_clusters(rc: &api::RouteConfiguration) -> impl Iterator<Item = &str> {
    rc.virtual_hosts
        .iter()
        .flat_map(|vh| vh.routes.iter())
        .filter_map(|r| match &r.action {
            Some(api::route::Action::Forward(f)) => {
                Some(f.clusters.iter().map(|w| w.cluster.as_str()))
            }
            _ => None,
        })
        .flatten()
}

fn listener_clusters(l: &api::Listener) -> Vec<&str> {
    match &l.kind {
        Some(api::listener::Kind::Tcp(t)) => vec![t.cluster.as_str()],
        Some(api::listener::Kind::TlsPassthrough(s)) => s
            .routes
            .iter()
            .map(|r| r.cluster.as_str())
            .chain((!s.default_cluster.is_empty()).then_some(s.default_cluster.as_str()))
            .collect(),
        _ => Vec::new(),
    }
}

/// Which listeners and route configurations can be served from `held`, given what was served.
fn serve(held: &Held, served: &Served) -> Served {
    // A held cluster whose endpoints have not arrived warms. A cluster not held at all is not
    // waited for: the route goes on to validation, which rejects the dangling name (a NACK).
    let ready = |c: &str| !held.clusters.contains_key(c) || held.endpoints.contains_key(c);
    let mut out = Served::default();
    for (name, (_, l)) in &held.listeners {
        let resolve =
            |l: &api::Listener, routes: &dyn Fn(&str) -> Option<api::RouteConfiguration>| {
                if !listener_clusters(l).into_iter().all(ready) {
                    return None;
                }
                match &l.kind {
                    Some(api::listener::Kind::Http(h)) => {
                        let rc = routes(&h.route_config)?;
                        let all_ready = route_clusters(&rc).all(ready);
                        all_ready.then_some((l.clone(), Some(rc)))
                    }
                    _ => Some((l.clone(), None)),
                }
            };
        let fresh = |n: &str| held.routes.get(n).map(|(_, rc)| rc.clone());
        let previous = |n: &str| served.routes.get(n).cloned();
        let chosen = resolve(l, &fresh)
            .or_else(|| resolve(l, &previous))
            .or_else(|| {
                served
                    .listeners
                    .get(name)
                    .and_then(|old| resolve(old, &fresh))
            })
            .or_else(|| {
                served
                    .listeners
                    .get(name)
                    .and_then(|old| resolve(old, &previous))
            });
        match chosen {
            Some((listener, rc)) => {
                if let Some(rc) = rc {
                    out.routes.insert(rc.name.clone(), rc);
                }
                out.listeners.insert(name.clone(), listener);
            }
            None => {
                tracing::debug!(listener = %name, "listener warming: waiting for its routes or endpoints")
            }
        }
    }
    out
}

/// The bootstrap-file form of what is served, after the static part of the file.
fn to_file(static_part: &file::File, held: &Held, served: &Served) -> Result<file::File, String> {
    let mut f = static_part.clone();
    f.xds = None;
    for l in served.listeners.values() {
        f.listeners
            .push(convert::listener(l).map_err(|e| e.to_string())?);
    }
    for rc in served.routes.values() {
        f.route_configs
            .push(convert::route_config(rc).map_err(|e| e.to_string())?);
    }
    for (name, (_, c)) in &held.clusters {
        let endpoints = held.endpoints.get(name).map(|(_, e)| e);
        f.clusters.push(convert::cluster(c, endpoints));
    }
    Ok(f)
}

/// `route_configs[3]` → `route_configs[3] "outbound/default/web:80"`, so a NACK names resources.
fn name_resources(message: &str, f: &file::File) -> String {
    let mut out = message.to_owned();
    let lists: [(&str, Vec<&str>); 3] = [
        (
            "listeners",
            f.listeners.iter().map(|l| l.name.as_str()).collect(),
        ),
        (
            "route_configs",
            f.route_configs.iter().map(|r| r.name.as_str()).collect(),
        ),
        (
            "clusters",
            f.clusters.iter().map(|c| c.name.as_str()).collect(),
        ),
    ];
    for (field, names) in lists {
        for (i, name) in names.iter().enumerate() {
            out = out.replace(&format!("{field}[{i}]"), &format!("{field}[{i}] {name:?}"));
        }
    }
    out
}

/// The control-plane client. Runs until the process ends.
pub struct Client {
    proxy: Arc<Proxy>,
    settings: XdsSettings,
    /// The bootstrap file's own listeners, routes and clusters, served beside the dynamic ones;
    /// a reload of the file sends a new value.
    static_part: watch::Receiver<Arc<file::File>>,
    held: Held,
    served: Served,
}

impl Client {
    pub fn new(
        proxy: Arc<Proxy>,
        settings: XdsSettings,
        static_part: watch::Receiver<Arc<file::File>>,
    ) -> Self {
        Client {
            proxy,
            settings,
            static_part,
            held: Held::default(),
            served: Served::default(),
        }
    }

    /// Connects, follows the stream, and reconnects with backoff whenever it breaks, keeping the
    /// last good config in service meanwhile.
    pub async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            match self.session(&mut attempt).await {
                Ok(()) => tracing::warn!("control plane closed the stream; reconnecting"),
                Err(e) => tracing::warn!(error = %e, "control plane stream failed; reconnecting"),
            }
            let cap = BACKOFF_BASE
                .saturating_mul(1 << attempt.min(16))
                .min(BACKOFF_MAX);
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(Duration::from_nanos(fastrand::u64(
                ..=cap.as_nanos() as u64,
            )))
            .await;
        }
    }

    /// One stream, from the first request to its end. `attempt` resets once a response arrives.
    async fn session(&mut self, attempt: &mut u32) -> Result<(), String> {
        let uri = if self.settings.address.contains("://") {
            self.settings.address.clone()
        } else {
            format!("http://{}", self.settings.address)
        };
        let channel = tonic::transport::Endpoint::from_shared(uri)
            .map_err(|e| format!("bad control plane address: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("connect to {}: {e}", self.settings.address))?;
        let (tx, rx) = mpsc::channel(32);
        let mut subscribed: HashMap<&'static str, BTreeSet<String>> = HashMap::new();
        let mut first = true;
        for type_url in [
            CLUSTER_TYPE,
            LISTENER_TYPE,
            CLUSTER_LOAD_ASSIGNMENT_TYPE,
            ROUTE_CONFIGURATION_TYPE,
        ] {
            let by_name = matches!(
                type_url,
                CLUSTER_LOAD_ASSIGNMENT_TYPE | ROUTE_CONFIGURATION_TYPE
            );
            let names = self.held.wanted(type_url);
            let versions = self.held.versions(type_url);
            if by_name && names.is_empty() && versions.is_empty() {
                continue;
            }
            let req = DeltaDiscoveryRequest {
                node: first.then(|| self.settings.node.clone()),
                type_url: type_url.into(),
                resource_names_subscribe: names.iter().cloned().collect(),
                initial_resource_versions: versions,
                ..Default::default()
            };
            first = false;
            subscribed.insert(type_url, names);
            tx.send(req).await.map_err(|_| "request channel closed")?;
        }
        let mut stream = AggregatedDiscoveryClient::new(channel)
            .delta_resources(ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("open stream: {e}"))?
            .into_inner();
        tracing::info!(address = %self.settings.address, "connected to the control plane");
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                changed = self.static_part.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    if let Err(e) = self.republish().await {
                        crate::telemetry::config_rejected();
                        tracing::error!(error = %e, "the reloaded file does not fit the dynamic configuration; the previous configuration stays");
                    }
                    continue;
                }
            };
            let resp = match message {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            *attempt = 0;
            let error_detail = match self.on_response(&resp).await {
                Ok(version) => {
                    crate::telemetry::config_applied(version);
                    None
                }
                Err(message) => {
                    crate::telemetry::config_rejected();
                    tracing::warn!(type_url = %resp.type_url, nonce = %resp.nonce, %message, "update rejected (NACK); the previous configuration stays");
                    Some(ErrorDetail { message })
                }
            };
            let ack = DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail,
                ..Default::default()
            };
            tx.send(ack).await.map_err(|_| "request channel closed")?;
            // Follow what is now held with the by-name subscriptions.
            for type_url in [CLUSTER_LOAD_ASSIGNMENT_TYPE, ROUTE_CONFIGURATION_TYPE] {
                let wanted = self.held.wanted(type_url);
                let have = subscribed.entry(type_url).or_default();
                let subscribe: Vec<String> = wanted.difference(have).cloned().collect();
                let unsubscribe: Vec<String> = have.difference(&wanted).cloned().collect();
                if subscribe.is_empty() && unsubscribe.is_empty() {
                    continue;
                }
                for name in &unsubscribe {
                    match type_url {
                        CLUSTER_LOAD_ASSIGNMENT_TYPE => drop(self.held.endpoints.remove(name)),
                        _ => drop(self.held.routes.remove(name)),
                    }
                }
                *have = wanted;
                let req = DeltaDiscoveryRequest {
                    type_url: type_url.into(),
                    resource_names_subscribe: subscribe,
                    resource_names_unsubscribe: unsubscribe,
                    ..Default::default()
                };
                tx.send(req).await.map_err(|_| "request channel closed")?;
            }
        }
    }

    /// Applies a response to a copy of what is held and publishes the result; on any error
    /// nothing changes and the message says why.
    async fn on_response(&mut self, resp: &DeltaDiscoveryResponse) -> Result<u64, String> {
        let mut held = self.held.clone();
        held.apply(resp)?;
        let served = serve(&held, &self.served);
        let version = self.publish(&held, &served).await?;
        tracing::info!(
            type_url = %resp.type_url,
            changed = resp.resources.len(),
            removed = resp.removed_resources.len(),
            version,
            "applied update from the control plane"
        );
        self.held = held;
        self.served = served;
        Ok(version)
    }

    /// Publishes what is held again, after the static part changed.
    async fn republish(&mut self) -> Result<(), String> {
        let version = self.publish(&self.held, &self.served).await?;
        crate::telemetry::config_applied(version);
        tracing::info!(version, "configuration reloaded");
        Ok(())
    }

    async fn publish(&self, held: &Held, served: &Served) -> Result<u64, String> {
        let static_part = self.static_part.borrow().clone();
        let f = to_file(&static_part, held, served)?;
        let config =
            validate::validate(f.clone()).map_err(|e| name_resources(&e.to_string(), &f))?;
        self.proxy
            .apply(config)
            .await
            .map_err(|e| name_resources(&e.to_string(), &f))
    }
}
