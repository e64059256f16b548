//! Moves bytes between an SSH channel and a TCP socket, both ways, until both are done.
//!
//! - Backpressure: a TCP read is only followed by the next one once the channel accepted the
//!   bytes (russh waits for the peer's window), and channel data is only taken once the TCP write
//!   finished. Nothing buffers without bound: at most one read chunk in flight per direction, plus
//!   what the channel's receive window lets the peer send ahead. (The patched russh tops that
//!   window up only as this relay takes data, so a slow TCP side holds back its own channel and
//!   never the rest of the session: see third_party/russh/CMXSAFE-PATCH.md.)
//! - Half-close: TCP EOF becomes channel EOF and channel EOF becomes a TCP write shutdown; the other
//!   direction keeps flowing. The channel is closed when both directions ended.
//! - Errors: a TCP error or a channel close ends both directions at once.
//! - Closing: after EOF both ways we close the channel at once, as OpenSSH does. (This relies on
//!   the patched russh in third_party/: unpatched, a locally closed channel leaks its receiver.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::BytesMut;
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;

/// Size of one TCP read; a channel packet is at most the peer's max packet size anyway.
const CHUNK: usize = 64 * 1024;

/// Flow credit shared with the relay at the other end of a forwarding pair (see
/// `forward::pairs`): credit is taken before writing to the TCP socket and returned after reading
/// from it. Closing a semaphore (when a relay ends) releases a writer waiting on it.
#[derive(Clone)]
pub struct Flow {
    pub write_credit: Arc<Semaphore>,
    pub read_credit: Arc<Semaphore>,
}

/// Bytes moved by one relay, readable while it runs.
#[derive(Default, Debug)]
pub struct Counters {
    /// TCP -> channel.
    pub to_channel: AtomicU64,
    /// Channel -> TCP.
    pub from_channel: AtomicU64,
}

impl Counters {
    pub fn get(&self) -> (u64, u64) {
        (
            self.to_channel.load(Ordering::Relaxed),
            self.from_channel.load(Ordering::Relaxed),
        )
    }
}

/// How a relay ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides finished cleanly (EOF both ways).
    Done,
    /// The SSH peer closed the channel (possibly before sending EOF).
    ChannelClosed,
    /// The TCP side failed.
    TcpError(String),
}

impl RelayEnd {
    pub fn as_str(&self) -> String {
        match self {
            RelayEnd::Done => "eof both ways".into(),
            RelayEnd::ChannelClosed => "channel closed by peer".into(),
            RelayEnd::TcpError(e) => format!("tcp error: {e}"),
        }
    }
}

enum UpEnd {
    Eof,
    Failed(String),
    ChannelGone,
}

enum DownEnd {
    Eof,
    Closed,
    Failed(String),
}

/// The message type of a russh channel: `russh::server::Msg` in the gateway,
/// `russh::client::Msg` in the agent. The relay is the same on both sides.
pub trait ChannelSide: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static {}
impl<S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static> ChannelSide for S {}

async fn tcp_to_channel<S: ChannelSide>(
    mut tcp: OwnedReadHalf,
    tx: Arc<ChannelWriteHalf<S>>,
    counters: Arc<Counters>,
    credit: Option<Arc<Semaphore>>,
    local_eof: Arc<AtomicBool>,
) -> UpEnd {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        buf.reserve(CHUNK);
        match tcp.read_buf(&mut buf).await {
            Ok(0) => {
                local_eof.store(true, Ordering::Release);
                return match tx.eof().await {
                    Ok(()) => UpEnd::Eof,
                    Err(_) => UpEnd::ChannelGone,
                };
            }
            Ok(n) => {
                counters.to_channel.fetch_add(n as u64, Ordering::Relaxed);
                if let Some(c) = &credit {
                    c.add_permits(n);
                }
                if tx.data_bytes(buf.split().freeze()).await.is_err() {
                    return UpEnd::ChannelGone;
                }
            }
            Err(e) => return UpEnd::Failed(e.to_string()),
        }
    }
}

