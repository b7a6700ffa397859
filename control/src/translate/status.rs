//! The conditions translation cannot satisfy, as [`Diagnostic`]s: per object from the catalog
//! (computed once per catalog, whichever proxies are connected), and per proxy from its node.
//! The same rules as the translation itself decide them (`route::resolve`,
//! `gateway::is_served`), so what is reported is what is served.

use crate::{
    catalog::Catalog,
    diagnostics::{self as d, Diagnostic},
};

use super::{NodeInfo, Role, cluster, gateway, l4, policy, route, sidecar, tls};

/// Every problem with the catalog's objects, in kind, namespace, name order.
pub fn object_diagnostics(catalog: &Catalog) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let now = std::time::SystemTime::now();
    for (key, gw) in &catalog.gateways {
        // The first served listener on each port decides what the port is.
        let mut port_kinds = std::collections::BTreeMap::new();
        for listener in &gw.spec.listeners {
            let section = || Some(format!("listeners[{}]", listener.name));
            if let Some(kind) = gateway::port_kind(listener) {
                let first = *port_kinds.entry(listener.port).or_insert(kind);
                if first != kind {
                    out.push(Diagnostic::failed(
                        "Gateway",
                        &key.namespace,
                        &key.name,
                        section(),
                        d::ACCEPTED,
                        d::PROTOCOL_CONFLICT,
                        format!(
                            "port {} is served as {} by an earlier listener; this {} listener \
                             is ignored",
                            listener.port,
                            describe(first),
                            describe(kind)
                        ),
                    ));
                    continue;
                }
            }
            if gateway::terminates_tls(listener)
                && let Some(v) = tls::frontend_validation(gw, listener)
                && let Err(u) = tls::client_validation(catalog, key, v)
            {
                out.push(Diagnostic::failed(
                    "Gateway",
                    &key.namespace,
                    &key.name,
                    Some(format!(
                        "listeners[{}].tls.frontendValidation",
                        listener.name
                    )),
                    d::RESOLVED_REFS,
                    u.reason,
                    format!(
                        "{}; the listener is not served without its client certificate check",
                        u.message
                    ),
                ));
            }
            if gateway::terminates_tls(listener) {
                let refs = listener
                    .tls
                    .as_ref()
                    .map(|t| &t.certificate_refs[..])
                    .unwrap_or_default();
                if refs.is_empty() {
                    out.push(Diagnostic::failed(
                        "Gateway",
                        &key.namespace,
                        &key.name,
                        section(),
                        d::RESOLVED_REFS,
                        d::INVALID_CERTIFICATE_REF,
                        format!(
                            "{} needs tls.certificateRefs; the listener is not served",
                            if gateway::is_https(listener) {
                                "an HTTPS listener"
                            } else {
                                "a TLS listener that terminates"
                            }
                        ),
                    ));
                }
                for (i, r) in refs.iter().enumerate() {
                    let problem = match tls::resolve_certificate_ref(catalog, key, r, now) {
                        Ok(resolved) => resolved.problem.map(|m| (d::INVALID_CERTIFICATE_REF, m)),
                        Err(u) => Some((u.reason, u.message)),
                    };
                    if let Some((reason, message)) = problem {
                        out.push(Diagnostic::failed(
                            "Gateway",
                            &key.namespace,
                            &key.name,
                            Some(format!(
                                "listeners[{}].tls.certificateRefs[{i}]",
                                listener.name
                            )),
                            d::RESOLVED_REFS,
                            reason,
                            message,
                        ));
                    }
                }
            }
            if !gateway::is_served(listener) {
                out.push(Diagnostic::failed(
                    "Gateway",
                    &key.namespace,
                    &key.name,
                    Some(format!("listeners[{}]", listener.name)),
                    d::ACCEPTED,
                    d::UNSUPPORTED_PROTOCOL,
                    format!(
                        "protocol {:?} on port {} is not served (supported: HTTP, HTTPS, TCP, \
                         and TLS with tls.mode Terminate or Passthrough); the listener is \
                         ignored",
                        listener.protocol, listener.port
                    ),
                ));
            }
        }
    }
    out.extend(l4_diagnostics(catalog));
    for (key, policy) in &catalog.backend_tls_policies {
        if let Err(u) = tls::backend_tls(catalog, key, policy) {
            let condition = if u.reason == d::INVALID {
                d::ACCEPTED
            } else {
                d::RESOLVED_REFS
            };
            out.push(Diagnostic::failed(
                "BackendTLSPolicy",
                &key.namespace,
                &key.name,
                None,
                condition,
                u.reason,
                format!("{}; the Services it targets are not reached", u.message),
            ));
        }
    }
    out.extend(mesh_diagnostics(catalog));
    for (key, http_route) in &catalog.http_routes {
        // A route attached to a Service port (GAMMA) lends that port to portless backendRefs.
        let service_parent = http_route.spec.parent_refs.iter().any(|p| p.is_service());
        for (i, rule) in http_route.spec.rules.iter().enumerate() {
            for (j, backend_ref) in rule.backend_refs.iter().enumerate() {
                let Err(unresolved) = route::resolve(catalog, key, None, backend_ref) else {
                    continue;
                };
                if unresolved.port_only && service_parent && backend_ref.port.is_none() {
                    continue;
                }
                out.push(Diagnostic::failed(
                    "HTTPRoute",
                    &key.namespace,
                    &key.name,
                    Some(format!("rules[{i}].backendRefs[{j}]")),
                    d::RESOLVED_REFS,
                    unresolved.reason,
                    unresolved.message,
                ));
            }
        }
    }
    out
}

