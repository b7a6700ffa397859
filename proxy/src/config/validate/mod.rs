//! Bootstrap file → typed [`Config`], all or nothing. Every problem is reported with the path of
//! the field and the offending value, and all problems are reported at once.

use std::{collections::HashSet, fmt, net::SocketAddr, sync::Arc, time::Duration};

use super::{bootstrap as file, duration::parse_duration, model::*};

mod capture;
mod cluster;
pub mod resilience;
mod route;
mod tls;

pub use tls::{check_secret, resolve_file_paths};

/// Default time allowed for an upstream to answer with a response head.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Default TCP connect timeout towards an endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default idle timeout of proxied TCP connections (Envoy's `tcp_proxy` default).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default decay of the peak-EWMA balancer's latency estimate (Linkerd's default).
pub const DEFAULT_EWMA_DECAY: Duration = Duration::from_secs(10);
/// Default idle timeout of HTTP connections, both sides of the proxy.
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default idle timeout of pooled upstream connections: below the keep-alive timeouts servers
/// commonly default to (5s for Node, Apache and uvicorn, 75s for nginx), so that the proxy, not
/// the upstream, closes an idle connection and no request is sent on one as it closes.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Default time allowed for an HTTP/1.1 request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
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
    validate_with(f, Validator::default())
}

/// Validates what the control plane sent, with the bootstrap file's static part. A route may name
/// a cluster the proxy does not hold: as in Envoy and the Gateway API, that backend's share of
/// the traffic is answered with an error at request time, and the rest still flows.
pub fn validate_dynamic(f: file::File) -> Result<Config, ConfigErrors> {
    validate_with(
        f,
        Validator {
            backends_may_dangle: true,
            ..Validator::default()
        },
    )
}

/// Checks one cluster on its own; error paths start at its fields (`endpoints[0]`).
///
/// The secrets its `tls:` names are not looked up: the proxy may not hold them yet (the cluster
/// waits for them), and they are checked with it when the configuration is assembled
/// ([`check_cluster_with_secrets`]).
pub fn check_cluster(c: &file::Cluster) -> Result<Cluster, ConfigErrors> {
    let mut v = Validator {
        secrets_may_dangle: true,
        ..Validator::default()
    };
    let checked = v.cluster("", c);
    v.alone(checked)
}

/// [`check_cluster`] for a cluster whose `tls:` may name `secrets` (the control plane's Secret
/// resources it refers to, held by the proxy).
pub fn check_cluster_with_secrets(
    c: &file::Cluster,
    secrets: Vec<file::Secret>,
) -> Result<Cluster, ConfigErrors> {
    let mut v = Validator::default();
    let only_secrets = file::File {
        secrets,
        ..file::File::default()
    };
    let checked = v.cluster_in("", c, Some(&only_secrets));
    v.alone(checked)
}

/// Checks one route configuration on its own, whatever clusters it names.
pub fn check_route_config(rc: &file::RouteConfig) -> Result<RouteConfig, ConfigErrors> {
    let mut v = Validator {
        backends_may_dangle: true,
        ..Validator::default()
    };
    let checked = v.route_config("", rc, &HashSet::new());
    v.alone(checked)
}

/// Checks one listener on its own: whether the route config and clusters it names exist is a
/// matter for the configuration it joins.
pub fn check_listener(l: &file::Listener) -> Result<Listener, ConfigErrors> {
    let mut v = Validator::default();
    let route_configs: HashSet<&str> = l
        .route_config
        .iter()
        .chain(l.services.iter().filter_map(|s| s.route_config.as_ref()))
        .map(String::as_str)
        .collect();
    let clusters: HashSet<&str> = l
        .cluster
        .iter()
        .chain(l.default_cluster.iter())
        .chain(l.sni.iter().map(|r| &r.cluster))
        .chain(l.services.iter().map(|s| &s.cluster))
        .map(String::as_str)
        .collect();
    let checked = v.listener("", l, &route_configs, &clusters, None);
    v.alone(checked)
}

fn validate_with(f: file::File, mut v: Validator) -> Result<Config, ConfigErrors> {
    let clusters: Vec<Cluster> = f
        .clusters
        .iter()
        .enumerate()
        .filter_map(|(i, c)| v.cluster_in(&format!("clusters[{i}]"), c, Some(&f)))
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

    let secrets = v.secrets(&f.secrets);
    let listeners = v.listeners(&f.listeners, &route_names, &cluster_names, &secrets);
    if !v.errors.is_empty() {
        return Err(ConfigErrors(v.errors));
    }
    Ok(Config {
        listeners: listeners.into(),
        route_configs: route_configs.into(),
        clusters: clusters.into(),
        secrets: secrets.into(),
    })
}

/// A resource converted and checked on its own ([`check_cluster`], [`check_route_config`]).
pub type Checked<T> = Result<T, ConfigErrors>;

