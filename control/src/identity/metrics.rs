//! Issuance counters, process-wide: the identity service is one per process and the admin
//! endpoint renders them beside the discovery gauges.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a request was refused: the label of `trellis_control_identity_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No or malformed `authorization`.
    Unauthenticated,
    /// The token does not prove the account asked for.
    Denied,
    /// A bad CSR or a bad namespace/service account.
    InvalidRequest,
    /// No authenticator configured, or it could not decide.
    Unavailable,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::Unauthenticated,
        Refusal::Denied,
        Refusal::InvalidRequest,
        Refusal::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::Denied => "permission_denied",
            Refusal::InvalidRequest => "invalid_request",
            Refusal::Unavailable => "unavailable",
        }
    }
}

static ISSUED: AtomicU64 = AtomicU64::new(0);
static REFUSED: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

pub fn issued() {
    ISSUED.fetch_add(1, Ordering::Relaxed);
}

pub fn refused(why: Refusal) {
    REFUSED[why as usize].fetch_add(1, Ordering::Relaxed);
}

/// Issued count, and refused counts by reason (every reason, zeros included).
pub fn snapshot() -> (u64, Vec<(&'static str, u64)>) {
    let refused = Refusal::ALL
        .iter()
        .map(|r| (r.as_str(), REFUSED[*r as usize].load(Ordering::Relaxed)))
        .collect();
    (ISSUED.load(Ordering::Relaxed), refused)
}
