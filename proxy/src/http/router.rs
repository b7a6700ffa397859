//! Routing: a pure function from a compiled route table and a request head to the route that
//! handles it.
//!
//! Precedence follows the Gateway API's HTTPRoute rules: the virtual host whose domain is most
//! specific (exact, then the longest `*.` suffix, then `*`); within it, an exact path beats a
//! template, which beats a regex (all regexes rank alike), which beats a prefix (longer first; as
//! in Envoy Gateway, so a catch-all `/` never shadows a regex); among routes with the same
//! path match, one with a method beats one without, then more header matches, then more query
//! matches, then the earlier route. Among templates that match the same path, the more specific
//! one at the first segment where they differ comes first: a literal segment, then a parameter
//! with literal text around it (more text first), then a bare parameter, then a catch-all (the
//! order `matchit` itself prefers). The first route in that order whose conditions all hold wins,
//! so a request whose most specific template's routes all fail falls through to the next template
//! that matches, then to regexes and prefixes. The order is fixed when the table is compiled, so
//! a lookup only walks candidates.

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
    templates: Option<Templates>,
    prefixes: HashMap<Box<str>, Box<[u32]>>,
    regexes: Box<[u32]>,
    /// With more than one regex route: all of `regexes`' patterns, in that order, so one pass
    /// over the path finds every regex that matches instead of one pass per route. `None`
    /// (scan one by one) when the patterns together exceed the set's size limit.
    regex_set: Option<regex::RegexSet>,
}

/// The templates of one virtual host: one `matchit` router finds the most specific template in a
/// single lookup; when none of its routes' conditions hold, the others are scanned in precedence
/// order. The scan costs a lookup per template, but only requests that fall through pay it.
#[derive(Debug)]
struct Templates {
    /// Maps a path to the index in `ordered` of the most specific template that matches it.
    /// `None` when a template has a parameter with literal text beside it (`/{id}.json`): next
    /// to such a template matchit's single lookup can miss another that matches, so every
    /// lookup scans.
    best: Option<matchit::Router<u32>>,
    ordered: Box<[Template]>,
}

