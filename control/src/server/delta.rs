//! The per-stream delta protocol state: what the proxy subscribed to, holds (ACKed) and has
//! been sent, and the ordering rules of `discovery.proto` deciding what may go next. Pure and
//! synchronous, so the rules are unit-tested without sockets.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::SystemTime,
};

use trellis_proto::discovery::v1 as api;

use crate::{
    resource::{Entry, FNV_OFFSET, ResourceType, Snapshot, fnv1a_continue},
    status::{Nack, TypeStatus, unix_ms},
};

/// What a request did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Subscription change and/or ACK applied.
    Ack,
    /// NACK recorded.
    Nack,
    /// Subscription-only request applied.
    Subscribed,
    /// The nonce was not the latest sent for the type: ignored entirely.
    Stale,
    /// A type this server does not serve (yet): ignored.
    UnknownType,
}

/// Names a held resource refers to; `None` when the server does not know its content (an
/// unknown version from `initial_resource_versions`), which counts as naming everything.
#[derive(Clone, Debug, PartialEq)]
struct Held {
    version: String,
    refs: Option<Refs>,
}

#[derive(Clone, Debug, PartialEq)]
struct Refs {
    /// Shared with the snapshot's entry: a stream keeps no copy of what a resource names.
    clusters: Arc<BTreeSet<String>>,
    route_configs: Arc<BTreeSet<String>>,
}

impl Held {
    fn of(entry: &Entry) -> Self {
        Held {
            version: entry.version().to_owned(),
            refs: Some(Refs {
                clusters: entry.clusters.clone(),
                route_configs: entry.route_configs.clone(),
            }),
        }
    }

    fn names_cluster(&self, cluster: &str) -> bool {
        self.refs
            .as_ref()
            .is_none_or(|r| r.clusters.contains(cluster))
    }

