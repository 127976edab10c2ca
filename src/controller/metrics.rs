//! Prometheus metrics of the controllers: what an SRE watches to know grants are fast,
//! expiries are on time and nothing fails quietly.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How a request ended its evaluation.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum GrantResult {
    Granted,
    Denied,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: GrantResult,
}

/// What became of a notification to one sink (see [`super::notify`]).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum NotificationResult {
    /// The sink answered `2xx`.
    Sent,
    /// Given up: refused by the sink, or not delivered after every retry.
    Failed,
    /// Pushed out of the sink's full queue by a newer event.
    Dropped,
}

/// A sink, as its URL without the query (which may carry a token), and the result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotificationLabels {
    sink: String,
    result: NotificationResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabel {
    controller: &'static str,
}

/// The operator's metrics, registered once and shared by every controller.
pub struct Metrics {
    registry: Registry,
    grants: Family<ResultLabel, Counter>,
    active_grants: Gauge<i64, AtomicI64>,
    grant_latency: Histogram,
    revoke_lateness: Histogram,
    reconciles: Family<ControllerLabel, Counter>,
    reconcile_errors: Family<ControllerLabel, Counter>,
    events_dropped: Counter,
    notifications: Family<NotificationLabels, Counter>,
    leader: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `portcullis_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let grants = Family::<ResultLabel, Counter>::default();
        let active_grants = Gauge::<i64, AtomicI64>::default();
        // 5 ms .. ~20 s: a grant is a few API round trips.
        let grant_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 13),
        );
        let revoke_lateness = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 13),
        );
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let reconcile_errors = Family::<ControllerLabel, Counter>::default();
        registry.register(
            "grants",
            "JIT requests evaluated, by result",
            grants.clone(),
        );
        registry.register(
            "active_grants",
            "JIT requests whose access is open",
            active_grants.clone(),
        );
        registry.register(
            "grant_latency_seconds",
            "From JitRequest creation to its allow rules existing and status Granted",
            grant_latency.clone(),
        );
        registry.register(
            "revoke_lateness_seconds",
            "From a grant's expiresAt to its allow rules being deleted",
            revoke_lateness.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciliations run (a copy older than the operator's own write is skipped, and \
             counted), by controller",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by controller",
            reconcile_errors.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Kubernetes Events not published because the queue was full",
            events_dropped.clone(),
        );
        let notifications = Family::<NotificationLabels, Counter>::default();
        registry.register(
            "notifications",
            "CloudEvents about requests, by sink and result: Sent, Failed (refused or retries \
             exhausted) or Dropped (the sink's queue was full)",
            notifications.clone(),
        );
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "leader",
            "1 while this replica runs the controllers (holds the lease, or no election)",
            leader.clone(),
        );
        Self {
            registry,
            leader,
            grants,
            active_grants,
            grant_latency,
            revoke_lateness,
            reconciles,
            reconcile_errors,
            events_dropped,
            notifications,
        }
    }

    /// A request was granted (with its latency) or denied.
    pub fn evaluated(&self, result: GrantResult) {
        self.grants.get_or_create(&ResultLabel { result }).inc();
    }

    /// Seconds from creation to granted.
    pub fn grant_latency(&self, seconds: f64) {
        self.grant_latency.observe(seconds);
    }

    /// Seconds from `expiresAt` to the rules being gone (negative clamps to zero).
    pub fn revoke_lateness(&self, seconds: f64) {
        self.revoke_lateness.observe(seconds.max(0.0));
    }

    /// Whether this replica runs the controllers.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// An Event was dropped: the queue was full.
    pub fn event_dropped(&self) {
        self.events_dropped.inc();
    }

    /// Counts a notification to `sink` by its result.
    pub fn notification(&self, sink: &str, result: NotificationResult) {
        self.notifications
            .get_or_create(&NotificationLabels {
                sink: sink.to_owned(),
                result,
            })
            .inc();
    }

    /// Exposes every result of `sink` from the start, at zero: a rate over a series that
    /// appears only at its first failure misses that failure.
    pub fn notifications_for(&self, sink: &str) {
        for result in [
            NotificationResult::Sent,
            NotificationResult::Failed,
            NotificationResult::Dropped,
        ] {
            let _ = self.notifications.get_or_create(&NotificationLabels {
                sink: sink.to_owned(),
                result,
            });
        }
    }

    /// Sets the number of open grants (kept by the request index).
    pub fn set_active_grants(&self, count: i64) {
        self.active_grants.set(count);
    }

    /// A reconcile of `controller` ran.
    pub fn reconciled(&self, controller: &'static str) {
        self.reconciles
            .get_or_create(&ControllerLabel { controller })
            .inc();
    }

    /// A reconcile of `controller` failed.
    pub fn reconcile_error(&self, controller: &'static str) {
        self.reconcile_errors
            .get_or_create(&ControllerLabel { controller })
            .inc();
    }

    /// The text exposition format served at `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_every_metric_with_its_labels() {
        let metrics = Metrics::new();
        metrics.evaluated(GrantResult::Granted);
        metrics.evaluated(GrantResult::Denied);
        metrics.evaluated(GrantResult::Denied);
        metrics.set_active_grants(3);
        metrics.grant_latency(0.02);
        metrics.revoke_lateness(-1.0);
        metrics.reconciled("nsg");
        metrics.reconcile_error("request");
        metrics.event_dropped();
        metrics.notifications_for("http://sink/");
        metrics.notification("http://sink/", NotificationResult::Sent);
        metrics.set_leader(true);
        let text = metrics.encode();
        for line in [
            "portcullis_grants_total{result=\"Granted\"} 1",
            "portcullis_grants_total{result=\"Denied\"} 2",
            "portcullis_active_grants 3",
            "portcullis_grant_latency_seconds_count 1",
            "portcullis_revoke_lateness_seconds_bucket{le=\"0.005\"} 1",
            "portcullis_reconciles_total{controller=\"nsg\"} 1",
            "portcullis_reconcile_errors_total{controller=\"request\"} 1",
            "portcullis_events_dropped_total 1",
            "portcullis_notifications_total{sink=\"http://sink/\",result=\"Sent\"} 1",
            "portcullis_notifications_total{sink=\"http://sink/\",result=\"Dropped\"} 0",
            "portcullis_leader 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
