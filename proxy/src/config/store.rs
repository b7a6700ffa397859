//! The published configuration: one `ArcSwap`, swapped once per accepted update, plus a watch
//! channel that tells long-lived tasks a new version is in place.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use super::Compiled;

#[derive(Debug)]
pub struct Store {
    current: ArcSwapOption<Compiled>,
    version: watch::Sender<u64>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            current: ArcSwapOption::empty(),
            version: watch::Sender::new(0),
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

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}
