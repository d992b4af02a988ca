//! The daemon's life after start: signals, reloads, systemd notifications
//! and the graceful stop.

pub mod notify;
pub mod reload;
pub mod signals;

use std::path::Path;

use tracing::{error, info};

use crate::daemon::Running;
use crate::logging::LogHandle;
use signals::{Event, Signals};

/// Serves until SIGTERM/SIGINT, reloading on SIGHUP. Returns once drained;
/// a second stop signal during the drain exits the process at once.
pub async fn supervise(running: Running, config_path: &Path, log: &LogHandle, mut signals: Signals) {
    let sites = running.state().snapshot().config.sites.len();
    notify::ready(&format!("serving {sites} site(s)"));
    loop {
        match signals.next().await {
            Event::Reload => {
                notify::reloading();
                log.reopen_access_log();
                let status = match reload::reload(running.state(), config_path, running.static_config()) {
                    Ok(sites) => format!("serving {sites} site(s); last reload succeeded"),
                    Err(_) => format!(
                        "serving {} site(s); last reload FAILED, see the log",
                        running.state().snapshot().config.sites.len()
                    ),
                };
                notify::ready(&status);
            }
            Event::Stop => break,
        }
    }
    notify::stopping();
    let grace = running.static_config().shutdown_timeout;
    info!(grace_secs = grace.as_secs(), "STOPPING");
    let drain = running.shutdown();
    tokio::pin!(drain);
    tokio::select! {
        cut = &mut drain => info!(cut_connections = cut, "STOPPED"),
        () = async { while signals.next().await != Event::Stop {} } => {
            error!("second stop signal; exiting without waiting for connections");
            std::process::exit(1);
        }
    }
}
