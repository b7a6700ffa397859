//! Typed config → what requests need: a route table per listener, and the clusters with their
//! pools. Runs off the request path, once per accepted update.
//!
//! Updates are incremental: a cluster whose model did not change is reused as is, and a route
//! table whose route configuration did not change is reused with its rate-limit buckets. Route
//! tables never hold a cluster: a forward target names a cluster by its slot, a number that stays
//! the same across versions for as long as the name is in use, and a request looks the slot up in
//! the version it loaded. So an endpoint change rebuilds one cluster and no route table.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use super::{
    model::{
        self, Action, Config, HttpConnection, ListenerKind, PathMatch, RouteConfig, TokenBucket,
    },
    validate::{ConfigErrors, FieldError, resilience::default_retry_policy},
};
use crate::{
    capture::{CaptureEntry, CaptureTable},
    http::{
        route::{Backends, Route, RouteAction, Slot},
        router::{RouteTable, VhostInput},
    },
    identity::mtls::MeshTls,
    l4::{SniTable, TcpTarget},
    ratelimit::RateLimiter,
    telemetry::{CaptureMetrics, handles},
    tls::{TlsServer, material},
    upstream::Cluster,
};

pub type Routes = RouteTable<Arc<Route>>;

/// What a listener does with a connection, resolved against this config's clusters and routes.
#[derive(Debug, Clone)]
pub enum CompiledListener {
    Http {
        routes: Arc<Routes>,
        connection: HttpConnection,
        /// Terminate TLS first.
        tls: Option<Arc<TlsServer>>,
    },
    Tcp(Arc<TcpTarget>),
    TlsPassthrough(Arc<SniTable>),
    /// A sidecar's capture listener: the original destination picks an entry.
    Capture(Arc<CaptureTable>),
}

/// What a forward target's slot stands for in one version.
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: Arc<str>,
    /// `None`: the configuration holds no cluster of that name; the target's share of requests
    /// is answered 500 `backend-not-found` (as the Gateway API asks of an invalid backendRef).
    pub cluster: Option<Arc<Cluster>>,
}

/// A compiled route configuration and what it was built from, kept for the next update.
#[derive(Debug)]
struct Table {
    model: RouteConfig,
    routes: Arc<Routes>,
    /// The HTTP listeners serving it, sorted. Its routes keep metric handles per listener, so a
    /// table is not reused once a listener stopped serving it (those series are dropped).
    listeners: Vec<Arc<str>>,
}

/// A configuration ready to serve. Published whole through the [`Store`](super::Store).
#[derive(Debug)]
pub struct Compiled {
    pub version: u64,
    pub config: Arc<Config>,
    /// What each listener does, by listener name.
    pub listeners: HashMap<Arc<str>, CompiledListener>,
    pub clusters: HashMap<Arc<str>, Arc<Cluster>>,
    /// Token buckets by owner (`listener/NAME`, `vhost/RC/VH`, `route/RC/VH/ROUTE`); a bucket
    /// whose owner and settings survive an update keeps its tokens.
    pub rate_limiters: HashMap<String, Arc<RateLimiter>>,
    /// The connection buckets of TCP and TLS passthrough listeners, by listener name, so an
    /// accepted connection finds its bucket without building a key.
    listener_limits: HashMap<Arc<str>, Arc<RateLimiter>>,
    /// Indexed by slot. A slot no name uses has an empty name and no cluster.
    backends: Box<[Backend]>,
    /// Every cluster name in use (held clusters and forward targets) with its slot.
    slots: HashMap<Arc<str>, Slot>,
    /// Route tables by route configuration name.
    tables: HashMap<Arc<str>, Table>,
    /// The route table of each HTTP entry of a capture listener, by its key
    /// ([`CaptureEntry::routes`]).
    capture_routes: HashMap<Arc<str>, Arc<Routes>>,
    /// Each certificate secret's name, its leaf's first DNS name and `notAfter`.
    secret_expiry: Vec<(Arc<str>, Arc<str>, std::time::SystemTime)>,
}

