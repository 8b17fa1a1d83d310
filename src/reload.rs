//! Configuration reload (SIGHUP, `POST /admin/reload`).
//!
//! The new file is read and validated in full on a blocking thread before
//! anything changes; an invalid file changes nothing. A valid one becomes a
//! new [`Snapshot`] swapped in with one `ArcSwap::store`: requests in flight
//! keep the snapshot they loaded, and backends whose identity (name + url)
//! and settings did not change keep their live state. Reloads are
//! serialised, so the last one wins.

use std::sync::Arc;

use crate::{
    config::Config,
    gateway::{ReloadError, Shared},
    snapshot::Snapshot,
};

/// Re-reads the config file and swaps it in. Returns a short description of
/// what changed, or why nothing did.
pub(crate) async fn reload(shared: &Arc<Shared>) -> Result<Vec<String>, ReloadError> {
    let _serialised = shared.reload_lock.lock().await;
    let path = shared
        .config_path
        .clone()
        .ok_or(ReloadError::NoConfigFile)?;
    let env = shared.env.clone();
    let parsed = tokio::task::spawn_blocking(move || Config::load(&path, &*env))
        .await
        .map_err(|e| ReloadError::Invalid(crate::config::ConfigErrors(vec![join_error(e)])))?;
    let config = match parsed {
        Ok(config) => config,
        Err(errors) => {
            tracing::error!(errors = %errors, "config reload refused; the old config keeps serving");
            return Err(ReloadError::Invalid(errors));
        }
    };
    let changes = {
        let _serialised = shared.build_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = shared.snapshot.load_full();
        let changes = describe_changes(&old.config, &config);
        let snapshot = Snapshot::build(Arc::new(config), Some(&old), &shared.metrics)?;
        shared.metrics.publish_weights(&snapshot);
        shared.snapshot.store(Arc::new(snapshot));
        changes
    };
    crate::health::checker::sync_probes(shared);
    tracing::info!(changes = %changes.join("; "), "config reloaded");
    Ok(changes)
}

/// A one-line-per-item diff of the parts users change most.
fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changes = Vec::new();
    if old.server.listen != new.server.listen {
        changes.push(format!(
            "server.listen changed to {} (needs a restart; still listening on {})",
            new.server.listen, old.server.listen
        ));
    }
    for b in &new.backends {
        match old.backends.iter().find(|o| o.name == b.name) {
            None => changes.push(format!("backend {} added", b.name)),
            Some(o) if o != b => changes.push(format!("backend {} changed", b.name)),
            Some(_) => {}
        }
    }
    for o in &old.backends {
        if !new.backends.iter().any(|b| b.name == o.name) {
            changes.push(format!("backend {} removed", o.name));
        }
    }
    for m in &new.models {
        match old.models.iter().find(|o| o.name == m.name) {
            None => changes.push(format!("model {} added", m.name)),
            Some(o) if o != m => changes.push(format!("model {} changed", m.name)),
            Some(_) => {}
        }
    }
    for o in &old.models {
        if !new.models.iter().any(|m| m.name == o.name) {
            changes.push(format!("model {} removed", o.name));
        }
    }
    if changes.is_empty() {
        changes.push("no changes".to_owned());
    }
    changes
}

fn join_error(e: tokio::task::JoinError) -> crate::config::ConfigError {
    crate::config::ConfigError {
        file: String::new(),
        line: 0,
        column: 0,
        key: String::new(),
        message: format!("config loader failed: {e}"),
    }
}
