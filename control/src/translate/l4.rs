//! Gateway listeners of protocol `TCP` and `TLS` with their TCPRoutes and TLSRoutes: a TCP
//! listener (terminating TLS for `TLS` + `mode: Terminate`) forwarding to the route's backend,
//! or an SNI passthrough listener whose TLSRoute hostnames pick the backend.
//!
//! A proxy TCP listener and an SNI route forward to one cluster each, so a route must name one
//! backend: a route with several is refused with a condition rather than served with a split it
//! does not have.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use trellis_proto::discovery::v1::{self as api, listener::Kind};

use super::{
    gateway,
    route::{self, Backend},
    tls,
};
use crate::{
    catalog::{Catalog, ObjectKey},
    diagnostics as d,
    source::manifest::{GatewayListener, L4RouteRule, ParentRef},
};

/// Gateway API reasons the shared diagnostics do not name.
pub const NO_MATCHING_PARENT: &str = "NoMatchingParent";
pub const NOT_ALLOWED_BY_LISTENERS: &str = "NotAllowedByListeners";
pub const NO_MATCHING_LISTENER_HOSTNAME: &str = "NoMatchingListenerHostname";
pub const UNSUPPORTED_VALUE: &str = "UnsupportedValue";

/// What a Gateway listener of protocol TCP or TLS does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Tcp,
    TlsTerminate,
    TlsPassthrough,
}

/// The kind of an L4 route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteKind {
    Tcp,
    Tls,
}

impl RouteKind {
    pub fn name(self) -> &'static str {
        match self {
            RouteKind::Tcp => "TCPRoute",
            RouteKind::Tls => "TLSRoute",
        }
    }
}

/// A TCPRoute or TLSRoute as translation reads it.
#[derive(Clone, Copy, Debug)]
pub struct L4Route<'a> {
    pub kind: RouteKind,
    pub key: &'a ObjectKey,
    pub parent_refs: &'a [ParentRef],
    /// TLSRoute only; empty for a TCPRoute.
    pub hostnames: &'a [String],
    pub rules: &'a [L4RouteRule],
}

/// Something about a route that keeps it (or one of its references) from being served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub section: String,
    pub condition: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// The L4 mode of a listener; `None` for HTTP, HTTPS and protocols not served.
pub fn mode(listener: &GatewayListener) -> Option<Mode> {
    if listener.protocol.eq_ignore_ascii_case("TCP") {
        return Some(Mode::Tcp);
    }
    if !listener.protocol.eq_ignore_ascii_case("TLS") {
        return None;
    }
    match listener.tls.as_ref().and_then(|t| t.mode.as_deref()) {
        None | Some("Terminate") => Some(Mode::TlsTerminate),
        Some("Passthrough") => Some(Mode::TlsPassthrough),
        Some(_) => None,
    }
}

/// Whether a listener of `mode` takes routes of `kind`: TCP takes TCPRoutes, a passthrough
/// listener TLSRoutes (it routes by SNI), a terminating one either (after termination a
/// TLSRoute's hostnames are the certificates' server names).
fn takes(mode: Mode, kind: RouteKind) -> bool {
    matches!(
        (mode, kind),
        (Mode::Tcp, RouteKind::Tcp)
            | (Mode::TlsTerminate, _)
            | (Mode::TlsPassthrough, RouteKind::Tls)
    )
}

/// Every TCPRoute, then every TLSRoute, by namespace and name.
pub fn routes(catalog: &Catalog) -> Vec<L4Route<'_>> {
    let tcp = catalog.tcp_routes.iter().map(|(key, r)| L4Route {
        kind: RouteKind::Tcp,
        key,
        parent_refs: &r.spec.parent_refs,
        hostnames: &[],
        rules: &r.spec.rules,
    });
    let tls = catalog.tls_routes.iter().map(|(key, r)| L4Route {
        kind: RouteKind::Tls,
        key,
        parent_refs: &r.spec.parent_refs,
        hostnames: &r.spec.hostnames,
        rules: &r.spec.rules,
    });
    tcp.chain(tls).collect()
}

/// Whether parentRef `p` of a route in `namespace` names this Gateway listener.
fn names(p: &ParentRef, namespace: &str, gateway: &ObjectKey, listener: &GatewayListener) -> bool {
    p.is_gateway()
        && p.name == gateway.name
        && p.namespace.as_deref().unwrap_or(namespace) == gateway.namespace
        && p.section_name.as_deref().is_none_or(|s| s == listener.name)
        && p.port.is_none_or(|port| port == listener.port)
}

