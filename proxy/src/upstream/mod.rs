//! Upstream clusters at run time: endpoints, their connection pools and the balancer.

pub mod balancer;
pub mod pool;

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicUsize},
};

use crate::config::model;

pub use balancer::RoundRobin;
pub use pool::{EndpointPool, UpstreamError};

/// A cluster ready to take requests. Built at config-compile time; pools and the balancer position
/// carry over from the previous cluster of the same name.
#[derive(Debug)]
pub struct Cluster {
    pub name: Arc<str>,
    pub protocol: model::UpstreamProtocol,
    pub endpoints: Box<[Arc<EndpointPool>]>,
    balancer: RoundRobin,
}

impl Cluster {
    pub fn build(config: &model::Cluster, previous: Option<&Cluster>) -> Cluster {
        let reusable: HashMap<_, _> = previous
            .map(|p| {
                p.endpoints
                    .iter()
                    .filter(|e| e.same_settings(config.protocol, config.connect_timeout))
                    .map(|e| (e.address(), e.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let endpoints: Box<[Arc<EndpointPool>]> = config
            .endpoints
            .iter()
            .map(|e| {
                reusable.get(&e.address).cloned().unwrap_or_else(|| {
                    Arc::new(EndpointPool::new(
                        e.address,
                        config.protocol,
                        config.connect_timeout,
                    ))
                })
            })
            .collect();
        let weights: Vec<u32> = config.endpoints.iter().map(|e| e.weight).collect();
        let position = previous
            .map(|p| p.balancer.position())
            .unwrap_or_else(|| Arc::new(AtomicUsize::new(0)));
        Cluster {
            name: config.name.clone(),
            protocol: config.protocol,
            endpoints,
            balancer: RoundRobin::new(&weights, position),
        }
    }

    /// The endpoint for the next request or connection, or `None` when the cluster has none.
    pub fn pick(&self) -> Option<&Arc<EndpointPool>> {
        self.balancer.next().map(|i| &self.endpoints[i])
    }
}
