//! `api::Policy` → [`Policy`]: every field checked, each error naming the field and the value.

use std::{collections::HashSet, net::IpAddr, sync::Arc};

use trellis_proto::discovery::v1::{self as api, policy_path};

use super::model::{Action, Cidr, IdentityMatch, PathMatch, Policy, Rule, mask32, mask128};
use crate::{
    http::normalize::{self, EscapedSlashes, Normalized},
    identity::SpiffeId,
};

/// Why a policy was refused; shown after `policy "<name>": `.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("action: {0} is not POLICY_ACTION_ALLOW (0) or POLICY_ACTION_DENY (1)")]
    Action(i32),
    #[error(
        "rules: a policy needs at least one rule (an ALLOW policy without one would allow nothing)"
    )]
    NoRules,
    #[error("{at}.name: {name:?} names another rule of the policy too")]
    DuplicateRule { at: String, name: String },
    #[error(
        "{at}: {value:?} is not a SPIFFE ID, \"spiffe://<trust domain>/ns/<namespace>/sa/*\" or \"*\": {reason}"
    )]
    Identity {
        at: String,
        value: String,
        reason: String,
    },
    #[error("{at}: {value:?} is not a CIDR: {reason}")]
    Cidr {
        at: String,
        value: String,
        reason: &'static str,
    },
    #[error("{at}: {value} is not a port (1-65535)")]
    Port { at: String, value: u32 },
    #[error("{at}: {value:?} is not an HTTP method (a token such as \"GET\")")]
    Method { at: String, value: String },
    #[error("{at}: neither exact nor prefix is set")]
    PathKind { at: String },
    #[error("{at}: {value:?} {reason}")]
    Path {
        at: String,
        value: String,
        reason: String,
    },
}

impl TryFrom<&api::Policy> for Policy {
    type Error = PolicyError;

    fn try_from(p: &api::Policy) -> Result<Self, PolicyError> {
        let action = match api::PolicyAction::try_from(p.action) {
            Ok(api::PolicyAction::Allow) => Action::Allow,
            Ok(api::PolicyAction::Deny) => Action::Deny,
            Err(_) => return Err(PolicyError::Action(p.action)),
        };
        if p.rules.is_empty() {
            return Err(PolicyError::NoRules);
        }
        let mut names = HashSet::new();
        let rules = p
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let at = format!("rules[{i}]");
                let rule = rule(&at, r)?;
                if !names.insert(rule.name.clone()) {
                    return Err(PolicyError::DuplicateRule {
                        at,
                        name: rule.name.to_string(),
                    });
                }
                Ok(rule)
            })
            .collect::<Result<Arc<[Rule]>, _>>()?;
        Ok(Policy {
            name: p.name.as_str().into(),
            action,
            rules,
        })
    }
}

fn rule(at: &str, r: &api::PolicyRule) -> Result<Rule, PolicyError> {
    fn each<T, U>(
        at: &str,
        field: &str,
        items: &[T],
        f: impl Fn(String, &T) -> Result<U, PolicyError>,
    ) -> Result<Arc<[U]>, PolicyError> {
        items
            .iter()
            .enumerate()
            .map(|(i, item)| f(format!("{at}.{field}[{i}]"), item))
            .collect()
    }
    Ok(Rule {
        name: if r.name.is_empty() {
            at.into()
        } else {
            r.name.as_str().into()
        },
        identities: each(at, "source_identities", &r.source_identities, |at, v| {
            identity(at, v)
        })?,
        cidrs: each(at, "source_cidrs", &r.source_cidrs, |at, v| cidr(at, v))?,
        ports: each(at, "destination_ports", &r.destination_ports, |at, v| {
            u16::try_from(*v)
                .ok()
                .filter(|p| *p != 0)
                .ok_or(PolicyError::Port { at, value: *v })
        })?,
        methods: each(at, "methods", &r.methods, |at, v| {
            if http::Method::from_bytes(v.as_bytes()).is_ok() {
                Ok(v.as_str().into())
            } else {
                Err(PolicyError::Method {
                    at,
                    value: v.clone(),
                })
            }
        })?,
        paths: each(at, "paths", &r.paths, path)?,
    })
}