/// AuthorizationPolicies that are not sent, Namespaces with a bad `trellis.io/mtls` label, and
/// EndpointSlices whose `trellis.io/service-account` is not an account name.
fn mesh_diagnostics(catalog: &Catalog) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (key, p) in &catalog.authorization_policies {
        if let Err(e) = policy::translate(key, p) {
            out.push(Diagnostic::failed(
                "AuthorizationPolicy",
                &key.namespace,
                &key.name,
                None,
                d::ACCEPTED,
                d::INVALID,
                format!("{e}; the policy is not sent to any sidecar"),
            ));
        }
    }
    for (name, ns) in &catalog.namespaces {
        if let Some(value) = ns.metadata.labels.get(sidecar::MTLS_LABEL)
            && value != "strict"
            && value != "permissive"
        {
            out.push(Diagnostic::failed(
                "Namespace",
                "",
                name,
                None,
                d::ACCEPTED,
                d::INVALID_LABEL,
                format!(
                    "label {}={value:?} is not \"strict\" or \"permissive\"; its sidecars \
                     without their own label use permissive",
                    sidecar::MTLS_LABEL
                ),
            ));
        }
    }
    for (key, slice) in &catalog.endpoint_slices {
        if let Some(account) = slice
            .metadata
            .annotations
            .get(cluster::SERVICE_ACCOUNT_ANNOTATION)
            && let Err(e) = crate::identity::WorkloadId::new(&key.namespace, account)
        {
            out.push(Diagnostic::failed(
                "EndpointSlice",
                &key.namespace,
                &key.name,
                None,
                d::ACCEPTED,
                d::INVALID,
                format!(
                    "annotation {}: {e}; its endpoints are not meshed",
                    cluster::SERVICE_ACCOUNT_ANNOTATION
                ),
            ));
        }
    }
    out
}

/// How a port is served, for messages.
fn describe(kind: gateway::PortKind) -> &'static str {
    match kind {
        gateway::PortKind::Http => "HTTP",
        gateway::PortKind::Https => "HTTPS",
        gateway::PortKind::L4(l4::Mode::Tcp) => "TCP",
        gateway::PortKind::L4(l4::Mode::TlsTerminate) => "TLS terminated",
        gateway::PortKind::L4(l4::Mode::TlsPassthrough) => "TLS passthrough",
    }
}

