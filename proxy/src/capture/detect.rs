//! Protocol detection on a connection's first bytes: a pure function of the prefix read so far,
//! asked again as more bytes arrive.
//!
//! HTTP/1 needs a whole request-line start (`METHOD SP target SP HTTP/1.`), not a method and a
//! space alone: text protocols such as memcached's (`get key\r\n`) or Redis inline commands
//! begin with a word and a space too, and sending them to the HTTP server would answer them 400
//! instead of passing them through.

/// What a prefix says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detection {
    Http1,
    /// The HTTP/2 prior-knowledge preface, whole.
    Http2,
    /// A TLS handshake record (a ClientHello, as a client sends first).
    Tls,
    /// Not HTTP or TLS: proxied as opaque bytes.
    Opaque,
    /// Could still become more than one of these: read more.
    NeedMore,
}

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest method accepted; registered methods are far shorter.
const MAX_METHOD: usize = 24;

/// Bytes read for detection at most. A request-line longer than this that looked right so far
/// (a long target) is taken for HTTP/1, so the HTTP server answers it by its own limits.
pub const MAX_PREFIX: usize = 4096;

/// Classifies the first bytes of a connection.
pub fn detect(prefix: &[u8]) -> Detection {
    if prefix.is_empty() {
        return Detection::NeedMore;
    }
    // Before HTTP/1: `PRI` is a valid method token, and `PRI * HTTP/2.0` a request-line start.
    match compare_prefix(prefix, H2_PREFACE) {
        Some(true) => return Detection::Http2,
        Some(false) => return Detection::NeedMore,
        None => {}
    }
    if prefix[0] == 0x16 {
        return tls(prefix);
    }
    match http1(prefix) {
        // A request-line that looked right for a whole buffer (a long target): the HTTP server
        // answers it by its own limits.
        Detection::NeedMore if prefix.len() >= MAX_PREFIX => Detection::Http1,
        d => d,
    }
}

/// `Some(true)`: `prefix` starts with `whole`; `Some(false)`: `prefix` is a proper prefix of it;
/// `None`: they differ.
fn compare_prefix(prefix: &[u8], whole: &[u8]) -> Option<bool> {
    let n = prefix.len().min(whole.len());
    (prefix[..n] == whole[..n]).then_some(n == whole.len())
}

/// A TLS record: content type 22 (handshake), protocol version 3.x with x ≤ 4 (SSL 3.0 to
/// TLS 1.3, whose ClientHello record says 3.1), then a handshake of type 1 (ClientHello).
fn tls(prefix: &[u8]) -> Detection {
    match prefix.get(1) {
        None => return Detection::NeedMore,
        Some(3) => {}
        Some(_) => return Detection::Opaque,
    }
    match prefix.get(2) {
        None => return Detection::NeedMore,
        Some(0..=4) => {}
        Some(_) => return Detection::Opaque,
    }
    // Bytes 3-4 are the record length; byte 5 the handshake type.
    match prefix.get(5) {
        None => Detection::NeedMore,
        Some(1) => Detection::Tls,
        Some(_) => Detection::Opaque,
    }
}

