//! HTTPRoute rules become proxy routes: one route per match (Gateway API ORs a rule's matches),
//! backends resolved to service-port clusters.

use std::collections::BTreeSet;

use trellis_proto::discovery::v1::{self as api, route::Action};

use super::cluster::cluster_name;
use crate::{
    catalog::{Catalog, ObjectKey},
    source::manifest::{
        self, BackendRef, HeaderModifier, HttpRoute, HttpRouteMatch, HttpRouteRule, PathModifier,
    },
};

/// A service port some route forwards to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    pub service: ObjectKey,
    pub port: u16,
}

/// Where the routes of one HTTPRoute are going.
pub struct Context<'a> {
    pub catalog: &'a Catalog,
    pub route_key: &'a ObjectKey,
    /// For a route attached to a Service port (GAMMA): a backendRef without a port means this
    /// port.
    pub parent_port: Option<u16>,
}

/// The proxy routes of one HTTPRoute; every backend they forward to is added to `backends`.
pub fn routes(
    ctx: &Context<'_>,
    route: &HttpRoute,
    backends: &mut BTreeSet<Backend>,
) -> Vec<api::Route> {
    let mut out = Vec::new();
    for (i, rule) in route.spec.rules.iter().enumerate() {
        let action = action(ctx, rule, backends);
        let filters = filters(rule);
        let timeout_ms = rule
            .timeouts
            .as_ref()
            .and_then(|t| t.request.as_deref())
            .and_then(|t| manifest::parse_duration_ms(t).ok());
        let retry = retry_policy(rule);
        let default_match = [HttpRouteMatch::default()];
        let matches = if rule.matches.is_empty() {
            &default_match[..]
        } else {
            &rule.matches[..]
        };
        for (j, m) in matches.iter().enumerate() {
            out.push(api::Route {
                upgrades: Vec::new(), // WebSocket only
                name: format!("{}/{}/{}", ctx.route_key, i, j),
                r#match: Some(route_match(m)),
                filters: filters.clone(),
                timeout_ms,
                retry: retry.clone(),
                rate_limit: None,
                action: Some(action.clone()),
            });
        }
    }
    out
}

/// The default route of a service port with no HTTPRoute: everything to its own cluster.
pub fn default_route(cluster: &str) -> api::Route {
    api::Route {
        upgrades: Vec::new(), // WebSocket only
        name: "default".to_owned(),
        r#match: None,
        action: Some(Action::Forward(api::ForwardAction {
            clusters: vec![api::WeightedCluster {
                cluster: cluster.to_owned(),
                weight: 1,
            }],
        })),
        filters: None,
        timeout_ms: None,
        retry: None,
        rate_limit: None,
    }
}

/// A rule's `retry` (GEP-1731) and `timeouts.backendRequest` (GEP-1742) as the route's retry
/// policy; `None` when it has neither, which leaves the proxy's default policy. What the rule
/// does not say stays unset on the wire, so the proxy's defaults fill it in: the retry count
/// when `attempts` is absent, a 25 ms backoff base, and the conditions connect-failure,
/// refused-stream and reset. GEP-1731 asks for connection errors to be retried once a retry
/// stanza is present; the proxy retries a reset (where the backend may have seen the request)
/// only for idempotent methods.
fn retry_policy(rule: &HttpRouteRule) -> Option<api::RetryPolicy> {
    // "0s" turns the timeout off (GEP-1742), which is 0 on the wire too.
    let per_try_timeout_ms = rule
        .timeouts
        .as_ref()
        .and_then(|t| t.backend_request.as_deref())
        .and_then(|t| manifest::parse_duration_ms(t).ok())
        .unwrap_or(0);
    if rule.retry.is_none() && per_try_timeout_ms == 0 {
        return None;
    }
    let retry = rule.retry.clone().unwrap_or_default();
    Some(api::RetryPolicy {
        // An explicit 0 turns retries off, as GEP-1731 requires.
        attempts: retry.attempts,
        backoff_ms: retry
            .backoff
            .as_deref()
            .and_then(|b| manifest::parse_duration_ms(b).ok())
            .unwrap_or(0),
        codes: retry.codes.iter().map(|&c| u32::from(c)).collect(),
        retry_on: Vec::new(),
        per_try_timeout_ms,
        backoff_max_ms: 0,
        retry_non_idempotent: false,
        replay_buffer_bytes: None,
    })
}

