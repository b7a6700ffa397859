//! Kubernetes-style manifests as read from YAML: the subset of `Service`, `EndpointSlice`,
//! `Secret`, `ConfigMap`, `Pod`, `Namespace`, Gateway API `Gateway`, `HTTPRoute`, `TLSRoute`,
//! `TCPRoute`, `ReferenceGrant` and `BackendTLSPolicy`, and Trellis' own `AuthorizationPolicy`
//! (`trellis.io/v1alpha1`) the controller uses. Parsing is strict: a field the
//! API does not define (a typo such as `backendRef:`) rejects the document, naming the field and
//! its line, because silently ignoring it changes traffic. Fields the API defines that the
//! controller does not use are accepted and ignored (typed [`Ignored`]); unknown kinds are
//! skipped.

use std::collections::BTreeMap;

use serde::{Deserialize, de::IgnoredAny};

/// A field the Kubernetes or Gateway API defines that the controller does not read: accepted
/// (so real objects parse) and ignored.
pub type Ignored = IgnoredAny;

/// One object from a manifest file.
#[derive(Clone, Debug, PartialEq)]
pub enum Manifest {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Gateway(Gateway),
    HttpRoute(HttpRoute),
    Secret(Secret),
    ConfigMap(ConfigMap),
    ReferenceGrant(ReferenceGrant),
    BackendTlsPolicy(BackendTlsPolicy),
    TlsRoute(TlsRoute),
    TcpRoute(TcpRoute),
    Pod(Pod),
    Namespace(Namespace),
    AuthorizationPolicy(AuthorizationPolicy),
}

/// Why a file's content was rejected; `line` is 1-based within the file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub uid: Ignored,
    pub resource_version: Ignored,
    pub generation: Ignored,
    pub generate_name: Ignored,
    pub creation_timestamp: Ignored,
    pub deletion_timestamp: Ignored,
    pub deletion_grace_period_seconds: Ignored,
    pub managed_fields: Ignored,
    pub owner_references: Ignored,
    pub finalizers: Ignored,
    pub self_link: Ignored,
}

impl ObjectMeta {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Service {
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
    pub api_version: Ignored,
    pub kind: Ignored,
    pub status: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    #[serde(rename = "type")]
    pub kind: Ignored,
    /// Every ClusterIP of a dual-stack Service (the first is `clusterIP`).
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Ignored,
    pub external_name: Ignored,
    pub external_traffic_policy: Ignored,
    pub internal_traffic_policy: Ignored,
    pub health_check_node_port: Ignored,
    pub ip_families: Ignored,
    pub ip_family_policy: Ignored,
    #[serde(rename = "loadBalancerIP")]
    pub load_balancer_ip: Ignored,
    pub load_balancer_class: Ignored,
    pub load_balancer_source_ranges: Ignored,
    pub allocate_load_balancer_node_ports: Ignored,
    pub publish_not_ready_addresses: Ignored,
    pub session_affinity: Ignored,
    pub session_affinity_config: Ignored,
    pub traffic_distribution: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: Option<IntOrString>,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
    pub node_port: Ignored,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u16),
    String(String),
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    pub address_type: Option<String>,
    pub endpoints: Vec<SliceEndpoint>,
    pub ports: Vec<SlicePort>,
    pub api_version: Ignored,
    pub kind: Ignored,
    pub status: Ignored,
}

impl EndpointSlice {
    /// The Service this slice belongs to (label `kubernetes.io/service-name`).
    pub fn service_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get("kubernetes.io/service-name")
            .map(String::as_str)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    pub conditions: Conditions,
    pub hostname: Ignored,
    pub node_name: Ignored,
    pub zone: Ignored,
    /// The object behind the endpoint (a Pod): who the endpoint runs as, for mesh identity.
    pub target_ref: Option<ObjectReference>,
    pub hints: Ignored,
    pub deprecated_topology: Ignored,
}

