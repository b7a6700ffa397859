//! What a matched route does, compiled. A forward target names its cluster by slot, so a request
//! finds it with one index into the version it loaded and never looks a name up.

use std::{sync::Arc, time::Duration};

use crate::{
    config::model::{DirectResponse, Filters, Redirect, RetryPolicy},
    ratelimit::RateLimiter,
    telemetry::RouteTelemetry,
};

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub vhost: Arc<str>,
    /// The prefix this route matched on, when it is a prefix route (for prefix rewrites).
    pub prefix: Option<Arc<str>>,
    pub action: RouteAction,
    pub filters: Filters,
    /// The whole exchange, retries included.
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    /// The route's bucket, then its virtual host's; a request needs a token from each.
    pub rate_limits: Box<[Arc<RateLimiter>]>,
    /// `Upgrade` protocols tunnelled (see `http::upgrade`).
    pub upgrades: Arc<[Arc<str>]>,
    /// Metric handles for this route, per listener that serves it; filled on first use.
    pub telemetry: RouteTelemetry,
}

#[derive(Debug)]
pub enum RouteAction {
    Forward(Backends),
    Redirect(Redirect),
    Direct(DirectResponse),
}

/// A cluster name's number in a compiled configuration; it stays the same across versions for as
/// long as the name is in use, so a route table built once serves every later version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slot(pub u32);

/// Weighted clusters, by slot; one is drawn per request and looked up in the version the request
/// loaded (`Compiled::backend`).
#[derive(Debug)]
pub struct Backends {
    /// Each slot with the running total of weights up to and including it.
    targets: Box<[(Slot, u64)]>,
}

impl Backends {
    pub fn new(weighted: Vec<(Slot, u32)>) -> Self {
        let mut total = 0u64;
        let targets = weighted
            .into_iter()
            .filter(|(_, w)| *w > 0)
            .map(|(c, w)| {
                total += u64::from(w);
                (c, total)
            })
            .collect();
        Backends { targets }
    }

    pub fn pick(&self) -> Option<Slot> {
        match &*self.targets {
            [] => None,
            [(only, _)] => Some(*only),
            targets => {
                let total = targets[targets.len() - 1].1;
                let draw = fastrand::u64(0..total);
                targets
                    .iter()
                    .find(|(_, upto)| draw < *upto)
                    .map(|(c, _)| *c)
            }
        }
    }
}