fn route_match(m: &HttpRouteMatch) -> api::RouteMatch {
    use api::route_match::Path;
    let path = m.path.as_ref().map(|p| {
        let value = p.value.clone().unwrap_or_else(|| "/".to_owned());
        match p.kind.as_deref() {
            Some("Exact") => Path::Exact(value),
            Some("RegularExpression") => Path::Regex(value),
            // PathPrefix: "/api/" and "/api" match the same segments.
            _ if value.len() > 1 => Path::Prefix(value.trim_end_matches('/').to_owned()),
            _ => Path::Prefix(value),
        }
    });
    let value_match = |v: &manifest::ValueMatch| {
        use api::value_match::Kind;
        Some(api::ValueMatch {
            kind: Some(match v.kind.as_deref() {
                Some("RegularExpression") => Kind::Regex(v.value.clone()),
                _ => Kind::Exact(v.value.clone()),
            }),
        })
    };
    api::RouteMatch {
        path,
        headers: m
            .headers
            .iter()
            .map(|h| api::HeaderMatch {
                name: h.name.clone(),
                value: value_match(h),
            })
            .collect(),
        query: m
            .query_params
            .iter()
            .map(|q| api::QueryMatch {
                name: q.name.clone(),
                value: value_match(q),
            })
            .collect(),
        method: m.method.clone().unwrap_or_default(),
    }
}

/// A redirect filter answers; otherwise forward to the backends. A backendRef that does not
/// resolve stays in the split under the cluster name it would have had, with its weight, and
/// no Cluster is sent for it: the proxy answers that share 500, as Gateway API asks, while the
/// rest still flows (translation reports it, see `status.rs`). A rule with no backend of
/// non-zero weight answers 500.
fn action(ctx: &Context<'_>, rule: &HttpRouteRule, backends: &mut BTreeSet<Backend>) -> Action {
    if let Some(redirect) = rule
        .filters
        .iter()
        .find_map(|f| f.request_redirect.as_ref())
    {
        use api::redirect_action::Path;
        return Action::Redirect(api::RedirectAction {
            scheme: redirect.scheme.clone().unwrap_or_default(),
            host: redirect.hostname.clone().unwrap_or_default(),
            port: redirect.port.map_or(0, u32::from),
            path: redirect.path.as_ref().and_then(|p| match path_modifier(p) {
                Some(Replace::Full(f)) => Some(Path::FullPath(f)),
                Some(Replace::Prefix(p)) => Some(Path::Prefix(p)),
                None => None,
            }),
            status: redirect.status_code.map_or(302, u32::from),
        });
    }
    let mut clusters = Vec::new();
    for backend_ref in &rule.backend_refs {
        let weight = backend_ref.weight.unwrap_or(1);
        if weight == 0 {
            continue;
        }
        let cluster = match resolve(ctx.catalog, ctx.route_key, ctx.parent_port, backend_ref) {
            Ok(backend) => {
                let name = cluster_name(&backend.service, backend.port);
                backends.insert(backend);
                name
            }
            Err(unresolved) => unresolved.cluster,
        };
        clusters.push(api::WeightedCluster { cluster, weight });
    }
    if clusters.is_empty() {
        return Action::DirectResponse(api::DirectResponseAction {
            status: 500,
            body: b"no valid backend".to_vec(),
        });
    }
    Action::Forward(api::ForwardAction { clusters })
}

/// Why a backendRef does not resolve to a Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    /// The cluster name the reference stands for in the route: the one it would have had, or
    /// for a reference to another kind a name no Service cluster can take.
    pub cluster: String,
    /// Gateway API reason: `BackendNotFound` or `InvalidKind`.
    pub reason: &'static str,
    pub message: String,
    /// What is wrong, without what it does to HTTP requests (for routes of other kinds).
    pub what: String,
    /// The failure is about the port only (absent or not on the Service); a route attached to a
    /// Service port may supply it.
    pub port_only: bool,
}

