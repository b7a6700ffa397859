//! A downstream connection during a drain. HTTP/2 gets a GOAWAY at once: the protocol tells the
//! client which streams were taken, so none is lost. HTTP/1.1 has no such message; the only safe
//! moments to close are after a response that says `Connection: close`, or when the client has
//! been quiet for a while with no request under way. Closing an idle keep-alive connection at the
//! drain signal instead races the client's next request, which is then lost without an answer.
//!
//! So while draining, every HTTP/1 response carries `Connection: close` (hyper closes after it),
//! and a connection is closed by the proxy only once nothing has come from its client for
//! [`DRAIN_QUIET`] and no request is in flight or half-read. At the drain timeout (the cut),
//! requests still waiting for a response head are answered 503 `drain-timeout`; responses still
//! streaming after [`CUT_FLUSH`] are ended. Each cut request gets an access log line and a count in
//! `trellis_drain_cut_requests_total`.

use std::{sync::atomic::Ordering, time::Duration};

use http::{Response, StatusCode, Version};
use tokio::time::Instant;

use super::{Activity, refusal_response};
use crate::http::{
    forward::ConnContext,
    headers::Refusal,
    observe::{Exchange, ObservedBody},
};

/// How long an idle HTTP/1.1 client must stay silent during a drain before its connection is
/// closed. Clients that keep talking get `Connection: close` on their next response well before
/// this; a client silent this long is not in the middle of sending a request (a head half-read or
/// a request in flight keeps the connection open regardless).
pub(super) const DRAIN_QUIET: Duration = Duration::from_secs(1);

/// After the cut, how long a connection gets to write the 503s of its cut requests before it is
/// dropped with whatever it still streams.
pub(super) const CUT_FLUSH: Duration = Duration::from_millis(250);

/// The answer to a request the drain timeout cut before its response head.
pub(super) const DRAIN_TIMEOUT: Refusal = Refusal {
    status: StatusCode::SERVICE_UNAVAILABLE,
    reason: "drain-timeout",
    message: "the proxy is shutting down and its drain timeout ended before the response",
};

/// Answers a request cut by the drain timeout before its response head, counted and logged as
/// such. `exchange` was started when the request arrived.
pub(super) fn cut_answer(
    ctx: &ConnContext,
    mut exchange: Exchange,
    version: Version,
) -> Response<ObservedBody> {
    crate::telemetry::drain_cut_request();
    exchange.error = Some(DRAIN_TIMEOUT.reason);
    exchange.finish(ctx, refusal_response(&DRAIN_TIMEOUT, version))
}

impl Activity {
    /// The drain reached this connection: from now on HTTP/1 responses say `Connection: close`,
    /// and the client's quiet time counts from now at the earliest.
    pub(super) fn drain_started(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            self.heard_now();
        }
    }

    /// Bytes came from the client.
    pub(super) fn heard_now(&self) {
        let now = self.epoch.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.heard.fetch_max(now, Ordering::SeqCst);
    }

    /// When a draining HTTP/1 connection may be closed because its client is quiet: `quiet` after
    /// the later of the last bytes heard and the last response's end. `None` while a request is
    /// in flight or a head is half-read.
    pub(super) fn quiet_deadline(&self, quiet: Duration) -> Option<Instant> {
        if !self.is_idle() || self.mid_head.load(Ordering::SeqCst) {
            return None;
        }
        let heard = self
            .heard
            .load(Ordering::SeqCst)
            .max(self.idle_since.load(Ordering::SeqCst));
        Some(self.epoch + Duration::from_nanos(heard) + quiet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_quiet_client_is_closed_after_the_quiet_time_and_only_when_idle() {
        let a = std::sync::Arc::new(Activity::new());
        let ms = |n: u64| Duration::from_millis(n);
        a.drain_started();
        let at_signal = a.quiet_deadline(DRAIN_QUIET).expect("idle");
        assert!(at_signal >= a.epoch + DRAIN_QUIET, "counted from the drain");

        a.heard
            .store(ms(60_000).as_nanos() as u64, Ordering::SeqCst);
        assert_eq!(
            a.quiet_deadline(DRAIN_QUIET),
            Some(a.epoch + ms(60_000) + DRAIN_QUIET),
            "bytes from the client restart the quiet time"
        );

        a.mid_head.store(true, Ordering::SeqCst);
        assert_eq!(a.quiet_deadline(DRAIN_QUIET), None, "a head is half-read");
        a.mid_head.store(false, Ordering::SeqCst);

        let request = a.request_started();
        assert_eq!(
            a.quiet_deadline(DRAIN_QUIET),
            None,
            "a request is in flight"
        );
        drop(request);
        a.heard.store(0, Ordering::SeqCst);
        let ended = Duration::from_nanos(a.idle_since.load(Ordering::SeqCst));
        assert!(ended > Duration::ZERO);
        assert_eq!(
            a.quiet_deadline(DRAIN_QUIET),
            Some(a.epoch + ended + DRAIN_QUIET),
            "the quiet time counts from the response's end"
        );
    }
}
