//! Workload identity: the proxy's own key pair (generated in memory, never written or sent), the
//! certificate the controller signs for it (`trellis.identity.v1.Identity`), renewed at about
//! half of its lifetime, and the mTLS configs built from it ([`mtls`]).
//!
//! The current identity lives in a `watch` channel ([`IdentityWatch`]): new TLS handshakes read
//! it, so a renewal takes effect without restarting anything. Readiness (`/ready`) waits for the
//! first certificate: until it arrives the proxy can neither originate nor accept mesh mTLS.

pub mod client;
pub mod mtls;

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    RootCertStore,
    client::verify_server_cert_signed_by_trust_anchor,
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime},
    server::{ParsedCertificate, WebPkiClientVerifier, danger::ClientCertVerifier},
    sign::CertifiedKey,
};
use tokio::sync::watch;

use crate::tls::material::{self, MaterialError};

pub use client::{IdentityClient, IdentitySettings};

/// The identity in force: `None` until the first certificate arrives.
pub type IdentityWatch = watch::Receiver<Option<Arc<WorkloadIdentity>>>;

/// Starts obtaining and renewing the workload certificate when `--identity-token-file` is given;
/// it needs the controller of `xds`.
pub fn start(
    token_file: Option<std::path::PathBuf>,
    xds: Option<&crate::config::xds::XdsSettings>,
) -> Result<Option<IdentityWatch>, String> {
    let Some(token_file) = token_file else {
        return Ok(None);
    };
    let xds = xds.ok_or(
        "--identity-token-file: certificates come from the controller; name it with --xds",
    )?;
    let settings = IdentitySettings::from_node(&xds.address, &xds.node, token_file)?;
    tracing::info!(
        namespace = settings.namespace,
        service_account = settings.service_account,
        token_file = %settings.token_file.display(),
        "obtaining a workload certificate"
    );
    let channel = xds.channel().map_err(|e| e.to_string())?;
    let (client, watch) =
        IdentityClient::with_channel(settings, &channel).map_err(|e| e.to_string())?;
    tokio::spawn(client.run());
    Ok(Some(watch))
}

/// A SPIFFE ID, `spiffe://<trust domain>/<path>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    id: Arc<str>,
    /// Byte length of the trust domain, after `spiffe://`.
    domain_len: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a SPIFFE ID (spiffe://<trust domain>/<path>): {reason}")]
pub struct SpiffeIdError {
    pub value: String,
    pub reason: &'static str,
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let err = |reason| SpiffeIdError {
            value: s.chars().take(128).collect(),
            reason,
        };
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| err("no spiffe:// scheme"))?;
        let (domain, path) = rest.split_once('/').ok_or_else(|| err("no path"))?;
        if domain.is_empty()
            || !domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(err(
                "the trust domain must be lowercase letters, digits, '-', '.', '_'",
            ));
        }
        if path.is_empty()
            || path.ends_with('/')
            || path
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == "..")
            || !path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._/".contains(&b))
        {
            return Err(err(
                "the path must be non-empty segments of letters, digits, '-', '.', '_'",
            ));
        }
        Ok(SpiffeId {
            id: s.into(),
            domain_len: domain.len(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..SCHEME.len() + self.domain_len]
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// The SPIFFE ID a certificate names: its one `spiffe://` URI SAN (more than one is refused, as
/// the SPIFFE X.509 profile asks).
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let mut uris = san
        .iter()
        .flat_map(|s| &s.value.general_names)
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with(SCHEME) => Some(*u),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => SpiffeId::parse(uri).map_err(IdentityError::SpiffeId),
        (None, _) => Err(IdentityError::NoSpiffeId),
        (Some(_), Some(_)) => Err(IdentityError::ManySpiffeIds),
    }
}

/// Why an identity could not be built from what the controller sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate_chain_pem: {0}")]
    Chain(MaterialError),
    #[error("trust_bundle_pem: {0}")]
    Bundle(MaterialError),
    #[error("the certificate does not parse: {0}")]
    Certificate(String),
    #[error("the certificate names no spiffe:// URI")]
    NoSpiffeId,
    #[error("the certificate names more than one spiffe:// URI")]
    ManySpiffeIds,
    #[error(transparent)]
    SpiffeId(SpiffeIdError),
    #[error("the certificate names {got}, the response says {said}")]
    IdMismatch { got: String, said: String },
    #[error("the certificate does not chain to the trust bundle: {0}")]
    Untrusted(String),
    #[error("the certificate is not for this proxy's key")]
    KeyMismatch,
    #[error("the key cannot sign: {0}")]
    Key(String),
}

/// A certificate for this proxy's key, with the trust bundle its peers are checked against.
/// `Debug` shows the identity and its lifetime, never key material.
pub struct WorkloadIdentity {
    pub spiffe_id: SpiffeId,
    pub certified_key: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    /// Verifies peers' client certificates against `roots`; built once per identity, not per
    /// handshake.
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("spiffe_id", &self.spiffe_id.as_str())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadIdentity {
    /// Checks what the controller sent (the chain parses, names `spiffe_id`, is for `key_der`
    /// and chains to the bundle) and builds the identity. `key_der` is PKCS#8.
    pub fn new(
        key_der: &[u8],
        chain_pem: &str,
        bundle_pem: &str,
        spiffe_id: &str,
    ) -> Result<Self, IdentityError> {
        let chain = material::certificates(chain_pem.as_bytes()).map_err(IdentityError::Chain)?;
        let roots =
            Arc::new(material::ca_bundle(bundle_pem.as_bytes()).map_err(IdentityError::Bundle)?);
        let got = spiffe_id_of(&chain[0])?;
        if got.as_str() != spiffe_id {
            return Err(IdentityError::IdMismatch {
                got: got.to_string(),
                said: spiffe_id.chars().take(128).collect(),
            });
        }
        let parsed = ParsedCertificate::try_from(&chain[0])
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            mtls::provider().signature_verification_algorithms.all,
        )
        .map_err(|e| IdentityError::Untrusted(e.to_string()))?;
        let (not_before, not_after) = validity(&chain[0])?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.to_vec()));
        let signing = any_supported_type(&key).map_err(|e| IdentityError::Key(e.to_string()))?;
        let certified_key = CertifiedKey::new(chain, signing);
        if certified_key.keys_match().is_err() {
            return Err(IdentityError::KeyMismatch);
        }
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), mtls::provider())
                .build()
                .map_err(|e| IdentityError::Untrusted(e.to_string()))?;
        Ok(WorkloadIdentity {
            spiffe_id: got,
            certified_key: Arc::new(certified_key),
            roots,
            client_verifier,
            not_before,
            not_after,
        })
    }

    /// Time left until `notAfter`; zero once passed.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let v = parsed.validity();
    Ok((at(v.not_before.timestamp()), at(v.not_after.timestamp())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_strictly() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        for bad in [
            "http://cluster.local/ns/a",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe:///ns/a",
            "spiffe://Cluster/ns/a",
            "spiffe://td/ns//a",
            "spiffe://td/ns/../a",
            "spiffe://td/ns/a/",
            "spiffe://td/ns/a?b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
