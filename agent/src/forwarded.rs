//! Connections the gateway forwards to a published tunnel (`forwarded-tcpip` channels): each is
//! connected to the tunnel's local service (from the device's identity address when the tunnel
//! preserves the source) and relayed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cmx_net::relay::{self, Counters};
use russh::client::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpStream;

use crate::config::PublishTunnel;
use crate::shared::Shared;

const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects a forwarded connection to the tunnel's local service and relays it.
pub async fn serve(
    shared: Arc<Shared>,
    tunnel: PublishTunnel,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    origin: (String, u32),
) {
    let source = match tunnel.preserve_source {
        true => origin.0.parse::<IpAddr>().ok(),
        false => None,
    };
    let stream = match tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, connect_local(tunnel.to, source)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return refuse_forwarded(
                &shared,
                &tunnel,
                reply,
                format!("cannot connect to {}: {e}", tunnel.to),
            )
            .await;
        }
        Err(_) => {
            return refuse_forwarded(
                &shared,
                &tunnel,
                reply,
                format!("connecting to {} timed out", tunnel.to),
            )
            .await;
        }
    };
    reply.accept().await;
    shared.status.tunnel(&tunnel.name, |t| t.connections += 1);
    tracing::debug!(tunnel = %tunnel.name, originator = %origin.0, "forwarded connection");
    let counters = Arc::new(Counters::default());
    relay::relay(channel, stream, counters.clone(), None).await;
    shared.count_bytes(&tunnel.name, &counters);
}

async fn refuse_forwarded(shared: &Shared, tunnel: &PublishTunnel, reply: ChannelOpenHandle, reason: String) {
    tracing::warn!(tunnel = %tunnel.name, reason, "local service unreachable: forwarded connection refused");
    shared.status.tunnel(&tunnel.name, |t| {
        t.refused += 1;
        t.detail = Some(reason.clone());
    });
    reply.reject(ChannelOpenFailure::ConnectFailed).await;
}

/// Connects to the local service, from the device's identity address when asked to (the service
/// then sees who is really connecting).
async fn connect_local(to: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let stream = match (source, to) {
        (Some(IpAddr::V6(src)), SocketAddr::V6(_)) => {
            let (socket, _, ()) = cmx_net::sockets::identity_socket(src, None, |_| Ok(()))?;
            socket.connect(to).await?
        }
        _ => TcpStream::connect(to).await?,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
