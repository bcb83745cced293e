//! One connection: two one-way frame streams that apply the network's faults.
//!
//! Each frame travels with the instant it becomes deliverable; the receiver keeps arrived
//! frames in a heap ordered by that instant (then by send order) and hands out the earliest
//! one once it is due. No task is spawned per frame, and the delivery order depends only on
//! the seed and on when frames were sent, not on how the runtime schedules tasks.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::atomic::{self, AtomicBool};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use converge_framework::plugin::{FrameReceiver, FrameSender};
use converge_framework::TransportError;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::network::Inner;

/// What both directions of one connection share: who it joins and whether a partition
/// broke it.
pub(crate) struct LinkState {
    dialer: String,
    acceptor: String,
    broken: AtomicBool,
    broken_notify: Notify,
}

impl LinkState {
    pub(crate) fn new(dialer: &str, acceptor: &str) -> LinkState {
        LinkState {
            dialer: dialer.to_owned(),
            acceptor: acceptor.to_owned(),
            broken: AtomicBool::new(false),
            broken_notify: Notify::new(),
        }
    }

    /// Whether the connection runs between `a` and `b`, in either direction.
    pub(crate) fn joins(&self, a: &str, b: &str) -> bool {
        (self.dialer == a && self.acceptor == b) || (self.dialer == b && self.acceptor == a)
    }

    /// Whether `a` is one end of the connection.
    pub(crate) fn touches(&self, a: &str) -> bool {
        self.dialer == a || self.acceptor == a
    }

    /// Closes the connection abruptly: both sides fail from now on.
    pub(crate) fn break_link(&self) {
        self.broken.store(true, atomic::Ordering::SeqCst);
        self.broken_notify.notify_waiters();
    }

    fn is_broken(&self) -> bool {
        self.broken.load(atomic::Ordering::SeqCst)
    }
}

/// A frame in flight.
struct Timed {
    /// When it may be delivered.
    due: Instant,
    /// Position in the sender's stream (copies of a duplicate get their own), the tie-break.
    order: u64,
    frame: Vec<u8>,
}

impl Timed {
    fn key(&self) -> (Instant, u64) {
        (self.due, self.order)
    }
}

impl PartialEq for Timed {
    fn eq(&self, other: &Timed) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Timed {}

impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Timed) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timed {
    fn cmp(&self, other: &Timed) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// Builds the two halves of the stream `from` → `to`.
pub(crate) fn direction(
    network: &Arc<Inner>,
    link: &Arc<LinkState>,
    from: &str,
    to: &str,
    seed: u64,
) -> (MemorySender, MemoryReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sender = MemorySender {
        tx: Some(tx),
        link: Arc::clone(link),
        network: Arc::clone(network),
        rng: SmallRng::seed_from_u64(seed),
        next_order: 0,
        frames: 0,
        from: from.to_owned(),
        to: to.to_owned(),
    };
    let receiver = MemoryReceiver {
        rx,
        arrived: BinaryHeap::new(),
        ended: false,
        link: Arc::clone(link),
        network: Arc::clone(network),
    };
    (sender, receiver)
}

/// True with probability `p` (clamped to `0.0..=1.0`; NaN is 0). Unlike `Rng::gen_bool`,
/// never panics.
fn chance(rng: &mut SmallRng, p: f64) -> bool {
    rng.gen::<f64>() < p
}

/// A delay in `(0, max]`, or zero when `max` is zero.
fn random_delay(rng: &mut SmallRng, max: Duration) -> Duration {
    let max_nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if max_nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rng.gen_range(1..=max_nanos))
}

/// The sending half of one direction.
pub(crate) struct MemorySender {
    /// `None` once closed.
    tx: Option<mpsc::UnboundedSender<Timed>>,
    link: Arc<LinkState>,
    network: Arc<Inner>,
    rng: SmallRng,
    next_order: u64,
    /// Frames sent so far, to name them in logs.
    frames: u64,
    from: String,
    to: String,
}

