//! The in-memory catalog every source feeds and every translation reads: services, their
//! endpoint slices, gateways and routes, and for the mesh Pods, Namespaces and authorization
//! policies, keyed by namespace and name. Plain data, rebuilt whole
//! on each change and shared as `Arc<Catalog>` through a `watch` channel.

use std::collections::BTreeMap;

use crate::source::manifest::{
    AuthorizationPolicy, BackendTlsPolicy, ConfigMap, EndpointSlice, Gateway, HttpRoute, Manifest,
    Namespace, Pod, ReferenceGrant, Secret, Service, TcpRoute, TlsRoute,
};

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        ObjectKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    pub services: BTreeMap<ObjectKey, Service>,
    /// Keyed by the slice's own name.
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    pub gateways: BTreeMap<ObjectKey, Gateway>,
    pub http_routes: BTreeMap<ObjectKey, HttpRoute>,
    pub secrets: BTreeMap<ObjectKey, Secret>,
    pub config_maps: BTreeMap<ObjectKey, ConfigMap>,
    pub reference_grants: BTreeMap<ObjectKey, ReferenceGrant>,
    pub backend_tls_policies: BTreeMap<ObjectKey, BackendTlsPolicy>,
    pub tls_routes: BTreeMap<ObjectKey, TlsRoute>,
    pub tcp_routes: BTreeMap<ObjectKey, TcpRoute>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    /// Namespaces are not namespaced: keyed by name.
    pub namespaces: BTreeMap<String, Namespace>,
    pub authorization_policies: BTreeMap<ObjectKey, AuthorizationPolicy>,
    /// Service → the keys of its endpoint slices, built with the catalog: finding a service's
    /// slices by scanning them all made translation quadratic in the catalog's size.
    slices_by_service: BTreeMap<ObjectKey, Vec<ObjectKey>>,
    /// Service → the HTTPRoutes with a parentRef naming it (GAMMA), in route-key order: for the
    /// same reason.
    routes_by_parent_service: BTreeMap<ObjectKey, Vec<ObjectKey>>,
}

impl Catalog {
    /// Builds a catalog from objects in source order; a later object with the same kind,
    /// namespace and name replaces an earlier one (the caller logs nothing: sources decide).
    pub fn from_manifests<'a>(manifests: impl IntoIterator<Item = &'a Manifest>) -> Self {
        let mut catalog = Catalog::default();
        for manifest in manifests {
            match manifest {
                Manifest::Service(s) => {
                    let key = ObjectKey::new(s.metadata.namespace(), &s.metadata.name);
                    catalog.services.insert(key, s.clone());
                }
                Manifest::EndpointSlice(s) => {
                    let key = ObjectKey::new(s.metadata.namespace(), &s.metadata.name);
                    catalog.endpoint_slices.insert(key, s.clone());
                }
                Manifest::Gateway(g) => {
                    let key = ObjectKey::new(g.metadata.namespace(), &g.metadata.name);
                    catalog.gateways.insert(key, g.clone());
                }
                Manifest::HttpRoute(r) => {
                    let key = ObjectKey::new(r.metadata.namespace(), &r.metadata.name);
                    catalog.http_routes.insert(key, r.clone());
                }
                Manifest::Secret(s) => {
                    let key = ObjectKey::new(s.metadata.namespace(), &s.metadata.name);
                    catalog.secrets.insert(key, s.clone());
                }
                Manifest::ConfigMap(c) => {
                    let key = ObjectKey::new(c.metadata.namespace(), &c.metadata.name);
                    catalog.config_maps.insert(key, c.clone());
                }
                Manifest::ReferenceGrant(g) => {
                    let key = ObjectKey::new(g.metadata.namespace(), &g.metadata.name);
                    catalog.reference_grants.insert(key, g.clone());
                }
                Manifest::BackendTlsPolicy(p) => {
                    let key = ObjectKey::new(p.metadata.namespace(), &p.metadata.name);
                    catalog.backend_tls_policies.insert(key, p.clone());
                }
                Manifest::TlsRoute(r) => {
                    let key = ObjectKey::new(r.metadata.namespace(), &r.metadata.name);
                    catalog.tls_routes.insert(key, r.clone());
                }
                Manifest::TcpRoute(r) => {
                    let key = ObjectKey::new(r.metadata.namespace(), &r.metadata.name);
                    catalog.tcp_routes.insert(key, r.clone());
                }
                Manifest::Pod(p) => {
                    let key = ObjectKey::new(p.metadata.namespace(), &p.metadata.name);
                    catalog.pods.insert(key, p.clone());
                }
                Manifest::Namespace(n) => {
                    catalog
                        .namespaces
                        .insert(n.metadata.name.clone(), n.clone());
                }
                Manifest::AuthorizationPolicy(p) => {
                    let key = ObjectKey::new(p.metadata.namespace(), &p.metadata.name);
                    catalog.authorization_policies.insert(key, p.clone());
                }
            }
        }
        for (key, slice) in &catalog.endpoint_slices {
            if let Some(service) = slice.service_name() {
                catalog
                    .slices_by_service
                    .entry(ObjectKey::new(&key.namespace, service))
                    .or_default()
                    .push(key.clone());
            }
        }
        for (key, route) in &catalog.http_routes {
            for parent in route.spec.parent_refs.iter().filter(|p| p.is_service()) {
                let namespace = parent.namespace.as_deref().unwrap_or(&key.namespace);
                let routes = catalog
                    .routes_by_parent_service
                    .entry(ObjectKey::new(namespace, &parent.name))
                    .or_default();
                // Several parentRefs to one Service (one per port) list the route once.
                if routes.last() != Some(key) {
                    routes.push(key.clone());
                }
            }
        }
        catalog
    }

    /// The HTTPRoutes with a parentRef naming `service`, with their keys, in key order.
    pub fn routes_of_service<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a HttpRoute)> {
        self.routes_by_parent_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| self.http_routes.get_key_value(key))
    }

    /// The endpoint slices of a service (label `kubernetes.io/service-name`, same namespace), in
    /// slice-name order.
    pub fn slices_of<'a>(
        &'a self,
        service: &'a ObjectKey,
    ) -> impl Iterator<Item = &'a EndpointSlice> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| self.endpoint_slices.get(key))
    }
}
