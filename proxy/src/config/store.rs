//! The published configuration: one `ArcSwap`, swapped once per accepted update, plus a watch
//! channel that tells long-lived tasks a new version is in place, and the listeners the
//! configuration holds that do not serve yet (readiness reads them). Authorization policies are
//! held beside it: they change on their own (a policy update recompiles nothing) and every
//! inbound call reads them.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::watch;

use super::Compiled;
use crate::authz::PolicySet;

#[derive(Debug)]
pub struct Store {
    current: ArcSwapOption<Compiled>,
    version: watch::Sender<u64>,
    /// One line per listener held but not bound and serving, e.g.
    /// `listener "l2" not serving: waiting for route config "r2"`.
    not_serving: ArcSwap<Vec<String>>,
    /// The authorization policies in force (empty: every call is allowed).
    policies: ArcSwap<PolicySet>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            current: ArcSwapOption::empty(),
            version: watch::Sender::new(0),
            not_serving: ArcSwap::default(),
            policies: ArcSwap::from_pointee(PolicySet::default()),
        }
    }
}

impl Store {
    /// The configuration in force, or `None` before the first one is published.
    pub fn load(&self) -> Option<Arc<Compiled>> {
        self.current.load_full()
    }

    pub fn publish(&self, compiled: Arc<Compiled>) {
        let version = compiled.version;
        let old = self.current.swap(Some(compiled.clone()));
        self.version.send_replace(version);
        // Only now is the old version out of service: the metric series of what it alone
        // served can go.
        if let Some(old) = old {
            compiled.forget_removed_series(&old);
        }
    }

    /// Replaces the list of listeners that do not serve (empty: every listener serves).
    pub fn set_not_serving(&self, reasons: Vec<String>) {
        self.not_serving.store(Arc::new(reasons));
    }

    /// The listeners the configuration holds that are not bound and serving, one line each.
    pub fn not_serving(&self) -> Arc<Vec<String>> {
        self.not_serving.load_full()
    }

    /// The authorization policies in force; a lock-free load, to be dropped before any await.
    pub fn policies(&self) -> arc_swap::Guard<Arc<PolicySet>> {
        self.policies.load()
    }

    /// Puts a new set of policies in force at once, and forgets the metric series of the
    /// policies and rules it no longer holds.
    pub fn set_policies(&self, set: Arc<PolicySet>) {
        self.policies.store(set.clone());
        set.forget_other_series();
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}