/// A core `ObjectReference` (an EndpointSlice endpoint's `targetRef`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ObjectReference {
    pub kind: Option<String>,
    pub name: Option<String>,
    /// The referring slice's namespace when absent.
    pub namespace: Option<String>,
    pub api_version: Ignored,
    pub uid: Ignored,
    pub resource_version: Ignored,
    pub field_path: Ignored,
}

/// A core `Pod`: its labels (whether it runs a sidecar) and service account (who it runs as).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Pod {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
    pub api_version: Ignored,
    pub kind: Ignored,
    pub status: Ignored,
}

impl Pod {
    /// `spec.serviceAccountName`, else the deprecated `spec.serviceAccount`, else `default`
    /// (what Kubernetes runs a pod as when neither is set).
    pub fn service_account(&self) -> &str {
        self.spec
            .service_account_name
            .as_deref()
            .or(self.spec.service_account.as_deref())
            .filter(|sa| !sa.is_empty())
            .unwrap_or("default")
    }
}

/// The part of a Pod's spec the controller reads. Pod specs are large (containers, volumes, …)
/// and none of the rest matters here, so unlike every other type, unknown fields are ignored
/// rather than refused; the fields read are still typed.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodSpec {
    pub service_account_name: Option<String>,
    /// Deprecated alias of `serviceAccountName`, still accepted by Kubernetes.
    pub service_account: Option<String>,
}

/// A core `Namespace`: its labels (`trellis.io/mtls`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Namespace {
    pub metadata: ObjectMeta,
    pub spec: Ignored,
    pub status: Ignored,
    pub api_version: Ignored,
    pub kind: Ignored,
}

/// The API version of Trellis' own kinds; a kind of the same name from another group (Istio's
/// `AuthorizationPolicy`) is not ours and is skipped.
pub const TRELLIS_API_VERSION: &str = "trellis.io/v1alpha1";

/// Trellis `AuthorizationPolicy` (schema in `examples/mesh/authorization-policy-crd.yaml`): who
/// may call the workloads it selects. Parsing checks the shape; what the values mean (an
/// identity, a CIDR) is checked by translation, which reports a bad policy on the object and
/// does not send it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    pub spec: AuthorizationPolicySpec,
    pub api_version: Ignored,
    pub kind: Ignored,
    pub status: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Absent: every workload of the namespace.
    pub selector: Option<LabelSelector>,
    /// `ALLOW` or `DENY`.
    pub action: Option<String>,
    pub rules: Vec<AuthorizationRule>,
}

/// A label selector with `matchLabels` only (`matchExpressions` is not supported, and refused
/// rather than ignored: ignoring it would select more workloads than meant).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct AuthorizationRule {
    /// Default `rules[<index>]`.
    pub name: Option<String>,
    pub from: Option<RuleFrom>,
    pub to: Option<RuleTo>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RuleFrom {
    /// SPIFFE IDs: exact, `spiffe://<td>/ns/<ns>/sa/*`, or `*`.
    pub identities: Vec<String>,
    pub cidrs: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RuleTo {
    /// Wider than a port so that 0 or 70000 is reported by translation as out of range.
    pub ports: Vec<u32>,
    pub methods: Vec<String>,
    pub paths: Vec<RulePath>,
}

/// Exactly one of `exact` and `prefix`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RulePath {
    pub exact: Option<String>,
    pub prefix: Option<String>,
}

/// EndpointSlice conditions; Kubernetes reads an absent `ready` or `serving` as true and an
/// absent `terminating` as false.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Conditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: Option<u16>,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Gateway {
    pub metadata: ObjectMeta,
    pub spec: GatewaySpec,
    pub api_version: Ignored,
    pub kind: Ignored,
    pub status: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct GatewaySpec {
    pub gateway_class_name: Option<String>,
    pub listeners: Vec<GatewayListener>,
    pub addresses: Ignored,
    pub infrastructure: Ignored,
    #[serde(rename = "backendTLS")]
    pub backend_tls: Ignored,
    pub allowed_listeners: Ignored,
    /// Gateway-wide TLS (Gateway API v1.3+): client-certificate validation for its listeners.
    pub tls: Option<GatewayTlsConfig>,
}

