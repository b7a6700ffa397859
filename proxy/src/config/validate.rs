//! Bootstrap file → typed [`Config`], all or nothing. Every problem is reported with the path of
//! the field and the offending value, and all problems are reported at once.

use std::{collections::HashSet, fmt, net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderName, HeaderValue, Method, StatusCode};

use super::{bootstrap as file, duration::parse_duration, model::*};

/// Default time allowed for an upstream to answer with a response head.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Default TCP connect timeout towards an endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default idle timeout of proxied TCP connections (Envoy's `tcp_proxy` default).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default decay of the peak-EWMA balancer's latency estimate (Linkerd's default).
pub const DEFAULT_EWMA_DECAY: Duration = Duration::from_secs(10);
/// Default panic threshold: below this share of healthy endpoints, use them all.
pub const DEFAULT_PANIC_THRESHOLD: u8 = 50;

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
        .filter_map(|(i, l)| {
            v.listener(&format!("listeners[{i}]"), l, &route_names, &cluster_names)
        })
        .collect();
    v.unique("listeners", listeners.iter().map(|l| &*l.name));
    let mut addresses = HashSet::new();
    for (i, l) in listeners.iter().enumerate() {
        // Port 0 asks the OS for a fresh port each time, so it never collides.
        if l.address.port() != 0 && !addresses.insert(l.address) {
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
        clusters: &HashSet<&str>,
    ) -> Option<Listener> {
        let before = self.errors.len();
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
        let idle_timeout = self.duration(
            &format!("{path}.idle_timeout"),
            l.idle_timeout.as_deref(),
            DEFAULT_TCP_IDLE_TIMEOUT,
        );
        let protocol = l.protocol.as_str();
        let misplaced: &[(&str, bool)] = &[
            (
                "route_config",
                l.route_config.is_some() && protocol != "http",
            ),
            ("cluster", l.cluster.is_some() && protocol != "tcp"),
            ("sni", !l.sni.is_empty() && protocol != "tls_passthrough"),
            (
                "default_cluster",
                l.default_cluster.is_some() && protocol != "tls_passthrough",
            ),
            (
                "idle_timeout",
                l.idle_timeout.is_some() && protocol == "http",
            ),
        ];
        for (field, wrong) in misplaced {
            if *wrong {
                self.error(
                    format!("{path}.{field}"),
                    format!("does not apply to a {protocol:?} listener"),
                );
            }
        }
        let kind = match protocol {
            "http" => {
                let route_config: Option<Arc<str>> = match &l.route_config {
                    Some(rc) if route_configs.contains(rc.as_str()) => Some(rc.as_str().into()),
                    Some(rc) => {
                        self.error(
                            format!("{path}.route_config"),
                            format!("route config {rc:?} is not defined"),
                        );
                        None
                    }
                    None if route_configs.len() == 1 => {
                        route_configs.iter().next().map(|n| (*n).into())
                    }
                    None => {
                        self.error(
                            format!("{path}.route_config"),
                            "required when there is not exactly one route config",
                        );
                        None
                    }
                };
                route_config.map(|route_config| ListenerKind::Http { route_config })
            }
            "tcp" => match &l.cluster {
                Some(c) => {
                    self.cluster_ref(&format!("{path}.cluster"), c, clusters);
                    Some(ListenerKind::Tcp(TcpProxy {
                        cluster: c.as_str().into(),
                        idle_timeout,
                    }))
                }
                None => {
                    self.error(format!("{path}.cluster"), "a tcp listener needs a cluster");
                    None
                }
            },
            "tls_passthrough" => {
                let routes: Vec<SniRoute> = l
                    .sni
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let p = format!("{path}.sni[{i}]");
                        if r.server_names.is_empty() {
                            self.error(format!("{p}.server_names"), "must list at least one name");
                        }
                        let server_names = r
                            .server_names
                            .iter()
                            .enumerate()
                            .filter_map(|(j, n)| self.domain(&format!("{p}.server_names[{j}]"), n))
                            .collect();
                        self.cluster_ref(&format!("{p}.cluster"), &r.cluster, clusters);
                        SniRoute {
                            server_names,
                            cluster: r.cluster.as_str().into(),
                        }
                    })
                    .collect();
                if let Some(c) = &l.default_cluster {
                    self.cluster_ref(&format!("{path}.default_cluster"), c, clusters);
                }
                if routes.is_empty() && l.default_cluster.is_none() {
                    self.error(
                        format!("{path}.sni"),
                        "a tls_passthrough listener needs sni routes or a default_cluster",
                    );
                }
                Some(ListenerKind::TlsPassthrough(SniProxy {
                    routes: routes.into(),
                    default_cluster: l.default_cluster.as_deref().map(Arc::from),
                    idle_timeout,
                }))
            }
            other => {
                self.error(
                    format!("{path}.protocol"),
                    format!(
                        "unknown protocol {other:?} (expected \"http\", \"tcp\" or \"tls_passthrough\")"
                    ),
                );
                None
            }
        };
        if self.errors.len() != before {
            return None;
        }
        Some(Listener {
            name,
            address: address?,
            kind: kind?,
        })
    }

    fn cluster_ref(&mut self, path: &str, name: &str, clusters: &HashSet<&str>) {
        if !clusters.contains(name) {
            self.error(path, format!("cluster {name:?} is not defined"));
        }
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
        let lb = self.lb(&format!("{path}.lb"), &c.lb);
        let health_check = c
            .health_check
            .as_ref()
            .and_then(|h| self.health_check(&format!("{path}.health_check"), h));
        let outlier_detection = self.outlier_detection(
            &format!("{path}.outlier_detection"),
            c.outlier_detection.as_ref(),
        );
        let panic_threshold_percent = c.panic_threshold.unwrap_or(DEFAULT_PANIC_THRESHOLD);
        if panic_threshold_percent > 100 {
            self.error(
                format!("{path}.panic_threshold"),
                "is a percentage: 0 to 100",
            );
        }
        if self.errors.len() != before {
            return None;
        }
        Some(Cluster {
            name,
            protocol,
            connect_timeout,
            endpoints: endpoints.into(),
            lb: lb?,
            health_check,
            outlier_detection,
            panic_threshold_percent,
        })
    }

    fn lb(&mut self, path: &str, lb: &file::Lb) -> Option<LbPolicy> {
        let policy = lb.policy.as_deref().unwrap_or("peak_ewma");
        let hashing = matches!(policy, "ring_hash" | "maglev");
        if lb.hash_key.is_some() && !hashing {
            self.error(
                format!("{path}.hash_key"),
                format!("does not apply to {policy}"),
            );
        }
        if lb.min_ring_size.is_some() && policy != "ring_hash" {
            self.error(
                format!("{path}.min_ring_size"),
                format!("does not apply to {policy}"),
            );
        }
        if lb.table_size.is_some() && policy != "maglev" {
            self.error(
                format!("{path}.table_size"),
                format!("does not apply to {policy}"),
            );
        }
        if lb.decay.is_some() && policy != "peak_ewma" {
            self.error(
                format!("{path}.decay"),
                format!("does not apply to {policy}"),
            );
        }
        let key = if hashing {
            match &lb.hash_key {
                None => {
                    self.error(
                        format!("{path}.hash_key"),
                        format!("{policy} needs a hash_key"),
                    );
                    None
                }
                Some(k) => self.hash_key(&format!("{path}.hash_key"), k),
            }
        } else {
            None
        };
        match policy {
            "round_robin" => Some(LbPolicy::RoundRobin),
            "random" => Some(LbPolicy::Random),
            "least_request" => Some(LbPolicy::LeastRequest),
            "peak_ewma" => {
                let decay = self.duration(
                    &format!("{path}.decay"),
                    lb.decay.as_deref(),
                    DEFAULT_EWMA_DECAY,
                );
                if decay.is_zero() {
                    self.error(format!("{path}.decay"), "must be more than 0");
                }
                Some(LbPolicy::PeakEwma { decay })
            }
            "ring_hash" => {
                let min_ring_size = lb.min_ring_size.unwrap_or(1024);
                if !(1..=8_388_608).contains(&min_ring_size) {
                    self.error(format!("{path}.min_ring_size"), "must be 1 to 8388608");
                }
                Some(LbPolicy::RingHash {
                    key: key?,
                    min_ring_size,
                })
            }
            "maglev" => {
                let table_size = lb.table_size.unwrap_or(65537);
                if !is_prime(table_size) || table_size > 5_000_011 {
                    self.error(
                        format!("{path}.table_size"),
                        format!("{table_size} is not a prime number up to 5000011"),
                    );
                }
                Some(LbPolicy::Maglev {
                    key: key?,
                    table_size,
                })
            }
            other => {
                self.error(
                    format!("{path}.policy"),
                    format!(
                        "unknown policy {other:?} (expected round_robin, random, least_request, peak_ewma, ring_hash or maglev)"
                    ),
                );
                None
            }
        }
    }

    fn hash_key(&mut self, path: &str, k: &file::HashKey) -> Option<HashKey> {
        match (&k.header, &k.cookie, k.source_ip) {
            (Some(h), None, None) => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => Some(HashKey::Header(n)),
                Err(_) => {
                    self.error(
                        format!("{path}.header"),
                        format!("{h:?} is not a header name"),
                    );
                    None
                }
            },
            (None, Some(c), None) if !c.is_empty() => Some(HashKey::Cookie(c.as_str().into())),
            (None, None, Some(true)) => Some(HashKey::SourceIp),
            _ => {
                self.error(
                    path,
                    "give exactly one of \"header\", \"cookie\" and \"source_ip: true\"",
                );
                None
            }
        }
    }

    fn health_check(&mut self, path: &str, h: &file::HealthCheck) -> Option<HealthCheck> {
        let before = self.errors.len();
        let kind = match (&h.tcp, &h.http, &h.grpc) {
            (Some(_), None, None) => Some(HealthCheckKind::Tcp),
            (None, Some(http), None) => {
                self.absolute_path(&format!("{path}.http.path"), &http.path);
                let mut ranges = Vec::new();
                for (i, r) in http.expected_statuses.iter().enumerate() {
                    let p = format!("{path}.http.expected_statuses[{i}]");
                    let range = match r {
                        file::StatusRange::One(s) => Some((*s, *s)),
                        file::StatusRange::Range(t) => t
                            .split_once('-')
                            .and_then(|(a, b)| {
                                Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
                            })
                            .or_else(|| t.trim().parse().ok().map(|s| (s, s))),
                    };
                    match range {
                        Some((a, b)) if (100..=599).contains(&a) && (a..=599).contains(&b) => {
                            ranges.push((a, b))
                        }
                        _ => self.error(p, "is not a status code or a range like \"200-399\""),
                    }
                }
                if ranges.is_empty() {
                    ranges.push((200, 299));
                }
                Some(HealthCheckKind::Http {
                    path: http.path.as_str().into(),
                    host: http.host.as_deref().map(Arc::from),
                    expected_statuses: ranges.into(),
                })
            }
            (None, None, Some(g)) => Some(HealthCheckKind::Grpc {
                service: g.service.as_str().into(),
            }),
            _ => {
                self.error(path, "give exactly one of \"tcp\", \"http\" and \"grpc\"");
                None
            }
        };
        let interval = self.duration(
            &format!("{path}.interval"),
            h.interval.as_deref(),
            Duration::from_secs(5),
        );
        let timeout = self.duration(
            &format!("{path}.timeout"),
            h.timeout.as_deref(),
            Duration::from_secs(1),
        );
        let jitter = self.duration(
            &format!("{path}.jitter"),
            h.jitter.as_deref(),
            interval / 10,
        );
        if interval.is_zero() {
            self.error(format!("{path}.interval"), "must be more than 0");
        }
        if timeout.is_zero() {
            self.error(format!("{path}.timeout"), "must be more than 0");
        }
        let healthy_threshold = h.healthy_threshold.unwrap_or(1);
        let unhealthy_threshold = h.unhealthy_threshold.unwrap_or(3);
        if healthy_threshold == 0 {
            self.error(format!("{path}.healthy_threshold"), "must be at least 1");
        }
        if unhealthy_threshold == 0 {
            self.error(format!("{path}.unhealthy_threshold"), "must be at least 1");
        }
        if self.errors.len() != before {
            return None;
        }
        Some(HealthCheck {
            kind: kind?,
            interval,
            timeout,
            healthy_threshold,
            unhealthy_threshold,
            jitter,
        })
    }

    /// Outlier detection is on by default, as failure accrual is in Linkerd.
    fn outlier_detection(
        &mut self,
        path: &str,
        o: Option<&file::OutlierDetection>,
    ) -> Option<OutlierDetection> {
        let defaults = OutlierDetection {
            consecutive_5xx: Some(5),
            consecutive_gateway_errors: None,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        };
        let Some(o) = o else {
            return Some(defaults);
        };
        if !o.enabled {
            return None;
        }
        let base_ejection_time = self.duration(
            &format!("{path}.base_ejection_time"),
            o.base_ejection_time.as_deref(),
            defaults.base_ejection_time,
        );
        let max_ejection_time = self.duration(
            &format!("{path}.max_ejection_time"),
            o.max_ejection_time.as_deref(),
            defaults.max_ejection_time.max(base_ejection_time),
        );
        if max_ejection_time < base_ejection_time {
            self.error(
                format!("{path}.max_ejection_time"),
                "must not be less than base_ejection_time",
            );
        }
        let max_ejection_percent = o
            .max_ejection_percent
            .unwrap_or(defaults.max_ejection_percent);
        if max_ejection_percent > 100 {
            self.error(
                format!("{path}.max_ejection_percent"),
                "is a percentage: 0 to 100",
            );
        }
        let nonzero = |n: Option<u32>, default: Option<u32>| match n {
            Some(0) => None,
            Some(n) => Some(n),
            None => default,
        };
        Some(OutlierDetection {
            consecutive_5xx: nonzero(o.consecutive_5xx, defaults.consecutive_5xx),
            consecutive_gateway_errors: nonzero(o.consecutive_gateway_errors, None),
            base_ejection_time,
            max_ejection_time,
            max_ejection_percent,
        })
    }
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d: &u32| d.saturating_mul(*d) <= n)
            .all(|d| n % d != 0)
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
