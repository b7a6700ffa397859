//! Secret resources through the proxy's control-plane client, against a scripted control plane:
//! a good certificate is ACKed and held; one that does not parse, does not match its key or has
//! expired is NACKed by name with no key bytes in the message, and the version held before stays
//! (what the proxy reports on reconnecting); a new version replaces the old (rotation); removal
//! forgets it. Certificates are generated here with rcgen.

mod common;

use common::scripted::{Harness, resource};
use trellis_proto::discovery::v1::{
    self as api, CLUSTER_TYPE, DeltaDiscoveryRequest, LISTENER_TYPE, SECRET_TYPE, resource::Kind,
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
