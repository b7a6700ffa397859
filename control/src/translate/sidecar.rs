//! A sidecar's view. By default (transparent capture, the pod's TCP redirected by the rules of
//! `trellis-proxy iptables`): a cluster per Service port it may call, one outbound capture
//! listener whose table maps each ClusterIP:port to its cluster (and, for HTTP, its GAMMA
//! routes), and one inbound capture listener for the ports of the Services that select it.
//! With the node label `trellis.io/capture: none`, for machines without iptables (loopback
//! demos): an outbound listener bound on each ClusterIP:port and inbound listeners on the pod IP.
//!
//! Mesh identity: with a trust domain (the controller runs a CA) endpoints of meshed pods carry
//! the SPIFFE ID they run as, and the inbound capture listener's `mtls` mode comes from the
//! `trellis.io/mtls` label. Mesh mTLS is terminated by the inbound capture listener, so it needs
//! capture: the per-ClusterIP mode has no capture listener, and its inbound listeners are plain
//! TCP whatever `trellis.io/mtls` says (a label set there is reported). The authorization
//! policies that select the sidecar are sent with either mode.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use trellis_proto::discovery::v1::{self as api, listener::Kind};

use super::{
    BIND_IP_LABEL, Context, NodeInfo, POD_IP_LABEL,
    cluster::{self, cluster_name},
    policy,
    route::{self, Backend},
};
use crate::{
    catalog::{Catalog, ObjectKey},
    resource::Snapshot,
    source::manifest::{IntOrString, Service, ServicePort},
};

/// Node label: `iptables` (the default) or `none` (a listener per ClusterIP:port, no capture).
pub const CAPTURE_LABEL: &str = "trellis.io/capture";
/// Node label: the outbound capture port (the `--outbound-port` of `trellis-proxy iptables`).
pub const OUTBOUND_PORT_LABEL: &str = "trellis.io/outbound-port";
/// Node label: the inbound capture port (the `--inbound-port` of `trellis-proxy iptables`).
pub const INBOUND_PORT_LABEL: &str = "trellis.io/inbound-port";
/// Node label: `allow` (the default) or `block` for outbound connections to a destination
/// outside the service table.
pub const OUTBOUND_POLICY_LABEL: &str = "trellis.io/outbound-policy";
/// Pod (node) or Namespace label: `strict` (inbound refuses plaintext) or `permissive` (the
/// default: mesh mTLS and plaintext both accepted, for migration). The pod's label wins.
pub const MTLS_LABEL: &str = "trellis.io/mtls";

pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
pub const OUTBOUND_LISTENER: &str = "capture/outbound";
pub const INBOUND_LISTENER: &str = "capture/inbound";

/// What the node's labels ask of its sidecar, with the problems found in them.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Settings {
    capture: bool,
    bind_ip: IpAddr,
    outbound_port: u16,
    inbound_port: u16,
    block_unknown: bool,
}

/// The node's labels read, bad values replaced by the defaults and each one described (in label
/// order) so the operator can be told which label is wrong.
pub(super) fn settings(node: &NodeInfo) -> (Settings, Vec<String>) {
    let mut problems = Vec::new();
    let mut label = |name: &str, expected: &str, default: &str, ok: &dyn Fn(&str) -> bool| {
        let value = node.labels.get(name)?;
        if ok(value) {
            return Some(value.clone());
        }
        problems.push(format!(
            "node label {name}={value:?} is not {expected}; using {default}"
        ));
        None
    };
    let is_port = |v: &str| v.parse::<u16>().is_ok_and(|p| p != 0);
    let bind_ip = label(BIND_IP_LABEL, "an IP address", "0.0.0.0", &|v| {
        v.parse::<IpAddr>().is_ok()
    });
    let capture = label(
        CAPTURE_LABEL,
        "\"iptables\" or \"none\"",
        "iptables",
        &|v| v == "iptables" || v == "none",
    );
    let inbound = label(
        INBOUND_PORT_LABEL,
        "a port (1-65535)",
        &INBOUND_CAPTURE_PORT.to_string(),
        &is_port,
    );
    let policy = label(
        OUTBOUND_POLICY_LABEL,
        "\"allow\" or \"block\"",
        "allow",
        &|v| v == "allow" || v == "block",
    );
    let outbound = label(
        OUTBOUND_PORT_LABEL,
        "a port (1-65535)",
        &OUTBOUND_CAPTURE_PORT.to_string(),
        &is_port,
    );
    let port = |v: Option<String>, default| v.and_then(|v| v.parse().ok()).unwrap_or(default);
    let settings = Settings {
        capture: capture.as_deref() != Some("none"),
        bind_ip: bind_ip
            .and_then(|v| v.parse().ok())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        outbound_port: port(outbound, OUTBOUND_CAPTURE_PORT),
        inbound_port: port(inbound, INBOUND_CAPTURE_PORT),
        block_unknown: policy.as_deref() == Some("block"),
    };
    (settings, problems)
}