fn identity(at: String, value: &str) -> Result<IdentityMatch, PolicyError> {
    let err = |reason: String| PolicyError::Identity {
        at: at.clone(),
        value: value.chars().take(128).collect(),
        reason,
    };
    if value == "*" {
        return Ok(IdentityMatch::Any);
    }
    let Some(prefix) = value.strip_suffix('*') else {
        return SpiffeId::parse(value)
            .map(IdentityMatch::Exact)
            .map_err(|e| err(e.reason.into()));
    };
    // Checked as the ID of an account of that namespace would be.
    let id = SpiffeId::parse(&format!("{prefix}x")).map_err(|e| err(e.reason.into()))?;
    let path: Vec<&str> = id.as_str()["spiffe://".len() + id.trust_domain().len()..]
        .split('/')
        .collect();
    if !matches!(path.as_slice(), ["", "ns", _, "sa", "x"]) {
        return Err(err(
            "a wildcard stands only for the service account, as in spiffe://<td>/ns/<ns>/sa/*"
                .into(),
        ));
    }
    Ok(IdentityMatch::Namespace(prefix.into()))
}

fn cidr(at: String, value: &str) -> Result<Cidr, PolicyError> {
    let err = |reason| PolicyError::Cidr {
        at: at.clone(),
        value: value.chars().take(64).collect(),
        reason,
    };
    let (addr, len) = match value.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (value, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| err("not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(len) => len
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max && !len.starts_with('+'))
            .ok_or_else(|| {
                err(if addr.is_ipv4() {
                    "the prefix length must be 0 to 32"
                } else {
                    "the prefix length must be 0 to 128"
                })
            })?,
    };
    // An IPv4 range written as IPv4-mapped IPv6 is held as IPv4, as the caller's address is.
    Ok(match addr {
        IpAddr::V6(v6) if len >= 96 && v6.to_ipv4_mapped().is_some() => {
            let v4 = v6.to_ipv4_mapped().expect("checked");
            Cidr {
                addr: IpAddr::V4(mask32(u32::from(v4), len - 96).into()),
                len: len - 96,
            }
        }
        IpAddr::V6(v6) => Cidr {
            addr: IpAddr::V6(mask128(u128::from(v6), len).into()),
            len,
        },
        IpAddr::V4(v4) => Cidr {
            addr: IpAddr::V4(mask32(u32::from(v4), len).into()),
            len,
        },
    })
}

fn path(at: String, p: &api::PolicyPath) -> Result<PathMatch, PolicyError> {
    let (value, prefix) = match &p.kind {
        Some(policy_path::Kind::Exact(v)) => (v, false),
        Some(policy_path::Kind::Prefix(v)) => (v, true),
        None => return Err(PolicyError::PathKind { at }),
    };
    let at = format!("{at}.{}", if prefix { "prefix" } else { "exact" });
    let err = |reason: String| PolicyError::Path {
        at: at.clone(),
        value: value.chars().take(128).collect(),
        reason,
    };
    if !value.starts_with('/') {
        return Err(err("does not start with '/'".into()));
    }
    if value.contains(['?', '#']) {
        return Err(err(
            "holds a '?' or '#': the path is matched without the query".into(),
        ));
    }
    // Requests are judged on the normalised path, so a path that is not normal would never
    // match anything.
    match normalize::normalize(value, EscapedSlashes::KeepUnchanged) {
        Normalized::Path(n) if n == value.as_str() => {}
        Normalized::Path(n) => {
            return Err(err(format!(
                "is not a normalised path (requests are matched on {n:?})"
            )));
        }
        Normalized::Redirect(n) => {
            return Err(err(format!(
                "is not a normalised path (requests are matched on {n:?})"
            )));
        }
        Normalized::Invalid(e) => return Err(err(format!("is not a valid path: {e}"))),
    }
    Ok(if prefix {
        let trimmed = value.trim_end_matches('/');
        PathMatch::Prefix(if trimmed.is_empty() { "/" } else { trimmed }.into())
    } else {
        PathMatch::Exact(value.as_str().into())
    })
}
