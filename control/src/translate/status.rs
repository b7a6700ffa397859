//! The conditions translation cannot satisfy, as [`Diagnostic`]s: per object from the catalog
//! (computed once per catalog, whichever proxies are connected), and per proxy from its node.
//! The same rules as the translation itself decide them (`route::resolve`,
//! `gateway::is_served`), so what is reported is what is served.

use crate::{
    catalog::Catalog,
    diagnostics::{self as d, Diagnostic},
};

use super::{NodeInfo, Role, gateway, route, tls};

/// Every problem with the catalog's objects, in kind, namespace, name order.
pub fn object_diagnostics(catalog: &Catalog) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let now = std::time::SystemTime::now();
    for (key, gw) in &catalog.gateways {
        // The first served listener on each port decides whether the port is TLS.
        let mut port_https = std::collections::BTreeMap::new();
        for listener in &gw.spec.listeners {
            let section = || Some(format!("listeners[{}]", listener.name));
            if gateway::is_served(listener) {
                let https = gateway::is_https(listener);
                if *port_https.entry(listener.port).or_insert(https) != https {
                    out.push(Diagnostic::failed(
                        "Gateway",
                        &key.namespace,
                        &key.name,
                        section(),
                        d::ACCEPTED,
                        d::PROTOCOL_CONFLICT,
                        format!(
                            "port {} is served with{} TLS by an earlier listener; this {} \
                             listener is ignored",
                            listener.port,
                            if https { "out" } else { "" },
                            listener.protocol
                        ),
                    ));
                    continue;
                }
            }
            if gateway::is_https(listener) {
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
                        "an HTTPS listener needs tls.certificateRefs; the listener is not served"
                            .into(),
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
                        "protocol {:?} on port {} is not served yet (supported: HTTP, HTTPS \
                         with tls.mode Terminate); the listener is ignored",
                        listener.protocol, listener.port
                    ),
                ));
            }
        }
    }
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

/// Problems of one connected proxy: a gateway whose Gateway does not exist gets nothing to
/// serve, and says so here rather than waiting silently.
pub fn node_diagnostics(catalog: &Catalog, node: &NodeInfo) -> Vec<Diagnostic> {
    let mut out = Vec::new();
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
