//! 1xx responses (103 Early Hints, 100 Continue) that hyper's server cannot send, written by the
//! connection's socket between hyper's own output.
//!
//! HTTP/1.1: a 1xx head goes out while hyper is between messages (see `Downstream`).
//!
//! HTTP/2: a 1xx is a HEADERS frame on the request's stream, which is written only at a frame
//! boundary of hyper's output (never inside a header block and its CONTINUATIONs) and only while
//! the stream is open with no final head sent. Its header block uses literals that are never
//! indexed, so the HPACK dynamic table hyper's encoder shares with the client is untouched.
//! hyper does not tell the service a request's stream id, so the socket adds it: when the client's
//! header block for a new stream ends, one more field (`STREAM_ID_HEADER`) is appended to it, in
//! a CONTINUATION frame of its own, and the service takes it off the request first thing.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::Waker,
};

use http::{
    HeaderMap, HeaderName, Request, StatusCode,
    header::{self, Entry},
};

use super::Activity;

/// The request field that carries an HTTP/2 request's stream id from the socket to the service.
/// The socket's copy is the last one of the head; the service removes every copy.
pub(super) const STREAM_ID_NAME: &str = "x-trellis-h2-stream";
const STREAM_ID_HEADER: HeaderName = HeaderName::from_static(STREAM_ID_NAME);

/// What a client sends first on an HTTP/2 connection (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;
const FRAME_HEAD: usize = 9;

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
/// The dynamic table size both sides start with (RFC 7541 §4.2, RFC 9113 §6.5.2).
const INITIAL_TABLE_SIZE: u32 = 4096;
/// The largest frame every peer accepts (RFC 9113 §4.2).
const MIN_MAX_FRAME: usize = 16_384;
/// 1xx heads larger than this are not sent: hints are a few links.
const MAX_INFORMATIONAL: usize = 64 * 1024;
/// Open streams remembered per connection; past it the oldest lose their 1xx (hyper refuses
/// streams well before, so only a client that ignores GOAWAY gets there).
const MAX_TRACKED: usize = 4096;

/// Sends 1xx responses to the client of one request, ahead of its final response.
#[derive(Clone, Debug)]
pub struct Informational {
    activity: Arc<Activity>,
    to: Target,
}

#[derive(Clone, Debug)]
enum Target {
    /// The request's number among the connection's requests.
    Http1 { request: u64 },
    /// The request's stream, and whether it still waits for its `100 Continue`.
    Http2 {
        stream: u32,
        expects_continue: Arc<AtomicBool>,
    },
}

impl Informational {
    pub(super) fn http1(activity: Arc<Activity>, request: u64) -> Self {
        Informational {
            activity,
            to: Target::Http1 { request },
        }
    }

    /// For an HTTP/2 request: takes the stream id the socket added to its head; `None` if the
    /// socket did not add one (it always does for a request hyper accepted).
    pub(super) fn http2<B: http_body::Body>(
        activity: Arc<Activity>,
        req: &mut Request<B>,
    ) -> Option<Self> {
        // One lookup: the socket's copy is the last value, any client's go with it.
        let stream = match req.headers_mut().entry(STREAM_ID_HEADER) {
            Entry::Occupied(e) => e
                .remove_entry_mult()
                .1
                .last()
                .and_then(|v| v.to_str().ok()?.parse::<u32>().ok()),
            Entry::Vacant(_) => None,
        };
        let expects_continue = !req.body().is_end_stream()
            && req
                .headers()
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        Some(Informational {
            activity,
            to: Target::Http2 {
                stream: stream?,
                expects_continue: Arc::new(AtomicBool::new(expects_continue)),
            },
        })
    }

