//! Translations shared between streams. Every stream used to translate the whole catalog for its
//! node on every catalog change, so one change cost proxies × catalog; nodes of one class (same
//! role, namespace, service account, labels and Gateway: see [`NodeClass`]) get the same
//! resources, so the first stream of a class to ask translates and the others share the result.
//! Only the latest catalog's translations are kept, and only for [`MAX_AGE`]: translation also
//! depends on the clock (a certificate that expired or became valid since), which a stream that
//! connects later must see as a fresh translation would.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::OnceCell;

use crate::{
    catalog::Catalog,
    resource::Snapshot,
    translate::{self, NodeClass, NodeInfo},
};

type Cell = Arc<OnceCell<Arc<Snapshot>>>;

/// How long a translation is shared before the next stream to ask translates again.
pub const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Translations {
    current: Mutex<Generation>,
    /// The controller's settings every translation uses (the mesh trust domain).
    context: Arc<translate::Context>,
}

impl super::DiscoveryService {
    /// Marks meshed endpoints with their SPIFFE IDs in `trust_domain`: set when the controller
    /// runs a CA (`None`, the default: no endpoint is meshed). Call before serving.
    pub fn with_trust_domain(mut self, trust_domain: Option<String>) -> Self {
        self.translations = Arc::new(Translations::new(translate::Context { trust_domain }));
        self
    }
}

#[derive(Debug, Default)]
struct Generation {
    catalog: Option<Arc<Catalog>>,
    started: Option<std::time::Instant>,
    by_class: HashMap<NodeClass, Cell>,
}

impl Translations {
    pub fn new(context: translate::Context) -> Self {
        Translations {
            current: Mutex::default(),
            context: Arc::new(context),
        }
    }

    /// The snapshot of `node`'s class for `catalog`, translated once per catalog and class.
    /// Translation runs on a blocking thread so that a large catalog does not stall the other
    /// streams' ACKs on the runtime's few workers.
    pub async fn get(&self, catalog: &Arc<Catalog>, node: &NodeInfo) -> Arc<Snapshot> {
        let cell = {
            let mut current = self.current.lock().expect("translations lock");
            let same_catalog = current
                .catalog
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, catalog));
            let fresh = current.started.is_some_and(|t| t.elapsed() < MAX_AGE);
            if !(same_catalog && fresh) {
                *current = Generation {
                    catalog: Some(catalog.clone()),
                    started: Some(std::time::Instant::now()),
                    by_class: HashMap::new(),
                };
            }
            current
                .by_class
                .entry(NodeClass::of(node))
                .or_default()
                .clone()
        };
        cell.get_or_init(|| {
            let (catalog, node) = (catalog.clone(), node.clone());
            let context = self.context.clone();
            async move {
                let translated = tokio::task::spawn_blocking(move || {
                    translate::translate_in(&context, &catalog, &node)
                })
                .await
                .expect("translation does not panic");
                Arc::new(translated)
            }
        })
        .await
        .clone()
    }

    /// Classes translated for the current catalog (for tests and status).
    pub fn classes(&self) -> usize {
        self.current
            .lock()
            .expect("translations lock")
            .by_class
            .len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::translate::Role;

    fn sidecar(id: &str, namespace: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            role: Role::Sidecar,
            namespace: namespace.into(),
            service_account: "default".into(),
            labels: BTreeMap::new(),
            gateway: None,
        }
    }

    #[tokio::test]
    async fn one_translation_per_class_and_catalog() {
        let translations = Translations::default();
        let catalog = Arc::new(Catalog::default());
        let a = translations.get(&catalog, &sidecar("a", "shop")).await;
        let b = translations.get(&catalog, &sidecar("b", "shop")).await;
        assert!(Arc::ptr_eq(&a, &b), "same class, same catalog: shared");
        let c = translations.get(&catalog, &sidecar("c", "other")).await;
        assert!(!Arc::ptr_eq(&a, &c), "another namespace is another class");
        assert_eq!(translations.classes(), 2);

        // A new catalog (even an equal one) starts a new generation.
        let next = Arc::new(Catalog::default());
        let d = translations.get(&next, &sidecar("d", "shop")).await;
        assert!(!Arc::ptr_eq(&a, &d));
        assert_eq!(translations.classes(), 1);
    }
}
