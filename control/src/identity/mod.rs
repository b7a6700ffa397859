//! The mesh certificate authority: a proxy proves which service account it runs as (an
//! [`Authenticator`] checks the bearer token it sends) and receives a short-lived certificate
//! whose only name is the SPIFFE ID of that account, signed by the [`CertificateAuthority`].
//! The private key never leaves the proxy: only a CSR travels.

pub mod authn;
pub mod ca;
pub mod metrics;
pub mod service;

use std::fmt;

pub use authn::{AuthError, Authenticator, TokenDir};
pub use ca::{CaError, CaSource, CertificateAuthority, IssueError, Issued};
pub use service::IdentityService;

/// The trust domain when `--trust-domain` is not given.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity: what a token proves and what a certificate names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadId {
    pub namespace: String,
    pub service_account: String,
}

impl WorkloadId {
    /// Checks both parts are Kubernetes names (lowercase RFC 1123 labels, dots allowed in a
    /// service account): they become a path in a token directory and in a SPIFFE ID.
    pub fn new(namespace: &str, service_account: &str) -> Result<Self, NameError> {
        check_name("namespace", namespace, false)?;
        check_name("service_account", service_account, true)?;
        Ok(WorkloadId {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value:?} is not a valid name (lowercase letters, digits and '-', at most 253)")]
pub struct NameError {
    pub field: &'static str,
    pub value: String,
}

fn check_name(field: &'static str, value: &str, dots: bool) -> Result<(), NameError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
        && (dots || !value.contains('.'));
    if ok {
        Ok(())
    } else {
        Err(NameError {
            field,
            value: value.chars().take(64).collect(),
        })
    }
}

/// Checks a trust domain: a lowercase DNS-like name, as the SPIFFE spec asks.
pub fn check_trust_domain(td: &str) -> Result<(), NameError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(NameError {
            field: "trust_domain",
            value: td.chars().take(64).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_lifetimes_are_bounded() {
        assert_eq!(parse_ttl("24h"), Ok(std::time::Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("90"), Ok(std::time::Duration::from_secs(90)));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("8761h").is_err());
        // Saturated multiplication used to pass, and issuing then overflowed the clock.
        assert!(parse_ttl("3000000000000000h").is_err());
    }

    #[test]
    fn names_that_become_paths_and_ids_are_checked() {
        for (ns, sa, ok) in [
            ("shop", "web", true),
            ("shop", "web.v1", true),
            ("kube-system", "default", true),
            ("", "web", false),
            ("shop", "", false),
            ("..", "web", false),
            ("shop", "../web", false),
            ("shop", "a/b", false),
            ("Shop", "web", false),
            ("sh.op", "web", false),
            ("-shop", "web", false),
        ] {
            assert_eq!(WorkloadId::new(ns, sa).is_ok(), ok, "{ns:?}/{sa:?}");
        }
        assert_eq!(
            WorkloadId::new("shop", "web")
                .unwrap()
                .spiffe_id("cluster.local"),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert!(check_trust_domain("cluster.local").is_ok());
        assert!(check_trust_domain("Cluster/x").is_err());
    }
}

/// The identity flags of `trellis-control serve`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `None`: no CA, the identity service is not served.
    pub ca: Option<CaSource>,
    pub trust_domain: String,
    pub cert_ttl: std::time::Duration,
    /// `--identity-tokens`.
    pub token_dir: Option<std::path::PathBuf>,
}

/// Loads the CA and builds the service, or `None` when no CA is configured.
pub fn start(settings: &Settings) -> anyhow::Result<Option<IdentityService>> {
    use anyhow::Context as _;
    let Some(source) = &settings.ca else {
        anyhow::ensure!(
            settings.token_dir.is_none(),
            "--identity-tokens needs a certificate authority: --ca-dir, or --ca-cert and --ca-key"
        );
        return Ok(None);
    };
    check_trust_domain(&settings.trust_domain).context("--trust-domain")?;
    let ca = CertificateAuthority::load(source, &settings.trust_domain, settings.cert_ttl)?;
    let authenticator: Option<std::sync::Arc<dyn Authenticator>> = match &settings.token_dir {
        Some(dir) => {
            anyhow::ensure!(
                dir.is_dir(),
                "--identity-tokens {} is not a directory",
                dir.display()
            );
            Some(std::sync::Arc::new(TokenDir::new(dir)))
        }
        None => None,
    };
    tracing::info!(
        trust_domain = settings.trust_domain,
        cert_ttl = ?settings.cert_ttl,
        tokens = ?settings.token_dir,
        "mesh identity: serving trellis.identity.v1.Identity"
    );
    Ok(Some(IdentityService::new(
        std::sync::Arc::new(ca),
        authenticator,
    )))
}

const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

/// `90s`, `30m`, `24h` or a number of seconds; at least one second, at most a year.
pub fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m or 24h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    if secs == 0 {
        return Err(format!("{s:?}: must be at least 1s"));
    }
    // A workload certificate is short-lived by design; a year is far past any sane setting and
    // keeps `now + ttl` from overflowing.
    if secs > MAX_TTL_SECS {
        return Err(format!("{s:?}: must be at most 8760h (a year)"));
    }
    Ok(std::time::Duration::from_secs(secs))
}
