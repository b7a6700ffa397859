//! Workload identity figures: renewals by outcome (counted as they happen) and the current
//! certificate's expiry (read at scrape time, so the gauge is never stale between renewals).

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicI64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use metrics::Counter;

use super::{
    global_counter, names,
    registry::{header, sample},
};

/// The current certificate's notAfter in Unix seconds; `i64::MIN`: none yet.
static NOT_AFTER: AtomicI64 = AtomicI64::new(i64::MIN);

/// A certificate was obtained or renewed; `outcome` is `success` or `failure`.
pub fn renewal(success: bool) {
    static SUCCESS: OnceLock<Counter> = OnceLock::new();
    static FAILURE: OnceLock<Counter> = OnceLock::new();
    let (cell, outcome) = if success {
        (&SUCCESS, "success")
    } else {
        (&FAILURE, "failure")
    };
    global_counter(
        cell,
        names::IDENTITY_RENEWALS_TOTAL,
        &[("outcome", outcome)],
    )
    .increment(1);
}

/// The certificate now in use expires at `not_after`.
pub fn set_expiry(not_after: SystemTime) {
    let secs = match not_after.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    NOT_AFTER.store(secs, Ordering::Relaxed);
}

/// Appends the expiry gauge once the proxy holds an identity.
pub(super) fn render(out: &mut String) {
    let not_after = NOT_AFTER.load(Ordering::Relaxed);
    if not_after == i64::MIN {
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    header(
        out,
        names::IDENTITY_CERTIFICATE_EXPIRY,
        Some("Seconds until the workload identity certificate's notAfter (negative once expired)."),
        "gauge",
    );
    sample(
        out,
        names::IDENTITY_CERTIFICATE_EXPIRY,
        &[],
        not_after as f64 - now,
    );
}
