//! The control-plane feed: one discovery stream to trellis-control. Each resource of a response is
//! checked on its own ([`check`]); a bad one is refused by name (NACKed, one line each) and keeps
//! its last good version, the others are held. What is held is then turned into the bootstrap
//! file's types and sent through the validate → compile → publish path the file takes.
//!
//! Warming: a listener whose route configuration has not arrived, that names a cluster whose
//! endpoints have not arrived, or that names a secret not held (not arrived, or refused: a
//! certificate that does not parse, does not match its key or has expired), is not served yet; while it warms, the version last served (if any)
//! stays in place. So a route change never sends traffic to a cluster the proxy cannot reach yet.
//! A listener is never removed because something it uses was refused, and a cluster the control
//! plane removes while a served route still uses it is kept, as last published (endpoints
//! included), until no served route uses it.

pub mod channel;
mod check;
mod convert;
mod state;

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use trellis_proto::discovery::v1::{
    self as api, CLUSTER_LOAD_ASSIGNMENT_TYPE, CLUSTER_TYPE, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, ErrorDetail, LISTENER_TYPE, POLICY_TYPE, ROUTE_CONFIGURATION_TYPE,
    SECRET_TYPE, aggregated_discovery_client::AggregatedDiscoveryClient,
};

pub use self::check::Refused;
use self::state::{
    CheckedRoutes, Held, LeftOut, Published, Served, assemble, name_resources, serve, warming,
};
use super::bootstrap as file;
use crate::app::Proxy;

/// Applies decoded responses in order to a client that holds nothing yet, as a session does,
/// then assembles what can be served beside an empty bootstrap file; returns every refusal.
/// Only for [`crate::fuzzing`]: the same per-resource checks and conversion, without a store.
pub(crate) fn apply_for_fuzzing(responses: &[DeltaDiscoveryResponse]) -> Vec<Refused> {
    let mut held = Held::default();
    let mut served = Served::default();
    let published = Published::new();
    let mut refused = Vec::new();
    for resp in responses {
        refused.extend(held.apply(resp));
        served = serve(&held, &served, &published);
        // Errors here are whole-configuration refusals, reported as such by the client.
        let _ = assemble(
            &file::File::default(),
            &held,
            &served,
            &published,
            &CheckedRoutes::new(),
        );
    }
    refused
}

/// Where the control plane is, how to reach it, and who this proxy is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct XdsSettings {
    /// `host:port`, or a full `http://` or `https://` URI.
    pub address: String,
    pub node: api::Node,
    /// CA bundle trusted for the controller's certificate; with it the channel is TLS.
    pub ca_file: Option<std::path::PathBuf>,
    /// The name the controller's certificate must carry (default: the address's host).
    pub server_name: Option<String>,
}

impl XdsSettings {
    /// From the bootstrap file's `xds:` section (after command-line overrides).
    pub fn from_bootstrap(x: &file::Xds) -> Result<Self, String> {
        let address = x
            .address
            .clone()
            .filter(|a| !a.is_empty())
            .ok_or("xds.address: the control plane address is required")?;
        let role = match x.role.as_deref().unwrap_or("sidecar") {
            "gateway" => api::Role::Gateway,
            "sidecar" => api::Role::Sidecar,
            other => {
                return Err(format!(
                    "xds.role: {other:?} is not \"gateway\" or \"sidecar\""
                ));
            }
        };
        if role == api::Role::Gateway && x.gateway.as_deref().unwrap_or("").is_empty() {
            return Err("xds.gateway: a gateway must name the Gateway resource it serves".into());
        }
        let node_id = x.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}.{}", host.trim(), std::process::id())
        });
        let settings = XdsSettings {
            address,
            ca_file: x.ca_file.clone(),
            server_name: x.server_name.clone(),
            node: api::Node {
                id: node_id,
                role: role as i32,
                namespace: x.namespace.clone().unwrap_or_else(|| "default".into()),
                service_account: x.service_account.clone().unwrap_or_default(),
                labels: x.labels.clone().into_iter().collect(),
                gateway_name: x.gateway.clone().unwrap_or_default(),
            },
        };
        settings
            .channel()
            .and_then(|c| c.check_trust())
            .map_err(|e| e.to_string())?;
        Ok(settings)
    }

    /// The channel to the controller these settings describe; the identity client uses the
    /// same one, so the token gets the discovery stream's TLS.
    pub fn channel(&self) -> Result<channel::ControlChannel, channel::ChannelError> {
        channel::ControlChannel::new(
            &self.address,
            self.ca_file.as_deref(),
            self.server_name.as_deref(),
        )
    }
}

