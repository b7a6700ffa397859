//! Route configurations: virtual hosts, routes, matches, actions and filters.

use std::{collections::HashSet, sync::Arc};

use http::{HeaderName, HeaderValue, Method, StatusCode};

use super::{super::bootstrap as file, super::model::*, DEFAULT_ROUTE_TIMEOUT, Validator};
use crate::http::upgrade;

impl Validator {
    pub(super) fn route_config(
        &mut self,
        path: &str,
        rc: &file::RouteConfig,
        clusters: &HashSet<&str>,
    ) -> Option<RouteConfig> {
        let name = self.name(path, &rc.name);
        let before = self.errors.len();
        let virtual_hosts: Vec<VirtualHost> = rc
            .virtual_hosts
            .iter()
            .enumerate()
            .map(|(i, vh)| self.virtual_host(&format!("{path}.virtual_hosts[{i}]"), vh, clusters))
            .collect();
        self.unique(
            &format!("{path}.virtual_hosts"),
            virtual_hosts.iter().map(|v| &*v.name),
        );
        let mut domains = HashSet::new();
        for (i, vh) in virtual_hosts.iter().enumerate() {
            for d in vh.domains.iter() {
                if !domains.insert(d.clone()) {
                    self.error(
                        format!("{path}.virtual_hosts[{i}].domains"),
                        format!("domain {d:?} is claimed by another virtual host"),
                    );
                }
            }
        }
        (self.errors.len() == before).then(|| RouteConfig {
            name,
            virtual_hosts: virtual_hosts.into(),
        })
    }

