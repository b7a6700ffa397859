//! The manifests directory: every `*.yaml` / `*.yml` file in it (not recursive), watched for
//! edits, renames and deletes. A file that does not parse is reported and keeps its last good
//! content, so one bad edit never takes services away.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{EventKind, RecursiveMode, Watcher, event::AccessKind, event::AccessMode};
use tokio::sync::{mpsc, watch};

use super::manifest::{self, Manifest};
use crate::{catalog::Catalog, resource::fnv1a, status::Registry};

/// How long to wait after an event for more before re-reading: editors write a file in steps.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// A full re-read this often even without events, in case the platform drops some (or no
/// watcher could be set up at all). Cheap: unchanged files are recognised by their hash.
pub const RESCAN: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct FileState {
    /// Hash of the content last read, good or bad; equal content is not parsed again.
    hash: u64,
    /// The last content that parsed; empty if it never did.
    objects: Arc<[Manifest]>,
    /// Modification time and size when last read.
    stamp: Option<(Option<std::time::SystemTime>, u64)>,
}

/// The directory's files and their last good objects.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    registry: Arc<Registry>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>, registry: Arc<Registry>) -> Self {
        ManifestDir {
            dir: dir.into(),
            files: BTreeMap::new(),
            registry,
        }
    }

    /// Re-reads the directory; returns whether any file's objects changed. A file whose size and
    /// modification time are unchanged is not read again (a directory of 10,000 files is
    /// rescanned with 10,000 `stat`s, not 10,000 reads). Errors reading the directory itself
    /// keep everything as it was.
    pub fn scan(&mut self) -> bool {
        let paths = match list(&self.dir) {
            Ok(paths) => paths,
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot list the manifests directory");
                return false;
            }
        };
        let listed: HashSet<&PathBuf> = paths.iter().collect();
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|path, _| listed.contains(path));
        if self.files.len() != before {
            changed = true;
        }
        let names: HashSet<String> = paths.iter().map(|p| p.display().to_string()).collect();
        self.registry
            .retain_source_errors(|file| names.contains(file));
        for path in &paths {
            changed |= self.read(path, true);
        }
        changed
    }

    /// Re-reads only the manifest files among `paths` (what the watcher reported), matched by
    /// file name (the watcher may spell the directory differently, e.g. absolute for a relative
    /// `--manifests`); a file that is gone is dropped. Any other path (the directory itself, a
    /// hidden file such as an editor's temporary or Kubernetes' `..data` swap) may stand for any
    /// change, so it makes this a full [`scan`](Self::scan). Returns whether anything changed.
    pub fn scan_paths(&mut self, paths: &HashSet<PathBuf>) -> bool {
        let mut files = Vec::new();
        for path in paths {
            match path.file_name() {
                Some(name) if is_manifest_name(Path::new(name)) => files.push(self.dir.join(name)),
                _ => return self.scan(),
            }
        }
        let mut changed = false;
        for path in files {
            if path.is_file() {
                changed |= self.read(&path, false);
            } else if self.files.remove(&path).is_some() {
                let gone = path.display().to_string();
                self.registry.retain_source_errors(|file| file != gone);
                changed = true;
            }
        }
        changed
    }

    /// Reads one file if it changed; `trust_stamp`: skip it when its size and modification time
    /// are the ones last read (a rescan), else compare content (an event: a rewrite within the
    /// clock's resolution keeps the stamp).
    fn read(&mut self, path: &Path, trust_stamp: bool) -> bool {
        let stamp = std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()));
        if trust_stamp && stamp.is_some() && self.files.get(path).is_some_and(|f| f.stamp == stamp)
        {
            return false;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            // Gone between listing and reading: the next event or rescan settles it.
            Err(e) => {
                tracing::debug!(file = %path.display(), error = %e, "cannot read manifest file");
                return false;
            }
        };
        let hash = fnv1a(text.as_bytes());
        let state = self.files.entry(path.to_path_buf()).or_default();
        state.stamp = stamp;
        if state.hash == hash {
            return false;
        }
        state.hash = hash;
        let file = path.display().to_string();
        // The span puts the file on whatever parsing logs.
        let parsed =
            tracing::info_span!("manifest", file).in_scope(|| manifest::parse_documents(&text));
        match parsed {
            Ok(objects) => {
                self.registry.clear_source_error(&file);
                if *state.objects != *objects {
                    state.objects = objects.into();
                    return true;
                }
            }
            Err(e) => {
                tracing::error!(
                    file,
                    line = e.line,
                    reason = e.reason,
                    "manifest file rejected; serving its last good content"
                );
                self.registry.set_source_error(&file, e.line, &e.reason);
            }
        }
        false
    }

    /// The catalog of every file's last good objects, files in path order.
    pub fn catalog(&self) -> Catalog {
        Catalog::from_manifests(self.files.values().flat_map(|f| f.objects.iter()))
    }

    /// The catalog to publish; what translation cannot use in it goes to the registry (and the
    /// log) first, once per change rather than once per proxy.
    fn publishable(&self) -> Arc<Catalog> {
        let catalog = self.catalog();
        self.registry
            .set_problems(crate::translate::object_diagnostics(&catalog));
        Arc::new(catalog)
    }

    /// Scans now, publishes, then keeps watching until the receivers are gone. The first scan
    /// has been published when this returns `Ok(watch receiver)`.
    pub async fn watch(
        mut self,
    ) -> anyhow::Result<(watch::Receiver<Arc<Catalog>>, tokio::task::JoinHandle<()>)> {
        self.scan();
        let (tx, rx) = watch::channel(self.publishable());
        let (events_tx, mut events) = mpsc::unbounded_channel::<Vec<PathBuf>>();
        let dir = self.dir.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            match res {
                // Our own reads show up as access events: ignoring them is what keeps a scan
                // from triggering the next one.
                Ok(event) if is_change(&event.kind) => {
                    let _ = events_tx.send(event.paths);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "manifest watcher error"),
            }
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
        let (watcher, rescan) = match watcher {
            Ok(w) => (Some(w), RESCAN),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the manifests directory; polling every second");
                (None, Duration::from_secs(1))
            }
        };
        let task = tokio::spawn(async move {
            let _watcher = watcher; // dropping it stops the events
            // A fixed period: events, however frequent, never postpone the full rescan.
            let mut rescans =
                tokio::time::interval_at(tokio::time::Instant::now() + rescan, rescan);
            rescans.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // The paths the watcher named since the last pass; `None`: rescan everything
                // (the periodic pass, or an event that named no path).
                let mut named: Option<HashSet<PathBuf>> = Some(HashSet::new());
                let note = |paths: Vec<PathBuf>, named: &mut Option<HashSet<PathBuf>>| {
                    if paths.is_empty() {
                        *named = None;
                    } else if let Some(set) = named.as_mut() {
                        set.extend(paths);
                    }
                };
                tokio::select! {
                    event = events.recv() => {
                        let Some(paths) = event else { break };
                        note(paths, &mut named);
                        // Debounce: wait until the events stop for DEBOUNCE.
                        while let Ok(Some(paths)) = tokio::time::timeout(DEBOUNCE, events.recv()).await {
                            note(paths, &mut named);
                        }
                    }
                    _ = rescans.tick() => named = None,
                    () = tx.closed() => break,
                }
                tracing::trace!(?named, "rescanning manifests");
                let changed = match &named {
                    Some(paths) => self.scan_paths(paths),
                    None => self.scan(),
                };
                if changed {
                    let catalog = self.publishable();
                    tracing::info!(
                        services = catalog.services.len(),
                        slices = catalog.endpoint_slices.len(),
                        gateways = catalog.gateways.len(),
                        routes = catalog.http_routes.len(),
                        "catalog updated"
                    );
                    tx.send_replace(catalog);
                }
            }
        });
        Ok((rx, task))
    }
}

fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if is_manifest(&path) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// A `*.yaml` / `*.yml` regular file that is not hidden (editors' temporary files are).
fn is_manifest(path: &Path) -> bool {
    is_manifest_name(path) && path.is_file()
}

/// Whether the file name is a manifest's: `*.yaml` / `*.yml`, not hidden.
fn is_manifest_name(path: &Path) -> bool {
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    yaml && !hidden
}
