//! Notifications: a CloudEvent for every step of a request's life, posted to HTTP sinks
//! (`--notify-url`) off the reconcile path.
//!
//! # What a sink receives
//!
//! One `POST` per event, in CloudEvents 1.0 structured mode (`Content-Type:
//! application/cloudevents+json`):
//!
//! ```json
//! {
//!   "specversion": "1.0",
//!   "id": "0b6a3c1e-8f0e-4a57-9c1d-5d2b3f8e7a10/granted",
//!   "source": "/portcullis/operator",
//!   "type": "dev.portcullis.request.granted",
//!   "subject": "team-web/ssh-web-1",
//!   "time": "2026-05-04T09:12:03.52Z",
//!   "datacontenttype": "application/json",
//!   "data": {
//!     "requestor": "alice",
//!     "policy": "web",
//!     "machines": [{"name": "web-1", "ports": [{"number": 22, "protocol": "TCP"}]}],
//!     "source": ["198.19.0.10"],
//!     "start": "2026-05-04T09:12:03Z",
//!     "end": "2026-05-04T09:17:03Z",
//!     "reason": "AccessGranted",
//!     "approvals": "2/2",
//!     "message": "22/TCP on web-1 from 198.19.0.10 open"
//!   }
//! }
//! ```
//!
//! - `type` is `dev.portcullis.request.` and one of `pending`, `approved`, `granted`,
//!   `denied`, `expired`, `revoked` ([`Kind`]): the request's new phase, or `approved` when
//!   its counted approvals reach the number its policy requires (`status.approvalState`
//!   `N/N`), published before the phase's event when both happen in one reconcile.
//! - `id` is the request's UID and the kind: a request reaches each kind once (phases only
//!   move forward), so the id names the transition, and a delivery repeated after a lost
//!   answer carries the same id for the sink to drop.
//! - `data` comes from the request's spec and the status just written: `requestor` (as
//!   admission stamped it), `policy`, `machines` with their ports (as granted, else as asked:
//!   `protocol` is `null` where the request leaves it to the policy), `source` (the granted
//!   source prefixes, else those asked for), `start` and `end` (RFC 3339, `null` until
//!   known), `reason` (`status.reason`), `approvals` (`status.approvalState`, `-` when the
//!   policy requires none) and `message` (that of the `Granted` condition: the violations
//!   of a denial, what was opened or closed).
//!
//! # Guarantees
//!
//! An event is published after its status write succeeded: a write that failed is retried
//! by the next reconcile and publishes then, once. Delivery is at least once per sink while
//! the operator runs, and at most once across a crash: an operator killed between the
//! status write and the delivery loses that event (the status, the Kubernetes Event and
//! the audit line still record the transition).
//!
//! Publishing never waits: each sink has its own queue ([`QUEUE`] events) and worker, so
//! events to one sink arrive in order, and a slow or dead sink delays neither a grant, an
//! expiry nor the other sinks. A full queue drops its oldest event (counted in
//! `portcullis_notifications_total{result="Dropped"}`): the newest state matters most. Each
//! `POST` has [`TIMEOUT`] to be answered; a connection failure, a timeout, `408`, `429` or
//! a `5xx` is retried after 1, 2, 4 and 8 s ([`ATTEMPTS`] attempts in all), then the event
//! is given up with a warning and counted `Failed`; any other answer but a `2xx` (a sink
//! that refuses the event will refuse it again) is `Failed` at once. On shutdown the
//! workers get a few seconds to deliver what is queued.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::Error;
use super::metrics::{Metrics, NotificationResult};
use crate::api::JitRequest;
use crate::api::conditions;
use crate::api::jit_policy::PolicyProtocol;
use crate::api::jit_request::{JitRequestStatus, Phase};

/// The CloudEvents `source` of every event.
pub const SOURCE: &str = "/portcullis/operator";
/// The prefix of every event's `type`.
pub const TYPE_PREFIX: &str = "dev.portcullis.request.";
/// The media type of a structured-mode CloudEvent in JSON.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// Events waiting per sink: about a megabyte of JSON, far more than a sink that answers
/// ever lets pile up, and a dead one cannot take more memory than that.
pub const QUEUE: usize = 1024;
/// Tries per event before it is given up.
pub const ATTEMPTS: u32 = 5;
/// How long one `POST` may take, connecting included.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The wait before the first retry; it doubles for each next one.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The most of a sink's answer that is read (and thrown away), so the connection is reused.
const ANSWER_LIMIT: usize = 64 * 1024;

