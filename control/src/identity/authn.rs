//! Who may ask for which identity. An [`Authenticator`] turns the bearer token a proxy sends into
//! the workload identity it proves; the controller issues a certificate only for that identity.
//!
//! One implementation lives here: [`TokenDir`], per-account tokens in files, for one machine.
//! On Kubernetes the token is a projected ServiceAccount token and the authenticator asks the API
//! server (TokenReview) who it belongs to; that implementation belongs with the Kubernetes source
//! and plugs in here through the same trait.

use std::{fmt, path::PathBuf};

use super::WorkloadId;

/// Why a token proved nothing. The token itself never appears in a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No usable credentials: maps to `UNAUTHENTICATED`.
    #[error("{0}")]
    Unauthenticated(String),
    /// Credentials that do not prove the identity asked for: maps to `PERMISSION_DENIED`.
    #[error("{0}")]
    Denied(String),
    /// The authenticator could not decide (e.g. it could not read its own configuration): maps
    /// to `UNAVAILABLE`, so the proxy retries.
    #[error("{0}")]
    Unavailable(String),
}

/// Checks a bearer token against the identity a proxy claims.
#[tonic::async_trait]
pub trait Authenticator: fmt::Debug + Send + Sync {
    /// Returns the identity `token` proves, which the caller compares with `claimed`. An
    /// implementation that learns the identity from the token (TokenReview) ignores `claimed`;
    /// one that can only check a token against an account (a token file) uses it.
    async fn authenticate(
        &self,
        token: &str,
        claimed: &WorkloadId,
    ) -> Result<WorkloadId, AuthError>;
}

/// `DIR/<namespace>/<service-account>` holds that account's token (surrounding whitespace
/// ignored). Files are read on every request, so a rotated or revoked token takes effect at once
/// with no restart or watch; a request costs one small file read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenDir {
    pub dir: PathBuf,
}

impl TokenDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TokenDir { dir: dir.into() }
    }
}

#[tonic::async_trait]
impl Authenticator for TokenDir {
    async fn authenticate(
        &self,
        token: &str,
        claimed: &WorkloadId,
    ) -> Result<WorkloadId, AuthError> {
        // Names were checked by `WorkloadId::new`: no separators or dot-dot can reach the path.
        let path = self
            .dir
            .join(&claimed.namespace)
            .join(&claimed.service_account);
        let denied = || {
            AuthError::Denied(format!(
                "the token does not prove service account {claimed}"
            ))
        };
        let expected = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The same answer as a wrong token, so a caller cannot probe which accounts
                // exist; the log tells the operator which it was.
                tracing::warn!(account = %claimed, "identity refused: no token file for the account");
                return Err(denied());
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read a token file");
                return Err(AuthError::Unavailable(format!(
                    "the controller cannot read the token of {claimed}"
                )));
            }
        };
        let expected = expected.trim();
        if expected.is_empty() {
            tracing::warn!(account = %claimed, "identity refused: the account's token file is empty");
            return Err(denied());
        }
        if !constant_time_eq(expected.as_bytes(), token.as_bytes()) {
            tracing::warn!(account = %claimed, "identity refused: wrong token for the account");
            return Err(denied());
        }
        Ok(claimed.clone())
    }
}

/// Compares SHA-256 digests with a branch-free fold: the time taken says nothing about how much
/// of a guessed token was right, nor its length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use ring::digest::{SHA256, digest};
    let (da, db) = (digest(&SHA256, a), digest(&SHA256, b));
    da.as_ref()
        .iter()
        .zip(db.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn token_dir_proves_only_the_account_whose_file_matches() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("shop")).unwrap();
        std::fs::write(dir.path().join("shop/web"), "s3cret\n").unwrap();
        std::fs::write(dir.path().join("shop/empty"), "\n").unwrap();
        let auth = TokenDir::new(dir.path());
        let web = WorkloadId::new("shop", "web").unwrap();
        assert_eq!(auth.authenticate("s3cret", &web).await, Ok(web.clone()));
        for (token, account) in [
            ("wrong", web.clone()),
            ("s3cret", WorkloadId::new("shop", "db").unwrap()),
            ("", WorkloadId::new("shop", "empty").unwrap()),
            ("s3cret", WorkloadId::new("other", "web").unwrap()),
        ] {
            let e = auth.authenticate(token, &account).await.unwrap_err();
            assert!(
                matches!(e, AuthError::Denied(_)),
                "{token} {account}: {e:?}"
            );
            assert!(e.to_string().contains(&account.to_string()), "{e}");
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
        // Rotation: the new content counts at once.
        std::fs::write(dir.path().join("shop/web"), "next").unwrap();
        assert!(auth.authenticate("s3cret", &web).await.is_err());
        assert_eq!(auth.authenticate("next", &web).await, Ok(web));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
