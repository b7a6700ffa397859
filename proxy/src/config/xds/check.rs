//! One discovery resource at a time: converted to the bootstrap file's types and checked on its
//! own, so a bad resource is refused by name while its neighbours in the response still apply.
//! Whether the names a resource refers to exist is not checked here: a listener waits for its
//! routes, and a route to a cluster the proxy does not hold answers that share with an error.

use std::sync::Arc;

use trellis_proto::discovery::v1 as api;

use super::convert;
use crate::config::{Compiled, ConfigErrors, model::Config, validate};

/// Why one resource was refused, on one line: the resource, then the field and the problem
/// (`route config "r": virtual_hosts[0].routes[0].match.path.regex: regex "(" does not compile`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {reason}")]
pub struct Refused {
    /// The metric label of the resource's type: `cluster`, `endpoints`, `listener`,
    /// `route_config`, `secret`, or `unknown`.
    pub kind: &'static str,
    /// `route config "r"`.
    pub resource: String,
    pub reason: String,
}

impl Refused {
    pub fn new(kind: &'static str, resource: String, reason: impl Into<String>) -> Self {
        Refused {
            kind,
            resource,
            reason: reason.into(),
        }
    }
}

/// Every problem of one resource on one line.
fn one_line(errors: &ConfigErrors) -> String {
    errors
        .0
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn same_name(kind: &'static str, resource: &str, inner: &str) -> Result<(), Refused> {
    if inner == resource {
        return Ok(());
    }
    Err(Refused::new(
        kind,
        format!("{} {resource:?}", label(kind)),
        format!("name: {inner:?} does not match the resource name"),
    ))
}

fn label(kind: &str) -> &'static str {
    match kind {
        "cluster" => "cluster",
        "endpoints" => "endpoints",
        "listener" => "listener",
        "route_config" => "route config",
        "secret" => "secret",
        _ => "resource",
    }
}

pub fn cluster(name: &str, c: &api::Cluster) -> Result<(), Refused> {
    same_name("cluster", name, &c.name)?;
    validate::check_cluster(&convert::cluster(c, None))
        .map(drop)
        .map_err(|e| Refused::new("cluster", format!("cluster {name:?}"), one_line(&e)))
}

/// A load assignment, checked with the cluster it belongs to when the proxy holds it (a held
/// cluster passed its own check, so what fails is the assignment's).
pub fn endpoints(
    name: &str,
    cla: &api::ClusterLoadAssignment,
    cluster: Option<&api::Cluster>,
) -> Result<(), Refused> {
    same_name("endpoints", name, &cla.cluster_name)?;
    let bare = api::Cluster {
        name: name.to_owned(),
        ..Default::default()
    };
    validate::check_cluster(&convert::cluster(cluster.unwrap_or(&bare), Some(cla)))
        .map(drop)
        .map_err(|e| Refused::new("endpoints", format!("endpoints {name:?}"), one_line(&e)))
}

pub fn listener(name: &str, l: &api::Listener) -> Result<(), Refused> {
    same_name("listener", name, &l.name)?;
    let refused = |reason| Refused::new("listener", format!("listener {name:?}"), reason);
    let converted = convert::listener(l).map_err(|e| refused(e.message))?;
    validate::check_listener(&converted)
        .map(drop)
        .map_err(|e| refused(one_line(&e)))
}

/// A secret's certificate (chain parses, key matches the leaf, leaf valid at `now`) and CA bundle,
/// checked as they arrive so a bad one is refused by name while the version held keeps serving.
/// The reasons come from [`material`](crate::tls::material), whose errors never carry key bytes.
pub fn secret(name: &str, s: &api::Secret, now: std::time::SystemTime) -> Result<(), Refused> {
    use crate::tls::material::{self, SecretString};
    same_name("secret", name, &s.name)?;
    let refused = |reason: String| Refused::new("secret", format!("secret {name:?}"), reason);
    match (s.certificate_chain.is_empty(), s.private_key.is_empty()) {
        (true, true) if s.ca_bundle.is_empty() => {
            return Err(refused(
                "a secret needs certificate_chain and private_key, or ca_bundle".into(),
            ));
        }
        (true, true) => {}
        (false, true) => {
            return Err(refused(
                "private_key: required with certificate_chain".into(),
            ));
        }
        (true, false) => {
            return Err(refused(
                "certificate_chain: required with private_key".into(),
            ));
        }
        (false, false) => {
            let key = SecretString::new(s.private_key.clone());
            material::certificate(s.certificate_chain.as_bytes(), &key, now).map_err(|e| {
                let field = match e {
                    material::MaterialError::NoKey
                    | material::MaterialError::BadKey(_)
                    | material::MaterialError::KeyMismatch => "private_key",
                    _ => "certificate_chain",
                };
                refused(format!("{field}: {e}"))
            })?;
        }
    }
    if !s.ca_bundle.is_empty() {
        material::ca_bundle(s.ca_bundle.as_bytes())
            .map_err(|e| refused(format!("ca_bundle: {e}")))?;
    }
    Ok(())
}

