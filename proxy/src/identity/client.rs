//! Obtains and renews the workload certificate: a fresh ECDSA P-256 key in memory for each
//! certificate, a CSR and the service-account token to the controller, the result published on
//! the identity watch. Renewal comes at about half of the remaining lifetime; failures retry with
//! jittered exponential backoff while the current certificate stays in use, and the log grows
//! louder as its expiry nears.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tonic::transport::Channel;
use trellis_proto::identity::v1::{CertifyRequest, identity_client::IdentityClient as Grpc};

use super::{IdentityError, IdentityWatch, WorkloadIdentity};
use crate::{
    config::xds::channel::{ChannelError, ControlChannel, error_chain},
    telemetry,
};

/// First retry delay after a failure; doubles per failure.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Bound on one request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom to ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentitySettings {
    /// The controller, `host:port` or a full `http://`/`https://` URI (the discovery address).
    pub address: String,
    pub namespace: String,
    pub service_account: String,
    /// The service-account token, re-read before every request (projected tokens rotate).
    pub token_file: PathBuf,
}

impl IdentitySettings {
    /// From the discovery settings (`--xds`, `--namespace`, `--service-account`) and
    /// `--identity-token-file`.
    pub fn from_node(
        address: &str,
        node: &trellis_proto::discovery::v1::Node,
        token_file: PathBuf,
    ) -> Result<Self, String> {
        if node.service_account.is_empty() {
            return Err(
                "--identity-token-file: the proxy's service account is not set \
                 (--service-account or xds.service_account)"
                    .into(),
            );
        }
        Ok(IdentitySettings {
            address: address.to_owned(),
            namespace: node.namespace.clone(),
            service_account: node.service_account.clone(),
            token_file,
        })
    }
}

/// Why one certificate request failed. Never holds the token or key bytes.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot read the identity token file {path}: {source}")]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the identity token file {path} is empty")]
    EmptyToken { path: String },
    #[error("the identity token is not valid gRPC metadata text")]
    BadToken,
    #[error("bad controller address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("generating the key pair: {0}")]
    Key(String),
    #[error("the controller refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    /// No answer: the connection (TCP or TLS) failed; the reason names the controller.
    #[error("cannot reach the controller: {0}")]
    Unreachable(String),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("the controller's certificate is unusable: {0}")]
    Invalid(#[from] IdentityError),
}

/// The renewal task; [`IdentityClient::run`] never returns.
#[derive(Debug)]
pub struct IdentityClient {
    settings: IdentitySettings,
    channel: Channel,
    tx: watch::Sender<Option<Arc<WorkloadIdentity>>>,
}

impl IdentityClient {
    /// The client and the watch its certificates are published on, over a channel derived
    /// from the address alone (TLS with the system's roots for `https://`). Nothing connects
    /// until [`IdentityClient::run`].
    pub fn new(settings: IdentitySettings) -> Result<(Self, IdentityWatch), FetchError> {
        let channel = ControlChannel::new(&settings.address, None, None).map_err(|e| {
            FetchError::Address {
                address: settings.address.clone(),
                reason: e.to_string(),
            }
        })?;
        Self::with_channel(settings, &channel)
    }

    /// [`IdentityClient::new`] over `channel`, the discovery stream's (same TLS settings). A
    /// plaintext channel to a controller that is not on loopback is refused: the token would
    /// travel in clear.
    pub fn with_channel(
        settings: IdentitySettings,
        channel: &ControlChannel,
    ) -> Result<(Self, IdentityWatch), FetchError> {
        channel.check_token_allowed()?;
        let channel = channel.connect_lazy(REQUEST_TIMEOUT);
        let (tx, rx) = watch::channel(None);
        Ok((
            IdentityClient {
                settings,
                channel,
                tx,
            },
            rx,
        ))
    }

