//! Starting the daemon: bind every listener, build the shared state and
//! spawn the serving tasks. The binary and the tests start it the same way.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::info;

use crate::admin::{self, Admin};
use crate::config::{Config, StaticConfig, TlsConfig};
use crate::metrics::{Metrics, MetricsError};
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
    #[error("{0}")]
    Metrics(#[from] MetricsError),
}

/// A started proxy: listeners bound and serving.
pub struct Running {
    server: Server,
    state: AppState,
    static_config: StaticConfig,
    local_addr: SocketAddr,
    /// The admin listener's server and address, with `[admin]`.
    admin: Option<(Server, SocketAddr)>,
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
        let admin_listener = match &settings.admin {
            Some(admin) => {
                let listener = bind("admin.bind_addr", admin.bind_addr)?;
                let addr = listener.local_addr().map_err(|source| StartError::Bind {
                    field: "admin.bind_addr",
                    addr: admin.bind_addr,
                    source,
                })?;
                Some((listener, addr))
            }
            None => None,
        };
        // Without an admin listener nobody could read metrics: record none.
        let metrics = admin_listener
            .is_some()
            .then(Metrics::new)
            .transpose()?
            .map(Arc::new);
        let state = AppState::new(dynamic, metrics.clone());
        let server = Server::with_metrics(&settings, router(state.clone()), metrics.clone());
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
        let admin = match (admin_listener, metrics) {
            (Some((listener, addr)), Some(metrics)) => {
                let admin = Server::new(
                    &settings,
                    admin::router(Admin {
                        state: state.clone(),
                        metrics,
                        server: server.clone(),
                    }),
                );
                let serving = admin.clone();
                tasks.spawn(async move { serving.serve_plain(listener).await });
                info!(addr = %addr, proto = "admin", "LISTEN");
                Some((admin, addr))
            }
            _ => None,
        };
        Ok(Self {
            server,
            state,
            static_config: settings,
            local_addr,
            admin,
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

    /// The admin listener's address, with `[admin]`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, addr)| *addr)
    }

    /// The metrics, recorded only with `[admin]`.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.state.metrics()
    }

    /// Stops accepting, lets connections and tunnels finish within
    /// `shutdown_timeout`, then closes the rest. Returns how many
    /// connections and tunnels were cut.
    pub async fn shutdown(mut self) -> usize {
        let deadline = Instant::now() + self.static_config.shutdown_timeout;
        self.close_listeners().await;
        self.drain(deadline).await.total()
    }

    /// Stops accepting and closes every listening socket, so that new
    /// connection attempts are refused rather than left in a backlog
    /// nobody reads. Open connections are not touched.
    pub async fn close_listeners(&mut self) {
        self.server.stop();
        if let Some((admin, _)) = &self.admin {
            admin.stop();
        }
        // Each listener is owned by its accept loop and closes as it returns.
        while self.tasks.join_next().await.is_some() {}
    }

    /// Open client connections and upgraded tunnels, as `(connections, tunnels)`.
    pub fn open_connections(&self) -> (usize, usize) {
        (self.server.open_connections(), self.state.tunnels().len())
    }

    /// Asks every connection to finish (HTTP/1.1: close after the current
    /// response; HTTP/2: GOAWAY), waits for them and for upgraded tunnels
    /// until `deadline`, then closes whatever is left.
    pub async fn drain(self, deadline: Instant) -> Drained {
        let connections = self.server.drain(deadline).await;
        if let Some((admin, _)) = &self.admin {
            // Scrapes are quick; the admin listener shares the deadline.
            admin.drain(deadline).await;
        }
        // Tunnels are waited for only now: a request still in flight above
        // may have turned into one. They share the connections' deadline.
        let tunnels = self.state.tunnels();
        tunnels.close();
        let tunnels_cut = if tokio::time::timeout_at(deadline, tunnels.wait())
            .await
            .is_ok()
        {
            0
        } else {
            let open = tunnels.len();
            self.state.close_tunnels().cancel();
            tunnels.wait().await;
            open
        };
        Drained {
            connections,
            tunnels: tunnels_cut,
        }
    }
}

/// What a drain had to cut at its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// HTTP connections still busy at the deadline.
    pub connections: usize,
    /// Upgraded tunnels (WebSockets) still open at the deadline.
    pub tunnels: usize,
}

impl Drained {
    pub fn total(self) -> usize {
        self.connections + self.tunnels
    }
}

fn bind(field: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    listener::bind(addr).map_err(|source| StartError::Bind {
        field,
        addr,
        source,
    })
}