/// The inbound mTLS mode of a sidecar: its node label `trellis.io/mtls`, else its Namespace
/// manifest's, else permissive; with a problem when the node's label is not a mode (a
/// Namespace's own bad label is reported on the Namespace by `object_diagnostics`).
pub(super) fn inbound_mtls(catalog: &Catalog, node: &NodeInfo) -> (api::InboundMtls, Vec<String>) {
    let mode = |v: &str| match v {
        "strict" => Some(api::InboundMtls::Strict),
        "permissive" => Some(api::InboundMtls::Permissive),
        _ => None,
    };
    let namespace = catalog
        .namespaces
        .get(&node.namespace)
        .and_then(|n| n.metadata.labels.get(MTLS_LABEL))
        .and_then(|v| mode(v));
    let fallback = namespace.unwrap_or(api::InboundMtls::Permissive);
    let mut problems = Vec::new();
    let Some(value) = node.labels.get(MTLS_LABEL) else {
        return (fallback, problems);
    };
    let chosen = match mode(value) {
        Some(m) => m,
        None => {
            problems.push(format!(
                "node label {MTLS_LABEL}={value:?} is not \"strict\" or \"permissive\"; using {}{}",
                mode_name(fallback),
                if namespace.is_some() {
                    format!(" (the label of Namespace {})", node.namespace)
                } else {
                    String::new()
                }
            ));
            fallback
        }
    };
    if node.labels.get(CAPTURE_LABEL).map(String::as_str) == Some("none") {
        problems.push(format!(
            "node label {MTLS_LABEL}={value:?} has no effect with {CAPTURE_LABEL}=\"none\": \
             mesh mTLS is terminated by the inbound capture listener"
        ));
    }
    (chosen, problems)
}

pub(super) fn mode_name(mode: api::InboundMtls) -> &'static str {
    match mode {
        api::InboundMtls::Strict => "strict",
        api::InboundMtls::Permissive => "permissive",
    }
}

/// Every problem with the node's labels, in the order `settings` and `inbound_mtls` find them,
/// then the policies that select it but cannot be enforced.
pub(super) fn label_problems(catalog: &Catalog, node: &NodeInfo) -> Vec<String> {
    let (settings, mut problems) = settings(node);
    problems.extend(inbound_mtls(catalog, node).1);
    problems.extend(unenforced_policies(catalog, node, &settings));
    problems
}

/// Policies are enforced by the inbound capture listener: a sidecar without capture has none,
/// so each policy selecting it is named rather than silently ignored.
fn unenforced_policies(catalog: &Catalog, node: &NodeInfo, settings: &Settings) -> Vec<String> {
    if settings.capture {
        return Vec::new();
    }
    catalog
        .authorization_policies
        .iter()
        .filter(|(key, p)| policy::selects(key, p, node))
        .map(|(key, _)| {
            format!(
                "AuthorizationPolicy {key} selects this sidecar but is not enforced: \
                 {CAPTURE_LABEL}=\"none\" has no inbound capture listener to enforce it"
            )
        })
        .collect()
}

pub fn translate(context: &Context, catalog: &Catalog, node: &NodeInfo) -> Snapshot {
    let (settings, problems) = settings(node);
    let (mtls, mtls_problems) = inbound_mtls(catalog, node);
    let unenforced = unenforced_policies(catalog, node, &settings);
    for problem in problems.into_iter().chain(mtls_problems).chain(unenforced) {
        tracing::warn!(node = %node.id, "{problem}");
    }
    let trust_domain = context.trust_domain.as_deref();
    let mut snapshot = if settings.capture {
        capture(catalog, node, &settings, mtls, trust_domain)
    } else {
        per_cluster_ip(catalog, node, trust_domain)
    };
    for p in policy::policies_for(catalog, node) {
        snapshot.add_policy(p);
    }
    snapshot
}

/// The port's protocol as declared by `appProtocol`, else by the port name's prefix (Istio's
/// convention: `http-web`, `grpc-api`); anything else is detected per connection.
fn app_protocol(port: &ServicePort) -> api::AppProtocol {
    let known = |p: &str| match p.to_ascii_lowercase().as_str() {
        "http" | "kubernetes.io/http" => Some(api::AppProtocol::Http),
        "http2" | "h2c" | "grpc" | "kubernetes.io/h2c" => Some(api::AppProtocol::Http2),
        "tcp" => Some(api::AppProtocol::Tcp),
        "tls" | "https" => Some(api::AppProtocol::Tls),
        _ => None,
    };
    let by_name = || {
        let name = port.name.as_deref()?;
        known(name.split('-').next().unwrap_or(name))
    };
    port.app_protocol
        .as_deref()
        .and_then(known)
        .or_else(by_name)
        .unwrap_or(api::AppProtocol::Detect)
}

