//! TLS passthrough: read the ClientHello's server name without terminating TLS, pick a cluster by
//! it, then proxy the bytes (the ClientHello included) untouched.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{io::AsyncReadExt, net::TcpStream};

use super::tcp;
use crate::{
    config::{domains::DomainTable, model::SniProxy},
    telemetry::ListenerTelemetry,
    upstream::Cluster,
};

/// Largest ClientHello we wait for (it may span several TLS records).
pub const MAX_HELLO: usize = 64 * 1024;
/// Time allowed for a client to send its ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Server names → clusters: exact names, then the longest `*.` suffix, then `*` or the default.
#[derive(Debug)]
pub struct SniTable {
    names: DomainTable<Arc<Cluster>>,
    default: Option<Arc<Cluster>>,
    pub idle_timeout: Duration,
}

impl SniTable {
    pub fn build(config: &SniProxy, cluster: impl Fn(&str) -> Option<Arc<Cluster>>) -> Self {
        let names = config.routes.iter().flat_map(|route| {
            let c = cluster(&route.cluster);
            route
                .server_names
                .iter()
                .filter_map(move |n| Some((n.clone(), c.clone()?)))
        });
        SniTable {
            names: DomainTable::build(names.collect::<Vec<_>>()),
            default: config.default_cluster.as_deref().and_then(&cluster),
            idle_timeout: config.idle_timeout,
        }
    }

    /// The cluster for a server name (`None`: the ClientHello had none).
    pub fn lookup(&self, server_name: Option<&str>) -> Option<&Arc<Cluster>> {
        match server_name {
            Some(name) => self.names.lookup(name),
            None => self.names.any(),
        }
        .or(self.default.as_ref())
    }
}

pub async fn serve(
    mut downstream: TcpStream,
    peer: SocketAddr,
    table: Arc<SniTable>,
    listener: &ListenerTelemetry,
) {
    let mut buf = Vec::with_capacity(1024);
    let hello =
        tokio::time::timeout(HELLO_TIMEOUT, read_client_hello(&mut downstream, &mut buf)).await;
    let server_name = match hello {
        Ok(Ok(name)) => name,
        Ok(Err(reason)) => {
            tracing::debug!(%peer, %reason, "not a TLS ClientHello; closing");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no ClientHello in time; closing");
            return;
        }
    };
    let Some(cluster) = table.lookup(server_name.as_deref()).cloned() else {
        tracing::debug!(%peer, server_name = ?server_name, "no cluster for this server name; closing");
        return;
    };
    let _ = downstream.set_nodelay(true);
    tcp::serve(
        downstream,
        peer,
        cluster,
        table.idle_timeout,
        &buf,
        listener,
    )
    .await;
}

