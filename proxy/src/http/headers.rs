//! Per-hop header handling: hop-by-hop removal, the forwarding headers a proxy adds, and the
//! requests the proxy refuses before routing.

use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Uri, Version, header,
};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The caller's verified SPIFFE ID, set by an inbound sidecar for the application behind it and
/// removed from every request arriving on an inbound capture connection, so it cannot be forged.
pub static X_TRELLIS_CLIENT_IDENTITY: HeaderName =
    HeaderName::from_static("x-trellis-client-identity");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes headers that describe one connection, not the message (RFC 9110 §7.6.1), including any
/// named in `Connection`. `TE: trailers` survives: gRPC needs it end to end. With `upgrade`, the
/// `Connection: upgrade` and `Upgrade` pair is kept for the next hop.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // The common case has no Connection header: skip the token walk and its allocation.
    if headers.contains_key(header::CONNECTION) {
        // Every Connection line counts, not only the first (RFC 9110 §5.3).
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(upgrade && *n == header::UPGRADE))
            .collect();
        for name in named {
            if name != header::TE {
                headers.remove(&name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    if let Some(te) = headers.get(header::TE) {
        let trailers = te
            .to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Joins several `cookie` lines into one with `; `: HTTP/2 may split cookies into separate fields,
/// but an HTTP/1.1 request carries one Cookie line (RFC 9113 §8.2.3, RFC 6265 §5.4).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut lines = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (lines.next(), lines.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Whether an HTTP/1.1 request asks to switch protocols (a WebSocket handshake).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
}

/// Appends the client's address to `x-forwarded-for`.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: &HeaderValue) {
    match headers.get(&X_FORWARDED_FOR) {
        None => {
            headers.insert(X_FORWARDED_FOR.clone(), client.clone());
        }
        Some(existing) => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + client.len());
            joined.extend_from_slice(existing.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(client.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
    }
}

/// A random version 4 UUID, for requests that arrive without `x-request-id`.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    // Set the version (4) and variant (10xx) bits.
    n = (n & !(0xf << 76)) | (0x4 << 76);
    n = (n & !(0x3 << 62)) | (0x2 << 62);
    let mut out = [0u8; 36];
    let mut pos = 0;
    for i in (0..32).rev() {
        if matches!(pos, 8 | 13 | 18 | 23) {
            out[pos] = b'-';
            pos += 1;
        }
        out[pos] = HEX[((n >> (i * 4)) & 0xf) as usize];
        pos += 1;
    }
    HeaderValue::from_bytes(&out).expect("hex digits and dashes are a valid header value")
}

/// The header an upstream's own `x-trellis-error` is relayed under, so that it never passes for
/// the proxy's.
pub static X_TRELLIS_UPSTREAM_ERROR: HeaderName =
    HeaderName::from_static("x-trellis-upstream-error");

/// Renames an upstream response's `x-trellis-error` to `x-trellis-upstream-error`.
pub fn rename_upstream_error<B>(mut resp: Response<B>) -> Response<B> {
    let h = resp.headers_mut();
    if let Some(v) = h.remove(super::error::ERROR_HEADER) {
        h.insert(X_TRELLIS_UPSTREAM_ERROR.clone(), v);
    }
    resp
}

/// The methods a route can forward; `OPTIONS *` and a refused `CONNECT` name them in `Allow`.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE";

/// What the proxy does with a request before routing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Screened {
    /// Route it.
    Proceed,
    /// `OPTIONS *` asks about the server, not a resource: the proxy answers it.
    OptionsAsterisk,
    /// Answer with an error and never route it.
    Refuse(Refusal),
}

/// A request the proxy refuses: its status and the reason sent in `x-trellis-error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
    /// What the response body says.
    pub message: &'static str,
}

impl Refusal {
    const fn new(status: StatusCode, reason: &'static str, message: &'static str) -> Self {
        Refusal {
            status,
            reason,
            message,
        }
    }
}

/// Largest body length the proxy can represent (RFC 9110 §8.6 leaves the bound to it).
const MAX_CONTENT_LENGTH: u64 = i64::MAX as u64;

/// Checks a request head against the rules every request must meet, before any route sees it:
/// a valid and single Host that agrees with an absolute-form target, body framing the proxy can
/// forward faithfully, and no `CONNECT` (no route can allow a tunnel yet).
pub fn screen(method: &Method, uri: &Uri, version: Version, headers: &HeaderMap) -> Screened {
    match refusal(method, uri, version, headers) {
        Some(r) => Screened::Refuse(r),
        None if method == Method::OPTIONS && uri.path() == "*" && uri.authority().is_none() => {
            Screened::OptionsAsterisk
        }
        None => Screened::Proceed,
    }
}

