//! Kubernetes Events, published off the reconcile path.
//!
//! An Event is a record for people (`kubectl describe`), not part of a decision, so a
//! reconcile only queues it: a grant never waits for an Event's API write. A few workers
//! publish them, each object's Events always by the same worker, so they keep their order
//! (an Event's time is when it is published). When the apiserver is slower than a burst,
//! the queues fill and new Events are dropped and counted (`portcullis_events_dropped_total`)
//! rather than holding anything up. The audit log line is the lasting record and is never
//! dropped.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, Recorder, Reporter};
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
        let recorder = Recorder::new(client, reporter);
        let queues = (0..WORKERS)
            .map(|_| {
                let (queue, mut queued) =
                    mpsc::channel::<(ObjectReference, Event)>(QUEUE / WORKERS);
                let recorder = recorder.clone();
                tokio::spawn(async move {
                    while let Some((reference, event)) = queued.recv().await {
                        if let Err(error) = recorder.publish(&event, &reference).await {
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