/// Reconnect backoff: full jitter between zero and a cap that doubles from the base to the max.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The control-plane client. Runs until the process ends.
pub struct Client {
    proxy: Arc<Proxy>,
    settings: XdsSettings,
    /// The bootstrap file's own listeners, routes and clusters, served beside the dynamic ones;
    /// a reload of the file sends a new value.
    static_part: watch::Receiver<Arc<file::File>>,
    held: Held,
    served: Served,
    published: Published,
    /// The route configurations last published, checked.
    checked_routes: CheckedRoutes,
    /// Served listeners the last publish left out (cannot bind, address taken).
    left_out: Vec<LeftOut>,
    no_listener_hint_after: Duration,
}

/// Readiness lines: the listeners that warm, then those left out.
fn not_serving(warming: Vec<String>, left_out: &[LeftOut]) -> Vec<String> {
    let mut lines = warming;
    lines.extend(left_out.iter().map(LeftOut::not_serving));
    lines
}

/// What publishing did: the version, and the listeners left out (they cannot be bound, or
/// another listener has their address).
struct Outcome {
    version: u64,
    left_out: Vec<LeftOut>,
}

/// How long a gateway proxy may go without a listener before it says why that may be.
const NO_LISTENER_HINT_AFTER: Duration = Duration::from_secs(10);

impl Client {
    pub fn new(
        proxy: Arc<Proxy>,
        settings: XdsSettings,
        static_part: watch::Receiver<Arc<file::File>>,
    ) -> Self {
        Client {
            proxy,
            settings,
            static_part,
            held: Held::default(),
            served: Served::default(),
            published: Published::new(),
            checked_routes: CheckedRoutes::new(),
            left_out: Vec::new(),
            no_listener_hint_after: NO_LISTENER_HINT_AFTER,
        }
    }

    /// How long a gateway proxy goes without a listener before it logs a hint (default 10 s).
    pub fn no_listener_hint_after(mut self, after: Duration) -> Self {
        self.no_listener_hint_after = after;
        self
    }

