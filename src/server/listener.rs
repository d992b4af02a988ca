//! Binding listening sockets. A `[::]` address is made dual-stack
//! explicitly (IPV6_V6ONLY off) rather than trusting the kernel default,
//! which distributions and containers set differently. On Linux, the TCP
//! options set here are copied to every connection the listener accepts.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

const BACKLOG: i32 = 1024;
/// Bytes a client's socket may hold not yet sent before it takes no more.
/// Without a bound, a large body is written far ahead of what the client's
/// window lets out, and the kernel then sends it piece by piece from the
/// client's acknowledgements instead of from the proxy's writes; 128 KiB
/// still lets each write move a good deal. This overrides the machine's
/// `net.ipv4.tcp_notsent_lowat` for the proxy's connections.
#[cfg(target_os = "linux")]
const NOTSENT_LOWAT: u32 = 128 * 1024;

pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    // Lets a restarted proxy bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    // Only a tuning: a kernel without it serves all the same.
    #[cfg(target_os = "linux")]
    if let Err(e) = socket.set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!("set TCP_NOTSENT_LOWAT: {e}");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_the_bound_on_unsent_bytes() {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let addr = listener.local_addr().expect("address");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let lowat = socket2::SockRef::from(&accepted).tcp_notsent_lowat();
        assert_eq!(lowat.expect("getsockopt"), NOTSENT_LOWAT);
    }
}
