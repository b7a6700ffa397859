//! Drain: one signal that every accept loop and connection watches, and a count of those still
//! running. A watch is a receiver of the signal's channel, so the channel's receiver count is the
//! count of open connections and its `closed()` is "all of them are gone": no second counter to
//! keep in step.

use tokio::sync::watch;

/// The proxy's drain signal. Accept loops stop when it fires; HTTP connections shut down
/// gracefully; TCP connections carry on until they end or the process exits.
#[derive(Debug)]
pub struct Drain {
    signal: watch::Sender<bool>,
}

/// Held by an accept loop or a connection for as long as it runs: it counts as open until the
/// watch is dropped.
#[derive(Debug, Clone)]
pub struct DrainWatch {
    signal: watch::Receiver<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            signal: watch::Sender::new(false),
        }
    }
}

impl Drain {
    pub fn watch(&self) -> DrainWatch {
        DrainWatch {
            signal: self.signal.subscribe(),
        }
    }

    /// Starts the drain; returns false if it had already started.
    pub fn start(&self) -> bool {
        !self.signal.send_replace(true)
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Accept loops and connections still running.
    pub fn open(&self) -> usize {
        self.signal.receiver_count()
    }

    /// Resolves once every watch has been dropped (at once if none is held).
    pub async fn finished(&self) {
        self.signal.closed().await;
    }
}

impl DrainWatch {
    /// Resolves once the drain has started (at once if it already has). Never resolves if the
    /// proxy is dropped without draining: its connections are left to finish on their own.
    pub async fn signaled(&mut self) {
        if self.signal.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn counts_watches_until_they_are_dropped() {
        let drain = Drain::default();
        drain.finished().await; // nothing open
        let mut a = drain.watch();
        let b = a.clone();
        assert_eq!(drain.open(), 2);
        assert!(drain.start());
        assert!(!drain.start(), "a second start is a no-op");
        a.signaled().await;
        drop(a);
        let wait = tokio::time::timeout(Duration::from_millis(50), drain.finished()).await;
        assert!(wait.is_err(), "one watch is still held");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), drain.finished())
            .await
            .expect("finished once the last watch is dropped");
    }

    #[tokio::test]
    async fn a_dropped_drain_does_not_signal() {
        let drain = Drain::default();
        let mut w = drain.watch();
        drop(drain);
        let waited = tokio::time::timeout(Duration::from_millis(50), w.signaled()).await;
        assert!(waited.is_err(), "no drain without a start");
    }
}
