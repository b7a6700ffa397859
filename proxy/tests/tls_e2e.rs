//! TLS termination end to end: real handshakes on 127.0.0.1 against certificates generated here
//! with rcgen, through the proxy to real upstreams.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use common::{echo_upstream, eventually, metric, parse_exposition, seen, tcp_echo_upstream};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use trellis_proxy::{Proxy, config::validate};

const LIMIT: Duration = Duration::from_secs(10);

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn leaf(&self, names: &[&str], cn: &str, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    fn server(&self, names: &[&str]) -> Leaf {
        self.leaf(names, names[0], ExtendedKeyUsagePurpose::ServerAuth)
    }
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Leaf {
    /// Writes `NAME.crt` and `NAME.key` into `dir`; returns the YAML source fields.
    fn write(&self, dir: &Path, name: &str) -> String {
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, &self.cert_pem).unwrap();
        std::fs::write(&k, &self.key_pem).unwrap();
        format!("cert_file: {:?}, key_file: {:?}", c, k)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Accepts any server certificate, so a test can look at which one it was given.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client trusting `ca` (or anything, with `None`), offering `alpn`, presenting `client`.
fn connector(ca: Option<&Ca>, alpn: &[&str], client: Option<&Leaf>) -> TlsConnector {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.issuer.der().clone()).unwrap();
            builder.with_root_certificates(roots)
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider()))),
    };
    let mut config = match client {
        Some(l) => builder
            .with_client_auth_cert(
                vec![l.der.clone()],
                PrivateKeyDer::from_pem_slice(l.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn connect(
    addr: SocketAddr,
    connector: &TlsConnector,
    server_name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    tokio::time::timeout(LIMIT, connector.connect(name, tcp))
        .await
        .expect("handshake within 10s")
}

/// The leaf certificate the server presented.
fn served(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// An HTTP/1.1 or HTTP/2 connection over `tls`, as ALPN chose.
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn http(tls: TlsStream<TcpStream>) -> Conn {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    if h2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        Conn::H2(send)
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        Conn::H1(send)
    }
}

impl Conn {
    /// GET `path` with extra headers; the status and body, or the error.
    async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Bytes), String> {
        self.exchange(path, headers).await.map(|(s, _, b)| (s, b))
    }

    /// GET `path`: the status, the response's HTTP version and the body.
    async fn exchange(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, http::Version, Bytes), String> {
        let mut req = Request::get(format!("https://app.example.test{path}"));
        if matches!(self, Conn::H1(_)) {
            req = Request::get(path).header("host", "app.example.test");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::default()).unwrap();
        let resp = tokio::time::timeout(LIMIT, async {
            match self {
                Conn::H1(s) => s.send_request(req).await,
                Conn::H2(s) => s.send_request(req).await,
            }
        })
        .await
        .expect("answer within 10s")
        .map_err(|e| e.to_string())?;
        let status = resp.status();
        let version = resp.version();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, version, body))
    }
}

/// One HTTP listener named `listener` terminating TLS with `tls` (YAML flow mapping body, under
/// `tls:`), forwarding everything to `upstream`; extra top-level YAML in `extra`.
fn http_config(listener: &str, tls: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        r#"
listeners:
  - name: {listener}
    address: "127.0.0.1:0"
    tls:
{tls}
route_configs:
  - name: rc
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - forward: {{ cluster: up }}
clusters:
  - name: up
    endpoints: ["{upstream}"]
{extra}
"#
    )
}

async fn start(yaml: &str, listener: &str) -> (Arc<Proxy>, SocketAddr) {
    let config = validate::from_yaml(yaml).unwrap_or_else(|e| panic!("test config invalid: {e}"));
    let proxy = Proxy::new();
    proxy.apply(config).await.expect("config applies");
    let addr = proxy.listener_addr(listener).await.expect("listener bound");
    (proxy, addr)
}

fn samples(proxy: &Proxy) -> Vec<common::Sample> {
    let compiled = proxy.store().load();
    parse_exposition(&trellis_proxy::telemetry::render(compiled.as_deref(), true))
}

fn handshakes(proxy: &Proxy, listener: &str, outcome: &str) -> f64 {
    samples(proxy)
        .iter()
        .filter(|s| {
            s.name == "trellis_tls_handshakes_total"
                && s.labels.get("listener").map(String::as_str) == Some(listener)
                && s.labels.get("outcome").map(String::as_str) == Some(outcome)
        })
        .map(|s| s.value)
        .sum()
}