pub fn route_config(name: &str, rc: &api::RouteConfiguration) -> Result<(), Refused> {
    same_name("route_config", name, &rc.name)?;
    let refused = |reason| Refused::new("route_config", format!("route config {name:?}"), reason);
    let converted = convert::route_config(rc).map_err(|e| {
        // The conversion names the resource first; keep only what follows it.
        let full = e.to_string();
        let prefix = format!("route config {name:?}: ");
        refused(full.strip_prefix(&prefix).unwrap_or(&full).to_owned())
    })?;
    let checked = validate::check_route_config(&converted).map_err(|e| refused(one_line(&e)))?;
    // Path templates that conflict are found when the route table is built.
    let alone = Config {
        route_configs: vec![checked].into(),
        ..Config::default()
    };
    Compiled::build(Arc::new(alone), 0, None)
        .map(drop)
        .map_err(|e| {
            let errors = ConfigErrors(
                e.0.into_iter()
                    .map(|mut f| {
                        f.path = f
                            .path
                            .strip_prefix("route_configs[0].")
                            .unwrap_or(&f.path)
                            .to_owned();
                        f
                    })
                    .collect(),
            );
            refused(one_line(&errors))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(cluster: &str, path: Option<api::route_match::Path>) -> api::Route {
        api::Route {
            name: "r".into(),
            r#match: Some(api::RouteMatch {
                path,
                ..Default::default()
            }),
            action: Some(api::route::Action::Forward(api::ForwardAction {
                clusters: vec![api::WeightedCluster {
                    cluster: cluster.into(),
                    weight: 1,
                }],
            })),
            ..Default::default()
        }
    }

    fn route_config(routes: Vec<api::Route>) -> api::RouteConfiguration {
        api::RouteConfiguration {
            name: "rc".into(),
            virtual_hosts: vec![api::VirtualHost {
                name: "vh".into(),
                domains: vec!["*".into()],
                routes,
                ..Default::default()
            }],
        }
    }

    #[test]
    fn names_a_route_to_any_cluster_valid() {
        assert_eq!(
            super::route_config("rc", &route_config(vec![forward("not-held", None)])),
            Ok(())
        );
    }

    #[test]
    fn refusals_name_the_resource_then_the_field() {
        use api::route_match::Path;
        let cases: Vec<(Result<(), Refused>, &str)> = vec![
            (
                super::route_config(
                    "rc",
                    &route_config(vec![forward("a", Some(Path::Regex("(".into())))]),
                ),
                r#"route config "rc": virtual_hosts[0].routes[0].match.path.regex: regex "(" does not compile"#,
            ),
            (
                // Found only when the route table is built, still named by field.
                super::route_config(
                    "rc",
                    &route_config(vec![
                        forward("a", Some(Path::Template("/{x}".into()))),
                        forward("a", Some(Path::Template("/{y}".into()))),
                    ]),
                ),
                r#"route config "rc": virtual_hosts[0].routes[1].match.path.template: template "/{y}" conflicts"#,
            ),
            (
                super::route_config("other", &route_config(vec![])),
                r#"route config "other": name: "rc" does not match the resource name"#,
            ),
            (
                endpoints(
                    "c",
                    &api::ClusterLoadAssignment {
                        cluster_name: "c".into(),
                        endpoints: vec![api::Endpoint {
                            address: "nowhere".into(),
                            weight: 1,
                            health: api::EndpointHealth::Ready as i32,
                            identity: String::new(),
                        }],
                    },
                    None,
                ),
                r#"endpoints "c": endpoints[0]"#,
            ),
            (
                cluster(
                    "c",
                    &api::Cluster {
                        name: "c".into(),
                        protocol: 42,
                        ..Default::default()
                    },
                ),
                r#"cluster "c": protocol: unknown protocol"#,
            ),
            (
                listener(
                    "l",
                    &api::Listener {
                        max_connections: None,
                        name: "l".into(),
                        address: "here".into(),
                        kind: Some(api::listener::Kind::Tcp(api::TcpProxy {
                            cluster: "not-held".into(),
                            ..Default::default()
                        })),
                    },
                ),
                r#"listener "l": address: "here" is not an IP:port socket address"#,
            ),
        ];
        for (got, want) in cases {
            let line = got.expect_err(want).to_string();
            assert!(line.starts_with(want), "{line}\nwant: {want}");
            assert_eq!(line.lines().count(), 1, "{line}");
        }
    }
}
