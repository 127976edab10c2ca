//! Kubernetes Events, published off the reconcile path.
//!
//! An Event is a record for people (`kubectl describe`), not part of a decision, so a
//! reconcile only queues it: a grant never waits for an Event's API write. A few workers
//! publish them, each object's Events always by the same worker, so they keep their order
//! (an Event's time is when it is published). When the apiserver is slower than a burst,
//! the queues fill and new Events are dropped and counted (`portcullis_events_dropped_total`)
//! rather than holding anything up. The audit log line is the lasting record and is never
//! dropped.
//!
//! They are written as they are, not through kube's `Recorder`: it keeps every Event it
//! posted for six minutes to fold repeats into a series, and scans that cache on every
//! post. The operator never repeats an Event (one per status transition), so the cache was
//! only memory: about 12 MiB of a 10,000-grant fill.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as Record;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use tokio::sync::mpsc;

use super::metrics::Metrics;

/// How many Events may wait to be published, over all workers.
const QUEUE: usize = 4096;
/// How many Events are published at once. One at a time, a burst of 1,000 grants had
/// posted 180 of its Events by the time the last was granted.
const WORKERS: usize = 4;

/// The sending side; cheap to share.
pub struct Events {
    queues: Vec<mpsc::Sender<(ObjectReference, Event)>>,
    metrics: Arc<Metrics>,
}

impl Events {
    /// Starts the publishing workers on the current runtime.
    pub fn start(client: Client, reporter: Reporter, metrics: Arc<Metrics>) -> Self {
        let reporter = Arc::new(reporter);
        let queues = (0..WORKERS)
            .map(|_| {
                let (queue, mut queued) =
                    mpsc::channel::<(ObjectReference, Event)>(QUEUE / WORKERS);
                let (client, reporter) = (client.clone(), reporter.clone());
                tokio::spawn(async move {
                    while let Some((reference, event)) = queued.recv().await {
                        let namespace = reference.namespace.clone().unwrap_or_default();
                        let record = record(&event, reference, &reporter, jiff::Timestamp::now());
                        let posted = Api::<Record>::namespaced(client.clone(), &namespace)
                            .create(&PostParams::default(), &record)
                            .await;
                        if let Err(error) = posted {
                            tracing::warn!(%error, reason = %event.reason, "cannot publish event");
                        }
                    }
                });
                queue
            })
            .collect();
        Self { queues, metrics }
    }

    /// Queues `event` about `reference` for the worker of that object; never waits.
    pub fn publish(&self, reference: ObjectReference, event: Event) {
        let worker = worker_of(&reference);
        if let Err(mpsc::error::TrySendError::Full((_, event))) =
            self.queues[worker].try_send((reference, event))
        {
            self.metrics.event_dropped();
            tracing::debug!(reason = %event.reason, "event queue full; event dropped");
        }
    }
}

/// The Event object `event` about `reference` becomes, as `reporter` at `now`. Its name is
/// the object's (cut short) and the time in nanoseconds, as kube's recorder names them: one
/// object's Events are posted one after another, so no two share a name.
fn record(
    event: &Event,
    reference: ObjectReference,
    reporter: &Reporter,
    now: jiff::Timestamp,
) -> Record {
    let mut prefix: String = reference.name.clone().unwrap_or_default();
    prefix.truncate(prefix.floor_char_boundary(200));
    let prefix = prefix.trim_end_matches(['-', '.']);
    Record {
        metadata: ObjectMeta {
            name: Some(format!("{prefix}.{:x}", now.as_nanosecond())),
            namespace: reference.namespace.clone(),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some(event.action.clone()),
        reason: Some(event.reason.clone()),
        note: event.note.clone(),
        type_: Some(
            match event.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .to_owned(),
        ),
        regarding: Some(reference),
        related: event.secondary.clone(),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(
            reporter
                .instance
                .clone()
                .unwrap_or_else(|| reporter.controller.clone()),
        ),
        ..Record::default()
    }
}

/// The worker that publishes every Event about `reference`'s object.
fn worker_of(reference: &ObjectReference) -> usize {
    let mut hasher = DefaultHasher::new();
    (&reference.namespace, &reference.name).hash(&mut hasher);
    usize::try_from(hasher.finish() % WORKERS as u64).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(name: &str, uid: &str) -> ObjectReference {
        ObjectReference {
            namespace: Some("team".into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            ..ObjectReference::default()
        }
    }

    #[test]
    fn an_event_becomes_a_record_of_its_object_and_reporter() {
        let event = Event {
            type_: EventType::Warning,
            reason: "Denied".into(),
            note: Some("no".into()),
            action: "Denied".into(),
            secondary: None,
        };
        let reporter = Reporter {
            controller: "portcullis-controller".into(),
            instance: Some("pod-1".into()),
        };
        // Cut at 200 characters, where a `-` ends it: the name must still be valid.
        let long = format!("{}-{}", "a".repeat(199), "b".repeat(53));
        let now = jiff::Timestamp::from_nanosecond(255).unwrap();
        let record = record(&event, reference(&long, "1"), &reporter, now);
        let name = record.metadata.name.clone().unwrap();
        assert_eq!(name, format!("{}.ff", "a".repeat(199)));
        assert_eq!(record.metadata.namespace.as_deref(), Some("team"));
        assert_eq!(record.type_.as_deref(), Some("Warning"));
        assert_eq!(record.reason.as_deref(), Some("Denied"));
        assert_eq!(record.event_time, Some(MicroTime(now)));
        assert_eq!(record.regarding.unwrap().uid.as_deref(), Some("1"));
        assert_eq!(record.reporting_instance.as_deref(), Some("pod-1"));
    }

    #[test]
    fn one_object_has_one_worker_and_objects_spread_over_all() {
        // Same object (its uid aside): same worker, so its Events keep their order.
        assert_eq!(
            worker_of(&reference("ask", "1")),
            worker_of(&reference("ask", "2"))
        );
        let used: std::collections::BTreeSet<usize> = (0..200)
            .map(|i| worker_of(&reference(&format!("ask-{i}"), "1")))
            .collect();
        assert_eq!(used.len(), WORKERS);
    }
}
