//! Retry decisions: which outcomes a policy retries, what the request's method allows, and how
//! long to wait before the next try.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, Response, StatusCode, header};

use super::{body::ResponseBody, error::ProxyError};
use crate::{
    config::model::{RetryOn, RetryPolicy},
    telemetry::RetryOutcome,
    upstream::UpstreamError,
};

/// A try's outcome that the policy would retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// The upstream's `Retry-After` (on 429 and 503 responses).
    pub retry_after: Option<Duration>,
}

/// Whether `policy` retries this outcome of a try. Non-idempotent requests are retried only when
/// the upstream provably never got them, unless the policy opts in; listing a gRPC status is
/// itself the opt-in for gRPC calls (which are all POST).
/// Whether a try may be given up when its endpoint stalls (see
/// [`Cluster::stalled_while_peers_answer`](crate::upstream::Cluster::stalled_while_peers_answer)):
/// only when [`wanted`] would then retry it. A request that could not be sent again (a POST, a
/// body past the replay buffer, retries spent) keeps waiting, since the endpoint may yet answer.
pub fn may_leave_stalled(policy: &RetryPolicy, idempotent: bool, may_retry: bool) -> bool {
    may_retry
        && (idempotent || policy.retry_non_idempotent)
        && (policy.retry_on.contains(RetryOn::RESET)
            || policy.retry_on.contains(RetryOn::FIVE_XX)
            || policy.retry_on.contains(RetryOn::GATEWAY_ERROR))
}

pub fn wanted(
    policy: &RetryPolicy,
    idempotent: bool,
    grpc: bool,
    result: &Result<Response<ResponseBody>, ProxyError>,
) -> Option<Wanted> {
    let on = policy.retry_on;
    let failure = on.contains(RetryOn::FIVE_XX) || on.contains(RetryOn::GATEWAY_ERROR);
    match result {
        Err(e) => {
            let matched = match e {
                ProxyError::ConnectTimeout(_) | ProxyError::ConnectFailure(_) => {
                    on.contains(RetryOn::CONNECT_FAILURE)
                }
                ProxyError::RefusedStream(_) => on.contains(RetryOn::REFUSED_STREAM),
                ProxyError::UpstreamReset(UpstreamError::NotSent(..)) => {
                    on.contains(RetryOn::RESET) || on.contains(RetryOn::CONNECT_FAILURE)
                }
                ProxyError::UpstreamReset(_)
                | ProxyError::PerTryTimeout
                | ProxyError::UpstreamStalled => on.contains(RetryOn::RESET),
                ProxyError::UpstreamProtocol(_) => false,
                // The route's own timeout, overflow, no endpoint: another try cannot help.
                _ => return None,
            };
            if !(matched || failure) {
                return None;
            }
            if !(idempotent || policy.retry_non_idempotent || e.never_reached_upstream()) {
                return None;
            }
            Some(Wanted { retry_after: None })
        }
        Ok(resp) => {
            let status = resp.status();
            let code = status.as_u16();
            let by_status = (on.contains(RetryOn::FIVE_XX) && status.is_server_error())
                || (on.contains(RetryOn::GATEWAY_ERROR) && matches!(code, 502..=504))
                || policy.status_codes.contains(&code);
            let by_grpc = grpc && grpc_status_retried(on, resp.headers());
            if !by_grpc && !(by_status && (idempotent || policy.retry_non_idempotent)) {
                return None;
            }
            let retry_after = matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            )
            .then(|| retry_after(resp.headers()))
            .flatten();
            Some(Wanted { retry_after })
        }
    }
}

/// A trailers-only gRPC response carries its status in the head.
fn grpc_status_retried(on: RetryOn, headers: &HeaderMap) -> bool {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u8>().ok());
    let flag = match code {
        Some(1) => RetryOn::GRPC_CANCELLED,
        Some(4) => RetryOn::GRPC_DEADLINE_EXCEEDED,
        Some(8) => RetryOn::GRPC_RESOURCE_EXHAUSTED,
        Some(14) => RetryOn::GRPC_UNAVAILABLE,
        _ => return false,
    };
    on.contains(flag)
}

/// RFC 9110 §9.2.2.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// `Retry-After`: seconds, or an HTTP date (RFC 9110 §10.2.3).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The wait before retry `n`: the upstream's `Retry-After` if it gave one, else the backoff. A
/// `Retry-After` longer than `backoff.max` means the upstream asked for more patience than the
/// policy has: no retry, its answer stands, and the metric says why.
pub fn delay(policy: &RetryPolicy, wanted: Wanted, n: u32) -> Result<Duration, RetryOutcome> {
    match wanted.retry_after {
        Some(after) if after > policy.backoff_max => Err(RetryOutcome::RetryAfterTooLong),
        Some(after) => Ok(after),
        None => Ok(backoff(policy, n)),
    }
}

/// Exponential backoff with full jitter before retry `n` (1 for the first retry): a random time
/// in `[0, min(max, base × 2^(n-1))]`.
pub fn backoff(policy: &RetryPolicy, n: u32) -> Duration {
    let cap = backoff_cap(policy, n);
    Duration::from_nanos(fastrand::u64(
        0..=cap.as_nanos().min(u128::from(u64::MAX)) as u64,
    ))
}

