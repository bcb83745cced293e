//! The simulated network: a registry of endpoints, partitions and live connections.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use async_trait::async_trait;
use converge_framework::plugin::{Connection, Transport};
use converge_framework::TransportError;
use tokio::sync::mpsc;

use crate::link::{self, LinkState};
use crate::{Faults, NetworkStats};

/// A handle to a simulated network. Cheap to clone: clones share the same network.
#[derive(Clone)]
pub struct MemoryNetwork {
    inner: Arc<Inner>,
}

/// What every handle, transport and connection half of one network shares.
pub(crate) struct Inner {
    seed: u64,
    state: Mutex<State>,
    pub(crate) stats: Counters,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) sent: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) duplicated: AtomicU64,
    pub(crate) bytes_delivered: AtomicU64,
}

struct State {
    faults: Faults,
    endpoints: HashMap<String, Endpoint>,
    /// Unordered pairs, stored as `(min, max)`.
    partitions: HashSet<(String, String)>,
    isolated: HashSet<String>,
    /// Live connections, so a partition can break them. Weak: the halves own them.
    links: Vec<Weak<LinkState>>,
    /// Connections opened so far per unordered pair, part of each link's RNG seed.
    opened: HashMap<(String, String), u64>,
    next_endpoint: u64,
}

struct Endpoint {
    id: u64,
    incoming: mpsc::UnboundedSender<Connection>,
}

fn pair_key(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

impl State {
    fn partitioned(&self, a: &str, b: &str) -> bool {
        self.isolated.contains(a)
            || self.isolated.contains(b)
            || self.partitions.contains(&pair_key(a, b))
    }

    /// Breaks every live connection for which `hit` holds, and forgets dead ones.
    fn break_links(&mut self, hit: impl Fn(&LinkState) -> bool) {
        self.links.retain(|weak| match weak.upgrade() {
            Some(link) if hit(&link) => {
                link.break_link();
                false
            }
            Some(_) => true,
            None => false,
        });
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock, but a panicking test thread must not
        // turn every later call into a second panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn faults(&self) -> Faults {
        self.state().faults
    }
}

impl MemoryNetwork {
    /// A new network with no endpoints. `seed` drives every fault decision; `faults` says
    /// how often they happen.
    pub fn new(seed: u64, faults: Faults) -> MemoryNetwork {
        let state = State {
            faults,
            endpoints: HashMap::new(),
            partitions: HashSet::new(),
            isolated: HashSet::new(),
            links: Vec::new(),
            opened: HashMap::new(),
            next_endpoint: 0,
        };
        MemoryNetwork {
            inner: Arc::new(Inner {
                seed,
                state: Mutex::new(state),
                stats: Counters::default(),
            }),
        }
    }

    /// The seed the network was created with (print it when a test fails, to replay it).
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// The faults currently applied.
    pub fn faults(&self) -> Faults {
        self.inner.faults()
    }

    /// Changes the faults; they apply to every later frame, on existing connections too
    /// (frames already delayed keep their delay). Tests set [`Faults::none`] to heal.
    pub fn set_faults(&self, faults: Faults) {
        tracing::debug!(?faults, "memory network: faults changed");
        self.inner.state().faults = faults;
    }

    /// Registers an endpoint that peers reach by dialing `address`. An endpoint already
    /// registered under that address is replaced (its `accept` then fails), like a replica
    /// restarting on the same address. Dropping the transport unregisters it.
    pub fn endpoint(&self, address: &str) -> MemoryTransport {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.inner.state();
        let id = state.next_endpoint;
        state.next_endpoint += 1;
        state
            .endpoints
            .insert(address.to_owned(), Endpoint { id, incoming: tx });
        MemoryTransport {
            network: self.clone(),
            address: address.to_owned(),
            id,
            incoming: tokio::sync::Mutex::new(rx),
        }
    }

    /// Cuts `a` off from `b`: closes every connection between them (both sides' `recv`
    /// fail with [`TransportError::Closed`], undelivered frames are lost, `send` fails) and
    /// makes dials between them fail until [`heal`](Self::heal) or
    /// [`heal_all`](Self::heal_all).
    pub fn partition(&self, a: &str, b: &str) {
        tracing::debug!(a, b, "memory network: partition");
        let mut state = self.inner.state();
        state.partitions.insert(pair_key(a, b));
        state.break_links(|link| link.joins(a, b));
    }

    /// Cuts `a` off from every endpoint, as [`partition`](Self::partition) does for one pair,
    /// until [`rejoin`](Self::rejoin) or [`heal_all`](Self::heal_all).
    pub fn isolate(&self, a: &str) {
        tracing::debug!(a, "memory network: isolate");
        let mut state = self.inner.state();
        state.isolated.insert(a.to_owned());
        state.break_links(|link| link.touches(a));
    }

    /// Lets `a` and `b` dial each other again (unless one of them is isolated). Connections
    /// closed by the partition stay closed.
    pub fn heal(&self, a: &str, b: &str) {
        tracing::debug!(a, b, "memory network: heal");
        self.inner.state().partitions.remove(&pair_key(a, b));
    }

    /// Ends the isolation of `a` (pair partitions involving `a` stay).
    pub fn rejoin(&self, a: &str) {
        tracing::debug!(a, "memory network: rejoin");
        self.inner.state().isolated.remove(a);
    }

    /// Heals every partition and isolation.
    pub fn heal_all(&self) {
        tracing::debug!("memory network: heal all");
        let mut state = self.inner.state();
        state.partitions.clear();
        state.isolated.clear();
    }

    /// Whether dials between `a` and `b` currently fail because of a partition or isolation.
    pub fn is_partitioned(&self, a: &str, b: &str) -> bool {
        self.inner.state().partitioned(a, b)
    }

    /// What the network has done to frames so far.
    pub fn stats(&self) -> NetworkStats {
        let stats = &self.inner.stats;
        NetworkStats {
            frames_sent: stats.sent.load(Ordering::Relaxed),
            frames_delivered: stats.delivered.load(Ordering::Relaxed),
            frames_dropped: stats.dropped.load(Ordering::Relaxed),
            frames_duplicated: stats.duplicated.load(Ordering::Relaxed),
            bytes_delivered: stats.bytes_delivered.load(Ordering::Relaxed),
        }
    }

    fn dial(&self, from: &str, to: &str) -> Result<Connection, TransportError> {
        let unreachable = |reason: &str| TransportError::Unreachable {
            address: to.to_owned(),
            reason: reason.to_owned(),
        };
        let mut state = self.inner.state();
        if state.partitioned(from, to) {
            return Err(unreachable(&format!("partitioned from {from}")));
        }
        let incoming = match state.endpoints.get(to) {
            Some(endpoint) if !endpoint.incoming.is_closed() => endpoint.incoming.clone(),
            _ => return Err(unreachable("no memory endpoint at this address")),
        };
        let opened = state.opened.entry(pair_key(from, to)).or_insert(0);
        let nth = *opened;
        *opened += 1;
        let link = Arc::new(LinkState::new(from, to));
        state.links.retain(|weak| weak.strong_count() > 0);
        state.links.push(Arc::downgrade(&link));
        drop(state);

        let seed = self.inner.seed;
        let (out_sender, out_receiver) =
            link::direction(&self.inner, &link, from, to, link_seed(seed, from, to, nth));
        let (back_sender, back_receiver) =
            link::direction(&self.inner, &link, to, from, link_seed(seed, to, from, nth));
        let accepted = Connection {
            remote: from.to_owned(),
            dialed: false,
            sender: Box::new(back_sender),
            receiver: Box::new(out_receiver),
        };
        if incoming.send(accepted).is_err() {
            return Err(unreachable("the memory endpoint was dropped"));
        }
        tracing::debug!(from, to, nth, "memory network: connected");
        Ok(Connection {
            remote: to.to_owned(),
            dialed: true,
            sender: Box::new(out_sender),
            receiver: Box::new(back_receiver),
        })
    }
}

impl std::fmt::Debug for MemoryNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.state();
        let mut endpoints: Vec<&String> = state.endpoints.keys().collect();
        endpoints.sort();
        f.debug_struct("MemoryNetwork")
            .field("seed", &self.inner.seed)
            .field("faults", &state.faults)
            .field("endpoints", &endpoints)
            .field("partitions", &state.partitions)
            .field("isolated", &state.isolated)
            .finish_non_exhaustive()
    }
}

