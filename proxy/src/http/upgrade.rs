//! Which HTTP/1.1 upgrade requests are tunnelled. A route tunnels only the protocols it lists
//! (WebSocket by default). A request offering any other is forwarded as a plain request with its
//! `Upgrade` and `Connection: upgrade` removed, as Envoy does for upgrade types it is not
//! configured for: the upstream answers it like any request, and no opaque tunnel opens for a
//! protocol nobody chose to carry.

use std::sync::Arc;

use http::{HeaderMap, header};

/// The protocol name of one `Upgrade` entry, lower case and without its version (`TLS/1.3` →
/// `tls`); `None` unless it is `token ["/" token]` (RFC 9110 §7.8).
pub fn protocol_name(entry: &str) -> Option<String> {
    let (name, version) = match entry.trim().split_once('/') {
        Some((n, v)) => (n, Some(v)),
        None => (entry.trim(), None),
    };
    if !is_token(name) || version.is_some_and(|v| !is_token(v)) {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// True when every protocol the request's `Upgrade` lines offer is in `allowed` (lower case).
/// An offer naming one protocol outside the list is not tunnelled at all: the upstream could pick
/// that one.
pub fn allowed(headers: &HeaderMap, allowed: &[Arc<str>]) -> bool {
    let mut offered = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("\0").split(','))
        .filter(|e| !e.trim().is_empty())
        .peekable();
    offered.peek().is_some()
        && offered.all(|e| {
            protocol_name(e).is_some_and(|p| allowed.iter().any(|a| a.as_ref() == p.as_str()))
        })
}

/// RFC 9110 §5.6.2 `token`: one or more `tchar`.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn offer(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(header::UPGRADE, HeaderValue::from_str(l).unwrap());
        }
        h
    }

    #[test]
    fn protocol_names() {
        for (entry, want) in [
            ("websocket", Some("websocket")),
            ("WebSocket", Some("websocket")),
            (" h2c ", Some("h2c")),
            ("TLS/1.3", Some("tls")),
            ("HTTP/2.0", Some("http")),
            ("", None),
            ("web socket", None),
            ("a/", None),
            ("/1", None),
            ("a/b/c", None),
            ("ws@x", None),
        ] {
            assert_eq!(protocol_name(entry).as_deref(), want, "{entry:?}");
        }
    }

    #[test]
    fn every_offered_protocol_must_be_allowed() {
        let ws: Vec<Arc<str>> = vec!["websocket".into()];
        let both: Vec<Arc<str>> = vec!["websocket".into(), "h2c".into()];
        assert!(allowed(&offer(&["websocket"]), &ws));
        assert!(allowed(&offer(&["WebSocket"]), &ws));
        assert!(!allowed(&offer(&["h2c"]), &ws));
        assert!(!allowed(&offer(&["websocket, h2c"]), &ws));
        assert!(
            !allowed(&offer(&["websocket", "h2c"]), &ws),
            "second line counts"
        );
        assert!(allowed(&offer(&["websocket, h2c"]), &both));
        assert!(!allowed(&offer(&["not a token"]), &both));
        assert!(!allowed(&offer(&[""]), &ws), "an empty offer is no upgrade");
        assert!(!allowed(&HeaderMap::new(), &ws));
        assert!(
            !allowed(&offer(&["websocket"]), &[]),
            "an empty list tunnels nothing"
        );
    }
}