    fn names_route_config(&self, name: &str) -> bool {
        self.refs
            .as_ref()
            .is_none_or(|r| r.route_configs.contains(name))
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Subscription {
    Wildcard,
    Names(BTreeSet<String>),
}

#[derive(Debug)]
struct InFlight {
    nonce: String,
    updates: Vec<(String, Held)>,
    removals: Vec<String>,
}

#[derive(Debug, Default)]
struct TypeState {
    /// `None` until the proxy's first request for the type.
    subscription: Option<Subscription>,
    /// What the proxy holds once everything sent is ACKed.
    sent: BTreeMap<String, Held>,
    /// What the proxy has ACKed.
    acked: BTreeMap<String, Held>,
    /// Subscribed names already reported as not existing.
    reported_absent: BTreeSet<String>,
    in_flight: Option<InFlight>,
    last_acked_nonce: String,
    last_nack: Option<Nack>,
    /// Whether the proxy's latest answer for the type was a NACK.
    nacked: bool,
    /// Resources the proxy refused, by name, with the line of the NACK naming each; an entry
    /// goes once a later version of it is applied (or it is removed).
    refused: BTreeMap<String, String>,
    stale_ignored: u64,
    /// Changes waiting on the ordering rules after the last push.
    held_back: usize,
}

impl TypeState {
    fn holds_or_sent(&self) -> impl Iterator<Item = &Held> {
        self.sent.values().chain(self.acked.values())
    }
}

/// The protocol state of one stream.
#[derive(Debug, Default)]
pub struct DeltaState {
    types: BTreeMap<ResourceType, TypeState>,
    next_nonce: u64,
}

impl DeltaState {
    fn ts(&self, t: ResourceType) -> &TypeState {
        static EMPTY: std::sync::OnceLock<TypeState> = std::sync::OnceLock::new();
        self.types
            .get(&t)
            .unwrap_or_else(|| EMPTY.get_or_init(TypeState::default))
    }

    /// Applies one request from the proxy (ACK/NACK and subscription changes).
    pub fn on_request(
        &mut self,
        req: &api::DeltaDiscoveryRequest,
        snapshot: &Snapshot,
        now: SystemTime,
    ) -> Outcome {
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            return Outcome::UnknownType;
        };
        let ts = self.types.entry(t).or_default();
        let mut outcome = Outcome::Subscribed;
        if !req.response_nonce.is_empty() {
            let latest = ts.in_flight.as_ref().map(|f| f.nonce.as_str());
            if latest != Some(req.response_nonce.as_str()) {
                ts.stale_ignored += 1;
                return Outcome::Stale;
            }
            let Some(flight) = ts.in_flight.take() else {
                return Outcome::Stale;
            };
            if let Some(error) = &req.error_detail {
                // A refused resource keeps its last good version on the proxy; `sent` keeps
                // what was offered, so the same content is not offered again until the catalog
                // changes it. The rest of the response was applied, as if ACKed.
                let mut refused = refused_resources(&error.message, &flight.updates);
                if refused.is_empty() {
                    // The message names none of the resources sent: the whole response was
                    // refused and the proxy holds what it had.
                    refused = flight
                        .updates
                        .iter()
                        .map(|(name, _)| (name.clone(), error.message.clone()))
                        .collect();
                } else {
                    for name in &flight.removals {
                        ts.acked.remove(name);
                        ts.refused.remove(name);
                    }
                }
                for (name, held) in flight.updates {
                    if !refused.contains_key(&name) {
                        ts.refused.remove(&name);
                        ts.acked.insert(name, held);
                    }
                }
                ts.refused.extend(refused);
                ts.last_nack = Some(Nack {
                    nonce: flight.nonce,
                    message: error.message.clone(),
                    at_unix_ms: unix_ms(now),
                });
                ts.nacked = true;
                outcome = Outcome::Nack;
            } else {
                for (name, held) in flight.updates {
                    ts.refused.remove(&name);
                    ts.acked.insert(name, held);
                }
                for name in flight.removals {
                    ts.refused.remove(&name);
                    ts.acked.remove(&name);
                }
                ts.last_acked_nonce = flight.nonce;
                ts.nacked = false;
                outcome = Outcome::Ack;
            }
        }
        match &mut ts.subscription {
            None => {
                ts.subscription = Some(if t.is_wildcard() {
                    Subscription::Wildcard
                } else {
                    Subscription::Names(
                        req.resource_names_subscribe
                            .iter()
                            .filter(|n| *n != "*")
                            .cloned()
                            .collect(),
                    )
                });
                for (name, version) in &req.initial_resource_versions {
                    let held = match snapshot.get(t, name) {
                        Some(entry) if entry.version() == version => Held::of(entry),
                        _ => Held {
                            version: version.clone(),
                            refs: None,
                        },
                    };
                    ts.sent.insert(name.clone(), held.clone());
                    ts.acked.insert(name.clone(), held);
                }
            }
            Some(Subscription::Wildcard) => {}
            Some(Subscription::Names(names)) => {
                names.extend(req.resource_names_subscribe.iter().cloned());
                for name in &req.resource_names_unsubscribe {
                    names.remove(name);
                    ts.sent.remove(name);
                    ts.acked.remove(name);
                    ts.refused.remove(name);
                    ts.reported_absent.remove(name);
                }
            }
        }
        outcome
    }

    /// Everything that may be sent now, at most one response per type, in SDS, policy, CDS, EDS,
    /// LDS, RDS order, following the ordering rules of `discovery.proto`.
    pub fn next_responses(&mut self, snapshot: &Snapshot) -> Vec<api::DeltaDiscoveryResponse> {
        self.refresh_refs(snapshot);
        let mut out = Vec::new();
        for t in ResourceType::ALL {
            if let Some(response) = self.next_response(t, snapshot) {
                out.push(response);
            }
        }
        out
    }

    /// What a held resource names follows the snapshot while its content is unchanged: a
    /// route keeps its bytes when a backend's Service goes away, but stops needing (and holding
    /// on to) that cluster.
    fn refresh_refs(&mut self, snapshot: &Snapshot) {
        for t in [ResourceType::Listener, ResourceType::RouteConfiguration] {
            let desired = snapshot.of_type(t);
            let Some(ts) = self.types.get_mut(&t) else {
                continue;
            };
            for held in ts.sent.iter_mut().chain(ts.acked.iter_mut()) {
                if let Some(entry) = desired.get(held.0)
                    && entry.version() == held.1.version
                {
                    *held.1 = Held::of(entry);
                }
            }
        }
    }

    fn next_response(
        &mut self,
        t: ResourceType,
        snapshot: &Snapshot,
    ) -> Option<api::DeltaDiscoveryResponse> {
        let ts = self.ts(t);
        let subscription = ts.subscription.as_ref()?;
        if ts.in_flight.is_some() {
            return None;
        }
        let desired = snapshot.of_type(t);
        let wanted = |name: &str| match subscription {
            Subscription::Wildcard => true,
            Subscription::Names(names) => names.contains(name),
        };
        let mut held_back = 0;
        let mut updates = Vec::new();
        for (name, entry) in desired.iter().filter(|(n, _)| wanted(n)) {
            if ts.sent.get(name).map(|h| h.version.as_str()) == Some(entry.version()) {
                continue;
            }
            if self.may_send(t, entry, snapshot) {
                updates.push(entry);
            } else {
                held_back += 1;
            }
        }
        let mut removals = Vec::new();
        let gone = ts.sent.keys().filter(|n| !desired.contains_key(*n));
        let absent: Vec<&String> = match subscription {
            Subscription::Names(names) => names
                .iter()
                .filter(|n| {
                    !desired.contains_key(*n)
                        && !ts.sent.contains_key(*n)
                        && !ts.reported_absent.contains(*n)
                })
                .collect(),
            Subscription::Wildcard => Vec::new(),
        };
        for name in gone.chain(absent) {
            if self.may_remove(t, name) {
                removals.push(name.clone());
            } else {
                held_back += 1;
            }
        }
        let updates: Vec<(String, Held, api::Resource)> = updates
            .into_iter()
            .map(|e| (e.resource.name.clone(), Held::of(e), e.resource.clone()))
            .collect();

        let by_name = !t.is_wildcard();
        let ts = self.types.entry(t).or_default();
        ts.held_back = held_back;
        if updates.is_empty() && removals.is_empty() {
            return None;
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        let ts = self.types.entry(t).or_default();
        let mut resources = Vec::with_capacity(updates.len());
        let mut flight_updates = Vec::with_capacity(updates.len());
        for (name, held, resource) in updates {
            ts.sent.insert(name.clone(), held.clone());
            ts.reported_absent.remove(&name);
            resources.push(resource);
            flight_updates.push((name, held));
        }
        for name in &removals {
            ts.sent.remove(name);
            if by_name {
                ts.reported_absent.insert(name.clone());
            }
        }
        // FNV-1a over "name=version;" for everything sent, hashed in place: building the
        // string cost an allocation the size of the whole type on every response of every stream.
        let system_version_info = format!(
            "{:016x}",
            ts.sent.iter().fold(FNV_OFFSET, |hash, (n, h)| {
                [n.as_bytes(), b"=", h.version.as_bytes(), b";"]
                    .iter()
                    .fold(hash, |hash, part| fnv1a_continue(hash, part))
            })
        );
        ts.in_flight = Some(InFlight {
            nonce: nonce.clone(),
            updates: flight_updates,
            removals: removals.clone(),
        });
        Some(api::DeltaDiscoveryResponse {
            type_url: t.type_url().to_owned(),
            resources,
            removed_resources: removals,
            nonce,
            system_version_info,
        })
    }

    /// Rules A, B and E: endpoints after their cluster was sent; listeners and routes only once
    /// every cluster they need is ACKed and no cluster response is outstanding; listeners and
    /// clusters only once every secret they name is ACKed (a refused secret's previous version
    /// counts) and no secret response is outstanding. Listeners also wait while a policy
    /// response is outstanding: a new inbound listener must not serve before the policies that
    /// restrict it are in place.
    fn may_send(&self, t: ResourceType, entry: &Entry, snapshot: &Snapshot) -> bool {
        let clusters = self.ts(ResourceType::Cluster);
        if t == ResourceType::Listener && self.ts(ResourceType::Policy).in_flight.is_some() {
            return false;
        }
        let secrets = self.ts(ResourceType::Secret);
        if !entry.secrets.is_empty()
            && (secrets.in_flight.is_some()
                || !entry.secrets.iter().all(|s| secrets.acked.contains_key(s)))
        {
            return false;
        }
        match t {
            ResourceType::Secret | ResourceType::Policy | ResourceType::Cluster => true,
            ResourceType::ClusterLoadAssignment => clusters.sent.contains_key(&entry.resource.name),
            ResourceType::Listener | ResourceType::RouteConfiguration => {
                let route_clusters = entry
                    .route_configs
                    .iter()
                    .filter_map(|rc| snapshot.get(ResourceType::RouteConfiguration, rc))
                    .flat_map(|rc| rc.clusters.iter());
                clusters.in_flight.is_none()
                    && entry
                        .clusters
                        .iter()
                        .chain(route_clusters)
                        .all(|c| clusters.acked.contains_key(c))
            }
        }
    }

    /// Rules A and D: nothing is removed while something the proxy holds or was sent names it.
    fn may_remove(&self, t: ResourceType, name: &str) -> bool {
        match t {
            // The proxy keeps the version a served listener uses until the listener changes.
            ResourceType::Secret => true,
            // Nothing names a policy; a sidecar drops it as soon as it is told.
            ResourceType::Policy => true,
            ResourceType::Cluster => {
                // Until the proxy has subscribed to listeners (and to route configurations, if
                // a listener it holds names one) the server cannot know what it holds.
                let listeners = self.ts(ResourceType::Listener);
                let routes = self.ts(ResourceType::RouteConfiguration);
                let needs_routes = listeners.holds_or_sent().any(|held| {
                    held.refs
                        .as_ref()
                        .is_none_or(|r| !r.route_configs.is_empty())
                });
                listeners.subscription.is_some()
                    && (routes.subscription.is_some() || !needs_routes)
                    && [listeners, routes]
                        .into_iter()
                        .all(|user| user.holds_or_sent().all(|held| !held.names_cluster(name)))
            }
            ResourceType::ClusterLoadAssignment => {
                !self.ts(ResourceType::Cluster).sent.contains_key(name)
            }
            ResourceType::Listener => true,
            ResourceType::RouteConfiguration => self
                .ts(ResourceType::Listener)
                .holds_or_sent()
                .all(|held| !held.names_route_config(name)),
        }
    }

    /// The per-type part of the status page.
    pub fn status(&self) -> BTreeMap<String, TypeStatus> {
        self.types
            .iter()
            .map(|(t, ts)| {
                let status = TypeStatus {
                    subscribed: match &ts.subscription {
                        None => "no".to_owned(),
                        Some(Subscription::Wildcard) => "*".to_owned(),
                        Some(Subscription::Names(n)) => format!("{} names", n.len()),
                    },
                    acked: ts
                        .acked
                        .iter()
                        .map(|(n, h)| (n.clone(), h.version.clone()))
                        .collect(),
                    last_acked_nonce: ts.last_acked_nonce.clone(),
                    pending_nonce: ts.in_flight.as_ref().map(|f| f.nonce.clone()),
                    pending: ts
                        .in_flight
                        .as_ref()
                        .map_or(0, |f| f.updates.len() + f.removals.len()),
                    held_back: ts.held_back,
                    last_nack: ts.last_nack.clone(),
                    nacked: ts.nacked,
                    refused: ts.refused.clone(),
                    stale_ignored: ts.stale_ignored,
                };
                (t.short_name().to_owned(), status)
            })
            .collect()
    }
}

/// The resources of a response that a NACK refuses: the proxy writes one line per refused
/// resource, starting with its kind and quoted name (`route config "r": virtual_hosts[0]...`).
/// Only names that were in the response count; a line naming something else (or a message in
/// another form) refuses nothing by itself.
fn refused_resources(message: &str, updates: &[(String, Held)]) -> BTreeMap<String, String> {
    let mut refused = BTreeMap::new();
    for line in message.lines() {
        let Some(name) = first_quoted(line) else {
            continue;
        };
        if updates.iter().any(|(n, _)| *n == name) {
            refused.insert(name, line.trim().to_owned());
        }
    }
    refused
}

/// The first double-quoted string of `line`, with `\"` and `\\` escapes undone (the proxy
/// quotes names the way Rust's `{:?}` does).
fn first_quoted(line: &str) -> Option<String> {
    let start = line.find('"')?;
    let mut out = String::new();
    let mut chars = line[start + 1..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests;
