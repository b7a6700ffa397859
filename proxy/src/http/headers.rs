//! Per-hop header handling: hop-by-hop removal and the forwarding headers a proxy adds.

use http::{HeaderMap, HeaderName, HeaderValue, header};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes headers that describe one connection, not the message (RFC 9110 §7.6.1), including any
/// named in `Connection`. `TE: trailers` survives: gRPC needs it end to end. With `upgrade`, the
/// `Connection: upgrade` and `Upgrade` pair is kept for the next hop.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // The common case has no Connection header: skip the token walk and its allocation.
    if let Some(connection) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = connection
            .to_str()
            .unwrap_or("")
            .split(',')
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

#[cfg(test)]
mod tests {
    use super::*;

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