/// A Gateway's `spec.tls`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct GatewayTlsConfig {
    pub backend: Ignored,
    pub frontend: Option<FrontendTls>,
}

/// `spec.tls.frontend`: what terminating listeners ask of clients, by default and per port.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FrontendTls {
    pub default: FrontendTlsConfig,
    pub per_port: Vec<FrontendTlsPerPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FrontendTlsConfig {
    pub validation: Option<FrontendValidation>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FrontendTlsPerPort {
    pub port: u16,
    pub tls: FrontendTlsConfig,
}

/// Client-certificate validation (GEP-91): CAs from ConfigMaps (`ca.crt`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FrontendValidation {
    #[serde(rename = "caCertificateRefs")]
    pub ca_certificate_refs: Vec<SecretObjectRef>,
    /// `AllowValidOnly` (the default) or `AllowInsecureFallback`.
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct GatewayListener {
    pub name: String,
    pub port: u16,
    pub protocol: String,
    pub hostname: Option<String>,
    pub tls: Option<GatewayTls>,
    pub allowed_routes: Ignored,
}

/// A Gateway listener's `tls:`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct GatewayTls {
    /// `Terminate` (the default) or `Passthrough`.
    pub mode: Option<String>,
    pub certificate_refs: Vec<SecretObjectRef>,
    pub options: Ignored,
    /// Client-certificate validation of this listener (before Gateway API v1.3).
    pub frontend_validation: Option<FrontendValidation>,
}

/// A reference to a Secret (`certificateRefs`) or, by kind, a ConfigMap.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct SecretObjectRef {
    /// Core (`""`) by default.
    pub group: Option<String>,
    /// `Secret` by default.
    pub kind: Option<String>,
    pub name: String,
    /// The referring object's namespace by default.
    pub namespace: Option<String>,
}

/// A core `Secret`. Its `data` holds private keys: `Debug` shows the names of its keys only, so
/// no log line or error can carry their values.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Secret {
    pub metadata: ObjectMeta,
    /// `kubernetes.io/tls` for certificates; other types are not used.
    #[serde(rename = "type")]
    pub kind_of_secret: Option<String>,
    /// Values in base64, as the Kubernetes API stores them.
    pub data: BTreeMap<String, String>,
    /// Values as plain text; a key here wins over the same key in `data`, as in Kubernetes.
    pub string_data: BTreeMap<String, String>,
    pub immutable: Ignored,
    pub api_version: Ignored,
    pub kind: Ignored,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("metadata", &self.metadata)
            .field("type", &self.kind_of_secret)
            .field("data", &self.data.keys().collect::<Vec<_>>())
            .field("string_data", &self.string_data.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Secret {
    /// The value of `key`: `stringData` as is, else `data` decoded from base64. `Err` says why
    /// without the value.
    pub fn value(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        use base64::Engine;
        if let Some(v) = self.string_data.get(key) {
            return Ok(Some(v.clone().into_bytes()));
        }
        let Some(v) = self.data.get(key) else {
            return Ok(None);
        };
        let compact: String = v.split_whitespace().collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map(Some)
            .map_err(|_| format!("data.{key} is not valid base64"))
    }
}

/// A core `ConfigMap`: CA bundles for `BackendTLSPolicy` (`ca.crt`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ConfigMap {
    pub metadata: ObjectMeta,
    pub data: BTreeMap<String, String>,
    pub binary_data: Ignored,
    pub immutable: Ignored,
    pub api_version: Ignored,
    pub kind: Ignored,
}