    /// Sends a 1xx head with these fields; dropped if the final response went first.
    pub fn send(&self, status: StatusCode, headers: &HeaderMap) {
        let mut pending = self
            .activity
            .informational
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match &self.to {
            Target::Http1 { request } => {
                if pending.request != *request {
                    pending.request = *request;
                    pending.bytes.clear();
                    pending.written = 0;
                }
                let head = http1_head(status, headers);
                if pending.bytes.len() - pending.written + head.len() > MAX_QUEUED_INFORMATIONAL {
                    tracing::debug!(status = %status, "1xx heads queued beyond the limit; not sent");
                    return;
                }
                pending.bytes.extend_from_slice(&head);
            }
            Target::Http2 { stream, .. } => {
                let Some(frames) = h2_headers_frames(*stream, status, headers) else {
                    tracing::debug!(status = %status, "1xx head too large for HTTP/2; not sent");
                    return;
                };
                let queued: usize = pending.h2.iter().map(|(_, f)| f.len()).sum();
                if queued.saturating_sub(pending.h2_written) + frames.len()
                    > MAX_QUEUED_INFORMATIONAL
                {
                    tracing::debug!(status = %status, "1xx heads queued beyond the limit; not sent");
                    return;
                }
                pending.h2.push_back((*stream, frames));
            }
        }
        if let Some(w) = &pending.waker {
            w.wake_by_ref();
        }
    }

    /// Answers `expect: 100-continue` on HTTP/2 as the body is about to be read: hyper does so
    /// itself on HTTP/1.1. Sent once per request, and only if the request expects it.
    pub fn send_continue(&self) {
        if let Target::Http2 {
            expects_continue, ..
        } = &self.to
            && expects_continue.swap(false, Ordering::SeqCst)
        {
            self.send(StatusCode::CONTINUE, &HeaderMap::new());
        }
    }
}

/// 1xx bytes a connection may hold for a client that is not reading: an upstream sending hints
/// in a loop must not grow the proxy's memory without bound. Hints beyond it are dropped (they
/// are advisory; the final response still goes).
const MAX_QUEUED_INFORMATIONAL: usize = 64 * 1024;

/// 1xx heads waiting for the socket.
#[derive(Debug, Default)]
pub(super) struct PendingInformational {
    /// HTTP/1.1: the request the heads in `bytes` belong to.
    pub(super) request: u64,
    pub(super) bytes: Vec<u8>,
    pub(super) written: usize,
    /// HTTP/2: the frames of each 1xx, by stream, in the order sent; of the first, `h2_written`
    /// bytes are out.
    pub(super) h2: VecDeque<(u32, Vec<u8>)>,
    pub(super) h2_written: usize,
    /// The connection's task, to wake when heads arrive from an upstream's task.
    pub(super) waker: Option<Waker>,
}

fn http1_head(status: StatusCode, headers: &HeaderMap) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("Informational")
    )
    .into_bytes();
    for (name, value) in headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// A 1xx head as a HEADERS frame (and CONTINUATIONs past the smallest frame size a peer may
/// allow), END_STREAM unset. Fields are HPACK literals without indexing, names and values
/// unencoded by Huffman; `:status` names its static-table entry (index 8).
fn h2_headers_frames(stream: u32, status: StatusCode, headers: &HeaderMap) -> Option<Vec<u8>> {
    let mut block = Vec::with_capacity(64);
    hpack_int(&mut block, 4, 0x00, 8);
    hpack_string(&mut block, status.as_str().as_bytes());
    for (name, value) in headers {
        // Connection-specific fields make an HTTP/2 message malformed (RFC 9113 §8.2.2).
        if [
            header::CONNECTION,
            header::TE,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
        ]
        .contains(name)
            || name == "keep-alive"
            || name == "proxy-connection"
        {
            continue;
        }
        block.push(0x00);
        hpack_string(&mut block, name.as_str().as_bytes());
        hpack_string(&mut block, value.as_bytes());
    }
    if block.len() > MAX_INFORMATIONAL {
        return None;
    }
    let mut frames = Vec::with_capacity(block.len() + FRAME_HEAD);
    let chunks: Vec<&[u8]> = block.chunks(MIN_MAX_FRAME).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let flags = if i + 1 == chunks.len() {
            END_HEADERS
        } else {
            0
        };
        push_frame_head(&mut frames, chunk.len(), kind, flags, stream);
        frames.extend_from_slice(chunk);
    }
    Some(frames)
}

fn push_frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

