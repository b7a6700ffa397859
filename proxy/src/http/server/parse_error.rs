//! hyper's own answers to request heads it cannot parse, recognised on their way out so that
//! the reason can be added.

/// The answers hyper's HTTP/1 server writes by itself when it cannot parse a request head
/// (status, status line, the reason the proxy gives). It writes them with no way for the service
/// to add a header, so the socket adds `x-trellis-error`.
pub(super) const PARSER_REFUSALS: [(u16, &[u8], &str); 3] = [
    (400, b"HTTP/1.1 400 Bad Request\r\n", "malformed-request"),
    (414, b"HTTP/1.1 414 URI Too Long\r\n", "uri-too-long"),
    (
        431,
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
        "headers-too-large",
    ),
];

/// If `buf` is exactly one of hyper's parse-error answers — its status line, then only
/// `connection: close`, `content-length: 0` and `date` lines, then the blank line — its status,
/// its reason, and where its status line ends.
pub(super) fn parser_refusal(buf: &[u8]) -> Option<(u16, &'static str, usize)> {
    let (status, line, reason) = PARSER_REFUSALS
        .iter()
        .find(|(_, l, _)| buf.starts_with(l))?;
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if head_end != buf.len() {
        return None;
    }
    let mut length_zero = false;
    for field in buf[line.len()..head_end - 4].split(|&b| b == b'\n') {
        match field.strip_suffix(b"\r").unwrap_or(field) {
            b"content-length: 0" => length_zero = true,
            b"connection: close" | b"" => {}
            f if f.starts_with(b"date: ") => {}
            _ => return None,
        }
    }
    length_zero.then_some((*status, *reason, line.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_refusals_are_recognised_only_whole() {
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
            date: Mon, 07 Dec 2026 15:53:43 GMT\r\n\r\n";
        assert_eq!(
            parser_refusal(hyper_400).map(|(s, r, _)| (s, r)),
            Some((400, "malformed-request"))
        );
        let hyper_431 =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(parser_refusal(hyper_431).map(|(s, ..)| s), Some(431));
        for other in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 5\r\n\r\nhello"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nx-a: 1\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        ] {
            assert_eq!(
                parser_refusal(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
