//! Authorization policies as plain data, each condition with the test it makes on a call.

use std::{net::IpAddr, sync::Arc};

use crate::identity::SpiffeId;

/// One `trellis.discovery.v1.Policy`, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// `<namespace>/<name>`, as the resource is named.
    pub name: Arc<str>,
    pub action: Action,
    /// Never empty: a policy without rules is refused.
    pub rules: Arc<[Rule]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Policy {
    /// The rule name of [`Policy::deny_all`].
    pub const REFUSED_RULE: &'static str = "refused-policy";

    /// What stands for a policy the proxy refused and holds no good version of: one DENY rule
    /// with no condition, which matches every call.
    pub fn deny_all(name: &str) -> Policy {
        Policy {
            name: name.into(),
            action: Action::Deny,
            rules: Arc::new([Rule {
                name: Self::REFUSED_RULE.into(),
                identities: Arc::new([]),
                cidrs: Arc::new([]),
                ports: Arc::new([]),
                methods: Arc::new([]),
                paths: Arc::new([]),
            }]),
        }
    }
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// Every condition set must hold; an empty list holds for every call, a list holds when any of
/// its entries does.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// As given, or `rules[<index>]`.
    pub name: Arc<str>,
    pub identities: Arc<[IdentityMatch]>,
    pub cidrs: Arc<[Cidr]>,
    pub ports: Arc<[u16]>,
    pub methods: Arc<[Arc<str>]>,
    pub paths: Arc<[PathMatch]>,
}

/// A caller's SPIFFE ID, as a policy names it.
#[derive(Clone, Debug, PartialEq)]
pub enum IdentityMatch {
    Exact(SpiffeId),
    /// Every service account of a namespace: `spiffe://<td>/ns/<ns>/sa/*`, held as the part
    /// before the `*`.
    Namespace(Arc<str>),
    /// `*`: any verified caller.
    Any,
}

/// An address range: the address with its host bits cleared, and the prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(Arc<str>),
    /// Element-wise; held without a trailing `/` except for the root, which matches every path.
    Prefix(Arc<str>),
}

impl Rule {
    /// A rule with `methods` or `paths` speaks of HTTP requests only.
    pub fn is_http(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty()
    }

    /// Whether the rule matches a call, for a policy with `action`. On a TCP connection an ALLOW
    /// policy's HTTP rule never matches, while a DENY policy's matches on its other conditions:
    /// a deny must not be escaped by speaking TCP.
    pub fn matches(&self, action: Action, facts: &super::Facts<'_>) -> bool {
        if facts.http.is_none() && action == Action::Allow && self.is_http() {
            return false;
        }
        let any = |empty: bool, hit: bool| empty || hit;
        any(
            self.identities.is_empty(),
            facts
                .source_identity
                .is_some_and(|id| self.identities.iter().any(|m| m.matches(id))),
        ) && any(
            self.cidrs.is_empty(),
            self.cidrs.iter().any(|c| c.contains(facts.source_ip)),
        ) && any(
            self.ports.is_empty(),
            self.ports.contains(&facts.destination_port),
        ) && match &facts.http {
            None => true,
            Some(http) => {
                any(
                    self.methods.is_empty(),
                    self.methods.iter().any(|m| **m == *http.method),
                ) && any(
                    self.paths.is_empty(),
                    self.paths.iter().any(|p| p.matches(http.path)),
                )
            }
        }
    }
}

impl IdentityMatch {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdentityMatch::Exact(want) => want.as_str() == id.as_str(),
            IdentityMatch::Namespace(prefix) => id
                .as_str()
                .strip_prefix(&**prefix)
                .is_some_and(|account| !account.is_empty() && !account.contains('/')),
            IdentityMatch::Any => true,
        }
    }
}

impl Cidr {
    /// An IPv4 address carried as IPv6 (`::ffff:a.b.c.d`, as a dual-stack socket reports an
    /// IPv4 peer) is judged as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask32(u32::from(ip), self.len) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask128(u128::from(ip), self.len) == u128::from(net)
            }
            _ => false,
        }
    }
}

pub(super) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

pub(super) fn mask32(bits: u32, len: u8) -> u32 {
    match len {
        0 => 0,
        n => bits & (u32::MAX << (32 - u32::from(n.min(32)))),
    }
}

pub(super) fn mask128(bits: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        n => bits & (u128::MAX << (128 - u32::from(n.min(128)))),
    }
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => **p == *path,
            PathMatch::Prefix(p) if &**p == "/" => true,
            PathMatch::Prefix(p) => path
                .strip_prefix(&**p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}
