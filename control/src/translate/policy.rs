//! Trellis `AuthorizationPolicy` → `Policy` resources for the sidecars it selects. A policy is
//! checked whole before it is sent: a partial policy would allow or deny other calls than the
//! one written. One bad value (an identity, a CIDR, a port) is reported on the object and the
//! workloads it selects get a policy that denies every call in its place (fail closed):
//! withholding it would open them, as the only ALLOW policy of a workload or a DENY policy
//! that is gone no longer restrict anything.

use std::{collections::BTreeSet, net::IpAddr};

use trellis_proto::discovery::v1 as api;

use super::NodeInfo;
use crate::{
    catalog::{Catalog, ObjectKey},
    identity::{WorkloadId, check_trust_domain},
    source::manifest::{AuthorizationPolicy, AuthorizationRule, RulePath},
};

/// Why a policy cannot be sent; each names the field at fault (`spec.rules[0].from.cidrs[1]`)
/// and its value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("spec.action is required (ALLOW or DENY)")]
    MissingAction,
    #[error("spec.action: {0:?} is not ALLOW or DENY")]
    BadAction(String),
    #[error("spec.rules is empty; a policy needs at least one rule")]
    NoRules,
    #[error("{field}: {value:?} is not a rule name (non-empty, unique within the policy)")]
    RuleName { field: String, value: String },
    #[error(
        "{field}: {value:?} is not an identity (spiffe://<trust-domain>/ns/<namespace>/sa/<account>, \
         spiffe://<trust-domain>/ns/<namespace>/sa/*, or *)"
    )]
    Identity { field: String, value: String },
    #[error("{field}: {value:?} is not a CIDR (10.0.0.0/8, fd00::/8) or an IP address")]
    Cidr { field: String, value: String },
    #[error("{field}: {value} is not a port (1-65535)")]
    Port { field: String, value: u32 },
    #[error("{field}: {value:?} is not an HTTP method (a non-empty token such as GET)")]
    Method { field: String, value: String },
    #[error("{field}: {value:?} does not start with \"/\"")]
    Path { field: String, value: String },
    #[error("{field}: {value:?} {reason}; requests are matched on their normalised path")]
    NotNormal {
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("{field}: set exactly one of exact and prefix")]
    PathKind { field: String },
}

/// The resource name of a policy: `<namespace>/<name>`.
pub fn policy_name(key: &ObjectKey) -> String {
    key.to_string()
}

/// Whether `policy` applies to `node`: same namespace, and every `selector.matchLabels` entry
/// among the node's labels (no selector: every workload of the namespace).
pub fn selects(key: &ObjectKey, policy: &AuthorizationPolicy, node: &NodeInfo) -> bool {
    key.namespace == node.namespace
        && policy
            .spec
            .selector
            .iter()
            .flat_map(|s| &s.match_labels)
            .all(|(k, v)| node.labels.get(k) == Some(v))
}

/// The policies that select `node`, in key order; an invalid one becomes [`deny_all`] (it is
/// reported once per catalog by `object_diagnostics`).
pub fn policies_for(catalog: &Catalog, node: &NodeInfo) -> Vec<api::Policy> {
    catalog
        .authorization_policies
        .iter()
        .filter(|(key, p)| selects(key, p, node))
        .map(|(key, p)| translate(key, p).unwrap_or_else(|_| deny_all(key)))
        .collect()
}

/// The rule name of the policy sent in place of an invalid one.
pub const INVALID_RULE: &str = "invalid-policy";

/// What the workloads an invalid policy selects get instead: one DENY rule with no condition,
/// which matches every call.
pub fn deny_all(key: &ObjectKey) -> api::Policy {
    api::Policy {
        name: policy_name(key),
        action: api::PolicyAction::Deny.into(),
        rules: vec![api::PolicyRule {
            name: INVALID_RULE.to_owned(),
            ..Default::default()
        }],
    }
}

/// Checks and translates one policy.
pub fn translate(
    key: &ObjectKey,
    policy: &AuthorizationPolicy,
) -> Result<api::Policy, PolicyError> {
    let action = match policy.spec.action.as_deref() {
        None => return Err(PolicyError::MissingAction),
        Some("ALLOW") => api::PolicyAction::Allow,
        Some("DENY") => api::PolicyAction::Deny,
        Some(other) => return Err(PolicyError::BadAction(other.to_owned())),
    };
    if policy.spec.rules.is_empty() {
        return Err(PolicyError::NoRules);
    }
    let mut names = BTreeSet::new();
    let mut rules = Vec::with_capacity(policy.spec.rules.len());
    for (i, rule) in policy.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let translated = rule_of(&at, rule)?;
        let name = match &rule.name {
            Some(name) => name.clone(),
            None => format!("rules[{i}]"),
        };
        if name.is_empty() || !names.insert(name.clone()) {
            return Err(PolicyError::RuleName {
                field: format!("{at}.name"),
                value: name,
            });
        }
        rules.push(api::PolicyRule { name, ..translated });
    }
    Ok(api::Policy {
        name: policy_name(key),
        action: action.into(),
        rules,
    })
}