/// `token SP request-target SP HTTP/1.` (RFC 9112 §3).
fn http1(prefix: &[u8]) -> Detection {
    let method_len = prefix.iter().take_while(|b| is_tchar(**b)).count();
    if method_len == prefix.len() {
        return if method_len <= MAX_METHOD {
            Detection::NeedMore
        } else {
            Detection::Opaque
        };
    }
    if method_len == 0 || method_len > MAX_METHOD || prefix[method_len] != b' ' {
        return Detection::Opaque;
    }
    let rest = &prefix[method_len + 1..];
    // The target: visible characters, no space (any of the four request-target forms).
    let target_len = rest.iter().take_while(|b| b.is_ascii_graphic()).count();
    if target_len == rest.len() {
        return Detection::NeedMore;
    }
    if target_len == 0 || rest[target_len] != b' ' {
        return Detection::Opaque;
    }
    match compare_prefix(&rest[target_len + 1..], b"HTTP/1.") {
        Some(true) => Detection::Http1,
        Some(false) => Detection::NeedMore,
        None => Detection::Opaque,
    }
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::{Detection::*, *};

    #[test]
    fn prefixes_are_classified() {
        let cases: &[(&[u8], Detection)] = &[
            (b"", NeedMore),
            (b"G", NeedMore),
            (b"GET", NeedMore),
            (b"GET ", NeedMore),
            (b"GET /", NeedMore),
            (b"GET / ", NeedMore),
            (b"GET / HTTP/1", NeedMore),
            (b"GET / HTTP/1.", Http1),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Http1),
            (b"POST /api/v1?x=1 HTTP/1.0\r\n", Http1),
            (b"OPTIONS * HTTP/1.1\r\n", Http1),
            (b"CONNECT example.com:443 HTTP/1.1\r\n", Http1),
            (b"M-SEARCH * HTTP/1.1\r\n", Http1),
            // A word and a space, then not HTTP: memcached, Redis inline, SMTP-like text.
            (b"get key\r\n", Opaque),
            (b"PING\r\n", Opaque),
            (b"GET / HTTP/2.0\r\n", Opaque),
            (b"GET  / HTTP/1.1", Opaque),
            (b" GET / HTTP/1.1", Opaque),
            (b"GET /\x01 HTTP/1.1", Opaque),
            (b"GET / XTTP/1.1", Opaque),
            (b"*1\r\n$4\r\nPING\r\n", Opaque),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Opaque),
            (b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Opaque),
            // HTTP/2 prior knowledge, byte by byte to the end of the preface.
            (b"P", NeedMore),
            (b"PRI", NeedMore),
            (b"PRI * HTTP/2.0\r\n", NeedMore),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r", NeedMore),
            (H2_PREFACE, Http2),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04", Http2),
            // `PRI` as an HTTP/1 method is still HTTP/1.
            (b"PRI /x HTTP/1.1\r\n", Http1),
            // TLS: handshake record, version 3.x, ClientHello.
            (b"\x16", NeedMore),
            (b"\x16\x03", NeedMore),
            (b"\x16\x03\x01", NeedMore),
            (b"\x16\x03\x01\x02\x00", NeedMore),
            (b"\x16\x03\x01\x02\x00\x01", Tls),
            (b"\x16\x03\x03\x00\x40\x01\x00\x00\x3c\x03\x03", Tls),
            (b"\x16\x03\x00\x00\x40\x01", Tls),
            (b"\x16\x02\x01\x00\x40\x01", Opaque),
            (b"\x16\x03\x09\x00\x40\x01", Opaque),
            (b"\x16\x03\x01\x00\x40\x02", Opaque),
            (b"\x15\x03\x01\x00\x02", Opaque),
        ];
        for (prefix, want) in cases {
            assert_eq!(
                detect(prefix),
                *want,
                "{:?}",
                String::from_utf8_lossy(prefix)
            );
        }
    }

    #[test]
    fn a_long_target_that_looked_right_is_http1() {
        let mut line = b"GET /".to_vec();
        line.resize(MAX_PREFIX - 1, b'a');
        assert_eq!(detect(&line), NeedMore);
        line.push(b'a');
        assert_eq!(detect(&line), Http1);
        // Also when the buffer ends inside the version.
        let mut line = b"GET /".to_vec();
        line.resize(MAX_PREFIX - 3, b'a');
        line.extend_from_slice(b" HT");
        assert_eq!(detect(&line), Http1);
    }

    #[test]
    fn a_decision_never_changes_as_bytes_arrive() {
        // Detection is asked again after each read: once decided, longer prefixes agree.
        let inputs: [&[u8]; 5] = [
            b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n",
            H2_PREFACE,
            b"\x16\x03\x01\x00\x40\x01\x00\x00\x3c",
            b"get key\r\nmore",
            b"PRI * HTTP/1.1\r\n",
        ];
        for input in inputs {
            let mut decided = None;
            for n in 1..=input.len() {
                match (detect(&input[..n]), decided) {
                    (NeedMore, None) => {}
                    (NeedMore, Some(d)) => panic!("{input:?}[..{n}] undecided after {d:?}"),
                    (d, None) => decided = Some(d),
                    (d, Some(before)) => assert_eq!(d, before, "{input:?}[..{n}]"),
                }
            }
            assert!(decided.is_some(), "{input:?} never decided");
        }
    }
}
