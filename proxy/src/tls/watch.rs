//! Watching certificate files. cert-manager and Kubernetes secret volumes replace files by
//! renaming a new file (or a `..data` symlink) over the old one, which a watch on the file itself
//! would lose; so the directories holding the files are watched, and any change in them rereads
//! the files (unchanged bytes are ignored, see [`Certs::reload`]).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Weak,
};

use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode},
};

use super::server::Certs;

/// A running watch; dropping it stops it.
pub(super) struct Watch(#[allow(dead_code)] notify::RecommendedWatcher);

impl Watch {
    /// Watches the directories of `files`; events reload `certs` while it lives. `None` (logged)
    /// when the system refuses a watch: the certificates then serve until the next config update.
    pub(super) fn start(files: &[&Path], certs: Weak<Certs>) -> Option<Watch> {
        let listener = certs.upgrade().map(|c| c.listener.clone());
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            // Opening and reading a file are events too, among them this reload's own reads.
            let relevant = matches!(
                event.kind,
                EventKind::Create(_)
                    | EventKind::Modify(_)
                    | EventKind::Remove(_)
                    | EventKind::Access(AccessKind::Close(AccessMode::Write))
            );
            if relevant && let Some(certs) = certs.upgrade() {
                certs.reload();
            }
        })
        .map_err(|e| tracing::error!(?listener, error = %e, "cannot watch certificate files; they will not be reloaded"))
        .ok()?;
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .map(|f| match f.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        for dir in dirs {
            if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
                tracing::error!(?listener, dir = %dir.display(), error = %e, "cannot watch certificate directory; its files will not be reloaded");
            }
        }
        Some(Watch(watcher))
    }
}
