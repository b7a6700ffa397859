//! A gateway's view: one HTTP listener per port of its Gateway, virtual hosts from the hostnames
//! of the HTTPRoutes bound to it, and the clusters those routes forward to.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use trellis_proto::discovery::v1::{self as api, listener::Kind};

use super::{
    BIND_IP_LABEL, NodeInfo, cluster,
    route::{self, Backend},
};
use crate::{
    catalog::{Catalog, ObjectKey},
    resource::Snapshot,
    source::manifest::{GatewayListener, HttpRoute},
};

pub fn translate(catalog: &Catalog, node: &NodeInfo) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let Some(gw_key) = &node.gateway else {
        return snapshot;
    };
    let Some(gateway) = catalog.gateways.get(gw_key) else {
        tracing::debug!(gateway = %gw_key, node = node.id, "gateway not in the catalog (yet)");
        return snapshot;
    };
    let bind_ip = node
        .labels
        .get(BIND_IP_LABEL)
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));

    // Gateway listeners sharing a port share one proxy listener; hostnames tell them apart.
    let mut by_port: BTreeMap<u16, Vec<&GatewayListener>> = BTreeMap::new();
    for listener in &gateway.spec.listeners {
        // Others are reported (`Accepted=False UnsupportedProtocol`, see `status.rs`).
        if is_served(listener) {
            by_port.entry(listener.port).or_default().push(listener);
        }
    }

    let mut backends = BTreeSet::new();
    let mut route_configs = Vec::new();
    let mut listeners_out = Vec::new();
    for (port, listeners) in &by_port {
        let name = format!("gateway/{gw_key}:{port}");
        // Domain → routes; a domain may belong to one virtual host only.
        let mut hosts: BTreeMap<String, Vec<api::Route>> = BTreeMap::new();
        for (route_key, http_route) in &catalog.http_routes {
            let attached: Vec<&GatewayListener> = listeners
                .iter()
                .copied()
                .filter(|l| attaches(http_route, route_key, gw_key, l))
                .collect();
            if attached.is_empty() {
                continue;
            }
            let ctx = route::Context {
                catalog,
                route_key,
                parent_port: None,
            };
            let routes = route::routes(&ctx, http_route, &mut backends);
            let domains: BTreeSet<String> = attached
                .iter()
                .flat_map(|l| hostnames(l.hostname.as_deref(), &http_route.spec.hostnames))
                .collect();
            for domain in domains {
                hosts
                    .entry(domain)
                    .or_default()
                    .extend(routes.iter().cloned());
            }
        }
        route_configs.push(api::RouteConfiguration {
            name: name.clone(),
            virtual_hosts: hosts
                .into_iter()
                .map(|(domain, routes)| api::VirtualHost {
                    name: domain.clone(),
                    domains: vec![domain],
                    routes,
                    retry: None,
                    rate_limit: None,
                })
                .collect(),
        });
        listeners_out.push(api::Listener {
            max_connections: None, // the proxy's default
            name: name.clone(),
            address: SocketAddr::new(bind_ip, *port).to_string(),
            kind: Some(Kind::Http(api::HttpListener {
                route_config: name,
                idle_timeout_ms: 0,
                header_read_timeout_ms: 0,
                max_connection_age_ms: 0,
                ..Default::default()
            })),
        });
    }

    for Backend { service, port } in &backends {
        let Some(svc) = catalog.services.get(service) else {
            continue;
        };
        if let Some(p) = svc.spec.ports.iter().find(|p| p.port == *port) {
            snapshot.add_cluster(cluster::cluster(service, p));
            snapshot.add_endpoints(cluster::endpoints(catalog, service, svc, p));
        }
    }
    for rc in route_configs {
        snapshot.add_route_config(rc);
    }
    for l in listeners_out {
        snapshot.add_listener(l);
    }
    snapshot
}

/// Whether Trellis serves the listener's protocol (HTTP only, for now).
pub fn is_served(listener: &GatewayListener) -> bool {
    listener.protocol.eq_ignore_ascii_case("HTTP")
}

/// Whether a route binds to this Gateway listener: a Gateway parentRef naming it, with no
/// sectionName or this listener's name, and no port or this listener's port.
fn attaches(
    route: &HttpRoute,
    route_key: &ObjectKey,
    gateway: &ObjectKey,
    listener: &GatewayListener,
) -> bool {
    route.spec.parent_refs.iter().any(|p| {
        p.is_gateway()
            && p.name == gateway.name
            && p.namespace.as_deref().unwrap_or(&route_key.namespace) == gateway.namespace
            && p.section_name.as_deref().is_none_or(|s| s == listener.name)
            && p.port.is_none_or(|port| port == listener.port)
    })
}

/// The hostnames a route serves on a listener (Gateway API intersection): the more specific of
/// each compatible pair; the listener's hostname (or `*`) when the route names none.
fn hostnames(listener: Option<&str>, route: &[String]) -> Vec<String> {
    let Some(listener) = listener.filter(|l| !l.is_empty()) else {
        return if route.is_empty() {
            vec!["*".to_owned()]
        } else {
            route.to_vec()
        };
    };
    if route.is_empty() {
        return vec![listener.to_owned()];
    }
    route
        .iter()
        .filter_map(|r| {
            if r.eq_ignore_ascii_case(listener) || covers(listener, r) {
                Some(r.clone())
            } else if covers(r, listener) {
                Some(listener.to_owned())
            } else {
                None
            }
        })
        .collect()
}

/// Whether wildcard `pattern` (`*.example.com`) covers `name` (a longer name or wildcard).
fn covers(pattern: &str, name: &str) -> bool {
    let Some(suffix) = pattern.strip_prefix('*') else {
        return false;
    };
    let name = name.trim_start_matches('*');
    name.len() > suffix.len()
        && name
            .to_ascii_lowercase()
            .ends_with(&suffix.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_intersection() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(hostnames(None, &[]), s(&["*"]));
        assert_eq!(hostnames(Some("a.example.com"), &[]), s(&["a.example.com"]));
        assert_eq!(hostnames(None, &s(&["x.io"])), s(&["x.io"]));
        assert_eq!(
            hostnames(Some("*.example.com"), &s(&["a.example.com", "b.other.com"])),
            s(&["a.example.com"])
        );
        assert_eq!(
            hostnames(Some("a.example.com"), &s(&["*.example.com"])),
            s(&["a.example.com"])
        );
        assert_eq!(
            hostnames(Some("*.example.com"), &s(&["example.com"])),
            s(&[])
        );
    }
}