async fn channel_to_tcp(
    rx: &mut ChannelReadHalf,
    tcp: &mut OwnedWriteHalf,
    counters: &Counters,
    credit: Option<&Semaphore>,
) -> DownEnd {
    loop {
        match rx.wait().await {
            Some(ChannelMsg::Data { data }) => {
                if let Some(c) = credit {
                    match c.acquire_many(data.len() as u32).await {
                        Ok(permit) => permit.forget(),
                        Err(_) => return DownEnd::Failed("the other end of the pair is gone".into()),
                    }
                }
                if let Err(e) = tcp.write_all(&data).await {
                    return DownEnd::Failed(e.to_string());
                }
                counters
                    .from_channel
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Some(ChannelMsg::Eof) => {
                let _ = tcp.shutdown().await;
                return DownEnd::Eof;
            }
            Some(ChannelMsg::Close) | None => return DownEnd::Closed,
            Some(_) => {}
        }
    }
}

/// Waits for the peer's CHANNEL_CLOSE (or the channel's end), discarding anything else.
async fn peer_close(rx: &mut ChannelReadHalf) {
    while let Some(msg) = rx.wait().await {
        if matches!(msg, ChannelMsg::Close) {
            break;
        }
    }
}

/// Closes the credit this relay feeds when it ends, however it ends.
struct CloseOnDrop(Option<Arc<Semaphore>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.close();
        }
    }
}

pub async fn relay<S: ChannelSide>(
    channel: Channel<S>,
    stream: TcpStream,
    counters: Arc<Counters>,
    flow: Option<Flow>,
) -> RelayEnd {
    let _feeds = CloseOnDrop(flow.as_ref().map(|f| f.read_credit.clone()));
    let write_credit = flow.as_ref().map(|f| f.write_credit.clone());
    let (mut rx, tx) = channel.split();
    let tx = Arc::new(tx);
    let (tcp_r, mut tcp_w) = stream.into_split();
    // Set once the local side has finished sending (before our EOF goes out), so that a peer
    // closing right after our EOF is told apart from one closing mid-stream.
    let local_eof = Arc::new(AtomicBool::new(false));

    let up = tokio::spawn(tcp_to_channel(
        tcp_r,
        tx.clone(),
        counters.clone(),
        flow.map(|f| f.read_credit),
        local_eof.clone(),
    ));
    let abort_up = up.abort_handle();
    let mut up = std::pin::pin!(up);
    let mut up_end: Option<UpEnd> = None;

    let down_end = {
        let mut down = std::pin::pin!(channel_to_tcp(
            &mut rx,
            &mut tcp_w,
            &counters,
            write_credit.as_deref()
        ));
        loop {
            tokio::select! {
                r = &mut up, if up_end.is_none() => match r.unwrap_or(UpEnd::ChannelGone) {
                    UpEnd::Eof => up_end = Some(UpEnd::Eof),
                    other => return closing(&tx, other).await,
                },
                d = &mut down => break d,
            }
        }
    };

    match down_end {
        DownEnd::Closed => {
            abort_up.abort();
            RelayEnd::ChannelClosed
        }
        DownEnd::Failed(e) => {
            abort_up.abort();
            closing(&tx, UpEnd::Failed(e)).await
        }
        DownEnd::Eof => {
            // The peer finished sending; keep forwarding TCP -> channel until the local side does.
            let up_end = match up_end {
                Some(e) => e,
                None => tokio::select! {
                    biased;
                    r = &mut up => r.unwrap_or(UpEnd::ChannelGone),
                    // The peer may close without waiting for our EOF; if ours was already on
                    // its way (OpenSSH closes as soon as it has it), both sides did finish.
                    _ = peer_close(&mut rx) => {
                        abort_up.abort();
                        if local_eof.load(Ordering::Acquire) {
                            return RelayEnd::Done;
                        }
                        return RelayEnd::ChannelClosed;
                    }
                },
            };
            closing(&tx, up_end).await
        }
    }
}

/// How the relay ends once the TCP side is done: the channel is closed unless it is gone.
async fn closing<S: ChannelSide>(tx: &ChannelWriteHalf<S>, up_end: UpEnd) -> RelayEnd {
    let end = match up_end {
        UpEnd::Eof => RelayEnd::Done,
        UpEnd::Failed(e) => RelayEnd::TcpError(e),
        UpEnd::ChannelGone => return RelayEnd::ChannelClosed,
    };
    let _ = tx.close().await;
    end
}
