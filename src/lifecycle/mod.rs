//! The daemon's life after start: signals, reloads, systemd notifications
//! and the graceful stop.

pub mod notify;
pub mod reload;
pub mod signals;

use std::path::Path;

use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::daemon::Running;
use crate::logging::LogHandle;
use signals::{Event, Signals};

/// How the daemon's life ended, which decides the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Drained, cutting only what outlived the grace period: exit 0.
    Drained,
    /// A second stop signal arrived during the drain: exit 1 at once.
    Aborted,
}

/// Serves until SIGTERM/SIGINT, reloading on SIGHUP, then drains.
pub async fn supervise(
    mut running: Running,
    config_path: &Path,
    log: &LogHandle,
    mut signals: Signals,
) -> Exit {
    notify::ready(&serving(&running, None));
    while signals.next().await == Event::Reload {
        notify::reloading();
        // First, and whatever the new file says: logrotate has already
        // moved the old file away and waits for this.
        log.reopen_access_log();
        let result = reload::reload(
            running.state(),
            config_path,
            running.static_config(),
            running.manual_certificates(),
        )
        .await;
        notify::ready(&serving(&running, Some(result.is_ok())));
    }

    let grace = running.static_config().shutdown_timeout;
    // One deadline for everything: connections, then tunnels.
    let started = Instant::now();
    let deadline = started + grace;
    notify::stopping();
    info!(grace_secs = grace.as_secs(), "STOPPING");
    let shutdown = async move {
        running.close_listeners().await;
        let (connections, tunnels) = running.open_connections();
        info!(connections, tunnels, "LISTENERS_CLOSED");
        running.drain(deadline).await
    };
    tokio::select! {
        drained = shutdown => {
            let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let (cut, tunnels) = (drained.total(), drained.tunnels);
            if cut == 0 {
                info!(cut_connections = cut, cut_tunnels = tunnels, elapsed_ms, "STOPPED");
            } else {
                warn!(cut_connections = cut, cut_tunnels = tunnels, elapsed_ms, "STOPPED");
            }
            Exit::Drained
        }
        () = second_stop(&mut signals) => {
            error!(detail = "second stop signal; exiting without waiting for connections", "ABORTED");
            Exit::Aborted
        }
    }
}

/// Resolves at the next SIGTERM/SIGINT; SIGHUP is ignored while draining.
async fn second_stop(signals: &mut Signals) {
    while signals.next().await != Event::Stop {}
}

/// The short status line systemd shows (`systemctl status`).
fn serving(running: &Running, last_reload_ok: Option<bool>) -> String {
    let sites = running.state().snapshot().config.sites.len();
    match last_reload_ok {
        None => format!("serving {sites} site(s)"),
        Some(true) => format!("serving {sites} site(s); last reload succeeded"),
        Some(false) => {
            format!("serving {sites} site(s); last reload FAILED, old configuration kept")
        }
    }
}
