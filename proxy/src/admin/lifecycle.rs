//! Readiness and drain. `/ready` is true once the first configuration is published (its listeners
//! are bound before it is published) while every listener it holds serves (none warming, none
//! unable to bind), and false from the moment a drain starts.

use tokio::sync::watch;

use crate::config::Store;

#[derive(Debug)]
pub struct Lifecycle {
    draining: watch::Sender<bool>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            draining: watch::Sender::new(false),
        }
    }
}

impl Lifecycle {
    /// Whether load balancers should send this proxy traffic.
    pub fn is_ready(&self, store: &Store) -> bool {
        store.load().is_some() && store.not_serving().is_empty() && !self.is_draining()
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Starts draining; returns false if a drain had already started.
    pub fn start_drain(&self) -> bool {
        !self.draining.send_replace(true)
    }

    /// Resolves once a drain has started (at once if it already has).
    pub async fn draining(&self) {
        let mut rx = self.draining.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|d| *d).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn drain_is_awaitable_and_turns_readiness_off() {
        let l = Arc::new(Lifecycle::default());
        let store = Store::default();
        assert!(!l.is_ready(&store), "no config yet");
        store.publish(Arc::new(
            crate::config::Compiled::build(Arc::default(), 1, None).unwrap(),
        ));
        assert!(l.is_ready(&store));
        store.set_not_serving(vec![r#"listener "l" not serving: waiting"#.into()]);
        assert!(!l.is_ready(&store), "a listener warms");
        store.set_not_serving(Vec::new());
        assert!(l.is_ready(&store));
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.draining().await }
        });
        assert!(l.start_drain());
        assert!(!l.start_drain(), "second drain is a no-op");
        waiter.await.unwrap();
        assert!(l.is_draining());
    }
}
