//! The ordering and ACK rules of `discovery.proto`, driven request by request.

use std::time::SystemTime;

use trellis_proto::discovery::v1 as api;

use super::*;
use crate::{
    catalog::Catalog, source::manifest::parse_documents, translate::NodeInfo, translate::Role,
};

const MESH: &str = "
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.13
  ports: [{name: postgres, port: 5432}]
";

fn snapshot(yaml: &str) -> Snapshot {
    let catalog = Catalog::from_manifests(&parse_documents(yaml).unwrap());
    let node = NodeInfo {
        id: "n".into(),
        role: Role::Sidecar,
        namespace: "shop".into(),
        service_account: String::new(),
        labels: [("trellis.io/capture".to_owned(), "none".to_owned())].into(),
        gateway: None,
    };
    crate::translate::translate(&catalog, &node)
}

fn subscribe(t: ResourceType, names: &[&str]) -> api::DeltaDiscoveryRequest {
    api::DeltaDiscoveryRequest {
        type_url: t.type_url().into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    }
}

fn ack(r: &api::DeltaDiscoveryResponse) -> api::DeltaDiscoveryRequest {
    api::DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    }
}

fn summary(
    responses: &[api::DeltaDiscoveryResponse],
) -> Vec<(ResourceType, Vec<String>, Vec<String>)> {
    responses
        .iter()
        .map(|r| {
            (
                ResourceType::from_type_url(&r.type_url).unwrap(),
                r.resources.iter().map(|x| x.name.clone()).collect(),
                r.removed_resources.clone(),
            )
        })
        .collect()
}

