//! Starting the daemon: bind every listener, build the shared state and
//! spawn the serving tasks. The binary and the tests start it the same way.

use std::io;
use std::net::SocketAddr;

use tokio::task::JoinSet;
use tracing::info;

use crate::config::{Config, StaticConfig, TlsConfig};
use crate::redirect;
use crate::router::router;
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
}

/// A started proxy: listeners bound and serving.
pub struct Running {
    server: Server,
    /// The plain-HTTP redirect listener's server and address, if configured.
    redirect: Option<(Server, SocketAddr)>,
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
        let Config { server: settings, dynamic, .. } = config;
        let main = bind("server.bind_addr", settings.bind_addr)?;
        let local_addr = main.local_addr().map_err(|source| StartError::Bind {
            field: "server.bind_addr",
            addr: settings.bind_addr,
            source,
        })?;
        let redirect_listener = match settings.http_bind_addr {
            Some(addr) => Some(bind("server.http_bind_addr", addr)?),
            None => None,
        };
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
        let state = AppState::new(dynamic);
        let server = Server::new(&settings, router(state.clone()));
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
        let redirect = match redirect_listener {
            Some(listener) => {
                let addr = listener.local_addr().map_err(|source| StartError::Bind {
                    field: "server.http_bind_addr",
                    addr: settings.http_bind_addr.unwrap_or(local_addr),
                    source,
                })?;
                let redirect = Server::new(
                    &settings,
                    redirect::router(state.clone(), local_addr.port()),
                );
                let serving = redirect.clone();
                tasks.spawn(async move { serving.serve_plain(listener).await });
                info!(addr = %addr, proto = "http", role = "redirect", "LISTEN");
                Some((redirect, addr))
            }
            None => None,
        };
        Ok(Self {
            server,
            redirect,
            tls,
            certificates,
            state,
            static_config: settings,
            local_addr,
            tasks,
            background,
        })
    }

    /// The plain-HTTP redirect listener's address, if one is configured.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect.as_ref().map(|(_, addr)| *addr)
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
        if let Some((redirect, _)) = &self.redirect {
            redirect.stop();
        }
        self.background.abort_all();
        // Listeners close as their accept loops return.
        while self.tasks.join_next().await.is_some() {}
        let redirect_drain = async {
            match &self.redirect {
                Some((redirect, _)) => redirect.drain(grace).await,
                None => 0,
            }
        };
        let (cut_main, cut_redirect) = tokio::join!(self.server.drain(grace), redirect_drain);
        let cut = cut_main + cut_redirect;
        let tunnels = self.state.tunnels();
        tunnels.close();
        let cut_tunnels = if tokio::time::timeout_at(deadline, tunnels.wait()).await.is_ok() {
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
    listener::bind(addr).map_err(|source| StartError::Bind { field, addr, source })
}