    pub async fn run(self) {
        let mut failures = 0u32;
        // When the certificate in use was received: its lifetime as this proxy saw it.
        let mut received = SystemTime::now();
        loop {
            match self.fetch().await {
                Ok(identity) => {
                    failures = 0;
                    received = SystemTime::now();
                    telemetry::identity::renewal(true);
                    telemetry::identity::set_expiry(identity.not_after);
                    let remaining = identity.remaining(received);
                    tracing::info!(
                        identity = %identity.spiffe_id,
                        expires_in = ?remaining,
                        "workload certificate obtained"
                    );
                    self.tx.send_replace(Some(Arc::new(identity)));
                    tokio::time::sleep(renew_after(remaining)).await;
                }
                Err(e) => {
                    telemetry::identity::renewal(false);
                    let current = self.tx.borrow().clone();
                    let now = SystemTime::now();
                    let left = current.as_ref().map(|c| c.remaining(now));
                    let delay = backoff(failures, left);
                    failures = failures.saturating_add(1);
                    match (&current, left) {
                        (None, _) => tracing::warn!(
                            error = %e,
                            retry_in = ?delay,
                            "no workload certificate yet; mesh mTLS is unavailable"
                        ),
                        (Some(c), Some(Duration::ZERO)) => tracing::error!(
                            error = %e,
                            identity = %c.spiffe_id,
                            retry_in = ?delay,
                            "the workload certificate has EXPIRED and cannot be renewed; mesh \
                             peers will refuse this proxy"
                        ),
                        (Some(c), Some(left))
                            if left
                                < c.not_after.duration_since(received).unwrap_or_default() / 4 =>
                        {
                            tracing::error!(
                                error = %e,
                                identity = %c.spiffe_id,
                                expires_in = ?left,
                                retry_in = ?delay,
                                "the workload certificate expires soon and cannot be renewed"
                            )
                        }
                        (Some(c), left) => tracing::warn!(
                            error = %e,
                            identity = %c.spiffe_id,
                            expires_in = ?left,
                            retry_in = ?delay,
                            "workload certificate renewal failed; the current one stays in use"
                        ),
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One request: a new key, its CSR, the token, and the checked answer.
    async fn fetch(&self) -> Result<WorkloadIdentity, FetchError> {
        let token = read_token(&self.settings.token_file).await?;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| FetchError::Key(e.to_string()))?;
        let csr_pem = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(|e| FetchError::Key(e.to_string()))?;
        let mut request = tonic::Request::new(CertifyRequest {
            csr_pem,
            namespace: self.settings.namespace.clone(),
            service_account: self.settings.service_account.clone(),
            requested_ttl_seconds: 0,
        });
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| FetchError::BadToken)?;
        request.metadata_mut().insert("authorization", bearer);
        let response = Grpc::new(self.channel.clone())
            .certify(request)
            .await
            .map_err(|s| match std::error::Error::source(&s) {
                // A transport failure carries its cause (e.g. the TLS reason) as the source.
                Some(cause) => FetchError::Unreachable(error_chain(cause)),
                None => FetchError::Refused {
                    code: s.code(),
                    message: s.message().chars().take(512).collect(),
                },
            })?
            .into_inner();
        Ok(WorkloadIdentity::new(
            &key.serialize_der(),
            &response.certificate_chain_pem,
            &response.trust_bundle_pem,
            &response.spiffe_id,
        )?)
    }
}

async fn read_token(path: &std::path::Path) -> Result<String, FetchError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| FetchError::Token {
            path: path.display().to_string(),
            source,
        })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(FetchError::EmptyToken {
            path: path.display().to_string(),
        });
    }
    Ok(token.to_owned())
}

/// About half of the remaining lifetime, less up to a tenth of it at random, so proxies that
/// started together do not all renew in the same instant.
fn renew_after(remaining: Duration) -> Duration {
    let half = remaining / 2;
    let jitter = remaining.mul_f64(fastrand::f64() / 10.0);
    half.saturating_sub(jitter)
}

/// Exponential from [`BACKOFF_BASE`], capped at [`BACKOFF_MAX`] and at a quarter of what is left
/// of the current certificate (so a short-lived one gets several tries before it lapses), then
/// jittered into its upper half.
fn backoff(failures: u32, left: Option<Duration>) -> Duration {
    let mut cap = BACKOFF_BASE
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX);
    if let Some(left) = left.filter(|l| !l.is_zero()) {
        cap = cap.min((left / 4).max(Duration::from_millis(100)));
    }
    cap.mul_f64(0.5 + fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_about_half_of_the_lifetime() {
        for _ in 0..100 {
            let d = renew_after(Duration::from_secs(100));
            assert!(
                (Duration::from_secs(40)..=Duration::from_secs(50)).contains(&d),
                "{d:?}"
            );
        }
    }

    #[test]
    fn backoff_grows_and_is_capped_by_what_is_left() {
        for _ in 0..100 {
            let first = backoff(0, None);
            assert!(
                (BACKOFF_BASE / 2..=BACKOFF_BASE).contains(&first),
                "{first:?}"
            );
            let late = backoff(30, None);
            assert!((BACKOFF_MAX / 2..=BACKOFF_MAX).contains(&late), "{late:?}");
            let short = backoff(30, Some(Duration::from_secs(4)));
            assert!(short <= Duration::from_secs(1), "{short:?}");
        }
    }
}
