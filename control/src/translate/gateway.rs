//! A gateway's view: one HTTP listener per port of its Gateway (terminating TLS with the
//! certificates of its HTTPS listeners), virtual hosts from the hostnames of the HTTPRoutes
//! bound to it, the clusters those routes forward to (with upstream TLS under a
//! BackendTLSPolicy), and the Secrets those listeners and clusters name, to this gateway only.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::SystemTime,
};

use trellis_proto::discovery::v1::{self as api, listener::Kind};

use super::{
    BIND_IP_LABEL, NodeInfo, cluster, l4,
    route::{self, Backend},
    tls,
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
        if port_kind(listener).is_some() {
            by_port.entry(listener.port).or_default().push(listener);
        }
    }

    let mut backends = BTreeSet::new();
    let mut route_configs = Vec::new();
    let mut listeners_out = Vec::new();
    let mut secrets = Vec::new();
    for (port, listeners) in &by_port {
        let name = format!("gateway/{gw_key}:{port}");
        // The first listener on a port decides what the port is; listeners of another kind are
        // reported (`ProtocolConflict`) and left out.
        let kind = port_kind(listeners[0]);
        let listeners: Vec<&GatewayListener> = listeners
            .iter()
            .copied()
            .filter(|l| port_kind(l) == kind)
            .collect();
        let https = match kind {
            Some(PortKind::Http) => false,
            Some(PortKind::Https) => true,
            Some(PortKind::L4(mode)) => {
                let address = SocketAddr::new(bind_ip, *port);
                listeners_out.extend(l4::listener(
                    catalog,
                    gw_key,
                    address,
                    mode,
                    &listeners,
                    &mut backends,
                    &mut secrets,
                ));
                continue;
            }
            None => continue,
        };
        let listener_tls = if https {
            match server_tls(catalog, gw_key, &listeners, &mut secrets) {
                Some(tls) => Some(tls),
                None => continue,
            }
        } else {
            None
        };
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
                tls: listener_tls,
                ..Default::default()
            })),
        });
    }

    for Backend { service, port } in &backends {
        let Some(svc) = catalog.services.get(service) else {
            continue;
        };
        if let Some(p) = svc.spec.ports.iter().find(|p| p.port == *port) {
            let mut c = cluster::cluster(service, p);
            if let Some((policy_key, policy)) =
                tls::backend_policy(catalog, service, p.name.as_deref())
            {
                match tls::backend_tls(catalog, policy_key, policy) {
                    Ok(backend) => {
                        c.tls = Some(backend.tls);
                        secrets.extend(backend.ca);
                    }
                    // Reported on the policy; without the TLS it asks for, the backend is not
                    // reached at all (its share is answered with an error), never in cleartext.
                    Err(_) => continue,
                }
            }
            snapshot.add_cluster(c);
            snapshot.add_endpoints(cluster::endpoints(catalog, service, svc, p));
        }
    }
    for s in secrets {
        snapshot.add_secret(s);
    }
    for rc in route_configs {
        snapshot.add_route_config(rc);
    }
    for l in listeners_out {
        snapshot.add_listener(l);
    }
    snapshot
}

/// What one proxy listener on a Gateway port is: the first Gateway listener on the port decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortKind {
    Http,
    /// HTTPS terminated here.
    Https,
    /// TCP, or TLS terminated or passed through, with TCPRoutes and TLSRoutes.
    L4(l4::Mode),
}

/// What a listener is served as; `None` for a protocol (or TLS mode) Trellis does not serve.
pub fn port_kind(listener: &GatewayListener) -> Option<PortKind> {
    if listener.protocol.eq_ignore_ascii_case("HTTP") {
        Some(PortKind::Http)
    } else if is_https(listener) {
        Some(PortKind::Https)
    } else {
        l4::mode(listener).map(PortKind::L4)
    }
}

/// Whether Trellis serves the listener's protocol: HTTP, HTTPS terminated here, TCP, and TLS
/// terminated or passed through.
pub fn is_served(listener: &GatewayListener) -> bool {
    port_kind(listener).is_some()
}

/// A listener whose TLS the gateway terminates: HTTPS, or TLS with `mode: Terminate` (the
/// default); it needs certificateRefs.
pub fn terminates_tls(listener: &GatewayListener) -> bool {
    matches!(
        port_kind(listener),
        Some(PortKind::Https | PortKind::L4(l4::Mode::TlsTerminate))
    )
}

/// An HTTPS listener whose TLS is terminated by the gateway (`mode: Terminate`, the default).
pub fn is_https(listener: &GatewayListener) -> bool {
    listener.protocol.eq_ignore_ascii_case("HTTPS")
        && listener
            .tls
            .as_ref()
            .and_then(|t| t.mode.as_deref())
            .is_none_or(|m| m == "Terminate")
}

/// The TLS of a port whose listeners terminate it: their certificates and the client-certificate
/// validation the first of them with one asks for. `None` when the port cannot be served: no
/// usable certificate, or a client CA that does not resolve (reported by `status.rs`; serving
/// without the client check would let in what the Gateway says to keep out).
pub(super) fn server_tls(
    catalog: &Catalog,
    gw_key: &ObjectKey,
    listeners: &[&GatewayListener],
    secrets: &mut Vec<api::Secret>,
) -> Option<api::ListenerTls> {
    let gateway = catalog.gateways.get(gw_key)?;
    let mut client_certificate = None;
    for l in listeners {
        if let Some(v) = tls::frontend_validation(gateway, l) {
            let (validation, ca) = tls::client_validation(catalog, gw_key, v).ok()?;
            if client_certificate.is_none() {
                if !secrets.iter().any(|s| s.name == ca.name) {
                    secrets.push(ca);
                }
                client_certificate = Some(validation);
            }
        }
    }
    let certificates = certificates(catalog, gw_key, listeners, secrets);
    if certificates.is_empty() {
        return None;
    }
    Some(api::ListenerTls {
        certificates,
        client_certificate,
        ..Default::default()
    })
}

/// The certificates of a port's HTTPS listeners, each chosen by its listener's hostname (none:
/// the default certificate); the Secrets they name are added to `secrets`. References that do
/// not resolve are left out (and reported by `status.rs`).
pub(super) fn certificates(
    catalog: &Catalog,
    gateway: &ObjectKey,
    listeners: &[&GatewayListener],
    secrets: &mut Vec<api::Secret>,
) -> Vec<api::ServerCertificate> {
    let now = SystemTime::now();
    let mut out = Vec::new();
    for l in listeners {
        let refs = l.tls.iter().flat_map(|t| &t.certificate_refs);
        for r in refs {
            let Ok(resolved) = tls::resolve_certificate_ref(catalog, gateway, r, now) else {
                continue;
            };
            out.push(api::ServerCertificate {
                server_names: l
                    .hostname
                    .iter()
                    .filter(|h| !h.is_empty())
                    .cloned()
                    .collect(),
                secret: resolved.secret.name.clone(),
            });
            if !secrets.iter().any(|s| s.name == resolved.secret.name) {
                secrets.push(resolved.secret);
            }
        }
    }
    out
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
pub(super) fn hostnames(listener: Option<&str>, route: &[String]) -> Vec<String> {
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
