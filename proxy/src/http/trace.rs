//! Trace context propagation, so traces join across hops: W3C `traceparent` and Zipkin B3 (both
//! the `x-b3-*` headers and the single `b3` header).
//!
//! The proxy is one span of the trace: the upstream receives the incoming trace id with a new span
//! id, whose parent is the incoming span id. A request with no trace context starts a W3C trace.
//! `tracestate` and baggage pass through untouched.

use http::{HeaderMap, HeaderName, HeaderValue};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static B3: HeaderName = HeaderName::from_static("b3");
pub static X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub static X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub static X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");

/// A 128-bit trace id (a 64-bit B3 id is zero-padded on the left).
pub type TraceId = [u8; 16];

/// Rewrites the trace headers for the upstream hop; returns the trace id for the access log.
pub fn propagate(headers: &mut HeaderMap) -> TraceId {
    let span = new_span_id();
    let mut trace = None;

    if let Some(tp) = headers.get(&TRACEPARENT).and_then(parse_traceparent) {
        let mut buf = [0u8; 55];
        buf[..3].copy_from_slice(b"00-");
        hex_into(&tp.trace, &mut buf[3..35]);
        buf[35] = b'-';
        hex_into(&span, &mut buf[36..52]);
        buf[52] = b'-';
        hex_into(&[tp.flags], &mut buf[53..55]);
        headers.insert(TRACEPARENT.clone(), header_value(&buf));
        trace = Some(tp.trace);
    }

    if let Some(id) = headers
        .get(&X_B3_TRACEID)
        .and_then(|v| parse_trace_id(v.as_bytes()))
    {
        let parent = headers.remove(&X_B3_SPANID);
        headers.insert(X_B3_SPANID.clone(), span_value(&span));
        match parent {
            Some(p) => headers.insert(X_B3_PARENTSPANID.clone(), p),
            None => headers.remove(&X_B3_PARENTSPANID),
        };
        trace.get_or_insert(id);
    }

    if let Some(value) = headers.get(&B3)
        && let Some((id, rewritten)) = rewrite_single_b3(value.as_bytes(), &span)
    {
        headers.insert(B3.clone(), rewritten);
        trace.get_or_insert(id);
    }

    trace.unwrap_or_else(|| {
        let trace = new_trace_id();
        let mut buf = [0u8; 55];
        buf[..3].copy_from_slice(b"00-");
        hex_into(&trace, &mut buf[3..35]);
        buf[35] = b'-';
        hex_into(&span, &mut buf[36..52]);
        buf[52..].copy_from_slice(b"-01");
        headers.insert(TRACEPARENT.clone(), header_value(&buf));
        trace
    })
}

#[derive(Debug, PartialEq, Eq)]
struct TraceParent {
    trace: TraceId,
    flags: u8,
}

