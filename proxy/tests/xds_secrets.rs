//! Secret resources through the proxy's control-plane client, against a scripted control plane:
//! a good certificate is ACKed and held; one that does not parse, does not match its key or has
//! expired is NACKed by name with no key bytes in the message, and the version held before stays
//! (what the proxy reports on reconnecting); a new version replaces the old (rotation); removal
//! forgets it. End to end: a listener naming a secret warms until it arrives, then terminates TLS
//! with it; a new version serves new handshakes while a connection opened before lives on.
//! Certificates are generated here with rcgen.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use common::scripted::{Harness, resource};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use trellis_proto::discovery::v1::{
    self as api, CLUSTER_LOAD_ASSIGNMENT_TYPE, CLUSTER_TYPE, DeltaDiscoveryRequest, LISTENER_TYPE,
    ROUTE_CONFIGURATION_TYPE, SECRET_TYPE, resource::Kind,
};

/// A self-signed certificate (PEM) and its key (PEM).
fn certificate(name: &str) -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("certificate");
    (c.cert.pem(), c.signing_key.serialize_pem())
}

/// A certificate whose validity ended in 2001.
fn expired(name: &str) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn secret(name: &str, version: &str, chain: &str, key: &str) -> api::Resource {
    resource(
        name,
        version,
        Kind::Secret(api::Secret {
            name: name.into(),
            certificate_chain: chain.into(),
            private_key: key.into(),
            ca_bundle: String::new(),
        }),
    )
}

/// The base64 body lines of a PEM key: what must never appear in a NACK.
fn key_lines(key_pem: &str) -> Vec<&str> {
    key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect()
}

fn assert_no_key_bytes(text: &str, key_pem: &str) {
    for line in key_lines(key_pem) {
        assert!(!text.contains(line), "key material in {text:?}: {line}");
        assert!(!text.contains(&line[..16]), "key material in {text:?}");
    }
}

/// The versions the proxy says it holds, by reconnecting (a new stream's first Secret request
/// carries them).
async fn held_secrets(h: &mut Harness) -> Vec<(String, String)> {
    h.reconnect().await;
    let firsts = h
        .subscriptions(&[CLUSTER_TYPE, LISTENER_TYPE, SECRET_TYPE])
        .await;
    let secrets: &DeltaDiscoveryRequest =
        firsts.iter().find(|r| r.type_url == SECRET_TYPE).unwrap();
    assert!(
        secrets.resource_names_subscribe.is_empty(),
        "secrets are a wildcard subscription: {secrets:?}"
    );
    let mut held: Vec<(String, String)> = secrets
        .initial_resource_versions
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    held.sort();
    held
}

async fn subscribed(h: &mut Harness) {
    let firsts = h
        .subscriptions(&[CLUSTER_TYPE, LISTENER_TYPE, SECRET_TYPE])
        .await;
    assert_eq!(firsts.len(), 3);
}

