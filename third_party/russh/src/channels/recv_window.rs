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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use tokio::sync::mpsc::error::SendError;

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
    /// Data was refused because the process-wide queue budget is spent.
    over_budget: AtomicBool,
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

/// Payloads shorter than this are appended to the queue's last data message instead of
/// becoming a message of their own: a peer sending 1-byte packets would otherwise cost a queue
/// element (~150 bytes) per byte of window.
const COALESCE_BELOW: usize = 512;
/// How large a coalesced data message may grow.
const COALESCE_MAX: usize = 16 * 1024;
/// What one queued message costs beyond its payload (element, allocation headers), counted
/// against the gateway-wide budget.
const ITEM_OVERHEAD: usize = 128;
/// Channel requests, EOFs and other non-data messages a channel may have queued at once. A
/// reader that keeps up never gets near it; a peer that floods requests while its channel's
/// reader is blocked has the excess refused (`Close` is always queued).
pub const MAX_QUEUED_CONTROLS: usize = 64;
/// A channel is only refused data for the budget once it holds at least this much itself, so
/// that channels whose readers keep up are never the ones cut.
const MIN_SHARE: usize = 64 * 1024;

/// Bytes queued in every channel of the process, and the limit set by
/// [`set_channel_queue_budget`].
static QUEUED_TOTAL: AtomicUsize = AtomicUsize::new(0);
static QUEUE_BUDGET: AtomicUsize = AtomicUsize::new(usize::MAX);

/// cmxsafe patch: limits the bytes all channel queues of this process may hold (payloads plus
/// a per-message overhead). Beyond it, data for a channel that itself holds 64 KiB or more is
/// refused and the session closes that channel (see `ChannelSender::over_budget`).
pub fn set_channel_queue_budget(bytes: usize) {
    QUEUE_BUDGET.store(bytes, Ordering::SeqCst);
}

/// Bytes queued in every channel of this process now.
pub fn channel_queue_bytes() -> usize {
    QUEUED_TOTAL.load(Ordering::SeqCst)
}

enum Payload {
    Frozen(Bytes),
    Growing(BytesMut),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Frozen(b) => b.len(),
            Payload::Growing(b) => b.len(),
        }
    }

    fn append(&mut self, more: &[u8]) {
        if let Payload::Frozen(b) = self {
            let mut grown = BytesMut::with_capacity(COALESCE_MAX.min(b.len() + more.len() * 8));
            grown.extend_from_slice(b);
            *self = Payload::Growing(grown);
        }
        if let Payload::Growing(b) = self {
            b.extend_from_slice(more);
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Payload::Frozen(b) => b,
            Payload::Growing(b) => b.freeze(),
        }
    }
}

enum Item {
    /// `ext` is None for CHANNEL_DATA, Some(code) for CHANNEL_EXTENDED_DATA.
    Data { ext: Option<u32>, payload: Payload },
    Other(ChannelMsg),
}

impl Item {
    fn cost(&self) -> usize {
        match self {
            Item::Data { payload, .. } => payload.len() + ITEM_OVERHEAD,
            Item::Other(_) => ITEM_OVERHEAD,
        }
    }

    fn into_msg(self) -> ChannelMsg {
        match self {
            Item::Data { ext: None, payload } => ChannelMsg::Data {
                data: payload.into_bytes(),
            },
            Item::Data {
                ext: Some(ext),
                payload,
            } => ChannelMsg::ExtendedData {
                ext,
                data: payload.into_bytes(),
            },
            Item::Other(msg) => msg,
        }
    }
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    /// Bytes held by `items` (payloads plus overhead), also counted in `QUEUED_TOTAL`.
    held: usize,
    /// Non-data items in `items`.
    controls: usize,
    reader: Option<Waker>,
    /// An EOF was queued once already.
    eof_queued: bool,
    sender_gone: bool,
    reader_gone: bool,
}

impl Queue {
    fn hold(&mut self, n: usize) {
        self.held += n;
        QUEUED_TOTAL.fetch_add(n, Ordering::SeqCst);
    }

    fn release(&mut self, n: usize) {
        self.held -= n;
        QUEUED_TOTAL.fetch_sub(n, Ordering::SeqCst);
    }