/// The server names a route serves on a listener: for a TLSRoute the intersection of its
/// hostnames with the listener's (empty: they share none), for a TCPRoute `*`.
fn server_names(route: &L4Route<'_>, listener: &GatewayListener) -> Vec<String> {
    match route.kind {
        RouteKind::Tcp => vec!["*".to_owned()],
        RouteKind::Tls => gateway::hostnames(listener.hostname.as_deref(), route.hostnames),
    }
}

/// Whether the route is bound to this listener: named by a parentRef, of a kind the listener
/// takes, and (TLSRoute) sharing a hostname with it.
pub fn attaches(route: &L4Route<'_>, gateway: &ObjectKey, listener: &GatewayListener) -> bool {
    mode(listener).is_some_and(|m| takes(m, route.kind))
        && route
            .parent_refs
            .iter()
            .any(|p| names(p, &route.key.namespace, gateway, listener))
        && !server_names(route, listener).is_empty()
}

/// The one backend a route forwards to, with the section of its backendRef, or why it has none
/// that can be served.
pub fn backend(catalog: &Catalog, route: &L4Route<'_>) -> Result<(String, Backend), Problem> {
    let refs: Vec<(usize, usize, &crate::source::manifest::BackendRef)> = route
        .rules
        .iter()
        .enumerate()
        .flat_map(|(i, rule)| {
            rule.backend_refs
                .iter()
                .enumerate()
                .map(move |(j, r)| (i, j, r))
        })
        .filter(|(_, _, r)| r.weight != Some(0))
        .collect();
    let [(i, j, backend_ref)] = refs[..] else {
        let message = if refs.is_empty() {
            "no backendRef of non-zero weight; connections are refused".to_owned()
        } else {
            format!(
                "{} backendRefs: each connection of a {} goes to one backend (the proxy \
                 forwards a listener or server name to one cluster); give one backendRef",
                refs.len(),
                route.kind.name()
            )
        };
        return Err(Problem {
            section: "rules".into(),
            condition: d::ACCEPTED,
            reason: UNSUPPORTED_VALUE,
            message,
        });
    };
    let section = format!("rules[{i}].backendRefs[{j}]");
    let backend = route::resolve(catalog, route.key, None, backend_ref).map_err(|u| Problem {
        section: section.clone(),
        condition: d::RESOLVED_REFS,
        reason: u.reason,
        message: format!("{}; its connections are refused", u.what),
    })?;
    if backend.service.namespace != route.key.namespace
        && !tls::granted(
            catalog,
            &route.key.namespace,
            route.kind.name(),
            &backend.service,
            "Service",
        )
    {
        return Err(Problem {
            section,
            condition: d::RESOLVED_REFS,
            reason: d::REF_NOT_PERMITTED,
            message: format!(
                "Service {} is in another namespace and no ReferenceGrant in {} lets {}s of {} \
                 refer to it",
                backend.service,
                backend.service.namespace,
                route.kind.name(),
                route.key.namespace
            ),
        });
    }
    Ok((section, backend))
}

/// The BackendTLSPolicy under which a backend is reached over TLS, if any: such a backend is
/// not served by a passthrough listener, which forwards the client's own TLS (the proxy refuses
/// a passthrough listener naming a TLS cluster).
pub fn tls_policy<'a>(catalog: &'a Catalog, backend: &Backend) -> Option<&'a ObjectKey> {
    let service = catalog.services.get(&backend.service)?;
    let port = service.spec.ports.iter().find(|p| p.port == backend.port)?;
    tls::backend_policy(catalog, &backend.service, port.name.as_deref()).map(|(key, _)| key)
}

/// Why each parentRef of a route binds to nothing, in the Gateway API's terms.
pub fn parent_problems(catalog: &Catalog, route: &L4Route<'_>) -> Vec<Problem> {
    let mut out = Vec::new();
    for (i, p) in route.parent_refs.iter().enumerate() {
        if !p.is_gateway() {
            continue;
        }
        let problem = |reason, message| Problem {
            section: format!("parentRefs[{i}]"),
            condition: d::ACCEPTED,
            reason,
            message,
        };
        let gw_key = ObjectKey::new(
            p.namespace.as_deref().unwrap_or(&route.key.namespace),
            &p.name,
        );
        let Some(gw) = catalog.gateways.get(&gw_key) else {
            out.push(problem(
                NO_MATCHING_PARENT,
                format!("Gateway {gw_key} does not exist"),
            ));
            continue;
        };
        let named: Vec<&GatewayListener> = gw
            .spec
            .listeners
            .iter()
            .filter(|l| names(p, &route.key.namespace, &gw_key, l))
            .collect();
        if named.is_empty() {
            let which = match (&p.section_name, p.port) {
                (Some(s), _) => format!("named {s:?}"),
                (None, Some(port)) => format!("on port {port}"),
                (None, None) => "at all".to_owned(),
            };
            out.push(problem(
                NO_MATCHING_PARENT,
                format!("Gateway {gw_key} has no listener {which}"),
            ));
            continue;
        }
        let taking: Vec<&GatewayListener> = named
            .into_iter()
            .filter(|l| mode(l).is_some_and(|m| takes(m, route.kind)))
            .collect();
        if taking.is_empty() {
            let which = match route.kind {
                RouteKind::Tcp => "TCP and TLS Terminate listeners do",
                RouteKind::Tls => "TLS listeners do",
            };
            out.push(problem(
                NOT_ALLOWED_BY_LISTENERS,
                format!(
                    "no listener of Gateway {gw_key} it names takes a {} ({which})",
                    route.kind.name()
                ),
            ));
            continue;
        }
        if taking.iter().all(|l| server_names(route, l).is_empty()) {
            out.push(problem(
                NO_MATCHING_LISTENER_HOSTNAME,
                format!(
                    "no hostname of the route is served by the listeners of Gateway {gw_key} \
                     it names"
                ),
            ));
        }
    }
    out
}

