//! The JitRequest controller: the request lifecycle.
//!
//! `Pending` (policy or NSG not there yet) → `Granted` (allow rules with `expiresAt`) or
//! `Denied` (every violation listed) → `Expired` or `Revoked`. Terminal phases never grant
//! again. Status is the record of what was granted and until when, so a restart at any line
//! neither re-opens nor extends anything: the expiry of a grant whose status write was lost
//! is recovered from its rules' `expiresAt`.
//!
//! This module is the wiring (write of the outcome, its notification); [`finalizer`] says
//! which step a request calls for, [`lifecycle`] decides, [`status`] builds the status a
//! decision leads to, [`audit`] records it.

mod audit;
mod finalizer;
mod lifecycle;
pub mod status;

use std::sync::Arc;

use super::runner::{Action, Settings};
use finalizer::Step;
use jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::context::Context;
use super::metrics::GrantResult;
use super::notify;
use super::{Config, Error, name_and_namespace};
use crate::api::JitRequest;
use crate::api::jit_request::{JitRequestStatus, Phase};
use lifecycle::{cleanup, close_all, evaluate, review, seconds_between};
use status::Outcome;

pub use audit::AUDIT_TARGET;

pub const NAME: &str = "request";
/// Revokes a granted request's rules before the request object disappears.
pub const FINALIZER: &str = crate::api::jit_request::REVOKE_FINALIZER;

/// How the request controller runs.
pub fn config(config: &Config) -> Settings {
    Settings::immediate(config.concurrency.into())
}

pub async fn reconcile(request: Arc<JitRequest>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (name, namespace) = name_and_namespace(request.as_ref(), "JitRequest")?;
    let api: Api<JitRequest> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = async |patch: serde_json::Value| {
        let patch = Patch::Json::<()>(serde_json::from_value(patch).expect("a JSON patch"));
        api.patch(&name, &PatchParams::default(), &patch)
            .await
            .map_err(Error::Finalizer)
    };
    match finalizer::step(&request.metadata, FINALIZER) {
        Step::Apply => apply(&request, &ctx).await,
        // The patch's own watch event wakes the request again.
        Step::Add => {
            patch(finalizer::add(&request.metadata, FINALIZER)).await?;
            Ok(Action::await_change())
        }
        // The finalizer goes only once everything it guards is revoked.
        Step::Cleanup { index } => {
            let action = cleanup(&request, &ctx).await?;
            patch(finalizer::remove(index, FINALIZER)).await?;
            Ok(action)
        }
        Step::Nothing => Ok(Action::await_change()),
    }
}

async fn apply(request: &JitRequest, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.now();
    let (name, namespace) = name_and_namespace(request, "JitRequest")?;
    let previous = request.status.clone().unwrap_or_default();
    let outcome = match previous.phase {
        Some(p) if p.is_terminal() => {
            // Nothing is open once terminal; rules left by a crash mid-revoke go now.
            close_all(request, ctx, &namespace).await?;
            return Ok(Action::await_change());
        }
        Some(Phase::Granted) => review(request, &previous, now, ctx, &namespace, &name).await?,
        _ => evaluate(request, &previous, now, ctx, &namespace, &name).await?,
    };
    finish(request, previous, outcome, ctx).await
}

async fn finish(
    request: &JitRequest,
    previous: JitRequestStatus,
    outcome: Outcome,
    ctx: &Context,
) -> Result<Action, Error> {
    let mut status = outcome.status;
    status.observed_generation = request.metadata.generation;
    if status != previous {
        // Logged before it is recorded: a crash in between repeats the record (with the
        // same start and end), never loses it.
        if status.phase != previous.phase {
            audit::audit(request, &status);
        }
        ctx.apply_status(request, &status).await?;
        // Only after the write: a failed one is retried by the next reconcile, which
        // publishes then, so a transition is published once (see `notify` for a crash).
        if ctx.notifier.enabled() {
            let now = Timestamp::now();
            for kind in notify::transitions(&previous, &status) {
                ctx.notifier
                    .publish(&notify::request_event(kind, request, &status, now));
            }
        }
        if status.phase == Some(Phase::Granted) && previous.phase != Some(Phase::Granted) {
            ctx.metrics.evaluated(GrantResult::Granted);
            if let Some(created) = &request.metadata.creation_timestamp {
                ctx.metrics
                    .grant_latency(seconds_between(created.0, Timestamp::now()));
            }
        }
        if status.phase == Some(Phase::Denied) && previous.phase != Some(Phase::Denied) {
            ctx.metrics.evaluated(GrantResult::Denied);
        }
        for (type_, reason, note) in outcome.events {
            ctx.event(request, type_, reason, reason, note);
        }
    }
    tracing::debug!(
        request = request.metadata.name.as_deref().unwrap_or_default(),
        phase = ?status.phase,
        requeue = ?outcome.requeue,
        "reconciled"
    );
    Ok(outcome
        .requeue
        .map_or_else(Action::await_change, Action::requeue))
}
