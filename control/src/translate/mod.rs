//! Catalog → resources for one proxy. A gateway sees its Gateway's listeners and the HTTPRoutes
//! bound to it; a sidecar sees every Service it may call and its own inbound listeners.
//! Pure functions: the same catalog and node always give the same snapshot.

mod cluster;
mod gateway;
mod l4;
pub mod policy;
mod route;
mod sidecar;
mod status;
pub mod tls;

use std::collections::BTreeMap;

use trellis_proto::discovery::v1 as api;

use crate::{catalog::Catalog, catalog::ObjectKey, resource::Snapshot};

pub use cluster::cluster_name;
pub use status::{node_diagnostics, object_diagnostics};

/// Node label: the IP a gateway binds its listeners on (default `0.0.0.0`).
pub const BIND_IP_LABEL: &str = "trellis.io/bind-ip";
/// Node label: a sidecar's own IP; its inbound listeners are bound on it.
pub const POD_IP_LABEL: &str = "trellis.io/pod-ip";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Gateway,
    Sidecar,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Sidecar => "sidecar",
        }
    }
}

/// A proxy's identity, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeInfo {
    pub id: String,
    pub role: Role,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// The Gateway a gateway serves.
    pub gateway: Option<ObjectKey>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("node.id is empty")]
    MissingId,
    #[error("node.role {0} is not GATEWAY or SIDECAR")]
    BadRole(i32),
    #[error("node.gateway_name is required for a gateway")]
    MissingGateway,
}

impl TryFrom<&api::Node> for NodeInfo {
    type Error = NodeError;

    fn try_from(node: &api::Node) -> Result<Self, NodeError> {
        if node.id.is_empty() {
            return Err(NodeError::MissingId);
        }
        let role = match api::Role::try_from(node.role) {
            Ok(api::Role::Gateway) => Role::Gateway,
            Ok(api::Role::Sidecar) => Role::Sidecar,
            _ => return Err(NodeError::BadRole(node.role)),
        };
        let namespace = if node.namespace.is_empty() {
            "default".to_owned()
        } else {
            node.namespace.clone()
        };
        let gateway = match role {
            Role::Gateway if node.gateway_name.is_empty() => {
                return Err(NodeError::MissingGateway);
            }
            Role::Gateway => Some(match node.gateway_name.split_once('/') {
                Some((ns, name)) => ObjectKey::new(ns, name),
                None => ObjectKey::new(&namespace, &node.gateway_name),
            }),
            Role::Sidecar => None,
        };
        Ok(NodeInfo {
            id: node.id.clone(),
            role,
            namespace,
            service_account: node.service_account.clone(),
            labels: node.labels.clone().into_iter().collect(),
            gateway,
        })
    }
}

/// What a translation depends on: the node without its id. Nodes of one class get the same
/// resources from the same catalog, so one translation serves them all.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeClass {
    role: Role,
    namespace: String,
    service_account: String,
    labels: BTreeMap<String, String>,
    gateway: Option<ObjectKey>,
}

impl NodeClass {
    pub fn of(node: &NodeInfo) -> NodeClass {
        NodeClass {
            role: node.role,
            namespace: node.namespace.clone(),
            service_account: node.service_account.clone(),
            labels: node.labels.clone(),
            gateway: node.gateway.clone(),
        }
    }
}

/// What translation needs of the controller's own settings (not of the catalog or the node),
/// fixed at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// The SPIFFE trust domain, only when the controller runs a CA: without one no sidecar
    /// holds a certificate, so no endpoint is marked meshed.
    pub trust_domain: Option<String>,
}

/// Everything `node` should hold, given the catalog, for a controller without a CA.
pub fn translate(catalog: &Catalog, node: &NodeInfo) -> Snapshot {
    translate_in(&Context::default(), catalog, node)
}

/// Everything `node` should hold, given the catalog and the controller's settings.
pub fn translate_in(context: &Context, catalog: &Catalog, node: &NodeInfo) -> Snapshot {
    let mut snapshot = match node.role {
        Role::Gateway => gateway::translate(catalog, node),
        Role::Sidecar => sidecar::translate(context, catalog, node),
    };
    snapshot.forget_absent_clusters();
    snapshot
}

#[cfg(test)]
mod l4_tests;
#[cfg(test)]
mod mesh_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
