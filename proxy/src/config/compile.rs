//! Typed config → what requests need: a route table per listener with clusters resolved, and the
//! clusters with their pools. Runs off the request path, once per accepted update.

use std::{collections::HashMap, sync::Arc};

use super::{
    model::{Action, Config, PathMatch},
    validate::{ConfigErrors, FieldError},
};
use crate::{
    http::{
        route::{Backends, Route, RouteAction},
        router::{RouteTable, VhostInput},
    },
    upstream::Cluster,
};

pub type Routes = RouteTable<Arc<Route>>;

/// A configuration ready to serve. Published whole through the [`Store`](super::Store).
#[derive(Debug)]
pub struct Compiled {
    pub version: u64,
    pub config: Arc<Config>,
    /// Route table of each listener, by listener name.
    pub listener_routes: HashMap<Arc<str>, Arc<Routes>>,
    pub clusters: HashMap<Arc<str>, Arc<Cluster>>,
}

impl Compiled {
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

        let mut tables: HashMap<&str, Arc<Routes>> = HashMap::new();
        let mut errors = Vec::new();
        for (ri, rc) in config.route_configs.iter().enumerate() {
            let vhosts = rc
                .virtual_hosts
                .iter()
                .map(|vh| VhostInput {
                    domains: vh.domains.to_vec(),
                    routes: vh
                        .routes
                        .iter()
                        .map(|r| {
                            let route = compile_route(r, &vh.name, &clusters);
                            (r.matcher.clone(), Arc::new(route))
                        })
                        .collect(),
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
        let listener_routes = config
            .listeners
            .iter()
            .filter_map(|l| Some((l.name.clone(), tables.get(&*l.route_config)?.clone())))
            .collect();
        Ok(Compiled {
            version,
            config,
            listener_routes,
            clusters,
        })
    }
}

fn compile_route(
    r: &super::model::Route,
    vhost: &Arc<str>,
    clusters: &HashMap<Arc<str>, Arc<Cluster>>,
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
    }
}
