//! The command line: parse arguments, then validate or run, and turn every
//! failure into one readable message and the documented exit code
//! (0 success, 1 runtime failure, 2 usage or invalid config).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use tracing::warn;

use crate::config::Config;
use crate::daemon::{Running, StartError};
use crate::lifecycle::{self, signals::Signals};
use crate::logging::{self, LoggingError};

/// A TLS-terminating reverse proxy for self-hosted sites.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/etc/reverse-proxy/config.toml"
    )]
    pub config: PathBuf,
    /// Check the configuration and exit: 0 if valid, 2 if not. Binds no
    /// socket and contacts nothing.
    #[arg(long)]
    pub validate: bool,
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("{0}")]
    Logging(#[from] LoggingError),
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// [`main`] with explicit arguments (the first is the program name).
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    if cli.validate {
        return validate(&cli.config);
    }
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!(
                "reverse-proxy: invalid configuration {}:",
                cli.config.display()
            );
            for line in e.lines() {
                eprintln!("  {line}");
            }
            return ExitCode::from(2);
        }
    };
    match run(config, &cli.config) {
        Ok(lifecycle::Exit::Drained) => ExitCode::SUCCESS,
        Ok(lifecycle::Exit::Aborted) => ExitCode::from(1),
        Err(e) => {
            eprintln!("reverse-proxy: {e}");
            ExitCode::from(1)
        }
    }
}

fn validate(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            for w in &config.warnings {
                eprintln!("warning: {w}");
            }
            println!("config OK: {} sites", config.dynamic.sites.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let lines = e.lines();
            for line in &lines {
                eprintln!("error: {line}");
            }
            eprintln!(
                "config invalid: {} error(s) in {}",
                lines.len(),
                path.display()
            );
            ExitCode::from(2)
        }
    }
}

fn run(config: Config, path: &Path) -> Result<lifecycle::Exit, RunError> {
    let mut runtime = match config.server.worker_threads {
        // With one worker, the work-stealing scheduler's cross-thread
        // bookkeeping buys nothing; the current-thread scheduler runs the
        // same tasks on the same single thread with less of it.
        Some(n) if n.get() == 1 => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n.get());
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all();
    let runtime = runtime.build().map_err(RunError::Runtime)?;
    let exit = runtime.block_on(async {
        let log = logging::init(
            &config.server.log_level,
            config.server.access_log.as_deref(),
            config.server.access_log_format,
        )?;
        for w in &config.warnings {
            warn!(
                field = w.field.as_str(),
                problem = w.message.as_str(),
                "CONFIG_WARNING"
            );
        }
        let signals = Signals::install().map_err(RunError::Signals)?;
        let running = Running::start(config).await?;
        Ok(lifecycle::supervise(running, path, &log, signals).await)
    });
    // Whatever is still running was cut by the drain or abandoned by a
    // second stop signal; waiting for it would only delay the exit.
    runtime.shutdown_background();
    exit
}
