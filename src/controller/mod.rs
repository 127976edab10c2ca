//! The operator: three kube-runtime controllers sharing one [`Context`].
//!
//! - [`nsg`] aggregates inline rules, `SecurityRule` objects and the defaults into each
//!   NSG's effective view, conflicts and exposure;
//! - [`policy`] materializes one deny rule per protected machine and keeps the policy's
//!   status and request history;
//! - [`request`] validates requests, grants allow rules with an expiry, and revokes them.
//!
//! Each controller's primary cache doubles as a lookup store for the others, and one extra
//! reflector caches `SecurityRule`s, so hot paths read memory, not the API.

pub mod context;
pub mod metrics;
pub mod nsg;
pub mod policy;
pub mod request;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kube::runtime::events::Reporter;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

pub use context::Context;

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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            concurrency: 16,
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
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Not a failure: the reconcile must wait for another controller (retried soon, quietly).
    #[error("waiting: {0}")]
    Waiting(String),
    /// The rule the operator would write exists and belongs to someone else: it is reported,
    /// never taken over.
    #[error("SecurityRule {rule} already exists and is not {owner}'s: {holder}")]
    RuleConflict {
        rule: String,
        owner: String,
        holder: String,
    },
    #[error("{kind} without {field}")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },
}

/// A controller whose cache keeps objects without `managedFields`: server-side apply makes
/// them the bulk of every object the operator writes, no reconciler reads them, and with
/// thousands of grants they would dominate the operator's memory.
fn lean_controller<K>(api: Api<K>) -> kube::runtime::Controller<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let objects = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(strip_managed_fields)
        .reflect(writer)
        .applied_objects();
    kube::runtime::Controller::for_stream(objects, reader)
}

fn strip_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Runs one controller until `shutdown`, with what every controller shares: reconciles
/// wait until all caches are synced (a partial view would act on a missing policy or rule),
/// and failures go through [`error_policy`].
async fn drive<K, R, F>(
    name: &'static str,
    controller: kube::runtime::Controller<K>,
    reconcile: R,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    R: Fn(Arc<K>, Arc<Context>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<kube::runtime::controller::Action, Error>> + Send + 'static,
{
    controller
        .graceful_shutdown_on(shutdown)
        .run(
            move |object, ctx| {
                let gated = ctx.synced().then(|| reconcile(object, ctx));
                async move {
                    match gated {
                        Some(reconciled) => reconciled.await,
                        None => Ok(until_synced()),
                    }
                }
            },
            move |object, error, ctx| error_policy(name, object.as_ref(), error, &ctx),
            ctx,
        )
        .for_each(|_| std::future::ready(()))
        .await;
}

/// How often the active-grants gauge is recounted.
const ACTIVE_GRANTS_EVERY: Duration = Duration::from_secs(2);

/// How long a failed reconcile waits before it is retried.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// How long a reconcile that runs before the caches are synced waits before it retries.
const UNSYNCED_RETRY: Duration = Duration::from_millis(100);

/// The action of a reconcile that came before the caches were complete.
fn until_synced() -> kube::runtime::controller::Action {
    kube::runtime::controller::Action::requeue(UNSYNCED_RETRY)
}

/// How long a reconcile that waits on another controller waits before it looks again.
const WAIT_AFTER: Duration = Duration::from_millis(250);

/// The shared error policy: count, log, retry soon. One bad object never stops a watch.
fn error_policy<K>(
    controller: &'static str,
    object: &K,
    error: &Error,
    ctx: &Context,
) -> kube::runtime::controller::Action
where
    K: kube::Resource,
{
    use kube::runtime::finalizer::Error as Finalizer;
    if let Error::Finalizer(inner) = error {
        match inner.as_ref() {
            Finalizer::CleanupFailed(Error::Waiting(why)) => {
                tracing::debug!(controller, why, "waiting");
                return kube::runtime::controller::Action::requeue(WAIT_AFTER);
            }
            // The finalizer patch tests the object's current finalizers; a reconcile that
            // ran on a cache one write behind fails that test. Not an error: the cache is
            // about to catch up, so look again soon.
            Finalizer::AddFinalizer(kube::Error::Api(status))
            | Finalizer::RemoveFinalizer(kube::Error::Api(status))
                if status.code == 422 || status.code == 409 =>
            {
                tracing::debug!(controller, %error, "stale cache; retrying");
                return kube::runtime::controller::Action::requeue(WAIT_AFTER);
            }
            _ => {}
        }
    }
    ctx.metrics.reconcile_error(controller);
    tracing::warn!(
        controller,
        namespace = object.meta().namespace.as_deref().unwrap_or_default(),
        name = object.meta().name.as_deref().unwrap_or_default(),
        %error,
        "reconcile failed; retrying"
    );
    kube::runtime::controller::Action::requeue(RETRY_AFTER)
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

    let (rules, rules_writer) = reflector::store();
    let rules_reflector = reflector(
        rules_writer,
        watcher(Api::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(strip_managed_fields),
    )
    .for_each(|_| std::future::ready(()));

    let changes = context::RecentChanges::default();
    let nsg_controller = nsg::controller(&client, &config, changes.clone());
    let departed = policy::Departed::default();
    let policy_controller = policy::controller(&client, &config, changes.clone(), departed.clone());
    let request_controller = request::controller(&client, &config, changes.clone());
    let ctx = Arc::new(Context::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
        metrics,
        context::Stores {
            nsgs: nsg_controller.store(),
            policies: policy_controller.store(),
            requests: request_controller.store(),
            rules,
        },
        changes,
        departed,
    ));

    let readiness_and_gauges = {
        let ctx = ctx.clone();
        async move {
            ctx.wait_synced().await;
            let _ = ready_tx.send(true);
            tracing::info!("caches synced; reconciling");
            // The active-grants gauge is a count over the request cache: recounted here on a
            // timer, not on every reconcile, where it would be a scan on the hot path.
            let mut tick = tokio::time::interval(ACTIVE_GRANTS_EVERY);
            loop {
                tick.tick().await;
                let active = ctx
                    .stores
                    .requests
                    .state()
                    .iter()
                    .filter(|r| {
                        r.status.as_ref().and_then(|s| s.phase)
                            == Some(crate::api::jit_request::Phase::Granted)
                    })
                    .count();
                ctx.metrics.set_active_grants(active as i64);
            }
        }
    };
    let controllers = futures::future::join3(
        drive(
            nsg::NAME,
            nsg_controller,
            nsg::reconcile,
            ctx.clone(),
            shutdown.clone(),
        ),
        drive(
            policy::NAME,
            policy_controller,
            policy::reconcile,
            ctx.clone(),
            shutdown.clone(),
        ),
        drive(
            request::NAME,
            request_controller,
            request::reconcile,
            ctx.clone(),
            shutdown.clone(),
        ),
    );
    tokio::select! {
        _ = controllers => {}
        _ = rules_reflector => {}
        _ = readiness_and_gauges => {}
        _ = shutdown.clone() => {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
    tracing::info!("operator stopped");
    Ok(())
}