/// Reads from `stream` into `buf` until a whole ClientHello is there, and returns its server name.
async fn read_client_hello(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<String>, String> {
    let mut parser = HelloParser::default();
    loop {
        match parser.advance(buf) {
            Parse::Done(name) => return Ok(name),
            Parse::Invalid(reason) => return Err(reason.into()),
            Parse::NeedMore => {}
        }
        if buf.len() >= MAX_HELLO {
            return Err("ClientHello too large".into());
        }
        let mut chunk = [0u8; 4096];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before a whole ClientHello".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    Done(Option<String>),
    NeedMore,
    Invalid(&'static str),
}

/// Parses the TLS records at the start of `data` as far as the ClientHello's `server_name`
/// extension (RFC 8446 §4.1.2, RFC 6066 §3).
pub fn parse_client_hello(data: &[u8]) -> Parse {
    HelloParser::default().advance(data)
}

/// A ClientHello parse that keeps its place between reads: each complete record is reassembled
/// once, and the hello itself is parsed once it is whole. Re-parsing from the start on every read
/// made a slowly dripped 64 KB hello cost quadratic time.
#[derive(Debug, Default)]
pub struct HelloParser {
    /// Bytes of the input consumed as whole records.
    consumed: usize,
    /// The handshake message so far, from the records' payloads.
    handshake: Vec<u8>,
    /// Bytes looked at so far, for tests and fuzzing to bound the work.
    pub examined: usize,
}

impl HelloParser {
    /// Continues with `data`, which holds every byte read so far (what an earlier call saw and
    /// possibly more).
    pub fn advance(&mut self, data: &[u8]) -> Parse {
        loop {
            let rest = data.get(self.consumed..).unwrap_or_default();
            if rest.len() < 5 {
                return Parse::NeedMore;
            }
            self.examined += 5;
            if rest[0] != 0x16 {
                return Parse::Invalid("not a TLS handshake record");
            }
            if rest[1] != 0x03 {
                return Parse::Invalid("unknown TLS record version");
            }
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            if rest.len() < 5 + len {
                return Parse::NeedMore;
            }
            self.handshake.extend_from_slice(&rest[5..5 + len]);
            self.examined += len;
            self.consumed += 5 + len;
            if self.handshake.len() >= 4 {
                let h = &self.handshake;
                if h[0] != 0x01 {
                    return Parse::Invalid("first handshake message is not a ClientHello");
                }
                let body_len =
                    (usize::from(h[1]) << 16) | (usize::from(h[2]) << 8) | usize::from(h[3]);
                if h.len() >= 4 + body_len {
                    self.examined += body_len;
                    return match server_name(&h[4..4 + body_len]) {
                        Some(name) => Parse::Done(name),
                        None => Parse::Invalid("malformed ClientHello"),
                    };
                }
            }
        }
    }
}

impl HelloParser {
    /// The ALPN protocols the ClientHello offers (RFC 7301), in its order, once
    /// [`HelloParser::advance`] returned `Done`; empty when it offers none (or before).
    pub fn alpn_protocols(&self) -> Vec<&[u8]> {
        let h = &self.handshake;
        if h.len() < 4 {
            return Vec::new();
        }
        let body_len = (usize::from(h[1]) << 16) | (usize::from(h[2]) << 8) | usize::from(h[3]);
        h.get(4..4 + body_len)
            .and_then(alpn_protocols)
            .unwrap_or_default()
    }
}

/// The extensions block of a ClientHello body; `Some(None)` when it has none, `None` when
/// malformed.
fn extensions(hello: &[u8]) -> Option<Option<Reader<'_>>> {
    let mut r = Reader(hello);
    r.take(2 + 32)?; // legacy_version, random
    let session = r.u8()?;
    r.take(usize::from(session))?;
    let suites = r.u16()?;
    r.take(usize::from(suites))?;
    let compression = r.u8()?;
    r.take(usize::from(compression))?;
    if r.0.is_empty() {
        return Some(None);
    }
    let ext_len = r.u16()?;
    Some(Some(Reader(r.take(usize::from(ext_len))?)))
}

/// The `application_layer_protocol_negotiation` extension's list; `None`: malformed.
fn alpn_protocols(hello: &[u8]) -> Option<Vec<&[u8]>> {
    let Some(mut exts) = extensions(hello)? else {
        return Some(Vec::new());
    };
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = exts.u16()?;
        let data = exts.take(usize::from(len))?;
        if kind != 16 {
            continue;
        }
        let mut list = Reader(data);
        let list_len = list.u16()?;
        let mut names = Reader(list.take(usize::from(list_len))?);
        let mut out = Vec::new();
        while !names.0.is_empty() {
            let len = names.u8()?;
            out.push(names.take(usize::from(len))?);
        }
        return Some(out);
    }
    Some(Vec::new())
}

/// `Some(None)`: a well-formed hello without a server name; `None`: malformed.
fn server_name(hello: &[u8]) -> Option<Option<String>> {
    let Some(mut exts) = extensions(hello)? else {
        return Some(None);
    };
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = exts.u16()?;
        let data = exts.take(usize::from(len))?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader(data);
        let list_len = list.u16()?;
        let mut names = Reader(list.take(usize::from(list_len))?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let len = names.u16()?;
            let name = names.take(usize::from(len))?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return Some(Some(name.to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with the given server name, split into records of `record_size`.
    fn hello(name: Option<&str>, record_size: usize) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        if let Some(n) = name {
            let mut sni = Vec::new();
            sni.push(0);
            sni.extend_from_slice(&(n.len() as u16).to_be_bytes());
            sni.extend_from_slice(n.as_bytes());
            let mut list = (sni.len() as u16).to_be_bytes().to_vec();
            list.extend_from_slice(&sni);
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
            exts.extend_from_slice(&list);
        }
        exts.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]); // supported_versions
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
        hs.extend_from_slice(&body);
        let mut out = Vec::new();
        for chunk in hs.chunks(record_size) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// What rustls sends first when it offers `alpn`.
    fn rustls_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            "mesh.example".try_into().unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_the_offered_alpn_protocols() {
        for offer in [
            &[b"trellis-mesh/1+h2".as_slice()][..],
            &[b"h2".as_slice(), b"http/1.1".as_slice()][..],
            &[][..],
        ] {
            let h = rustls_hello(offer);
            let mut parser = HelloParser::default();
            assert_eq!(parser.advance(&h), Parse::Done(Some("mesh.example".into())));
            assert_eq!(parser.alpn_protocols(), offer);
        }
        // Across records, and nothing before the hello is whole.
        let mut parser = HelloParser::default();
        let h = hello(Some("a.example"), 7);
        assert_eq!(parser.advance(&h[..20]), Parse::NeedMore);
        assert!(parser.alpn_protocols().is_empty());
        assert_eq!(parser.advance(&h), Parse::Done(Some("a.example".into())));
        assert!(parser.alpn_protocols().is_empty());
    }

    #[test]
    fn finds_server_name_in_one_or_many_records() {
        for size in [16384, 20, 1] {
            let h = hello(Some("API.example.com"), size);
            assert_eq!(
                parse_client_hello(&h),
                Parse::Done(Some("api.example.com".into()))
            );
            assert_eq!(parse_client_hello(&h[..h.len() - 1]), Parse::NeedMore);
        }
        assert_eq!(parse_client_hello(&hello(None, 16384)), Parse::Done(None));
    }

    /// A ClientHello of about `size` bytes (a padding extension makes up the bulk).
    fn big_hello(size: usize) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
        let pad = size - 200;
        let mut exts = vec![0, 21];
        exts.extend_from_slice(&(pad as u16).to_be_bytes());
        exts.resize(exts.len() + pad, 0);
        let name = b"big.example.com";
        exts.extend_from_slice(&[
            0,
            0,
            0,
            (name.len() + 5) as u8,
            0,
            (name.len() + 3) as u8,
            0,
        ]);
        exts.extend_from_slice(&(name.len() as u16).to_be_bytes());
        exts.extend_from_slice(name);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
        hs.extend_from_slice(&body);
        let mut out = Vec::new();
        for chunk in hs.chunks(16384) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn a_dripped_hello_is_examined_a_bounded_number_of_times() {
        let h = big_hello(61 * 1024);
        assert!(h.len() > 60 * 1024 && h.len() < MAX_HELLO, "{}", h.len());
        let mut parser = HelloParser::default();
        let mut got = Parse::NeedMore;
        for end in (7..=h.len()).step_by(7).chain([h.len()]) {
            got = parser.advance(&h[..end]);
            if got != Parse::NeedMore {
                break;
            }
        }
        assert_eq!(got, Parse::Done(Some("big.example.com".into())));
        assert!(
            parser.examined < 3 * h.len(),
            "examined {} bytes for a {}-byte hello",
            parser.examined,
            h.len()
        );
    }

    #[test]
    fn rejects_what_is_not_tls() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n\r\n"),
            Parse::Invalid("not a TLS handshake record")
        );
        let mut h = hello(Some("a"), 16384);
        h[5] = 2; // ServerHello
        assert_eq!(
            parse_client_hello(&h),
            Parse::Invalid("first handshake message is not a ClientHello")
        );
        // Lengths that overrun are malformed, not a panic.
        let mut h = hello(Some("abc"), 16384);
        let n = h.len();
        h[n - 20] = 0xff;
        assert!(matches!(
            parse_client_hello(&h),
            Parse::Invalid(_) | Parse::Done(_)
        ));
    }
}
