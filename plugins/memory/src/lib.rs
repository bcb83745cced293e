//! # converge-transport-memory
//!
//! An in-process [`Transport`](converge_framework::plugin::Transport) for tests: several
//! replicas in one process talk over a simulated network that drops, duplicates, delays
//! and reorders frames, and can be partitioned and healed.
//!
//! Every random choice comes from a seeded RNG, so a seed replays the same fault decisions
//! for the same sequence of frames. Delays use tokio's clock: on a paused clock
//! (`#[tokio::test(start_paused = true)]`) they cost no real time, so property tests can
//! run hundreds of cases over a lossy network in seconds.
//!
//! ```
//! use converge_framework::plugin::Transport;
//! use converge_transport_memory::{Faults, MemoryNetwork};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), converge_framework::TransportError> {
//! let network = MemoryNetwork::new(42, Faults::none());
//! let a = network.endpoint("a");
//! let b = network.endpoint("b");
//!
//! let mut dialed = a.dial("b").await?;
//! let mut accepted = b.accept().await?;
//! assert_eq!(accepted.remote, "a");
//!
//! dialed.sender.send(b"hello".to_vec()).await?;
//! assert_eq!(accepted.receiver.recv().await?, Some(b"hello".to_vec()));
//!
//! // A partition closes the connection and makes dials fail until it is healed.
//! network.partition("a", "b");
//! assert!(accepted.receiver.recv().await.is_err());
//! assert!(a.dial("b").await.is_err());
//! network.heal("a", "b");
//! assert!(a.dial("b").await.is_ok());
//! # Ok(())
//! # }
//! ```
//!
//! Faults apply per direction of a connection, to each frame, in this order: drop (the
//! frame vanishes), duplicate (it is delivered twice), reorder (each copy is held back by a
//! random delay up to [`Faults::max_delay`], so later frames overtake it). Frames are never
//! corrupted.
#![deny(missing_docs)]

use std::time::Duration;

mod link;
mod network;

pub use network::{MemoryNetwork, MemoryTransport};

/// What the simulated network does to frames: probabilities per frame, each in `0.0..=1.0`
/// (values outside are clamped, NaN counts as 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// Probability that a frame is lost.
    pub drop: f64,
    /// Probability that a frame (not lost) is delivered twice.
    pub duplicate: f64,
    /// Probability that each delivered copy is held back by a random delay in
    /// `(0, max_delay]`, letting later frames overtake it.
    pub reorder: f64,
    /// The longest a held-back frame waits. With `Duration::ZERO`, reordering does nothing.
    pub max_delay: Duration,
}

impl Faults {
    /// A perfect network: every frame arrives once, intact, in order, at once.
    pub fn none() -> Faults {
        Faults {
            drop: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            max_delay: Duration::ZERO,
        }
    }

    /// A moderately hostile network for property tests: 5% loss, 5% duplication and 20%
    /// of frames delayed by up to 50 ms.
    pub fn lossy() -> Faults {
        Faults {
            drop: 0.05,
            duplicate: 0.05,
            reorder: 0.2,
            max_delay: Duration::from_millis(50),
        }
    }
}

impl Default for Faults {
    /// [`Faults::none`].
    fn default() -> Faults {
        Faults::none()
    }
}

/// Counters of what the network did to frames since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// Frames accepted by a `send` (before faults).
    pub frames_sent: u64,
    /// Frames handed to a receiver by `recv` (duplicates count twice).
    pub frames_delivered: u64,
    /// Frames lost to the `drop` fault (not those discarded by a partition).
    pub frames_dropped: u64,
    /// Frames the `duplicate` fault sent twice.
    pub frames_duplicated: u64,
    /// Bytes of the delivered frames.
    pub bytes_delivered: u64,
}