fn rule_of(at: &str, rule: &AuthorizationRule) -> Result<api::PolicyRule, PolicyError> {
    let mut out = api::PolicyRule::default();
    if let Some(from) = &rule.from {
        for (j, identity) in from.identities.iter().enumerate() {
            if !is_identity(identity) {
                return Err(PolicyError::Identity {
                    field: format!("{at}.from.identities[{j}]"),
                    value: identity.clone(),
                });
            }
        }
        for (j, cidr) in from.cidrs.iter().enumerate() {
            if !is_cidr(cidr) {
                return Err(PolicyError::Cidr {
                    field: format!("{at}.from.cidrs[{j}]"),
                    value: cidr.clone(),
                });
            }
        }
        out.source_identities = from.identities.clone();
        out.source_cidrs = from.cidrs.clone();
    }
    if let Some(to) = &rule.to {
        for (j, &port) in to.ports.iter().enumerate() {
            if !(1..=65535).contains(&port) {
                return Err(PolicyError::Port {
                    field: format!("{at}.to.ports[{j}]"),
                    value: port,
                });
            }
        }
        for (j, method) in to.methods.iter().enumerate() {
            if method.is_empty() || !method.bytes().all(is_tchar) {
                return Err(PolicyError::Method {
                    field: format!("{at}.to.methods[{j}]"),
                    value: method.clone(),
                });
            }
        }
        for (j, path) in to.paths.iter().enumerate() {
            out.paths
                .push(path_of(&format!("{at}.to.paths[{j}]"), path)?);
        }
        out.destination_ports = to.ports.clone();
        out.methods = to.methods.clone();
    }
    Ok(out)
}

fn path_of(at: &str, path: &RulePath) -> Result<api::PolicyPath, PolicyError> {
    use api::policy_path::Kind;
    let (kind, field, value) = match (&path.exact, &path.prefix) {
        (Some(exact), None) => (Kind::Exact(exact.clone()), "exact", exact),
        (None, Some(prefix)) => (Kind::Prefix(prefix.clone()), "prefix", prefix),
        _ => {
            return Err(PolicyError::PathKind {
                field: at.to_owned(),
            });
        }
    };
    if !value.starts_with('/') {
        return Err(PolicyError::Path {
            field: format!("{at}.{field}"),
            value: value.clone(),
        });
    }
    if let Some(reason) = not_normal(value) {
        return Err(PolicyError::NotNormal {
            field: format!("{at}.{field}"),
            value: value.clone(),
            reason,
        });
    }
    Ok(api::PolicyPath { kind: Some(kind) })
}

/// Why a path is not in the form a sidecar matches requests in (it normalises them first:
/// unreserved escapes decoded, other escapes upper case, no dot segment, no empty segment, no
/// query), so it could never match; `None` when it is. The proxy refuses such a path too.
fn not_normal(path: &str) -> Option<&'static str> {
    if path.contains(['?', '#']) {
        return Some("holds '?' or '#' (the path is matched without the query)");
    }
    if path.contains("//") {
        return Some("holds an empty segment (\"//\" is merged)");
    }
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Some("holds a dot segment");
    }
    let bytes = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let hex = bytes.get(i + 1..i + 3);
        let Some(byte) = hex
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|h| {
                h.bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            })
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        else {
            return Some("holds a '%' that is not followed by two upper-case hex digits");
        };
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            return Some("escapes an unreserved character (it is matched decoded)");
        }
    }
    None
}

/// `*`, or `spiffe://<trust-domain>/ns/<namespace>/sa/<account or *>` with names Kubernetes
/// (and the CA) accept: anything else could never equal a certificate the mesh issues.
fn is_identity(id: &str) -> bool {
    if id == "*" {
        return true;
    }
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let Some((trust_domain, path)) = rest.split_once('/') else {
        return false;
    };
    let parts: Vec<&str> = path.split('/').collect();
    let [ns_key, namespace, sa_key, account] = parts[..] else {
        return false;
    };
    check_trust_domain(trust_domain).is_ok()
        && ns_key == "ns"
        && sa_key == "sa"
        && WorkloadId::new(namespace, if account == "*" { "default" } else { account }).is_ok()
}

/// An IP address, or one with a prefix length within its family's width.
fn is_cidr(cidr: &str) -> bool {
    let (ip, len) = match cidr.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (cidr, None),
    };
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match len {
        None => true,
        Some(len) => {
            !len.is_empty()
                && len.bytes().all(|b| b.is_ascii_digit())
                && len.parse::<u8>().is_ok_and(|l| l <= max)
        }
    }
}

/// RFC 9110 `tchar`: what a method token may hold.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