/// [`validate_dynamic`] of `f` with `route_configs` placed after its route configs and
/// `clusters` after its clusters, each already checked on its own: the same `Config`, and the
/// same errors at the same paths, while only the cross-resource checks (unique names, what the
/// listeners name) run again. A control plane's update re-checks only the resources it changed.
pub fn validate_dynamic_prechecked(
    f: &file::File,
    route_configs: &[&Checked<RouteConfig>],
    clusters: &[&Checked<Cluster>],
) -> Result<Config, ConfigErrors> {
    let mut v = Validator {
        backends_may_dangle: true,
        ..Validator::default()
    };
    let mut all_clusters: Vec<Cluster> = Vec::with_capacity(f.clusters.len() + clusters.len());
    for (i, c) in f.clusters.iter().enumerate() {
        all_clusters.extend(v.cluster_in(&format!("clusters[{i}]"), c, Some(f)));
    }
    for (i, c) in clusters.iter().enumerate() {
        match c {
            Ok(c) => all_clusters.push(c.clone()),
            Err(e) => v.under(&format!("clusters[{}]", f.clusters.len() + i), e),
        }
    }
    let cluster_names: HashSet<&str> = all_clusters.iter().map(|c| &*c.name).collect();
    v.unique("clusters", all_clusters.iter().map(|c| &*c.name));
    // A dynamic cluster was checked alone, without the listeners that send to it.
    for (i, c) in clusters.iter().enumerate() {
        if let Ok(c) = c
            && c.tls.is_some()
        {
            let path = format!("clusters[{}].tls", f.clusters.len() + i);
            v.no_tcp_listener_to(&path, &c.name, f);
        }
    }

    let mut all_routes: Vec<RouteConfig> =
        Vec::with_capacity(f.route_configs.len() + route_configs.len());
    for (i, rc) in f.route_configs.iter().enumerate() {
        all_routes.extend(v.route_config(&format!("route_configs[{i}]"), rc, &cluster_names));
    }
    for (i, rc) in route_configs.iter().enumerate() {
        match rc {
            Ok(rc) => all_routes.push(rc.clone()),
            Err(e) => v.under(&format!("route_configs[{}]", f.route_configs.len() + i), e),
        }
    }
    v.unique("route_configs", all_routes.iter().map(|r| &*r.name));
    let route_names: HashSet<&str> = all_routes.iter().map(|r| &*r.name).collect();

    let secrets = v.secrets(&f.secrets);
    let listeners = v.listeners(&f.listeners, &route_names, &cluster_names, &secrets);
    if !v.errors.is_empty() {
        return Err(ConfigErrors(v.errors));
    }
    Ok(Config {
        listeners: listeners.into(),
        route_configs: all_routes.into(),
        clusters: all_clusters.into(),
        secrets: secrets.into(),
    })
}

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
    /// Routes may name clusters that are not defined (see [`validate_dynamic`]).
    backends_may_dangle: bool,
    /// A cluster checked alone: a secret its TLS names is not an error when missing.
    secrets_may_dangle: bool,
}

impl Validator {
    /// The result of checking one resource at path "": its errors' paths without the leading dot.
    fn alone<T>(self, checked: Option<T>) -> Result<T, ConfigErrors> {
        match checked {
            Some(t) if self.errors.is_empty() => Ok(t),
            None if self.errors.is_empty() => Err(ConfigErrors(vec![FieldError {
                path: String::new(),
                message: "is invalid".into(),
            }])),
            _ => Err(ConfigErrors(
                self.errors
                    .into_iter()
                    .map(|e| FieldError {
                        path: e.path.strip_prefix('.').unwrap_or(&e.path).to_owned(),
                        message: e.message,
                    })
                    .collect(),
            )),
        }
    }

    /// The errors of a resource checked alone, placed at `path` in the whole configuration.
    fn under(&mut self, path: &str, errors: &ConfigErrors) {
        for e in &errors.0 {
            let path = if e.path.is_empty() {
                path.to_owned()
            } else {
                format!("{path}.{}", e.path)
            };
            self.error(path, e.message.clone());
        }
    }

