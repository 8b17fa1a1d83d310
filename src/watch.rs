//! `server.watch_config = true`: reload when the config file changes on disk.
//!
//! Editors and Kubernetes rarely modify a file in place. Vim and most tools
//! write a new file and rename it over the old one (a new inode, so a watch
//! on the file itself goes blind after the first save), and a ConfigMap
//! volume swaps a `..data` symlink to a new timestamped directory while the
//! file itself stays a symlink `weir.toml -> ..data/weir.toml`. So, as the
//! `notify` documentation advises, this watches the file's *parent
//! directory*, non-recursively, and keeps only events that name the file,
//! `..data`, or the file a symlinked config resolves to (whose directory is
//! watched too when it is not the link's: a subdirectory or elsewhere;
//! a target reached through `..data` is covered by that name), and every
//! other symlink on the way under its own name in the directory holding it
//! (a deploy's `current -> releases/v2`). Directories are watched where
//! they really are, and symlinks re-resolved before every reload, so a link
//! that moves is followed.
//!
//! A save is several events (create, write, rename; the ConfigMap swap five
//! or more), so they are debounced: the reload runs once the directory has
//! been quiet for [`DEBOUNCE`] (at most [`MAX_DELAY`] after the first
//! event). A reload whose file content is byte-for-byte what the watcher
//! last saw (a `touch`, a `chmod`) is skipped.
//!
//! Uses `notify` (inotify on Linux, FSEvents on macOS); if the OS watcher
//! cannot start (e.g. the inotify instance limit is reached) it falls back
//! to `notify`'s poller, checking every [`POLL_INTERVAL`]. The reload itself
//! (validation, logging, the metric) is `reload.rs`'s; this module only
//! decides *when*. The task is owned by the gateway's `JoinSet` and ends on
//! shutdown; dropping the watcher stops its OS thread.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{config, gateway::Shared, reload};

/// Quiet time after the last relevant event before reloading.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(200);

/// Longest a reload waits behind a stream of events that never goes quiet.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(2);

/// How often the fallback poller looks at the directory.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The ConfigMap volume's symlink to the current data directory.
const CONFIGMAP_DATA: &str = "..data";

/// Watches `path` and reloads the gateway when it changes, until `shutdown`.
pub(crate) async fn watch(shared: Arc<Shared>, path: PathBuf, shutdown: CancellationToken) {
    let (tx, mut events) = mpsc::unbounded_channel();
    // Runs on notify's thread: forward everything, filter here.
    let handler = move |event: notify::Result<notify::Event>| {
        let _ = tx.send(event);
    };
    let mut watcher = match start_watcher(handler) {
        Some(w) => w,
        None => return,
    };
    let mut targets = Targets::resolve(&path);
    targets.apply(&mut *watcher, &Targets::default());
    tracing::info!(path = %path.display(), "watching the config file for changes");
    // What is served came from these bytes. A change written after they
    // were read and before the watch began raised no event: it is found
    // here, by comparing, and applied at once.
    let mut last_seen = shared.snapshot.load().config.source_fingerprint;
    reload_if_changed(&shared, &path, &mut last_seen).await;
    loop {
        // Wait for a relevant event.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.recv() => match event {
                Some(event) if targets.is_relevant(&event) => {}
                Some(_) => continue,
                None => return,
            },
        }
        // Debounce: wait until the directory has been quiet for DEBOUNCE.
        let first = Instant::now();
        let mut deadline = first + DEBOUNCE;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => break,
                event = events.recv() => match event {
                    Some(event) if targets.is_relevant(&event) => {
                        deadline = (Instant::now() + DEBOUNCE).min(first + MAX_DELAY);
                    }
                    Some(_) => {}
                    None => return,
                },
            }
        }
        // Follow a symlink that now points elsewhere, before reading: an
        // edit made after the new watch began raises an event, and one
        // made before it is in the bytes read next. (Moving the watch
        // after the reload lost an edit landing between the two.)
        let next = Targets::resolve(&path);
        if next != targets {
            next.apply(&mut *watcher, &targets);
            targets = next;
        }
        reload_if_changed(&shared, &path, &mut last_seen).await;
    }
}