/// Every ClusterIP of a Service (IPv4 and IPv6, `clusterIP` first); none for a headless one.
fn cluster_ips(service: &Service) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let all = service
        .spec
        .cluster_ip
        .iter()
        .chain(&service.spec.cluster_ips);
    for ip in all.filter_map(|ip| ip.parse::<IpAddr>().ok()) {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// The route configuration of an HTTP service port: its GAMMA routes, or one default route to
/// the port's cluster.
fn outbound_route_config(
    key: &ObjectKey,
    port: u16,
    routes: Vec<api::Route>,
) -> api::RouteConfiguration {
    let name = cluster_name(key, port);
    let routes = if routes.is_empty() {
        vec![route::default_route(&name)]
    } else {
        routes
    };
    api::RouteConfiguration {
        name: format!("outbound/{name}"),
        virtual_hosts: vec![api::VirtualHost {
            name: key.to_string(),
            // The destination is the service's own ClusterIP:port, so every host is it.
            domains: vec!["*".to_owned()],
            routes,
            retry: None,
            rate_limit: None,
        }],
    }
}

/// Transparent capture: one outbound and one inbound capture listener.
fn capture(
    catalog: &Catalog,
    node: &NodeInfo,
    settings: &Settings,
    mtls: api::InboundMtls,
    trust_domain: Option<&str>,
) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let mut services = Vec::new();
    // One entry per ip:port: the proxy refuses a table that lists one twice.
    let mut listed: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
    for (key, service) in &catalog.services {
        let ips = cluster_ips(service);
        for port in service.spec.ports.iter().filter(|p| is_tcp(p)) {
            let name = cluster_name(key, port.port);
            snapshot.add_cluster(cluster::cluster(key, port));
            snapshot.add_endpoints(cluster::mesh_endpoints(
                catalog,
                key,
                service,
                port,
                trust_domain,
            ));
            let protocol = app_protocol(port);
            let routes = attached_routes(catalog, key, port.port);
            // A declared HTTP port always has its route configuration (as a listener did); a
            // detected one only when routes attach, since without them an HTTP connection goes
            // to the cluster anyway.
            let http = matches!(protocol, api::AppProtocol::Http | api::AppProtocol::Http2);
            let detected_with_routes = protocol == api::AppProtocol::Detect && !routes.is_empty();
            // A headless Service has no entry, so no route configuration either.
            let route_config = if !ips.is_empty() && (http || detected_with_routes) {
                let rc = outbound_route_config(key, port.port, routes);
                let rc_name = rc.name.clone();
                snapshot.add_route_config(rc);
                rc_name
            } else {
                String::new()
            };
            for ip in ips.iter().filter(|ip| listed.insert((**ip, port.port))) {
                services.push(api::CapturedService {
                    ip: ip.to_string(),
                    port: port.port.into(),
                    cluster: name.clone(),
                    protocol: protocol.into(),
                    route_config: route_config.clone(),
                });
            }
        }
    }
    let unknown = if settings.block_unknown {
        api::UnknownDestination::Block
    } else {
        api::UnknownDestination::Allow
    };
    snapshot.add_listener(capture_listener(
        OUTBOUND_LISTENER,
        SocketAddr::new(settings.bind_ip, settings.outbound_port),
        api::CaptureDirection::Outbound,
        services,
        unknown,
        api::InboundMtls::Permissive, // outbound: not read
    ));

    let mut inbound = Vec::new();
    for (target, port) in inbound_ports(catalog, node) {
        let name = inbound_cluster(&mut snapshot, target, &port);
        inbound.push(api::CapturedService {
            ip: String::new(),
            port: target.into(),
            cluster: name,
            protocol: app_protocol(&port).into(),
            route_config: String::new(),
        });
    }
    // Unknown inbound ports still reach the application at the pod's address: the pod's own
    // ports that no Service names (probes) keep working; loopback-only sockets stay private.
    snapshot.add_listener(capture_listener(
        INBOUND_LISTENER,
        SocketAddr::new(settings.bind_ip, settings.inbound_port),
        api::CaptureDirection::Inbound,
        inbound,
        api::UnknownDestination::Allow,
        mtls,
    ));
    snapshot
}

