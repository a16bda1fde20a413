//! Hot reload: the config file is watched, and SIGHUP forces a re-read.
//!
//! A valid new config is swapped in atomically (requests in flight finish under the config they
//! started with; listeners and connections are untouched). An invalid one is refused with every
//! problem logged, counted in `tollgate_config_reloads_total{result="failed"}`, and the running
//! config stays. Listeners, threads, the grace period, the keep-alive pool and `[log]` only take
//! effect at start; a reload that changes them says so. Request limits apply at once.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{EventKind, RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::config::{Config, ConfigErrors};
use crate::state::Gateway;

/// Editors write files in several steps; events within this window are one change.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The new config runs, with this version.
    Applied(u64),
    /// The file did not change.
    Unchanged,
}

/// Re-reads the config file and applies it if it is valid and different, or valid and `force`d
/// (SIGHUP: the text may be the same while target host names now resolve elsewhere).
pub async fn reload(
    gateway: &Arc<Gateway>,
    trigger: &'static str,
    force: bool,
) -> Result<Reloaded, ConfigErrors> {
    let path = gateway.config_path.clone();
    // Reading and resolving target host names blocks; keep it off the async workers.
    let loaded = tokio::task::spawn_blocking(move || Config::from_file(&path))
        .await
        .unwrap_or_else(|join| {
            Err(ConfigErrors(vec![crate::config::ConfigError::new(
                "",
                format!("reload task failed: {join}"),
            )]))
        });
    let (text, config) = match loaded {
        Ok(loaded) => loaded,
        Err(errors) => {
            gateway.metrics.reload(false);
            let problems: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            tracing::error!(trigger, problems = ?problems, "config reload refused; the running config stays");
            return Err(errors);
        }
    };
    if !force && gateway.is_current_text(&text) {
        tracing::debug!(trigger, "config file unchanged");
        return Ok(Reloaded::Unchanged);
    }
    if config.server != gateway.server {
        tracing::warn!(
            trigger,
            "[server] changed: listeners, threads and limits of the process apply after a restart"
        );
    }
    if config.log != gateway.log {
        tracing::warn!(trigger, "[log] changed: log settings apply after a restart");
    }
    if config.control_plane != gateway.control_plane {
        tracing::warn!(
            trigger,
            "[control_plane] changed: the control plane followed changes after a restart"
        );
    }
    if config.redis != gateway.redis {
        tracing::warn!(
            trigger,
            "[redis] changed: the shared counters' settings apply after a restart"
        );
    }
    let started = crate::config::Metering {
        refund_upstream_5xx: config.metering.refund_upstream_5xx,
        ..gateway.metering.clone()
    };
    if config.metering != started {
        tracing::warn!(
            trigger,
            "[metering] changed: spool_dir, spool_max_bytes, flush_interval and batch_size apply \
             after a restart (refund_upstream_5xx applies now)"
        );
    }
    let providers: Vec<String> = config
        .jwt_providers
        .iter()
        .map(crate::identity::jwt::describe)
        .collect();
    if providers != gateway.jwt_described {
        tracing::warn!(
            trigger,
            "[[jwt_providers]] changed: JWT providers apply after a restart"
        );
    }
    let routes = config.routes.len();
    let upstreams = config.upstreams.len();
    let version = gateway.apply(text, config);
    gateway.metrics.reload(true);
    tracing::info!(trigger, version, routes, upstreams, "config reloaded");
    Ok(Reloaded::Applied(version))
}

/// The background service that watches the file and listens for SIGHUP.
#[derive(Debug)]
pub struct ConfigWatcher {
    gateway: Arc<Gateway>,
}

impl ConfigWatcher {
    /// Watches `gateway`'s config file.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

#[async_trait]
impl BackgroundService for ConfigWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let _watcher = if self.gateway.server.watch_config {
            watch_file(&self.gateway.config_path, tx)
        } else {
            None
        };
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => Some(hangup),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; reloads follow file changes only");
                None
            }
        };
        self.gateway
            .reload_handlers_ready
            .store(true, std::sync::atomic::Ordering::SeqCst);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    let _ = reload(&self.gateway, "sighup", true).await;
                }
                Some(()) = rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                    let _ = reload(&self.gateway, "file", false).await;
                }
            }
        }
    }
}

/// Events after which the file is whole: closed after writing, created, or renamed into place.
/// Plain data modifications are skipped, so a slow writer is not read half-way.
fn is_complete_write(kind: &EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(
                RenameMode::To | RenameMode::Both | RenameMode::Any
            ))
    )
}

/// Watches the directory of `path` (editors often replace the file rather than write it) and
/// signals every event that concerns the file.
fn watch_file(path: &Path, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    let name = path.file_name()?.to_owned();
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => Path::new(".").to_owned(),
    };
    let handler = move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && is_complete_write(&event.kind)
            && event
                .paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_os_str()))
        {
            let _ = tx.send(());
        }
    };
    let watcher = notify::recommended_watcher(handler).and_then(|mut watcher| {
        watcher.watch(&directory, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    match watcher {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!(%error, directory = %directory.display(), "cannot watch the config file; send SIGHUP to reload");
            None
        }
    }
}
