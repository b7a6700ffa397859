//! Where an HTTP/1.1 request byte stream stands between messages.

/// Follows HTTP/1.1 request framing in the bytes read from a client (RFC 9112 §6), just far
/// enough to know whether part of a next request head has arrived. Heads are scanned byte by
/// byte; bodies are skipped by length or chunk size. Requests the screen refuses for their
/// framing close the connection, so only `Content-Length` and a lone `chunked` need following.
#[derive(Debug, Default)]
pub(super) struct Framing {
    state: FramingState,
    /// The current head line, kept only while it may be a framing header (and short).
    line: Vec<u8>,
    /// Bytes of the current head line, kept or not.
    line_len: usize,
    /// A request line has started: the head is under way.
    started: bool,
    length: u64,
    chunked: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum FramingState {
    #[default]
    Head,
    Body(u64),
    ChunkSize {
        size: u64,
        extension: bool,
    },
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// Trailer lines after the last chunk; the count is the current line's length.
    Trailers(usize),
}

/// Header lines longer than this are not framing headers worth reading.
const FRAMING_LINE_MAX: usize = 64;

impl Framing {
    pub(super) fn in_partial_head(&self) -> bool {
        self.state == FramingState::Head && self.started
    }

    pub(super) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                FramingState::Body(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = match left - n {
                        0 => FramingState::Head,
                        left => FramingState::Body(left),
                    };
                }
                FramingState::ChunkData(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = match left - n {
                        0 => FramingState::ChunkEnd,
                        left => FramingState::ChunkData(left),
                    };
                }
                _ => {
                    self.byte(bytes[0]);
                    bytes = &bytes[1..];
                }
            }
        }
    }

    fn byte(&mut self, b: u8) {
        match self.state {
            FramingState::Head => self.head_byte(b),
            FramingState::ChunkSize { size, extension } => {
                self.state = match b {
                    b'\n' if size == 0 => FramingState::Trailers(0),
                    b'\n' => FramingState::ChunkData(size),
                    b';' => FramingState::ChunkSize {
                        size,
                        extension: true,
                    },
                    _ if extension => self.state,
                    _ => match (b as char).to_digit(16) {
                        Some(d) => FramingState::ChunkSize {
                            size: size.saturating_mul(16).saturating_add(u64::from(d)),
                            extension,
                        },
                        None => self.state,
                    },
                };
            }
            FramingState::ChunkEnd if b == b'\n' => {
                self.state = FramingState::ChunkSize {
                    size: 0,
                    extension: false,
                };
            }
            FramingState::Trailers(len) => {
                self.state = match b {
                    b'\n' if len == 0 => FramingState::Head,
                    b'\n' => FramingState::Trailers(0),
                    b'\r' => self.state,
                    _ => FramingState::Trailers(len + 1),
                };
            }
            _ => {}
        }
    }

    fn head_byte(&mut self, b: u8) {
        match b {
            b'\r' => {}
            b'\n' if self.line_len == 0 => {
                // An empty line ends a head, or is one of the blank lines a client may send
                // before a request line (RFC 9112 §2.2).
                if self.started {
                    self.end_head();
                }
            }
            b'\n' => {
                self.header_line();
                self.line.clear();
                self.line_len = 0;
            }
            _ => {
                self.started = true;
                if self.line_len < FRAMING_LINE_MAX {
                    self.line.push(b.to_ascii_lowercase());
                }
                self.line_len += 1;
            }
        }
    }

    fn header_line(&mut self) {
        if self.line_len > FRAMING_LINE_MAX {
            return;
        }
        let Some((name, value)) = self.line.split_once_colon() else {
            return;
        };
        match name.trim_ascii() {
            b"content-length" => {
                self.length = std::str::from_utf8(value.trim_ascii())
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            }
            b"transfer-encoding" => self.chunked = value.trim_ascii() == b"chunked",
            _ => {}
        }
    }

    fn end_head(&mut self) {
        self.state = if self.chunked {
            FramingState::ChunkSize {
                size: 0,
                extension: false,
            }
        } else if self.length > 0 {
            FramingState::Body(self.length)
        } else {
            FramingState::Head
        };
        self.started = false;
        self.length = 0;
        self.chunked = false;
    }
}

trait SplitColon {
    fn split_once_colon(&self) -> Option<(&[u8], &[u8])>;
}

impl SplitColon for Vec<u8> {
    fn split_once_colon(&self) -> Option<(&[u8], &[u8])> {
        let i = self.iter().position(|&b| b == b':')?;
        Some((&self[..i], &self[i + 1..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(pieces: &[&[u8]]) -> Framing {
        let mut f = Framing::default();
        for p in pieces {
            f.feed(p);
        }
        f
    }

    #[test]
    fn framing_finds_a_partial_next_head() {
        let get = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        assert!(!fed(&[get]).in_partial_head());
        assert!(fed(&[get, b"GET / HT"]).in_partial_head());
        assert!(fed(&[b"GET / HTTP/1.1\r\nhos"]).in_partial_head());
        assert!(
            !fed(&[b"\r\n"]).in_partial_head(),
            "blank lines before a head"
        );

        let post = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        assert!(!fed(&[post]).in_partial_head());
        assert!(!fed(&[&post[..40], &post[40..]]).in_partial_head());
        assert!(fed(&[post, b"G"]).in_partial_head());
        // A body that looks like a head is still a body.
        let tricky = b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\nGET ";
        assert!(!fed(&[tricky]).in_partial_head());

        let chunked = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n";
        assert!(!fed(&[chunked]).in_partial_head());
        for split in 1..chunked.len() {
            let f = fed(&[&chunked[..split], &chunked[split..], b"GET /"]);
            assert!(f.in_partial_head(), "split at {split}");
            let f = fed(&[&chunked[..split], &chunked[split..]]);
            assert!(!f.in_partial_head(), "split at {split}");
        }
    }
}
