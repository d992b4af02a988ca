//! The signals the daemon answers, as one stream of named events.

use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::info;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGHUP: reload the configuration and reopen the access log.
    Reload,
    /// SIGTERM or SIGINT: shut down gracefully (a second one: at once).
    Stop,
}

pub struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    /// Installs the handlers. From here on these signals no longer kill
    /// the process; they arrive as events.
    pub fn install() -> io::Result<Self> {
        Ok(Self {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    pub async fn next(&mut self) -> Event {
        let (name, event) = tokio::select! {
            _ = self.hangup.recv() => ("SIGHUP", Event::Reload),
            _ = self.terminate.recv() => ("SIGTERM", Event::Stop),
            _ = self.interrupt.recv() => ("SIGINT", Event::Stop),
        };
        info!(signal = name, "SIGNAL");
        event
    }
}
