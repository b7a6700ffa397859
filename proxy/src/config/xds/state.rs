//! What the client holds and serves, as pure data: the resources accepted (each checked on its
//! own), which listeners can be served from them (warming falls back to what was served), and the
//! bootstrap-file form of it all for the validate → compile → publish path.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use trellis_proto::discovery::v1::{
    self as api, CLUSTER_LOAD_ASSIGNMENT_TYPE, CLUSTER_TYPE, DeltaDiscoveryResponse, LISTENER_TYPE,
    POLICY_TYPE, ROUTE_CONFIGURATION_TYPE, SECRET_TYPE, resource::Kind,
};

use super::{Refused, check, convert};
use crate::{
    authz,
    config::{
        bootstrap as file, model,
        validate::{self, Checked},
    },
};

/// Every resource the proxy holds, by type and name, with its version. Each is shared, so copying
/// what is held costs a pointer per resource, and an unchanged resource keeps its identity (what
/// it was converted and checked to is reused while it does).
#[derive(Clone, Debug, Default)]
pub(super) struct Held {
    pub(super) clusters: BTreeMap<String, (String, Arc<api::Cluster>)>,
    pub(super) endpoints: BTreeMap<String, (String, Arc<api::ClusterLoadAssignment>)>,
    pub(super) listeners: BTreeMap<String, (String, Arc<api::Listener>)>,
    pub(super) routes: BTreeMap<String, (String, Arc<api::RouteConfiguration>)>,
    /// Certificates and trust bundles, each checked on arrival; held whether or not anything
    /// names them yet (the control plane sends only those this proxy's configuration uses).
    pub(super) secrets: BTreeMap<String, (String, Arc<api::Secret>)>,
    /// Authorization policies, converted on arrival (a sidecar only). They are put in force on
    /// their own, beside the compiled configuration.
    pub(super) policies: BTreeMap<String, (String, Arc<authz::Policy>)>,
    /// The last refusal of each (type, name) with no version accepted since, so readiness can
    /// say that a listener waits on a refused resource rather than on one still to come.
    pub(super) refused: BTreeMap<(&'static str, String), String>,
}

impl Held {
    pub(super) fn versions(&self, type_url: &str) -> HashMap<String, String> {
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
            SECRET_TYPE => v(&self.secrets),
            POLICY_TYPE => v(&self.policies),
            _ => HashMap::new(),
        }
    }

