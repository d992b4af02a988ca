//! Debian's `pebble` ACME test server, on loopback, on free ports.
//!
//! `pebble-challtestsrv` serves as its DNS and answers every name with
//! 127.0.0.1, so pebble validates TLS-ALPN-01 challenges by connecting to
//! 127.0.0.1 on the `tlsPort` we give it: the proxy's port.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::tls::{TestCa, default_client, get, roots};

pub struct Pebble {
    _dir: tempfile::TempDir,
    /// The ACME directory URL.
    pub directory_url: String,
    /// The trust root of pebble's own HTTPS API (`acme_ca_root`).
    pub api_ca: PathBuf,
    api_ca_pem: String,
    management: SocketAddr,
    children: Vec<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

/// A port that is free now and stays free until we bind it: chosen below
/// the kernel's ephemeral range, which is where port-0 binds and outgoing
/// connections (of this and every other test) take their ports from. Each
/// call in this process gets a different port.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u16>().ok())
        })
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(12_000));
    let span = high - low;
    // Start somewhere different per process, so parallel test binaries
    // rarely probe the same ports.
    let seed = u16::try_from(std::process::id() % u32::from(span)).unwrap_or(0);
    let _ = NEXT.compare_exchange(0, seed.max(1), Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..span {
        let port = low + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port between {low} and {high}");
}

impl Pebble {
    /// Starts pebble with TLS-ALPN-01 validation against `tls_port`, and
    /// waits until its directory answers.
    pub async fn start(tls_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("pebble API test CA");
        let wfe = ca.issue(&["localhost", "127.0.0.1"], 30);
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("api-ca.pem"), ca.pem()).expect("write");
        std::fs::write(path("wfe.pem"), &wfe.cert_pem).expect("write");
        std::fs::write(path("wfe.key"), &wfe.key_pem).expect("write");
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let management = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let dns = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let dns_management = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = format!(
            r#"{{"pebble":{{"listenAddress":"{listen}","managementListenAddress":"{management}","certificate":"{}","privateKey":"{}","httpPort":{},"tlsPort":{tls_port},"ocspResponderURL":"","externalAccountBindingRequired":false}}}}"#,
            path("wfe.pem").display(),
            path("wfe.key").display(),
            free_port(),
        );
        std::fs::write(path("pebble.json"), config).expect("write");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut children = Vec::new();
        let mut challtestsrv = Command::new("pebble-challtestsrv");
        challtestsrv
            .args(["-dns01", &dns.to_string()])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &dns_management.to_string()])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""]);
        children.push(spawn(challtestsrv, &lines));
        wait_for_tcp(dns_management).await;
        let mut pebble = Command::new("pebble");
        pebble
            .args(["-config", path("pebble.json").to_str().expect("utf-8")])
            .args(["-dnsserver", &dns.to_string(), "-strict=false"])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0");
        children.push(spawn(pebble, &lines));
        let pebble = Self {
            directory_url: format!("https://{listen}/dir"),
            api_ca: path("api-ca.pem"),
            api_ca_pem: ca.pem(),
            management,
            _dir: dir,
            children,
            lines,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while pebble.api_get(listen, "/dir").await.is_none() {
            assert!(
                Instant::now() < deadline,
                "pebble did not start:\n{}",
                pebble.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pebble
    }

    /// The root that pebble issues under (regenerated on every start).
    pub async fn issuing_root(&self) -> String {
        self.api_get(self.management, "/roots/0")
            .await
            .expect("pebble root")
    }

    /// How many output lines contain `needle` (e.g. new orders:
    /// `POST /order-plz`).
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn output(&self) -> String {
        self.lines.lock().expect("lock").join("\n")
    }

    async fn api_get(&self, addr: SocketAddr, path: &str) -> Option<String> {
        let config = default_client(&roots(&self.api_ca_pem), &["http/1.1"]);
        let stream = super::tls::connect(addr, "127.0.0.1", config).await.ok()?;
        let (_, reply) = get(stream, &addr.to_string(), path).await;
        reply.status.is_success().then(|| reply.text())
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

fn spawn(mut cmd: Command, lines: &Arc<Mutex<Vec<String>>>) -> Child {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pebble (apt-get install pebble)");
    for stream in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let lines = Arc::clone(lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                lines.lock().expect("lock").push(line);
            }
        });
    }
    child
}

async fn wait_for_tcp(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