impl Compiled {
    /// The route table of an HTTP listener, or of a capture listener's entry by its key.
    pub fn http_routes(&self, listener: &str) -> Option<&Arc<Routes>> {
        match self.listeners.get(listener) {
            Some(CompiledListener::Http { routes, .. }) => Some(routes),
            _ => self.capture_routes.get(listener),
        }
    }

    /// What a forward target of one of this version's routes names. One index: this is on the
    /// request path.
    pub fn backend(&self, slot: Slot) -> Option<&Backend> {
        self.backends.get(slot.0 as usize)
    }

    /// Compiles `config`, carrying clusters, route tables, connection pools, balancer positions
    /// and rate-limit buckets over from `previous` (the version in force).
    pub fn build(
        config: Arc<Config>,
        version: u64,
        previous: Option<&Compiled>,
    ) -> Result<Compiled, ConfigErrors> {
        Self::build_with_mesh(config, version, previous, None)
    }

    /// [`Compiled::build`] for a proxy that holds a workload identity (`mesh`): meshed endpoints
    /// are reached over mesh mTLS and inbound capture listeners terminate it.
    pub fn build_with_mesh(
        config: Arc<Config>,
        version: u64,
        previous: Option<&Compiled>,
        mesh: Option<&Arc<MeshTls>>,
    ) -> Result<Compiled, ConfigErrors> {
        let mut clusters: HashMap<Arc<str>, Arc<Cluster>> =
            HashMap::with_capacity(config.clusters.len());
        for c in config.clusters.iter() {
            let old = previous.and_then(|p| p.clusters.get(&c.name));
            let cluster = match old {
                Some(old) if old.model == *c => old.clone(),
                _ => Arc::new(Cluster::build(c, old.map(|o| &**o), mesh)),
            };
            clusters.insert(c.name.clone(), cluster);
        }

        let mut serving: HashMap<&str, Vec<Arc<str>>> = HashMap::new();
        for l in config.listeners.iter() {
            match &l.kind {
                ListenerKind::Http { route_config, .. } => serving
                    .entry(&**route_config)
                    .or_default()
                    .push(l.name.clone()),
                ListenerKind::Capture(c) => {
                    for rc in c.services.iter().filter_map(|s| s.route_config.as_deref()) {
                        serving.entry(rc).or_default().push(l.name.clone());
                    }
                }
                _ => {}
            }
        }
        for names in serving.values_mut() {
            names.sort();
            names.dedup();
        }
        let no_listeners = Vec::new();
        let listeners_of = |rc: &str| serving.get(rc).unwrap_or(&no_listeners);

        let slots = assign_slots(&config, previous);
        let mut backends = vec![
            Backend {
                name: Arc::from(""),
                cluster: None,
            };
            slots.values().map(|s| s.0 as usize + 1).max().unwrap_or(0)
        ];
        for (name, slot) in &slots {
            backends[slot.0 as usize] = Backend {
                name: name.clone(),
                cluster: clusters.get(name).cloned(),
            };
        }

        let mut rate_limiters = HashMap::new();
        let mut limiter = |key: String, bucket: &TokenBucket| {
            let limiter = previous
                .and_then(|p| p.rate_limiters.get(&key))
                .filter(|l| l.settings() == bucket)
                .cloned()
                .unwrap_or_else(|| Arc::new(RateLimiter::new(bucket.clone())));
            rate_limiters.insert(key, limiter.clone());
            limiter
        };
        let mut tables: HashMap<Arc<str>, Table> = HashMap::new();
        let mut errors = Vec::new();
        for (ri, rc) in config.route_configs.iter().enumerate() {
            let listeners = listeners_of(&rc.name);
            let reusable = previous.and_then(|p| p.tables.get(&rc.name)).filter(|t| {
                t.model == *rc
                    && t.listeners
                        .iter()
                        .all(|l| listeners.binary_search(l).is_ok())
            });
            if let Some(old) = reusable {
                // Its routes hold these buckets already; the new version lists them too.
                for vh in rc.virtual_hosts.iter() {
                    if let Some(b) = &vh.rate_limit {
                        limiter(format!("vhost/{}/{}", rc.name, vh.name), b);
                    }
                    for r in vh.routes.iter() {
                        if let Some(b) = &r.rate_limit {
                            limiter(format!("route/{}/{}/{}", rc.name, vh.name, r.name), b);
                        }
                    }
                }
                tables.insert(
                    rc.name.clone(),
                    Table {
                        model: rc.clone(),
                        routes: old.routes.clone(),
                        listeners: listeners.clone(),
                    },
                );
                continue;
            }
            let vhosts = rc
                .virtual_hosts
                .iter()
                .map(|vh| {
                    let vhost_limit = vh
                        .rate_limit
                        .as_ref()
                        .map(|b| limiter(format!("vhost/{}/{}", rc.name, vh.name), b));
                    VhostInput {
                        domains: vh.domains.to_vec(),
                        routes: vh
                            .routes
                            .iter()
                            .map(|r| {
                                let mut limits: Vec<Arc<RateLimiter>> = Vec::new();
                                if let Some(b) = &r.rate_limit {
                                    limits.push(limiter(
                                        format!("route/{}/{}/{}", rc.name, vh.name, r.name),
                                        b,
                                    ));
                                }
                                limits.extend(vhost_limit.clone());
                                let route = compile_route(r, &vh.name, &slots, limits);
                                (r.matcher.clone(), Arc::new(route))
                            })
                            .collect(),
                    }
                })
                .collect();
            match RouteTable::build(vhosts) {
                Ok(t) => {
                    tables.insert(
                        rc.name.clone(),
                        Table {
                            model: rc.clone(),
                            routes: Arc::new(t),
                            listeners: listeners.clone(),
                        },
                    );
                }
                Err(e) => errors.push(FieldError {
                    path: format!(
                        "route_configs[{ri}].virtual_hosts[{}].routes[{}].match.path.template",
                        e.vhost, e.route
                    ),
                    message: format!(
                        "template {:?} conflicts with another: {}",
                        e.template, e.reason
                    ),
                }),
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let listener_limits: HashMap<Arc<str>, Arc<RateLimiter>> = config
            .listeners
            .iter()
            .filter_map(|l| {
                let bucket = limiter(format!("listener/{}", l.name), l.rate_limit.as_ref()?);
                Some((l.name.clone(), bucket))
            })
            .collect();
        let cluster = |name: &str| clusters.get(name).cloned();
        let mut listeners = HashMap::with_capacity(config.listeners.len());
        let mut capture_routes = HashMap::new();
        for (li, l) in config.listeners.iter().enumerate() {
            let tls = match &l.kind {
                ListenerKind::Http { tls, .. } => tls.as_ref(),
                ListenerKind::Tcp(t) => t.tls.as_ref(),
                ListenerKind::TlsPassthrough(_) | ListenerKind::Capture(_) => None,
            };
            let tls = match tls {
                None => None,
                Some(model) => {
                    let old = previous.and_then(|p| p.tls_server(&l.name));
                    match old {
                        Some(old) if old.built_from(model, &config) => Some(old.clone()),
                        _ => match TlsServer::build(&l.name, model, &config) {
                            Ok(t) => Some(Arc::new(t)),
                            Err(e) => {
                                errors.push(FieldError {
                                    path: format!("listeners[{li}].tls"),
                                    message: e.to_string(),
                                });
                                continue;
                            }
                        },
                    }
                }
            };
            let compiled = match &l.kind {
                ListenerKind::Http {
                    route_config,
                    connection,
                    ..
                } => {
                    let Some(table) = tables.get(&**route_config) else {
                        continue;
                    };
                    CompiledListener::Http {
                        routes: table.routes.clone(),
                        connection: connection.clone(),
                        tls,
                    }
                }
                ListenerKind::Tcp(t) => {
                    let Some(cluster) = cluster(&t.cluster) else {
                        continue;
                    };
                    CompiledListener::Tcp(Arc::new(TcpTarget {
                        cluster,
                        idle_timeout: t.idle_timeout,
                        tls,
                    }))
                }
                ListenerKind::TlsPassthrough(sni) => {
                    CompiledListener::TlsPassthrough(Arc::new(SniTable::build(sni, cluster)))
                }
                ListenerKind::Capture(c) => {
                    let mut entries = Vec::with_capacity(c.services.len());
                    for (i, s) in c.services.iter().enumerate() {
                        let routes = match &s.route_config {
                            Some(rc) => match tables.get(&**rc) {
                                Some(t) => t.routes.clone(),
                                None => break,
                            },
                            None => match catch_all(s, &slots) {
                                Ok(t) => Arc::new(t),
                                Err(e) => {
                                    errors.push(FieldError {
                                        path: format!("listeners[{li}].services[{i}]"),
                                        message: e.to_string(),
                                    });
                                    break;
                                }
                            },
                        };
                        // A key no listener name can take: listener names are config names,
                        // this one holds a NUL.
                        let key: Arc<str> = format!("{}\0{i}", l.name).into();
                        capture_routes.insert(key.clone(), routes);
                        entries.push(CaptureEntry {
                            cluster: cluster(&s.cluster),
                            routes: key,
                        });
                    }
                    // As an HTTP listener whose route config is missing: not served.
                    if entries.len() != c.services.len() {
                        continue;
                    }
                    CompiledListener::Capture(Arc::new(CaptureTable {
                        model: c.clone(),
                        entries: entries.into(),
                        metrics: CaptureMetrics::new(&l.name),
                        mesh: mesh.cloned(),
                    }))
                }
            };
            listeners.insert(l.name.clone(), compiled);
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let now = std::time::SystemTime::now();
        let secret_expiry = config
            .secrets
            .iter()
            .filter_map(|s| {
                let c = material::certificate(
                    s.certificate_chain.as_deref()?.as_bytes(),
                    s.private_key.as_ref()?,
                    now,
                )
                .ok()?;
                let name = c.dns_names.first().map_or("", String::as_str);
                Some((s.name.clone(), Arc::from(name), c.not_after))
            })
            .collect();
        Ok(Compiled {
            version,
            config,
            listeners,
            clusters,
            rate_limiters,
            listener_limits,
            backends: backends.into(),
            slots,
            tables,
            capture_routes,
            secret_expiry,
        })
    }

    /// The TLS of a terminating listener.
    pub fn tls_server(&self, listener: &str) -> Option<&Arc<TlsServer>> {
        match self.listeners.get(listener)? {
            CompiledListener::Http { tls, .. } => tls.as_ref(),
            CompiledListener::Tcp(t) => t.tls.as_ref(),
            CompiledListener::TlsPassthrough(_) | CompiledListener::Capture(_) => None,
        }
    }

    /// Every terminating listener's TLS, by listener name.
    pub fn tls_servers(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<TlsServer>)> {
        self.listeners
            .keys()
            .filter_map(|name| Some((name, self.tls_server(name)?)))
    }

    /// Certificate secrets: name, the leaf's first DNS name, `notAfter`.
    pub fn secret_expiry(&self) -> &[(Arc<str>, Arc<str>, std::time::SystemTime)] {
        &self.secret_expiry
    }

    /// The connection rate limit of a TCP or TLS passthrough listener.
    pub fn listener_rate_limit(&self, listener: &str) -> Option<&Arc<RateLimiter>> {
        self.listener_limits.get(listener)
    }

    /// Drops the metric series of the clusters and the (listener, route) pairs that `old` served
    /// and this version does not. Called when this version replaces `old` in service, so a
    /// version that was compiled but never served drops nothing.
    pub fn forget_removed_series(&self, old: &Compiled) {
        let clusters: HashSet<&str> = old
            .clusters
            .keys()
            .filter(|name| !self.clusters.contains_key(*name))
            .map(|name| &**name)
            .collect();
        handles::forget_clusters(&clusters);

        let mut routes: HashSet<(&str, &str, &str)> = HashSet::new();
        for (rc_name, table) in &old.tables {
            let now = self.tables.get(rc_name);
            for listener in &table.listeners {
                let same = now.is_some_and(|t| {
                    Arc::ptr_eq(&t.routes, &table.routes)
                        && t.listeners.binary_search(listener).is_ok()
                });
                if same {
                    continue;
                }
                // What this listener serves now, if anything: its (virtual host, route) names.
                let served_now = self.served_routes(listener);
                routes.extend(
                    route_names(&table.model)
                        .filter(|(vh, r)| !served_now.contains(&(vh.to_string(), r.to_string())))
                        .map(|(vh, r)| (&**listener, vh, r)),
                );
            }
        }
        // The catch-all routes of capture entries without a route configuration.
        let mut gone = Vec::new();
        for l in old.config.listeners.iter() {
            let ListenerKind::Capture(c) = &l.kind else {
                continue;
            };
            let served_now = self.served_routes(&l.name);
            for s in c.services.iter().filter(|s| s.route_config.is_none()) {
                let pair = catch_all_names(s);
                if !served_now.contains(&pair) {
                    gone.push((l.name.clone(), pair));
                }
            }
        }
        routes.extend(
            gone.iter()
                .map(|(l, (vh, r))| (&**l, vh.as_str(), r.as_str())),
        );
        handles::forget_routes(&routes);
    }

    /// The (virtual host, route) names a listener of this version serves: an HTTP listener's
    /// route configuration, a capture listener's route configurations and catch-all routes.
    fn served_routes(&self, listener: &str) -> HashSet<(String, String)> {
        let Some(l) = self.config.listeners.iter().find(|l| &*l.name == listener) else {
            return HashSet::new();
        };
        let owned = |t: &Table| -> Vec<(String, String)> {
            route_names(&t.model)
                .map(|(vh, r)| (vh.to_owned(), r.to_owned()))
                .collect()
        };
        match &l.kind {
            ListenerKind::Http { route_config, .. } => self
                .tables
                .get(route_config)
                .map(owned)
                .unwrap_or_default()
                .into_iter()
                .collect(),
            ListenerKind::Capture(c) => c
                .services
                .iter()
                .flat_map(|s| match &s.route_config {
                    Some(rc) => self.tables.get(rc).map(owned).unwrap_or_default(),
                    None => vec![catch_all_names(s)],
                })
                .collect(),
            _ => HashSet::new(),
        }
    }
}

/// The (virtual host, route) names of a captured service's catch-all route: its destination
/// and its cluster.
fn catch_all_names(s: &model::CapturedService) -> (String, String) {
    let vhost = match s.ip {
        Some(ip) => std::net::SocketAddr::new(ip, s.port).to_string(),
        None => format!("*:{}", s.port),
    };
    (vhost, s.cluster.to_string())
}

/// Every (virtual host, route) name pair of a route configuration.
fn route_names(rc: &RouteConfig) -> impl Iterator<Item = (&str, &str)> {
    rc.virtual_hosts
        .iter()
        .flat_map(|vh| vh.routes.iter().map(|r| (&*vh.name, &*r.name)))
}

/// A slot for every cluster name in use: the held clusters and every forward target. A name keeps
/// the slot it had in `previous`; a new name takes the lowest slot no name in use holds, so the
/// table stays as small as the set of names.
fn assign_slots(config: &Config, previous: Option<&Compiled>) -> HashMap<Arc<str>, Slot> {
    let targets = config
        .route_configs
        .iter()
        .flat_map(|rc| rc.virtual_hosts.iter())
        .flat_map(|vh| vh.routes.iter())
        .filter_map(|r| match &r.action {
            Action::Forward(targets) => Some(targets.iter().map(|t| &t.cluster)),
            _ => None,
        })
        .flatten();
    let names = config.clusters.iter().map(|c| &c.name).chain(targets);
    let mut slots: HashMap<Arc<str>, Slot> = HashMap::with_capacity(config.clusters.len());
    let mut fresh: Vec<&Arc<str>> = Vec::new();
    for name in names {
        if slots.contains_key(name) {
            continue;
        }
        match previous.and_then(|p| p.slots.get(name)) {
            Some(&slot) => {
                slots.insert(name.clone(), slot);
            }
            None => fresh.push(name),
        }
    }
    if fresh.is_empty() {
        return slots;
    }
    let mut taken = vec![false; slots.len() + fresh.len()];
    for slot in slots.values() {
        if let Some(t) = taken.get_mut(slot.0 as usize) {
            *t = true;
        }
    }
    let mut free = taken
        .iter()
        .enumerate()
        .filter(|(_, t)| !**t)
        .map(|(i, _)| Slot(i as u32))
        .collect::<Vec<_>>()
        .into_iter();
    for name in fresh {
        if slots.contains_key(name) {
            continue;
        }
        // There are at least as many free indices below `taken.len()` as fresh names.
        if let Some(slot) = free.next() {
            slots.insert(name.clone(), slot);
        }
    }
    slots
}

/// The route table of a captured HTTP service without a route configuration: every request to
/// its cluster, with no timeout (the application chose none by calling a plain address) and the
/// default retries. Its metrics name the destination as virtual host and the cluster as route.
fn catch_all(
    s: &model::CapturedService,
    slots: &HashMap<Arc<str>, Slot>,
) -> Result<Routes, crate::http::router::TemplateConflict> {
    let vhost: Arc<str> = catch_all_names(s).0.into();
    let route = model::Route {
        name: s.cluster.clone(),
        matcher: model::RouteMatch {
            path: PathMatch::Prefix("/".into()),
            headers: Arc::from([]),
            query: Arc::from([]),
            method: None,
        },
        action: Action::Forward(Arc::from([model::WeightedCluster {
            cluster: s.cluster.clone(),
            weight: 1,
        }])),
        filters: model::Filters::default(),
        timeout: None,
        retry: default_retry_policy(),
        rate_limit: None,
        upgrades: model::Route::DEFAULT_UPGRADES
            .iter()
            .map(|u| Arc::from(*u))
            .collect(),
    };
    let compiled = compile_route(&route, &vhost, slots, Vec::new());
    RouteTable::build(vec![VhostInput {
        domains: vec![model::DomainMatch::Any],
        routes: vec![(route.matcher.clone(), Arc::new(compiled))],
    }])
}

fn compile_route(
    r: &super::model::Route,
    vhost: &Arc<str>,
    slots: &HashMap<Arc<str>, Slot>,
    rate_limits: Vec<Arc<RateLimiter>>,
) -> Route {
    let action = match &r.action {
        Action::Forward(targets) => RouteAction::Forward(Backends::new(
            targets
                .iter()
                .filter_map(|t| Some((*slots.get(&t.cluster)?, t.weight)))
                .collect(),
        )),
        Action::Redirect(rd) => RouteAction::Redirect(rd.clone()),
        Action::DirectResponse(d) => RouteAction::Direct(d.clone()),
    };
    Route {
        name: r.name.clone(),
        vhost: vhost.clone(),
        prefix: match &r.matcher.path {
            PathMatch::Prefix(p) => Some(p.clone()),
            _ => None,
        },
        action,
        filters: r.filters.clone(),
        timeout: r.timeout,
        retry: r.retry.clone(),
        rate_limits: rate_limits.into(),
        upgrades: r.upgrades.clone(),
        telemetry: Default::default(),
    }
}