/// Gateway API `ReferenceGrant`: lets objects of `from` refer to objects of `to` in its own
/// namespace.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ReferenceGrant {
    pub metadata: ObjectMeta,
    pub spec: ReferenceGrantSpec,
    pub api_version: Ignored,
    pub kind: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ReferenceGrantSpec {
    pub from: Vec<GrantFrom>,
    pub to: Vec<GrantTo>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct GrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct GrantTo {
    pub group: String,
    pub kind: String,
    /// Unset: every object of the kind.
    pub name: Option<String>,
}

/// Gateway API `BackendTLSPolicy`: TLS from the gateway to the Services it targets.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct BackendTlsPolicy {
    pub metadata: ObjectMeta,
    pub spec: BackendTlsPolicySpec,
    pub api_version: Ignored,
    pub kind: Ignored,
    pub status: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct BackendTlsPolicySpec {
    pub target_refs: Vec<PolicyTargetRef>,
    pub validation: BackendTlsValidation,
    pub options: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct PolicyTargetRef {
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    pub section_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct BackendTlsValidation {
    /// The server name sent and verified.
    pub hostname: String,
    /// ConfigMaps (key `ca.crt`) of trusted CAs; exclusive with `wellKnownCACertificates`.
    #[serde(rename = "caCertificateRefs")]
    pub ca_certificate_refs: Vec<SecretObjectRef>,
    /// `System`: the proxy's system roots.
    #[serde(rename = "wellKnownCACertificates")]
    pub well_known_ca_certificates: Option<String>,
    /// Names the backend's certificate must carry one of, instead of `hostname`.
    pub subject_alt_names: Vec<SubjectAltName>,
}

/// A BackendTLSPolicy `subjectAltNames` entry: `type` says which of the other fields is set.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct SubjectAltName {
    /// `Hostname` or `URI`.
    #[serde(rename = "type")]
    pub kind: String,
    pub hostname: Option<String>,
    pub uri: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct HttpRoute {
    pub metadata: ObjectMeta,
    pub spec: HttpRouteSpec,
    pub api_version: Ignored,
    pub kind: Ignored,
    pub status: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub hostnames: Vec<String>,
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u16>,
}

impl ParentRef {
    /// A GAMMA parent: the route applies to traffic addressed to a Service.
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service") && matches!(self.group.as_deref(), None | Some(""))
    }

    /// A Gateway parent (the default kind).
    pub fn is_gateway(&self) -> bool {
        matches!(self.kind.as_deref(), None | Some("Gateway"))
            && matches!(
                self.group.as_deref(),
                None | Some("gateway.networking.k8s.io")
            )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct HttpRouteRule {
    pub name: Option<String>,
    pub matches: Vec<HttpRouteMatch>,
    pub filters: Vec<HttpRouteFilter>,
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Option<Timeouts>,
    pub retry: Option<Retry>,
    pub session_persistence: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct HttpRouteMatch {
    pub path: Option<PathMatch>,
    pub headers: Vec<ValueMatch>,
    pub query_params: Vec<ValueMatch>,
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ValueMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_redirect: Option<RequestRedirect>,
    #[serde(rename = "urlRewrite")]
    pub url_rewrite: Option<UrlRewrite>,
    pub request_mirror: Ignored,
    pub extension_ref: Ignored,
    pub cors: Ignored,
    pub external_auth: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct HeaderModifier {
    pub set: Vec<NameValue>,
    pub add: Vec<NameValue>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RequestRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status_code: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
    pub weight: Option<u32>,
    pub filters: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Timeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Retry {
    pub attempts: Option<u32>,
    pub backoff: Option<String>,
    pub codes: Vec<u16>,
}

/// Gateway API `TLSRoute` (v1alpha2): TLS connections routed by their SNI server name, to one
/// backend, either passed through or terminated by the listener.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct TlsRoute {
    pub metadata: ObjectMeta,
    pub spec: TlsRouteSpec,
    pub api_version: Ignored,
    pub kind: Ignored,
    pub status: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct TlsRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub hostnames: Vec<String>,
    pub rules: Vec<L4RouteRule>,
}

/// Gateway API `TCPRoute` (v1alpha2): every connection of a listener to one backend.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct TcpRoute {
    pub metadata: ObjectMeta,
    pub spec: TcpRouteSpec,
    pub api_version: Ignored,
    pub kind: Ignored,
    pub status: Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct TcpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub rules: Vec<L4RouteRule>,
}

/// A rule of a TLSRoute or TCPRoute: backends only (these routes match nothing else).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct L4RouteRule {
    pub name: Option<String>,
    pub backend_refs: Vec<BackendRef>,
}

/// Just enough of a document to pick its type.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    kind: Option<String>,
    api_version: Option<String>,
}

/// Parses every document of a multi-document YAML text. Documents of other kinds are skipped;
/// any document that does not parse rejects the whole text (the caller keeps the last good
/// content of the file).
pub fn parse_documents(text: &str) -> Result<Vec<Manifest>, ParseError> {
    let mut out = Vec::new();
    for (first_line, doc) in split_documents(text) {
        let at = |e: serde_yaml::Error| {
            let mut reason = e.to_string();
            let mut line = first_line;
            if let Some(l) = e.location() {
                line += l.line().saturating_sub(1);
                // serde_yaml counts lines within the document; the line that counts is the
                // file's, given apart.
                let suffix = format!(" at line {} column {}", l.line(), l.column());
                if let Some(stripped) = reason.strip_suffix(&suffix) {
                    reason = format!("{stripped} (column {})", l.column());
                }
            }
            ParseError { line, reason }
        };
        let Some(meta) = serde_yaml::from_str::<Option<TypeMeta>>(doc).map_err(at)? else {
            continue; // an empty document
        };
        let manifest = match meta.kind.as_deref() {
            Some("Service") => Manifest::Service(serde_yaml::from_str(doc).map_err(at)?),
            Some("EndpointSlice") => {
                Manifest::EndpointSlice(serde_yaml::from_str(doc).map_err(at)?)
            }
            Some("Gateway") => Manifest::Gateway(serde_yaml::from_str(doc).map_err(at)?),
            Some("HTTPRoute") => Manifest::HttpRoute(serde_yaml::from_str(doc).map_err(at)?),
            Some("Secret") => Manifest::Secret(serde_yaml::from_str(doc).map_err(at)?),
            Some("ConfigMap") => Manifest::ConfigMap(serde_yaml::from_str(doc).map_err(at)?),
            Some("ReferenceGrant") => {
                Manifest::ReferenceGrant(serde_yaml::from_str(doc).map_err(at)?)
            }
            Some("BackendTLSPolicy") => {
                Manifest::BackendTlsPolicy(serde_yaml::from_str(doc).map_err(at)?)
            }
            Some("TLSRoute") => Manifest::TlsRoute(serde_yaml::from_str(doc).map_err(at)?),
            Some("TCPRoute") => Manifest::TcpRoute(serde_yaml::from_str(doc).map_err(at)?),
            Some("Pod") => Manifest::Pod(serde_yaml::from_str(doc).map_err(at)?),
            Some("Namespace") => Manifest::Namespace(serde_yaml::from_str(doc).map_err(at)?),
            Some("AuthorizationPolicy")
                if meta.api_version.as_deref() == Some(TRELLIS_API_VERSION) =>
            {
                Manifest::AuthorizationPolicy(serde_yaml::from_str(doc).map_err(at)?)
            }
            // A mistyped version of our own group would otherwise be skipped silently, and
            // with it the policy.
            Some(kind @ "AuthorizationPolicy")
                if meta
                    .api_version
                    .as_deref()
                    .is_some_and(|v| v.starts_with("trellis.io/")) =>
            {
                return Err(ParseError {
                    line: first_line,
                    reason: format!(
                        "apiVersion {:?} of {kind} is not served (use {TRELLIS_API_VERSION})",
                        meta.api_version.unwrap_or_default()
                    ),
                });
            }
            Some(other) => {
                // Said once per edit of the file, so a mistyped kind (`HttpRoute`) is not
                // silent; other Kubernetes objects in the same directory are fine.
                tracing::info!(
                    kind = other,
                    line = first_line,
                    "skipping a kind the controller does not read (it reads Service, \
                     EndpointSlice, Secret, ConfigMap, Pod, Namespace, Gateway, HTTPRoute, \
                     TLSRoute, TCPRoute, ReferenceGrant, BackendTLSPolicy, and \
                     AuthorizationPolicy of trellis.io/v1alpha1)"
                );
                continue;
            }
            None => {
                return Err(ParseError {
                    line: first_line,
                    reason: "document has no `kind`".into(),
                });
            }
        };
        validate(&manifest).map_err(|reason| ParseError {
            line: first_line,
            reason,
        })?;
        out.push(manifest);
    }
    Ok(out)
}

/// Splits on `---` separator lines, keeping each document's first line (1-based) so errors can
/// point into the file rather than into the document.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = index + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs
}

/// Checks what serde cannot: names present, values the translator relies on well-formed.
fn validate(manifest: &Manifest) -> Result<(), String> {
    let meta = match manifest {
        Manifest::Service(s) => &s.metadata,
        Manifest::EndpointSlice(s) => &s.metadata,
        Manifest::Gateway(g) => &g.metadata,
        Manifest::HttpRoute(r) => &r.metadata,
        Manifest::Secret(s) => &s.metadata,
        Manifest::ConfigMap(c) => &c.metadata,
        Manifest::ReferenceGrant(g) => &g.metadata,
        Manifest::BackendTlsPolicy(p) => &p.metadata,
        Manifest::TlsRoute(r) => &r.metadata,
        Manifest::TcpRoute(r) => &r.metadata,
        Manifest::Pod(p) => &p.metadata,
        Manifest::Namespace(n) => &n.metadata,
        Manifest::AuthorizationPolicy(p) => &p.metadata,
    };
    if meta.name.is_empty() {
        return Err("metadata.name is required".into());
    }
    if let Manifest::HttpRoute(route) = manifest {
        for (i, rule) in route.spec.rules.iter().enumerate() {
            if let Some(timeouts) = &rule.timeouts {
                let parse = |field: &str, value: &Option<String>| {
                    value
                        .as_deref()
                        .map(parse_duration_ms)
                        .transpose()
                        .map_err(|e| format!("spec.rules[{i}].timeouts.{field}: {e}"))
                };
                let request = parse("request", &timeouts.request)?;
                let backend = parse("backendRequest", &timeouts.backend_request)?;
                // GEP-1742: one try may not be allowed longer than the whole request ("0s" is
                // no limit, and may be given for either).
                if let (Some(request @ 1..), Some(backend)) = (request, backend)
                    && backend > request
                {
                    return Err(format!(
                        "spec.rules[{i}].timeouts.backendRequest: {} is longer than the request \
                         timeout {}",
                        timeouts.backend_request.as_deref().unwrap_or_default(),
                        timeouts.request.as_deref().unwrap_or_default(),
                    ));
                }
            }
            if let Some(retry) = &rule.retry {
                if let Some(backoff) = &retry.backoff {
                    parse_duration_ms(backoff)
                        .map_err(|e| format!("spec.rules[{i}].retry.backoff: {e}"))?;
                }
                // The range the Gateway API schema allows.
                if let Some((j, code)) = retry
                    .codes
                    .iter()
                    .enumerate()
                    .find(|(_, c)| !(400..=599).contains(*c))
                {
                    return Err(format!(
                        "spec.rules[{i}].retry.codes[{j}]: {code} is not a status from 400 to 599"
                    ));
                }
            }
            for (j, m) in rule.matches.iter().enumerate() {
                if let Some(path) = &m.path {
                    match path.kind.as_deref() {
                        None | Some("PathPrefix" | "Exact" | "RegularExpression") => {}
                        Some(other) => {
                            return Err(format!(
                                "spec.rules[{i}].matches[{j}].path.type: unsupported {other:?}"
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Parses a Gateway API duration (`1h`, `30s`, `500ms`, `1m30s`) into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let mut total: u64 = 0;
    let mut rest = text;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("duration {text:?}: expected a number"));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("duration {text:?}: number too large"))?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else {
            return Err(format!("duration {text:?}: expected a unit h, m, s or ms"));
        };
        rest = &rest[len..];
        total = total.saturating_add(value.saturating_mul(unit_ms));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert!(parse_duration_ms("10").is_err());
        assert!(parse_duration_ms("s").is_err());
        assert!(parse_duration_ms("").is_err());
    }

    #[test]
    fn multi_document_with_error_line() {
        let text = "kind: Service\nmetadata: {name: a}\n---\n# comment\nkind: Service\nmetadata:\n  name: [oops\n";
        let err = parse_documents(text).unwrap_err();
        assert!(err.line >= 5, "{err}");
        let ok = "---\nkind: Service\nmetadata: {name: a}\n---\n---\nkind: Deployment\nmetadata: {name: b}\n";
        assert_eq!(parse_documents(ok).unwrap().len(), 1);
    }

    #[test]
    fn route_timeouts_and_retry_codes_are_checked() {
        let route = |rule: &str| {
            parse_documents(&format!(
                "kind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  rules: [{rule}]\n"
            ))
        };
        assert!(
            route("{timeouts: {request: 10s, backendRequest: 2s}, retry: {codes: [503]}}").is_ok()
        );
        assert!(route("{timeouts: {request: 0s, backendRequest: 2s}}").is_ok());
        assert!(route("{timeouts: {request: 1s, backendRequest: 0s}}").is_ok());
        for (rule, error) in [
            (
                "{timeouts: {backendRequest: 2}}",
                "spec.rules[0].timeouts.backendRequest: duration \"2\"",
            ),
            (
                "{timeouts: {request: 1s, backendRequest: 2s}}",
                "spec.rules[0].timeouts.backendRequest: 2s is longer than the request timeout 1s",
            ),
            (
                "{retry: {codes: [503, 200]}}",
                "spec.rules[0].retry.codes[1]: 200 is not a status from 400 to 599",
            ),
        ] {
            let err = route(rule).unwrap_err();
            assert!(err.reason.starts_with(error), "{rule}: {err}");
        }
    }

    #[test]
    fn missing_name_is_rejected() {
        let err = parse_documents("kind: Service\nspec: {}\n").unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.reason.contains("metadata.name"));
    }
}

#[cfg(test)]
mod strict_tests {
    use super::*;

    #[test]
    fn unknown_fields_are_named_with_their_line() {
        let cases = [
            (
                "kind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules:\n    - backendRef: [{name: web, port: 80}]\n",
                5,
                "spec.rules[0]: unknown field `backendRef`",
            ),
            (
                "kind: Service\nmetadata:\n  name: a\n  namespce: shop\n",
                4,
                "metadata: unknown field `namespce`",
            ),
            (
                "---\nkind: Service\nmetadata: {name: a}\n---\nkind: Gateway\nmetadata: {name: g}\nspec:\n  listeners:\n    - {name: web, port: 80, protocol: HTTP, hostnames: [a]}\n",
                9,
                "spec.listeners[0]: unknown field `hostnames`",
            ),
        ];
        for (text, line, reason) in cases {
            let err = parse_documents(text).unwrap_err();
            assert_eq!(err.line, line, "{text}: {err}");
            assert!(err.reason.starts_with(reason), "{text}: {err}");
        }
    }

    #[test]
    fn fields_the_apis_define_are_accepted() {
        let text = "
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {a: b}
  uid: 1234
  resourceVersion: '5'
  creationTimestamp: '2024-01-01T00:00:00Z'
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  sessionAffinity: None
  ports: [{name: http, port: 80, nodePort: 30080}]
status: {loadBalancer: {}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  rules:
    - backendRefs: [{name: web, port: 80, filters: []}]
      filters: [{type: RequestMirror, requestMirror: {backendRef: {name: web, port: 80}}}]
";
        assert_eq!(parse_documents(text).unwrap().len(), 2);
    }

    #[test]
    fn pods_namespaces_and_target_refs_parse_with_the_fields_read() {
        let text = "
apiVersion: v1
kind: Pod
metadata: {name: b-1, namespace: shop, labels: {trellis.io/sidecar: 'true'}}
spec:
  serviceAccountName: b
  containers: [{name: app, image: b, ports: [{containerPort: 8080}]}]
  volumes: [{name: token, projected: {sources: []}}]
  someFieldOfALaterKubernetes: {x: 1}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {trellis.io/mtls: strict}}
spec: {finalizers: [kubernetes]}
status: {phase: Active}
---
kind: EndpointSlice
metadata: {name: s, namespace: shop, annotations: {trellis.io/service-account: b}}
endpoints:
  - addresses: [10.0.0.1]
    targetRef: {kind: Pod, name: b-1, namespace: shop, uid: 12, resourceVersion: '3'}
";
        let parsed = parse_documents(text).unwrap();
        let Manifest::Pod(pod) = &parsed[0] else {
            panic!("{parsed:?}")
        };
        assert_eq!(pod.service_account(), "b");
        let Manifest::Namespace(ns) = &parsed[1] else {
            panic!("{parsed:?}")
        };
        assert_eq!(ns.metadata.labels["trellis.io/mtls"], "strict");
        let Manifest::EndpointSlice(slice) = &parsed[2] else {
            panic!("{parsed:?}")
        };
        let target = slice.endpoints[0].target_ref.as_ref().unwrap();
        assert_eq!(
            (target.kind.as_deref(), target.name.as_deref()),
            (Some("Pod"), Some("b-1"))
        );
        assert_eq!(
            slice.metadata.annotations["trellis.io/service-account"],
            "b"
        );
        let no_account = parse_documents("kind: Pod\nmetadata: {name: p}\nspec: {}\n").unwrap();
        let Manifest::Pod(pod) = &no_account[0] else {
            panic!()
        };
        assert_eq!(pod.service_account(), "default");
    }

    #[test]
    fn mesh_kinds_are_strict_where_it_matters() {
        let cases = [
            (
                "kind: Pod\nmetadata: {name: p}\nspec:\n  serviceAccountName: [a]\n",
                4,
                "spec.serviceAccountName: invalid type",
            ),
            (
                "kind: Pod\nmetadata: {name: p}\nsepc: {}\n",
                3,
                "unknown field `sepc`",
            ),
            (
                "kind: EndpointSlice\nmetadata: {name: s}\nendpoints:\n  - addresses: [10.0.0.1]\n    targetRef: {kind: Pod, nmae: p}\n",
                5,
                "endpoints[0].targetRef: unknown field `nmae`",
            ),
            (
                "apiVersion: trellis.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: ALLOW\n  rules:\n  - from: {identity: [a]}\n",
                7,
                "spec.rules[0].from: unknown field `identity`",
            ),
            (
                "apiVersion: trellis.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchExpressions: []}\n",
                5,
                "spec.selector: unknown field `matchExpressions`",
            ),
            (
                "apiVersion: trellis.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules: [{to: {ports: [http]}}]\n",
                5,
                "spec.rules[0].to.ports[0]: invalid type",
            ),
            (
                "---\napiVersion: trellis.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
                2,
                "apiVersion \"trellis.io/v1\" of AuthorizationPolicy is not served (use trellis.io/v1alpha1)",
            ),
        ];
        for (text, line, reason) in cases {
            let err = parse_documents(text).unwrap_err();
            assert_eq!(err.line, line, "{text}: {err}");
            assert!(err.reason.starts_with(reason), "{text}: {err}");
        }
        // Istio's kind of the same name is another API: skipped, not parsed as ours.
        let istio = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: CUSTOM, provider: {name: x}}\n";
        assert_eq!(parse_documents(istio).unwrap(), []);
    }

    /// The examples users start from must parse under the strict rules.
    #[test]
    fn examples_and_fixtures_parse() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut parsed = 0;
        for dir in ["../examples/cluster", "tests/fixtures/mesh"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if !matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml")
                ) {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                if let Err(e) = parse_documents(&text) {
                    panic!("{}: {e}", path.display());
                }
                parsed += 1;
            }
        }
        assert!(parsed >= 4, "only {parsed} files found");
    }
}
