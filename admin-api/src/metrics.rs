//! Prometheus metrics: one registry, fed two ways. Happenings ([`EngineEvent`]s: appends,
//! applies, conflicts, with their latencies) arrive through the engine's [`Observer`]
//! hook; state (log length, lag, peers, bytes, pending) is read from the engine at scrape
//! time, so it is never stale and costs nothing between scrapes.

use std::sync::Mutex;

use converge_framework::{EngineEvent, Observer, SyncEngine};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latency buckets in seconds: 100 µs to 10 s, for appends (a group commit is a few ms)
/// and applies (a batch of file writes).
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// converge's metrics. Pass it to `EngineBuilder::observer` before the engine starts, then
/// to [`crate::AdminState`] so `/metrics` can render it.
pub struct Metrics {
    registry: Registry,
    log_events: IntCounterVec,
    log_length: IntGauge,
    applied: IntCounterVec,
    subscriber_lag: IntGaugeVec,
    failed_keys: IntGaugeVec,
    subscriber_up: IntGaugeVec,
    source_up: IntGaugeVec,
    source_failures: IntCounterVec,
    conflicts: IntCounterVec,
    peer_connected: IntGaugeVec,
    peer_session_failures: IntCounterVec,
    sent_bytes: IntCounterVec,
    received_bytes: IntCounterVec,
    pending: IntGaugeVec,
    append_duration: HistogramVec,
    apply_duration: HistogramVec,
    /// Serializes scrapes: counters read from the engine are advanced by their delta since
    /// the last scrape, which two concurrent scrapes would count twice.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// A metric could not be created or registered (a programming error: a duplicate name).
#[derive(Debug, thiserror::Error)]
#[error("setting up the metrics registry: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// Creates every metric in a new registry.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let log_events = IntCounterVec::new(
            Opts::new(
                "converge_log_events_total",
                "Events in the event log, by origin (local: written by this replica; remote: received from peers).",
            ),
            &["origin"],
        )?;
        let log_length = IntGauge::new(
            "converge_log_length_events",
            "Length of the event log, in events.",
        )?;
        let applied = IntCounterVec::new(
            Opts::new(
                "converge_events_applied_total",
                "Events applied by each store subscriber since the daemon started.",
            ),
            &["subscriber"],
        )?;
        let subscriber_lag = IntGaugeVec::new(
            Opts::new(
                "converge_subscriber_lag_events",
                "Durable events a store subscriber has not processed yet.",
            ),
            &["subscriber"],
        )?;
        let failed_keys = IntGaugeVec::new(
            Opts::new(
                "converge_subscriber_failed_keys",
                "Keys a store subscriber could not show (a file it may not write), tried again.",
            ),
            &["subscriber"],
        )?;
        let subscriber_up = IntGaugeVec::new(
            Opts::new(
                "converge_subscriber_up",
                "0 while a store subscriber's batches fail (a full disk, a folder without its marker) and wait to be tried again, else 1.",
            ),
            &["subscriber"],
        )?;
        let source_up = IntGaugeVec::new(
            Opts::new(
                "converge_source_up",
                "0 from a source's failure until, started again, it has scanned (a folder without its marker, a folder gone), else 1.",
            ),
            &["source"],
        )?;
        let source_failures = IntCounterVec::new(
            Opts::new(
                "converge_source_failures_total",
                "Times a source failed (and was started again) since the daemon started.",
            ),
            &["source"],
        )?;
        let conflicts = IntCounterVec::new(
            Opts::new(
                "converge_conflicts_total",
                "Conflicted keys (more than one head) resolved by the conflict policy and handed to stores.",
            ),
            &["policy"],
        )?;
        let peer_connected = IntGaugeVec::new(
            Opts::new(
                "converge_peer_connected",
                "1 when a sync session with the peer is up, else 0.",
            ),
            &["peer"],
        )?;
        let peer_session_failures = IntCounterVec::new(
            Opts::new(
                "converge_peer_session_failures_total",
                "Sync sessions with the peer that ended with an error (lost connection, timeout, or this replica failing to store what the peer sent, e.g. on a full disk).",
            ),
            &["peer"],
        )?;
        let sent_bytes = IntCounterVec::new(
            Opts::new("converge_sync_sent_bytes_total", "Bytes sent to each peer."),
            &["peer"],
        )?;
        let received_bytes = IntCounterVec::new(
            Opts::new(
                "converge_sync_received_bytes_total",
                "Bytes received from each peer.",
            ),
            &["peer"],
        )?;
        let pending = IntGaugeVec::new(
            Opts::new(
                "converge_pending_events",
                "Events waiting in a queue (remote: received, waiting for a gap to fill or for content).",
            ),
            &["queue"],
        )?;
        let append_duration = HistogramVec::new(
            HistogramOpts::new(
                "converge_append_duration_seconds",
                "Time to make a batch of events durable in the log, by origin.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["origin"],
        )?;
        let apply_duration = HistogramVec::new(
            HistogramOpts::new(
                "converge_apply_duration_seconds",
                "Time for a store subscriber to apply a batch (or the batches one sync covers) and advance its cursor.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["subscriber"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "converge_build_info",
                "Always 1; the label carries converge's version.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for origin in ["local", "remote"] {
            log_events.with_label_values(&[origin]);
            append_duration.with_label_values(&[origin]);
        }
        pending.with_label_values(&["remote"]);
        registry.register(Box::new(log_events.clone()))?;
        registry.register(Box::new(log_length.clone()))?;
        registry.register(Box::new(applied.clone()))?;
        registry.register(Box::new(subscriber_lag.clone()))?;
        registry.register(Box::new(failed_keys.clone()))?;
        registry.register(Box::new(subscriber_up.clone()))?;
        registry.register(Box::new(source_up.clone()))?;
        registry.register(Box::new(source_failures.clone()))?;
        registry.register(Box::new(conflicts.clone()))?;
        registry.register(Box::new(peer_connected.clone()))?;
        registry.register(Box::new(peer_session_failures.clone()))?;
        registry.register(Box::new(sent_bytes.clone()))?;
        registry.register(Box::new(received_bytes.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        registry.register(Box::new(append_duration.clone()))?;
        registry.register(Box::new(apply_duration.clone()))?;
        registry.register(Box::new(build_info))?;
        Ok(Metrics {
            registry,
            log_events,
            log_length,
            applied,
            subscriber_lag,
            failed_keys,
            subscriber_up,
            source_up,
            source_failures,
            conflicts,
            peer_connected,
            peer_session_failures,
            sent_bytes,
            received_bytes,
            pending,
            append_duration,
            apply_duration,
            scrape: Mutex::new(()),
        })
    }

    /// The registry, to register more collectors in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Reads the engine's state into the metrics and renders the registry in the
    /// Prometheus text format.
    pub fn render(&self, engine: &SyncEngine) -> Result<String, MetricsError> {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let log = engine.log();
        let len = log.len();
        // The log is append-only, so both are monotonic: counters, advanced by their delta.
        let local = log.version_vector().get(&log.replica());
        advance(&self.log_events, "local", local);
        advance(&self.log_events, "remote", len.saturating_sub(local));
        self.log_length.set(to_i64(len));
        self.conflicts
            .with_label_values(&[engine.policy_name()])
            .inc_by(0);
        if let Ok(subscribers) = engine.subscribers() {
            for s in subscribers {
                self.subscriber_lag
                    .with_label_values(&[&s.name])
                    .set(to_i64(s.lag));
                self.failed_keys
                    .with_label_values(&[&s.name])
                    .set(to_i64(s.failed));
                self.subscriber_up
                    .with_label_values(&[&s.name])
                    .set(i64::from(s.error.is_none()));
                self.applied.with_label_values(&[&s.name]).inc_by(0);
                self.apply_duration.with_label_values(&[&s.name]);
            }
        }
        for s in engine.sources() {
            self.source_up
                .with_label_values(&[&s.name])
                .set(i64::from(s.up));
            advance(&self.source_failures, &s.name, s.failures);
        }
        // Peers are the configured ones: the label set is bounded by the config.
        for peer in engine.peers() {
            let label = peer.id.short();
            self.peer_connected
                .with_label_values(&[&label])
                .set(i64::from(peer.connected));
            advance(&self.peer_session_failures, &label, peer.failed_sessions);
            advance(&self.sent_bytes, &label, peer.sent_bytes);
            advance(&self.received_bytes, &label, peer.received_bytes);
        }
        self.pending.with_label_values(&["remote"]).set(to_i64(
            engine
                .stats()
                .pending
                .load(std::sync::atomic::Ordering::Relaxed),
        ));
        let mut out = Vec::with_capacity(8192);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Moves counter `label` of `vec` up to `total`.
fn advance(vec: &IntCounterVec, label: &str, total: u64) {
    let counter = vec.with_label_values(&[label]);
    let delta = total.saturating_sub(counter.get());
    if delta > 0 {
        counter.inc_by(delta);
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Observer for Metrics {
    fn observe(&self, event: &EngineEvent<'_>) {
        match event {
            EngineEvent::Appended {
                origin, duration, ..
            } => self
                .append_duration
                .with_label_values(&[origin.label()])
                .observe(duration.as_secs_f64()),
            EngineEvent::Applied {
                subscriber,
                events,
                conflicts,
                policy,
                duration,
            } => {
                self.applied
                    .with_label_values(&[subscriber])
                    .inc_by(*events);
                if *conflicts > 0 {
                    self.conflicts
                        .with_label_values(&[policy])
                        .inc_by(*conflicts);
                }
                self.apply_duration
                    .with_label_values(&[subscriber])
                    .observe(duration.as_secs_f64());
            }
            _ => {}
        }
    }
}
