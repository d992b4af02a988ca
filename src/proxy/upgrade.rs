//! Protocol upgrades (WebSocket and friends): once the upstream has answered
//! `101 Switching Protocols`, the two connections are spliced into a byte
//! tunnel. The tunnel is tracked so that shutdown can wait for it and, at
//! the deadline, close it.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// Splices the client and upstream connections once both have upgraded.
pub fn spawn_tunnel(
    tracker: &TaskTracker,
    cancel: CancellationToken,
    client: OnUpgrade,
    upstream: OnUpgrade,
) {
    tracker.spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                debug!("upgrade failed: {e}");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        tokio::select! {
            result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = result {
                    debug!("tunnel closed: {e}");
                }
            }
            () = cancel.cancelled() => debug!("tunnel closed by shutdown"),
        }
    });
}
