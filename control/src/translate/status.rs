//! The conditions translation cannot satisfy, as [`Diagnostic`]s: per object from the catalog
//! (computed once per catalog, whichever proxies are connected), and per proxy from its node.
//! The same rules as the translation itself decide them (`route::resolve`,
//! `gateway::is_served`), so what is reported is what is served.

use crate::{
    catalog::Catalog,
    diagnostics::{self as d, Diagnostic},
};

use super::{NodeInfo, Role, gateway, route};

/// Every problem with the catalog's objects, in kind, namespace, name order.
pub fn object_diagnostics(catalog: &Catalog) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (key, gw) in &catalog.gateways {
        for listener in &gw.spec.listeners {
            if !gateway::is_served(listener) {
                out.push(Diagnostic::failed(
                    "Gateway",
                    &key.namespace,
                    &key.name,
                    Some(format!("listeners[{}]", listener.name)),
                    d::ACCEPTED,
                    d::UNSUPPORTED_PROTOCOL,
                    format!(
                        "protocol {:?} on port {} is not served yet (supported: HTTP); the \
                         listener is ignored",
                        listener.protocol, listener.port
                    ),
                ));
            }
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
