//! A sidecar's view: a cluster per Service port it may call, an outbound listener on each
//! ClusterIP:port (HTTP with the Service's GAMMA routes, else TCP), and inbound listeners for the
//! Services that select it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use trellis_proto::discovery::v1::{self as api, listener::Kind};

use super::{
    NodeInfo, POD_IP_LABEL,
    cluster::{self, cluster_name},
    route::{self, Backend},
};
use crate::{
    catalog::{Catalog, ObjectKey},
    resource::Snapshot,
    source::manifest::{IntOrString, Service},
};

pub fn translate(catalog: &Catalog, node: &NodeInfo) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (key, service) in &catalog.services {
        // Headless ("None") and IP-less services have no virtual IP to listen on; their
        // clusters still exist so routes may name them.
        let cluster_ip = service
            .spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        for port in &service.spec.ports {
            let name = cluster_name(key, port.port);
            snapshot.add_cluster(cluster::cluster(key, port));
            snapshot.add_endpoints(cluster::endpoints(catalog, key, service, port));
            let Some(ip) = cluster_ip else { continue };
            let address = SocketAddr::new(ip, port.port).to_string();
            let listener_name = format!("outbound/{name}");
            let kind = if cluster::is_http(port) {
                let routes = attached_routes(catalog, key, port.port);
                let routes = if routes.is_empty() {
                    vec![route::default_route(&name)]
                } else {
                    routes
                };
                snapshot.add_route_config(api::RouteConfiguration {
                    name: listener_name.clone(),
                    virtual_hosts: vec![api::VirtualHost {
                        name: key.to_string(),
                        // The listener is the service's own ClusterIP:port, so every host is it.
                        domains: vec!["*".to_owned()],
                        routes,
                        retry: None,
                        rate_limit: None,
                    }],
                });
                Kind::Http(api::HttpListener {
                    route_config: listener_name.clone(),
                    idle_timeout_ms: 0,
                    header_read_timeout_ms: 0,
                    max_connection_age_ms: 0,
                    ..Default::default()
                })
            } else {
                Kind::Tcp(api::TcpProxy {
                    cluster: name.clone(),
                    idle_timeout_ms: 0,
                    rate_limit: None,
                    tls: None,
                })
            };
            snapshot.add_listener(api::Listener {
                max_connections: None, // the proxy's default
                name: listener_name,
                address,
                kind: Some(kind),
            });
        }
    }
    inbound(catalog, node, &mut snapshot);
    snapshot
}

/// Routes of the HTTPRoutes whose parentRefs name this Service (and this port, or no port), in
/// route-key order.
fn attached_routes(catalog: &Catalog, service: &ObjectKey, port: u16) -> Vec<api::Route> {
    let mut out = Vec::new();
    for (route_key, http_route) in &catalog.http_routes {
        let attached = http_route.spec.parent_refs.iter().any(|p| {
            p.is_service()
                && p.name == service.name
                && p.namespace.as_deref().unwrap_or(&route_key.namespace) == service.namespace
                && p.port.is_none_or(|p| p == port)
        });
        if !attached {
            continue;
        }
        let ctx = route::Context {
            catalog,
            route_key,
            parent_port: Some(port),
        };
        // Every service port already has a cluster, so the backends need no extra work here.
        let mut backends: BTreeSet<Backend> = BTreeSet::new();
        out.extend(route::routes(&ctx, http_route, &mut backends));
    }
    out
}

/// Inbound: for each port of the Services in the node's namespace whose selector matches its
/// labels, a TCP listener on `<pod-ip>:<targetPort>` forwarding to `127.0.0.1:<targetPort>`
/// (the workload listens on loopback). Minimal on purpose: no inbound policy yet. Without the
/// `trellis.io/pod-ip` label there is nowhere to bind, so there are no inbound listeners.
fn inbound(catalog: &Catalog, node: &NodeInfo, snapshot: &mut Snapshot) {
    let Some(pod_ip) = node
        .labels
        .get(POD_IP_LABEL)
        .and_then(|ip| ip.parse::<IpAddr>().ok())
    else {
        return;
    };
    let mut target_ports = BTreeMap::new();
    for (key, service) in &catalog.services {
        if key.namespace != node.namespace || !selects(service, &node.labels) {
            continue;
        }
        for port in &service.spec.ports {
            let target = match &port.target_port {
                Some(IntOrString::Int(p)) => *p,
                None => port.port,
                // A named port needs the pod spec, which the catalog does not have.
                Some(IntOrString::String(_)) => continue,
            };
            target_ports.entry(target).or_insert(port.clone());
        }
    }
    for (target, port) in target_ports {
        let name = format!("inbound/{target}");
        let mut c = cluster::cluster(&ObjectKey::new("", ""), &port);
        c.name = name.clone();
        snapshot.add_cluster(c);
        snapshot.add_endpoints(api::ClusterLoadAssignment {
            cluster_name: name.clone(),
            endpoints: vec![api::Endpoint {
                address: SocketAddr::new([127, 0, 0, 1].into(), target).to_string(),
                weight: 1,
                health: api::EndpointHealth::Ready.into(),
            }],
        });
        snapshot.add_listener(api::Listener {
            max_connections: None, // the proxy's default
            name: name.clone(),
            address: SocketAddr::new(pod_ip, target).to_string(),
            kind: Some(Kind::Tcp(api::TcpProxy {
                cluster: name,
                idle_timeout_ms: 0,
                rate_limit: None,
                tls: None,
            })),
        });
    }
}

fn selects(service: &Service, labels: &BTreeMap<String, String>) -> bool {
    let selector = &service.spec.selector;
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