/// The proxy listener of a Gateway port whose first listener is of L4 `mode`; `None` when
/// nothing can be served on it (no route with a usable backend, or no usable certificate).
/// Backends are added to `backends`, certificates' Secrets to `secrets`.
pub fn listener(
    catalog: &Catalog,
    gw_key: &ObjectKey,
    address: SocketAddr,
    mode: Mode,
    listeners: &[&GatewayListener],
    backends: &mut BTreeSet<Backend>,
    secrets: &mut Vec<api::Secret>,
) -> Option<api::Listener> {
    let name = format!("gateway/{gw_key}:{}", address.port());
    let mut served = Vec::new();
    for route in routes(catalog) {
        let on: Vec<&GatewayListener> = listeners
            .iter()
            .copied()
            .filter(|l| attaches(&route, gw_key, l))
            .collect();
        if on.is_empty() {
            continue;
        }
        if let Ok((_, backend)) = backend(catalog, &route) {
            served.push((route, on, backend));
        }
    }
    let kind = match mode {
        Mode::Tcp | Mode::TlsTerminate => {
            let tls = if mode == Mode::TlsTerminate {
                Some(gateway::server_tls(catalog, gw_key, listeners, secrets)?)
            } else {
                None
            };
            // One cluster per TCP listener: the first route bound; later ones are reported
            // (`status.rs`).
            let (_, _, backend) = served.into_iter().next()?;
            let cluster = super::cluster_name(&backend.service, backend.port);
            backends.insert(backend);
            Kind::Tcp(api::TcpProxy {
                cluster,
                idle_timeout_ms: 0,
                rate_limit: None,
                tls,
            })
        }
        Mode::TlsPassthrough => {
            let mut by_cluster: BTreeMap<(&ObjectKey, String), BTreeSet<String>> = BTreeMap::new();
            for (route, on, backend) in served {
                // Reported by `status.rs`.
                if tls_policy(catalog, &backend).is_some() {
                    continue;
                }
                let cluster = super::cluster_name(&backend.service, backend.port);
                backends.insert(backend);
                by_cluster
                    .entry((route.key, cluster))
                    .or_default()
                    .extend(on.iter().flat_map(|l| server_names(&route, l)));
            }
            if by_cluster.is_empty() {
                return None;
            }
            Kind::TlsPassthrough(api::SniProxy {
                routes: by_cluster
                    .into_iter()
                    .map(|((_, cluster), names)| api::SniRoute {
                        server_names: names.into_iter().collect(),
                        cluster,
                    })
                    .collect(),
                default_cluster: String::new(),
                idle_timeout_ms: 0,
                rate_limit: None,
            })
        }
    };
    Some(api::Listener {
        name,
        address: address.to_string(),
        kind: Some(kind),
        max_connections: None,
    })
}

/// Routes bound to a TCP or terminating TLS port after the first one served there: the proxy
/// listener forwards to one cluster, so these are not served. As `(route, the route served
/// instead)`.
pub fn crowded_out<'a>(
    catalog: &'a Catalog,
    gw_key: &ObjectKey,
    listeners: &[&GatewayListener],
) -> Vec<(L4Route<'a>, String)> {
    let mut first: Option<String> = None;
    let mut out = Vec::new();
    for route in routes(catalog) {
        if !listeners.iter().any(|l| attaches(&route, gw_key, l))
            || backend(catalog, &route).is_err()
        {
            continue;
        }
        match &first {
            None => first = Some(format!("{} {}", route.kind.name(), route.key)),
            Some(winner) => out.push((route, winner.clone())),
        }
    }
    out
}
