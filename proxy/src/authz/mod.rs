//! Authorization policies on a sidecar's inbound traffic (`trellis.discovery.v1.Policy`).
//!
//! The evaluation order is the proto's: a matching DENY rule denies; otherwise, when any ALLOW
//! policy is held, only a matching ALLOW rule allows; with none, the call is allowed.

mod convert;
pub mod model;
mod set;

use std::net::IpAddr;

pub use self::{
    convert::PolicyError,
    model::{Action, Policy},
    set::{AUTHZ_DECISIONS_TOTAL, PolicySet},
};
use crate::{config::Store, identity::SpiffeId};

/// What a decision is made on.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// The caller's verified SPIFFE ID; `None` on plaintext.
    pub source_identity: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    /// The original destination port.
    pub destination_port: u16,
    /// `None` for a TCP connection.
    pub http: Option<HttpFacts<'a>>,
}

/// An HTTP request's method and normalised path (no query).
#[derive(Clone, Copy, Debug)]
pub struct HttpFacts<'a> {
    pub method: &'a str,
    pub path: &'a str,
}

/// The outcome, with the policy and rule that decided it (for the log and the metric).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `None` for the default decision (no policy held, or no ALLOW rule matched).
    pub policy: Option<std::sync::Arc<str>>,
    /// The rule's name; "default" for a default decision.
    pub rule: std::sync::Arc<str>,
}

/// Decides one connection (TCP) or request (HTTP) and counts the decision. Reads the policies
/// in force with one lock-free load.
pub fn check(store: &Store, facts: &Facts<'_>) -> Decision {
    let set = store.policies();
    let (decision, counter) = set.evaluate(facts);
    counter.increment(1);
    if !decision.allowed {
        let (method, path) = facts.http.map_or(("", ""), |h| (h.method, h.path));
        tracing::debug!(
            policy = decision.policy.as_deref().unwrap_or(""),
            rule = %decision.rule,
            identity = facts.source_identity.map_or("", |id| id.as_str()),
            source = %facts.source_ip,
            port = facts.destination_port,
            method,
            path,
            "denied by authorization policy"
        );
    }
    decision
}

#[cfg(test)]
mod tests;