/// An HPACK integer with an N-bit prefix (RFC 7541 §5.1); `first` holds the bits above it.
fn hpack_int(out: &mut Vec<u8>, prefix_bits: u8, first: u8, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// An HPACK string literal, not Huffman-coded (RFC 7541 §5.2).
fn hpack_string(out: &mut Vec<u8>, bytes: &[u8]) {
    hpack_int(out, 7, 0x00, bytes.len());
    out.extend_from_slice(bytes);
}

/// What the socket knows of a connection's HTTP/2 streams, from the frames both sides send.
#[derive(Debug, Default)]
pub(super) struct H2Streams {
    /// Streams the client opened that have had no final head, and were not reset.
    open: BTreeSet<u32>,
    /// The client lowered SETTINGS_HEADER_TABLE_SIZE: hyper's encoder must send the table size
    /// update at the start of its next header block, so none of ours may come first.
    table_size: TableSync,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum TableSync {
    #[default]
    Settled,
    /// Until hyper has acknowledged this many of the client's SETTINGS frames.
    AwaitAck(u64),
    /// Until hyper writes a header block.
    AwaitBlock,
}

impl H2Streams {
    fn opened(&mut self, stream: u32) {
        self.open.insert(stream);
        if self.open.len() > MAX_TRACKED {
            self.open.pop_first();
        }
    }

    fn closed(&mut self, stream: u32) {
        self.open.remove(&stream);
    }

    /// Whether a 1xx for `stream` may still be sent.
    pub(super) fn is_open(&self, stream: u32) -> bool {
        self.open.contains(&stream)
    }

    /// Whether a header block of ours may be written now.
    pub(super) fn may_encode(&self) -> bool {
        self.table_size == TableSync::Settled
    }
}

/// Follows the client's frames: notes streams opened and reset and table size changes, and adds
/// the stream id field to the header block of each new stream.
#[derive(Debug)]
pub(super) struct Inbound {
    preface_left: usize,
    state: InState,
    /// The highest stream id the client opened.
    last_stream: u32,
    /// The new stream whose header block is being read.
    block: Option<u32>,
    /// The stream id field goes after the current frame's payload, for this stream.
    add_after: Option<u32>,
    /// Non-ACK SETTINGS frames read.
    settings_read: u64,
    /// The largest header table size the client has allowed so far.
    table_allowed: u32,
}

#[derive(Debug, Clone, Copy)]
enum InState {
    Head,
    Payload {
        left: u32,
        kind: u8,
        flags: u8,
        /// Bytes of the payload already read.
        at: u32,
        /// SETTINGS: the identifier being read, and the value.
        setting: (u16, u32),
    },
}

/// Where scanning a read stopped.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Scanned {
    /// Every byte was scanned.
    All,
    /// Scanned up to here, where the stream id field (`field`) must be inserted.
    Insert(usize, Vec<u8>),
    /// Scanned up to here; the rest is part of a frame head, which may still change: held
    /// back and scanned again with the next read.
    Hold(usize),
}

impl Default for Inbound {
    fn default() -> Self {
        Inbound {
            preface_left: PREFACE_LEN,
            state: InState::Head,
            last_stream: 0,
            block: None,
            add_after: None,
            settings_read: 0,
            table_allowed: INITIAL_TABLE_SIZE,
        }
    }
}

impl Inbound {
    /// Scans bytes read from the client, in order, changing them where the stream id field is
    /// added. Stops early where bytes must be inserted or held back.
    pub(super) fn scan(&mut self, bytes: &mut [u8], streams: &mut H2Streams) -> Scanned {
        let mut i = self.preface_left.min(bytes.len());
        self.preface_left -= i;
        while i < bytes.len() {
            match self.state {
                InState::Head => {
                    if bytes.len() - i < FRAME_HEAD {
                        return Scanned::Hold(i);
                    }
                    let head = &mut bytes[i..i + FRAME_HEAD];
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
                    let kind = head[3];
                    let flags = head[4];
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    self.on_frame(kind, flags, stream, streams);
                    if self.add_after.is_some() {
                        // The block now ends with the frame of ours that follows this one.
                        head[4] &= !END_HEADERS;
                    }
                    i += FRAME_HEAD;
                    self.state = InState::Payload {
                        left: len,
                        kind,
                        flags,
                        at: 0,
                        setting: (0, 0),
                    };
                }
                InState::Payload {
                    mut left,
                    kind,
                    flags,
                    mut at,
                    mut setting,
                } => {
                    let n = (left as usize).min(bytes.len() - i);
                    if kind == SETTINGS && flags & ACK == 0 {
                        for &b in &bytes[i..i + n] {
                            match at % 6 {
                                0 => setting = (u16::from(b) << 8, 0),
                                1 => setting.0 |= u16::from(b),
                                k => {
                                    setting.1 = setting.1 << 8 | u32::from(b);
                                    if k == 5 && setting.0 == SETTINGS_HEADER_TABLE_SIZE {
                                        self.table_size_allowed(setting.1, streams);
                                    }
                                }
                            }
                            at += 1;
                        }
                    }
                    i += n;
                    left -= n as u32;
                    if left > 0 {
                        self.state = InState::Payload {
                            left,
                            kind,
                            flags,
                            at,
                            setting,
                        };
                        continue;
                    }
                    self.state = InState::Head;
                    if let Some(stream) = self.add_after.take() {
                        return Scanned::Insert(i, stream_id_field(stream));
                    }
                }
            }
        }
        // A frame with an empty payload may have ended exactly here.
        if let InState::Payload { left: 0, .. } = self.state {
            self.state = InState::Head;
        }
        if let (InState::Head, Some(stream)) = (self.state, self.add_after) {
            self.add_after = None;
            return Scanned::Insert(bytes.len(), stream_id_field(stream));
        }
        Scanned::All
    }

    fn on_frame(&mut self, kind: u8, flags: u8, stream: u32, streams: &mut H2Streams) {
        match kind {
            HEADERS if stream % 2 == 1 && stream > self.last_stream => {
                self.last_stream = stream;
                streams.opened(stream);
                self.block = Some(stream);
            }
            CONTINUATION if self.block == Some(stream) => {}
            RST_STREAM => streams.closed(stream),
            SETTINGS if flags & ACK == 0 => self.settings_read += 1,
            _ => {}
        }
        // A frame other than the block's CONTINUATION ends the block (the client broke the
        // protocol, which hyper answers by closing the connection).
        if !(kind == HEADERS || kind == CONTINUATION) || self.block != Some(stream) {
            self.block = None;
        }
        if flags & END_HEADERS != 0
            && let Some(stream) = self.block.take()
        {
            self.add_after = Some(stream);
        }
    }

    /// The client set SETTINGS_HEADER_TABLE_SIZE. A decoder may insist on a table size update
    /// first thing after it lowered the size (nghttp2 does), which hyper's encoder sends at the
    /// start of its first header block after acknowledging the SETTINGS: ours wait for it. A
    /// raise needs no update, so 1xx heads are not held up by browsers, which raise it.
    fn table_size_allowed(&mut self, size: u32, streams: &mut H2Streams) {
        if size < self.table_allowed {
            streams.table_size = TableSync::AwaitAck(self.settings_read);
        }
        self.table_allowed = self.table_allowed.max(size);
    }
}

/// The stream id field, as a CONTINUATION frame that ends the header block.
fn stream_id_field(stream: u32) -> Vec<u8> {
    // The id in decimal, without a String: this runs for every request.
    let mut digits = [0u8; 10];
    let mut start = digits.len();
    let mut n = stream;
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let value = &digits[start..];
    let len = 3 + STREAM_ID_NAME.len() + value.len();
    let mut frame = Vec::with_capacity(FRAME_HEAD + len);
    push_frame_head(&mut frame, len, CONTINUATION, END_HEADERS, stream);
    frame.push(0x00);
    hpack_string(&mut frame, STREAM_ID_NAME.as_bytes());
    hpack_string(&mut frame, value);
    frame
}

/// Follows hyper's frames as they reach the socket, to know where a frame of ours may go and
/// which streams have had their final head.
#[derive(Debug, Default)]
pub(super) struct Outbound {
    /// Bytes of the current frame head seen so far.
    head: [u8; FRAME_HEAD],
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    left: u32,
    /// A header block is open: the frames until END_HEADERS are its CONTINUATIONs.
    in_block: bool,
    /// SETTINGS ACKs written.
    acks: u64,
}

impl Outbound {
    /// Whether hyper's output is between frames, outside any header block.
    pub(super) fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.left == 0 && !self.in_block
    }

    /// Follows bytes of hyper's that went out.
    pub(super) fn written(&mut self, mut bytes: &[u8], streams: &mut H2Streams) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = (self.left as usize).min(bytes.len());
                self.left -= n as u32;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEAD - self.head_len).min(bytes.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            self.head_len += n;
            bytes = &bytes[n..];
            if self.head_len == FRAME_HEAD {
                self.head_len = 0;
                let h = self.head;
                self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                self.on_frame(h[3], h[4], stream, streams);
            }
        }
    }

    fn on_frame(&mut self, kind: u8, flags: u8, stream: u32, streams: &mut H2Streams) {
        match kind {
            // hyper sends no 1xx: any head it writes is the final one (or trailers).
            HEADERS | PUSH_PROMISE => {
                streams.closed(stream);
                if streams.table_size == TableSync::AwaitBlock {
                    streams.table_size = TableSync::Settled;
                }
                self.in_block = flags & END_HEADERS == 0;
            }
            CONTINUATION => self.in_block = flags & END_HEADERS == 0,
            RST_STREAM => streams.closed(stream),
            SETTINGS if flags & ACK != 0 => {
                self.acks += 1;
                if let TableSync::AwaitAck(n) = streams.table_size
                    && self.acks >= n
                {
                    streams.table_size = TableSync::AwaitBlock;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        push_frame_head(&mut f, payload.len(), kind, flags, stream);
        f.extend_from_slice(payload);
        f
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// Feeds `input` to a scanner in pieces of `step` bytes, as the socket does: held bytes are
    /// read again with the next piece, inserted bytes go where they are asked for. Returns
    /// what hyper would read.
    fn scan_all(input: &[u8], step: usize, streams: &mut H2Streams) -> Vec<u8> {
        let mut scanner = Inbound::default();
        let mut out = Vec::new();
        let mut held: Vec<u8> = Vec::new();
        for piece in input.chunks(step) {
            let mut bytes = std::mem::take(&mut held);
            bytes.extend_from_slice(piece);
            let mut from = 0;
            loop {
                match scanner.scan(&mut bytes[from..], streams) {
                    Scanned::All => {
                        out.extend_from_slice(&bytes[from..]);
                        break;
                    }
                    Scanned::Insert(at, field) => {
                        out.extend_from_slice(&bytes[from..from + at]);
                        out.extend_from_slice(&field);
                        from += at;
                    }
                    Scanned::Hold(at) => {
                        out.extend_from_slice(&bytes[from..from + at]);
                        held = bytes[from + at..].to_vec();
                        break;
                    }
                }
            }
        }
        out.extend_from_slice(&held);
        out
    }

    #[test]
    fn the_stream_id_ends_each_new_streams_header_block_whatever_the_reads() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(SETTINGS, 0, 0, &[]));
        // Stream 1: HEADERS + CONTINUATION, then DATA; stream 3: one HEADERS; then trailers
        // on stream 1, which get nothing.
        input.extend(frame(HEADERS, 0, 1, b"abc"));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b"de"));
        input.extend(frame(0x0, 0, 1, b"body"));
        input.extend(frame(HEADERS, END_HEADERS, 3, b"xyz"));
        input.extend(frame(HEADERS, END_HEADERS | 0x1, 1, b"tr"));
        let mut want = PREFACE.to_vec();
        want.extend(frame(SETTINGS, 0, 0, &[]));
        want.extend(frame(HEADERS, 0, 1, b"abc"));
        want.extend(frame(CONTINUATION, 0, 1, b"de"));
        want.extend(stream_id_field(1));
        want.extend(frame(0x0, 0, 1, b"body"));
        want.extend(frame(HEADERS, 0, 3, b"xyz"));
        want.extend(stream_id_field(3));
        want.extend(frame(HEADERS, END_HEADERS | 0x1, 1, b"tr"));
        for step in [1, 2, 5, 9, 10, 17, 1000] {
            let mut streams = H2Streams::default();
            assert_eq!(
                scan_all(&input, step, &mut streams),
                want,
                "reads of {step}"
            );
            assert!(streams.is_open(1) && streams.is_open(3), "reads of {step}");
        }
    }

    #[test]
    fn the_field_decodes_as_a_literal_that_is_not_indexed() {
        assert!(stream_id_field(2_147_483_647).ends_with(b"\x0a2147483647"));
        let field = stream_id_field(7);
        let block = &field[FRAME_HEAD..];
        let mut want = vec![0x00, STREAM_ID_HEADER.as_str().len() as u8];
        want.extend_from_slice(STREAM_ID_HEADER.as_str().as_bytes());
        want.extend_from_slice(&[1, b'7']);
        assert_eq!(block, want);
        assert_eq!(
            &field[..FRAME_HEAD],
            &[0, 0, want.len() as u8, 9, 4, 0, 0, 0, 7]
        );
    }

    #[test]
    fn client_resets_close_streams_and_a_lowered_table_size_waits_for_hypers_block() {
        let mut streams = H2Streams::default();
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, b"a"));
        input.extend(frame(HEADERS, END_HEADERS, 3, b"a"));
        input.extend(frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]));
        // Raising the table size holds nothing up; lowering it does.
        input.extend(frame(SETTINGS, 0, 0, &[0, 1, 0, 1, 0, 0]));
        scan_all(&input, 4, &mut streams);
        assert!(!streams.is_open(1) && streams.is_open(3));
        assert!(streams.may_encode());
        let mut scanner = Inbound {
            preface_left: 0,
            ..Inbound::default()
        };
        let mut lower = frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff, 0, 1, 0, 0, 0, 0]);
        assert_eq!(scanner.scan(&mut lower, &mut streams), Scanned::All);
        assert!(!streams.may_encode());

        let mut out = Outbound::default();
        // A HEADERS written before the ACK was encoded under the old size.
        out.written(&frame(HEADERS, END_HEADERS, 3, b"x"), &mut streams);
        out.written(&frame(SETTINGS, ACK, 0, &[]), &mut streams);
        assert!(!streams.may_encode());
        out.written(&frame(HEADERS, END_HEADERS, 5, b"x"), &mut streams);
        assert!(streams.may_encode());
    }

    #[test]
    fn boundaries_and_final_heads_are_followed_across_partial_writes() {
        let mut streams = H2Streams::default();
        streams.opened(1);
        streams.opened(3);
        let mut bytes = frame(HEADERS, 0, 1, b"head");
        let block_end = bytes.len();
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, b"more"));
        bytes.extend(frame(0x0, 0, 3, b"data"));
        let mut out = Outbound::default();
        let mut boundaries = Vec::new();
        for (i, b) in bytes.iter().enumerate() {
            out.written(std::slice::from_ref(b), &mut streams);
            if out.at_boundary() {
                boundaries.push(i + 1);
            }
        }
        // Not between the HEADERS and its CONTINUATION, nor inside any frame.
        assert_eq!(boundaries, [block_end + 9 + 4, bytes.len()]);
        assert!(!streams.is_open(1), "a final head was sent");
        assert!(streams.is_open(3), "DATA is not a head");
        out.written(&frame(RST_STREAM, 0, 3, &[0, 0, 0, 8]), &mut streams);
        assert!(!streams.is_open(3), "reset by hyper");
    }

    #[test]
    fn informational_frames_are_headers_without_end_stream() {
        let mut h = HeaderMap::new();
        h.insert("link", "</a.css>; rel=preload".parse().unwrap());
        h.insert(header::CONNECTION, "close".parse().unwrap());
        let frames = h2_headers_frames(5, StatusCode::EARLY_HINTS, &h).unwrap();
        assert_eq!(frames[3], HEADERS);
        assert_eq!(frames[4], END_HEADERS);
        assert_eq!(&frames[5..9], &[0, 0, 0, 5]);
        let block = &frames[FRAME_HEAD..];
        assert_eq!(&block[..5], &[0x08, 3, b'1', b'0', b'3']);
        assert_eq!(block[5], 0x00);
        assert!(!block.windows(10).any(|w| w == b"connection"));

        // A head past the smallest frame size is split into CONTINUATIONs.
        let mut big = HeaderMap::new();
        big.insert("link", "x".repeat(20_000).parse().unwrap());
        let frames = h2_headers_frames(5, StatusCode::EARLY_HINTS, &big).unwrap();
        assert_eq!(frames[4], 0, "the HEADERS frame does not end the block");
        let second = FRAME_HEAD + MIN_MAX_FRAME;
        assert_eq!(
            (frames[second + 3], frames[second + 4]),
            (CONTINUATION, END_HEADERS)
        );

        let mut huge = HeaderMap::new();
        huge.insert("link", "x".repeat(MAX_INFORMATIONAL).parse().unwrap());
        assert_eq!(h2_headers_frames(5, StatusCode::EARLY_HINTS, &huge), None);
    }

    #[test]
    fn hpack_integers_follow_rfc_7541() {
        // RFC 7541 C.1.2: 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        hpack_int(&mut out, 5, 0, 1337);
        assert_eq!(out, [31, 154, 10]);
        let mut out = Vec::new();
        hpack_int(&mut out, 7, 0, 127);
        assert_eq!(out, [127, 0]);
    }
}