/// What happened to a request: the last part of an event's `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pending,
    Approved,
    Granted,
    Denied,
    Expired,
    Revoked,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pending => "pending",
            Kind::Approved => "approved",
            Kind::Granted => "granted",
            Kind::Denied => "denied",
            Kind::Expired => "expired",
            Kind::Revoked => "revoked",
        }
    }
}

impl From<Phase> for Kind {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Pending => Kind::Pending,
            Phase::Granted => Kind::Granted,
            Phase::Denied => Kind::Denied,
            Phase::Expired => Kind::Expired,
            Phase::Revoked => Kind::Revoked,
        }
    }
}

/// The events a status write from `previous` to `status` makes: `approved` when the
/// approvals just became complete, then the new phase, if it changed.
pub fn transitions(previous: &JitRequestStatus, status: &JitRequestStatus) -> Vec<Kind> {
    let mut kinds = Vec::new();
    if approvals_complete(status.approval_state.as_deref())
        && previous.approval_state != status.approval_state
    {
        kinds.push(Kind::Approved);
    }
    if status.phase != previous.phase
        && let Some(phase) = status.phase
    {
        kinds.push(phase.into());
    }
    kinds
}

/// Whether an `approvalState` says every required approval is in: `N/N` with N ≥ 1 (`-`
/// means none was required).
fn approvals_complete(state: Option<&str>) -> bool {
    state
        .and_then(|s| s.split_once('/'))
        .and_then(|(got, needed)| Some((got.parse::<u32>().ok()?, needed.parse::<u32>().ok()?)))
        .is_some_and(|(got, needed)| needed > 0 && got >= needed)
}

/// A CloudEvents 1.0 event in structured mode, as serialized for a sink.
#[derive(Clone, Debug, Serialize)]
pub struct CloudEvent {
    pub specversion: &'static str,
    pub id: String,
    pub source: &'static str,
    #[serde(rename = "type")]
    pub type_: String,
    pub subject: String,
    pub time: String,
    pub datacontenttype: &'static str,
    pub data: RequestData,
}

/// The request an event is about (see the module documentation).
#[derive(Clone, Debug, Serialize)]
pub struct RequestData {
    pub requestor: Option<String>,
    pub policy: String,
    pub machines: Vec<Machine>,
    pub source: Vec<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub reason: Option<String>,
    pub approvals: Option<String>,
    pub message: Option<String>,
}

/// A machine and its ports, as granted or as asked.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Machine {
    pub name: String,
    pub ports: Vec<Port>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Port {
    pub number: u16,
    /// `None` (`null`): asked without a protocol, so the policy's.
    pub protocol: Option<PolicyProtocol>,
}

/// The event `kind` about `request`, whose status is now `status`, made at `now`.
pub fn request_event(
    kind: Kind,
    request: &JitRequest,
    status: &JitRequestStatus,
    now: Timestamp,
) -> CloudEvent {
    let namespace = request.metadata.namespace.as_deref().unwrap_or_default();
    let name = request.metadata.name.as_deref().unwrap_or_default();
    let subject = format!("{namespace}/{name}");
    let id = match request.metadata.uid.as_deref() {
        Some(uid) => format!("{uid}/{}", kind.as_str()),
        None => format!("{subject}/{}", kind.as_str()),
    };
    let (machines, source) = if status.grants.is_empty() {
        asked(request)
    } else {
        granted(status)
    };
    let message = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::GRANTED)
        .map(|c| c.message.clone())
        .filter(|m| !m.is_empty());
    CloudEvent {
        specversion: "1.0",
        id,
        source: SOURCE,
        type_: format!("{TYPE_PREFIX}{}", kind.as_str()),
        subject,
        time: now.to_string(),
        datacontenttype: "application/json",
        data: RequestData {
            requestor: request.spec.requestor.as_ref().map(|r| r.username.clone()),
            policy: request.spec.policy_name.clone(),
            machines,
            source,
            start: status
                .start_time
                .as_ref()
                .or(request.spec.start_time.as_ref())
                .map(|t| t.0.to_string()),
            end: status.expires_at.as_ref().map(|t| t.0.to_string()),
            reason: status.reason.clone(),
            approvals: status.approval_state.clone(),
            message,
        },
    }
}