    /// Queues `msg`, coalescing where it can; gives it back if refused.
    fn push(&mut self, msg: ChannelMsg) -> Result<(), (ChannelMsg, Refusal)> {
        match msg {
            ChannelMsg::Data { data } => self.push_data(None, data, |data| ChannelMsg::Data { data }),
            ChannelMsg::ExtendedData { ext, data } => {
                self.push_data(Some(ext), data, |data| ChannelMsg::ExtendedData { ext, data })
            }
            ChannelMsg::WindowAdjusted { new_size } => {
                // Only the latest size means anything.
                if let Some(Item::Other(ChannelMsg::WindowAdjusted { new_size: last })) = self.items.back_mut() {
                    *last = new_size;
                    return Ok(());
                }
                self.push_other(ChannelMsg::WindowAdjusted { new_size })
            }
            // A channel ends once: Close is always queued, and an EOF once (a repeated EOF
            // means nothing and is dropped), so a full queue never hides the end of a channel.
            ChannelMsg::Close => {
                self.push_always(ChannelMsg::Close);
                Ok(())
            }
            ChannelMsg::Eof => {
                if !self.eof_queued {
                    self.eof_queued = true;
                    self.push_always(ChannelMsg::Eof);
                }
                Ok(())
            }
            other => self.push_other(other),
        }
    }

    fn push_always(&mut self, msg: ChannelMsg) {
        self.controls += 1;
        self.hold(ITEM_OVERHEAD);
        self.items.push_back(Item::Other(msg));
    }

    fn push_other(&mut self, msg: ChannelMsg) -> Result<(), (ChannelMsg, Refusal)> {
        if self.controls >= MAX_QUEUED_CONTROLS {
            return Err((msg, Refusal::TooManyControls));
        }
        self.controls += 1;
        self.hold(ITEM_OVERHEAD);
        self.items.push_back(Item::Other(msg));
        Ok(())
    }

    fn push_data(
        &mut self,
        ext: Option<u32>,
        data: Bytes,
        back: impl FnOnce(Bytes) -> ChannelMsg,
    ) -> Result<(), (ChannelMsg, Refusal)> {
        let n = data.len();
        if self.held >= MIN_SHARE
            && QUEUED_TOTAL.load(Ordering::SeqCst).saturating_add(n) > QUEUE_BUDGET.load(Ordering::SeqCst)
        {
            return Err((back(data), Refusal::OverBudget));
        }
        if n < COALESCE_BELOW
            && let Some(Item::Data { ext: last_ext, payload }) = self.items.back_mut()
            && *last_ext == ext
            && payload.len() + n <= COALESCE_MAX
        {
            let before = payload.len();
            payload.append(&data);
            let grown = payload.len() - before;
            self.hold(grown);
            return Ok(());
        }
        self.hold(n + ITEM_OVERHEAD);
        self.items.push_back(Item::Data {
            ext,
            payload: Payload::Frozen(data),
        });
        Ok(())
    }

    fn pop(&mut self) -> Option<Item> {
        let item = self.items.pop_front()?;
        if matches!(item, Item::Other(_)) {
            self.controls -= 1;
        }
        self.release(item.cost());
        Some(item)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        QUEUED_TOTAL.fetch_sub(self.held, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    TooManyControls,
    OverBudget,
}

fn lock_queue(q: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    // Every update leaves the queue consistent: a panic elsewhere cannot corrupt it.
    q.lock().unwrap_or_else(|p| p.into_inner())
}

/// The session's end of a channel's message queue.
pub struct ChannelSender {
    queue: Arc<Mutex<Queue>>,
    window: Arc<RecvWindow>,
}

impl std::fmt::Debug for ChannelSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSender").field("window", &self.window).finish()
    }
}

impl ChannelSender {
    /// Queues a message for the channel's reader; never waits (the window bounds the data).
    pub async fn send(&self, msg: ChannelMsg) -> Result<(), SendError<ChannelMsg>> {
        self.try_send(msg)
    }

    /// Same as `send`. Refused (the message is given back) when the reader is gone, when
    /// `MAX_QUEUED_CONTROLS` non-data messages are queued already, or when the process-wide
    /// budget is spent and this channel holds a share of it (`over_budget` then says so).
    pub fn try_send(&self, msg: ChannelMsg) -> Result<(), SendError<ChannelMsg>> {
        let n = data_len(&msg);
        let mut q = lock_queue(&self.queue);
        if q.reader_gone {
            return Err(SendError(msg));
        }
        match q.push(msg) {
            Ok(()) => {
                self.window.queued.fetch_add(n, Ordering::SeqCst);
                if let Some(w) = q.reader.take() {
                    w.wake();
                }
                Ok(())
            }
            Err((msg, refusal)) => {
                if refusal == Refusal::OverBudget {
                    self.window.over_budget.store(true, Ordering::SeqCst);
                }
                Err(SendError(msg))
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        lock_queue(&self.queue).reader_gone
    }

    /// Whether data for this channel was refused because the process-wide budget for queued
    /// channel data is spent: the session should close the channel.
    pub fn over_budget(&self) -> bool {
        self.window.over_budget.load(Ordering::SeqCst)
    }

    pub(crate) fn recv_window(&self) -> &Arc<RecvWindow> {
        &self.window
    }
}

impl Drop for ChannelSender {
    fn drop(&mut self) {
        let mut q = lock_queue(&self.queue);
        q.sender_gone = true;
        if let Some(w) = q.reader.take() {
            w.wake();
        }
    }
}

/// The reader's end of a channel's message queue.
pub struct ChannelReceiver {
    queue: Arc<Mutex<Queue>>,
    window: Arc<RecvWindow>,
}

impl std::fmt::Debug for ChannelReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelReceiver").field("window", &self.window).finish()
    }
}

