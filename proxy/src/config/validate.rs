//! Bootstrap file → typed [`Config`], all or nothing. Every problem is reported with the path of
//! the field and the offending value, and all problems are reported at once.

use std::{collections::HashSet, fmt, net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderName, HeaderValue, Method, StatusCode};

use super::{bootstrap as file, duration::parse_duration, model::*};

/// Default time allowed for an upstream to answer with a response head.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Default TCP connect timeout towards an endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One problem in a configuration: the field path and what is wrong with its value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Everything wrong with a configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<FieldError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Parses and validates bootstrap YAML text.
pub fn from_yaml(text: &str) -> Result<Config, ConfigErrors> {
    let parsed = file::parse(text).map_err(|message| {
        ConfigErrors(vec![FieldError {
            path: String::new(),
            message,
        }])
    })?;
    validate(parsed)
}

/// Validates a parsed bootstrap file.
pub fn validate(f: file::File) -> Result<Config, ConfigErrors> {
    let mut v = Validator::default();
    let clusters: Vec<Cluster> = f
        .clusters
        .iter()
        .enumerate()
        .filter_map(|(i, c)| v.cluster(&format!("clusters[{i}]"), c))
        .collect();
    let cluster_names: HashSet<&str> = clusters.iter().map(|c| &*c.name).collect();
    v.unique("clusters", clusters.iter().map(|c| &*c.name));

    let route_configs: Vec<RouteConfig> = f
        .route_configs
        .iter()
        .enumerate()
        .filter_map(|(i, rc)| v.route_config(&format!("route_configs[{i}]"), rc, &cluster_names))
        .collect();
    v.unique("route_configs", route_configs.iter().map(|r| &*r.name));
    let route_names: HashSet<&str> = route_configs.iter().map(|r| &*r.name).collect();

    let listeners: Vec<Listener> = f
        .listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| v.listener(&format!("listeners[{i}]"), l, &route_names))
        .collect();
    v.unique("listeners", listeners.iter().map(|l| &*l.name));
    let mut addresses = HashSet::new();
    for (i, l) in listeners.iter().enumerate() {
        if !addresses.insert(l.address) {
            v.error(
                format!("listeners[{i}].address"),
                format!("{} is used by another listener", l.address),
            );
        }
    }

    if !v.errors.is_empty() {
        return Err(ConfigErrors(v.errors));
    }
    Ok(Config {
        listeners: listeners.into(),
        route_configs: route_configs.into(),
        clusters: clusters.into(),
    })
}

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn unique<'a>(&mut self, path: &str, names: impl Iterator<Item = &'a str>) {
        let mut seen = HashSet::new();
        for name in names {
            if !seen.insert(name) {
                self.error(path, format!("name {name:?} is used twice"));
            }
        }
    }

    fn name(&mut self, path: &str, name: &str) -> Arc<str> {
        if name.is_empty() {
            self.error(format!("{path}.name"), "must not be empty");
        }
        name.into()
    }

    fn duration(&mut self, path: &str, text: Option<&str>, default: Duration) -> Duration {
        match text.map(parse_duration) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.error(path, e);
                default
            }
        }
    }

    fn listener(
        &mut self,
        path: &str,
        l: &file::Listener,
        route_configs: &HashSet<&str>,
    ) -> Option<Listener> {
        let name = self.name(path, &l.name);
        let address = match l.address.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    format!("{path}.address"),
                    format!("{:?} is not an IP:port socket address", l.address),
                );
                None
            }
        };
        let protocol = match l.protocol.as_str() {
            "http" => Some(ListenerProtocol::Http),
            other => {
                self.error(
                    format!("{path}.protocol"),
                    format!("unknown protocol {other:?} (expected \"http\")"),
                );
                None
            }
        };
        let route_config: Arc<str> = match &l.route_config {
            Some(rc) if route_configs.contains(rc.as_str()) => rc.as_str().into(),
            Some(rc) => {
                self.error(
                    format!("{path}.route_config"),
                    format!("route config {rc:?} is not defined"),
                );
                return None;
            }
            None if route_configs.len() == 1 => (*route_configs.iter().next()?).into(),
            None => {
                self.error(
                    format!("{path}.route_config"),
                    "required when there is not exactly one route config",
                );
                return None;
            }
        };
        Some(Listener {
            name,
            address: address?,
            protocol: protocol?,
            route_config,
        })
    }

    fn route_config(
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

    fn virtual_host(
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
        let routes = vh
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| self.route(&format!("{path}.routes[{i}]"), i, r, clusters))
            .collect();
        VirtualHost {
            name,
            domains,
            routes,
        }
    }

    fn domain(&mut self, path: &str, d: &str) -> Option<DomainMatch> {
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

    fn route(
        &mut self,
        path: &str,
        index: usize,
        r: &file::Route,
        clusters: &HashSet<&str>,
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
        if self.errors.len() != before {
            return None;
        }
        Some(Route {
            name,
            matcher,
            action: action?,
            filters,
            timeout,
        })
    }

    fn route_match(&mut self, path: &str, m: &file::RouteMatch) -> RouteMatch {
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

    fn path_match(&mut self, path: &str, pm: &file::PathMatch) -> PathMatch {
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

    fn absolute_path(&mut self, path: &str, p: &str) {
        if !p.starts_with('/') {
            self.error(path, format!("{p:?} must start with \"/\""));
        } else if p.contains('?') || p.contains('#') {
            self.error(path, format!("{p:?} must not contain a query or fragment"));
        }
    }

    fn value_match(&mut self, path: &str, m: &file::ValueMatch) -> Option<ValueMatch> {
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

    fn action(
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

    fn forward(
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
            if !clusters.contains(&*t.cluster) {
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

    fn redirect(&mut self, path: &str, rd: &file::Redirect, is_prefix: bool) -> Option<Action> {
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

    fn path_rewrite(
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

    fn filters(&mut self, path: &str, f: &file::Filters, is_prefix: bool) -> Filters {
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

    fn header_edits(&mut self, path: &str, e: &file::HeaderEdits) -> HeaderEdits {
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

    fn header_name(&mut self, path: &str, name: &str) -> Option<HeaderName> {
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

    fn status(
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

    fn cluster(&mut self, path: &str, c: &file::Cluster) -> Option<Cluster> {
        let before = self.errors.len();
        let name = self.name(path, &c.name);
        let protocol = match c.protocol.as_str() {
            "http1" => UpstreamProtocol::Http1,
            "http2" => UpstreamProtocol::Http2,
            other => {
                self.error(
                    format!("{path}.protocol"),
                    format!("unknown protocol {other:?} (expected \"http1\" or \"http2\")"),
                );
                UpstreamProtocol::Http1
            }
        };
        let connect_timeout = self.duration(
            &format!("{path}.connect_timeout"),
            c.connect_timeout.as_deref(),
            DEFAULT_CONNECT_TIMEOUT,
        );
        if connect_timeout.is_zero() {
            self.error(format!("{path}.connect_timeout"), "must be more than 0");
        }
        let mut seen = HashSet::new();
        let endpoints: Vec<Endpoint> = c
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let p = format!("{path}.endpoints[{i}]");
                let (text, weight) = match e {
                    file::Endpoint::Address(a) => (a, 1),
                    file::Endpoint::Weighted { address, weight } => (address, *weight),
                };
                let Ok(address) = text.parse::<SocketAddr>() else {
                    self.error(p, format!("{text:?} is not an IP:port socket address"));
                    return None;
                };
                if weight == 0 {
                    self.error(format!("{p}.weight"), "must be at least 1");
                    return None;
                }
                if !seen.insert(address) {
                    self.error(p, format!("{address} is listed twice"));
                    return None;
                }
                Some(Endpoint { address, weight })
            })
            .collect();
        (self.errors.len() == before).then(|| Cluster {
            name,
            protocol,
            connect_timeout,
            endpoints: endpoints.into(),
        })
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