fn capture_listener(
    name: &str,
    address: SocketAddr,
    direction: api::CaptureDirection,
    services: Vec<api::CapturedService>,
    unknown: api::UnknownDestination,
    mtls: api::InboundMtls,
) -> api::Listener {
    api::Listener {
        max_connections: None, // the proxy's default
        name: name.to_owned(),
        address: address.to_string(),
        kind: Some(Kind::Capture(api::CaptureListener {
            direction: direction.into(),
            services,
            unknown_destination: unknown.into(),
            detection_timeout_ms: 0, // the proxy's default
            idle_timeout_ms: 0,
            mtls: mtls.into(),
        })),
    }
}

/// Without capture: a listener on each ClusterIP:port (HTTP with the Service's GAMMA routes,
/// else TCP), and inbound listeners on the pod IP.
fn per_cluster_ip(catalog: &Catalog, node: &NodeInfo, trust_domain: Option<&str>) -> Snapshot {
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
            snapshot.add_endpoints(cluster::mesh_endpoints(
                catalog,
                key,
                service,
                port,
                trust_domain,
            ));
            let Some(ip) = cluster_ip else { continue };
            let address = SocketAddr::new(ip, port.port).to_string();
            let listener_name = format!("outbound/{name}");
            let kind = if cluster::is_http(port) {
                let routes = attached_routes(catalog, key, port.port);
                snapshot.add_route_config(outbound_route_config(key, port.port, routes));
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
    inbound_per_port(catalog, node, &mut snapshot);
    snapshot
}

/// Routes of the HTTPRoutes whose parentRefs name this Service (and this port, or no port), in
/// route-key order.
fn attached_routes(catalog: &Catalog, service: &ObjectKey, port: u16) -> Vec<api::Route> {
    let mut out = Vec::new();
    for (route_key, http_route) in catalog.routes_of_service(service) {
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

/// The target ports of the Services in the node's namespace whose selector matches its labels,
/// each with the first Service port that targets it.
fn inbound_ports(catalog: &Catalog, node: &NodeInfo) -> BTreeMap<u16, ServicePort> {
    let mut target_ports = BTreeMap::new();
    for (key, service) in &catalog.services {
        if key.namespace != node.namespace || !selects(service, &node.labels) {
            continue;
        }
        for port in service.spec.ports.iter().filter(|p| is_tcp(p)) {
            let target = match &port.target_port {
                Some(IntOrString::Int(p)) => *p,
                None => port.port,
                // A named port needs the pod spec, which the catalog does not have.
                Some(IntOrString::String(_)) => continue,
            };
            target_ports.entry(target).or_insert(port.clone());
        }
    }
    target_ports
}

/// The `inbound/<port>` cluster: the application on 127.0.0.1 and the same port. Returns its
/// name.
fn inbound_cluster(snapshot: &mut Snapshot, target: u16, port: &ServicePort) -> String {
    let name = format!("inbound/{target}");
    let mut c = cluster::cluster(&ObjectKey::new("", ""), port);
    c.name = name.clone();
    snapshot.add_cluster(c);
    snapshot.add_endpoints(api::ClusterLoadAssignment {
        cluster_name: name.clone(),
        endpoints: vec![api::Endpoint {
            address: SocketAddr::new([127, 0, 0, 1].into(), target).to_string(),
            weight: 1,
            health: api::EndpointHealth::Ready.into(),
            // The application next to the sidecar, reached over loopback: never mesh TLS.
            identity: String::new(),
        }],
    });
    name
}

/// Inbound without capture: for each target port, a TCP listener on `<pod-ip>:<targetPort>`
/// forwarding to `127.0.0.1:<targetPort>` (the workload listens on loopback). Without the
/// `trellis.io/pod-ip` label there is nowhere to bind, so there are no inbound listeners.
fn inbound_per_port(catalog: &Catalog, node: &NodeInfo, snapshot: &mut Snapshot) {
    let Some(pod_ip) = node
        .labels
        .get(POD_IP_LABEL)
        .and_then(|ip| ip.parse::<IpAddr>().ok())
    else {
        return;
    };
    for (target, port) in inbound_ports(catalog, node) {
        let name = inbound_cluster(snapshot, target, &port);
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

/// Capture redirects TCP only: a UDP or SCTP port (DNS's 53/UDP beside 53/TCP) has no entry.
fn is_tcp(port: &ServicePort) -> bool {
    port.protocol
        .as_deref()
        .is_none_or(|p| p.eq_ignore_ascii_case("TCP"))
}

fn selects(service: &Service, labels: &BTreeMap<String, String>) -> bool {
    let selector = &service.spec.selector;
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