/// The machines, ports and sources the request asks for.
fn asked(request: &JitRequest) -> (Vec<Machine>, Vec<String>) {
    let mut sources = BTreeSet::new();
    let machines = request
        .spec
        .virtual_machines
        .iter()
        .map(|vm| Machine {
            name: vm.name.clone(),
            ports: vm
                .ports
                .iter()
                .map(|p| {
                    sources.extend(p.allowed_source_address_prefix.iter().cloned());
                    sources.extend(p.allowed_source_address_prefixes.iter().flatten().cloned());
                    Port {
                        number: p.number,
                        protocol: p.protocol,
                    }
                })
                .collect(),
        })
        .collect();
    (machines, sources.into_iter().collect())
}

/// The machines, ports and sources the status records as granted (open or since closed).
fn granted(status: &JitRequestStatus) -> (Vec<Machine>, Vec<String>) {
    let mut machines: Vec<Machine> = Vec::new();
    let mut sources = BTreeSet::new();
    for grant in &status.grants {
        sources.extend(grant.allowed_source_address_prefixes.iter().cloned());
        let port = Port {
            number: grant.number,
            protocol: Some(grant.protocol),
        };
        match machines
            .iter_mut()
            .find(|m| m.name == grant.virtual_machine)
        {
            Some(machine) => machine.ports.push(port),
            None => machines.push(Machine {
                name: grant.virtual_machine.clone(),
                ports: vec![port],
            }),
        }
    }
    (machines, sources.into_iter().collect())
}

/// A validated `--notify-url`: `http` or `https`, with a host. Shown (in logs and in the
/// `sink` label of the metrics) without its query, which may carry a token.
#[derive(Clone, PartialEq, Eq)]
pub struct Sink {
    uri: http::Uri,
    label: String,
}

impl Sink {
    fn tls(&self) -> bool {
        self.uri.scheme() == Some(&http::uri::Scheme::HTTPS)
    }
}

impl FromStr for Sink {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self, Error> {
        let invalid = |why: &str| Error::NotifyUrl {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&format!("not a URL ({e})")))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            Some(_) => return Err(invalid("the scheme must be http or https")),
            None => return Err(invalid("an absolute http:// or https:// URL is needed")),
        }
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid(
                "credentials in the URL are not sent; put a token in the path or query",
            ));
        }
        if authority.host().is_empty() {
            return Err(invalid("no host"));
        }
        let label = format!(
            "{}://{}{}",
            uri.scheme_str().unwrap_or_default(),
            authority,
            uri.path()
        );
        Ok(Self { uri, label })
    }
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// Like [`Display`](fmt::Display): a configuration printed for debugging shows no token.
impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sink({})", self.label)
    }
}

/// One event, serialized once and shared by every sink's queue.
struct Queued {
    id: String,
    type_: String,
    body: Bytes,
}

/// A sink's queue, shared by the publishing side and the sink's worker.
struct Queue {
    sink: Sink,
    events: Mutex<VecDeque<Arc<Queued>>>,
    ready: Notify,
    closed: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Queue {
    fn push(&self, event: Arc<Queued>) {
        let dropped = {
            let mut events = self.events.lock().expect("notification queue lock");
            let dropped = (events.len() >= QUEUE)
                .then(|| events.pop_front())
                .flatten();
            events.push_back(event);
            dropped
        };
        if let Some(dropped) = dropped {
            self.metrics
                .notification(&self.sink.label, NotificationResult::Dropped);
            tracing::debug!(sink = %self.sink, id = %dropped.id, "notification queue full; oldest event dropped");
        }
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<Arc<Queued>> {
        self.events
            .lock()
            .expect("notification queue lock")
            .pop_front()
    }
}

/// The HTTP clients the workers post with: plain HTTP, and HTTPS (with the system's root
/// certificates) when some sink needs it.
#[derive(Clone)]
struct Transport {
    plain: Client<HttpConnector, Full<Bytes>>,
    tls: Option<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>,
}

impl Transport {
    fn new(tls: bool) -> Result<Self, Error> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(TIMEOUT));
        let builder = Client::builder(TokioExecutor::new());
        let tls = if tls {
            let mut inner = http.clone();
            inner.enforce_http(false);
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_native_roots()
                .map_err(Error::NotifyTls)?
                .https_only()
                .enable_http1()
                .wrap_connector(inner);
            Some(builder.build(connector))
        } else {
            None
        };
        Ok(Self {
            plain: builder.build(http),
            tls,
        })
    }