impl MemorySender {
    fn push(&mut self, due: Instant, frame: Vec<u8>) -> Result<(), TransportError> {
        let order = self.next_order;
        self.next_order += 1;
        let tx = self.tx.as_ref().ok_or(TransportError::Closed)?;
        tx.send(Timed { due, order, frame })
            .map_err(|_| TransportError::Closed)
    }

    fn due(&mut self, now: Instant, reorder: f64, max_delay: Duration, frame: u64) -> Instant {
        if !chance(&mut self.rng, reorder) {
            return now;
        }
        let delay = random_delay(&mut self.rng, max_delay);
        tracing::debug!(from = %self.from, to = %self.to, frame, ?delay, "memory network: delay");
        now + delay
    }
}

#[async_trait]
impl FrameSender for MemorySender {
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        if self.link.is_broken() {
            self.tx = None;
        }
        match &self.tx {
            // The receiving half is gone: the connection is unusable.
            Some(tx) if tx.is_closed() => return Err(TransportError::Closed),
            Some(_) => {}
            None => return Err(TransportError::Closed),
        }
        let faults = self.network.faults();
        let stats = &self.network.stats;
        let number = self.frames;
        self.frames += 1;
        stats.sent.fetch_add(1, atomic::Ordering::Relaxed);

        if chance(&mut self.rng, faults.drop) {
            stats.dropped.fetch_add(1, atomic::Ordering::Relaxed);
            tracing::debug!(from = %self.from, to = %self.to, frame = number, "memory network: drop");
            return Ok(());
        }
        let now = Instant::now();
        if chance(&mut self.rng, faults.duplicate) {
            stats.duplicated.fetch_add(1, atomic::Ordering::Relaxed);
            tracing::debug!(from = %self.from, to = %self.to, frame = number, "memory network: duplicate");
            let due = self.due(now, faults.reorder, faults.max_delay, number);
            self.push(due, frame.clone())?;
        }
        let due = self.due(now, faults.reorder, faults.max_delay, number);
        self.push(due, frame)
    }

    async fn close(&mut self) {
        // Dropping the channel's only sender ends the stream once the receiver has taken
        // every frame already in flight (delayed ones included).
        self.tx = None;
    }
}

/// The receiving half of one direction.
pub(crate) struct MemoryReceiver {
    rx: mpsc::UnboundedReceiver<Timed>,
    /// Frames taken off the channel, not yet due or not yet asked for.
    arrived: BinaryHeap<Reverse<Timed>>,
    /// The sender closed (or was dropped): nothing more will come through `rx`.
    ended: bool,
    link: Arc<LinkState>,
    network: Arc<Inner>,
}

#[async_trait]
impl FrameReceiver for MemoryReceiver {
    /// Cancel safe: frames taken off the channel are kept until returned.
    async fn recv(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        loop {
            // Registered before the check, so a partition in between still wakes us.
            let broken = self.link.broken_notify.notified();
            tokio::pin!(broken);
            broken.as_mut().enable();
            if self.link.is_broken() {
                self.arrived.clear();
                return Err(TransportError::Closed);
            }

            // Take everything already sent, so the earliest due frame is the one returned.
            while !self.ended {
                match self.rx.try_recv() {
                    Ok(timed) => self.arrived.push(Reverse(timed)),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => self.ended = true,
                }
            }
            let next_due = self.arrived.peek().map(|Reverse(timed)| timed.due);
            match next_due {
                Some(due) if due <= Instant::now() => {
                    if let Some(Reverse(timed)) = self.arrived.pop() {
                        let stats = &self.network.stats;
                        stats.delivered.fetch_add(1, atomic::Ordering::Relaxed);
                        let bytes = u64::try_from(timed.frame.len()).unwrap_or(u64::MAX);
                        stats
                            .bytes_delivered
                            .fetch_add(bytes, atomic::Ordering::Relaxed);
                        return Ok(Some(timed.frame));
                    }
                }
                None if self.ended => return Ok(None),
                _ => {}
            }

            let ended = self.ended;
            let until_due = async move {
                match next_due {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut broken => {}
                () = until_due => {}
                timed = self.rx.recv(), if !ended => match timed {
                    Some(timed) => self.arrived.push(Reverse(timed)),
                    None => self.ended = true,
                },
            }
        }
    }
}
