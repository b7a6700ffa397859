//! A Service port becomes a cluster and its endpoints.

use std::{collections::BTreeMap, net::IpAddr, net::SocketAddr};

use trellis_proto::discovery::v1 as api;

use crate::{
    catalog::{Catalog, ObjectKey},
    source::manifest::{EndpointSlice, IntOrString, Service, ServicePort, SliceEndpoint},
};

/// Pod label: the pod runs a Trellis sidecar, so its endpoints are reached over mesh mTLS.
pub const SIDECAR_LABEL: &str = "trellis.io/sidecar";
/// EndpointSlice annotation, for manifests without Pods: the service account every endpoint of
/// the slice without a Pod `targetRef` runs as (in the slice's namespace), marking them meshed.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "trellis.io/service-account";

/// Connect timeout the controller asks for (the proxy's own default, stated explicitly).
const CONNECT_TIMEOUT_MS: u64 = 5_000;

/// `<namespace>/<service>:<port>`.
pub fn cluster_name(service: &ObjectKey, port: u16) -> String {
    format!("{}/{}:{}", service.namespace, service.name, port)
}

/// Whether a port carries HTTP, from `appProtocol` or else the port name's prefix (Istio's
/// convention: `http`, `http-web`, `grpc-api`, `h2c`).
pub fn is_http(port: &ServicePort) -> bool {
    if let Some(app) = &port.app_protocol {
        return matches!(
            app.to_ascii_lowercase().as_str(),
            "http" | "http2" | "h2c" | "grpc" | "kubernetes.io/h2c" | "kubernetes.io/http"
        );
    }
    let name = port.name.as_deref().unwrap_or("");
    ["http", "grpc", "h2c"]
        .iter()
        .any(|p| name == *p || name.starts_with(&format!("{p}-")))
}

fn protocol(port: &ServicePort) -> api::UpstreamProtocol {
    let h2 = match &port.app_protocol {
        Some(app) => matches!(
            app.to_ascii_lowercase().as_str(),
            "http2" | "h2c" | "grpc" | "kubernetes.io/h2c"
        ),
        None => {
            let name = port.name.as_deref().unwrap_or("");
            ["grpc", "h2c"]
                .iter()
                .any(|p| name == *p || name.starts_with(&format!("{p}-")))
        }
    };
    if h2 {
        api::UpstreamProtocol::Http2
    } else {
        api::UpstreamProtocol::Http1
    }
}

pub fn cluster(key: &ObjectKey, port: &ServicePort) -> api::Cluster {
    api::Cluster {
        name: cluster_name(key, port.port),
        protocol: protocol(port).into(),
        connect_timeout_ms: CONNECT_TIMEOUT_MS,
        // Upstream TLS comes from a BackendTLSPolicy, for gateways (see `gateway.rs`).
        tls: None,
        // The mesh defaults a Linkerd or Envoy user expects, stated explicitly so the mesh's
        // choice does not rest on a proxy's own defaults: latency-aware balancing, ejection after
        // 5 consecutive failures, and panic mode below half the endpoints.
        lb: Some(api::LbPolicy {
            kind: Some(api::lb_policy::Kind::PeakEwma(api::PeakEwma {
                decay_ms: 0,
            })),
        }),
        health_check: None,
        outlier_detection: Some(api::OutlierDetection {
            consecutive_5xx: Some(5),
            consecutive_gateway_errors: None,
            base_ejection_time_ms: 30_000,
            max_ejection_time_ms: 300_000,
            max_ejection_percent: 50,
            disabled: false,
        }),
        panic_threshold_percent: Some(50),
        // Unset already means the proxy's defaults here (pooled connections idle 60 s, limits
        // of 1024, a retry budget of 20% plus 10 per second), so there is nothing to state.
        idle_timeout_ms: 0,
        circuit_breakers: None,
        retry_budget: None,
    }
}

/// The endpoints of one service port, none of them meshed (what a gateway dials: it holds no
/// mesh certificate). See [`mesh_endpoints`].
pub fn endpoints(
    catalog: &Catalog,
    key: &ObjectKey,
    service: &Service,
    port: &ServicePort,
) -> api::ClusterLoadAssignment {
    mesh_endpoints(catalog, key, service, port, None)
}

