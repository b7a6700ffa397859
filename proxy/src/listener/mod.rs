//! Listeners follow the configuration: new addresses are bound before an update is published (a
//! port in use is reported by listener, for the caller to refuse the update or that listener
//! alone), removed ones stop accepting. A
//! listener that stops accepting leaves its open connections to finish: reloads never close
//! connections. A drain stops every listener for good and asks HTTP connections to shut down
//! gracefully.

pub mod drain;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use hyper_util::{rt::TokioExecutor, server::conn::auto};
use tokio::{net::TcpListener, sync::oneshot};

use self::drain::{Drain, DrainWatch};
use crate::{
    config::{Config, Store, compile::CompiledListener, model::Listener},
    http::{forward::ConnContext, server},
    l4,
    telemetry::{ListenerTelemetry, access_log},
};

#[derive(Debug, thiserror::Error)]
#[error("listeners[{index}] ({name}): cannot bind {address}: {source}")]
pub struct BindError {
    pub index: usize,
    pub name: Arc<str>,
    pub address: SocketAddr,
    #[source]
    pub source: io::Error,
}

#[derive(Debug)]
struct Active {
    /// The listener's name, metric handles and access log; replaced when an update changes them.
    entry: Arc<RwLock<Arc<ListenerTelemetry>>>,
    local: SocketAddr,
    /// Dropping it ends the accept loop.
    _stop: oneshot::Sender<()>,
}

/// What identifies a bound socket across updates: its configured address, so a renamed listener
/// keeps its socket; with port 0 also the name, since each such listener has a port of its own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    address: SocketAddr,
    ephemeral: Option<Arc<str>>,
}

impl Key {
    fn of(l: &Listener) -> Key {
        Key {
            address: l.address,
            ephemeral: (l.address.port() == 0).then(|| l.name.clone()),
        }
    }
}

/// The bound listeners.
#[derive(Debug, Default)]
pub struct Listeners {
    active: HashMap<Key, Active>,
    drain: Arc<Drain>,
}

/// Sockets bound for an update that has not been published yet.
#[derive(Debug)]
pub struct Prepared {
    new: Vec<(Key, Arc<ListenerTelemetry>, TcpListener)>,
    keep: HashMap<Key, Arc<ListenerTelemetry>>,
}

impl Listeners {
    /// Binds every listener of `config` that is not bound yet (none once draining). Listeners
    /// that cannot be bound are returned beside the sockets bound for the others.
    pub async fn prepare(&self, config: &Config) -> (Prepared, Vec<BindError>) {
        let mut new = Vec::new();
        let mut keep = HashMap::new();
        let mut failed = Vec::new();
        if self.drain.is_draining() {
            return (Prepared { new, keep }, failed);
        }
        for (index, l) in config.listeners.iter().enumerate() {
            let telemetry = Arc::new(ListenerTelemetry::new(
                l.name.clone(),
                l.access_log.as_ref().map(access_log::sender),
            ));
            let key = Key::of(l);
            if self.active.contains_key(&key) {
                keep.insert(key, telemetry);
                continue;
            }
            match TcpListener::bind(l.address).await {
                Ok(socket) => new.push((key, telemetry, socket)),
                Err(source) => failed.push(BindError {
                    index,
                    name: l.name.clone(),
                    address: l.address,
                    source,
                }),
            }
        }
        (Prepared { new, keep }, failed)
    }

    /// Starts accepting on the new sockets and stops listeners the update removed. Call after the
    /// update is published.
    pub fn commit(&mut self, prepared: Prepared, store: &Arc<Store>) {
        let Prepared { new, keep } = prepared;
        self.active.retain(|key, active| match keep.get(key) {
            Some(entry) => {
                *active.entry.write().unwrap_or_else(|e| e.into_inner()) = entry.clone();
                true
            }
            None => {
                tracing::info!(address = %key.address, "listener removed");
                false // dropping `stop` ends its accept loop
            }
        });
        let builder = Arc::new(server::builder());
        for (key, entry, socket) in new {
            let local = socket.local_addr().unwrap_or(key.address);
            let (stop, stopped) = oneshot::channel();
            tracing::info!(%local, listener = %entry.name, "listening");
            let entry = Arc::new(RwLock::new(entry));
            tokio::spawn(accept_loop(
                socket,
                entry.clone(),
                store.clone(),
                builder.clone(),
                stopped,
                self.drain.watch(),
            ));
            self.active.insert(
                key,
                Active {
                    entry,
                    local,
                    _stop: stop,
                },
            );
        }
    }

    /// The address a listener is bound to (useful when it was configured with port 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.active
            .values()
            .find(|a| &*a.entry.read().unwrap_or_else(|e| e.into_inner()).name == name)
            .map(|a| a.local)
    }

    /// Starts the drain: every listener closes its socket, every HTTP connection shuts down
    /// gracefully, and later updates bind nothing. Returns false if it had already started.
    pub fn drain(&mut self) -> bool {
        self.active.clear();
        self.drain.start()
    }

    /// The drain signal, to wait for connections to finish.
    pub fn drain_signal(&self) -> &Arc<Drain> {
        &self.drain
    }
}

async fn accept_loop(
    socket: TcpListener,
    entry: Arc<RwLock<Arc<ListenerTelemetry>>>,
    store: Arc<Store>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut stopped: oneshot::Receiver<()>,
    mut drain: DrainWatch,
) {
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            _ = drain.signaled() => return,
            a = socket.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let listener = entry.read().unwrap_or_else(|e| e.into_inner()).clone();
                // What the listener does is looked up per connection, so a reload that changes
                // it applies to the next connection.
                let Some(config) = store.load() else {
                    continue;
                };
                let Some(kind) = config.listeners.get(&listener.name).cloned() else {
                    continue;
                };
                if !matches!(kind, CompiledListener::Http { .. })
                    && let Some(limit) = config.listener_rate_limit(&listener.name)
                    && !limit.try_acquire()
                {
                    tracing::debug!(%peer, listener = %listener.name, "connection rate limit reached; closing");
                    continue; // dropping `stream` closes it
                }
                let open = listener.connection_opened();
                let watch = drain.clone();
                match kind {
                    CompiledListener::Http { connection, .. } => {
                        let ctx = ConnContext::new(store.clone(), listener, peer.ip())
                            .with_escaped_slashes(connection.escaped_slashes);
                        let ctx = ctx.with_local_port(stream.local_addr().ok().map(|a| a.port()));
                        let builder = builder.clone();
                        tokio::spawn(async move {
                            server::serve(builder, stream, ctx, connection, watch).await;
                            drop(open);
                        });
                    }
                    CompiledListener::Tcp(target) => {
                        tokio::spawn(async move {
                            l4::tcp::serve(
                                stream,
                                peer,
                                target.cluster.clone(),
                                target.idle_timeout,
                                &[],
                                &listener,
                            )
                            .await;
                            drop((open, watch));
                        });
                    }
                    CompiledListener::TlsPassthrough(table) => {
                        tokio::spawn(async move {
                            l4::sni::serve(stream, peer, table, &listener).await;
                            drop((open, watch));
                        });
                    }
                }
            }
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
