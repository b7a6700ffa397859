//! Routing: a pure function from a compiled route table and a request head to the route that
//! handles it.
//!
//! Precedence follows the Gateway API's HTTPRoute rules: the virtual host whose domain is most
//! specific (exact, then the longest `*.` suffix, then `*`); within it, an exact path beats a
//! template, which beats a regex, which beats a prefix (longer first; as in Envoy Gateway, so a
//! catch-all `/` never shadows a regex); among routes with the same
//! path match, one with a method beats one without, then more header matches, then more query
//! matches, then the earlier route. The first route in that order whose conditions all hold wins.
//! The order is fixed when the table is compiled, so a lookup only walks candidates.

use std::collections::HashMap;

use http::{HeaderMap, Method};

use crate::config::{
    domains::DomainTable,
    model::{DomainMatch, HeaderMatch, PathMatch, QueryMatch, RouteMatch, ValueMatch},
};

/// What routing looks at.
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'a> {
    /// Host from `:authority` or `Host`, possibly with a port and in any case.
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

/// The routes of one route configuration, indexed for lookup. `R` is what a route compiles to.
#[derive(Debug)]
pub struct RouteTable<R> {
    hosts: DomainTable<usize>,
    vhosts: Box<[VhostTable<R>]>,
}

#[derive(Debug)]
struct VhostTable<R> {
    routes: Box<[Candidate<R>]>,
    exact: HashMap<Box<str>, Box<[u32]>>,
    templates: Option<matchit::Router<Box<[u32]>>>,
    prefixes: HashMap<Box<str>, Box<[u32]>>,
    regexes: Box<[u32]>,
}

#[derive(Debug)]
struct Candidate<R> {
    matcher: RouteMatch,
    value: R,
}

/// One virtual host's routes as given to [`RouteTable::build`], in config order.
pub struct VhostInput<R> {
    pub domains: Vec<DomainMatch>,
    pub routes: Vec<(RouteMatch, R)>,
}

/// A template that the router cannot hold next to the others (matchit reports a conflict).
#[derive(Debug, thiserror::Error)]
#[error("virtual host {vhost}, route {route}: template {template:?} conflicts: {reason}")]
pub struct TemplateConflict {
    pub vhost: usize,
    pub route: usize,
    pub template: String,
    pub reason: String,
}

impl<R> RouteTable<R> {
    pub fn build(vhosts: Vec<VhostInput<R>>) -> Result<Self, TemplateConflict> {
        let mut domains = Vec::new();
        let mut tables = Vec::with_capacity(vhosts.len());
        for (vi, vh) in vhosts.into_iter().enumerate() {
            domains.extend(vh.domains.into_iter().map(|d| (d, vi)));
            tables.push(VhostTable::build(vi, vh.routes)?);
        }
        Ok(RouteTable {
            hosts: DomainTable::build(domains),
            vhosts: tables.into(),
        })
    }

    /// The route for this request, if any.
    pub fn route(&self, req: &RequestHead<'_>) -> Option<&R> {
        let vh = self.vhost(req.host)?;
        self.vhosts[vh].route(req)
    }

    fn vhost(&self, host: &str) -> Option<usize> {
        self.hosts.lookup(strip_port(host)).copied()
    }
}

impl<R> VhostTable<R> {
    fn build(vhost: usize, routes: Vec<(RouteMatch, R)>) -> Result<Self, TemplateConflict> {
        let mut exact: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut templates: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut template_order: Vec<Box<str>> = Vec::new();
        let mut prefixes: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut regexes = Vec::new();
        let candidates: Vec<Candidate<R>> = routes
            .into_iter()
            .map(|(matcher, value)| Candidate { matcher, value })
            .collect();
        for (i, c) in candidates.iter().enumerate() {
            let id = i as u32;
            match &c.matcher.path {
                PathMatch::Exact(p) => exact.entry(Box::from(&**p)).or_default().push(id),
                PathMatch::Template(t) => {
                    let key: Box<str> = Box::from(&**t);
                    if !templates.contains_key(&key) {
                        template_order.push(key.clone());
                    }
                    templates.entry(key).or_default().push(id);
                }
                PathMatch::Prefix(p) => prefixes.entry(Box::from(&**p)).or_default().push(id),
                PathMatch::Regex(_) => regexes.push(id),
            }
        }
        let order = |ids: Vec<u32>| -> Box<[u32]> { secondary_order(&candidates, ids) };
        let template_router = if template_order.is_empty() {
            None
        } else {
            let mut router = matchit::Router::new();
            for key in template_order {
                let ids = templates.remove(&key).unwrap_or_default();
                let first = ids[0] as usize;
                router
                    .insert(&*key, order(ids))
                    .map_err(|e| TemplateConflict {
                        vhost,
                        route: first,
                        template: key.to_string(),
                        reason: e.to_string(),
                    })?;
            }
            Some(router)
        };
        Ok(VhostTable {
            exact: exact.into_iter().map(|(k, v)| (k, order(v))).collect(),
            templates: template_router,
            prefixes: prefixes.into_iter().map(|(k, v)| (k, order(v))).collect(),
            regexes: order(regexes),
            routes: candidates.into(),
        })
    }

