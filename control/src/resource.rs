//! Versioned resources: what translation produces for one proxy and what the stream diffs
//! against what that proxy holds.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use prost::Message;
use trellis_proto::discovery::v1::{self as api, resource::Kind};

/// The resource types the controller serves, in the order it sends them (SDS, policies, CDS,
/// EDS, LDS, RDS): secrets first, so what names one never arrives before it; policies before
/// listeners, so a sidecar's inbound listener does not start serving before the policies that
/// restrict it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceType {
    Secret,
    Policy,
    Cluster,
    ClusterLoadAssignment,
    Listener,
    RouteConfiguration,
}

impl ResourceType {
    pub const ALL: [ResourceType; 6] = [
        ResourceType::Secret,
        ResourceType::Policy,
        ResourceType::Cluster,
        ResourceType::ClusterLoadAssignment,
        ResourceType::Listener,
        ResourceType::RouteConfiguration,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Secret => api::SECRET_TYPE,
            ResourceType::Policy => api::POLICY_TYPE,
            ResourceType::Cluster => api::CLUSTER_TYPE,
            ResourceType::ClusterLoadAssignment => api::CLUSTER_LOAD_ASSIGNMENT_TYPE,
            ResourceType::Listener => api::LISTENER_TYPE,
            ResourceType::RouteConfiguration => api::ROUTE_CONFIGURATION_TYPE,
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// Wildcard types send everything meant for the proxy; the others only subscribed names.
    pub fn is_wildcard(self) -> bool {
        matches!(
            self,
            ResourceType::Secret
                | ResourceType::Policy
                | ResourceType::Cluster
                | ResourceType::Listener
        )
    }

    /// Short name for logs and the status page.
    pub fn short_name(self) -> &'static str {
        match self {
            ResourceType::Secret => "secrets",
            ResourceType::Policy => "policies",
            ResourceType::Cluster => "clusters",
            ResourceType::ClusterLoadAssignment => "endpoints",
            ResourceType::Listener => "listeners",
            ResourceType::RouteConfiguration => "routes",
        }
    }
}

/// One resource with what it names, so the stream can order sends and removals.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub resource: api::Resource,
    /// Clusters this resource names itself (an HTTP listener names none: its route
    /// configuration does). Shared: every stream holding the resource keeps a reference, and a
    /// capture listener names every cluster.
    pub clusters: Arc<BTreeSet<String>>,
    /// Route configurations this resource names (HTTP and capture listeners).
    pub route_configs: Arc<BTreeSet<String>>,
    /// Secrets this resource names (TLS listeners and clusters).
    pub secrets: BTreeSet<String>,
}

impl Entry {
    pub fn version(&self) -> &str {
        &self.resource.version
    }
}

/// Everything one proxy should hold, by type and name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    types: BTreeMap<ResourceType, BTreeMap<String, Entry>>,
}

impl Snapshot {
    pub fn of_type(&self, t: ResourceType) -> &BTreeMap<String, Entry> {
        static EMPTY: BTreeMap<String, Entry> = BTreeMap::new();
        self.types.get(&t).unwrap_or(&EMPTY)
    }

    pub fn get(&self, t: ResourceType, name: &str) -> Option<&Entry> {
        self.of_type(t).get(name)
    }