/// The OS watcher, or the poller when it cannot start.
fn start_watcher(handler: impl notify::EventHandler + Clone) -> Option<Box<dyn Watcher + Send>> {
    match notify::recommended_watcher(handler.clone()) {
        Ok(w) => Some(Box::new(w)),
        Err(e) => {
            tracing::warn!(error = %e, interval = ?POLL_INTERVAL, "cannot start a file watcher; polling the config directory instead");
            let config = notify::Config::default().with_poll_interval(POLL_INTERVAL);
            match notify::PollWatcher::new(handler, config) {
                Ok(w) => Some(Box::new(w)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /admin/reload");
                    None
                }
            }
        }
    }
}

/// The directories watched and the file names whose events count.
#[derive(Debug, Default, PartialEq)]
struct Targets {
    /// Directories watched non-recursively: the file's parent, and the
    /// resolved file's parent when a symlink leads outside it.
    dirs: Vec<PathBuf>,
    /// File names whose events trigger a reload.
    names: Vec<OsString>,
}

impl Targets {
    /// What to watch for `path`, resolving symlinks now. Directories are
    /// watched where they really are (a watch follows the directory, not
    /// the name it was reached by), so when a symlink on the way moves,
    /// the set changes and the watches move with it.
    fn resolve(path: &Path) -> Self {
        let parent = parent_dir(path);
        let mut dirs = vec![real_dir(&parent)];
        let mut names = vec![OsString::from(CONFIGMAP_DATA)];
        names.extend(path.file_name().map(OsString::from));
        // Every symlink on the way to the file, directories included (a
        // `current -> releases/v2` swapped by a deploy): its swap is an
        // event under its own name, in the directory that holds it.
        for (dir, name) in symlinks_on(path) {
            let dir = real_dir(&dir);
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
            if !names.contains(&name) {
                names.push(name);
            }
        }
        if let Ok(real) = std::fs::canonicalize(path) {
            // A ConfigMap's target lives in a timestamped directory reached
            // through `..data`, which is replaced, never modified: the
            // `..data` name covers it. Any other target (beside the link,
            // below it, or elsewhere) is watched where it lives, under its
            // own name, so edits in place and saves by rename are seen.
            let through_data = std::fs::canonicalize(parent.join(CONFIGMAP_DATA))
                .is_ok_and(|data| real.starts_with(data));
            if !through_data {
                let real_parent = parent_dir(&real);
                if !dirs.contains(&real_parent) {
                    dirs.push(real_parent);
                }
                names.extend(
                    real.file_name()
                        .filter(|n| !names.iter().any(|m| m == n))
                        .map(OsString::from),
                );
            }
        }
        Self { dirs, names }
    }

    /// Watches the directories of `self` that `old` did not, and unwatches
    /// the ones it no longer has. Failures are logged; SIGHUP still works.
    fn apply(&self, watcher: &mut dyn Watcher, old: &Targets) {
        for dir in old.dirs.iter().filter(|d| !self.dirs.contains(d)) {
            let _ = watcher.unwatch(dir);
        }
        for dir in self.dirs.iter().filter(|d| !old.dirs.contains(d)) {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory");
            }
        }
    }

    /// Whether an event may have changed the config file: it names one of
    /// our file names and is more than a read. Watcher errors are logged.
    fn is_relevant(&self, event: &notify::Result<notify::Event>) -> bool {
        match event {
            Ok(event) => {
                !matches!(event.kind, EventKind::Access(_))
                    && event.paths.iter().any(|p| {
                        p.file_name()
                            .is_some_and(|n| self.names.iter().any(|m| m == n))
                    })
            }
            Err(e) => {
                tracing::warn!(error = %e, "config watcher error");
                // A rescan or overflow may hide a change: look at the file.
                true
            }
        }
    }
}

