//! The control-plane feed: one discovery stream to trellis-control. Each resource of a response is
//! checked on its own ([`check`]); a bad one is refused by name (NACKed, one line each) and keeps
//! its last good version, the others are held. What is held is then turned into the bootstrap
//! file's types and sent through the validate → compile → publish path the file takes.
//!
//! Warming: a listener whose route configuration has not arrived, or that names a cluster whose
//! endpoints have not arrived, is not served yet; while it warms, the version last served (if any)
//! stays in place. So a route change never sends traffic to a cluster the proxy cannot reach yet.
//! A listener is never removed because something it uses was refused, and a cluster the control
//! plane removes while a served route still uses it is kept, as last published (endpoints
//! included), until no served route uses it.

mod check;
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

pub use self::check::Refused;
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

    /// Applies one response's additions and removals. Each resource is checked on its own; a
    /// refused one leaves the version held before (if any) in place.
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<Refused> {
        let type_url = resp.type_url.as_str();
        let mut refused = Vec::new();
        for r in &resp.resources {
            let v = r.version.clone();
            let name = r.name.clone();
            let checked = match (type_url, &r.kind) {
                (CLUSTER_TYPE, Some(Kind::Cluster(c))) => check::cluster(&name, c)
                    .map(|()| drop(self.clusters.insert(name, (v, c.clone())))),
                (CLUSTER_LOAD_ASSIGNMENT_TYPE, Some(Kind::ClusterLoadAssignment(c))) => {
                    let cluster = self.clusters.get(&name).map(|(_, c)| c);
                    check::endpoints(&name, c, cluster)
                        .map(|()| drop(self.endpoints.insert(name, (v, c.clone()))))
                }
                (LISTENER_TYPE, Some(Kind::Listener(l))) => check::listener(&name, l)
                    .map(|()| drop(self.listeners.insert(name, (v, l.clone())))),
                (ROUTE_CONFIGURATION_TYPE, Some(Kind::RouteConfiguration(rc))) => {
                    check::route_config(&name, rc)
                        .map(|()| drop(self.routes.insert(name, (v, rc.clone()))))
                }
                _ => Err(Refused::new(
                    type_kind(type_url),
                    format!("resource {name:?}"),
                    format!("its kind does not match the response type {type_url}"),
                )),
            };
            refused.extend(checked.err());
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
        refused
    }
}