    /// Every listener, then the names and addresses they share.
    fn listeners(
        &mut self,
        listeners: &[file::Listener],
        route_names: &HashSet<&str>,
        cluster_names: &HashSet<&str>,
        secrets: &[Secret],
    ) -> Vec<Listener> {
        let listeners: Vec<Listener> = listeners
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                self.listener(
                    &format!("listeners[{i}]"),
                    l,
                    route_names,
                    cluster_names,
                    Some(secrets),
                )
            })
            .collect();
        self.unique("listeners", listeners.iter().map(|l| &*l.name));
        let mut addresses = HashSet::new();
        for (i, l) in listeners.iter().enumerate() {
            // Port 0 asks the OS for a fresh port each time, so it never collides.
            if l.address.port() != 0 && !addresses.insert(l.address) {
                self.error(
                    format!("listeners[{i}].address"),
                    format!("{} is used by another listener", l.address),
                );
            }
        }
        listeners
    }

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
        secrets: Option<&[Secret]>,
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
        let protocol = l.protocol.as_str();
        let idle_timeout = self.duration(
            &format!("{path}.idle_timeout"),
            l.idle_timeout.as_deref(),
            if protocol == "http" {
                DEFAULT_HTTP_IDLE_TIMEOUT
            } else {
                DEFAULT_TCP_IDLE_TIMEOUT
            },
        );
        if idle_timeout.is_zero() {
            self.error(format!("{path}.idle_timeout"), "must be more than 0");
        }
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
                "header_read_timeout",
                l.header_read_timeout.is_some() && protocol != "http",
            ),
            (
                "max_connection_age",
                l.max_connection_age.is_some() && protocol != "http",
            ),
            ("rate_limit", l.rate_limit.is_some() && protocol == "http"),
            (
                "tls",
                l.tls.is_some() && protocol != "http" && protocol != "tcp",
            ),
            (
                "path_normalization",
                l.path_normalization.is_some() && protocol != "http",
            ),
            ("direction", l.direction.is_some() && protocol != "capture"),
            ("services", !l.services.is_empty() && protocol != "capture"),
            (
                "unknown_destination",
                l.unknown_destination.is_some() && protocol != "capture",
            ),
            (
                "detection_timeout",
                l.detection_timeout.is_some() && protocol != "capture",
            ),
            ("mtls", l.mtls.is_some() && protocol != "capture"),
        ];
        for (field, wrong) in misplaced {
            if *wrong {
                self.error(
                    format!("{path}.{field}"),
                    format!("does not apply to a {protocol:?} listener"),
                );
            }
        }
        let tls = match &l.tls {
            Some(t) if protocol == "http" || protocol == "tcp" => {
                self.listener_tls(&format!("{path}.tls"), t, protocol == "http", secrets)
            }
            _ => None,
        };
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
                let header_read_timeout = self.duration(
                    &format!("{path}.header_read_timeout"),
                    l.header_read_timeout.as_deref(),
                    DEFAULT_HEADER_READ_TIMEOUT,
                );
                if header_read_timeout.is_zero() {
                    self.error(format!("{path}.header_read_timeout"), "must be more than 0");
                }
                let max_connection_age = l.max_connection_age.as_deref().and_then(|t| {
                    let d = self.duration(
                        &format!("{path}.max_connection_age"),
                        Some(t),
                        Duration::ZERO,
                    );
                    (!d.is_zero()).then_some(d)
                });
                let escaped_slashes = match l
                    .path_normalization
                    .as_ref()
                    .and_then(|p| p.escaped_slashes.as_deref())
                {
                    None => EscapedSlashes::default(),
                    Some(name) => EscapedSlashes::from_name(name).unwrap_or_else(|| {
                        self.error(
                            format!("{path}.path_normalization.escaped_slashes"),
                            format!(
                                "{name:?} is not one of reject, redirect, unescape_and_forward, keep_unchanged"
                            ),
                        );
                        EscapedSlashes::default()
                    }),
                };
                let connection = HttpConnection {
                    idle_timeout,
                    header_read_timeout,
                    max_connection_age,
                    escaped_slashes,
                };
                route_config.map(|route_config| ListenerKind::Http {
                    route_config,
                    connection,
                    tls: tls.clone(),
                })
            }
            "tcp" => match &l.cluster {
                Some(c) => {
                    self.cluster_ref(&format!("{path}.cluster"), c, clusters);
                    Some(ListenerKind::Tcp(TcpProxy {
                        cluster: c.as_str().into(),
                        idle_timeout,
                        tls: tls.clone(),
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
            "capture" => self
                .capture(path, l, route_configs, clusters, idle_timeout)
                .map(ListenerKind::Capture),
            other => {
                self.error(
                    format!("{path}.protocol"),
                    format!(
                        "unknown protocol {other:?} (expected \"http\", \"tcp\", \"tls_passthrough\" or \"capture\")"
                    ),
                );
                None
            }
        };
        let max_connections = match l.max_connections {
            None => Listener::DEFAULT_MAX_CONNECTIONS,
            Some(0) => {
                self.error(
                    format!("{path}.max_connections"),
                    "must be at least 1 (0 would refuse every connection)",
                );
                Listener::DEFAULT_MAX_CONNECTIONS
            }
            Some(n) => n,
        };
        if self.errors.len() != before {
            return None;
        }
        let access_log = match l.access_log.as_deref() {
            None => None,
            Some("stdout") => Some(AccessLog::Stdout),
            Some("") => {
                self.error(
                    format!("{path}.access_log"),
                    "give \"stdout\" or a file path",
                );
                None
            }
            Some(file) => Some(AccessLog::File(std::path::Path::new(file).into())),
        };
        let rate_limit = l
            .rate_limit
            .as_ref()
            .and_then(|r| self.rate_limit(&format!("{path}.rate_limit"), r));
        Some(Listener {
            name,
            address: address?,
            kind: kind?,
            access_log,
            rate_limit,
            max_connections,
        })
    }

    fn cluster_ref(&mut self, path: &str, name: &str, clusters: &HashSet<&str>) {
        if !clusters.contains(name) {
            self.error(path, format!("cluster {name:?} is not defined"));
        }
    }
}
