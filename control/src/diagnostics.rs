//! What the controller could not use, as data: one [`Diagnostic`] per object part it had to
//! ignore or serve degraded, shaped like a Gateway API status condition (type, status, reason
//! with the reason Gateway API names where it names one). Translation computes them; the
//! status page, the table, the metrics and the log all read the same list.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Condition types.
pub const ACCEPTED: &str = "Accepted";
pub const RESOLVED_REFS: &str = "ResolvedRefs";
/// A proxy's own condition: whether the controller has a configuration for it.
pub const CONFIGURED: &str = "Configured";

/// Reasons (Gateway API's where it defines one).
pub const BACKEND_NOT_FOUND: &str = "BackendNotFound";
pub const INVALID_KIND: &str = "InvalidKind";
pub const UNSUPPORTED_PROTOCOL: &str = "UnsupportedProtocol";
pub const GATEWAY_NOT_FOUND: &str = "GatewayNotFound";
pub const INVALID_CERTIFICATE_REF: &str = "InvalidCertificateRef";
pub const REF_NOT_PERMITTED: &str = "RefNotPermitted";
pub const PROTOCOL_CONFLICT: &str = "ProtocolConflict";
/// BackendTLSPolicy reasons.
pub const INVALID_CA_CERTIFICATE_REF: &str = "InvalidCACertificateRef";
pub const INVALID: &str = "Invalid";
/// A proxy's node label (or a Namespace's label) that is not a value it may take; the default
/// is used instead.
pub const INVALID_LABEL: &str = "InvalidLabel";

/// Object kinds a diagnostic may name besides the manifest kinds.
pub const PROXY: &str = "Proxy";

/// One condition that is not as it should be.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Diagnostic {
    /// `HTTPRoute`, `Gateway`, or `Proxy` (a connected proxy, named by its node id).
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The part of the object at fault: `rules[0].backendRefs[1]`, `listeners[https]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
    /// Condition type: `ResolvedRefs`, `Accepted`, `Configured`.
    pub condition: String,
    /// `True` or `False`.
    pub status: String,
    pub reason: String,
    pub message: String,
}

impl Diagnostic {
    /// A condition that is `False`: the only kind the controller reports.
    pub fn failed(
        kind: &str,
        namespace: &str,
        name: &str,
        section: Option<String>,
        condition: &str,
        reason: &str,
        message: String,
    ) -> Self {
        Diagnostic {
            kind: kind.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            section,
            condition: condition.to_owned(),
            status: "False".to_owned(),
            reason: reason.to_owned(),
            message,
        }
    }

    /// `HTTPRoute shop/r rules[0].backendRefs[1]`; `Namespace shop` for an object that is not
    /// namespaced (empty namespace).
    pub fn object(&self) -> String {
        let name = if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        };
        match &self.section {
            Some(section) => format!("{} {name} {section}", self.kind),
            None => format!("{} {name}", self.kind),
        }
    }
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}={} {}: {}",
            self.object(),
            self.condition,
            self.status,
            self.reason,
            self.message
        )
    }
}

/// Logs what appeared (a warning each) and what cleared between two lists, so a rescan that
/// changes nothing logs nothing.
pub fn log_changes(before: &[Diagnostic], after: &[Diagnostic]) {
    let before_set: BTreeSet<&Diagnostic> = before.iter().collect();
    let after_set: BTreeSet<&Diagnostic> = after.iter().collect();
    for d in after_set.difference(&before_set) {
        tracing::warn!(
            object = d.object(),
            condition = d.condition,
            status = d.status,
            reason = d.reason,
            message = d.message,
            "cannot use part of a manifest"
        );
    }
    for d in before_set.difference(&after_set) {
        tracing::info!(
            object = d.object(),
            condition = d.condition,
            reason = d.reason,
            "resolved"
        );
    }
}
