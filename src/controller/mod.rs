//! The operator: four controllers sharing one [`Context`], each driven by [`runner`].
//!
//! - [`nsg`] aggregates inline rules, `SecurityRule` objects and the defaults into each
//!   NSG's effective view, conflicts and exposure;
//! - [`policy`] materializes one deny rule per protected machine and keeps the policy's
//!   status and request history;
//! - [`request`] validates requests, grants allow rules with an expiry, and revokes them;
//! - [`approval`] tells each approver whether their decision on a request counts.
//!
//! The request controller also publishes each step of a request's life as a CloudEvent to
//! the configured sinks ([`notify`]), off the reconcile path.
//!
//! Each controller's primary cache doubles as a lookup store for the others, and one extra
//! reflector caches what the operator reads of `SecurityRule`s ([`cached`]), so hot paths
//! read memory, not the API.

pub mod approval;
pub mod cached;
pub mod context;
mod events;
mod feed;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod notify;
pub mod nsg;
pub mod policy;
pub mod request;
pub mod runner;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::channel::mpsc::UnboundedReceiver;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef};
use kube::{Api, Client};
use tokio::sync::watch;

use index::{ApprovalEntry, NsgEntry, PolicyEntry, ReportEntry, RequestEntry, RuleEntry, Wake};

pub use context::Context;
pub use runner::Action;

/// The field manager (and event reporter) name of everything the operator writes.
pub const MANAGER: &str = "portcullis-controller";

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub http_addr: SocketAddr,
    /// Reconciles in flight per controller: bounded so a burst cannot exhaust the API
    /// server's or the operator's resources.
    pub concurrency: u16,
    /// Run only while holding this lease (several replicas); `None`: always run.
    pub election: Option<leader::Election>,
    /// Where CloudEvents about requests are posted (see [`notify`]); empty: nowhere.
    pub notify: Vec<notify::Sink>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            concurrency: 16,
            election: None,
            notify: Vec::new(),
        }
    }
}

/// Why the operator stopped, or why one reconcile failed (and will be retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the request's revoke finalizer failed.
    #[error("finalizer patch: {0}")]
    Finalizer(#[source] kube::Error),
    /// The rule the operator would write exists and belongs to someone else: it is reported,
    /// never taken over.
    #[error("SecurityRule {rule} already exists and is not {owner}'s: {holder}")]
    RuleConflict {
        rule: String,
        owner: String,
        holder: String,
    },
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    /// Another replica holds the lease now: this one must stop acting at once.
    #[error("lost the lease to another replica")]
    LeadershipLost,
    #[error("{kind} without {field}")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },
    #[error("invalid notification sink {url:?}: {why}")]
    NotifyUrl { url: String, why: String },
    #[error(
        "cannot post notifications over https: cannot load the system's root certificates: {0}"
    )]
    NotifyTls(#[source] std::io::Error),
}

/// What a watched kind is: a namespaced custom resource the caches and controllers can
/// hold and share between tasks.
pub trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// Runs one controller over the shared cache `reader` until `shutdown`, reconciling what
/// `triggers` names (the watches in [`feed`] wake controllers only after the indexes are
/// updated); failures go through [`error_policy`].
///
/// A reconcile whose copy of the object is older than the operator's own last status write
/// to it is skipped (see [`Context::stale`]): the write's watch event is on its way and
/// wakes the object again. Deciding from the older copy would repeat the decision.
async fn drive<K, R, F>(
    name: &'static str,
    reader: reflector::Store<K>,
    triggers: UnboundedReceiver<(ObjectRef<K>, runner::Pace)>,
    settings: runner::Settings,
    reconcile: R,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()>,
) where
    K: Watched,
    R: Fn(Arc<K>, Arc<Context>) -> F,
    F: Future<Output = Result<Action, Error>>,
{
    runner::run(
        reader,
        triggers,
        settings,
        |object: Arc<K>| {
            ctx.metrics.reconciled(name);
            let fresh = (!ctx.stale(object.as_ref()))
                .then(|| (object.clone(), reconcile(object, ctx.clone())));
            let ctx = ctx.clone();
            async move {
                match fresh {
                    Some((object, reconciled)) => reconciled
                        .await
                        .unwrap_or_else(|error| error_policy(name, object.as_ref(), &error, &ctx)),
                    None => Action::await_change(),
                }
            }
        },
        shutdown,
    )
    .await;
}