    fn route(&self, req: &RequestHead<'_>) -> Option<&R> {
        let path = req.path;
        if let Some(r) = self.exact.get(path).and_then(|ids| self.first(ids, req)) {
            return Some(r);
        }
        if let Some(router) = &self.templates
            && let Ok(m) = router.at(path)
            && let Some(r) = self.first(m.value, req)
        {
            return Some(r);
        }
        if let Some(r) = self.regexes.iter().find_map(|&id| {
            let c = &self.routes[id as usize];
            match &c.matcher.path {
                PathMatch::Regex(re) if re.is_match(path) && conditions_hold(&c.matcher, req) => {
                    Some(&c.value)
                }
                _ => None,
            }
        }) {
            return Some(r);
        }
        if !self.prefixes.is_empty() {
            // Try the path itself, then each shorter segment boundary: /a/b/c, /a/b, /a, /.
            let mut candidate = path.trim_end_matches('/');
            loop {
                let key = if candidate.is_empty() { "/" } else { candidate };
                if let Some(r) = self.prefixes.get(key).and_then(|ids| self.first(ids, req)) {
                    return Some(r);
                }
                if candidate.is_empty() {
                    break;
                }
                candidate = match candidate.rfind('/') {
                    Some(i) => &candidate[..i],
                    None => "",
                };
            }
        }
        None
    }

    fn first(&self, ids: &[u32], req: &RequestHead<'_>) -> Option<&R> {
        ids.iter().find_map(|&id| {
            let c = &self.routes[id as usize];
            conditions_hold(&c.matcher, req).then_some(&c.value)
        })
    }
}

/// Among routes with the same path match: method first, then more header matches, then more query
/// matches, then config order.
fn secondary_order<R>(routes: &[Candidate<R>], mut ids: Vec<u32>) -> Box<[u32]> {
    ids.sort_by_key(|&id| {
        let m = &routes[id as usize].matcher;
        (
            std::cmp::Reverse(m.method.is_some()),
            std::cmp::Reverse(m.headers.len()),
            std::cmp::Reverse(m.query.len()),
            id,
        )
    });
    ids.into()
}

fn conditions_hold(m: &RouteMatch, req: &RequestHead<'_>) -> bool {
    if let Some(method) = &m.method
        && method != req.method
    {
        return false;
    }
    m.headers.iter().all(|h| header_holds(h, req.headers))
        && m.query.iter().all(|q| query_holds(q, req.query))
}

fn header_holds(h: &HeaderMatch, headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(&h.name).iter();
    match &h.value {
        ValueMatch::Present => values.next().is_some(),
        ValueMatch::Absent => values.next().is_none(),
        ValueMatch::Exact(want) => values.any(|v| v.as_bytes() == want.as_bytes()),
        ValueMatch::Regex(re) => values.any(|v| v.to_str().is_ok_and(|s| re.is_match(s))),
    }
}

/// Only the first parameter with the name counts, as the Gateway API specifies.
fn query_holds(q: &QueryMatch, query: Option<&str>) -> bool {
    let found = query.and_then(|qs| {
        qs.split('&').find_map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (name == &*q.name).then_some(value)
        })
    });
    match (&q.value, found) {
        (ValueMatch::Present, found) => found.is_some(),
        (ValueMatch::Absent, found) => found.is_none(),
        (ValueMatch::Exact(want), Some(v)) => v == &**want,
        (ValueMatch::Regex(re), Some(v)) => re.is_match(v),
        (_, None) => false,
    }
}

/// `example.com:8080` → `example.com`; `[::1]:8080` → `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}