/// The RNG seed of one direction of the `nth` connection between two endpoints: a stable
/// mix (FNV-1a, then SplitMix64) that does not depend on the std hasher or the Rust version.
fn link_seed(seed: u64, from: &str, to: &str, nth: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed
        .to_le_bytes()
        .iter()
        .chain(from.as_bytes())
        .chain(&[0xff])
        .chain(to.as_bytes())
        .chain(&[0xff])
        .chain(&nth.to_le_bytes())
    {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash = hash.wrapping_add(0x9e37_79b9_7f4a_7c15);
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// One endpoint of a [`MemoryNetwork`]: a [`Transport`] whose address is the name it was
/// registered under. Dropping it unregisters the address.
pub struct MemoryTransport {
    network: MemoryNetwork,
    address: String,
    id: u64,
    incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<Connection>>,
}

impl MemoryTransport {
    /// The network this endpoint belongs to.
    pub fn network(&self) -> &MemoryNetwork {
        &self.network
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn kind(&self) -> &str {
        "memory"
    }

    fn local_address(&self) -> String {
        self.address.clone()
    }

    /// Waits for the next connection dialed to this address. Fails with
    /// [`TransportError::Closed`] once another endpoint has replaced this one.
    async fn accept(&self) -> Result<Connection, TransportError> {
        self.incoming
            .lock()
            .await
            .recv()
            .await
            .ok_or(TransportError::Closed)
    }

    /// Connects to the endpoint registered at `address`; [`TransportError::Unreachable`] if
    /// there is none, it was dropped, or the two are partitioned.
    async fn dial(&self, address: &str) -> Result<Connection, TransportError> {
        self.network.dial(&self.address, address)
    }
}

impl Drop for MemoryTransport {
    fn drop(&mut self) {
        let mut state = self.network.inner.state();
        if state
            .endpoints
            .get(&self.address)
            .is_some_and(|endpoint| endpoint.id == self.id)
        {
            state.endpoints.remove(&self.address);
        }
    }
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}