#[derive(Debug)]
struct Template {
    /// This template alone, to ask whether it matches a path during the fall-through scan.
    alone: matchit::Router<()>,
    /// Its routes, in secondary order.
    ids: Box<[u32]>,
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
            // Each template's place in precedence order. A stable sort keeps config order among
            // templates that rank alike (they cannot both match one path, or matchit would have
            // rejected the pair).
            let ranks: Vec<Vec<SegmentRank>> =
                template_order.iter().map(|t| template_rank(t)).collect();
            let mut by_rank: Vec<usize> = (0..template_order.len()).collect();
            by_rank.sort_by(|&a, &b| ranks[a].cmp(&ranks[b]));
            let mut place = vec![0u32; by_rank.len()];
            for (rank, &i) in by_rank.iter().enumerate() {
                place[i] = rank as u32;
            }
            // Inserted in config order, so a conflict is reported on the later route.
            let mut best = matchit::Router::new();
            let mut ordered = Vec::with_capacity(template_order.len());
            for (key, place) in template_order.into_iter().zip(place) {
                let ids = templates.remove(&key).unwrap_or_default();
                let conflict = |e: matchit::InsertError| TemplateConflict {
                    vhost,
                    route: ids[0] as usize,
                    template: key.to_string(),
                    reason: e.to_string(),
                };
                best.insert(&*key, place).map_err(conflict)?;
                let mut alone = matchit::Router::new();
                alone.insert(&*key, ()).map_err(conflict)?;
                ordered.push((
                    place,
                    Template {
                        alone,
                        ids: order(ids),
                    },
                ));
            }
            ordered.sort_by_key(|(place, _)| *place);
            let ordered = ordered.into_iter().map(|(_, t)| t).collect();
            let trusted = !ranks
                .iter()
                .flatten()
                .any(|s| matches!(s, SegmentRank::Affixed(..)));
            Some(Templates {
                best: trusted.then_some(best),
                ordered,
            })
        };
        let regexes = order(regexes);
        let regex_set = (regexes.len() > 1)
            .then(|| {
                // The same pattern text, with the same default flags, matches the same paths.
                let patterns =
                    regexes
                        .iter()
                        .map(|&id| match &candidates[id as usize].matcher.path {
                            PathMatch::Regex(re) => re.0.as_str(),
                            _ => unreachable!("only regex routes are listed in `regexes`"),
                        });
                regex::RegexSet::new(patterns).ok()
            })
            .flatten();
        Ok(VhostTable {
            exact: exact.into_iter().map(|(k, v)| (k, order(v))).collect(),
            templates: template_router,
            prefixes: prefixes.into_iter().map(|(k, v)| (k, order(v))).collect(),
            regexes,
            regex_set,
            routes: candidates.into(),
        })
    }

    fn route(&self, req: &RequestHead<'_>) -> Option<&R> {
        let path = req.path;
        if let Some(r) = self.exact.get(path).and_then(|ids| self.first(ids, req)) {
            return Some(r);
        }
        if let Some(templates) = &self.templates
            && let Some(r) = self.template_route(templates, req)
        {
            return Some(r);
        }
        if let Some(r) = self.regex_route(req) {
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

    /// The first template route in precedence order whose path and conditions hold.
    /// The first regex route, in precedence order, whose regex matches and whose conditions
    /// hold.
    fn regex_route(&self, req: &RequestHead<'_>) -> Option<&R> {
        let path = req.path;
        if let Some(set) = &self.regex_set {
            let matched = set.matches(path);
            if !matched.matched_any() {
                return None;
            }
            return matched.iter().find_map(|k| {
                let c = &self.routes[self.regexes[k] as usize];
                conditions_hold(&c.matcher, req).then_some(&c.value)
            });
        }
        self.regexes.iter().find_map(|&id| {
            let c = &self.routes[id as usize];
            match &c.matcher.path {
                PathMatch::Regex(re) if re.is_match(path) && conditions_hold(&c.matcher, req) => {
                    Some(&c.value)
                }
                _ => None,
            }
        })
    }

    fn template_route(&self, templates: &Templates, req: &RequestHead<'_>) -> Option<&R> {
        let path = req.path;
        // The one lookup either answers, or says no template matches, or names the template
        // the scan can skip.
        let tried = match &templates.best {
            Some(best) => {
                let best = *best.at(path).ok()?.value as usize;
                if let Some(r) = self.first(&templates.ordered[best].ids, req) {
                    return Some(r);
                }
                Some(best)
            }
            None => None,
        };
        templates.ordered.iter().enumerate().find_map(|(i, t)| {
            if Some(i) == tried || t.alone.at(path).is_err() {
                return None;
            }
            self.first(&t.ids, req)
        })
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

/// How specific one segment of a template is; a lower rank comes first.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SegmentRank {
    Literal(String),
    /// A parameter with literal text before or after it, within the segment; more text first.
    Affixed(std::cmp::Reverse<usize>, String),
    Parameter,
    CatchAll,
}

/// A template's precedence key: its segments' ranks, compared left to right.
fn template_rank(template: &str) -> Vec<SegmentRank> {
    template
        .split('/')
        .map(|segment| {
            // `{{` and `}}` are escaped braces, part of the literal text.
            let unescaped = segment.replace("{{", "").replace("}}", "");
            match unescaped.find('{') {
                None => SegmentRank::Literal(segment.to_owned()),
                Some(_) if unescaped.starts_with("{*") => SegmentRank::CatchAll,
                Some(0) if unescaped.ends_with('}') => SegmentRank::Parameter,
                Some(open) => {
                    // Saturating: a malformed template ranks oddly rather than panicking.
                    let close = unescaped.rfind('}').unwrap_or(unescaped.len());
                    let text = unescaped
                        .len()
                        .saturating_sub((close + 1).saturating_sub(open));
                    SegmentRank::Affixed(std::cmp::Reverse(text), segment.to_owned())
                }
            }
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::{HeaderMap, Method};

    use super::*;
    use crate::config::model::Pattern;

    fn regex(source: &str, method: Option<Method>) -> RouteMatch {
        RouteMatch {
            path: PathMatch::Regex(Pattern::full_match(source).unwrap()),
            headers: Arc::from([]),
            query: Arc::from([]),
            method,
        }
    }

    #[test]
    fn the_regex_set_keeps_precedence_and_conditions() {
        let prefix = RouteMatch {
            path: PathMatch::Prefix("/".into()),
            headers: Arc::from([]),
            query: Arc::from([]),
            method: None,
        };
        let table = RouteTable::build(vec![VhostInput {
            domains: vec![DomainMatch::Any],
            routes: vec![
                (regex("/v[0-9]+/.*", Some(Method::POST)), "post-any-version"),
                (regex("/v1/.*", None), "v1"),
                (regex("/v[0-9]+/users", None), "users"),
                (prefix, "fallback"),
            ],
        }])
        .unwrap();
        assert!(
            table.vhosts[0].regex_set.is_some(),
            "three regexes share one set"
        );
        let headers = HeaderMap::new();
        let route = |method: Method, path: &str| {
            let head = RequestHead {
                host: "h",
                path,
                query: None,
                method: &method,
                headers: &headers,
            };
            table.route(&head).copied()
        };
        assert_eq!(route(Method::POST, "/v1/users"), Some("post-any-version"));
        // The first match's condition fails: the next matching regex, in config order.
        assert_eq!(route(Method::GET, "/v1/users"), Some("v1"));
        assert_eq!(route(Method::GET, "/v2/users"), Some("users"));
        // Anchored as the single regexes are: a longer path matches none of them.
        assert_eq!(route(Method::GET, "/v2/users/x"), Some("fallback"));
        assert_eq!(route(Method::GET, "/x/v1/"), Some("fallback"));
    }
}
