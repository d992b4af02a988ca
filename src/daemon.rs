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
use crate::ratelimit;
use crate::redirect;
use crate::router::Pipeline;
use crate::server::{Server, listener};
use crate::state::AppState;
use crate::tls::{self, Certificates, Tls, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({field}): {source}")]
    Bind {
        field: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Metrics(#[from] MetricsError),
}

/// A started proxy: listeners bound and serving.
pub struct Running {
    server: Server,
    /// The plain-HTTP redirect listener's server and address, if configured.
    redirect: Option<(Server, SocketAddr)>,
    /// The admin listener's server and address, with `[admin]`.
    admin: Option<(Server, SocketAddr)>,
    tls: Option<Tls>,
    certificates: Certificates,
    state: AppState,
    static_config: StaticConfig,
    local_addr: SocketAddr,
    tasks: JoinSet<()>,
    /// Work that lives as long as the process (the ACME state machine);
    /// aborted on shutdown.
    background: JoinSet<()>,
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
        let redirect_listener = match settings.http_bind_addr {
            Some(addr) => Some(bind_with_addr("server.http_bind_addr", addr)?),
            None => None,
        };
        let admin_listener = match &settings.admin {
            Some(admin) => Some(bind_with_addr("admin.bind_addr", admin.bind_addr)?),
            None => None,
        };
        // Without an admin listener nobody could read metrics: record none.
        let metrics = admin_listener
            .is_some()
            .then(Metrics::new)
            .transpose()?
            .map(Arc::new);

        tls::install_provider();
        let certificates = Certificates::default();
        let mut background = JoinSet::new();
        let tls = match &settings.tls {
            TlsConfig::Off => None,
            TlsConfig::Acme(acme) => {
                let (acme, driver) =
                    tls::acme::Acme::start(acme, certificates.clone()).map_err(TlsError::from)?;
                background.spawn(driver);
                Some(Tls::Acme(acme))
            }
            TlsConfig::Manual(certs) => Some(Tls::Manual(
                tls::manual::Resolver::load(certs, certificates.clone()).map_err(TlsError::from)?,
            )),
        };

        let state = AppState::new(dynamic, metrics.clone());
        background.spawn(ratelimit::evict_periodically(state.clone()));
        let server = Server::with_metrics(&settings, Pipeline::new(state.clone()), metrics.clone());
        let mut tasks = JoinSet::new();
        match &tls {
            None => {
                let server = server.clone();
                tasks.spawn(async move { server.serve_plain(main).await });
            }
            Some(tls) => {
                let (server, tls) = (server.clone(), tls.clone());
                let timeout = settings.header_read_timeout;
                tasks.spawn(async move { server.serve_tls(main, tls, timeout).await });
            }
        }
        let scheme = if tls.is_none() { "http" } else { "https" };
        info!(addr = %local_addr, proto = scheme, "LISTEN");

        let redirect = redirect_listener.map(|(listener, addr)| {
            let redirect = Server::new(
                &settings,
                redirect::router(state.clone(), local_addr.port()),
            );
            let serving = redirect.clone();
            tasks.spawn(async move { serving.serve_plain(listener).await });
            info!(addr = %addr, proto = "http", role = "redirect", "LISTEN");
            (redirect, addr)
        });
        let admin = match (admin_listener, metrics) {
            (Some((listener, addr)), Some(metrics)) => {
                let admin = Server::new(
                    &settings,
                    admin::router(Admin {
                        state: state.clone(),
                        metrics,
                        server: server.clone(),
                        certificates: certificates.clone(),
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
            redirect,
            admin,
            tls,
            certificates,
            state,
            static_config: settings,
            local_addr,
            tasks,
            background,
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

    /// The plain-HTTP redirect listener's address, if one is configured.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect.as_ref().map(|(_, addr)| *addr)
    }

    /// The admin listener's address, with `[admin]`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, addr)| *addr)
    }

    /// The metrics, recorded only with `[admin]`.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.state.metrics()
    }

    /// The certificates being served and their expiry, for monitoring.
    pub fn certificates(&self) -> Certificates {
        self.certificates.clone()
    }

    /// The manual-mode certificate resolver, whose `reload` reads the
    /// certificate files again; `None` in the other modes.
    pub fn manual_certificates(&self) -> Option<&tls::manual::Resolver> {
        match &self.tls {
            Some(Tls::Manual(resolver)) => Some(resolver),
            _ => None,
        }
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
        for (server, _) in self.redirect.iter().chain(&self.admin) {
            server.stop();
        }
        self.background.abort_all();
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
        let side_drains = async {
            for (server, _) in self.redirect.iter().chain(&self.admin) {
                server.drain(deadline).await;
            }
        };
        let (connections, ()) = tokio::join!(self.server.drain(deadline), side_drains);
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

/// Binds and reads back the bound address (the port, when it was 0).
fn bind_with_addr(
    field: &'static str,
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let listener = bind(field, addr)?;
    let local = listener.local_addr().map_err(|source| StartError::Bind {
        field,
        addr,
        source,
    })?;
    Ok((listener, local))
}