    pub(super) fn virtual_host(
        &mut self,
        path: &str,
        vh: &file::VirtualHost,
        clusters: &HashSet<&str>,
    ) -> VirtualHost {
        let name = self.name(path, &vh.name);
        if vh.domains.is_empty() {
            self.error(format!("{path}.domains"), "must list at least one domain");
        }
        let domains = vh
            .domains
            .iter()
            .enumerate()
            .filter_map(|(i, d)| self.domain(&format!("{path}.domains[{i}]"), d))
            .collect();
        let retry = match &vh.retry {
            Some(r) => self.retry(&format!("{path}.retry"), r),
            None => super::resilience::default_retry_policy(),
        };
        let rate_limit = vh
            .rate_limit
            .as_ref()
            .and_then(|r| self.rate_limit(&format!("{path}.rate_limit"), r));
        let routes = vh
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| self.route(&format!("{path}.routes[{i}]"), i, r, clusters, &retry))
            .collect();
        VirtualHost {
            name,
            domains,
            routes,
            rate_limit,
        }
    }

    pub(super) fn domain(&mut self, path: &str, d: &str) -> Option<DomainMatch> {
        let lower = d.to_ascii_lowercase();
        if lower == "*" {
            return Some(DomainMatch::Any);
        }
        let (wild, rest) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let valid = !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            && !rest.starts_with('.')
            && !rest.ends_with('.');
        if !valid {
            self.error(
                path,
                format!("{d:?} is not a host name, \"*.\" followed by one, or \"*\""),
            );
            return None;
        }
        Some(if wild {
            DomainMatch::Suffix(format!(".{rest}").into())
        } else {
            DomainMatch::Exact(rest.into())
        })
    }

    pub(super) fn route(
        &mut self,
        path: &str,
        index: usize,
        r: &file::Route,
        clusters: &HashSet<&str>,
        vhost_retry: &RetryPolicy,
    ) -> Option<Route> {
        let before = self.errors.len();
        let name: Arc<str> = match &r.name {
            Some(n) => self.name(path, n),
            None => format!("route-{index}").into(),
        };
        let matcher = self.route_match(&format!("{path}.match"), &r.matcher);
        let is_prefix = matches!(matcher.path, PathMatch::Prefix(_));
        let action = self.action(path, r, clusters, is_prefix);
        let filters = self.filters(&format!("{path}.filters"), &r.filters, is_prefix);
        let timeout = Some(self.duration(
            &format!("{path}.timeout"),
            r.timeout.as_deref(),
            DEFAULT_ROUTE_TIMEOUT,
        ))
        .filter(|d| !d.is_zero());
        let retry = match &r.retry {
            Some(retry) => self.retry(&format!("{path}.retry"), retry),
            None => vhost_retry.clone(),
        };
        let rate_limit = r
            .rate_limit
            .as_ref()
            .and_then(|rl| self.rate_limit(&format!("{path}.rate_limit"), rl));
        let upgrades = self.upgrades(&format!("{path}.upgrades"), r.upgrades.as_deref());
        if self.errors.len() != before {
            return None;
        }
        Some(Route {
            name,
            matcher,
            action: action?,
            filters,
            timeout,
            retry,
            rate_limit,
            upgrades,
        })
    }

    /// `upgrades: [websocket, ...]`: protocol names as RFC 9110 §7.8 spells them (a token,
    /// optionally `/version`, which is ignored), compared case-insensitively.
    fn upgrades(&mut self, path: &str, names: Option<&[String]>) -> Arc<[Arc<str>]> {
        let Some(names) = names else {
            return Route::DEFAULT_UPGRADES.map(Arc::from).into();
        };
        let mut out: Vec<Arc<str>> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let Some(protocol) = upgrade::protocol_name(name) else {
                self.error(
                    format!("{path}[{i}]"),
                    format!("{name:?} is not a protocol name (a token such as websocket)"),
                );
                continue;
            };
            if out.iter().any(|p| **p == *protocol) {
                self.error(format!("{path}[{i}]"), format!("{name:?} is listed twice"));
                continue;
            }
            out.push(protocol.into());
        }
        out.into()
    }

    pub(super) fn route_match(&mut self, path: &str, m: &file::RouteMatch) -> RouteMatch {
        let path_match = match &m.path {
            None => PathMatch::Prefix("/".into()),
            Some(pm) => self.path_match(&format!("{path}.path"), pm),
        };
        let headers = m
            .headers
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                let p = format!("{path}.headers[{i}]");
                let name = match HeaderName::from_bytes(h.name.as_bytes()) {
                    Ok(n) => n,
                    Err(_) => {
                        self.error(
                            format!("{p}.name"),
                            format!("{:?} is not a header name", h.name),
                        );
                        return None;
                    }
                };
                let value = self.value_match(&p, h)?;
                Some(HeaderMatch { name, value })
            })
            .collect();
        let query = m
            .query
            .iter()
            .enumerate()
            .filter_map(|(i, q)| {
                let p = format!("{path}.query[{i}]");
                if q.name.is_empty() {
                    self.error(format!("{p}.name"), "must not be empty");
                }
                let value = self.value_match(&p, q)?;
                Some(QueryMatch {
                    name: q.name.as_str().into(),
                    value,
                })
            })
            .collect();
        let method = m.method.as_ref().and_then(|text| {
            match Method::from_bytes(text.to_ascii_uppercase().as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    self.error(
                        format!("{path}.method"),
                        format!("{text:?} is not an HTTP method"),
                    );
                    None
                }
            }
        });
        RouteMatch {
            path: path_match,
            headers,
            query,
            method,
        }
    }

    pub(super) fn path_match(&mut self, path: &str, pm: &file::PathMatch) -> PathMatch {
        let fallback = PathMatch::Prefix("/".into());
        match (&pm.exact, &pm.prefix, &pm.template, &pm.regex) {
            (Some(p), None, None, None) => {
                self.absolute_path(&format!("{path}.exact"), p);
                PathMatch::Exact(p.as_str().into())
            }
            (None, Some(p), None, None) => {
                self.absolute_path(&format!("{path}.prefix"), p);
                PathMatch::Prefix(normalize_prefix(p).into())
            }
            (None, None, Some(p), None) => {
                self.absolute_path(&format!("{path}.template"), p);
                // Insert into a scratch router so a malformed template fails here, with its path.
                if let Err(e) = matchit::Router::new().insert(p.as_str(), ()) {
                    self.error(
                        format!("{path}.template"),
                        format!("template {p:?} is invalid: {e}"),
                    );
                }
                PathMatch::Template(p.as_str().into())
            }
            (None, None, None, Some(p)) => match Pattern::full_match(p) {
                Ok(re) => PathMatch::Regex(re),
                Err(e) => {
                    self.error(
                        format!("{path}.regex"),
                        format!(
                            "regex {p:?} does not compile: {}",
                            first_line(&e.to_string())
                        ),
                    );
                    fallback
                }
            },
            _ => {
                self.error(
                    path,
                    "give exactly one of \"exact\", \"prefix\", \"template\" and \"regex\"",
                );
                fallback
            }
        }
    }

    pub(super) fn absolute_path(&mut self, path: &str, p: &str) {
        if !p.starts_with('/') {
            self.error(path, format!("{p:?} must start with \"/\""));
        } else if p.contains('?') || p.contains('#') {
            self.error(path, format!("{p:?} must not contain a query or fragment"));
        }
    }

    pub(super) fn value_match(&mut self, path: &str, m: &file::ValueMatch) -> Option<ValueMatch> {
        let given = [m.exact.is_some(), m.regex.is_some(), m.present.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if given > 1 {
            self.error(
                path,
                "give only one of \"exact\", \"regex\" and \"present\"",
            );
            return None;
        }
        Some(match (&m.exact, &m.regex, m.present) {
            (Some(v), _, _) => ValueMatch::Exact(v.as_str().into()),
            (_, Some(re), _) => match Pattern::full_match(re) {
                Ok(p) => ValueMatch::Regex(p),
                Err(e) => {
                    self.error(
                        format!("{path}.regex"),
                        format!(
                            "regex {re:?} does not compile: {}",
                            first_line(&e.to_string())
                        ),
                    );
                    return None;
                }
            },
            (_, _, Some(false)) => ValueMatch::Absent,
            // `name` alone means "present".
            _ => ValueMatch::Present,
        })
    }

    pub(super) fn action(
        &mut self,
        path: &str,
        r: &file::Route,
        clusters: &HashSet<&str>,
        is_prefix: bool,
    ) -> Option<Action> {
        let given = [
            r.forward.is_some(),
            r.redirect.is_some(),
            r.direct_response.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            self.error(
                path,
                "a route needs exactly one of \"forward\", \"redirect\" and \"direct_response\"",
            );
            return None;
        }
        if let Some(f) = &r.forward {
            return self.forward(&format!("{path}.forward"), f, clusters);
        }
        if let Some(rd) = &r.redirect {
            return self.redirect(&format!("{path}.redirect"), rd, is_prefix);
        }
        let d = r.direct_response.as_ref()?;
        let status = self.status(
            &format!("{path}.direct_response.status"),
            d.status,
            200..=599,
        )?;
        Some(Action::DirectResponse(DirectResponse {
            status,
            body: d.body.clone().into(),
        }))
    }

    pub(super) fn forward(
        &mut self,
        path: &str,
        f: &file::Forward,
        clusters: &HashSet<&str>,
    ) -> Option<Action> {
        let targets: Vec<WeightedCluster> = match (&f.cluster, f.clusters.is_empty()) {
            (Some(c), true) => vec![WeightedCluster {
                cluster: c.as_str().into(),
                weight: 1,
            }],
            (None, false) => f
                .clusters
                .iter()
                .map(|w| WeightedCluster {
                    cluster: w.name.as_str().into(),
                    weight: w.weight,
                })
                .collect(),
            _ => {
                self.error(path, "give either \"cluster\" or \"clusters\"");
                return None;
            }
        };
        let before = self.errors.len();
        for (i, t) in targets.iter().enumerate() {
            let p = if f.cluster.is_some() {
                format!("{path}.cluster")
            } else {
                format!("{path}.clusters[{i}].name")
            };
            if !self.backends_may_dangle && !clusters.contains(&*t.cluster) {
                self.error(p, format!("cluster {:?} is not defined", t.cluster));
            }
        }
        let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
        if total == 0 {
            self.error(format!("{path}.clusters"), "weights must not all be 0");
        } else if total > u64::from(u32::MAX) {
            self.error(
                format!("{path}.clusters"),
                "weights add up to more than 2^32-1",
            );
        }
        (self.errors.len() == before).then(|| Action::Forward(targets.into()))
    }

    pub(super) fn redirect(
        &mut self,
        path: &str,
        rd: &file::Redirect,
        is_prefix: bool,
    ) -> Option<Action> {
        let before = self.errors.len();
        let scheme = match rd.scheme.as_deref() {
            None => None,
            Some("http") => Some(Scheme::Http),
            Some("https") => Some(Scheme::Https),
            Some(other) => {
                self.error(
                    format!("{path}.scheme"),
                    format!("{other:?} is not \"http\" or \"https\""),
                );
                None
            }
        };
        if let Some(h) = &rd.host
            && (h.is_empty()
                || http::uri::Authority::try_from(h.as_str()).is_err()
                || h.contains(':'))
        {
            self.error(format!("{path}.host"), format!("{h:?} is not a host name"));
        }
        if rd.port == Some(0) {
            self.error(format!("{path}.port"), "0 is not a port");
        }
        let new_path = self.path_rewrite(path, rd.path.as_deref(), rd.prefix.as_deref(), is_prefix);
        let status = match rd.status {
            301 | 302 | 303 | 307 | 308 => StatusCode::from_u16(rd.status).ok(),
            other => {
                self.error(
                    format!("{path}.status"),
                    format!("{other} is not a redirect status (301, 302, 303, 307 or 308)"),
                );
                None
            }
        };
        if self.errors.len() != before {
            return None;
        }
        Some(Action::Redirect(Redirect {
            scheme,
            host: rd.host.as_deref().map(|h| h.to_ascii_lowercase().into()),
            port: rd.port,
            path: new_path,
            status: status?,
        }))
    }

    pub(super) fn path_rewrite(
        &mut self,
        path: &str,
        full: Option<&str>,
        prefix: Option<&str>,
        is_prefix: bool,
    ) -> Option<PathRewrite> {
        match (full, prefix) {
            (Some(_), Some(_)) => {
                self.error(path, "give only one of \"path\" and \"prefix\"");
                None
            }
            (Some(p), None) => {
                self.absolute_path(&format!("{path}.path"), p);
                Some(PathRewrite::Full(p.into()))
            }
            (None, Some(p)) => {
                self.absolute_path(&format!("{path}.prefix"), p);
                if !is_prefix {
                    self.error(
                        format!("{path}.prefix"),
                        "replacing a prefix needs the route to match a path prefix",
                    );
                }
                Some(PathRewrite::Prefix(p.into()))
            }
            (None, None) => None,
        }
    }

    pub(super) fn filters(&mut self, path: &str, f: &file::Filters, is_prefix: bool) -> Filters {
        let rewrite = f.rewrite.as_ref().map(|rw| {
            let p = format!("{path}.rewrite");
            let new_path =
                self.path_rewrite(&p, rw.path.as_deref(), rw.prefix.as_deref(), is_prefix);
            let host = rw.host.as_ref().and_then(|h| {
                match http::uri::Authority::try_from(h.as_str())
                    .ok()
                    .and_then(|_| HeaderValue::from_str(h).ok())
                {
                    Some(v) => Some(v),
                    None => {
                        self.error(format!("{p}.host"), format!("{h:?} is not a host"));
                        None
                    }
                }
            });
            Rewrite {
                path: new_path,
                host,
            }
        });
        Filters {
            request_headers: self
                .header_edits(&format!("{path}.request_headers"), &f.request_headers),
            response_headers: self
                .header_edits(&format!("{path}.response_headers"), &f.response_headers),
            rewrite,
        }
    }

    pub(super) fn header_edits(&mut self, path: &str, e: &file::HeaderEdits) -> HeaderEdits {
        let mut pairs = |field: &str, list: &[file::Header]| -> Arc<[(HeaderName, HeaderValue)]> {
            list.iter()
                .enumerate()
                .filter_map(|(i, h)| {
                    let p = format!("{path}.{field}[{i}]");
                    let name = self.header_name(&format!("{p}.name"), &h.name)?;
                    match HeaderValue::from_str(&h.value) {
                        Ok(v) => Some((name, v)),
                        Err(_) => {
                            self.error(
                                format!("{p}.value"),
                                format!("{:?} is not a valid header value", h.value),
                            );
                            None
                        }
                    }
                })
                .collect()
        };
        let add = pairs("add", &e.add);
        let set = pairs("set", &e.set);
        let remove = e
            .remove
            .iter()
            .enumerate()
            .filter_map(|(i, n)| self.header_name(&format!("{path}.remove[{i}]"), n))
            .collect();
        HeaderEdits { add, set, remove }
    }

    pub(super) fn header_name(&mut self, path: &str, name: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) if is_proxy_owned(&n) => {
                self.error(
                    path,
                    format!("{name:?} is managed by the proxy and cannot be edited"),
                );
                None
            }
            Ok(n) => Some(n),
            Err(_) => {
                self.error(path, format!("{name:?} is not a header name"));
                None
            }
        }
    }

    pub(super) fn status(
        &mut self,
        path: &str,
        code: u16,
        range: std::ops::RangeInclusive<u16>,
    ) -> Option<StatusCode> {
        match StatusCode::from_u16(code) {
            Ok(s) if range.contains(&code) => Some(s),
            _ => {
                self.error(
                    path,
                    format!(
                        "{code} is not a status code in {}..={}",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
        }
    }
}

/// Headers the proxy itself manages per hop; editing them through config would break framing.
fn is_proxy_owned(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "transfer-encoding" | "content-length" | "upgrade" | "keep-alive" | "te"
    ) || name.as_str().starts_with(':')
}

/// `/api/` and `/api` are the same segment prefix.
fn normalize_prefix(p: &str) -> String {
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    }
}

fn first_line(s: &str) -> String {
    // regex's error text spans several lines with a caret diagram; keep the reason.
    s.lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| s.lines().next().unwrap_or(s))
        .trim_start_matches("error: ")
        .to_owned()
}