    /// Connects, follows the stream, and reconnects with backoff whenever it breaks, keeping the
    /// last good config in service meanwhile.
    pub async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            match self.session(&mut attempt).await {
                Ok(()) => tracing::warn!("control plane closed the stream; reconnecting"),
                Err(e) => tracing::warn!(error = %e, "control plane stream failed; reconnecting"),
            }
            let cap = BACKOFF_BASE
                .saturating_mul(1 << attempt.min(16))
                .min(BACKOFF_MAX);
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(Duration::from_nanos(fastrand::u64(
                ..=cap.as_nanos() as u64,
            )))
            .await;
        }
    }

    /// One stream, from the first request to its end. `attempt` resets once a response arrives.
    async fn session(&mut self, attempt: &mut u32) -> Result<(), String> {
        let channel = self
            .settings
            .channel()
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connect to {}: {e}", self.settings.address))?;
        let (tx, rx) = mpsc::channel(32);
        let mut subscribed: HashMap<&'static str, BTreeSet<String>> = HashMap::new();
        let mut first = true;
        // Secrets are a wildcard type like clusters and listeners; the server sends what names a
        // secret only once the secret is ACKed, and a listener naming one not held warms.
        // Policies (wildcard) apply to a sidecar's inbound traffic only, so a gateway does not
        // ask for them. A controller that does not serve the type ignores the request.
        let is_sidecar = self.settings.node.role == api::Role::Sidecar as i32;
        for type_url in [
            CLUSTER_TYPE,
            LISTENER_TYPE,
            CLUSTER_LOAD_ASSIGNMENT_TYPE,
            ROUTE_CONFIGURATION_TYPE,
            SECRET_TYPE,
            POLICY_TYPE,
        ] {
            if type_url == POLICY_TYPE && !is_sidecar {
                continue;
            }
            let by_name = matches!(
                type_url,
                CLUSTER_LOAD_ASSIGNMENT_TYPE | ROUTE_CONFIGURATION_TYPE
            );
            let names = self.held.wanted(type_url);
            let versions = self.held.versions(type_url);
            if by_name && names.is_empty() && versions.is_empty() {
                continue;
            }
            let req = DeltaDiscoveryRequest {
                node: first.then(|| self.settings.node.clone()),
                type_url: type_url.into(),
                resource_names_subscribe: names.iter().cloned().collect(),
                initial_resource_versions: versions,
                ..Default::default()
            };
            first = false;
            subscribed.insert(type_url, names);
            tx.send(req).await.map_err(|_| "request channel closed")?;
        }
        let mut stream = AggregatedDiscoveryClient::new(channel)
            .delta_resources(ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("open stream: {e}"))?
            .into_inner();
        tracing::info!(address = %self.settings.address, "connected to the control plane");
        // A gateway proxy is sent the listeners of the Gateway it names; none after a while most
        // often means that Gateway does not exist.
        let is_gateway = self.settings.node.role == api::Role::Gateway as i32;
        let no_listener_hint = tokio::time::sleep(self.no_listener_hint_after);
        tokio::pin!(no_listener_hint);
        let mut hinted = !is_gateway;
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                () = &mut no_listener_hint, if !hinted => {
                    hinted = true;
                    if self.held.listeners.is_empty() {
                        tracing::warn!(
                            gateway = %self.settings.node.gateway_name,
                            namespace = %self.settings.node.namespace,
                            after = ?self.no_listener_hint_after,
                            "no listener from the control plane yet; check that the Gateway named by --gateway exists (in this namespace) and has listeners"
                        );
                    }
                    continue;
                }
                changed = self.static_part.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    if let Err(e) = self.republish().await {
                        crate::telemetry::config_rejected();
                        tracing::error!(error = %e, "the reloaded file does not fit the dynamic configuration; the previous configuration stays");
                    }
                    continue;
                }
            };
            let resp = match message {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            *attempt = 0;
            let (version, refused) = self.on_response(&resp).await;
            if let Some(version) = version {
                crate::telemetry::config_applied(version);
            }
            let error_detail = if refused.is_empty() {
                None
            } else {
                crate::telemetry::config_rejected();
                let message = refused.join("\n");
                tracing::warn!(type_url = %resp.type_url, nonce = %resp.nonce, %message, "resources refused (NACK); their last good versions stay");
                Some(ErrorDetail { message })
            };
            let ack = DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail,
                ..Default::default()
            };
            tx.send(ack).await.map_err(|_| "request channel closed")?;
            // Follow what is now held with the by-name subscriptions.
            for type_url in [CLUSTER_LOAD_ASSIGNMENT_TYPE, ROUTE_CONFIGURATION_TYPE] {
                let wanted = self.held.wanted(type_url);
                let have = subscribed.entry(type_url).or_default();
                let subscribe: Vec<String> = wanted.difference(have).cloned().collect();
                let unsubscribe: Vec<String> = have.difference(&wanted).cloned().collect();
                if subscribe.is_empty() && unsubscribe.is_empty() {
                    continue;
                }
                for name in &unsubscribe {
                    match type_url {
                        CLUSTER_LOAD_ASSIGNMENT_TYPE => drop(self.held.endpoints.remove(name)),
                        _ => drop(self.held.routes.remove(name)),
                    }
                }
                *have = wanted;
                let req = DeltaDiscoveryRequest {
                    type_url: type_url.into(),
                    resource_names_subscribe: subscribe,
                    resource_names_unsubscribe: unsubscribe,
                    ..Default::default()
                };
                tx.send(req).await.map_err(|_| "request channel closed")?;
            }
        }
    }

    /// Applies a response to a copy of what is held and publishes the result. Returns the version
    /// published (none if nothing changed) and one line per refused resource. Should the whole
    /// fail to publish, nothing changes and the one line says why.
    async fn on_response(&mut self, resp: &DeltaDiscoveryResponse) -> (Option<u64>, Vec<String>) {
        if resp.type_url == POLICY_TYPE {
            return (None, self.on_policies(resp));
        }
        let mut held = self.held.clone();
        let refused = held.apply(resp);
        for r in &refused {
            crate::telemetry::xds_resource_rejected(r.kind);
        }
        let mut lines: Vec<String> = refused.iter().map(ToString::to_string).collect();
        let changed = refused.len() < resp.resources.len() || !resp.removed_resources.is_empty();
        if !changed {
            // Nothing to publish, but what was refused may explain a listener that waits.
            self.held = held;
            let lines_now = not_serving(
                warming(&self.held, &self.served, &self.published),
                &self.left_out,
            );
            self.proxy.store().set_not_serving(lines_now);
            return (None, lines);
        }
        let served = serve(&held, &self.served, &self.published);
        match self.publish(&held, &served).await {
            Ok(outcome) => {
                tracing::info!(
                    type_url = %resp.type_url,
                    changed = resp.resources.len() - refused.len(),
                    refused = refused.len(),
                    removed = resp.removed_resources.len(),
                    version = outcome.version,
                    "applied update from the control plane"
                );
                // A listener of this response that cannot be bound is refused by name; one that
                // became servable through another type's response is reported by readiness.
                if resp.type_url == LISTENER_TYPE {
                    for out in &outcome.left_out {
                        if resp.resources.iter().any(|r| r.name == out.listener) {
                            crate::telemetry::xds_resource_rejected("listener");
                            lines.push(format!("listener {:?}: {}", out.listener, out.reason));
                        }
                    }
                }
                self.held = held;
                self.served = served;
                (Some(outcome.version), lines)
            }
            Err(message) => {
                lines.push(message.replace('\n', "; "));
                (None, lines)
            }
        }
    }

    /// Policies are put in force on their own: nothing else depends on them, so nothing is
    /// compiled again. A refused policy keeps its last good version in force; one refused with
    /// no good version denies every call (see [`Held::policy_set`]).
    fn on_policies(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<String> {
        let refused = self.held.apply(resp);
        for r in &refused {
            crate::telemetry::xds_resource_rejected(r.kind);
        }
        if !resp.resources.is_empty() || !resp.removed_resources.is_empty() {
            self.proxy
                .store()
                .set_policies(Arc::new(self.held.policy_set()));
            tracing::info!(
                changed = resp.resources.len() - refused.len(),
                refused = refused.len(),
                removed = resp.removed_resources.len(),
                held = self.held.policies.len(),
                "authorization policies applied"
            );
        }
        refused.iter().map(ToString::to_string).collect()
    }

    /// Publishes what is held again, after the static part changed.
    async fn republish(&mut self) -> Result<(), String> {
        let (held, served) = (self.held.clone(), self.served.clone());
        let outcome = self.publish(&held, &served).await?;
        crate::telemetry::config_applied(outcome.version);
        tracing::info!(version = outcome.version, "configuration reloaded");
        Ok(())
    }

    /// Validates and applies `held` as `served`, and keeps readiness honest: every listener held
    /// but not served, or not bound, is named in the store's not-serving list.
    async fn publish(&mut self, held: &Held, served: &Served) -> Result<Outcome, String> {
        let static_part = self.static_part.borrow().clone();
        let assembled = assemble(
            &static_part,
            held,
            served,
            &self.published,
            &self.checked_routes,
        )?;
        let mut left_out = assembled.left_out;
        let store = self.proxy.store().clone();
        let before = store.not_serving();
        let warming = warming(held, served, &self.published);
        // Listeners about to warm are not ready from before the new version is published.
        let mut meanwhile: Vec<String> = before.iter().cloned().collect();
        meanwhile.extend(warming.iter().filter(|w| !before.contains(w)).cloned());
        store.set_not_serving(meanwhile);
        let applied = match self.proxy.apply_leaving_unbound(assembled.config).await {
            Ok(applied) => applied,
            Err(e) => {
                store.set_not_serving(before.to_vec());
                return Err(name_resources(
                    &e.to_string(),
                    &assembled.file,
                    served,
                    &assembled.published,
                ));
            }
        };
        left_out.extend(applied.unbound.iter().map(|e| LeftOut {
            listener: e.name.to_string(),
            reason: format!("address: cannot bind {}: {}", e.address, e.source),
        }));
        for out in &left_out {
            // Said once, not on every update while it lasts; readiness keeps saying it.
            if !before.contains(&out.not_serving()) {
                tracing::warn!(listener = %out.listener, reason = %out.reason, "listener not serving");
            }
        }
        store.set_not_serving(not_serving(warming, &left_out));
        self.left_out = left_out.clone();
        self.published = assembled.published;
        self.checked_routes = assembled.routes;
        Ok(Outcome {
            version: applied.version,
            left_out,
        })
    }
}