/// `version-traceid-parentid-flags`; later versions may append fields after a `-`.
fn parse_traceparent(v: &HeaderValue) -> Option<TraceParent> {
    let b = v.as_bytes();
    if b.len() < 55 || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    let version = unhex::<1>(&b[0..2])?[0];
    if version == 0xff || (version == 0 && b.len() != 55) {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace = unhex::<16>(&b[3..35])?;
    let parent = unhex::<8>(&b[36..52])?;
    let flags = unhex::<1>(&b[53..55])?[0];
    if trace == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some(TraceParent { trace, flags })
}

/// A B3 trace id: 16 or 32 hex digits.
fn parse_trace_id(b: &[u8]) -> Option<TraceId> {
    match b.len() {
        32 => unhex::<16>(b),
        16 => {
            let low = unhex::<8>(b)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
    .filter(|id| *id != [0; 16])
}

/// `b3: {trace}-{span}[-{sampled}[-{parent}]]` becomes `{trace}-{new span}[-{sampled}-{span}]`.
/// A sampling-only value (`0`, `1`, `d`) has no ids and is left alone.
fn rewrite_single_b3(b: &[u8], span: &[u8; 8]) -> Option<(TraceId, HeaderValue)> {
    let mut parts = b.split(|c| *c == b'-');
    let trace_hex = parts.next()?;
    let span_hex = parts.next()?;
    let sampled = parts.next();
    let id = parse_trace_id(trace_hex)?;
    unhex::<8>(span_hex)?;
    let mut out = Vec::with_capacity(b.len() + 18);
    out.extend_from_slice(trace_hex);
    out.push(b'-');
    let mut s = [0u8; 16];
    hex_into(span, &mut s);
    out.extend_from_slice(&s);
    if let Some(sampled) = sampled {
        out.push(b'-');
        out.extend_from_slice(sampled);
        out.push(b'-');
        out.extend_from_slice(span_hex);
    }
    Some((id, HeaderValue::from_bytes(&out).ok()?))
}

fn new_trace_id() -> TraceId {
    fastrand::u128(1..).to_be_bytes()
}

fn new_span_id() -> [u8; 8] {
    fastrand::u64(1..).to_be_bytes()
}

fn span_value(span: &[u8; 8]) -> HeaderValue {
    let mut buf = [0u8; 16];
    hex_into(span, &mut buf);
    header_value(&buf)
}

fn header_value(hex_ascii: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(hex_ascii).expect("hex digits and dashes are a valid header value")
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

/// Lower- or upper-case hex digits into exactly `N` bytes.
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn traceparent_keeps_trace_and_flags_with_a_new_span() {
        let mut h = headers(&[("traceparent", TP)]);
        let trace = propagate(&mut h);
        let out = h["traceparent"].to_str().unwrap();
        assert_eq!(&out[..36], &TP[..36]);
        assert_ne!(&out[36..52], &TP[36..52]);
        assert_eq!(&out[52..], "-01");
        assert_eq!(crate::telemetry::access_log::hex(&trace), &TP[3..35]);
    }

    #[test]
    fn invalid_traceparent_starts_a_new_trace() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", HeaderValue::from_static(bad));
            propagate(&mut h);
            let out = h["traceparent"].to_str().unwrap();
            assert!(
                parse_traceparent(&h["traceparent"]).is_some(),
                "{bad} -> {out}"
            );
            assert_ne!(&out[3..35], bad.get(3..35).unwrap_or(""), "{bad}");
        }
    }

    #[test]
    fn no_context_starts_a_sampled_trace() {
        let mut h = HeaderMap::new();
        let trace = propagate(&mut h);
        let tp = parse_traceparent(&h["traceparent"]).unwrap();
        assert_eq!(tp.trace, trace);
        assert_eq!(tp.flags, 1);
    }

    #[test]
    fn b3_multi_moves_span_to_parent() {
        let mut h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-parentspanid", "0020000000000001"),
            ("x-b3-sampled", "1"),
        ]);
        let trace = propagate(&mut h);
        assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad");
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        assert_ne!(h["x-b3-spanid"], "a2fb4a1d1a96d312");
        assert_eq!(h["x-b3-spanid"].len(), 16);
        assert_eq!(h["x-b3-sampled"], "1");
        assert_eq!(trace[8..], unhex::<8>(b"463ac35c9f6413ad").unwrap());
        assert!(!h.contains_key("traceparent"), "B3 callers keep B3 only");
    }

    #[test]
    fn b3_single() {
        let mut h = headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]);
        propagate(&mut h);
        let out = h["b3"].to_str().unwrap();
        let parts: Vec<&str> = out.split('-').collect();
        assert_eq!(parts[0], "80f198ee56343ba864fe8b2a57d3eff7");
        assert_ne!(parts[1], "e457b5a2e4d86bd1");
        assert_eq!(parts[2], "1");
        assert_eq!(parts[3], "e457b5a2e4d86bd1");

        let mut h = headers(&[("b3", "0")]);
        propagate(&mut h);
        assert_eq!(h["b3"], "0");
        assert!(h.contains_key("traceparent"));
    }
}