/// Subscribes to everything and ACKs until quiet; returns the state.
fn converge(s: &mut DeltaState, snap: &Snapshot) {
    let now = SystemTime::now();
    for t in [ResourceType::Cluster, ResourceType::Listener] {
        s.on_request(&subscribe(t, &[]), snap, now);
    }
    for _ in 0..10 {
        let responses = s.next_responses(snap);
        if responses.is_empty() {
            return;
        }
        for r in &responses {
            assert_eq!(s.on_request(&ack(r), snap, now), Outcome::Ack);
            let t = ResourceType::from_type_url(&r.type_url).unwrap();
            let names: Vec<&str> = match t {
                ResourceType::Cluster => r.resources.iter().map(|x| x.name.as_str()).collect(),
                ResourceType::Listener => r
                    .resources
                    .iter()
                    .filter_map(|x| match &x.kind {
                        Some(api::resource::Kind::Listener(l)) => match &l.kind {
                            Some(api::listener::Kind::Http(h)) => Some(h.route_config.as_str()),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect(),
                _ => continue,
            };
            let follow = if t == ResourceType::Cluster {
                ResourceType::ClusterLoadAssignment
            } else {
                ResourceType::RouteConfiguration
            };
            if !names.is_empty() {
                s.on_request(&subscribe(follow, &names), snap, now);
            }
        }
    }
    panic!("did not converge");
}

#[test]
fn clusters_first_listeners_after_cluster_ack() {
    let snap = snapshot(MESH);
    let mut s = DeltaState::default();
    let now = SystemTime::now();
    s.on_request(&subscribe(ResourceType::Cluster, &[]), &snap, now);
    s.on_request(&subscribe(ResourceType::Listener, &[]), &snap, now);
    let first = s.next_responses(&snap);
    assert_eq!(
        summary(&first),
        [(
            ResourceType::Cluster,
            vec!["shop/db:5432".into(), "shop/web:80".into()],
            vec![]
        )]
    );
    // Endpoints can be asked for right away; listeners wait for the cluster ACK.
    s.on_request(
        &subscribe(ResourceType::ClusterLoadAssignment, &["shop/web:80"]),
        &snap,
        now,
    );
    let second = s.next_responses(&snap);
    assert_eq!(summary(&second)[0].0, ResourceType::ClusterLoadAssignment);
    assert_eq!(second.len(), 1);
    assert_eq!(s.status()["listeners"].held_back, 2);
    s.on_request(&ack(&first[0]), &snap, now);
    let third = s.next_responses(&snap);
    assert_eq!(summary(&third)[0].0, ResourceType::Listener);
}

#[test]
fn removals_make_before_break() {
    let before = snapshot(MESH);
    let mut s = DeltaState::default();
    converge(&mut s, &before);
    let now = SystemTime::now();
    // web goes away: listener first, then its route config, then the cluster, then endpoints.
    let after = snapshot(
        &MESH
            .replace("name: web,", "name: gone,")
            .replace("10.96.0.10", "None"),
    );
    let mut order = Vec::new();
    for _ in 0..8 {
        let responses = s.next_responses(&after);
        if responses.is_empty() {
            break;
        }
        for r in &responses {
            for name in &r.removed_resources {
                if name.contains("web") {
                    order.push(ResourceType::from_type_url(&r.type_url).unwrap());
                }
            }
            s.on_request(&ack(r), &after, now);
        }
    }
    assert_eq!(
        order,
        [
            ResourceType::Listener,
            ResourceType::RouteConfiguration,
            ResourceType::Cluster,
            ResourceType::ClusterLoadAssignment
        ]
    );
}

#[test]
fn unknown_initial_version_blocks_cluster_removal_until_replaced() {
    let snap = snapshot(MESH);
    let mut s = DeltaState::default();
    let now = SystemTime::now();
    let mut req = subscribe(ResourceType::Cluster, &[]);
    req.initial_resource_versions = [("shop/old:1".to_string(), "v0".to_string())].into();
    s.on_request(&req, &snap, now);
    let mut req = subscribe(ResourceType::Listener, &[]);
    req.initial_resource_versions = [("outbound/shop/old:1".to_string(), "v0".to_string())].into();
    s.on_request(&req, &snap, now);
    let first = s.next_responses(&snap);
    // The old cluster stays: an unknown listener may still name it. The old listener goes.
    assert_eq!(first.len(), 2);
    assert!(first[0].removed_resources.is_empty());
    assert_eq!(first[1].removed_resources, ["outbound/shop/old:1"]);
    s.on_request(&ack(&first[0]), &snap, now);
    s.on_request(&ack(&first[1]), &snap, now);
    let next = s.next_responses(&snap);
    let cluster = next
        .iter()
        .find(|r| r.type_url == ResourceType::Cluster.type_url())
        .unwrap();
    assert_eq!(cluster.removed_resources, ["shop/old:1"]);
}

#[test]
fn stale_and_nack() {
    let snap = snapshot(MESH);
    let mut s = DeltaState::default();
    let now = SystemTime::now();
    s.on_request(&subscribe(ResourceType::Cluster, &[]), &snap, now);
    let first = s.next_responses(&snap);
    let mut stale = ack(&first[0]);
    stale.response_nonce = "999".into();
    assert_eq!(s.on_request(&stale, &snap, now), Outcome::Stale);
    let mut nack = ack(&first[0]);
    nack.error_detail = Some(api::ErrorDetail {
        message: "bad".into(),
    });
    assert_eq!(s.on_request(&nack, &snap, now), Outcome::Nack);
    let status = &s.status()["clusters"];
    assert_eq!(status.last_nack.as_ref().unwrap().message, "bad");
    assert!(status.nacked);
    assert!(status.acked.is_empty());
    // A message naming no resource of the response refuses all of them.
    assert_eq!(status.refused.len(), 2, "{status:?}");
    assert_eq!(status.refused["shop/web:80"], "bad");
    // Not offered again until something changes.
    assert!(s.next_responses(&snap).is_empty());
    // The NACKed nonce is now stale too.
    assert_eq!(s.on_request(&ack(&first[0]), &snap, now), Outcome::Stale);
}

/// The proxy refuses one resource of a response by name and applies the rest: the rest counts
/// as ACKed (what waits on it goes out), the refused one is not offered again, and a later
/// version of it is.
#[test]
fn a_nack_naming_one_resource_applies_the_rest_and_a_new_version_still_goes() {
    const TWO_MORE: &str = "
---
kind: Service
metadata: {name: a, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80}]
---
kind: Service
metadata: {name: b, namespace: shop}
spec:
  clusterIP: 10.96.0.21
  ports: [{name: http, port: 80}]
";
    let before = snapshot(MESH);
    let mut s = DeltaState::default();
    converge(&mut s, &before);
    let now = SystemTime::now();
    let after = snapshot(&format!("{MESH}{TWO_MORE}"));
    let responses = s.next_responses(&after);
    assert_eq!(
        summary(&responses),
        [(
            ResourceType::Cluster,
            vec!["shop/a:80".into(), "shop/b:80".into()],
            vec![]
        )]
    );
    let mut nack = ack(&responses[0]);
    nack.error_detail = Some(api::ErrorDetail {
        message: "cluster \"shop/a:80\": connect_timeout: 0 is not allowed".into(),
    });
    assert_eq!(s.on_request(&nack, &after, now), Outcome::Nack);
    // b was applied: its listener may go now; a's waits, and a is not offered again.
    let next = s.next_responses(&after);
    assert_eq!(
        summary(&next),
        [(
            ResourceType::Listener,
            vec!["outbound/shop/b:80".into()],
            vec![]
        )]
    );
    s.on_request(&ack(&next[0]), &after, now);
    assert!(s.next_responses(&after).is_empty(), "nothing resent");
    let clusters = &s.status()["clusters"];
    assert!(clusters.acked.contains_key("shop/b:80"));
    assert!(!clusters.acked.contains_key("shop/a:80"));
    assert!(clusters.nacked);
    assert_eq!(
        clusters.refused,
        [(
            "shop/a:80".to_owned(),
            "cluster \"shop/a:80\": connect_timeout: 0 is not allowed".to_owned()
        )]
        .into()
    );
    assert_eq!(s.status()["listeners"].held_back, 1);

    // A new version of a (another port name makes another cluster content) is sent and, once
    // ACKed, its listener follows.
    let fixed = snapshot(&format!("{MESH}{}", TWO_MORE.replacen("http", "grpc", 1)));
    let next = s.next_responses(&fixed);
    assert_eq!(
        summary(&next),
        [(ResourceType::Cluster, vec!["shop/a:80".into()], vec![])]
    );
    assert_eq!(s.on_request(&ack(&next[0]), &fixed, now), Outcome::Ack);
    let clusters = &s.status()["clusters"];
    assert!(
        !clusters.nacked && clusters.refused.is_empty(),
        "{clusters:?}"
    );
    let next = s.next_responses(&fixed);
    assert_eq!(
        summary(&next),
        [(
            ResourceType::Listener,
            vec!["outbound/shop/a:80".into()],
            vec![]
        )]
    );
    s.on_request(&ack(&next[0]), &fixed, now);
    assert!(s.next_responses(&fixed).is_empty());
    assert_eq!(s.status()["listeners"].held_back, 0);
}

#[test]
fn refused_names_are_read_from_each_line() {
    let held = |n: &str| {
        (
            n.to_owned(),
            Held {
                version: "v".into(),
                refs: None,
            },
        )
    };
    let updates = [held("r"), held("we\"ird"), held("ok")];
    let message = "route config \"r\": virtual_hosts[0].routes[0].match.path.regex: \"(\" is not valid\n\
                   route config \"we\\\"ird\": domains[0]: empty\n\
                   cluster \"elsewhere\": not in this response";
    let refused = refused_resources(message, &updates);
    assert_eq!(refused.keys().collect::<Vec<_>>(), ["r", "we\"ird"]);
    assert!(refused["r"].ends_with("is not valid"));
    assert!(refused_resources("no names here", &updates).is_empty());
}

const SPLIT: &str = "
---
kind: HTTPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: '', name: web, port: 80}]
  rules:
    - backendRefs: [{name: web, port: 80}, {name: db, port: 5432}]
