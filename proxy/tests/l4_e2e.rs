//! L4 through a real proxy: TCP proxying (echo, server-speaks-first, half-close, idle timeout,
//! per-connection balancing) and TLS passthrough by SNI with real rustls peers.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

fn tcp_config(listeners: &str, clusters: &str) -> String {
    format!("listeners:\n{listeners}\nclusters:\n{clusters}\n")
}

/// Echoes everything until the client's FIN, then says "bye" and closes: only correct
/// half-close handling gets the client both the echo and the "bye".
async fn echo_until_eof() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = s.write_all(&got).await;
                let _ = s.write_all(b"bye").await;
            });
        }
    });
    addr
}

/// Speaks first with a banner naming itself, then echoes.
async fn banner_server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(format!("220 {name}\n").as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn read_line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .expect("a line within 5s")
        .unwrap()
        == 1
    {
        if b[0] == b'\n' {
            break;
        }
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn tcp_echo_with_half_close() {
    let up = echo_until_eof().await;
    let (proxy, addr) = start_proxy(&tcp_config(
        "  - { name: main, address: \"127.0.0.1:0\", protocol: tcp, cluster: echo }",
        &format!("  - {{ name: echo, endpoints: [\"{up}\"] }}"),
    ))
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"hello through trellis").await.unwrap();
    s.shutdown().await.unwrap(); // FIN: the upstream must see EOF and still be able to answer.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("answer and close within 5s")
        .unwrap();
    assert_eq!(got, b"hello through trellisbye");

    let stats = &proxy.store().load().unwrap().clusters["echo"].stats;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.connections_total.load(Relaxed), 1);
    assert_eq!(stats.bytes_sent.load(Relaxed), 21);
    assert_eq!(stats.bytes_received.load(Relaxed), 24);
}

#[tokio::test]
async fn tcp_server_speaks_first_and_balances_per_connection() {
    let a = banner_server("a").await;
    let b = banner_server("b").await;
    let (_proxy, addr) = start_proxy(&tcp_config(
        "  - { name: main, address: \"127.0.0.1:0\", protocol: tcp, cluster: smtp }",
        &format!(
            "  - {{ name: smtp, lb: {{ policy: round_robin }}, endpoints: [\"{a}\", \"{b}\"] }}"
        ),
    ))
    .await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        seen.push(read_line(&mut s).await);
        s.write_all(b"ping\n").await.unwrap();
        assert_eq!(read_line(&mut s).await, "ping");
    }
    assert_eq!(seen, ["220 a", "220 b", "220 a", "220 b"]);
}

#[tokio::test]
async fn tcp_idle_connections_are_closed() {
    let up = banner_server("idle").await;
    let (_proxy, addr) = start_proxy(&tcp_config(
        "  - { name: main, address: \"127.0.0.1:0\", protocol: tcp, cluster: c, idle_timeout: 300ms }",
        &format!("  - {{ name: c, endpoints: [\"{up}\"] }}"),
    ))
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut s).await, "220 idle");
    // Activity keeps it open past the timeout...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.write_all(b"x\n").await.unwrap();
        assert_eq!(read_line(&mut s).await, "x");
    }
    // ...silence closes it.
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed within 5s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn tcp_connect_failure_tries_another_endpoint() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let up = banner_server("alive").await;
    let (_proxy, addr) = start_proxy(&tcp_config(
        "  - { name: main, address: \"127.0.0.1:0\", protocol: tcp, cluster: c }",
        &format!(
            "  - {{ name: c, lb: {{ policy: round_robin }}, endpoints: [\"{closed}\", \"{up}\"] }}"
        ),
    ))
    .await;
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_line(&mut s).await, "220 alive");
    }
}

struct TlsBackend {
    addr: SocketAddr,
    cert: CertificateDer<'static>,
}

/// A TLS server for `names` that sends "from <label>\n" after the handshake.
async fn tls_backend(label: &'static str, names: &[&str]) -> TlsBackend {
    let certified =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls.write_all(format!("from {label}\n").as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    TlsBackend { addr, cert }
}

/// Connects through the proxy with `sni`, trusting only `trust`; returns the greeting and the
/// certificate the client saw.
async fn tls_client(
    proxy: SocketAddr,
    sni: ServerName<'static>,
    trust: &CertificateDer<'static>,
) -> std::io::Result<(String, CertificateDer<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(proxy).await?;
    let mut tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(sni, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))??;
    let seen = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let mut text = String::new();
    tls.read_to_string(&mut text).await?;
    Ok((text, seen))
}

#[tokio::test]
async fn tls_passthrough_routes_by_sni_end_to_end() {
    let a = tls_backend("a", &["a.test"]).await;
    let b = tls_backend("b", &["b.test", "x.wild.test"]).await;
    let d = tls_backend("default", &["127.0.0.1"]).await;
    let listeners = r#"  - name: main
    address: "127.0.0.1:0"
    protocol: tls_passthrough
    default_cluster: d
    sni:
      - { server_names: [a.test], cluster: a }
      - { server_names: ["*.wild.test", b.test], cluster: b }"#;
    let clusters = format!(
        "  - {{ name: a, endpoints: [\"{}\"] }}\n  - {{ name: b, endpoints: [\"{}\"] }}\n  - {{ name: d, endpoints: [\"{}\"] }}",
        a.addr, b.addr, d.addr
    );
    let (_proxy, addr) = start_proxy(&tcp_config(listeners, &clusters)).await;

    let name = |n: &str| ServerName::try_from(n.to_owned()).unwrap();
    let (text, cert) = tls_client(addr, name("a.test"), &a.cert).await.unwrap();
    assert_eq!(text, "from a\n");
    assert_eq!(
        cert, a.cert,
        "the client sees the backend's own certificate"
    );
    let (text, cert) = tls_client(addr, name("b.test"), &b.cert).await.unwrap();
    assert_eq!(text, "from b\n");
    assert_eq!(cert, b.cert);
    let (text, _) = tls_client(addr, name("x.wild.test"), &b.cert)
        .await
        .unwrap();
    assert_eq!(text, "from b\n");
    // No SNI (an IP address) goes to the default cluster.
    let ip = ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let (text, cert) = tls_client(addr, ip, &d.cert).await.unwrap();
    assert_eq!(text, "from default\n");
    assert_eq!(cert, d.cert);
}

#[tokio::test]
async fn tls_passthrough_without_default_closes_unknown_names() {
    let a = tls_backend("a", &["a.test"]).await;
    let listeners = r#"  - name: main
    address: "127.0.0.1:0"
    protocol: tls_passthrough
    sni: [{ server_names: [a.test], cluster: a }]"#;
    let clusters = format!("  - {{ name: a, endpoints: [\"{}\"] }}", a.addr);
    let (_proxy, addr) = start_proxy(&tcp_config(listeners, &clusters)).await;
    let unknown = ServerName::try_from("other.test".to_owned()).unwrap();
    assert!(tls_client(addr, unknown, &a.cert).await.is_err());
    // Plain text on a passthrough listener is closed too.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed within 5s");
    assert!(n.is_err() || buf.is_empty());
}