#[tokio::test]
async fn sni_picks_exact_then_wildcard_then_default() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let exact = ca.server(&["api.example.test"]);
    let wild = ca.server(&["*.example.test"]);
    let default = ca.server(&["default.test"]);
    let (up, _) = echo_upstream("up").await;
    let tls = format!(
        "      certificates:\n        - {{ server_names: [api.example.test], {} }}\n        - {{ server_names: [\"*.example.test\"], {} }}\n        - {{ {} }}",
        exact.write(dir.path(), "exact"),
        wild.write(dir.path(), "wild"),
        default.write(dir.path(), "default"),
    );
    let (_proxy, addr) = start(&http_config("sni", &tls, up, ""), "sni").await;
    let any = connector(None, &[], None);
    let cases: &[(&str, &CertificateDer<'_>)] = &[
        ("api.example.test", &exact.der),
        ("API.example.test", &exact.der),
        ("www.example.test", &wild.der),
        // One label deep only.
        ("a.b.example.test", &default.der),
        ("other.test", &default.der),
        // An IP address: rustls sends no server name.
        ("127.0.0.1", &default.der),
    ];
    for (name, want) in cases {
        let s = connect(addr, &any, name).await.expect("handshake");
        assert_eq!(&served(&s), *want, "server name {name}");
    }
}

#[tokio::test]
async fn unknown_server_name_refused_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let exact = ca.server(&["api.example.test"]);
    let (up, _) = echo_upstream("up").await;
    let tls = format!(
        "      unknown_server_name: refuse\n      certificates:\n        - {{ server_names: [api.example.test], {} }}",
        exact.write(dir.path(), "exact"),
    );
    let (proxy, addr) = start(&http_config("refusing", &tls, up, ""), "refusing").await;
    let client = connector(Some(&ca), &[], None);
    let s = connect(addr, &client, "api.example.test").await.unwrap();
    assert_eq!(served(&s), exact.der);
    let e = connect(addr, &client, "other.example.test")
        .await
        .expect_err("an unknown server name is refused");
    assert!(e.to_string().to_lowercase().contains("alert"), "{e}");
    let e = connect(addr, &client, "127.0.0.1")
        .await
        .expect_err("no server name is refused");
    assert!(e.to_string().to_lowercase().contains("alert"), "{e}");
    eventually(LIMIT, "two no_certificate handshakes counted", || async {
        handshakes(&proxy, "refusing", "no_certificate") == 2.0
    })
    .await;
    assert_eq!(handshakes(&proxy, "refusing", "success"), 1.0);
}

#[tokio::test]
async fn alpn_chooses_the_protocol_through_to_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let cert = ca.server(&["app.example.test"]);
    let (up, _) = echo_upstream("up").await;
    let tls = format!(
        "      certificates:\n        - {{ {} }}",
        cert.write(dir.path(), "app")
    );
    let (proxy, addr) = start(&http_config("alpn", &tls, up, ""), "alpn").await;
    for (offered, negotiated, version) in [
        (
            &["h2", "http/1.1"][..],
            Some(&b"h2"[..]),
            http::Version::HTTP_2,
        ),
        (
            &["http/1.1"][..],
            Some(&b"http/1.1"[..]),
            http::Version::HTTP_11,
        ),
        (&[][..], None, http::Version::HTTP_11),
    ] {
        let s = connect(
            addr,
            &connector(Some(&ca), offered, None),
            "app.example.test",
        )
        .await
        .unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), negotiated, "{offered:?}");
        let mut conn = http(s).await;
        let (status, spoken, body) = conn.exchange("/hello", &[]).await.expect("request");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(spoken, version, "{offered:?}");
        let seen = seen(&body);
        assert_eq!(
            seen.header("x-forwarded-proto"),
            Some("https"),
            "{offered:?}"
        );
        // The request reached the upstream, which speaks HTTP/1.1 whatever the client spoke.
        assert_eq!(seen.version, "HTTP/1.1");
    }
    let s = samples(&proxy);
    for (alpn, want) in [("h2", 1.0), ("http/1.1", 1.0), ("none", 1.0)] {
        let got = s
            .iter()
            .filter(|x| {
                x.name == "trellis_tls_handshakes_total"
                    && x.labels.get("listener").map(String::as_str) == Some("alpn")
                    && x.labels.get("alpn").map(String::as_str) == Some(alpn)
                    && x.labels.get("outcome").map(String::as_str) == Some("success")
            })
            .map(|x| x.value)
            .sum::<f64>();
        assert_eq!(got, want, "alpn {alpn}");
    }
    let expiry = metric(
        &s,
        "trellis_tls_certificate_expiry_seconds",
        &[("listener", "alpn"), ("name", "default")],
    )
    .expect("expiry gauge");
    assert!(expiry > 86_400.0 * 365.0, "{expiry}");
}