/// The longest wait before retry `n`.
pub fn backoff_cap(policy: &RetryPolicy, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
    policy
        .backoff_base
        .saturating_mul(factor)
        .min(policy.backoff_max)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::HeaderValue;

    use super::*;
    use crate::config::validate::resilience::default_retry_policy;

    fn response(status: u16, headers: &[(&'static str, &str)]) -> Response<ResponseBody> {
        let mut r = Response::new(ResponseBody::empty());
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in headers {
            r.headers_mut()
                .insert(*k, HeaderValue::from_str(v).unwrap());
        }
        r
    }

    fn policy(on: &[RetryOn], codes: &[u16]) -> RetryPolicy {
        RetryPolicy {
            retry_on: on.iter().fold(RetryOn::default(), |a, b| a.union(*b)),
            status_codes: Arc::from(codes),
            ..default_retry_policy()
        }
    }

    fn connect_failure() -> ProxyError {
        ProxyError::ConnectFailure(UpstreamError::Connect(
            "127.0.0.1:1".parse().unwrap(),
            std::io::ErrorKind::ConnectionRefused.into(),
        ))
    }

    #[test]
    fn defaults_retry_what_never_arrived() {
        let p = default_retry_policy();
        assert!(wanted(&p, false, false, &Err(connect_failure())).is_some());
        assert!(wanted(&p, true, false, &Err(ProxyError::PerTryTimeout)).is_some());
        assert!(
            wanted(&p, false, false, &Err(ProxyError::PerTryTimeout)).is_none(),
            "a POST the upstream may have seen is not retried"
        );
        assert!(wanted(&p, true, false, &Ok(response(503, &[]))).is_none());
        assert!(wanted(&p, true, false, &Err(ProxyError::UpstreamTimeout)).is_none());
    }

    #[test]
    fn statuses_and_classes() {
        let p = policy(&[RetryOn::GATEWAY_ERROR], &[409]);
        assert!(wanted(&p, true, false, &Ok(response(503, &[]))).is_some());
        assert!(wanted(&p, true, false, &Ok(response(500, &[]))).is_none());
        assert!(wanted(&p, true, false, &Ok(response(409, &[]))).is_some());
        assert!(wanted(&p, false, false, &Ok(response(503, &[]))).is_none());
        let opt_in = RetryPolicy {
            retry_non_idempotent: true,
            ..p.clone()
        };
        assert!(wanted(&opt_in, false, false, &Ok(response(503, &[]))).is_some());
        let five = policy(&[RetryOn::FIVE_XX], &[]);
        assert!(wanted(&five, true, false, &Ok(response(500, &[]))).is_some());
        assert!(wanted(&five, true, false, &Err(connect_failure())).is_some());
    }

    #[test]
    fn grpc_codes_from_trailers_only_responses() {
        let p = policy(&[RetryOn::GRPC_UNAVAILABLE], &[]);
        let unavailable = response(200, &[("grpc-status", "14")]);
        assert!(wanted(&p, false, true, &Ok(unavailable)).is_some());
        let internal = response(200, &[("grpc-status", "13")]);
        assert!(wanted(&p, false, true, &Ok(internal)).is_none());
        let not_grpc = response(200, &[("grpc-status", "14")]);
        assert!(wanted(&p, false, false, &Ok(not_grpc)).is_none());
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let p = policy(&[RetryOn::GATEWAY_ERROR], &[]);
        let w = wanted(&p, true, false, &Ok(response(503, &[("retry-after", "2")]))).unwrap();
        assert_eq!(w.retry_after, Some(Duration::from_secs(2)));
        let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let w = wanted(
            &p,
            true,
            false,
            &Ok(response(503, &[("retry-after", &date)])),
        )
        .unwrap();
        let d = w.retry_after.unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(30));
        let w = wanted(
            &p,
            true,
            false,
            &Ok(response(503, &[("retry-after", &past)])),
        )
        .unwrap();
        assert_eq!(w.retry_after, Some(Duration::ZERO));
    }

    #[test]
    fn backoff_stays_within_full_jitter_bounds() {
        let p = RetryPolicy {
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            ..default_retry_policy()
        };
        assert_eq!(backoff_cap(&p, 1), Duration::from_millis(10));
        assert_eq!(backoff_cap(&p, 2), Duration::from_millis(20));
        assert_eq!(backoff_cap(&p, 3), Duration::from_millis(40));
        assert_eq!(backoff_cap(&p, 4), Duration::from_millis(50));
        assert_eq!(backoff_cap(&p, 40), Duration::from_millis(50));
        fastrand::seed(7);
        for n in 1..6 {
            let cap = backoff_cap(&p, n);
            let draws: Vec<Duration> = (0..2000).map(|_| backoff(&p, n)).collect();
            assert!(draws.iter().all(|d| *d <= cap));
            // Full jitter spreads over the whole range, not just near the cap.
            assert!(draws.iter().any(|d| *d < cap / 4));
            assert!(draws.iter().any(|d| *d > cap * 3 / 4));
        }
    }

    /// Only a try the retry would send again leaves a stalled endpoint: the default policy moves
    /// a GET, never a POST (the endpoint may yet answer it), nor a request whose retries are
    /// spent or whose policy retries no resets or gateway errors.
    #[test]
    fn only_a_retryable_try_leaves_a_stalled_endpoint() {
        let p = default_retry_policy();
        assert!(may_leave_stalled(&p, true, true));
        assert!(!may_leave_stalled(&p, false, true));
        assert!(!may_leave_stalled(&p, true, false));
        assert!(wanted(&p, true, false, &Err(ProxyError::UpstreamStalled)).is_some());
        assert!(!may_leave_stalled(
            &policy(&[RetryOn::CONNECT_FAILURE], &[]),
            true,
            true
        ));
        let opt_in = RetryPolicy {
            retry_non_idempotent: true,
            ..default_retry_policy()
        };
        assert!(may_leave_stalled(&opt_in, false, true));
    }
}