/// How long a failed reconcile waits before it is retried.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// How soon a reconcile that met a cache one write behind looks again.
const WAIT_AFTER: Duration = Duration::from_millis(250);
/// How long a stopping operator lets the notification workers deliver what is queued.
const NOTIFY_GRACE: Duration = Duration::from_secs(5);

/// The shared error policy: count, log, retry soon. One bad object never stops a watch.
fn error_policy<K>(controller: &'static str, object: &K, error: &Error, ctx: &Context) -> Action
where
    K: kube::Resource,
{
    // The finalizer patch tests the object's current finalizers; a reconcile that ran on
    // a cache one write behind fails that test. Not an error: the cache is about to catch
    // up, so look again soon.
    if let Error::Finalizer(kube::Error::Api(status)) = error
        && (status.code == 422 || status.code == 409)
    {
        tracing::debug!(controller, %error, "stale cache; retrying");
        return Action::requeue(WAIT_AFTER);
    }
    ctx.metrics.reconcile_error(controller);
    tracing::warn!(
        controller,
        namespace = object.meta().namespace.as_deref().unwrap_or_default(),
        name = object.meta().name.as_deref().unwrap_or_default(),
        %error,
        "reconcile failed; retrying"
    );
    Action::requeue(RETRY_AFTER)
}

/// The name and namespace every namespaced object has once stored.
fn name_and_namespace<K: kube::Resource>(
    object: &K,
    kind: &'static str,
) -> Result<(String, String), Error> {
    let name = object.meta().name.clone().ok_or(Error::MissingField {
        kind,
        field: "metadata.name",
    })?;
    let namespace = object.meta().namespace.clone().ok_or(Error::MissingField {
        kind,
        field: "metadata.namespace",
    })?;
    Ok((name, namespace))
}

/// What every watch shares: see [`Feeding::watch`].
struct Feeding<'a> {
    client: &'a Client,
    ctx: &'a Arc<Context>,
    triggers: &'a Arc<feed::Triggers>,
    all_synced: &'a Arc<dyn Fn() + Send + Sync>,
}

impl Feeding<'_> {
    /// The watch of kind `K` into the cache `writer`. Each batch of changes is indexed with
    /// `index` under the index's lock; then the active-grants gauge is set and what the
    /// changes concern is woken.
    fn watch<K: cached::Keep>(
        &self,
        writer: reflector::store::Writer<K::Kept>,
        index: impl Fn(&mut index::Index, &feed::Change<K::Kept>) -> Wake,
    ) -> impl Future<Output = ()> {
        let (ctx, triggers) = (self.ctx.clone(), self.triggers.clone());
        let changed = move |changes: Vec<feed::Change<K::Kept>>| {
            for change in &changes {
                if let feed::Change::Deleted((namespace, name), _) = change {
                    ctx.forget_written::<K>(namespace, name);
                }
            }
            let mut wake = Wake::default();
            let granted = {
                let mut locked = ctx.index.lock().expect("index lock");
                for change in &changes {
                    wake.merge(index(&mut locked, change));
                }
                locked.granted()
            };
            ctx.metrics.set_active_grants(granted as i64);
            triggers.wake(wake);
        };
        feed::watch(
            Api::<K>::all(self.client.clone()),
            writer,
            self.triggers.clone(),
            changed,
            self.all_synced.clone(),
        )
    }
}