fn refusal(method: &Method, uri: &Uri, version: Version, headers: &HeaderMap) -> Option<Refusal> {
    use StatusCode as S;
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some(Refusal::new(
            S::BAD_REQUEST,
            "duplicate-host",
            "the request has more than one Host header",
        ));
    }
    if let Some(h) = host
        && !valid_host(h.as_bytes())
    {
        return Some(Refusal::new(
            S::BAD_REQUEST,
            "invalid-host",
            "the Host header is not a valid host[:port]",
        ));
    }
    if let Some(a) = uri.authority()
        && !valid_host(a.as_str().as_bytes())
    {
        return Some(Refusal::new(
            S::BAD_REQUEST,
            "invalid-host",
            "the request target's authority is not a valid host[:port]",
        ));
    }
    // RFC 9112 §3.2.2 lets a server ignore Host for an absolute-form target; two names for one
    // request are refused instead, so that nothing downstream of the proxy can pick the other.
    if version <= Version::HTTP_11
        && method != Method::CONNECT
        && let (Some(h), Some(a)) = (host, uri.authority())
        && !same_authority(h.as_bytes(), a.as_str().as_bytes(), uri.scheme_str())
    {
        return Some(Refusal::new(
            S::BAD_REQUEST,
            "host-mismatch",
            "the Host header disagrees with the request target",
        ));
    }
    if version <= Version::HTTP_11 && !transfer_encoding_is_chunked_only(headers) {
        return Some(Refusal::new(
            S::NOT_IMPLEMENTED,
            "unsupported-transfer-encoding",
            "only the chunked transfer coding is supported",
        ));
    }
    for v in headers.get_all(header::CONTENT_LENGTH) {
        let too_large = std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_none_or(|n| n > MAX_CONTENT_LENGTH);
        if too_large {
            return Some(Refusal::new(
                S::BAD_REQUEST,
                "invalid-content-length",
                "the Content-Length is not a number the proxy can represent",
            ));
        }
    }
    if method == Method::CONNECT {
        return Some(Refusal::new(
            S::METHOD_NOT_ALLOWED,
            "connect-not-allowed",
            "CONNECT is not supported",
        ));
    }
    None
}

/// Whether `Transfer-Encoding`, if present, is exactly one `chunked` coding. Other codings would
/// have to be undone or forwarded as they are, and the proxy does neither (RFC 9112 §6.1 allows
/// 501 for codings a server does not understand).
fn transfer_encoding_is_chunked_only(headers: &HeaderMap) -> bool {
    let mut codings = 0;
    for v in headers.get_all(header::TRANSFER_ENCODING) {
        for coding in v.as_bytes().split(|&b| b == b',') {
            codings += 1;
            if codings > 1 || !coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return false;
            }
        }
    }
    true
}

/// `host [":" port]` as RFC 9110 §7.2 and RFC 3986 §3.2.2 allow it, stricter on two points: no
/// userinfo (`@`) and no comma (a list of hosts), as no legitimate client sends either.
pub fn valid_host(value: &[u8]) -> bool {
    let (host, port) = split_port(value);
    let host_ok = match host {
        [] => false,
        [b'[', inner @ .., b']'] => {
            !inner.is_empty()
                && inner
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        name => name.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b';'
                        | b'='
                )
        }),
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(p)
                .ok()
                .and_then(|s| s.parse::<u16>().ok())
                .is_some()
    });
    host_ok && port_ok
}

/// Splits `host:port` (or `[v6]:port`) at the port's colon.
fn split_port(value: &[u8]) -> (&[u8], Option<&[u8]>) {
    let after_host = if value.first() == Some(&b'[') {
        match value.iter().position(|&b| b == b']') {
            Some(end) => end + 1,
            None => return (value, None),
        }
    } else {
        0
    };
    match value[after_host..].iter().rposition(|&b| b == b':') {
        Some(i) => (&value[..after_host + i], Some(&value[after_host + i + 1..])),
        None => (value, None),
    }
}

