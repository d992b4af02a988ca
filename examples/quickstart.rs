//! Runs the proxy on `deploy/quickstart.toml` in front of a small demo
//! upstream, all on loopback: `cargo run --example quickstart`.

use std::process::ExitCode;

use axum::Router;
use axum::extract::Request;
use axum::routing::any;

const UPSTREAM: &str = "127.0.0.1:8081";
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/quickstart.toml");

fn main() -> ExitCode {
    let upstream = std::net::TcpListener::bind(UPSTREAM);
    let upstream = match upstream {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("quickstart: cannot start the demo upstream on {UPSTREAM}: {e}");
            return ExitCode::from(1);
        }
    };
    std::thread::spawn(move || demo_upstream(upstream));
    eprintln!(
        "\nDemo upstream on {UPSTREAM}; the proxy listens on 127.0.0.1:8080. Try:\n\n    \
         curl -i -H 'Host: demo.localhost' http://127.0.0.1:8080/hello\n    \
         curl -i http://127.0.0.1:8080/health\n    \
         curl -i -H 'Host: unknown.example' http://127.0.0.1:8080/   # 421\n\n\
         Stop with Ctrl-C.\n"
    );
    reverse_proxy::cli::main_from(["reverse-proxy", "--config", CONFIG])
}

fn demo_upstream(listener: std::net::TcpListener) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let Ok(runtime) = runtime else { return };
    runtime.block_on(async move {
        let Ok(()) = listener.set_nonblocking(true) else {
            return;
        };
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        let app = Router::new().fallback(any(|req: Request| async move {
            let from = req
                .headers()
                .get("x-real-ip")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            format!(
                "Hello from the demo upstream: {} {} (client {from})\n",
                req.method(),
                req.uri()
            )
        }));
        let _ = axum::serve(listener, app).await;
    });
}
