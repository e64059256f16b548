//! cmxsafe patch: the receive window follows what the channel's reader has taken.
//!
//! Upstream russh grants the peer more window as soon as data *arrives* and then awaits room in a
//! bounded per-channel queue, inside the session loop. One slow reader therefore stops the whole
//! session: nothing else is read from the socket, not even the WINDOW_ADJUST that other channels
//! (or the other direction of the same channel) are waiting for. Two sessions joined by relays
//! deadlock that way under bulk traffic in both directions.
//!
//! Here, as in OpenSSH, the window is the bound: data within the window is always accepted into
//! an unbounded queue (so the session loop never waits for a reader), and the window is only
//! topped up to cover what the reader has taken. When the session has to withhold window because
//! the reader is behind, it marks the channel stalled; the reader wakes the session once it has
//! taken enough for a top-up to be due.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::Notify;
use tokio::sync::mpsc::error::SendError;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::ChannelMsg;

/// Receive-side accounting of one channel, shared by the session and the channel's reader.
#[derive(Debug, Default)]
pub(crate) struct RecvWindow {
    /// Bytes handed to the channel's queue and not yet taken by the reader.
    queued: AtomicI64,
    /// The reader is gone: nothing it left behind holds the window back.
    closed: AtomicBool,
    /// The session withheld window and waits for `queued` to drop to `wake_below`.
    stalled: AtomicBool,
    /// The reader woke the session for this channel and the session has not looked yet.
    woken: AtomicBool,
    wake_below: AtomicU64,
    wake: Mutex<Option<Arc<Notify>>>,
}

fn data_len(msg: &ChannelMsg) -> i64 {
    match msg {
        ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => data.len() as i64,
        _ => 0,
    }
}

impl RecvWindow {
    /// Bytes the reader has not taken yet.
    pub(crate) fn queued(&self) -> u32 {
        if self.closed.load(Ordering::SeqCst) {
            return 0;
        }
        self.queued.load(Ordering::SeqCst).clamp(0, i64::from(u32::MAX)) as u32
    }

    /// Marks the channel stalled until the reader brought `queued` down to `wake_below`.
    /// Callers re-read `queued()` afterwards: a reader that took data in between either sees
    /// the mark and wakes the session, or took it before the re-read.
    pub(crate) fn stall(&self, wake: &Arc<Notify>, wake_below: u32) {
        if let Ok(mut w) = self.wake.lock() {
            *w = Some(wake.clone());
        }
        self.wake_below.store(u64::from(wake_below), Ordering::SeqCst);
        self.stalled.store(true, Ordering::SeqCst);
    }

    pub(crate) fn unstall(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }

    #[cfg(test)]
    pub(crate) fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }

    /// Whether the reader woke the session for this channel since the last call.
    pub(crate) fn take_wakeup(&self) -> bool {
        self.woken.swap(false, Ordering::SeqCst)
    }

    fn taken(&self, n: i64) {
        let left = self.queued.fetch_sub(n, Ordering::SeqCst) - n;
        if self.stalled.load(Ordering::SeqCst)
            && (left <= self.wake_below.load(Ordering::SeqCst) as i64 || self.closed.load(Ordering::SeqCst))
        {
            self.wake_session();
        }
    }

    fn wake_session(&self) {
        if self.stalled.swap(false, Ordering::SeqCst) {
            self.woken.store(true, Ordering::SeqCst);
            if let Ok(w) = self.wake.lock()
                && let Some(w) = w.as_ref()
            {
                w.notify_one();
            }
        }
    }
}

/// The session's end of a channel's message queue.
#[derive(Debug)]
pub struct ChannelSender {
    tx: UnboundedSender<ChannelMsg>,
    window: Arc<RecvWindow>,
}

impl ChannelSender {
    /// Queues a message for the channel's reader; never waits (the window bounds the data).
    pub async fn send(&self, msg: ChannelMsg) -> Result<(), SendError<ChannelMsg>> {
        self.try_send(msg)
    }

    /// Same as `send`: the queue is never full.
    pub fn try_send(&self, msg: ChannelMsg) -> Result<(), SendError<ChannelMsg>> {
        let n = data_len(&msg);
        self.window.queued.fetch_add(n, Ordering::SeqCst);
        self.tx.send(msg).inspect_err(|_| {
            self.window.queued.fetch_sub(n, Ordering::SeqCst);
        })
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub(crate) fn recv_window(&self) -> &Arc<RecvWindow> {
        &self.window
    }
}

/// The reader's end of a channel's message queue.
#[derive(Debug)]
pub struct ChannelReceiver {
    rx: UnboundedReceiver<ChannelMsg>,
    window: Arc<RecvWindow>,
}

impl ChannelReceiver {
    pub async fn recv(&mut self) -> Option<ChannelMsg> {
        let msg = self.rx.recv().await;
        self.count(&msg);
        msg
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<ChannelMsg>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(msg) = &polled {
            self.count(msg);
        }
        polled
    }

    pub fn close(&mut self) {
        self.rx.close();
    }

    fn count(&self, msg: &Option<ChannelMsg>) {
        if let Some(m) = msg {
            let n = data_len(m);
            if n > 0 {
                self.window.taken(n);
            }
        }
    }
}

impl Drop for ChannelReceiver {
    fn drop(&mut self) {
        self.window.closed.store(true, Ordering::SeqCst);
        self.window.wake_session();
    }
}

/// A channel's message queue.
pub(crate) fn channel_queue() -> (ChannelSender, ChannelReceiver) {
    let (tx, rx) = unbounded_channel();
    let window = Arc::new(RecvWindow::default());
    (
        ChannelSender {
            tx,
            window: window.clone(),
        },
        ChannelReceiver { rx, window },
    )
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn data(n: usize) -> ChannelMsg {
        ChannelMsg::Data {
            data: Bytes::from(vec![0u8; n]),
        }
    }

    #[tokio::test]
    async fn queued_counts_what_the_reader_has_not_taken() {
        let (tx, mut rx) = channel_queue();
        tx.send(data(100)).await.unwrap();
        tx.send(ChannelMsg::Eof).await.unwrap();
        assert_eq!(tx.recv_window().queued(), 100);
        rx.recv().await.unwrap();
        assert_eq!(tx.recv_window().queued(), 0);
    }

    #[tokio::test]
    async fn a_stalled_session_is_woken_once_the_reader_caught_up() {
        let (tx, mut rx) = channel_queue();
        let wake = Arc::new(Notify::new());
        for _ in 0..4 {
            tx.send(data(100)).await.unwrap();
        }
        tx.recv_window().stall(&wake, 200);
        rx.recv().await.unwrap();
        assert!(tx.recv_window().is_stalled(), "300 left: not yet");
        rx.recv().await.unwrap();
        assert!(!tx.recv_window().is_stalled(), "200 left: woken");
        // The wakeup is stored even though nobody was waiting yet.
        tokio::time::timeout(std::time::Duration::from_secs(5), wake.notified())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_dropped_reader_releases_the_window() {
        let (tx, rx) = channel_queue();
        let wake = Arc::new(Notify::new());
        tx.send(data(1000)).await.unwrap();
        tx.recv_window().stall(&wake, 0);
        drop(rx);
        assert_eq!(tx.recv_window().queued(), 0);
        assert!(tx.send(data(1)).await.is_err());
        tokio::time::timeout(std::time::Duration::from_secs(5), wake.notified())
            .await
            .unwrap();
    }
}
