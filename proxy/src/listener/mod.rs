//! Listeners follow the configuration: new addresses are bound before an update is published (so a
//! port in use rejects the update rather than half-applying it), removed ones stop accepting. A
//! listener that stops accepting leaves its open connections to finish.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use hyper_util::{rt::TokioExecutor, server::conn::auto};
use tokio::{net::TcpListener, sync::oneshot};

use crate::{
    config::{Config, Store, compile::CompiledListener},
    http::{forward::ConnContext, server},
    l4,
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
    name: Arc<RwLock<Arc<str>>>,
    local: SocketAddr,
    /// Dropping it ends the accept loop.
    _stop: oneshot::Sender<()>,
}

/// The bound listeners, keyed by configured address.
#[derive(Debug, Default)]
pub struct Listeners {
    active: HashMap<SocketAddr, Active>,
}

/// Sockets bound for an update that has not been published yet.
#[derive(Debug)]
pub struct Prepared {
    new: Vec<(SocketAddr, Arc<str>, TcpListener)>,
    keep: HashMap<SocketAddr, Arc<str>>,
}

impl Listeners {
    /// Binds every listener of `config` that is not bound yet.
    pub async fn prepare(&self, config: &Config) -> Result<Prepared, BindError> {
        let mut new = Vec::new();
        let mut keep = HashMap::new();
        for (index, l) in config.listeners.iter().enumerate() {
            if self.active.contains_key(&l.address) {
                keep.insert(l.address, l.name.clone());
                continue;
            }
            let socket = TcpListener::bind(l.address)
                .await
                .map_err(|source| BindError {
                    index,
                    name: l.name.clone(),
                    address: l.address,
                    source,
                })?;
            new.push((l.address, l.name.clone(), socket));
        }
        Ok(Prepared { new, keep })
    }

    /// Starts accepting on the new sockets and stops listeners the update removed. Call after the
    /// update is published.
    pub fn commit(&mut self, prepared: Prepared, store: &Arc<Store>) {
        let Prepared { new, keep } = prepared;
        self.active
            .retain(|address, active| match keep.get(address) {
                Some(name) => {
                    *active.name.write().unwrap_or_else(|e| e.into_inner()) = name.clone();
                    true
                }
                None => {
                    tracing::info!(%address, "listener removed");
                    false // dropping `stop` ends its accept loop
                }
            });
        let builder = Arc::new(server::builder());
        for (address, name, socket) in new {
            let local = socket.local_addr().unwrap_or(address);
            let (stop, stopped) = oneshot::channel();
            let name = Arc::new(RwLock::new(name));
            tracing::info!(%local, listener = %name.read().unwrap_or_else(|e| e.into_inner()), "listening");
            tokio::spawn(accept_loop(
                socket,
                name.clone(),
                store.clone(),
                builder.clone(),
                stopped,
            ));
            self.active.insert(
                address,
                Active {
                    name,
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
            .find(|a| &**a.name.read().unwrap_or_else(|e| e.into_inner()) == name)
            .map(|a| a.local)
    }

    /// Stops accepting everywhere.
    pub fn close_all(&mut self) {
        self.active.clear();
    }
}

async fn accept_loop(
    socket: TcpListener,
    name: Arc<RwLock<Arc<str>>>,
    store: Arc<Store>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            a = socket.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let listener = name.read().unwrap_or_else(|e| e.into_inner()).clone();
                // What the listener does is looked up per connection, so a reload that changes
                // it applies to the next connection.
                let Some(kind) = store
                    .load()
                    .and_then(|c| c.listeners.get(&listener).cloned())
                else {
                    continue;
                };
                match kind {
                    CompiledListener::Http(_) => {
                        let ctx = ConnContext::new(store.clone(), listener, peer.ip());
                        tokio::spawn(server::serve(builder.clone(), stream, ctx));
                    }
                    CompiledListener::Tcp(target) => {
                        tokio::spawn(async move {
                            l4::tcp::serve(
                                stream,
                                peer,
                                target.cluster.clone(),
                                target.idle_timeout,
                                &[],
                            )
                            .await
                        });
                    }
                    CompiledListener::TlsPassthrough(table) => {
                        tokio::spawn(l4::sni::serve(stream, peer, table));
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