impl ChannelReceiver {
    pub async fn recv(&mut self) -> Option<ChannelMsg> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<ChannelMsg>> {
        let mut q = lock_queue(&self.queue);
        match q.pop() {
            Some(item) => {
                drop(q);
                let msg = item.into_msg();
                let n = data_len(&msg);
                if n > 0 {
                    self.window.taken(n);
                }
                Poll::Ready(Some(msg))
            }
            None if q.sender_gone || q.reader_gone => Poll::Ready(None),
            None => {
                q.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// No more messages are accepted; those queued can still be received.
    pub fn close(&mut self) {
        lock_queue(&self.queue).reader_gone = true;
    }
}

impl Drop for ChannelReceiver {
    fn drop(&mut self) {
        {
            let mut q = lock_queue(&self.queue);
            q.reader_gone = true;
            while q.pop().is_some() {}
        }
        self.window.closed.store(true, Ordering::SeqCst);
        self.window.wake_session();
    }
}

/// A channel's message queue.
pub(crate) fn channel_queue() -> (ChannelSender, ChannelReceiver) {
    let queue = Arc::new(Mutex::new(Queue::default()));
    let window = Arc::new(RecvWindow::default());
    (
        ChannelSender {
            queue: queue.clone(),
            window: window.clone(),
        },
        ChannelReceiver { queue, window },
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
        // Payloads large enough to be queued one by one (smaller ones are coalesced).
        for _ in 0..4 {
            tx.send(data(1000)).await.unwrap();
        }
        tx.recv_window().stall(&wake, 2000);
        rx.recv().await.unwrap();
        assert!(tx.recv_window().is_stalled(), "3000 left: not yet");
        rx.recv().await.unwrap();
        assert!(!tx.recv_window().is_stalled(), "2000 left: woken");
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

    #[tokio::test]
    async fn tiny_payloads_are_coalesced_so_a_byte_of_window_costs_a_byte() {
        let (tx, mut rx) = channel_queue();
        for _ in 0..100_000 {
            tx.try_send(data(1)).unwrap();
        }
        let q = lock_queue(&tx.queue);
        assert_eq!(q.items.len(), 100_000usize.div_ceil(COALESCE_MAX));
        assert!(q.held < 100_000 + 8 * ITEM_OVERHEAD, "{} bytes held", q.held);
        drop(q);
        let mut got = 0;
        while got < 100_000 {
            match rx.recv().await {
                Some(ChannelMsg::Data { data }) => got += data.len(),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(tx.recv_window().queued(), 0);
        // Large payloads are queued as they came (no copy).
        tx.try_send(data(4096)).unwrap();
        tx.try_send(data(4096)).unwrap();
        assert_eq!(lock_queue(&tx.queue).items.len(), 2);
    }

    #[tokio::test]
    async fn requests_are_bounded_window_adjusts_merged_and_the_end_always_queued() {
        let (tx, mut rx) = channel_queue();
        for i in 0..1000 {
            tx.try_send(ChannelMsg::WindowAdjusted { new_size: i }).unwrap();
        }
        let mut refused = 0;
        for _ in 0..1000 {
            let env = ChannelMsg::SetEnv {
                want_reply: false,
                variable_name: "A".into(),
                variable_value: "B".into(),
            };
            refused += usize::from(tx.try_send(env).is_err());
        }
        assert_eq!(refused, 1000 - (MAX_QUEUED_CONTROLS - 1));
        for _ in 0..10 {
            tx.try_send(ChannelMsg::Eof).unwrap();
        }
        tx.try_send(ChannelMsg::Close).unwrap();
        drop(tx);
        assert!(matches!(rx.recv().await, Some(ChannelMsg::WindowAdjusted { new_size: 999 })));
        let mut rest = Vec::new();
        while let Some(m) = rx.recv().await {
            rest.push(m);
        }
        assert_eq!(rest.len(), MAX_QUEUED_CONTROLS - 1 + 2, "the requests, one EOF, the close");
        assert!(matches!(rest[rest.len() - 2], ChannelMsg::Eof));
        assert!(matches!(rest[rest.len() - 1], ChannelMsg::Close));
    }
}