/// Runs the controllers until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let shutdown = shutdown.shared();
    let metrics = Arc::new(metrics::Metrics::new());
    let (ready_tx, ready_rx) = watch::channel(false);
    let http = server::serve(
        config.http_addr,
        metrics.clone(),
        ready_rx,
        shutdown.clone(),
    )
    .await
    .map_err(|source| Error::Http {
        addr: config.http_addr,
        source,
    })?;

    let mut campaign = match &config.election {
        Some(election) => {
            let mut campaign = leader::Campaign::start(client.clone(), election).await?;
            // A standby is ready: it is doing its job, and a rollout must not wait for it.
            let _ = ready_tx.send(true);
            tracing::info!(identity = %election.identity, lease = %election.lease, "standing by");
            tokio::select! {
                _ = campaign.won() => {}
                _ = shutdown.clone() => {
                    campaign.resign().await;
                    let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
                    return Ok(());
                }
            }
            tracing::info!(identity = %election.identity, "leading");
            Some(campaign)
        }
        None => None,
    };
    metrics.set_leader(true);

    let (nsg_tx, nsg_rx) = futures::channel::mpsc::unbounded();
    let (policy_tx, policy_rx) = futures::channel::mpsc::unbounded();
    let (request_tx, request_rx) = futures::channel::mpsc::unbounded();
    let (approval_tx, approval_rx) = futures::channel::mpsc::unbounded();
    let triggers = Arc::new(feed::Triggers::new(
        nsg_tx,
        policy_tx,
        request_tx,
        approval_tx,
    ));
    let (nsgs, nsg_writer) = reflector::store();
    let (policies, policy_writer) = reflector::store();
    let (requests, request_writer) = reflector::store();
    let (rules, rule_writer) = reflector::store();
    let (approvals, approval_writer) = reflector::store();
    let (reports, report_writer) = reflector::store();
    let stores = context::Stores {
        nsgs,
        policies,
        requests,
        rules,
        approvals,
        reports,
    };
    let notifier = notify::Notifier::start(&config.notify, metrics.clone())?;
    let ctx = Arc::new(Context::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
        metrics.clone(),
        stores.clone(),
        notifier,
    ));
    let all_synced: Arc<dyn Fn() + Send + Sync> = {
        let (triggers, stores) = (triggers.clone(), stores.clone());
        Arc::new(move || {
            triggers.open(
                &stores.nsgs,
                &stores.policies,
                &stores.requests,
                &stores.approvals,
            );
            let _ = ready_tx.send(true);
            tracing::info!("caches synced; reconciling");
        })
    };
    let feed = Feeding {
        client: &client,
        ctx: &ctx,
        triggers: &triggers,
        all_synced: &all_synced,
    };
    let feeds = futures::future::join5(
        feed.watch::<crate::api::NetworkSecurityGroup>(nsg_writer, {
            let views = ctx.clone();
            move |index, change| {
                if let feed::Change::Deleted((namespace, name), _) = change {
                    views.forget_view(namespace, name);
                }
                let (key, entry) = change.entry(NsgEntry::of);
                index.nsg(key, entry)
            }
        }),
        feed.watch::<crate::api::JitPolicy>(policy_writer, |index, change| {
            let (key, entry) = change.entry(PolicyEntry::of);
            index.policy(key, entry)
        }),
        feed.watch::<crate::api::JitRequest>(request_writer, {
            let departed = ctx.departed.clone();
            move |index, change| {
                match change {
                    feed::Change::Applied(request) | feed::Change::Deleted(_, Some(request)) => {
                        departed.note(request)
                    }
                    feed::Change::Deleted(_, None) => {}
                }
                let (key, entry) = change.entry(RequestEntry::of);
                index.request(key, entry)
            }
        }),
        feed.watch::<crate::api::SecurityRule>(rule_writer, |index, change| {
            let (key, entry) = change.entry(RuleEntry::of);
            index.rule(key, entry)
        }),
        feed.watch::<crate::api::JitApproval>(approval_writer, |index, change| {
            let (key, entry) = change.entry(ApprovalEntry::of);
            index.approval(key, entry)
        }),
    );
    let feeds = futures::future::join(
        feeds,
        feed.watch::<crate::api::AgentReport>(report_writer, |index, change| {
            let (key, entry) = change.entry(ReportEntry::of);
            index.report(key, entry.flatten())
        }),
    );

    let controllers = futures::future::join4(
        drive(
            nsg::NAME,
            stores.nsgs.clone(),
            nsg_rx,
            nsg::config(&config),
            nsg::reconcile,
            ctx.clone(),
            shutdown.clone(),
        ),
        drive(
            policy::NAME,
            stores.policies.clone(),
            policy_rx,
            policy::config(&config),
            policy::reconcile,
            ctx.clone(),
            shutdown.clone(),
        ),
        drive(
            request::NAME,
            stores.requests.clone(),
            request_rx,
            request::config(&config),
            request::reconcile,
            ctx.clone(),
            shutdown.clone(),
        ),
        drive(
            approval::NAME,
            stores.approvals.clone(),
            approval_rx,
            approval::config(&config),
            approval::reconcile,
            ctx.clone(),
            shutdown.clone(),
        ),
    );
    let outcome = tokio::select! {
        _ = controllers => Ok(()),
        _ = feeds => Ok(()),
        _ = async {
            match campaign.as_mut() {
                Some(campaign) => campaign.lost().await,
                None => std::future::pending().await,
            }
        } => Err(Error::LeadershipLost),
        _ = shutdown.clone() => Ok(()),
    };
    metrics.set_leader(false);
    if let Some(campaign) = campaign {
        campaign.resign().await;
    }
    let _ = tokio::join!(
        ctx.notifier.drain(NOTIFY_GRACE),
        tokio::time::timeout(Duration::from_secs(5), http)
    );
    tracing::info!("operator stopped");
    outcome
}