/// The SPIFFE ID `endpoint` of `slice` runs as, when it is meshed: its `targetRef` Pod exists
/// and carries `trellis.io/sidecar: "true"` (and not `trellis.io/capture: "none"`); or, without a Pod `targetRef`, the slice has the
/// `trellis.io/service-account` annotation. `None` (plaintext) otherwise, and always without a
/// trust domain (the controller runs no CA, so no sidecar holds a certificate).
pub fn endpoint_identity(
    catalog: &Catalog,
    slice: &EndpointSlice,
    endpoint: &SliceEndpoint,
    trust_domain: Option<&str>,
) -> Option<String> {
    let trust_domain = trust_domain?;
    let slice_ns = slice.metadata.namespace();
    let id = |namespace: &str, account: &str| {
        crate::identity::WorkloadId::new(namespace, account)
            .ok()
            .map(|w| w.spiffe_id(trust_domain))
    };
    match &endpoint.target_ref {
        Some(target) if target.kind.as_deref() == Some("Pod") => {
            let namespace = target.namespace.as_deref().unwrap_or(slice_ns);
            let pod = catalog
                .pods
                .get(&ObjectKey::new(namespace, target.name.as_deref()?))?;
            let label = |name: &str| pod.metadata.labels.get(name).map(String::as_str);
            // A sidecar without capture (`trellis.io/capture: none`, the pod's labels being its
            // node's) has plain TCP inbound listeners: mesh TLS sent to it would reach the
            // application as is.
            if label(SIDECAR_LABEL) != Some("true")
                || label(super::sidecar::CAPTURE_LABEL) == Some("none")
            {
                return None;
            }
            id(namespace, pod.service_account())
        }
        _ => id(
            slice_ns,
            slice.metadata.annotations.get(SERVICE_ACCOUNT_ANNOTATION)?,
        ),
    }
}

/// The endpoints of one service port. Ready endpoints only; when none is ready, the ones still
/// serving while terminating (as kube-proxy does), so a rollout's last pods keep answering
/// rather than every request failing. Terminating-and-not-serving endpoints are never sent.
/// With a trust domain, meshed endpoints carry their SPIFFE ID ([`endpoint_identity`]).
pub fn mesh_endpoints(
    catalog: &Catalog,
    key: &ObjectKey,
    service: &Service,
    port: &ServicePort,
    trust_domain: Option<&str>,
) -> api::ClusterLoadAssignment {
    // Address → identity; an address listed twice keeps the first slice's (name order).
    let mut ready = BTreeMap::new();
    let mut serving = BTreeMap::new();
    for slice in catalog.slices_of(key) {
        let Some(target) = slice_port(service, port, slice) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let c = &endpoint.conditions;
            let terminating = c.terminating.unwrap_or(false);
            let is_ready = c.ready.unwrap_or(true) && !terminating;
            let is_serving = c.serving.unwrap_or(is_ready);
            let identity = if is_ready || is_serving {
                endpoint_identity(catalog, slice, endpoint, trust_domain).unwrap_or_default()
            } else {
                String::new()
            };
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    tracing::debug!(%key, address, "skipping a non-IP endpoint address");
                    continue;
                };
                let addr = SocketAddr::new(ip, target);
                if is_ready {
                    ready.entry(addr).or_insert_with(|| identity.clone());
                } else if is_serving {
                    serving.entry(addr).or_insert_with(|| identity.clone());
                }
            }
        }
    }
    let (chosen, health) = if ready.is_empty() {
        (serving, api::EndpointHealth::Serving)
    } else {
        (ready, api::EndpointHealth::Ready)
    };
    api::ClusterLoadAssignment {
        cluster_name: cluster_name(key, port.port),
        endpoints: chosen
            .into_iter()
            .map(|(addr, identity)| api::Endpoint {
                address: addr.to_string(),
                weight: 1,
                health: health.into(),
                identity,
            })
            .collect(),
    }
}

/// The endpoint port for a service port: the slice port with the same name; else, for a
/// one-port service, the slice's only port; else a numeric targetPort or the port itself.
fn slice_port(service: &Service, port: &ServicePort, slice: &EndpointSlice) -> Option<u16> {
    let name = port.name.as_deref().unwrap_or("");
    if let Some(p) = slice
        .ports
        .iter()
        .find(|p| p.name.as_deref().unwrap_or("") == name)
    {
        return p.port;
    }
    if service.spec.ports.len() == 1 && slice.ports.len() == 1 {
        return slice.ports[0].port;
    }
    if slice.ports.is_empty() {
        return match &port.target_port {
            Some(IntOrString::Int(p)) => Some(*p),
            Some(IntOrString::String(_)) => None,
            None => Some(port.port),
        };
    }
    None
}