/// `dir` with its symlinks resolved, or as it is when it cannot be.
fn real_dir(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// The most symlinks followed resolving a path (Linux's own limit).
const MAX_SYMLINKS: usize = 40;

/// Every symlink met resolving `path`, component by component as the
/// kernel does: the directory that holds it (as reached, not resolved) and
/// its name. Stops at a component that does not exist.
fn symlinks_on(path: &Path) -> Vec<(PathBuf, OsString)> {
    use std::path::Component;
    // Each component owned, so a link's target can be queued in its place.
    let owned = |p: &Path| -> Vec<PathBuf> {
        p.components()
            .map(|c| PathBuf::from(c.as_os_str()))
            .collect()
    };
    let mut found = Vec::new();
    let mut todo: std::collections::VecDeque<PathBuf> = owned(path).into();
    let mut at = PathBuf::new();
    while let Some(part) = todo.pop_front() {
        match part.components().next() {
            Some(Component::Prefix(_) | Component::RootDir) => at.push(&part),
            Some(Component::CurDir) | None => {}
            Some(Component::ParentDir) => {
                // `at` holds no symlink, so `..` is its parent.
                if at.as_os_str().is_empty() || at.ends_with("..") {
                    at.push("..");
                } else {
                    at.pop();
                }
            }
            Some(Component::Normal(name)) => {
                let next = at.join(name);
                let Ok(meta) = std::fs::symlink_metadata(&next) else {
                    break;
                };
                if !meta.file_type().is_symlink() {
                    at = next;
                    continue;
                }
                if found.len() >= MAX_SYMLINKS {
                    break;
                }
                let Ok(target) = std::fs::read_link(&next) else {
                    break;
                };
                found.push((parent_dir(&next), name.to_os_string()));
                for c in owned(&target).into_iter().rev() {
                    todo.push_front(c);
                }
            }
        }
    }
    found
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Reloads when the file's bytes differ from `last_seen` (the last bytes
/// loaded or tried); a file that fails to load is tried again only once it
/// changes again.
async fn reload_if_changed(shared: &Arc<Shared>, path: &Path, last_seen: &mut Option<u64>) {
    let now_seen = match fingerprint(path).await {
        Ok(seen) => Some(seen),
        Err(e) => {
            // Mid-swap or deleted (or no regular file): the old config
            // keeps serving, and the event that brings the file back
            // triggers the reload.
            tracing::warn!(path = %path.display(), error = %e, "config file cannot be read; waiting for it to change");
            return;
        }
    };
    if now_seen != *last_seen {
        *last_seen = now_seen;
        // Outcome logged and counted by the reload itself.
        let _ = reload::reload(shared).await;
    }
}

/// [`config::fingerprint`] of the file's bytes (following symlinks), or
/// why it cannot be read.
async fn fingerprint(path: &Path) -> std::io::Result<u64> {
    let path = path.to_path_buf();
    let bytes = tokio::task::spawn_blocking(move || config::read_again(&path))
        .await
        .map_err(std::io::Error::other)??;
    Ok(config::fingerprint(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relevant_events_name_the_file_or_the_configmap_link() {
        let targets = Targets {
            dirs: vec![PathBuf::from("/etc/weir")],
            names: vec!["..data".into(), "weir.toml".into()],
        };
        let event = |kind, path: &str| Ok(notify::Event::new(kind).add_path(PathBuf::from(path)));
        let modify = EventKind::Modify(notify::event::ModifyKind::Any);
        let create = EventKind::Create(notify::event::CreateKind::Any);
        let access = EventKind::Access(notify::event::AccessKind::Any);
        assert!(targets.is_relevant(&event(modify, "/etc/weir/weir.toml")));
        assert!(targets.is_relevant(&event(create, "/etc/weir/..data")));
        assert!(!targets.is_relevant(&event(access, "/etc/weir/weir.toml")));
        assert!(!targets.is_relevant(&event(modify, "/etc/weir/other.toml")));
        assert!(!targets.is_relevant(&event(create, "/etc/weir/..data_tmp")));
    }

    #[test]
    fn a_bare_file_name_is_watched_in_the_current_directory() {
        let t = Targets::resolve(Path::new("no-such-weir.toml"));
        assert_eq!(t.dirs, vec![real_dir(Path::new("."))]);
        assert!(t.names.contains(&OsString::from("no-such-weir.toml")));
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_beside_or_below_adds_its_target_name_and_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(root.path()).expect("canonical");
        std::fs::create_dir(root.join("sub")).expect("mkdir");
        for target in ["weir-v2.toml", "sub/real.toml"] {
            std::fs::write(root.join(target), "").expect("write");
        }
        let link = root.join("weir.toml");
        std::os::unix::fs::symlink("weir-v2.toml", &link).expect("symlink");
        let t = Targets::resolve(&link);
        assert_eq!(t.dirs, vec![root.clone()], "{t:?}");
        assert!(t.names.contains(&OsString::from("weir-v2.toml")), "{t:?}");
        std::fs::remove_file(&link).expect("rm");
        std::os::unix::fs::symlink("sub/real.toml", &link).expect("symlink");
        let t = Targets::resolve(&link);
        assert_eq!(t.dirs, vec![root.clone(), root.join("sub")], "{t:?}");
        assert!(t.names.contains(&OsString::from("real.toml")), "{t:?}");
    }

    #[cfg(unix)]
    #[test]
    fn every_symlink_on_the_way_is_watched_under_its_name() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(root.path()).expect("canonical");
        std::fs::create_dir_all(root.join("releases/v1")).expect("mkdir");
        std::fs::write(root.join("releases/v1/weir.toml"), "").expect("write");
        symlink("releases/v1", root.join("current")).expect("symlink");
        // Through a directory link.
        let t = Targets::resolve(&root.join("current/weir.toml"));
        assert_eq!(
            t.dirs,
            vec![root.join("releases/v1"), root.clone()],
            "{t:?}"
        );
        assert!(t.names.contains(&OsString::from("current")), "{t:?}");
        // A file link whose target goes through a directory link, and a
        // `..` on the way.
        symlink(
            "../releases/../current/weir.toml",
            root.join("releases/weir.toml"),
        )
        .expect("symlink");
        let found = symlinks_on(&root.join("releases/weir.toml"));
        assert_eq!(
            found,
            vec![
                (root.join("releases"), OsString::from("weir.toml")),
                (root.clone(), OsString::from("current")),
            ]
        );
        // A loop ends.
        symlink("loop", root.join("loop")).expect("symlink");
        assert_eq!(symlinks_on(&root.join("loop")).len(), MAX_SYMLINKS);
    }

    #[cfg(unix)]
    #[test]
    fn a_configmap_target_is_covered_by_its_data_link() {
        let root = tempfile::tempdir().expect("tempdir");
        let root = root.path();
        std::fs::create_dir(root.join("..v1")).expect("mkdir");
        std::fs::write(root.join("..v1/weir.toml"), "").expect("write");
        std::os::unix::fs::symlink("..v1", root.join("..data")).expect("symlink");
        let link = root.join("weir.toml");
        std::os::unix::fs::symlink("..data/weir.toml", &link).expect("symlink");
        let t = Targets::resolve(&link);
        assert_eq!(t.dirs, vec![root.to_path_buf()], "{t:?}");
        assert_eq!(t.names, vec![OsString::from("..data"), "weir.toml".into()]);
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_elsewhere_adds_its_target_directory() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let real = b.path().join("real.toml");
        std::fs::write(&real, "").expect("write");
        let link = a.path().join("weir.toml");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let t = Targets::resolve(&link);
        assert_eq!(t.dirs.len(), 2, "{t:?}");
        assert!(t.names.contains(&OsString::from("real.toml")));
    }
}