/// TCPRoutes and TLSRoutes that bind to no listener, name a backend that cannot be served, or
/// lose their TCP port to an earlier route.
fn l4_diagnostics(catalog: &Catalog) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let mut push = |route: &l4::L4Route<'_>, p: l4::Problem| {
        out.push(Diagnostic::failed(
            route.kind.name(),
            &route.key.namespace,
            &route.key.name,
            Some(p.section),
            p.condition,
            p.reason,
            p.message,
        ));
    };
    for route in l4::routes(catalog) {
        for p in l4::parent_problems(catalog, &route) {
            push(&route, p);
        }
        match l4::backend(catalog, &route) {
            Err(p) => push(&route, p),
            Ok((section, backend)) => {
                let Some(policy) = l4::tls_policy(catalog, &backend) else {
                    continue;
                };
                for (gw_key, gw) in &catalog.gateways {
                    for l in &gw.spec.listeners {
                        if l4::mode(l) == Some(l4::Mode::TlsPassthrough)
                            && l4::attaches(&route, gw_key, l)
                        {
                            push(
                                &route,
                                l4::Problem {
                                    section: section.clone(),
                                    condition: d::RESOLVED_REFS,
                                    reason: l4::UNSUPPORTED_VALUE,
                                    message: format!(
                                        "Service {} is under BackendTLSPolicy {policy}, and a \
                                         passthrough listener forwards the client's own TLS; \
                                         not served on listener {} of Gateway {gw_key}",
                                        backend.service, l.name
                                    ),
                                },
                            );
                        }
                    }
                }
            }
        }
    }
    for (gw_key, gw) in &catalog.gateways {
        let mut by_port: std::collections::BTreeMap<u16, Vec<_>> = Default::default();
        for l in &gw.spec.listeners {
            by_port.entry(l.port).or_default().push(l);
        }
        for listeners in by_port.values() {
            let Some(gateway::PortKind::L4(mode @ (l4::Mode::Tcp | l4::Mode::TlsTerminate))) =
                gateway::port_kind(listeners[0])
            else {
                continue;
            };
            let same: Vec<_> = listeners
                .iter()
                .copied()
                .filter(|l| gateway::port_kind(l) == Some(gateway::PortKind::L4(mode)))
                .collect();
            for (route, winner) in l4::crowded_out(catalog, gw_key, &same) {
                push(
                    &route,
                    l4::Problem {
                        section: "parentRefs".into(),
                        condition: d::ACCEPTED,
                        reason: l4::UNSUPPORTED_VALUE,
                        message: format!(
                            "port {} of Gateway {gw_key} already forwards to {winner}; a TCP \
                             listener forwards to one route's backend",
                            listeners[0].port
                        ),
                    },
                );
            }
        }
    }
    out.sort_by(|a, b| {
        (&a.kind, &a.namespace, &a.name, &a.section).cmp(&(
            &b.kind,
            &b.namespace,
            &b.name,
            &b.section,
        ))
    });
    out
}

/// Problems of one connected proxy: a gateway whose Gateway does not exist gets nothing to
/// serve, and says so here rather than waiting silently; a sidecar's labels that are not values
/// they may take (the default is used).
pub fn node_diagnostics(catalog: &Catalog, node: &NodeInfo) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if node.role == Role::Sidecar {
        for problem in sidecar::label_problems(catalog, node) {
            out.push(Diagnostic::failed(
                d::PROXY,
                &node.namespace,
                &node.id,
                None,
                d::CONFIGURED,
                d::INVALID_LABEL,
                problem,
            ));
        }
    }
    if let (Role::Gateway, Some(gw)) = (node.role, &node.gateway)
        && !catalog.gateways.contains_key(gw)
    {
        out.push(Diagnostic::failed(
            d::PROXY,
            &node.namespace,
            &node.id,
            None,
            d::CONFIGURED,
            d::GATEWAY_NOT_FOUND,
            format!(
                "Gateway {gw} (named by --gateway) does not exist{}; the proxy gets no \
                 listeners until it does",
                similar(catalog)
            ),
        ));
    }
    out
}

/// ` (Gateways defined: a/b, c/d)`: what does exist, as a hint for a mistyped name.
fn similar(catalog: &Catalog) -> String {
    if catalog.gateways.is_empty() {
        return " (the manifests define no Gateway)".to_owned();
    }
    let names: Vec<String> = catalog.gateways.keys().map(ToString::to_string).collect();
    format!(" (Gateways defined: {})", names.join(", "))
}
