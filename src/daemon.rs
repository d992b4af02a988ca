//! Starting the daemon: bind every listener, build the shared state and
//! spawn the serving tasks. The binary and the tests start it the same way.

use std::io;
use std::net::SocketAddr;

use tokio::task::JoinSet;
use tracing::info;

use crate::config::{Config, StaticConfig, TlsConfig};
use crate::router::router;
use crate::server::{Server, listener};
use crate::state::AppState;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({field}): {source}")]
    Bind {
        field: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("server.tls.mode = \"{0}\" is not supported by this build")]
    TlsUnsupported(&'static str),
}

/// A started proxy: listeners bound and serving.
pub struct Running {
    server: Server,
    state: AppState,
    static_config: StaticConfig,
    local_addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl Running {
    /// Binds the listeners of `config` and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let Config {
            server: settings,
            dynamic,
            ..
        } = config;
        let main = bind("server.bind_addr", settings.bind_addr)?;
        let local_addr = main.local_addr().map_err(|source| StartError::Bind {
            field: "server.bind_addr",
            addr: settings.bind_addr,
            source,
        })?;
        let state = AppState::new(dynamic);
        let server = Server::new(&settings, router(state.clone()));
        let mut tasks = JoinSet::new();
        match &settings.tls {
            TlsConfig::Off => {
                let server = server.clone();
                tasks.spawn(async move { server.serve_plain(main).await });
            }
            TlsConfig::Acme(_) => return Err(StartError::TlsUnsupported("acme")),
            TlsConfig::Manual(_) => return Err(StartError::TlsUnsupported("manual")),
        }
        let scheme = if matches!(settings.tls, TlsConfig::Off) {
            "http"
        } else {
            "https"
        };
        info!(addr = %local_addr, proto = scheme, "LISTEN");
        Ok(Self {
            server,
            state,
            static_config: settings,
            local_addr,
            tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn static_config(&self) -> &StaticConfig {
        &self.static_config
    }

    /// Stops accepting, lets connections and tunnels finish within
    /// `shutdown_timeout`, then closes the rest. Returns how many
    /// connections and tunnels were cut.
    pub async fn shutdown(mut self) -> usize {
        let grace = self.static_config.shutdown_timeout;
        let deadline = tokio::time::Instant::now() + grace;
        self.server.stop();
        // Listeners close as their accept loops return.
        while self.tasks.join_next().await.is_some() {}
        let cut = self.server.drain(grace).await;
        let tunnels = self.state.tunnels();
        tunnels.close();
        let cut_tunnels = if tokio::time::timeout_at(deadline, tunnels.wait())
            .await
            .is_ok()
        {
            0
        } else {
            let n = tunnels.len();
            self.state.close_tunnels().cancel();
            tunnels.wait().await;
            n
        };
        cut + cut_tunnels
    }
}

fn bind(field: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    listener::bind(addr).map_err(|source| StartError::Bind {
        field,
        addr,
        source,
    })
}