#[tokio::test]
async fn a_good_secret_is_acked_and_held() {
    let mut h = Harness::start().await;
    subscribed(&mut h).await;
    let (chain, key) = certificate("shop.example.com");
    let (ack, _) = h
        .send(
            SECRET_TYPE,
            vec![secret("shop/tls", "1", &chain, &key)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    // A trust bundle alone is a secret too.
    let (ca, _) = certificate("ca.example");
    let bundle = resource(
        "shop/ca",
        "1",
        Kind::Secret(api::Secret {
            name: "shop/ca".into(),
            ca_bundle: ca,
            ..Default::default()
        }),
    );
    let (ack, _) = h.send(SECRET_TYPE, vec![bundle], vec![]).await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert_eq!(
        held_secrets(&mut h).await,
        [
            ("shop/ca".to_owned(), "1".to_owned()),
            ("shop/tls".to_owned(), "1".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_bad_secret_is_nacked_by_name_without_key_bytes_and_the_old_one_stays() {
    let mut h = Harness::start().await;
    subscribed(&mut h).await;
    let (chain, key) = certificate("shop.example.com");
    let (ack, _) = h
        .send(
            SECRET_TYPE,
            vec![secret("shop/tls", "1", &chain, &key)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");

    let (_, other_key) = certificate("shop.example.com");
    let (old_chain, old_key) = expired("shop.example.com");
    let garbage_key = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVzLW5vdC1hLWtleS1hdC1hbGw=\n-----END PRIVATE KEY-----\n";
    let cases = [
        (
            secret("shop/tls", "2", &chain, &other_key),
            other_key.clone(),
            r#"secret "shop/tls": private_key: the private key does not match"#,
        ),
        (
            secret("shop/tls", "3", &old_chain, &old_key),
            old_key.clone(),
            r#"secret "shop/tls": certificate_chain: the certificate expired at"#,
        ),
        (
            secret("shop/tls", "4", "not a certificate", &key),
            key.clone(),
            r#"secret "shop/tls": certificate_chain: no certificate found"#,
        ),
        (
            secret("shop/tls", "5", &chain, garbage_key),
            garbage_key.to_owned(),
            r#"secret "shop/tls": private_key: "#,
        ),
        (
            secret("shop/tls", "6", &chain, ""),
            key.clone(),
            r#"secret "shop/tls": private_key: required with certificate_chain"#,
        ),
    ];
    for (bad, bad_key, want) in cases {
        let (nack, _) = h.send(SECRET_TYPE, vec![bad], vec![]).await;
        let message = nack.error_detail.expect("a NACK").message;
        assert!(message.starts_with(want), "{message}\nwant: {want}");
        assert_eq!(message.lines().count(), 1, "{message}");
        assert_no_key_bytes(&message, &bad_key);
        assert_no_key_bytes(&message, &key);
    }
    // One bad secret beside a good one: only the bad one is refused.
    let (chain_b, key_b) = certificate("b.example.com");
    let (nack, _) = h
        .send(
            SECRET_TYPE,
            vec![
                secret("shop/b", "1", &chain_b, &key_b),
                secret("shop/tls", "7", &chain_b, &key),
            ],
            vec![],
        )
        .await;
    let message = nack.error_detail.expect("a NACK").message;
    assert!(message.starts_with(r#"secret "shop/tls""#), "{message}");
    assert!(!message.contains("shop/b"), "{message}");
    assert_eq!(
        held_secrets(&mut h).await,
        [
            ("shop/b".to_owned(), "1".to_owned()),
            ("shop/tls".to_owned(), "1".to_owned())
        ],
        "the refused versions left version 1 in place"
    );
}

#[tokio::test]
async fn a_new_version_replaces_the_held_one_and_removal_forgets_it() {
    let mut h = Harness::start().await;
    subscribed(&mut h).await;
    let (chain, key) = certificate("shop.example.com");
    let (ack, _) = h
        .send(
            SECRET_TYPE,
            vec![secret("shop/tls", "1", &chain, &key)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (chain2, key2) = certificate("shop.example.com");
    let (ack, _) = h
        .send(
            SECRET_TYPE,
            vec![secret("shop/tls", "2", &chain2, &key2)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert_eq!(
        held_secrets(&mut h).await,
        [("shop/tls".to_owned(), "2".to_owned())]
    );
    let (ack, _) = h
        .send(SECRET_TYPE, vec![], vec!["shop/tls".to_owned()])
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert_eq!(held_secrets(&mut h).await, []);
}

/// A client that trusts exactly `chain_pem`'s leaf (a self-signed certificate) and offers
/// HTTP/1.1.
fn trusting(chain_pem: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(chain_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn handshake(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("shop.example.com").unwrap();
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .expect("handshake within 5s")
}

/// An HTTP/1.1 connection over TLS.
async fn http1(tls: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// GET / on `send`: the upstream that answered.
async fn who(send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) -> String {
    let req = http::Request::get("/")
        .header("host", "shop.example.com")
        .body(Full::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .expect("an answer within 5s")
        .unwrap();
    let upstream = resp
        .headers()
        .get("x-upstream")
        .map(|v| v.to_str().unwrap().to_owned());
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    upstream.unwrap_or_else(|| format!("status {status}"))
}

fn tls_listener(secret: &str) -> api::Resource {
    resource(
        "l",
        "1",
        Kind::Listener(api::Listener {
            max_connections: None,
            name: "l".into(),
            address: "127.0.0.1:0".into(),
            kind: Some(api::listener::Kind::Http(api::HttpListener {
                route_config: "r".into(),
                tls: Some(api::ListenerTls {
                    certificates: vec![api::ServerCertificate {
                        server_names: vec!["shop.example.com".into()],
                        secret: secret.into(),
                    }],
                    alpn: Some(api::AlpnProtocols {
                        protocols: vec!["http/1.1".into()],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }),
    )
}

fn upstream_resources(up: SocketAddr) -> (api::Resource, api::Resource, api::Resource) {
    let cluster = resource(
        "a",
        "1",
        Kind::Cluster(api::Cluster {
            name: "a".into(),
            ..Default::default()
        }),
    );
    let endpoints = resource(
        "a",
        "1",
        Kind::ClusterLoadAssignment(api::ClusterLoadAssignment {
            cluster_name: "a".into(),
            endpoints: vec![api::Endpoint {
                address: up.to_string(),
                weight: 1,
                health: api::EndpointHealth::Ready as i32,
                identity: String::new(),
            }],
        }),
    );
    let routes = resource(
        "r",
        "1",
        Kind::RouteConfiguration(api::RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![api::VirtualHost {
                name: "all".into(),
                domains: vec!["*".into()],
                routes: vec![api::Route {
                    name: "all".into(),
                    r#match: Some(api::RouteMatch::default()),
                    action: Some(api::route::Action::Forward(api::ForwardAction {
                        clusters: vec![api::WeightedCluster {
                            cluster: "a".into(),
                            weight: 1,
                        }],
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }),
    );
    (cluster, endpoints, routes)
}

#[tokio::test]
async fn a_listener_serves_tls_with_its_secret_and_a_rotation_applies_to_new_handshakes() {
    let mut h = Harness::start().await;
    subscribed(&mut h).await;
    let (up, _) = common::echo_upstream("a").await;
    let (cluster, endpoints, routes) = upstream_resources(up);
    let (ack, _) = h.send(CLUSTER_TYPE, vec![cluster], vec![]).await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (ack, _) = h
        .send(CLUSTER_LOAD_ASSIGNMENT_TYPE, vec![endpoints], vec![])
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    // The listener before its secret: ACKed, but it waits.
    let (ack, _) = h
        .send(LISTENER_TYPE, vec![tls_listener("shop/tls")], vec![])
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let (ack, _) = h.send(ROUTE_CONFIGURATION_TYPE, vec![routes], vec![]).await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert!(
        h.proxy.listener_addr("l").await.is_none(),
        "served without its certificate"
    );
    let not_serving = h.proxy.store().not_serving();
    assert!(
        not_serving
            .iter()
            .any(|l| l == r#"listener "l" not serving: waiting for secret "shop/tls""#),
        "{not_serving:?}"
    );

    let (chain1, key1) = certificate("shop.example.com");
    let (ack, _) = h
        .send(
            SECRET_TYPE,
            vec![secret("shop/tls", "1", &chain1, &key1)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let addr = h
        .proxy
        .listener_addr("l")
        .await
        .expect("served once the secret arrived");
    let mut before = http1(handshake(addr, &trusting(&chain1)).await.unwrap()).await;
    assert_eq!(who(&mut before).await, "a");

    // Rotation through the discovery API.
    let (chain2, key2) = certificate("shop.example.com");
    let (ack, _) = h
        .send(
            SECRET_TYPE,
            vec![secret("shop/tls", "2", &chain2, &key2)],
            vec![],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let mut after = http1(
        handshake(addr, &trusting(&chain2))
            .await
            .expect("a new handshake gets the new certificate"),
    )
    .await;
    assert_eq!(who(&mut after).await, "a");
    assert!(
        handshake(addr, &trusting(&chain1)).await.is_err(),
        "a new handshake still got the old certificate"
    );
    assert_eq!(
        who(&mut before).await,
        "a",
        "the connection opened before lives on"
    );

    // A bad version is refused; the good one keeps serving new handshakes.
    let (_, wrong_key) = certificate("shop.example.com");
    let (nack, _) = h
        .send(
            SECRET_TYPE,
            vec![secret("shop/tls", "3", &chain1, &wrong_key)],
            vec![],
        )
        .await;
    let message = nack.error_detail.expect("a NACK").message;
    assert!(message.starts_with(r#"secret "shop/tls": "#), "{message}");
    assert_no_key_bytes(&message, &wrong_key);
    let mut again = http1(handshake(addr, &trusting(&chain2)).await.unwrap()).await;
    assert_eq!(who(&mut again).await, "a");
    assert_eq!(h.proxy.listener_addr("l").await, Some(addr));
}

/// A cluster from the control plane that trusts a CA bundle sent as a Secret (what the
/// controller makes of a BackendTLSPolicy) is accepted once the Secret is held.
#[tokio::test]
async fn a_cluster_trusting_a_secret_ca_bundle_is_accepted_and_used() {
    let mut h = Harness::start().await;
    subscribed(&mut h).await;
    let (ca, _) = certificate("backend.example");
    let bundle = resource(
        "configmap/shop/ca",
        "1",
        Kind::Secret(api::Secret {
            name: "configmap/shop/ca".into(),
            ca_bundle: ca,
            ..Default::default()
        }),
    );
    let (ack, _) = h.send(SECRET_TYPE, vec![bundle], vec![]).await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    let cluster = resource(
        "tls-backend",
        "1",
        Kind::Cluster(api::Cluster {
            name: "tls-backend".into(),
            tls: Some(api::UpstreamTls {
                sni: "backend.example".into(),
                ca_secret: "configmap/shop/ca".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let (ack, _) = h.send(CLUSTER_TYPE, vec![cluster], vec![]).await;
    assert!(
        ack.error_detail.is_none(),
        "a cluster naming a held CA secret was refused: {:?}",
        ack.error_detail
    );
}
