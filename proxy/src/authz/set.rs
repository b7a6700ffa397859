//! The policies a sidecar holds, as evaluated per call: DENY policies first, then ALLOW ones,
//! each rule with its decision counter registered when the set is built (off the request path).

use std::{collections::BTreeSet, sync::Arc};

use metrics::{Counter, Key, Label, Metadata, Recorder};

use super::{
    Decision, Facts,
    model::{Action, Policy},
};
use crate::telemetry;

/// `trellis_authz_decisions_total{policy,rule,decision}`.
pub const AUTHZ_DECISIONS_TOTAL: &str = "trellis_authz_decisions_total";

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

/// A counter of the decisions family, described on first use.
fn counter(policy: &str, rule: &str, decision: Action) -> Counter {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    let registry = telemetry::registry();
    DESCRIBED.call_once(|| {
        registry.describe_counter(
            AUTHZ_DECISIONS_TOTAL.into(),
            None,
            "Authorization decisions on a sidecar's inbound connections (TCP) and requests \
             (HTTP), by policy, rule and decision (allow, deny); a default decision has \
             policy \"\" and rule \"default\"."
                .into(),
        );
    });
    let labels = vec![
        Label::new("policy", policy.to_owned()),
        Label::new("rule", rule.to_owned()),
        Label::new("decision", decision.as_str()),
    ];
    registry.register_counter(&Key::from_parts(AUTHZ_DECISIONS_TOTAL, labels), &META)
}

/// A policy with one counter per rule (a rule decides only as its policy's action says).
#[derive(Debug)]
struct Counted {
    policy: Arc<Policy>,
    counters: Vec<Counter>,
}

/// Every policy held, ready to evaluate.
#[derive(Debug)]
pub struct PolicySet {
    deny: Vec<Counted>,
    allow: Vec<Counted>,
    default_allow: Counter,
    default_deny: Counter,
    /// "default", shared so a default decision allocates nothing.
    default_rule: Arc<str>,
}

impl Default for PolicySet {
    fn default() -> Self {
        PolicySet::new(std::iter::empty())
    }
}

impl PolicySet {
    /// In the order given (the client gives them by name, so evaluation is deterministic).
    pub fn new(policies: impl IntoIterator<Item = Arc<Policy>>) -> Self {
        let mut set = PolicySet {
            deny: Vec::new(),
            allow: Vec::new(),
            default_allow: counter("", "default", Action::Allow),
            default_deny: counter("", "default", Action::Deny),
            default_rule: "default".into(),
        };
        for policy in policies {
            let counters = policy
                .rules
                .iter()
                .map(|r| counter(&policy.name, &r.name, policy.action))
                .collect();
            let counted = Counted { policy, counters };
            match counted.policy.action {
                Action::Deny => set.deny.push(counted),
                Action::Allow => set.allow.push(counted),
            }
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty()
    }

    /// Deny wins; with any ALLOW policy held, what no ALLOW rule matches is denied.
    pub fn evaluate(&self, facts: &Facts<'_>) -> (Decision, &Counter) {
        for (list, allowed) in [(&self.deny, false), (&self.allow, true)] {
            for counted in list {
                let policy = &counted.policy;
                if let Some(i) = policy
                    .rules
                    .iter()
                    .position(|r| r.matches(policy.action, facts))
                {
                    let decision = Decision {
                        allowed,
                        policy: Some(policy.name.clone()),
                        rule: policy.rules[i].name.clone(),
                    };
                    return (decision, &counted.counters[i]);
                }
            }
        }
        let allowed = self.allow.is_empty();
        let decision = Decision {
            allowed,
            policy: None,
            rule: self.default_rule.clone(),
        };
        let counter = if allowed {
            &self.default_allow
        } else {
            &self.default_deny
        };
        (decision, counter)
    }

    /// Drops the decision series of policies and rules this set no longer holds, so series do
    /// not pile up as policies come and go. The default series stay.
    pub fn forget_other_series(&self) {
        let held: BTreeSet<(&str, &str)> = self
            .deny
            .iter()
            .chain(&self.allow)
            .flat_map(|c| c.policy.rules.iter().map(|r| (&*c.policy.name, &*r.name)))
            .collect();
        telemetry::registry().retain(&[AUTHZ_DECISIONS_TOTAL], |labels| {
            let get = |k: &str| labels.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
            let (policy, rule) = (get("policy").unwrap_or(""), get("rule").unwrap_or(""));
            policy.is_empty() || held.contains(&(policy, rule))
        });
    }
}