/// ALPN decides the protocol (RFC 9113 §3.2): after `http/1.1` (or no ALPN) the HTTP/2 preface
/// is not answered as HTTP/2, and after `h2` an HTTP/1.1 request is not answered as HTTP/1.1.
#[tokio::test]
async fn the_protocol_alpn_chose_is_not_sniffed_away() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let cert = ca.server(&["app.example.test"]);
    let (up, _) = echo_upstream("up").await;
    let tls = format!(
        "      certificates:\n        - {{ {} }}",
        cert.write(dir.path(), "app")
    );
    let (_proxy, addr) = start(&http_config("nosniff", &tls, up, ""), "nosniff").await;
    // The preface with an empty SETTINGS frame: an HTTP/2 server answers with its SETTINGS.
    let mut h2_hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let h1_request = b"GET /hello HTTP/1.1\r\nhost: app.example.test\r\n\r\n".to_vec();
    for (offered, send, must_not_start) in [
        (&["http/1.1"][..], &h2_hello, &[0u8, 0][..]),
        (&[][..], &h2_hello, &[0u8, 0][..]),
        (&["h2"][..], &h1_request, &b"HTTP/1.1"[..]),
    ] {
        let mut s = connect(
            addr,
            &connector(Some(&ca), offered, None),
            "app.example.test",
        )
        .await
        .unwrap();
        s.write_all(send).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(LIMIT, s.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "{offered:?}: the connection was not closed");
        assert!(
            !got.starts_with(must_not_start),
            "{offered:?}: answered in the protocol ALPN did not choose: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
}

#[tokio::test]
async fn client_certificates_required_optional_absent_untrusted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server ca");
    let clients = Ca::new("client ca");
    let stranger_ca = Ca::new("stranger ca");
    let cert = ca.server(&["app.example.test"]);
    let client = clients.leaf(
        &["client.test"],
        "client one",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let stranger = stranger_ca.leaf(
        &["client.test"],
        "stranger",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let ca_file = dir.path().join("clients.pem");
    std::fs::write(&ca_file, clients.pem()).unwrap();
    let source = cert.write(dir.path(), "app");
    let (up, _) = echo_upstream("up").await;
    let spoof = ("x-forwarded-client-cert", "Hash=00;Subject=\"CN=admin\"");
    let want_xfcc = trellis_proxy::tls::server::forwarded_client_cert(&client.der).unwrap();

    for mode in ["require", "optional"] {
        let listener = format!("mtls-{mode}");
        let tls = format!(
            "      certificates:\n        - {{ {source} }}\n      client_certificate: {{ mode: {mode}, ca_file: {ca_file:?} }}"
        );
        let (proxy, addr) = start(&http_config(&listener, &tls, up, ""), &listener).await;

        // A trusted certificate: its XFCC is forwarded, the client's own is not.
        let s = connect(
            addr,
            &connector(Some(&ca), &["h2"], Some(&client)),
            "app.example.test",
        )
        .await
        .unwrap();
        let (status, body) = http(s).await.get("/", &[spoof]).await.expect("request");
        assert_eq!(status, StatusCode::OK, "{mode}");
        let got = seen(&body);
        assert_eq!(
            got.header_all("x-forwarded-client-cert"),
            [want_xfcc.to_str().unwrap()],
            "{mode}"
        );
        assert!(
            want_xfcc
                .to_str()
                .unwrap()
                .contains("Subject=\"CN=client one\""),
            "{want_xfcc:?}"
        );

        // No certificate: refused under require; under optional served, spoofed XFCC stripped.
        let absent = connect(addr, &connector(Some(&ca), &[], None), "app.example.test").await;
        let answered = match absent {
            Ok(s) => http(s).await.get("/", &[spoof]).await,
            Err(e) => Err(e.to_string()),
        };
        match mode {
            "require" => {
                assert!(answered.is_err(), "{answered:?}");
            }
            _ => {
                let (status, body) = answered.expect("optional: served without a certificate");
                assert_eq!(status, StatusCode::OK);
                assert_eq!(seen(&body).header("x-forwarded-client-cert"), None);
            }
        }

        // A certificate no trusted CA signed: refused in both modes.
        let untrusted = connect(
            addr,
            &connector(Some(&ca), &[], Some(&stranger)),
            "app.example.test",
        )
        .await;
        let answered = match untrusted {
            Ok(s) => http(s).await.get("/", &[]).await,
            Err(e) => Err(e.to_string()),
        };
        assert!(answered.is_err(), "{mode}: {answered:?}");
        let refused = if mode == "require" { 2.0 } else { 1.0 };
        eventually(LIMIT, "bad client certificates counted", || async {
            handshakes(&proxy, &listener, "bad_client_certificate") == refused
        })
        .await;
    }
}

#[tokio::test]
async fn routes_match_the_verified_client_certificate_not_a_claimed_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server ca");
    let clients = Ca::new("client ca");
    let cert = ca.server(&["app.example.test"]);
    let client = clients.leaf(
        &["client.test"],
        "client one",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let ca_file = dir.path().join("clients.pem");
    std::fs::write(&ca_file, clients.pem()).unwrap();
    let yaml = format!(
        r#"
listeners:
  - name: by-client
    address: "127.0.0.1:0"
    tls:
      certificates:
        - {{ {} }}
      client_certificate: {{ mode: optional, ca_file: {ca_file:?} }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match:
              headers: [{{ name: x-forwarded-client-cert, regex: '.*Subject="CN=client one".*' }}]
            direct_response: {{ status: 200, body: client one }}
          - direct_response: {{ status: 403, body: who are you }}
"#,
        cert.write(dir.path(), "app")
    );
    let (_proxy, addr) = start(&yaml, "by-client").await;
    let with = connect(
        addr,
        &connector(Some(&ca), &[], Some(&client)),
        "app.example.test",
    )
    .await
    .unwrap();
    let (status, body) = http(with).await.get("/", &[]).await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"client one"[..]));
    let without = connect(addr, &connector(Some(&ca), &[], None), "app.example.test")
        .await
        .unwrap();
    let claimed = (
        "x-forwarded-client-cert",
        "Hash=00;Subject=\"CN=client one\"",
    );
    let (status, _) = http(without).await.get("/", &[claimed]).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// Replaces `dst` with `src`'s bytes by a rename, as cert-manager and the kubelet do.
fn rename_over(dir: &Path, dst: &str, bytes: &str) {
    let tmp: PathBuf = dir.join(format!(".{dst}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(dst)).unwrap();
}

fn reloads(proxy: &Proxy, listener: &str, outcome: &str) -> f64 {
    metric(
        &samples(proxy),
        "trellis_tls_certificate_reloads_total",
        &[("listener", listener), ("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn a_certificate_rotated_on_disk_serves_new_handshakes_and_old_connections_live_on() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let first = ca.server(&["app.example.test"]);
    let second = ca.server(&["app.example.test"]);
    let (up, _) = echo_upstream("up").await;
    let tls = format!(
        "      certificates:\n        - {{ {} }}",
        first.write(dir.path(), "app")
    );
    let (proxy, addr) = start(&http_config("rotate", &tls, up, ""), "rotate").await;
    let client = connector(Some(&ca), &[], None);
    let s = connect(addr, &client, "app.example.test").await.unwrap();
    assert_eq!(served(&s), first.der);
    let mut before = http(s).await;
    before.get("/", &[]).await.expect("first request");

    rename_over(dir.path(), "app.crt", &second.cert_pem);
    rename_over(dir.path(), "app.key", &second.key_pem);
    eventually(LIMIT, "the new certificate served", || async {
        let s = connect(addr, &client, "app.example.test").await.unwrap();
        served(&s) == second.der
    })
    .await;
    let (status, _) = before
        .get("/", &[])
        .await
        .expect("the connection opened before the rotation still works");
    assert_eq!(status, StatusCode::OK);

    // A file that does not parse: logged and counted, and the last good certificate stays.
    let errors = reloads(&proxy, "rotate", "error");
    rename_over(
        dir.path(),
        "app.crt",
        "-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n",
    );
    eventually(LIMIT, "the invalid file noticed", || async {
        reloads(&proxy, "rotate", "error") > errors
    })
    .await;
    let s = connect(addr, &client, "app.example.test").await.unwrap();
    assert_eq!(served(&s), second.der);
    let (status, _) = http(s).await.get("/", &[]).await.expect("still served");
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_config_reload_with_another_certificate_applies_to_new_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let first = ca.server(&["app.example.test"]);
    let second = ca.server(&["app.example.test"]);
    let (up, _) = echo_upstream("up").await;
    let secrets = |leaf: &Leaf| {
        format!(
            "secrets:\n  - name: app\n    certificate_chain: {:?}\n    private_key: {:?}\n",
            leaf.cert_pem, leaf.key_pem
        )
    };
    let tls = "      certificates:\n        - { secret: app }";
    let _ = dir;
    let (proxy, addr) = start(&http_config("secret", tls, up, &secrets(&first)), "secret").await;
    let client = connector(Some(&ca), &[], None);
    let s = connect(addr, &client, "app.example.test").await.unwrap();
    assert_eq!(served(&s), first.der);
    let mut before = http(s).await;
    before.get("/", &[]).await.expect("first request");

    let next = validate::from_yaml(&http_config("secret", tls, up, &secrets(&second))).unwrap();
    proxy.apply(next).await.expect("update applies");
    let s = connect(addr, &client, "app.example.test").await.unwrap();
    assert_eq!(served(&s), second.der);
    let (status, _) = before.get("/", &[]).await.expect("old connection lives on");
    assert_eq!(status, StatusCode::OK);
    let samples = samples(&proxy);
    assert!(
        metric(
            &samples,
            "trellis_tls_certificate_expiry_seconds",
            &[("secret", "app"), ("name", "app.example.test")],
        )
        .is_some_and(|v| v > 0.0),
        "secret expiry gauge"
    );
}

#[tokio::test]
async fn a_tcp_listener_terminates_tls_and_proxies_the_cleartext() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let cert = ca.server(&["db.example.test"]);
    let echo = tcp_echo_upstream().await;
    let yaml = format!(
        r#"
listeners:
  - name: tcp-tls
    address: "127.0.0.1:0"
    protocol: tcp
    cluster: db
    tls:
      certificates:
        - {{ {} }}
clusters:
  - name: db
    endpoints: ["{echo}"]
"#,
        cert.write(dir.path(), "db")
    );
    let (proxy, addr) = start(&yaml, "tcp-tls").await;
    let mut s = connect(addr, &connector(Some(&ca), &[], None), "db.example.test")
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), None);
    s.write_all(b"hello over tls").await.unwrap();
    let mut buf = [0u8; 14];
    tokio::time::timeout(LIMIT, s.read_exact(&mut buf))
        .await
        .expect("echo within 10s")
        .unwrap();
    assert_eq!(&buf, b"hello over tls");
    assert_eq!(handshakes(&proxy, "tcp-tls", "success"), 1.0);
}

#[tokio::test]
async fn a_redirect_without_a_scheme_keeps_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let cert = ca.server(&["app.example.test"]);
    let yaml = format!(
        r#"
listeners:
  - name: redirecting
    address: "127.0.0.1:0"
    tls:
      certificates:
        - {{ {} }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - redirect: {{ path: /new, port: 8443 }}
"#,
        cert.write(dir.path(), "app")
    );
    let (_proxy, addr) = start(&yaml, "redirecting").await;
    let s = connect(addr, &connector(Some(&ca), &[], None), "app.example.test")
        .await
        .unwrap();
    let io = TokioIo::new(s);
    let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/old")
        .header("host", "app.example.test")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(
        resp.headers()["location"],
        "https://app.example.test:8443/new"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_finishes_the_handshake_is_closed_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let cert = ca.server(&["app.example.test"]);
    let (up, _) = echo_upstream("up").await;
    let tls = format!(
        "      certificates:\n        - {{ {} }}",
        cert.write(dir.path(), "app")
    );
    let (proxy, addr) = start(&http_config("slow-hello", &tls, up, ""), "slow-hello").await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Paused time runs ahead while everything waits, so the 10 s pass at once.
    eventually(
        Duration::from_secs(30),
        "the handshake timed out",
        || async { handshakes(&proxy, "slow-hello", "timeout") == 1.0 },
    )
    .await;
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(LIMIT, silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the proxy closed the connection: {read:?}"
    );
}

#[tokio::test]
async fn min_version_1_3_refuses_tls_1_2() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let cert = ca.server(&["app.example.test"]);
    let (up, _) = echo_upstream("up").await;
    let tls = format!(
        "      min_version: \"1.3\"\n      certificates:\n        - {{ {} }}",
        cert.write(dir.path(), "app")
    );
    let (proxy, addr) = start(&http_config("v13", &tls, up, ""), "v13").await;
    let mut roots = RootCertStore::empty();
    roots.add(ca.issuer.der().clone()).unwrap();
    let tls12 = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let e = connect(
        addr,
        &TlsConnector::from(Arc::new(tls12)),
        "app.example.test",
    )
    .await
    .expect_err("TLS 1.2 refused");
    assert!(e.to_string().to_lowercase().contains("alert"), "{e}");
    eventually(LIMIT, "protocol_version counted", || async {
        handshakes(&proxy, "v13", "protocol_version") == 1.0
    })
    .await;
}

#[test]
fn bad_tls_configuration_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let a = ca.server(&["a.test"]);
    let b = ca.server(&["b.test"]);
    let good = a.write(dir.path(), "a");
    b.write(dir.path(), "b");
    // a's certificate with b's key.
    let mismatched = format!(
        "cert_file: {:?}, key_file: {:?}",
        dir.path().join("a.crt"),
        dir.path().join("b.key")
    );
    let up: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let cases: Vec<(String, String, &str)> = vec![
        (
            format!("      alpn: [h3]\n      certificates:\n        - {{ {good} }}"),
            String::new(),
            "listeners[0].tls.alpn[0]: unknown ALPN protocol \"h3\"",
        ),
        (
            format!("      min_version: \"1.1\"\n      certificates:\n        - {{ {good} }}"),
            String::new(),
            "listeners[0].tls.min_version: \"1.1\" is not one of",
        ),
        (
            format!("      certificates:\n        - {{ {good}, secret: s }}"),
            String::new(),
            "listeners[0].tls.certificates[0]: give cert_file and key_file, or secret, not both",
        ),
        (
            "      certificates:\n        - { server_names: [a.test] }".into(),
            String::new(),
            "listeners[0].tls.certificates[0]: give cert_file and key_file, or secret (neither",
        ),
        (
            "      certificates:\n        - { secret: nope }".into(),
            String::new(),
            "listeners[0].tls.certificates[0].secret: secret \"nope\" is not defined",
        ),
        (
            format!("      certificates:\n        - {{ {mismatched} }}"),
            String::new(),
            "the private key does not match the certificate's public key",
        ),
        (
            format!(
                "      certificates:\n        - {{ server_names: [a.test], {good} }}\n        - {{ server_names: [A.test], {good} }}"
            ),
            String::new(),
            "listeners[0].tls.certificates[1].server_names[0]: \"a.test\" is claimed by another",
        ),
        (
            format!("      certificates:\n        - {{ {good} }}"),
            format!(
                "secrets:\n  - {{ name: s, ca_bundle: {:?} }}\n  - {{ name: s, ca_bundle: {:?} }}",
                ca.pem(),
                ca.pem()
            ),
            "secrets: name \"s\" is used twice",
        ),
        (
            format!("      certificates:\n        - {{ {good} }}"),
            format!(
                "secrets:\n  - {{ name: bad, certificate_chain: {:?}, private_key: {:?} }}",
                a.cert_pem, b.key_pem
            ),
            "secrets[0].certificate_chain: the private key does not match",
        ),
        (
            format!(
                "      certificates:\n        - {{ cert_file: {:?}, key_file: {:?} }}",
                dir.path().join("missing.crt"),
                dir.path().join("a.key")
            ),
            String::new(),
            "missing.crt",
        ),
    ];
    for (tls, extra, want) in cases {
        let yaml = http_config("main", &tls, up, &extra);
        let e = validate::from_yaml(&yaml).expect_err(want).to_string();
        assert!(e.contains(want), "want {want:?} in:\n{e}");
        assert!(!e.contains("PRIVATE KEY"), "a key in an error:\n{e}");
    }
    let ok = http_config(
        "main",
        &format!("      certificates:\n        - {{ {good} }}"),
        up,
        "",
    );
    validate::from_yaml(&ok).expect("a valid tls block");
}

// Interoperability with OpenSSL clients. These need `curl` and `openssl` on the PATH; without
// them the test says so and passes (CI installs both).

fn tool(name: &str) -> bool {
    let found = std::process::Command::new("which")
        .arg(name)
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: {name} is not installed");
    }
    found
}

/// Runs a client to its exit with stdout and stderr captured, killed (and the test failed) if it
/// runs longer than [`LIMIT`].
async fn run(cmd: &mut std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client starts");
    let pid = child.id();
    let waited = tokio::time::timeout(
        LIMIT,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    match waited {
        Ok(out) => out.unwrap().unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("{cmd:?} still running after {LIMIT:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_openssl_speak_tls_1_2_and_1_3_and_resume() {
    if !tool("curl") || !tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let cert = ca.server(&["app.example.test"]);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (up, _) = echo_upstream("up").await;
    let tls = format!(
        "      certificates:\n        - {{ {} }}",
        cert.write(dir.path(), "app")
    );
    let (proxy, addr) = start(&http_config("interop", &tls, up, ""), "interop").await;
    let port = addr.port();
    for (flags, version, http) in [
        (
            &["--tlsv1.2", "--tls-max", "1.2", "--http1.1"][..],
            "TLSv1.2",
            "1.1",
        ),
        (&["--tlsv1.3", "--http2"][..], "TLSv1.3", "2"),
    ] {
        let out = run(std::process::Command::new("curl")
            .args(["-sS", "-v", "--max-time", "5", "--cacert"])
            .arg(&ca_file)
            .args(["--resolve", &format!("app.example.test:{port}:127.0.0.1")])
            .args(flags)
            .args(["-w", "\n%{http_version}"])
            .arg(format!("https://app.example.test:{port}/curl")))
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "curl {flags:?}: {stderr}");
        assert!(
            stderr.contains(version),
            "curl {flags:?} negotiated:\n{stderr}"
        );
        let (body, got_http) = stdout.rsplit_once('\n').unwrap();
        assert_eq!(got_http, http, "{flags:?}");
        assert_eq!(
            seen(&Bytes::from(body.to_owned())).header("x-forwarded-proto"),
            Some("https")
        );
    }
    // Resumption: a session saved by one s_client is resumed by the next: TLS 1.2 with tickets
    // and with the session cache (no tickets), TLS 1.3 with tickets. Each sends one request and
    // reads until the proxy closes (`-ign_eof`), so TLS 1.3 tickets, sent after the handshake,
    // arrive before s_client exits.
    let request = "GET /openssl HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n";
    for (version, extra, label) in [
        ("-tls1_2", "", "TLSv1.2"),
        ("-tls1_2", "-no_ticket", "TLSv1.2"),
        ("-tls1_3", "", "TLSv1.3"),
    ] {
        let sess = dir.path().join("session.pem");
        let s_client = |direction: &str| {
            let mut c = std::process::Command::new("sh");
            c.arg("-c").arg(format!(
                "printf '{request}' | openssl s_client {version} {extra} -ign_eof \
                 -connect 127.0.0.1:{port} -servername app.example.test -CAfile {ca} {direction} {sess}",
                ca = ca_file.display(),
                sess = sess.display(),
            ));
            c
        };
        let first = run(&mut s_client("-sess_out")).await;
        let first_out = String::from_utf8_lossy(&first.stdout);
        assert!(
            first_out.contains(&format!("New, {label}")) && first_out.contains("x-forwarded-proto"),
            "{version} {extra}: {first_out}"
        );
        let second = run(&mut s_client("-sess_in")).await;
        let second_out = String::from_utf8_lossy(&second.stdout);
        assert!(
            second_out.contains(&format!("Reused, {label}")),
            "{version} {extra}: {second_out}"
        );
    }
    assert_eq!(handshakes(&proxy, "interop", "success"), 8.0);
}

/// Over TLS with ALPN `h2` the server speaks first (its SETTINGS), before the client's preface:
/// the 100 for `expect: 100-continue` still goes out as its own frame between hyper's.
#[tokio::test]
async fn expect_100_continue_is_answered_over_h2_on_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let cert = ca.server(&["app.example.test"]);
    let (up, _) = echo_upstream("up").await;
    let tls = format!(
        "      certificates:\n        - {{ {} }}",
        cert.write(dir.path(), "app")
    );
    let (_proxy, addr) = start(&http_config("h2", &tls, up, ""), "h2").await;
    let s = connect(
        addr,
        &connector(Some(&ca), &["h2"], None),
        "app.example.test",
    )
    .await
    .unwrap();
    let (client, conn) = h2::client::handshake(s).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    for i in 0..3 {
        let req = Request::post("https://app.example.test/upload")
            .header("expect", "100-continue")
            .body(())
            .unwrap();
        client = client.ready().await.unwrap();
        let (mut resp, mut body) = client.send_request(req, false).unwrap();
        let first = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| resp.poll_informational(cx)),
        )
        .await
        .expect("a 100 within 5 s, without the body")
        .expect("a 1xx before any final response")
        .expect("a 1xx, not a stream error");
        assert_eq!(first.status(), StatusCode::CONTINUE, "request {i}");
        body.send_data(Bytes::from(format!("body {i}")), true)
            .unwrap();
        let resp = tokio::time::timeout(LIMIT, resp)
            .await
            .expect("answer within 10s")
            .expect("an answer");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut got = resp.into_body();
        let mut data = Vec::new();
        while let Some(chunk) = got.data().await {
            let chunk = chunk.unwrap();
            let _ = got.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        assert_eq!(seen(&Bytes::from(data)).body, format!("body {i}"));
    }
}

/// `/config_dump` shows each listener's TLS: where every certificate comes from (files or a
/// secret's name) and the names it serves, the ALPN offer, the minimum version, the
/// client-certificate mode and its CA; the private keys, read from files or held in a secret,
/// never appear.
#[tokio::test]
async fn config_dump_shows_listener_tls_without_key_material() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let from_file = ca.server(&["app.example.test"]);
    let from_secret = ca.server(&["api.example.test"]);
    let clients = dir.path().join("clients.pem");
    std::fs::write(&clients, Ca::new("client ca").pem()).unwrap();
    let (up, _) = echo_upstream("up").await;
    let echo = tcp_echo_upstream().await;
    let tls = format!(
        "      certificates:\n        - {{ server_names: [app.example.test], {} }}\n        - {{ server_names: [\"*.example.test\"], secret: api }}\n      unknown_server_name: refuse\n      alpn: [h2]\n      min_version: \"1.3\"\n      client_certificate: {{ mode: optional, ca_file: {clients:?} }}",
        from_file.write(dir.path(), "app")
    );
    let extra = format!(
        "  - name: db\n    endpoints: [\"{echo}\"]\nsecrets:\n  - name: api\n    certificate_chain: {:?}\n    private_key: {:?}\n  - {{ name: client-ca, ca_bundle: {:?} }}\n",
        from_secret.cert_pem,
        from_secret.key_pem,
        ca.pem()
    );
    let mut yaml = http_config("edge", &tls, up, &extra);
    yaml = yaml.replace(
        "route_configs:",
        "  - name: tcp-tls\n    address: \"127.0.0.1:0\"\n    protocol: tcp\n    cluster: db\n    tls:\n      certificates:\n        - { secret: api }\n      client_certificate: { ca_secret: client-ca }\nroute_configs:",
    );
    let (proxy, _) = start(&yaml, "edge").await;
    let (admin, _) = common::start_admin(&proxy).await;
    let (resp, body) =
        common::get(&common::h1_client(), &format!("http://{admin}/config_dump")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    for key in [&from_file.key_pem, &from_secret.key_pem] {
        for line in key.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!text.contains(line), "key material in /config_dump");
        }
    }
    let dump: serde_json::Value = serde_json::from_str(&text).unwrap();
    let listener = |name: &str| {
        dump["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("no listener {name}: {dump}"))
            .clone()
    };
    let app = dir.path().join("app");
    assert_eq!(
        listener("edge")["tls"],
        serde_json::json!({
            "certificates": [
                {
                    "server_names": ["app.example.test"],
                    "source": format!("files {}.crt, {}.key", app.display(), app.display()),
                },
                { "server_names": ["*.example.test"], "source": "secret api" },
            ],
            "unknown_server_name": "refuse",
            "alpn": ["h2"],
            "min_version": "1.3",
            "client_certificate": {
                "mode": "optional",
                "ca": format!("file {}", clients.display()),
            },
        })
    );
    assert_eq!(
        listener("tcp-tls")["tls"],
        serde_json::json!({
            "certificates": [{ "server_names": [], "source": "secret api" }],
            "unknown_server_name": "default",
            "alpn": [],
            "min_version": "1.2",
            "client_certificate": { "mode": "require", "ca": "secret client-ca" },
        })
    );
}
