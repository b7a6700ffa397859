//! Typed config → what requests need: a route table per listener with clusters resolved, and the
//! clusters with their pools. Runs off the request path, once per accepted update.

use std::{collections::HashMap, sync::Arc};

use super::{
    model::{Action, Config, HttpConnection, ListenerKind, PathMatch, TokenBucket},
    validate::{ConfigErrors, FieldError},
};
use crate::{
    http::{
        route::{Backends, Route, RouteAction},
        router::{RouteTable, VhostInput},
    },
    l4::{SniTable, TcpTarget},
    ratelimit::RateLimiter,
    upstream::Cluster,
};

pub type Routes = RouteTable<Arc<Route>>;

/// What a listener does with a connection, resolved against this config's clusters and routes.
#[derive(Debug, Clone)]
pub enum CompiledListener {
    Http {
        routes: Arc<Routes>,
        connection: HttpConnection,
    },
    Tcp(Arc<TcpTarget>),
    TlsPassthrough(Arc<SniTable>),
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
}

impl Compiled {
    /// The route table of an HTTP listener.
    pub fn http_routes(&self, listener: &str) -> Option<&Arc<Routes>> {
        match self.listeners.get(listener)? {
            CompiledListener::Http { routes, .. } => Some(routes),
            _ => None,
        }
    }

    /// Compiles `config`, carrying connection pools and balancer positions over from `previous`.
    pub fn build(
        config: Arc<Config>,
        version: u64,
        previous: Option<&Compiled>,
    ) -> Result<Compiled, ConfigErrors> {
        let clusters: HashMap<Arc<str>, Arc<Cluster>> = config
            .clusters
            .iter()
            .map(|c| {
                let old = previous.and_then(|p| p.clusters.get(&c.name)).map(|c| &**c);
                (c.name.clone(), Arc::new(Cluster::build(c, old)))
            })
            .collect();

        let mut rate_limiters = HashMap::new();
        let mut limiter = |key: String, bucket: &Option<TokenBucket>| {
            let bucket = bucket.as_ref()?;
            let limiter = previous
                .and_then(|p| p.rate_limiters.get(&key))
                .filter(|l| l.settings() == bucket)
                .cloned()
                .unwrap_or_else(|| Arc::new(RateLimiter::new(bucket.clone())));
            rate_limiters.insert(key, limiter.clone());
            Some(limiter)
        };
        let mut tables: HashMap<&str, Arc<Routes>> = HashMap::new();
        let mut errors = Vec::new();
        for (ri, rc) in config.route_configs.iter().enumerate() {
            let vhosts = rc
                .virtual_hosts
                .iter()
                .map(|vh| {
                    let vhost_limit =
                        limiter(format!("vhost/{}/{}", rc.name, vh.name), &vh.rate_limit);
                    VhostInput {
                        domains: vh.domains.to_vec(),
                        routes: vh
                            .routes
                            .iter()
                            .map(|r| {
                                let mut limits: Vec<Arc<RateLimiter>> = Vec::new();
                                limits.extend(limiter(
                                    format!("route/{}/{}/{}", rc.name, vh.name, r.name),
                                    &r.rate_limit,
                                ));
                                limits.extend(vhost_limit.clone());
                                let route = compile_route(r, &vh.name, &clusters, limits);
                                (r.matcher.clone(), Arc::new(route))
                            })
                            .collect(),
                    }
                })
                .collect();
            match RouteTable::build(vhosts) {
                Ok(t) => {
                    tables.insert(&rc.name, Arc::new(t));
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
                let bucket = limiter(format!("listener/{}", l.name), &l.rate_limit)?;
                Some((l.name.clone(), bucket))
            })
            .collect();
        let cluster = |name: &str| clusters.get(name).cloned();
        let listeners = config
            .listeners
            .iter()
            .filter_map(|l| {
                let compiled = match &l.kind {
                    ListenerKind::Http {
                        route_config,
                        connection,
                    } => CompiledListener::Http {
                        routes: tables.get(&**route_config)?.clone(),
                        connection: connection.clone(),
                    },
                    ListenerKind::Tcp(t) => CompiledListener::Tcp(Arc::new(TcpTarget {
                        cluster: cluster(&t.cluster)?,
                        idle_timeout: t.idle_timeout,
                    })),
                    ListenerKind::TlsPassthrough(sni) => {
                        CompiledListener::TlsPassthrough(Arc::new(SniTable::build(sni, cluster)))
                    }
                };
                Some((l.name.clone(), compiled))
            })
            .collect();
        Ok(Compiled {
            version,
            config,
            listeners,
            clusters,
            rate_limiters,
            listener_limits,
        })
    }

    /// The connection rate limit of a TCP or TLS passthrough listener.
    pub fn listener_rate_limit(&self, listener: &str) -> Option<&Arc<RateLimiter>> {
        self.listener_limits.get(listener)
    }
}

fn compile_route(
    r: &super::model::Route,
    vhost: &Arc<str>,
    clusters: &HashMap<Arc<str>, Arc<Cluster>>,
    rate_limits: Vec<Arc<RateLimiter>>,
) -> Route {
    let action = match &r.action {
        Action::Forward(targets) => RouteAction::Forward(Backends::new(
            targets
                .iter()
                .filter_map(|t| Some((clusters.get(&t.cluster)?.clone(), t.weight)))
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
        telemetry: Default::default(),
    }
}