/// The metric label of a response type.
fn type_kind(type_url: &str) -> &'static str {
    match type_url {
        CLUSTER_TYPE => "cluster",
        CLUSTER_LOAD_ASSIGNMENT_TYPE => "endpoints",
        LISTENER_TYPE => "listener",
        ROUTE_CONFIGURATION_TYPE => "route_config",
        _ => "unknown",
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

/// Clusters as last published (endpoints included), by name: what a served route still using a
/// cluster the control plane removed goes on with.
type Published = BTreeMap<String, file::Cluster>;

/// Why a listener cannot be served from `held` (its fresh version), if it cannot.
fn waiting_for(held: &Held, published: &Published, l: &api::Listener) -> Option<String> {
    for c in listener_clusters(l) {
        if !listener_cluster_ready(held, published, c) {
            return Some(if held.clusters.contains_key(c) {
                format!("waiting for the endpoints of cluster {c:?}")
            } else {
                format!("waiting for cluster {c:?}")
            });
        }
    }
    if let Some(api::listener::Kind::Http(h)) = &l.kind {
        let Some((_, rc)) = held.routes.get(&h.route_config) else {
            return Some(format!("waiting for route config {:?}", h.route_config));
        };
        if let Some(c) = route_clusters(rc).find(|c| !route_cluster_ready(held, c)) {
            return Some(format!("waiting for the endpoints of cluster {c:?}"));
        }
    }
    None
}

/// A held cluster whose endpoints have not arrived warms. A cluster not held at all is not waited
/// for: that backend's share is answered with an error at request time.
fn route_cluster_ready(held: &Held, c: &str) -> bool {
    !held.clusters.contains_key(c) || held.endpoints.contains_key(c)
}

/// A TCP or TLS listener serves one cluster per connection, so it waits for the cluster itself.
fn listener_cluster_ready(held: &Held, published: &Published, c: &str) -> bool {
    match held.clusters.contains_key(c) {
        true => held.endpoints.contains_key(c),
        false => published.contains_key(c),
    }
}

/// Which listeners and route configurations can be served from `held`, given what was served.
fn serve(held: &Held, served: &Served, published: &Published) -> Served {
    let mut out = Served::default();
    for (name, (_, l)) in &held.listeners {
        let resolve =
            |l: &api::Listener, routes: &dyn Fn(&str) -> Option<api::RouteConfiguration>| {
                if !listener_clusters(l)
                    .into_iter()
                    .all(|c| listener_cluster_ready(held, published, c))
                {
                    return None;
                }
                match &l.kind {
                    Some(api::listener::Kind::Http(h)) => {
                        let rc = routes(&h.route_config)?;
                        let all_ready = route_clusters(&rc).all(|c| route_cluster_ready(held, c));
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

/// One line per held listener that nothing can be served for yet.
fn warming(held: &Held, served: &Served, published: &Published) -> Vec<String> {
    held.listeners
        .iter()
        .filter(|(name, _)| !served.listeners.contains_key(*name))
        .map(|(name, (_, l))| {
            let why = waiting_for(held, published, l)
                .unwrap_or_else(|| "waiting for its routes or endpoints".into());
            format!("listener {name:?} not serving: {why}")
        })
        .collect()
}

/// A served listener left out of what is published, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LeftOut {
    listener: String,
    /// The field at fault and the problem: `address: cannot bind 127.0.0.1:80: ...`.
    reason: String,
}

/// The bootstrap-file form of what is served, after the static part of the file; the dynamic
/// clusters in it; and the served listeners left out because another listener has their name or
/// address (the one already placed keeps it, so a dynamic listener never displaces a static one).
fn to_file(
    static_part: &file::File,
    held: &Held,
    served: &Served,
    published: &Published,
) -> Result<(file::File, Published, Vec<LeftOut>), String> {
    let mut f = static_part.clone();
    f.xds = None;
    // The file's own listeners keep the route config they had alone: a listener without
    // `route_config` uses the file's only one, whatever the control plane adds beside it.
    if let [only] = &f.route_configs[..] {
        let only = only.name.clone();
        for l in &mut f.listeners {
            if l.protocol == "http" && l.route_config.is_none() {
                l.route_config = Some(only.clone());
            }
        }
    }
    let mut left_out = Vec::new();
    for l in served.listeners.values() {
        let converted = convert::listener(l).map_err(|e| e.to_string())?;
        let address = converted.address.parse::<std::net::SocketAddr>().ok();
        let clash = f.listeners.iter().find_map(|other| {
            if other.name == converted.name {
                return Some(format!(
                    "name: {:?} is used by another listener",
                    other.name
                ));
            }
            let same = address.is_some_and(|a| {
                a.port() != 0 && other.address.parse::<std::net::SocketAddr>() == Ok(a)
            });
            same.then(|| {
                format!(
                    "address: {} is used by listener {:?}",
                    converted.address, other.name
                )
            })
        });
        match clash {
            Some(reason) => left_out.push(LeftOut {
                listener: l.name.clone(),
                reason,
            }),
            None => f.listeners.push(converted),
        }
    }
    for rc in served.routes.values() {
        f.route_configs
            .push(convert::route_config(rc).map_err(|e| e.to_string())?);
    }
    let mut clusters = Published::new();
    for (name, (_, c)) in &held.clusters {
        let endpoints = held.endpoints.get(name).map(|(_, e)| e);
        clusters.insert(name.clone(), convert::cluster(c, endpoints));
    }
    let used = served
        .routes
        .values()
        .flat_map(route_clusters)
        .chain(served.listeners.values().flat_map(listener_clusters));
    for name in used {
        if !clusters.contains_key(name)
            && let Some(kept) = published.get(name)
        {
            clusters.insert(name.to_owned(), kept.clone());
        }
    }
    f.clusters.extend(clusters.values().cloned());
    Ok((f, clusters, left_out))
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
    published: Published,
    no_listener_hint_after: Duration,
}

/// What publishing did: the version, and the listeners left out (they cannot be bound, or
/// another listener has their address).
struct Outcome {
    version: u64,
    left_out: Vec<LeftOut>,
}

/// How long a gateway proxy may go without a listener before it says why that may be.
const NO_LISTENER_HINT_AFTER: Duration = Duration::from_secs(10);

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
            published: Published::new(),
            no_listener_hint_after: NO_LISTENER_HINT_AFTER,
        }
    }

    /// How long a gateway proxy goes without a listener before it logs a hint (default 10 s).
    pub fn no_listener_hint_after(mut self, after: Duration) -> Self {
        self.no_listener_hint_after = after;
        self
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
        // A gateway proxy is sent the listeners of the Gateway it names; none after a while most
        // often means that Gateway does not exist.
        let is_gateway = self.settings.node.role == api::Role::Gateway as i32;
        let no_listener_hint = tokio::time::sleep(self.no_listener_hint_after);
        tokio::pin!(no_listener_hint);
        let mut hinted = !is_gateway;
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                () = &mut no_listener_hint, if !hinted => {
                    hinted = true;
                    if self.held.listeners.is_empty() {
                        tracing::warn!(
                            gateway = %self.settings.node.gateway_name,
                            namespace = %self.settings.node.namespace,
                            after = ?self.no_listener_hint_after,
                            "no listener from the control plane yet; check that the Gateway named by --gateway exists (in this namespace) and has listeners"
                        );
                    }
                    continue;
                }
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
            let (version, refused) = self.on_response(&resp).await;
            if let Some(version) = version {
                crate::telemetry::config_applied(version);
            }
            let error_detail = if refused.is_empty() {
                None
            } else {
                crate::telemetry::config_rejected();
                let message = refused.join("\n");
                tracing::warn!(type_url = %resp.type_url, nonce = %resp.nonce, %message, "resources refused (NACK); their last good versions stay");
                Some(ErrorDetail { message })
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

    /// Applies a response to a copy of what is held and publishes the result. Returns the version
    /// published (none if nothing changed) and one line per refused resource. Should the whole
    /// fail to publish, nothing changes and the one line says why.
    async fn on_response(&mut self, resp: &DeltaDiscoveryResponse) -> (Option<u64>, Vec<String>) {
        let mut held = self.held.clone();
        let refused = held.apply(resp);
        for r in &refused {
            crate::telemetry::xds_resource_rejected(r.kind);
        }
        let mut lines: Vec<String> = refused.iter().map(ToString::to_string).collect();
        let changed = refused.len() < resp.resources.len() || !resp.removed_resources.is_empty();
        if !changed {
            return (None, lines);
        }
        let served = serve(&held, &self.served, &self.published);
        match self.publish(&held, &served).await {
            Ok(outcome) => {
                tracing::info!(
                    type_url = %resp.type_url,
                    changed = resp.resources.len() - refused.len(),
                    refused = refused.len(),
                    removed = resp.removed_resources.len(),
                    version = outcome.version,
                    "applied update from the control plane"
                );
                // A listener of this response that cannot be bound is refused by name; one that
                // became servable through another type's response is reported by readiness.
                if resp.type_url == LISTENER_TYPE {
                    for out in &outcome.left_out {
                        if resp.resources.iter().any(|r| r.name == out.listener) {
                            crate::telemetry::xds_resource_rejected("listener");
                            lines.push(format!("listener {:?}: {}", out.listener, out.reason));
                        }
                    }
                }
                self.held = held;
                self.served = served;
                (Some(outcome.version), lines)
            }
            Err(message) => {
                lines.push(message.replace('\n', "; "));
                (None, lines)
            }
        }
    }

    /// Publishes what is held again, after the static part changed.
    async fn republish(&mut self) -> Result<(), String> {
        let (held, served) = (self.held.clone(), self.served.clone());
        let outcome = self.publish(&held, &served).await?;
        crate::telemetry::config_applied(outcome.version);
        tracing::info!(version = outcome.version, "configuration reloaded");
        Ok(())
    }

    /// Validates and applies `held` as `served`, and keeps readiness honest: every listener held
    /// but not served, or not bound, is named in the store's not-serving list.
    async fn publish(&mut self, held: &Held, served: &Served) -> Result<Outcome, String> {
        let static_part = self.static_part.borrow().clone();
        let (f, published, mut left_out) = to_file(&static_part, held, served, &self.published)?;
        let config = validate::validate_dynamic(f.clone())
            .map_err(|e| name_resources(&e.to_string(), &f))?;
        let store = self.proxy.store().clone();
        let before = store.not_serving();
        let warming = warming(held, served, &self.published);
        // Listeners about to warm are not ready from before the new version is published.
        let mut meanwhile: Vec<String> = before.iter().cloned().collect();
        meanwhile.extend(warming.iter().filter(|w| !before.contains(w)).cloned());
        store.set_not_serving(meanwhile);
        let applied = match self.proxy.apply_leaving_unbound(config).await {
            Ok(applied) => applied,
            Err(e) => {
                store.set_not_serving(before.to_vec());
                return Err(name_resources(&e.to_string(), &f));
            }
        };
        left_out.extend(applied.unbound.iter().map(|e| LeftOut {
            listener: e.name.to_string(),
            reason: format!("address: cannot bind {}: {}", e.address, e.source),
        }));
        let mut not_serving = warming;
        for out in &left_out {
            let line = format!("listener {:?} not serving: {}", out.listener, out.reason);
            // Said once, not on every update while it lasts; readiness keeps saying it.
            if !before.contains(&line) {
                tracing::warn!(listener = %out.listener, reason = %out.reason, "listener not serving");
            }
            not_serving.push(line);
        }
        store.set_not_serving(not_serving);
        self.published = published;
        Ok(Outcome {
            version: applied.version,
            left_out,
        })
    }
}