    /// Posts `body` to `sink` and reads the answer, within [`TIMEOUT`].
    async fn post(&self, sink: &Sink, body: Bytes) -> Result<StatusCode, String> {
        let request = http::Request::post(sink.uri.clone())
            .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(
                http::header::USER_AGENT,
                concat!("portcullis/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            // `tls` is there whenever an https sink is (see `Notifier::start`).
            let response = match &self.tls {
                Some(tls) if sink.tls() => tls.request(request).await,
                _ => self.plain.request(request).await,
            }
            .map_err(|e| format!("{e:?}"))?;
            let status = response.status();
            // The answer is not used; reading it lets the connection serve the next event.
            let _ = Limited::new(response.into_body(), ANSWER_LIMIT)
                .collect()
                .await;
            Ok(status)
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
    }
}

/// Publishes events to every configured sink (see the module documentation); with none it
/// does nothing.
pub struct Notifier {
    queues: Vec<Arc<Queue>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Notifier {
    /// Starts one worker per sink on the current runtime. Fails only when an `https` sink
    /// is configured and the system's root certificates cannot be read.
    pub fn start(sinks: &[Sink], metrics: Arc<Metrics>) -> Result<Self, Error> {
        if sinks.is_empty() {
            return Ok(Self {
                queues: Vec::new(),
                workers: Mutex::default(),
            });
        }
        let transport = Transport::new(sinks.iter().any(Sink::tls))?;
        let mut queues = Vec::with_capacity(sinks.len());
        let mut workers = Vec::with_capacity(sinks.len());
        for sink in sinks {
            metrics.notifications_for(&sink.label);
            let queue = Arc::new(Queue {
                sink: sink.clone(),
                events: Mutex::new(VecDeque::new()),
                ready: Notify::new(),
                closed: AtomicBool::new(false),
                metrics: metrics.clone(),
            });
            workers.push(tokio::spawn(deliver(queue.clone(), transport.clone())));
            queues.push(queue);
        }
        Ok(Self {
            queues,
            workers: Mutex::new(workers),
        })
    }

    /// Whether any sink is configured: without one, events need not even be built.
    pub fn enabled(&self) -> bool {
        !self.queues.is_empty()
    }

    /// Queues `event` for every sink; never waits.
    pub fn publish(&self, event: &CloudEvent) {
        if !self.enabled() {
            return;
        }
        let queued = Arc::new(Queued {
            id: event.id.clone(),
            type_: event.type_.clone(),
            body: serde_json::to_vec(event)
                .expect("an event serializes")
                .into(),
        });
        for queue in &self.queues {
            queue.push(queued.clone());
        }
    }

    /// Lets the workers deliver what is queued for up to `grace`, then stops them: for a
    /// shutdown, so a leader that steps down does not lose the events of its last
    /// transitions to a sink that answers.
    pub async fn drain(&self, grace: Duration) {
        for queue in &self.queues {
            queue.closed.store(true, Ordering::SeqCst);
            queue.ready.notify_one();
        }
        let workers = std::mem::take(&mut *self.workers.lock().expect("workers lock"));
        let aborts: Vec<_> = workers.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(grace, futures::future::join_all(workers))
            .await
            .is_err()
        {
            let left: usize = self
                .queues
                .iter()
                .map(|q| q.events.lock().expect("notification queue lock").len())
                .sum();
            tracing::warn!(
                left,
                "notifications not delivered before shutdown; given up"
            );
            aborts.iter().for_each(|a| a.abort());
        }
    }
}

impl Drop for Notifier {
    /// A notifier dropped without [`Notifier::drain`] leaves no worker behind on a runtime
    /// that outlives the operator (tests and benchmarks run several on one).
    fn drop(&mut self) {
        for worker in self.workers.get_mut().expect("workers lock").iter() {
            worker.abort();
        }
    }
}

/// The worker of one sink: delivers its queue in order until it is closed and empty.
async fn deliver(queue: Arc<Queue>, transport: Transport) {
    loop {
        let Some(event) = queue.pop() else {
            if queue.closed.load(Ordering::SeqCst) {
                return;
            }
            queue.ready.notified().await;
            continue;
        };
        let result = send(&queue.sink, &transport, &event).await;
        queue.metrics.notification(&queue.sink.label, result);
    }
}

/// Delivers one event with the retries of the module documentation.
async fn send(sink: &Sink, transport: &Transport, event: &Queued) -> NotificationResult {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let why = match transport.post(sink, event.body.clone()).await {
            Ok(status) if status.is_success() => return NotificationResult::Sent,
            Ok(status) if !retryable(status) => {
                tracing::warn!(%sink, id = %event.id, event_type = %event.type_, %status, "notification refused by the sink; given up");
                return NotificationResult::Failed;
            }
            Ok(status) => format!("answered {status}"),
            Err(why) => why,
        };
        if attempt == ATTEMPTS {
            tracing::warn!(%sink, id = %event.id, event_type = %event.type_, attempts = ATTEMPTS, error = %why, "notification not delivered; given up");
            break;
        }
        tracing::debug!(%sink, id = %event.id, attempt, error = %why, retry_in = ?backoff, "notification not delivered; retrying");
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    NotificationResult::Failed
}

/// Whether an answer says the sink may take the event later: it timed out, is throttling,
/// or failed itself.
fn retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn status(value: Value) -> JitRequestStatus {
        serde_json::from_value(value).unwrap()
    }

    fn request() -> JitRequest {
        serde_json::from_value(json!({
            "apiVersion": "jit.portcullis.dev/v1alpha1",
            "kind": "JitRequest",
            "metadata": {"name": "ask", "namespace": "team", "uid": "u-1"},
            "spec": {
                "policyName": "web",
                "requestor": {"username": "alice", "groups": ["team-web"]},
                "virtualMachines": [
                    {"name": "web-1", "ports": [
                        {"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "198.19.0.10"},
                        {"number": 443, "protocol": "TCP", "duration": "PT1H",
                         "allowedSourceAddressPrefixes": ["198.19.0.0/28", "198.19.0.10"]},
                    ]},
                    {"name": "web-2", "ports": [
                        {"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "198.19.0.10"},
                    ]},
                ],
            },
        }))
        .unwrap()
    }

    fn granted_status() -> JitRequestStatus {
        let grant = |vm: &str, port: u16, state: &str| {
            json!({
                "virtualMachine": vm, "number": port, "protocol": "TCP",
                "allowedSourceAddressPrefixes": ["198.19.0.10"], "rule": format!("jit-allow-{vm}-{port}"),
                "endTime": "2026-05-04T10:00:00Z", "status": state,
            })
        };
        status(json!({
            "phase": "Granted",
            "reason": "AccessGranted",
            "conditions": [{
                "type": "Granted", "status": "True", "reason": "AccessGranted",
                "message": "22/TCP on web-1 from 198.19.0.10 open",
                "lastTransitionTime": "2026-05-04T09:00:00Z",
            }],
            "startTime": "2026-05-04T09:00:00Z",
            "expiresAt": "2026-05-04T10:00:00Z",
            "grants": [grant("web-1", 22, "Initiated"), grant("web-1", 443, "Initiated"), grant("web-2", 22, "Initiated")],
            "approvalState": "2/2",
        }))
    }

    #[test]
    fn each_phase_change_and_completed_approvals_make_events() {
        let none = JitRequestStatus::default();
        let pending = |approvals: &str| {
            status(
                json!({"phase": "Pending", "reason": "AwaitingApproval", "approvalState": approvals}),
            )
        };
        let granted = |approvals: &str| {
            status(
                json!({"phase": "Granted", "reason": "AccessGranted", "approvalState": approvals}),
            )
        };
        let cases = [
            // Asked without an approval step: no `approved`, ever.
            (none.clone(), pending("-"), vec![Kind::Pending]),
            (none.clone(), granted("-"), vec![Kind::Granted]),
            (pending("-"), granted("-"), vec![Kind::Granted]),
            // The last approval and the grant in one reconcile: approved first.
            (
                pending("0/1"),
                granted("1/1"),
                vec![Kind::Approved, Kind::Granted],
            ),
            (
                none.clone(),
                granted("1/1"),
                vec![Kind::Approved, Kind::Granted],
            ),
            // Approvals complete, but waiting for its start: approved now, granted later.
            (pending("1/2"), pending("2/2"), vec![Kind::Approved]),
            (pending("2/2"), granted("2/2"), vec![Kind::Granted]),
            // Neither a partial count nor a status rewrite repeats anything.
            (pending("0/2"), pending("1/2"), vec![]),
            (pending("1/2"), pending("1/2"), vec![]),
            (granted("2/2"), granted("2/2"), vec![]),
            (
                pending("0/1"),
                status(json!({"phase": "Denied", "reason": "Rejected", "approvalState": "0/1"})),
                vec![Kind::Denied],
            ),
            (
                granted("-"),
                status(json!({"phase": "Expired", "reason": "Expired"})),
                vec![Kind::Expired],
            ),
            (
                granted("1/1"),
                status(
                    json!({"phase": "Revoked", "reason": "UserRequested", "approvalState": "1/1"}),
                ),
                vec![Kind::Revoked],
            ),
        ];
        for (previous, now, wanted) in cases {
            assert_eq!(
                transitions(&previous, &now),
                wanted,
                "{previous:?} → {now:?}"
            );
        }
    }

    #[test]
    fn a_granted_request_makes_a_structured_cloudevent() {
        let now: Timestamp = "2026-05-04T09:00:01.5Z".parse().unwrap();
        let event = request_event(Kind::Granted, &request(), &granted_status(), now);
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            json!({
                "specversion": "1.0",
                "id": "u-1/granted",
                "source": "/portcullis/operator",
                "type": "dev.portcullis.request.granted",
                "subject": "team/ask",
                "time": "2026-05-04T09:00:01.5Z",
                "datacontenttype": "application/json",
                "data": {
                    "requestor": "alice",
                    "policy": "web",
                    "machines": [
                        {"name": "web-1", "ports": [{"number": 22, "protocol": "TCP"}, {"number": 443, "protocol": "TCP"}]},
                        {"name": "web-2", "ports": [{"number": 22, "protocol": "TCP"}]},
                    ],
                    "source": ["198.19.0.10"],
                    "start": "2026-05-04T09:00:00Z",
                    "end": "2026-05-04T10:00:00Z",
                    "reason": "AccessGranted",
                    "approvals": "2/2",
                    "message": "22/TCP on web-1 from 198.19.0.10 open",
                },
            })
        );
        // Another transition of the same request has another id; the same one, the same.
        let approved = request_event(Kind::Approved, &request(), &granted_status(), now);
        assert_eq!(approved.id, "u-1/approved");
        assert_eq!(approved.type_, "dev.portcullis.request.approved");
        let again = request_event(
            Kind::Granted,
            &request(),
            &granted_status(),
            Timestamp::now(),
        );
        assert_eq!(again.id, event.id);
    }

    #[test]
    fn a_request_not_granted_describes_what_it_asks() {
        let mut request = request();
        request.spec.start_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-05-05T08:00:00Z".parse().unwrap(),
        ));
        let pending =
            status(json!({"phase": "Pending", "reason": "Scheduled", "approvalState": "-"}));
        let event = request_event(Kind::Pending, &request, &pending, Timestamp::now());
        let data = serde_json::to_value(&event.data).unwrap();
        assert_eq!(
            data["machines"],
            json!([
                // Asked without a protocol: the policy's, so none is claimed here.
                {"name": "web-1", "ports": [{"number": 22, "protocol": null}, {"number": 443, "protocol": "TCP"}]},
                {"name": "web-2", "ports": [{"number": 22, "protocol": null}]},
            ])
        );
        assert_eq!(data["source"], json!(["198.19.0.0/28", "198.19.0.10"]));
        assert_eq!(data["start"], "2026-05-05T08:00:00Z");
        assert_eq!(data["end"], Value::Null);
        assert_eq!(data["reason"], "Scheduled");
        assert_eq!(data["message"], Value::Null);
    }

    #[test]
    fn sinks_are_http_or_https_urls_shown_without_their_query() {
        let sink: Sink = "https://hooks.example:8443/portcullis?token=s3cret"
            .parse()
            .unwrap();
        assert!(sink.tls());
        assert_eq!(sink.to_string(), "https://hooks.example:8443/portcullis");
        assert!(!format!("{sink:?}").contains("s3cret"));
        let plain: Sink = "http://127.0.0.1:9000".parse().unwrap();
        assert!(!plain.tls());
        assert_eq!(plain.to_string(), "http://127.0.0.1:9000/");
        for (bad, why) in [
            ("ftp://hooks.example/", "scheme must be http or https"),
            ("/just/a/path", "absolute"),
            ("hooks.example:80", "absolute"),
            ("https://user:pw@hooks.example/", "credentials"),
            ("http://exa mple/", "not a URL"),
            ("", "not a URL"),
        ] {
            let error = bad.parse::<Sink>().expect_err(bad).to_string();
            assert!(error.contains(why), "{bad:?}: {error}");
        }
    }

    fn queued(id: usize) -> Arc<Queued> {
        Arc::new(Queued {
            id: id.to_string(),
            type_: "dev.portcullis.request.granted".into(),
            body: Bytes::new(),
        })
    }

    fn queue(sink: &str, metrics: Arc<Metrics>) -> Queue {
        Queue {
            sink: sink.parse().unwrap(),
            events: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            metrics,
        }
    }

    #[test]
    fn a_full_queue_drops_its_oldest_event_and_counts_it() {
        let metrics = Arc::new(Metrics::new());
        let queue = queue("http://sink.example/", metrics.clone());
        for id in 0..QUEUE + 2 {
            queue.push(queued(id));
        }
        let left: Vec<String> = std::iter::from_fn(|| queue.pop())
            .map(|q| q.id.clone())
            .collect();
        assert_eq!(left.len(), QUEUE);
        assert_eq!(left.first().map(String::as_str), Some("2"));
        assert_eq!(left.last(), Some(&(QUEUE + 1).to_string()));
        let text = metrics.encode();
        assert!(
            text.contains(
                "portcullis_notifications_total{sink=\"http://sink.example/\",result=\"Dropped\"} 2"
            ),
            "{text}"
        );
    }

    /// A sink on 127.0.0.1 that answers the statuses of `script` in turn (then 200),
    /// recording the content type and body of each POST.
    async fn scripted_sink(script: Vec<u16>) -> (Sink, Arc<Mutex<Vec<(String, Vec<u8>)>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post({
                let seen = seen.clone();
                move |headers: http::HeaderMap, body: Bytes| {
                    let (seen, script) = (seen.clone(), script.clone());
                    async move {
                        let content_type = headers
                            .get(http::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        seen.lock().unwrap().push((content_type, body.to_vec()));
                        let code = script.lock().unwrap().pop_front().unwrap_or(200);
                        StatusCode::from_u16(code).unwrap()
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/hook").parse().unwrap(), seen)
    }

    #[tokio::test]
    async fn delivery_retries_what_may_succeed_later_and_gives_up_on_a_refusal() {
        let transport = Transport::new(false).unwrap();
        let event = Queued {
            id: "u-1/granted".into(),
            type_: "dev.portcullis.request.granted".into(),
            body: Bytes::from_static(br#"{"specversion":"1.0"}"#),
        };
        // Throttled, then failing, then taken: three attempts, one event delivered.
        let (sink, seen) = scripted_sink(vec![429, 503]).await;
        assert_eq!(
            send(&sink, &transport, &event).await,
            NotificationResult::Sent
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3);
        for (content_type, body) in seen {
            assert_eq!(content_type, CONTENT_TYPE);
            assert_eq!(body, event.body.to_vec());
        }
        // Refused: asking again would be refused again.
        let (sink, seen) = scripted_sink(vec![400]).await;
        assert_eq!(
            send(&sink, &transport, &event).await,
            NotificationResult::Failed
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn every_sink_gets_every_event_in_order_and_publishing_never_waits() {
        let metrics = Arc::new(Metrics::new());
        let (working, seen) = scripted_sink(vec![]).await;
        // A sink that takes connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead: Sink = format!("http://{}/", silent.local_addr().unwrap())
            .parse()
            .unwrap();
        let notifier = Notifier::start(&[dead, working.clone()], metrics.clone()).unwrap();
        let started = std::time::Instant::now();
        let kinds = [Kind::Pending, Kind::Approved, Kind::Granted, Kind::Revoked];
        for kind in kinds {
            notifier.publish(&request_event(
                kind,
                &request(),
                &granted_status(),
                Timestamp::now(),
            ));
        }
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "publishing waited"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().len() < kinds.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "the working sink got {:?}",
                seen.lock().unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let types: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| {
                serde_json::from_slice::<Value>(body).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(types, kinds.map(|k| format!("{TYPE_PREFIX}{}", k.as_str())));
        // Stopping gives up on the silent sink within its grace.
        let stopping = std::time::Instant::now();
        notifier.drain(Duration::from_millis(200)).await;
        assert!(stopping.elapsed() < Duration::from_secs(2));
        let text = metrics.encode();
        let sent =
            format!("portcullis_notifications_total{{sink=\"{working}\",result=\"Sent\"}} 4");
        assert!(text.contains(&sent), "{text}");
        drop(silent);
    }
}
