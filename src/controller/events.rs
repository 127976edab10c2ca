//! Kubernetes Events, published off the reconcile path.
//!
//! An Event is a record for people (`kubectl describe`), not part of a decision, so a
//! reconcile only queues it: a grant never waits for an Event's API write. One worker
//! publishes them in order; when the apiserver is slower than a burst, the queue fills and
//! new Events are dropped and counted (`portcullis_events_dropped_total`) rather than
//! holding anything up. The audit log line is the lasting record and is never dropped.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, Recorder, Reporter};
use tokio::sync::mpsc;

use super::metrics::Metrics;

/// How many Events may wait to be published.
const QUEUE: usize = 4096;

/// The sending side; cheap to share.
pub struct Events {
    queue: mpsc::Sender<(ObjectReference, Event)>,
    metrics: Arc<Metrics>,
}

impl Events {
    /// Starts the publishing worker on the current runtime.
    pub fn start(client: Client, reporter: Reporter, metrics: Arc<Metrics>) -> Self {
        let (queue, mut queued) = mpsc::channel::<(ObjectReference, Event)>(QUEUE);
        let recorder = Recorder::new(client, reporter);
        tokio::spawn(async move {
            while let Some((reference, event)) = queued.recv().await {
                if let Err(error) = recorder.publish(&event, &reference).await {
                    tracing::warn!(%error, reason = %event.reason, "cannot publish event");
                }
            }
        });
        Self { queue, metrics }
    }

    /// Queues `event` about `reference`; never waits.
    pub fn publish(&self, reference: ObjectReference, event: Event) {
        if let Err(mpsc::error::TrySendError::Full((_, event))) =
            self.queue.try_send((reference, event))
        {
            self.metrics.event_dropped();
            tracing::debug!(reason = %event.reason, "event queue full; event dropped");
        }
    }
}