    pub fn len(&self) -> usize {
        self.types.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops, from what listeners and route configurations name, the clusters this snapshot
    /// does not hold (a route keeps a backendRef that does not resolve under the name it would
    /// have had). The stream then neither waits for them before sending the route nor keeps
    /// such a cluster from being removed: the proxy answers that share 500.
    pub fn forget_absent_clusters(&mut self) {
        let clusters: BTreeSet<String> = self
            .of_type(ResourceType::Cluster)
            .keys()
            .cloned()
            .collect();
        for t in [ResourceType::Listener, ResourceType::RouteConfiguration] {
            if let Some(entries) = self.types.get_mut(&t) {
                for entry in entries.values_mut() {
                    if entry.clusters.iter().any(|c| !clusters.contains(c)) {
                        Arc::make_mut(&mut entry.clusters).retain(|c| clusters.contains(c));
                    }
                }
            }
        }
    }

    pub fn add_cluster(&mut self, cluster: api::Cluster) {
        let name = cluster.name.clone();
        let secrets: BTreeSet<String> = cluster
            .tls
            .iter()
            .flat_map(|t| [t.ca_secret.clone(), t.client_certificate_secret.clone()])
            .filter(|s| !s.is_empty())
            .collect();
        self.insert(ResourceType::Cluster, name, Kind::Cluster(cluster), [], [])
            .secrets = secrets;
    }

    /// Adds a secret. Its version hashes its content, key included; the version is an opaque
    /// 64-bit digest, not the key.
    pub fn add_secret(&mut self, secret: api::Secret) {
        let name = secret.name.clone();
        self.insert(ResourceType::Secret, name, Kind::Secret(secret), [], []);
    }

    /// Adds an authorization policy (it names nothing).
    pub fn add_policy(&mut self, policy: api::Policy) {
        let name = policy.name.clone();
        self.insert(ResourceType::Policy, name, Kind::Policy(policy), [], []);
    }

    pub fn add_endpoints(&mut self, cla: api::ClusterLoadAssignment) {
        let name = cla.cluster_name.clone();
        let clusters = [name.clone()];
        self.insert(
            ResourceType::ClusterLoadAssignment,
            name,
            Kind::ClusterLoadAssignment(cla),
            clusters,
            [],
        );
    }

    pub fn add_route_config(&mut self, rc: api::RouteConfiguration) {
        let name = rc.name.clone();
        let clusters = route_config_clusters(&rc);
        self.insert(
            ResourceType::RouteConfiguration,
            name,
            Kind::RouteConfiguration(rc),
            clusters,
            [],
        );
    }

    /// Adds a listener.
    pub fn add_listener(&mut self, listener: api::Listener) {
        use api::listener::Kind as L;
        let name = listener.name.clone();
        let mut clusters = BTreeSet::new();
        let mut route_configs = BTreeSet::new();
        let mut tls = None;
        match &listener.kind {
            Some(L::Http(http)) => {
                route_configs.insert(http.route_config.clone());
                tls = http.tls.as_ref();
            }
            Some(L::Tcp(tcp)) => {
                clusters.insert(tcp.cluster.clone());
                tls = tcp.tls.as_ref();
            }
            Some(L::TlsPassthrough(sni)) => {
                clusters.extend(sni.routes.iter().map(|r| r.cluster.clone()));
                if !sni.default_cluster.is_empty() {
                    clusters.insert(sni.default_cluster.clone());
                }
            }
            Some(L::Capture(capture)) => {
                for service in &capture.services {
                    if !service.cluster.is_empty() {
                        clusters.insert(service.cluster.clone());
                    }
                    if !service.route_config.is_empty() {
                        route_configs.insert(service.route_config.clone());
                    }
                }
            }
            None => {}
        }
        let secrets: BTreeSet<String> = tls
            .iter()
            .flat_map(|t| {
                t.certificates
                    .iter()
                    .map(|c| c.secret.clone())
                    .chain(t.client_certificate.iter().map(|c| c.ca_secret.clone()))
            })
            .filter(|s| !s.is_empty())
            .collect();
        self.insert(
            ResourceType::Listener,
            name,
            Kind::Listener(listener),
            clusters,
            route_configs,
        )
        .secrets = secrets;
    }

    fn insert(
        &mut self,
        t: ResourceType,
        name: String,
        kind: Kind,
        clusters: impl IntoIterator<Item = String>,
        route_configs: impl IntoIterator<Item = String>,
    ) -> &mut Entry {
        let version = version_of(&kind);
        let entry = Entry {
            resource: api::Resource {
                name: name.clone(),
                version,
                kind: Some(kind),
            },
            clusters: Arc::new(clusters.into_iter().collect()),
            route_configs: Arc::new(route_configs.into_iter().collect()),
            secrets: BTreeSet::new(),
        };
        let entries = self.types.entry(t).or_default();
        entries.insert(name.clone(), entry);
        entries.get_mut(&name).expect("just inserted")
    }
}

fn route_config_clusters(rc: &api::RouteConfiguration) -> BTreeSet<String> {
    use api::route::Action;
    rc.virtual_hosts
        .iter()
        .flat_map(|vh| &vh.routes)
        .filter_map(|r| match &r.action {
            Some(Action::Forward(f)) => Some(&f.clusters),
            _ => None,
        })
        .flatten()
        .map(|wc| wc.cluster.clone())
        .collect()
}

/// A resource's version: FNV-1a over its encoded bytes, so equal content has an equal version
/// across controller restarts (a reconnecting proxy's `initial_resource_versions` stay valid).
/// The resources hold no protobuf maps, so their encoding is deterministic.
fn version_of(kind: &Kind) -> String {
    let resource = api::Resource {
        name: String::new(),
        version: String::new(),
        kind: Some(kind.clone()),
    };
    format!("{:016x}", fnv1a(&resource.encode_to_vec()))
}

pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_continue(FNV_OFFSET, bytes)
}

/// FNV-1a's starting value, for hashing in pieces with [`fnv1a_continue`].
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Continues an FNV-1a hash over more bytes: hashing "ab" equals hashing "a" then "b".
pub fn fnv1a_continue(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