/// A backendRef to a Service port that exists. Cross-namespace references are allowed
/// (ReferenceGrant is not enforced yet).
pub fn resolve(
    catalog: &Catalog,
    route_key: &ObjectKey,
    parent_port: Option<u16>,
    backend_ref: &BackendRef,
) -> Result<Backend, Unresolved> {
    let namespace = backend_ref
        .namespace
        .as_deref()
        .unwrap_or(&route_key.namespace);
    let service_key = ObjectKey::new(namespace, &backend_ref.name);
    let port = backend_ref.port.or(parent_port);
    // Service names hold no `:`, so a portless name cannot be a real cluster's.
    let would_be = || match port {
        Some(p) => cluster_name(&service_key, p),
        None => service_key.to_string(),
    };
    let group = backend_ref.group.as_deref().unwrap_or("");
    let kind = backend_ref.kind.as_deref().unwrap_or("Service");
    if kind != "Service" || !group.is_empty() {
        let group_kind = if group.is_empty() {
            kind.to_owned()
        } else {
            format!("{kind}.{group}")
        };
        let what =
            format!("backendRef {group_kind} {service_key}: only Service backends are supported");
        return Err(Unresolved {
            // Two `/` and the kind: never a Service cluster's name.
            cluster: format!("{group_kind}/{}", would_be()),
            reason: crate::diagnostics::INVALID_KIND,
            message: format!("{what}; its share of requests is answered 500"),
            what,
            port_only: false,
        });
    }
    let not_found = |what: String, port_only: bool| Unresolved {
        cluster: would_be(),
        reason: crate::diagnostics::BACKEND_NOT_FOUND,
        message: format!("{what}; its share of requests is answered 500"),
        what,
        port_only,
    };
    let Some(service) = catalog.services.get(&service_key) else {
        return Err(not_found(
            format!("Service {service_key} does not exist"),
            false,
        ));
    };
    let ports = &service.spec.ports;
    let port = match port {
        Some(p) => p,
        None if ports.len() == 1 => ports[0].port,
        None => {
            return Err(not_found(
                format!(
                    "backendRef to Service {service_key} needs a port: it has {}",
                    ports.len()
                ),
                true,
            ));
        }
    };
    if !ports.iter().any(|p| p.port == port) {
        return Err(not_found(
            format!("Service {service_key} has no port {port}"),
            true,
        ));
    }
    Ok(Backend {
        service: service_key,
        port,
    })
}

enum Replace {
    Full(String),
    Prefix(String),
}

fn path_modifier(p: &PathModifier) -> Option<Replace> {
    match p.kind.as_str() {
        "ReplaceFullPath" => p.replace_full_path.clone().map(Replace::Full),
        "ReplacePrefixMatch" => p.replace_prefix_match.clone().map(Replace::Prefix),
        _ => None,
    }
}

fn filters(rule: &HttpRouteRule) -> Option<api::Filters> {
    let mut filters = api::Filters::default();
    for filter in &rule.filters {
        if let Some(m) = &filter.request_header_modifier {
            filters.request_headers = Some(header_edits(m));
        }
        if let Some(m) = &filter.response_header_modifier {
            filters.response_headers = Some(header_edits(m));
        }
        if let Some(rewrite) = &filter.url_rewrite {
            use api::rewrite::Path;
            filters.rewrite = Some(api::Rewrite {
                path: rewrite.path.as_ref().and_then(|p| match path_modifier(p) {
                    Some(Replace::Full(f)) => Some(Path::FullPath(f)),
                    Some(Replace::Prefix(p)) => Some(Path::Prefix(p)),
                    None => None,
                }),
                host: rewrite.hostname.clone().unwrap_or_default(),
            });
        }
    }
    (filters != api::Filters::default()).then_some(filters)
}

fn header_edits(m: &HeaderModifier) -> api::HeaderEdits {
    let headers = |list: &[manifest::NameValue]| {
        list.iter()
            .map(|h| api::Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect()
    };
    api::HeaderEdits {
        add: headers(&m.add),
        set: headers(&m.set),
        remove: m.remove.clone(),
    }
}
