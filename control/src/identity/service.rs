//! The `trellis.identity.v1.Identity` service: bearer token → authenticator → CA.

use std::{sync::Arc, time::Duration, time::SystemTime};

use tonic::{Request, Response, Status};
use trellis_proto::identity::v1::{
    CertifyRequest, CertifyResponse,
    identity_server::{Identity, IdentityServer},
};

use super::{
    AuthError, Authenticator, CertificateAuthority, WorkloadId,
    metrics::{self, Refusal},
};

#[derive(Clone, Debug)]
pub struct IdentityService {
    ca: Arc<CertificateAuthority>,
    /// `None`: no way to check a proof is configured, so every request is refused.
    authenticator: Option<Arc<dyn Authenticator>>,
}

impl IdentityService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        authenticator: Option<Arc<dyn Authenticator>>,
    ) -> Self {
        if authenticator.is_none() {
            tracing::warn!(
                "identity: no authenticator configured (--identity-tokens); every certificate \
                 request will be refused"
            );
        }
        IdentityService { ca, authenticator }
    }

    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }

    async fn certify_inner(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<CertifyResponse, (Refusal, Status)> {
        let token =
            bearer(&request).map_err(|m| (Refusal::Unauthenticated, Status::unauthenticated(m)))?;
        let req = request.into_inner();
        let claimed = WorkloadId::new(&req.namespace, &req.service_account).map_err(|e| {
            (
                Refusal::InvalidRequest,
                Status::invalid_argument(e.to_string()),
            )
        })?;
        let Some(authenticator) = &self.authenticator else {
            return Err((
                Refusal::Unavailable,
                Status::failed_precondition(
                    "the controller has no way to check identity proofs (start it with \
                     --identity-tokens); no certificate is issued",
                ),
            ));
        };
        let proved = authenticator
            .authenticate(&token, &claimed)
            .await
            .map_err(|e| match e {
                AuthError::Unauthenticated(m) => {
                    (Refusal::Unauthenticated, Status::unauthenticated(m))
                }
                AuthError::Denied(m) => (Refusal::Denied, Status::permission_denied(m)),
                AuthError::Unavailable(m) => (Refusal::Unavailable, Status::unavailable(m)),
            })?;
        if proved != claimed {
            return Err((
                Refusal::Denied,
                Status::permission_denied(format!(
                    "the token proves service account {proved}, not {claimed}"
                )),
            ));
        }
        let requested =
            (req.requested_ttl_seconds > 0).then(|| Duration::from_secs(req.requested_ttl_seconds));
        let issued = self
            .ca
            .issue(&req.csr_pem, &claimed, requested, SystemTime::now())
            .map_err(|e| {
                (
                    Refusal::InvalidRequest,
                    Status::invalid_argument(e.to_string()),
                )
            })?;
        let not_after = issued
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        tracing::info!(identity = issued.spiffe_id, not_after, "certificate issued");
        Ok(CertifyResponse {
            certificate_chain_pem: issued.chain_pem,
            trust_bundle_pem: self.ca.trust_bundle_pem().to_owned(),
            spiffe_id: issued.spiffe_id,
            not_after_unix_seconds: not_after,
        })
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.remote_addr();
        match self.certify_inner(request).await {
            Ok(response) => {
                metrics::issued();
                Ok(Response::new(response))
            }
            Err((why, status)) => {
                metrics::refused(why);
                tracing::info!(
                    ?peer,
                    reason = why.as_str(),
                    message = status.message(),
                    "certificate refused"
                );
                Err(status)
            }
        }
    }
}

/// The token from `authorization: Bearer <token>`.
fn bearer<T>(request: &Request<T>) -> Result<String, &'static str> {
    let value = request
        .metadata()
        .get("authorization")
        .ok_or("missing `authorization: Bearer <token>` metadata")?;
    let value = value
        .to_str()
        .map_err(|_| "`authorization` metadata is not text")?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or("`authorization` metadata is not `Bearer <token>`")?;
    Ok(token.to_owned())
}