/// Whether a Host value and an absolute-form target's authority name the same server, ignoring
/// case and a default port written on one side only.
fn same_authority(host: &[u8], authority: &[u8], scheme: Option<&str>) -> bool {
    let default_port: &[u8] = match scheme {
        Some("https") => b"443",
        _ => b"80",
    };
    let canon = |v: &[u8]| -> Vec<u8> {
        let (h, p) = split_port(v);
        let mut out = h.to_ascii_lowercase();
        if let Some(p) = p.filter(|p| *p != default_port) {
            out.push(b':');
            out.extend_from_slice(p);
        }
        out
    };
    canon(host) == canon(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, target: &str, version: Version, headers: &[(&str, &str)]) -> Screened {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        screen(
            &Method::from_bytes(method.as_bytes()).unwrap(),
            &target.parse().unwrap(),
            version,
            &map,
        )
    }

    fn reason(s: Screened) -> Option<(u16, &'static str)> {
        match s {
            Screened::Refuse(r) => Some((r.status.as_u16(), r.reason)),
            _ => None,
        }
    }

    #[test]
    fn host_values() {
        for ok in [
            "example.com",
            "example.com:8080",
            "EXAMPLE.com:1",
            "127.0.0.1:65535",
            "[::1]",
            "[::1]:80",
            "a_b-c~d.%41",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok} is valid");
        }
        for bad in [
            "",
            "ex ample.com",
            "a@b",
            "a/x",
            "a, b",
            "a,b",
            "a:xy",
            "a:",
            "a:65536",
            "a:123456",
            ":80",
            "[::1",
            "[]",
            "[zz]",
            "a:1:2",
            "a\\b",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} is invalid");
        }
    }

    /// Method, target, version, headers, and the expected status and reason (`None`: routed).
    type Case<'a> = (
        &'a str,
        &'a str,
        Version,
        &'a [(&'a str, &'a str)],
        Option<(u16, &'a str)>,
    );

    #[test]
    fn refusal_table() {
        use Version as V;
        let h11 = V::HTTP_11;
        let cases: &[Case<'_>] = &[
            ("GET", "/", h11, &[("host", "a")], None),
            (
                "GET",
                "/",
                h11,
                &[("host", "ex ample.com")],
                Some((400, "invalid-host")),
            ),
            (
                "GET",
                "/",
                h11,
                &[("host", "")],
                Some((400, "invalid-host")),
            ),
            (
                "GET",
                "/",
                h11,
                &[("host", "a:b")],
                Some((400, "invalid-host")),
            ),
            (
                "GET",
                "/",
                h11,
                &[("host", "a"), ("host", "a")],
                Some((400, "duplicate-host")),
            ),
            ("GET", "http://a/x", h11, &[("host", "a")], None),
            ("GET", "http://a:80/x", h11, &[("host", "A")], None),
            (
                "GET",
                "http://a/x",
                h11,
                &[("host", "b")],
                Some((400, "host-mismatch")),
            ),
            (
                "GET",
                "http://a:81/x",
                h11,
                &[("host", "a")],
                Some((400, "host-mismatch")),
            ),
            (
                "GET",
                "http://a@b/x",
                h11,
                &[("host", "b")],
                Some((400, "invalid-host")),
            ),
            // HTTP/2 carries the host in `:authority`; a `host` alongside is not compared.
            ("GET", "http://a/x", V::HTTP_2, &[("host", "b")], None),
            (
                "POST",
                "/",
                h11,
                &[("host", "a"), ("transfer-encoding", "chunked")],
                None,
            ),
            (
                "POST",
                "/",
                h11,
                &[("host", "a"), ("transfer-encoding", "Chunked ")],
                None,
            ),
            (
                "POST",
                "/",
                h11,
                &[("host", "a"), ("transfer-encoding", "gzip, chunked")],
                Some((501, "unsupported-transfer-encoding")),
            ),
            (
                "POST",
                "/",
                h11,
                &[
                    ("host", "a"),
                    ("transfer-encoding", "gzip"),
                    ("transfer-encoding", "chunked"),
                ],
                Some((501, "unsupported-transfer-encoding")),
            ),
            (
                "POST",
                "/",
                h11,
                &[("host", "a"), ("transfer-encoding", "chunked, chunked")],
                Some((501, "unsupported-transfer-encoding")),
            ),
            (
                "POST",
                "/",
                h11,
                &[("host", "a"), ("content-length", "9223372036854775807")],
                None,
            ),
            (
                "POST",
                "/",
                h11,
                &[("host", "a"), ("content-length", "9223372036854775808")],
                Some((400, "invalid-content-length")),
            ),
            (
                "POST",
                "/",
                V::HTTP_2,
                &[("content-length", "18446744073709551616")],
                Some((400, "invalid-content-length")),
            ),
            (
                "CONNECT",
                "a:443",
                h11,
                &[("host", "a:443")],
                Some((405, "connect-not-allowed")),
            ),
            ("OPTIONS", "/", h11, &[("host", "a")], None),
        ];
        for (method, target, version, headers, want) in cases {
            let got = head(method, target, *version, headers);
            assert_eq!(
                reason(got),
                *want,
                "{method} {target} {version:?} {headers:?}"
            );
        }
        assert_eq!(
            head("OPTIONS", "*", h11, &[("host", "a")]),
            Screened::OptionsAsterisk
        );
        assert_eq!(
            reason(head("OPTIONS", "*", h11, &[("host", "a b")])),
            Some((400, "invalid-host"))
        );
    }

    #[test]
    fn upstream_error_header_is_renamed() {
        let resp = Response::builder()
            .header("x-trellis-error", "no-route")
            .body(())
            .unwrap();
        let resp = rename_upstream_error(resp);
        assert!(resp.headers().get("x-trellis-error").is_none());
        assert_eq!(resp.headers()["x-trellis-upstream-error"], "no-route");
    }

    #[test]
    fn strips_hop_by_hop_and_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers, deflate".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn keeps_upgrade_pair() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = new_request_id();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        assert_ne!(new_request_id(), id);
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        let ip = HeaderValue::from_static("10.0.0.1");
        append_forwarded_for(&mut h, &ip);
        append_forwarded_for(&mut h, &HeaderValue::from_static("127.0.0.1"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    }
}