";

/// A route naming a backend with no cluster (its Service is gone) is sent without waiting for
/// that cluster, and does not keep the cluster of a deleted Service from being removed.
#[test]
fn routes_to_missing_backends_neither_wait_nor_pin_clusters() {
    let before = snapshot(&format!("{MESH}{SPLIT}"));
    let mut s = DeltaState::default();
    converge(&mut s, &before);
    let now = SystemTime::now();
    // db goes; the route keeps naming shop/db:5432 (its share is answered 500) with the same
    // bytes, so it is not resent, and the cluster is removed after db's listener.
    let after = snapshot(&format!(
        "{}{SPLIT}",
        MESH.replace("name: db,", "name: gone,")
            .replace("10.96.0.13", "None")
    ));
    assert_eq!(
        before
            .get(ResourceType::RouteConfiguration, "outbound/shop/web:80")
            .unwrap()
            .version(),
        after
            .get(ResourceType::RouteConfiguration, "outbound/shop/web:80")
            .unwrap()
            .version()
    );
    let mut removed = Vec::new();
    for _ in 0..8 {
        let responses = s.next_responses(&after);
        if responses.is_empty() {
            break;
        }
        for r in &responses {
            for name in &r.removed_resources {
                removed.push((
                    ResourceType::from_type_url(&r.type_url).unwrap(),
                    name.clone(),
                ));
            }
            s.on_request(&ack(r), &after, now);
        }
    }
    assert!(
        removed.contains(&(ResourceType::Cluster, "shop/db:5432".to_owned())),
        "{removed:?}"
    );
    assert!(removed.contains(&(ResourceType::Listener, "outbound/shop/db:5432".to_owned())));
    for t in ["clusters", "listeners", "routes"] {
        assert_eq!(s.status()[t].held_back, 0, "{t}");
    }

    // A fresh proxy gets the route although shop/db:5432 never arrives.
    let mut fresh = DeltaState::default();
    converge(&mut fresh, &after);
    assert!(
        fresh.status()["routes"]
            .acked
            .contains_key("outbound/shop/web:80")
    );
}