    /// Names the by-name types should be subscribed to: the endpoints of every held cluster, the
    /// route configurations of every held HTTP listener.
    pub(super) fn wanted(&self, type_url: &str) -> BTreeSet<String> {
        match type_url {
            CLUSTER_LOAD_ASSIGNMENT_TYPE => self.clusters.keys().cloned().collect(),
            ROUTE_CONFIGURATION_TYPE => self
                .listeners
                .values()
                .flat_map(|(_, l)| listener_routes(l))
                .map(str::to_owned)
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    /// Applies one response's additions and removals. Each resource is checked on its own; a
    /// refused one leaves the version held before (if any) in place.
    pub(super) fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<Refused> {
        let type_url = resp.type_url.as_str();
        let mut refused = Vec::new();
        for r in &resp.resources {
            let v = r.version.clone();
            let name = r.name.clone();
            let checked = match (type_url, &r.kind) {
                (CLUSTER_TYPE, Some(Kind::Cluster(c))) => check::cluster(&name, c)
                    .map(|()| drop(self.clusters.insert(name, (v, Arc::new(c.clone()))))),
                (CLUSTER_LOAD_ASSIGNMENT_TYPE, Some(Kind::ClusterLoadAssignment(c))) => {
                    let cluster = self.clusters.get(&name).map(|(_, c)| &**c);
                    check::endpoints(&name, c, cluster)
                        .map(|()| drop(self.endpoints.insert(name, (v, Arc::new(c.clone())))))
                }
                (LISTENER_TYPE, Some(Kind::Listener(l))) => check::listener(&name, l)
                    .map(|()| drop(self.listeners.insert(name, (v, Arc::new(l.clone()))))),
                (ROUTE_CONFIGURATION_TYPE, Some(Kind::RouteConfiguration(rc))) => {
                    check::route_config(&name, rc)
                        .map(|()| drop(self.routes.insert(name, (v, Arc::new(rc.clone())))))
                }
                (SECRET_TYPE, Some(Kind::Secret(sec))) => {
                    check::secret(&name, sec, std::time::SystemTime::now())
                        .map(|()| drop(self.secrets.insert(name, (v, Arc::new(sec.clone())))))
                }
                (POLICY_TYPE, Some(Kind::Policy(p))) => {
                    policy(&name, p).map(|p| drop(self.policies.insert(name, (v, Arc::new(p)))))
                }
                _ => Err(Refused::new(
                    type_kind(type_url),
                    format!("resource {name:?}"),
                    format!("its kind does not match the response type {type_url}"),
                )),
            };
            let key = (type_kind(type_url), r.name.clone());
            match checked {
                Ok(()) => drop(self.refused.remove(&key)),
                Err(e) => {
                    self.refused.insert(key, e.reason.clone());
                    refused.push(e);
                }
            }
        }
        for name in &resp.removed_resources {
            self.refused.remove(&(type_kind(type_url), name.clone()));
            match type_url {
                CLUSTER_TYPE => drop(self.clusters.remove(name)),
                CLUSTER_LOAD_ASSIGNMENT_TYPE => drop(self.endpoints.remove(name)),
                LISTENER_TYPE => drop(self.listeners.remove(name)),
                ROUTE_CONFIGURATION_TYPE => drop(self.routes.remove(name)),
                SECRET_TYPE => drop(self.secrets.remove(name)),
                POLICY_TYPE => drop(self.policies.remove(name)),
                _ => {}
            }
        }
        refused
    }

    /// The policies held, by name, ready to put in force. A policy refused with no good
    /// version to keep stands as one that denies every call until a good version (or its
    /// removal) arrives: leaving it out would open the workload (its only ALLOW policy, or a
    /// DENY policy, simply gone).
    pub(super) fn policy_set(&self) -> authz::PolicySet {
        let refused = self
            .refused
            .keys()
            .filter(|(kind, name)| *kind == "policy" && !self.policies.contains_key(name))
            .map(|(_, name)| Arc::new(authz::Policy::deny_all(name)));
        authz::PolicySet::new(
            self.policies
                .values()
                .map(|(_, p)| p.clone())
                .chain(refused),
        )
    }
}

/// A policy, converted and checked; refused by name with the field at fault
/// (`policy "shop/p": rules[0].source_cidrs[1]: "10.0.0.0/33" is not a CIDR: ...`).
fn policy(name: &str, p: &api::Policy) -> Result<authz::Policy, Refused> {
    let refused = |reason: String| Refused::new("policy", format!("policy {name:?}"), reason);
    if p.name != name {
        return Err(refused(format!(
            "name: {:?} does not match the resource name",
            p.name
        )));
    }
    authz::Policy::try_from(p).map_err(|e| refused(e.to_string()))
}

/// The metric label of a response type.
pub(super) fn type_kind(type_url: &str) -> &'static str {
    match type_url {
        CLUSTER_TYPE => "cluster",
        CLUSTER_LOAD_ASSIGNMENT_TYPE => "endpoints",
        LISTENER_TYPE => "listener",
        ROUTE_CONFIGURATION_TYPE => "route_config",
        SECRET_TYPE => "secret",
        POLICY_TYPE => "policy",
        _ => "unknown",
    }
}

/// The part of the held resources that is served: every held cluster, and every listener whose
/// dependencies are all held (falling back to the version served before while a new one warms).
#[derive(Clone, Debug, Default)]
pub(super) struct Served {
    pub(super) listeners: BTreeMap<String, Arc<api::Listener>>,
    pub(super) routes: BTreeMap<String, Arc<api::RouteConfiguration>>,
    /// Every held secret, and the version last served of one a served listener still names
    /// after the control plane removed it (a serving listener never loses its certificate).
    pub(super) secrets: BTreeMap<String, Arc<api::Secret>>,
}

pub(super) fn route_clusters(rc: &api::RouteConfiguration) -> impl Iterator<Item = &str> {
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

/// The route configurations a listener routes by: an HTTP listener's one, or those of a capture
/// listener's HTTP entries.
pub(super) fn listener_routes(l: &api::Listener) -> Vec<&str> {
    match &l.kind {
        Some(api::listener::Kind::Http(h)) => vec![h.route_config.as_str()],
        Some(api::listener::Kind::Capture(c)) => {
            let mut names: Vec<&str> = c
                .services
                .iter()
                .map(|s| s.route_config.as_str())
                .filter(|n| !n.is_empty())
                .collect();
            names.sort_unstable();
            names.dedup();
            names
        }
        _ => Vec::new(),
    }
}

/// The clusters a listener sends connections to itself (not through routes); it waits for them.
/// A capture listener's entries all count: any of them may take a connection as TCP.
pub(super) fn listener_clusters(l: &api::Listener) -> Vec<&str> {
    match &l.kind {
        Some(api::listener::Kind::Tcp(t)) => vec![t.cluster.as_str()],
        Some(api::listener::Kind::Capture(c)) => {
            let mut names: Vec<&str> = c.services.iter().map(|s| s.cluster.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names
        }
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
/// cluster the control plane removed goes on with, and the checked form of each held cluster that
/// is reused while neither it nor its endpoints change.
pub(super) type Published = BTreeMap<String, Arc<CheckedCluster>>;

/// A cluster with its endpoints, converted and checked on its own.
#[derive(Debug)]
pub(super) struct CheckedCluster {
    /// What it was made from; kept so their identity cannot be reused by another resource.
    source: (Arc<api::Cluster>, Option<Arc<api::ClusterLoadAssignment>>),
    /// The secrets its TLS names, as checked with it: a new version of one (a rotated CA bundle
    /// or client certificate) checks the cluster again.
    secrets: Vec<Arc<api::Secret>>,
    pub(super) checked: Checked<model::Cluster>,
}

impl CheckedCluster {
    fn new(
        c: &Arc<api::Cluster>,
        endpoints: Option<&Arc<api::ClusterLoadAssignment>>,
        secrets: Vec<Arc<api::Secret>>,
    ) -> Self {
        let converted = convert::cluster(c, endpoints.map(|e| &**e));
        let named = secrets.iter().map(|s| convert::secret(s)).collect();
        CheckedCluster {
            source: (c.clone(), endpoints.cloned()),
            checked: validate::check_cluster_with_secrets(&converted, named),
            secrets,
        }
    }

    fn made_from(
        &self,
        c: &Arc<api::Cluster>,
        endpoints: Option<&Arc<api::ClusterLoadAssignment>>,
        secrets: &[Arc<api::Secret>],
    ) -> bool {
        Arc::ptr_eq(&self.source.0, c)
            && match (&self.source.1, endpoints) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
            && self.secrets.len() == secrets.len()
            && self
                .secrets
                .iter()
                .zip(secrets)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// Route configurations as last published, converted and checked, by name: reused while the
/// served version is the same.
pub(super) type CheckedRoutes = BTreeMap<String, Arc<CheckedRoute>>;

/// A route configuration converted (or why it could not be) and checked on its own.
#[derive(Debug)]
pub(super) struct CheckedRoute {
    source: Arc<api::RouteConfiguration>,
    pub(super) checked: Result<Checked<model::RouteConfig>, String>,
}

impl CheckedRoute {
    fn new(rc: &Arc<api::RouteConfiguration>) -> Self {
        CheckedRoute {
            source: rc.clone(),
            checked: convert::route_config(rc)
                .map(|f| validate::check_route_config(&f))
                .map_err(|e| e.to_string()),
        }
    }
}

/// Why a listener cannot be served from `held` (its fresh version), if it cannot.
pub(super) fn waiting_for(held: &Held, published: &Published, l: &api::Listener) -> Option<String> {
    if let Some(s) = convert::listener_secrets(l)
        .into_iter()
        .find(|s| !held.secrets.contains_key(*s))
    {
        return Some(match held.refused.get(&("secret", s.to_owned())) {
            Some(why) => format!("secret {s:?} was refused: {why}"),
            None => format!("waiting for secret {s:?}"),
        });
    }
    for c in listener_clusters(l) {
        if !listener_cluster_ready(held, published, c) {
            return Some(if held.endpoints.contains_key(c) {
                format!("waiting for the secrets of cluster {c:?}")
            } else if held.clusters.contains_key(c) {
                format!("waiting for the endpoints of cluster {c:?}")
            } else {
                format!("waiting for cluster {c:?}")
            });
        }
    }
    for name in listener_routes(l) {
        let Some((_, rc)) = held.routes.get(name) else {
            return Some(match held.refused.get(&("route_config", name.to_owned())) {
                Some(why) => format!("route config {name:?} was refused: {why}"),
                None => format!("waiting for route config {name:?}"),
            });
        };
        if let Some(c) = route_clusters(rc).find(|c| !route_cluster_ready(held, c)) {
            return Some(match held.refused.get(&("endpoints", c.to_owned())) {
                Some(why) => format!("the endpoints of cluster {c:?} were refused: {why}"),
                None if held.endpoints.contains_key(c) => {
                    format!("waiting for the secrets of cluster {c:?}")
                }
                None => format!("waiting for the endpoints of cluster {c:?}"),
            });
        }
    }
    None
}

/// A held cluster whose endpoints have not arrived warms. A cluster not held at all is not waited
/// for: that backend's share is answered with an error at request time.
pub(super) fn route_cluster_ready(held: &Held, c: &str) -> bool {
    match held.clusters.get(c) {
        None => true,
        Some((_, cluster)) => held.endpoints.contains_key(c) && cluster_secrets_held(held, cluster),
    }
}

/// Whether the secrets a cluster's TLS names (CA bundle, client certificate) are held.
fn cluster_secrets_held(held: &Held, c: &api::Cluster) -> bool {
    convert::cluster_secrets(c)
        .into_iter()
        .all(|s| held.secrets.contains_key(s))
}

/// A TCP or TLS listener serves one cluster per connection, so it waits for the cluster itself.
pub(super) fn listener_cluster_ready(held: &Held, published: &Published, c: &str) -> bool {
    match held.clusters.get(c) {
        Some((_, cluster)) => held.endpoints.contains_key(c) && cluster_secrets_held(held, cluster),
        None => published.contains_key(c),
    }
}

/// Which listeners and route configurations can be served from `held`, given what was served.
pub(super) fn serve(held: &Held, served: &Served, published: &Published) -> Served {
    let mut out = Served::default();
    // A listener's secrets: as held, else as served before (removed since, still named).
    let secret = |s: &str| {
        held.secrets
            .get(s)
            .map(|(_, sec)| sec.clone())
            .or_else(|| served.secrets.get(s).cloned())
    };
    for (name, (_, l)) in &held.listeners {
        let resolve =
            |l: &Arc<api::Listener>,
             routes: &dyn Fn(&str) -> Option<Arc<api::RouteConfiguration>>| {
                if !convert::listener_secrets(l)
                    .into_iter()
                    .all(|s| secret(s).is_some())
                {
                    return None;
                }
                if !listener_clusters(l)
                    .into_iter()
                    .all(|c| listener_cluster_ready(held, published, c))
                {
                    return None;
                }
                let mut rcs = Vec::new();
                for name in listener_routes(l) {
                    let rc = routes(name)?;
                    if !route_clusters(&rc).all(|c| route_cluster_ready(held, c)) {
                        return None;
                    }
                    rcs.push(rc);
                }
                Some((l.clone(), rcs))
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
            Some((listener, rcs)) => {
                for rc in rcs {
                    out.routes.insert(rc.name.clone(), rc);
                }
                out.listeners.insert(name.clone(), listener);
            }
            None => {
                tracing::debug!(listener = %name, "listener warming: waiting for its routes, endpoints or secrets")
            }
        }
    }
    out.secrets = held
        .secrets
        .iter()
        .map(|(name, (_, sec))| (name.clone(), sec.clone()))
        .collect();
    let named: Vec<String> = out
        .listeners
        .values()
        .flat_map(|l| convert::listener_secrets(l))
        .map(str::to_owned)
        .collect();
    for s in named {
        if let Some(kept) = secret(&s) {
            out.secrets.entry(s).or_insert(kept);
        }
    }
    out
}

/// One line per held listener that nothing can be served for yet.
pub(super) fn warming(held: &Held, served: &Served, published: &Published) -> Vec<String> {
    held.listeners
        .iter()
        .filter(|(name, _)| !served.listeners.contains_key(*name))
        .map(|(name, (_, l))| {
            let why = waiting_for(held, published, l)
                .unwrap_or_else(|| "waiting for its routes, endpoints or secrets".into());
            format!("listener {name:?} not serving: {why}")
        })
        .collect()
}

/// A served listener left out of what is published, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LeftOut {
    pub(super) listener: String,
    /// The field at fault and the problem: `address: cannot bind 127.0.0.1:80: ...`.
    pub(super) reason: String,
}

impl LeftOut {
    /// Its readiness line: `listener "l2" not serving: address: cannot bind ...`.
    pub(super) fn not_serving(&self) -> String {
        format!("listener {:?} not serving: {}", self.listener, self.reason)
    }
}

/// What is served, checked and assembled after the static part of the file.
pub(super) struct Assembled {
    pub(super) config: model::Config,
    /// The static part with the served listeners placed after its own; the dynamic route
    /// configurations and clusters follow its own in `config`, in the order of `served.routes`
    /// and `published`.
    pub(super) file: file::File,
    /// The dynamic clusters in `config`.
    pub(super) published: Published,
    pub(super) routes: CheckedRoutes,
    /// Served listeners left out because another listener has their name or address (the one
    /// already placed keeps it, so a dynamic listener never displaces a static one).
    pub(super) left_out: Vec<LeftOut>,
}

/// What is served, after the static part of the file, validated as one configuration. A cluster
/// whose version and endpoints are those of the last publish, and a route configuration served
/// as last published, are not converted or checked again: only the checks across resources run.
pub(super) fn assemble(
    static_part: &file::File,
    held: &Held,
    served: &Served,
    published: &Published,
    checked_routes: &CheckedRoutes,
) -> Result<Assembled, String> {
    let mut f = file::File {
        listeners: static_part.listeners.clone(),
        route_configs: static_part.route_configs.clone(),
        clusters: static_part.clusters.clone(),
        xds: None,
        secrets: static_part.secrets.clone(),
        drain_delay: None,
    };
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
    // A secret of the file keeps its name, as the file's listeners keep theirs.
    for sec in served.secrets.values() {
        if f.secrets.iter().any(|s| s.name == sec.name) {
            tracing::debug!(secret = %sec.name, "secret from the control plane shadowed by the bootstrap file's");
            continue;
        }
        f.secrets.push(convert::secret(sec));
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
    let mut routes = CheckedRoutes::new();
    for (name, rc) in &served.routes {
        let checked = match checked_routes.get(name) {
            Some(c) if Arc::ptr_eq(&c.source, rc) => c.clone(),
            _ => Arc::new(CheckedRoute::new(rc)),
        };
        if let Err(e) = &checked.checked {
            return Err(e.clone());
        }
        routes.insert(name.clone(), checked);
    }
    let mut clusters = Published::new();
    for (name, (_, c)) in &held.clusters {
        let endpoints = held.endpoints.get(name).map(|(_, e)| e);
        let secrets: Vec<Arc<api::Secret>> = convert::cluster_secrets(c)
            .into_iter()
            .filter_map(|s| served.secrets.get(s).cloned())
            .collect();
        let checked = match published.get(name) {
            Some(p) if p.made_from(c, endpoints, &secrets) => p.clone(),
            _ => Arc::new(CheckedCluster::new(c, endpoints, secrets)),
        };
        clusters.insert(name.clone(), checked);
    }
    let used = served
        .routes
        .values()
        .flat_map(|rc| route_clusters(rc))
        .chain(served.listeners.values().flat_map(|l| listener_clusters(l)));
    for name in used {
        if !clusters.contains_key(name)
            && let Some(kept) = published.get(name)
        {
            clusters.insert(name.to_owned(), kept.clone());
        }
    }
    let route_list: Vec<&Checked<model::RouteConfig>> = routes
        .values()
        .filter_map(|r| r.checked.as_ref().ok())
        .collect();
    let cluster_list: Vec<&Checked<model::Cluster>> =
        clusters.values().map(|c| &c.checked).collect();
    let config = validate::validate_dynamic_prechecked(&f, &route_list, &cluster_list)
        .map_err(|e| name_resources(&e.to_string(), &f, served, &clusters))?;
    Ok(Assembled {
        config,
        file: f,
        published: clusters,
        routes,
        left_out,
    })
}

/// `route_configs[3]` → `route_configs[3] "outbound/default/web:80"`, so a NACK names resources.
/// `f` holds the static part and the placed listeners; the served route configurations and the
/// published clusters follow its own, as in [`Assembled::config`].
pub(super) fn name_resources(
    message: &str,
    f: &file::File,
    served: &Served,
    published: &Published,
) -> String {
    let mut out = message.to_owned();
    let lists: [(&str, Vec<&str>); 4] = [
        (
            "secrets",
            f.secrets.iter().map(|s| s.name.as_str()).collect(),
        ),
        (
            "listeners",
            f.listeners.iter().map(|l| l.name.as_str()).collect(),
        ),
        (
            "route_configs",
            f.route_configs
                .iter()
                .map(|r| r.name.as_str())
                .chain(served.routes.keys().map(String::as_str))
                .collect(),
        ),
        (
            "clusters",
            f.clusters
                .iter()
                .map(|c| c.name.as_str())
                .chain(published.keys().map(String::as_str))
                .collect(),
        ),
    ];
    for (field, names) in lists {
        for (i, name) in names.iter().enumerate() {
            out = out.replace(&format!("{field}[{i}]"), &format!("{field}[{i}] {name:?}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(name: &str, port: u16) -> api::ClusterLoadAssignment {
        api::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![api::Endpoint {
                address: format!("127.0.0.1:{port}"),
                weight: 1,
                health: api::EndpointHealth::Ready as i32,
                identity: String::new(),
            }],
        }
    }

    /// Clusters c0..c{n}, each with an endpoint, a route config forwarding to all of them, and
    /// an HTTP listener using it.
    fn held(n: usize) -> Held {
        let mut held = Held::default();
        let mut routes = Vec::new();
        for i in 0..n {
            let name = format!("c{i}");
            let cluster = api::Cluster {
                name: name.clone(),
                ..Default::default()
            };
            held.clusters
                .insert(name.clone(), ("1".into(), Arc::new(cluster)));
            held.endpoints.insert(
                name.clone(),
                ("1".into(), Arc::new(endpoints(&name, 8000 + i as u16))),
            );
            routes.push(api::Route {
                name: format!("r{i}"),
                r#match: Some(api::RouteMatch {
                    path: Some(api::route_match::Path::Prefix(format!("/{name}"))),
                    ..Default::default()
                }),
                action: Some(api::route::Action::Forward(api::ForwardAction {
                    clusters: vec![api::WeightedCluster {
                        cluster: name,
                        weight: 1,
                    }],
                })),
                ..Default::default()
            });
        }
        let rc = api::RouteConfiguration {
            name: "rc".into(),
            virtual_hosts: vec![api::VirtualHost {
                name: "vh".into(),
                domains: vec!["*".into()],
                routes,
                ..Default::default()
            }],
        };
        held.routes.insert("rc".into(), ("1".into(), Arc::new(rc)));
        let listener = api::Listener {
            max_connections: None,
            name: "l".into(),
            address: "127.0.0.1:0".into(),
            kind: Some(api::listener::Kind::Http(api::HttpListener {
                route_config: "rc".into(),
                ..Default::default()
            })),
        };
        held.listeners
            .insert("l".into(), ("1".into(), Arc::new(listener)));
        held
    }

    /// The whole configuration converted and validated at once, as before the checked forms
    /// were kept: what assembling must agree with.
    fn validated_whole(held: &Held, served: &Served) -> Result<model::Config, String> {
        let f = file::File {
            listeners: served
                .listeners
                .values()
                .map(|l| convert::listener(l).unwrap())
                .collect(),
            route_configs: served
                .routes
                .values()
                .map(|rc| convert::route_config(rc).unwrap())
                .collect(),
            clusters: held
                .clusters
                .iter()
                .map(|(name, (_, c))| {
                    convert::cluster(c, held.endpoints.get(name).map(|(_, e)| &**e))
                })
                .collect(),
            xds: None,
            secrets: served
                .secrets
                .values()
                .map(|s| convert::secret(s))
                .collect(),
            drain_delay: None,
        };
        validate::validate_dynamic(f.clone())
            .map_err(|e| name_resources(&e.to_string(), &f, &Served::default(), &Published::new()))
    }

    #[test]
    fn an_endpoint_change_checks_only_its_cluster_again() {
        let static_part = file::File::default();
        let mut held = held(3);
        let served = serve(&held, &Served::default(), &Published::new());
        assert_eq!(served.listeners.len(), 1, "the listener is served");
        let first = assemble(
            &static_part,
            &held,
            &served,
            &Published::new(),
            &CheckedRoutes::new(),
        )
        .unwrap();
        assert_eq!(Ok(first.config.clone()), validated_whole(&held, &served));

        held.endpoints
            .insert("c1".into(), ("2".into(), Arc::new(endpoints("c1", 9001))));
        let served = serve(&held, &served, &first.published);
        let second = assemble(
            &static_part,
            &held,
            &served,
            &first.published,
            &first.routes,
        )
        .unwrap();
        assert_eq!(Ok(second.config.clone()), validated_whole(&held, &served));
        assert_ne!(
            first.config, second.config,
            "the new endpoint is in the config"
        );
        for name in ["c0", "c2"] {
            assert!(
                Arc::ptr_eq(&first.published[name], &second.published[name]),
                "cluster {name} was checked again though neither it nor its endpoints changed"
            );
        }
        assert!(
            !Arc::ptr_eq(&first.published["c1"], &second.published["c1"]),
            "cluster c1 was not checked again after its endpoints changed"
        );
        assert!(
            Arc::ptr_eq(&first.routes["rc"], &second.routes["rc"]),
            "the unchanged route config was checked again"
        );
    }

    /// `held(1)`'s listener terminating TLS with the certificate of secret `s`.
    fn with_tls_listener(held: &mut Held, secret: &str, version: &str) {
        let listener = api::Listener {
            max_connections: None,
            name: "l".into(),
            address: "127.0.0.1:0".into(),
            kind: Some(api::listener::Kind::Http(api::HttpListener {
                route_config: "rc".into(),
                tls: Some(api::ListenerTls {
                    certificates: vec![api::ServerCertificate {
                        server_names: vec!["a.example".into()],
                        secret: secret.into(),
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        held.listeners
            .insert("l".into(), (version.into(), Arc::new(listener)));
    }

    fn secret(name: &str, chain: &str) -> Arc<api::Secret> {
        Arc::new(api::Secret {
            name: name.into(),
            certificate_chain: chain.into(),
            private_key: "key".into(),
            ca_bundle: String::new(),
        })
    }

    #[test]
    fn a_listener_waits_for_its_secret_and_keeps_it_once_served() {
        let mut held = held(1);
        with_tls_listener(&mut held, "s", "2");
        let published = Published::new();
        let served = serve(&held, &Served::default(), &published);
        assert!(
            served.listeners.is_empty(),
            "served without its certificate"
        );
        assert_eq!(
            warming(&held, &served, &published),
            [r#"listener "l" not serving: waiting for secret "s""#]
        );
        held.refused
            .insert(("secret", "s".into()), "certificate_chain: bad".into());
        assert_eq!(
            warming(&held, &served, &published),
            [r#"listener "l" not serving: secret "s" was refused: certificate_chain: bad"#]
        );

        held.refused.clear();
        held.secrets
            .insert("s".into(), ("1".into(), secret("s", "v1")));
        held.secrets
            .insert("unused".into(), ("1".into(), secret("unused", "u")));
        let served = serve(&held, &served, &published);
        assert!(served.listeners.contains_key("l"));
        assert_eq!(
            served.secrets.keys().collect::<Vec<_>>(),
            ["s", "unused"],
            "every held secret is served, used or not"
        );
        assert!(warming(&held, &served, &published).is_empty());

        // The control plane removes the secret while the listener still names it: the listener
        // goes on with the version it was served with.
        held.secrets.clear();
        let served = serve(&held, &served, &published);
        assert!(served.listeners.contains_key("l"));
        assert_eq!(served.secrets.keys().collect::<Vec<_>>(), ["s"]);
        assert_eq!(served.secrets["s"].certificate_chain, "v1");

        // A new listener version naming a secret not held falls back to the version served.
        with_tls_listener(&mut held, "t", "3");
        let served = serve(&held, &served, &published);
        let l = &served.listeners["l"];
        assert_eq!(
            convert::listener_secrets(l),
            ["s"],
            "the previous version serves"
        );
    }

    #[test]
    fn secrets_are_converted_with_the_key_redacted_in_debug() {
        let converted = convert::secret(&api::Secret {
            name: "s".into(),
            certificate_chain: "chain".into(),
            private_key: "super-secret-key".into(),
            ca_bundle: String::new(),
        });
        assert_eq!(converted.name, "s");
        assert_eq!(converted.certificate_chain.as_deref(), Some("chain"));
        assert_eq!(converted.ca_bundle, None);
        assert_eq!(
            converted.private_key.as_ref().map(|k| k.expose()),
            Some("super-secret-key")
        );
        let shown = format!("{converted:?}");
        assert!(!shown.contains("super-secret-key"), "{shown}");
    }

    #[test]
    fn a_bad_cluster_is_named_as_when_the_whole_is_validated() {
        let mut held = held(3);
        let bad = api::Cluster {
            name: "c1".into(),
            retry_budget: Some(api::RetryBudget {
                window_ms: 100,
                ..Default::default()
            }),
            ..Default::default()
        };
        held.clusters
            .insert("c1".into(), ("2".into(), Arc::new(bad)));
        let served = serve(&held, &Served::default(), &Published::new());
        let err = assemble(
            &file::File::default(),
            &held,
            &served,
            &Published::new(),
            &CheckedRoutes::new(),
        )
        .err()
        .expect("the bad cluster is refused");
        assert!(
            err.contains(r#"clusters[1] "c1".retry_budget.window"#),
            "{err}"
        );
        assert_eq!(Err(err), validated_whole(&held, &served));
    }

    fn capture_listener(services: Vec<api::CapturedService>) -> Arc<api::Listener> {
        Arc::new(api::Listener {
            max_connections: None,
            name: "outbound".into(),
            address: "127.0.0.1:0".into(),
            kind: Some(api::listener::Kind::Capture(api::CaptureListener {
                services,
                ..Default::default()
            })),
        })
    }

    fn captured(port: u32, cluster: &str, route_config: &str) -> api::CapturedService {
        api::CapturedService {
            ip: "10.96.0.10".into(),
            port,
            cluster: cluster.into(),
            protocol: api::AppProtocol::Http as i32,
            route_config: route_config.into(),
        }
    }

    #[test]
    fn a_capture_listener_subscribes_to_and_waits_for_each_route_config_it_names() {
        let mut held = held(2);
        held.listeners.clear();
        held.routes.clear();
        held.listeners.insert(
            "outbound".into(),
            (
                "1".into(),
                capture_listener(vec![
                    captured(80, "c0", "rc"),
                    captured(81, "c1", "other"),
                    captured(82, "c1", "rc"),
                    captured(83, "c0", ""),
                ]),
            ),
        );
        assert_eq!(
            held.wanted(ROUTE_CONFIGURATION_TYPE),
            BTreeSet::from(["other".to_owned(), "rc".to_owned()])
        );
        let published = Published::new();
        let served = serve(&held, &Served::default(), &published);
        assert!(served.listeners.is_empty(), "served without its routes");
        assert_eq!(
            warming(&held, &served, &published),
            [r#"listener "outbound" not serving: waiting for route config "other""#]
        );
        for name in ["rc", "other"] {
            let rc = api::RouteConfiguration {
                name: name.into(),
                virtual_hosts: Vec::new(),
            };
            held.routes.insert(name.into(), ("1".into(), Arc::new(rc)));
        }
        let served = serve(&held, &served, &published);
        assert!(served.listeners.contains_key("outbound"));
        assert_eq!(served.routes.keys().collect::<Vec<_>>(), ["other", "rc"]);
        let assembled = assemble(
            &file::File::default(),
            &held,
            &served,
            &published,
            &CheckedRoutes::new(),
        )
        .unwrap();
        match &assembled.config.listeners[0].kind {
            model::ListenerKind::Capture(c) => assert_eq!(c.services.len(), 4),
            other => panic!("{other:?}"),
        }

        // A cluster an entry names is waited for, as a TCP listener's.
        held.endpoints.remove("c1");
        let fresh = serve(&held, &Served::default(), &published);
        assert!(fresh.listeners.is_empty());
        assert_eq!(
            warming(&held, &fresh, &published),
            [r#"listener "outbound" not serving: waiting for the endpoints of cluster "c1""#]
        );
    }
}