/// Rule E: a listener naming a secret waits until the secret is ACKed; a secret the proxy
/// refused still counts once an earlier version of it is held.
#[test]
fn a_listener_naming_a_secret_waits_for_its_ack() {
    let secret = |chain: &str| api::Secret {
        name: "shop/tls".into(),
        certificate_chain: chain.into(),
        private_key: "key".into(),
        ca_bundle: String::new(),
    };
    let listener = api::Listener {
        max_connections: None,
        name: "l".into(),
        address: "0.0.0.0:8443".into(),
        kind: Some(api::listener::Kind::Http(api::HttpListener {
            route_config: "rc".into(),
            tls: Some(api::ListenerTls {
                certificates: vec![api::ServerCertificate {
                    server_names: vec![],
                    secret: "shop/tls".into(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        })),
    };
    let mut snap = Snapshot::default();
    snap.add_secret(secret("v1"));
    snap.add_listener(listener.clone());
    let mut s = DeltaState::default();
    let now = SystemTime::now();
    s.on_request(&subscribe(ResourceType::Listener, &[]), &snap, now);
    assert!(
        s.next_responses(&snap).is_empty(),
        "a listener went out before the proxy subscribed to its secret"
    );
    s.on_request(&subscribe(ResourceType::Secret, &[]), &snap, now);
    let first = s.next_responses(&snap);
    assert_eq!(
        summary(&first),
        [(ResourceType::Secret, vec!["shop/tls".to_owned()], vec![])]
    );
    assert!(s.next_responses(&snap).is_empty(), "sent before the ACK");
    s.on_request(&ack(&first[0]), &snap, now);
    let listeners = s.next_responses(&snap);
    assert_eq!(
        summary(&listeners),
        [(ResourceType::Listener, vec!["l".to_owned()], vec![])]
    );
    s.on_request(&ack(&listeners[0]), &snap, now);

    // A new version refused: the held one still serves what names it.
    let mut snap2 = Snapshot::default();
    snap2.add_secret(secret("v2"));
    let mut changed = listener;
    changed.address = "0.0.0.0:9443".into();
    snap2.add_listener(changed);
    let second = s.next_responses(&snap2);
    assert_eq!(summary(&second)[0].0, ResourceType::Secret);
    let nack = api::DeltaDiscoveryRequest {
        error_detail: Some(api::ErrorDetail {
            message: r#"secret "shop/tls": private_key: bad"#.into(),
        }),
        ..ack(&second[0])
    };
    assert_eq!(s.on_request(&nack, &snap2, now), Outcome::Nack);
    let third = s.next_responses(&snap2);
    assert!(
        summary(&third)
            .iter()
            .any(|(t, names, _)| *t == ResourceType::Listener && names == &["l"]),
        "{:?}",
        summary(&third)
    );
}

/// Policies go before listeners, and a listener waits while a policy response is unanswered:
/// a sidecar's inbound listener must not serve before the policies restricting it are applied.
#[test]
fn listeners_wait_for_the_policies_in_flight() {
    let yaml = format!(
        "{MESH}---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: shop}}
spec: {{action: DENY, rules: [{{to: {{ports: [5432]}}}}]}}
"
    );
    let snap = snapshot(&yaml);
    let now = SystemTime::now();
    let mut s = DeltaState::default();
    for t in [
        ResourceType::Policy,
        ResourceType::Cluster,
        ResourceType::Listener,
    ] {
        s.on_request(&subscribe(t, &[]), &snap, now);
    }
    let first = s.next_responses(&snap);
    assert_eq!(
        summary(&first),
        [
            (ResourceType::Policy, vec!["shop/p".to_owned()], vec![]),
            (
                ResourceType::Cluster,
                vec!["shop/db:5432".to_owned(), "shop/web:80".to_owned()],
                vec![]
            ),
        ]
    );
    // The clusters are ACKed, the policy is not yet: listeners still wait.
    s.on_request(&ack(&first[1]), &snap, now);
    assert_eq!(summary(&s.next_responses(&snap)), []);
    s.on_request(&ack(&first[0]), &snap, now);
    let listeners = s.next_responses(&snap);
    assert_eq!(summary(&listeners)[0].0, ResourceType::Listener);

    // The policy goes away: removed like any wildcard resource.
    s.on_request(&ack(&listeners[0]), &snap, now);
    let without = snapshot(MESH);
    let removal = s.next_responses(&without);
    assert!(
        summary(&removal).contains(&(ResourceType::Policy, vec![], vec!["shop/p".to_owned()])),
        "{:?}",
        summary(&removal)
    );
}
