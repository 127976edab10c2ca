//! The JitRequest controller: the request lifecycle.
//!
//! `Pending` (policy or NSG not there yet) → `Granted` (allow rules with `expiresAt`) or
//! `Denied` (every violation listed) → `Expired` or `Revoked`. Terminal phases never grant
//! again. Status is the record of what was granted and until when, so a restart at any line
//! neither re-opens nor extends anything: the expiry of a grant whose status write was lost
//! is recovered from its rules' `expiresAt`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource};

use super::context::Context;
use super::metrics::GrantResult;
use super::{Config, Error, name_and_namespace};
use crate::access::materialize;
use crate::access::validate::{PortGrant, Violation, validate};
use crate::api::INITIATE;
use crate::api::JitRequest;
use crate::api::conditions::{self, Decided, reason};
use crate::api::convert::policy_protocol;
use crate::api::jit_policy::{GrantState, GrantStateReason, PolicyProtocol};
use crate::api::jit_request::{GrantStatus, JitRequestStatus, Phase};
use crate::rules::{PortRange, place};

pub const NAME: &str = "request";
/// Revokes a granted request's rules before the request object disappears.
pub const FINALIZER: &str = crate::api::jit_request::REVOKE_FINALIZER;

/// How the request controller runs.
pub fn config(config: &Config) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(config.concurrency)
}

pub async fn reconcile(request: Arc<JitRequest>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (_, namespace) = name_and_namespace(request.as_ref(), "JitRequest")?;
    let api: Api<JitRequest> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, request, |event| async {
        match event {
            Finalizer::Apply(request) => apply(&request, &ctx).await,
            Finalizer::Cleanup(request) => cleanup(&request, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// What one reconcile of a request decides, before it is written.
struct Outcome {
    status: JitRequestStatus,
    events: Vec<(EventType, &'static str, String)>,
    requeue: Option<Duration>,
}

async fn apply(request: &JitRequest, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.now();
    let (name, namespace) = name_and_namespace(request, "JitRequest")?;
    let previous = request.status.clone().unwrap_or_default();
    let outcome = match previous.phase {
        Some(p) if p.is_terminal() => {
            // Nothing is open once terminal; rules left by a crash mid-revoke go now.
            for rule in ctx.rules_owned_by(
                &namespace,
                request.metadata.uid.as_deref().unwrap_or_default(),
            ) {
                ctx.delete_rule(
                    &namespace,
                    rule.metadata.name.as_deref().unwrap_or_default(),
                )
                .await?;
            }
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
            audit(request, &status);
        }
        ctx.apply_status(
            request,
            serde_json::to_value(&status).expect("status serializes"),
        )
        .await?;
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

/// A request not granted yet: wait, deny, or grant.
async fn evaluate(
    request: &JitRequest,
    previous: &JitRequestStatus,
    now: Timestamp,
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Outcome, Error> {
    let Some(recorded) = &request.spec.requestor else {
        return Ok(denied(
            previous,
            &[Violation::RequestorMissing],
            reason::REQUESTOR_MISSING,
            now,
        ));
    };
    let Some(policy) = ctx.policy(namespace, &request.spec.policy_name) else {
        return Ok(pending(
            previous,
            reason::POLICY_NOT_FOUND,
            format!(
                "JitPolicy {:?} not found in {namespace}; waiting for it",
                request.spec.policy_name
            ),
            now,
        ));
    };
    let grants = match validate(&policy.spec, &request.spec) {
        Ok(grants) => grants,
        Err(violations) => return Ok(denied(previous, &violations, reason::POLICY_VIOLATION, now)),
    };
    let mut placed = Vec::with_capacity(grants.len());
    for grant in grants {
        match allow_priority(ctx, namespace, &grant, now) {
            Ok(priority) => placed.push((grant, priority)),
            Err((why, message)) => return Ok(pending(previous, why, message, now)),
        }
    }
    // Admission checked the caller when the request was created; the request may have
    // waited since, so the requestor is authorized again now, just before anything opens.
    if let Some(refusal) = ctx
        .may(recorded, INITIATE, namespace, &request.spec.policy_name)
        .await?
    {
        return Ok(denied(previous, &[refusal], reason::NOT_AUTHORIZED, now));
    }

    // A lost status write leaves the rules as the only record of when the grant started.
    let owned = ctx.rules_owned_by(
        namespace,
        request.metadata.uid.as_deref().unwrap_or_default(),
    );
    let start = placed
        .iter()
        .filter_map(|(grant, _)| {
            let rule_name = allow_name(request, name, grant);
            let rule = owned
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(rule_name.as_str()))?;
            let expires = rule.spec.expires_at.as_ref()?.0;
            expires
                .checked_sub(jiff::SignedDuration::try_from(grant.duration).ok()?)
                .ok()
        })
        .min()
        .unwrap_or_else(|| whole_second(now));

    let owner = owner_ref(request)?;
    let mut grant_status = Vec::with_capacity(placed.len());
    for (grant, priority) in &placed {
        let end = end_of(start, grant.duration);
        let rule = materialize::allow_rule(
            rule_owner(request, name),
            &request.spec.policy_name,
            grant,
            *priority,
            end,
        );
        let closed = end <= now;
        if closed {
            ctx.delete_rule(namespace, &rule.name).await?;
        } else {
            match ctx.ensure_rule(namespace, &rule, owner.clone()).await {
                Ok(_) => {}
                Err(conflict @ Error::RuleConflict { .. }) => {
                    return Ok(pending(
                        previous,
                        reason::RULE_CONFLICT,
                        conflict.to_string(),
                        now,
                    ));
                }
                Err(error) => return Err(error),
            }
        }
        grant_status.push(GrantStatus {
            virtual_machine: grant.machine.clone(),
            number: grant.number,
            protocol: policy_protocol(grant.protocol),
            allowed_source_address_prefixes: grant
                .sources
                .iter()
                .map(|s| crate::rules::AddressPrefix::Net(*s).to_string())
                .collect(),
            rule: rule.name,
            end_time: Time(end),
            status: if closed {
                GrantState::Revoked
            } else {
                GrantState::Initiated
            },
            status_reason: closed.then_some(GrantStateReason::Expired),
        });
    }
    let who = requestor(request).unwrap_or("unknown requestor").to_owned();
    let mut outcome = settle(previous, grant_status, Some(Time(start)), now);
    if outcome.status.phase == Some(Phase::Granted) {
        let what = describe(&outcome.status.grants);
        let until = outcome
            .status
            .expires_at
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        let why = request
            .spec
            .justification
            .as_deref()
            .unwrap_or("no justification given");
        outcome.events.insert(
            0,
            (
                EventType::Normal,
                "Granted",
                format!("{who} granted {what} until {until}: {why}"),
            ),
        );
    }
    Ok(outcome)
}

/// A granted request: close what expired, was superseded or is no longer allowed.
async fn review(
    request: &JitRequest,
    previous: &JitRequestStatus,
    now: Timestamp,
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Outcome, Error> {
    let still_allowed: Option<Vec<PortGrant>> = ctx
        .policy(namespace, &request.spec.policy_name)
        .and_then(|policy| validate(&policy.spec, &request.spec).ok());
    let newer = newer_grants(request, ctx, namespace);
    let owner = owner_ref(request)?;
    let mut grants = previous.grants.clone();
    for grant in grants
        .iter_mut()
        .filter(|g| g.status == GrantState::Initiated)
    {
        let current = still_allowed.as_ref().and_then(|all| {
            all.iter().find(|p| {
                p.machine == grant.virtual_machine
                    && p.number == grant.number
                    && policy_protocol(p.protocol) == grant.protocol
            })
        });
        let close = if grant.end_time.0 <= now {
            Some(GrantStateReason::Expired)
        } else if current.is_none() {
            Some(GrantStateReason::PolicyChanged)
        } else if newer.contains(&(grant.virtual_machine.clone(), grant.number, grant.protocol)) {
            Some(GrantStateReason::NewerRequestInitiated)
        } else {
            None
        };
        match (close, current) {
            (Some(why), _) => {
                ctx.delete_rule(namespace, &grant.rule).await?;
                if why == GrantStateReason::Expired {
                    ctx.metrics
                        .revoke_lateness(seconds_between(grant.end_time.0, Timestamp::now()));
                }
                grant.status = GrantState::Revoked;
                grant.status_reason = Some(why);
            }
            (None, Some(allowed)) => {
                // Still open: make sure its rule is there and placed right (a rule deleted
                // by hand comes back until the grant ends; deleting the request revokes).
                let priority = match allow_priority(ctx, namespace, allowed, now) {
                    Ok(priority) => priority,
                    Err(_) => continue,
                };
                let rule = materialize::allow_rule(
                    rule_owner(request, name),
                    &request.spec.policy_name,
                    allowed,
                    priority,
                    grant.end_time.0,
                );
                ctx.ensure_rule(namespace, &rule, owner.clone()).await?;
            }
            (None, None) => {}
        }
    }
    let mut outcome = settle(previous, grants, previous.start_time.clone(), now);
    if let Some(Phase::Expired | Phase::Revoked) = outcome.status.phase {
        let who = requestor(request).unwrap_or("unknown requestor");
        let what = describe(&previous.grants);
        let reason = outcome.status.reason.clone().unwrap_or_default();
        let (event_reason, type_) = if outcome.status.phase == Some(Phase::Expired) {
            ("Expired", EventType::Normal)
        } else {
            ("Revoked", EventType::Normal)
        };
        outcome.events.push((
            type_,
            event_reason,
            format!("access of {who} to {what} closed: {reason}"),
        ));
    }
    Ok(outcome)
}

/// Deletion: rules go before the object does, and the revocation is recorded (status, Event,
/// audit line). Nothing else is waited for: the policy's history is bounded and may never
/// show this request, so the lasting record is the Event and the audit line.
async fn cleanup(request: &JitRequest, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.now();
    let (_, namespace) = name_and_namespace(request, "JitRequest")?;
    for rule in ctx.rules_owned_by(
        &namespace,
        request.metadata.uid.as_deref().unwrap_or_default(),
    ) {
        ctx.delete_rule(
            &namespace,
            rule.metadata.name.as_deref().unwrap_or_default(),
        )
        .await?;
    }
    let previous = request.status.clone().unwrap_or_default();
    if previous.phase == Some(Phase::Granted) {
        let mut grants = previous.grants.clone();
        for grant in grants
            .iter_mut()
            .filter(|g| g.status == GrantState::Initiated)
        {
            grant.status = GrantState::Revoked;
            grant.status_reason = Some(GrantStateReason::UserRequested);
        }
        let mut outcome = settle(&previous, grants, previous.start_time.clone(), now);
        outcome.events.push((
            EventType::Normal,
            "Revoked",
            format!(
                "access of {} to {} revoked: the request was deleted",
                requestor(request).unwrap_or("unknown requestor"),
                describe(&previous.grants)
            ),
        ));
        finish(request, previous.clone(), outcome, ctx).await?;
    }
    Ok(Action::await_change())
}

/// The log target of decision records: one line per decision and port, with everything an
/// auditor asks (who, under which policy, what, from where, from when until when, why), for
/// a log pipeline to keep after the request object and its Events are gone.
pub const AUDIT_TARGET: &str = "portcullis::audit";

/// Writes the decision records for a request that just reached `status.phase`.
fn audit(request: &JitRequest, status: &JitRequestStatus) {
    let Some(phase) = status.phase else { return };
    let namespace = request.metadata.namespace.as_deref().unwrap_or_default();
    let name = request.metadata.name.as_deref().unwrap_or_default();
    let requestor = requestor(request).unwrap_or_default();
    let policy = request.spec.policy_name.as_str();
    let reason = status.reason.as_deref().unwrap_or_default();
    let start = status.start_time.as_ref().map(|t| t.0.to_string());
    if status.grants.is_empty() {
        tracing::info!(
            target: AUDIT_TARGET,
            decision = ?phase, namespace, request = name, requestor, policy, reason,
            violations = %status.violations.join("; "),
            "access decision"
        );
    }
    for grant in &status.grants {
        tracing::info!(
            target: AUDIT_TARGET,
            decision = ?phase, namespace, request = name, requestor, policy,
            machine = %grant.virtual_machine, port = grant.number, protocol = ?grant.protocol,
            source = %grant.allowed_source_address_prefixes.join(","),
            start = start.as_deref().unwrap_or_default(), end = %grant.end_time.0,
            reason = grant.status_reason.map_or(reason.to_owned(), |r| format!("{r:?}")),
            "access decision"
        );
    }
}

/// The phase, reason, condition and summary fields that follow from the grants.
fn settle(
    previous: &JitRequestStatus,
    grants: Vec<GrantStatus>,
    start_time: Option<Time>,
    now: Timestamp,
) -> Outcome {
    let open: Vec<&GrantStatus> = grants
        .iter()
        .filter(|g| g.status == GrantState::Initiated)
        .collect();
    let (phase, why, message, granted) = if !open.is_empty() {
        (
            Phase::Granted,
            reason::ACCESS_GRANTED,
            format!("{} open", describe(&grants)),
            true,
        )
    } else {
        let reasons: BTreeSet<GrantStateReason> =
            grants.iter().filter_map(|g| g.status_reason).collect();
        let revoked = reasons.iter().find(|r| **r != GrantStateReason::Expired);
        match revoked {
            None => (
                Phase::Expired,
                reason::EXPIRED,
                "access expired".to_owned(),
                false,
            ),
            Some(r) => {
                let why = match r {
                    GrantStateReason::UserRequested => reason::USER_REQUESTED,
                    GrantStateReason::NewerRequestInitiated => reason::NEWER_REQUEST_INITIATED,
                    _ => reason::POLICY_CHANGED,
                };
                (Phase::Revoked, why, format!("access revoked: {why}"), false)
            }
        }
    };
    let expires_at = open
        .iter()
        .map(|g| g.end_time.0)
        .max()
        .or_else(|| grants.iter().map(|g| g.end_time.0).max());
    let next_end = open.iter().map(|g| g.end_time.0).min();
    let sources: BTreeSet<String> = grants
        .iter()
        .flat_map(|g| g.allowed_source_address_prefixes.clone())
        .collect();
    let condition = Decided {
        type_: conditions::GRANTED,
        status: granted,
        reason: why,
        message: message.clone(),
    }
    .into_condition(&previous.conditions, None, &Time(now));
    Outcome {
        status: JitRequestStatus {
            observed_generation: None,
            phase: Some(phase),
            reason: Some(why.to_owned()),
            conditions: vec![condition],
            violations: Vec::new(),
            start_time,
            expires_at: expires_at.map(Time),
            source: (!sources.is_empty())
                .then(|| sources.into_iter().collect::<Vec<_>>().join(",")),
            grants,
        },
        events: Vec::new(),
        requeue: next_end.map(|end| end.duration_since(now).try_into().unwrap_or(Duration::ZERO)),
    }
}

fn pending(
    previous: &JitRequestStatus,
    why: &'static str,
    message: String,
    now: Timestamp,
) -> Outcome {
    let condition = Decided {
        type_: conditions::GRANTED,
        status: false,
        reason: why,
        message: message.clone(),
    }
    .into_condition(&previous.conditions, None, &Time(now));
    let changed = previous.reason.as_deref() != Some(why);
    Outcome {
        status: JitRequestStatus {
            phase: Some(Phase::Pending),
            reason: Some(why.to_owned()),
            conditions: vec![condition],
            ..JitRequestStatus::default()
        },
        events: if changed {
            vec![(EventType::Normal, "Pending", message)]
        } else {
            Vec::new()
        },
        requeue: None,
    }
}

fn denied(
    previous: &JitRequestStatus,
    violations: &[Violation],
    why: &'static str,
    now: Timestamp,
) -> Outcome {
    let messages: Vec<String> = violations.iter().map(ToString::to_string).collect();
    let message = format!("denied: {}", messages.join("; "));
    let condition = Decided {
        type_: conditions::GRANTED,
        status: false,
        reason: why,
        message: message.clone(),
    }
    .into_condition(&previous.conditions, None, &Time(now));
    Outcome {
        status: JitRequestStatus {
            phase: Some(Phase::Denied),
            reason: Some(why.to_owned()),
            conditions: vec![condition],
            violations: messages,
            ..JitRequestStatus::default()
        },
        events: vec![(EventType::Warning, "Denied", message)],
        requeue: None,
    }
}

/// The grants of newer granted requests by the same requestor: `(machine, port, protocol)`.
fn newer_grants(
    request: &JitRequest,
    ctx: &Context,
    namespace: &str,
) -> BTreeSet<(String, u16, PolicyProtocol)> {
    let Some(me) = requestor(request) else {
        return BTreeSet::new();
    };
    let mine = order_key(request);
    ctx.stores
        .requests
        .state()
        .iter()
        .filter(|r| r.metadata.namespace.as_deref() == Some(namespace))
        .filter(|r| r.spec.policy_name == request.spec.policy_name && requestor(r) == Some(me))
        .filter(|r| phase(r) == Some(Phase::Granted) && order_key(r) > mine)
        .flat_map(|r| {
            r.status
                .iter()
                .flat_map(|s| s.grants.clone())
                .collect::<Vec<_>>()
        })
        .filter(|g| g.status == GrantState::Initiated)
        .map(|g| (g.virtual_machine, g.number, g.protocol))
        .collect()
}

/// Which of two requests is newer: start of access, then creation, then name.
fn order_key(request: &JitRequest) -> (Option<Timestamp>, Option<Timestamp>, String) {
    (
        request
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0),
        request.metadata.creation_timestamp.as_ref().map(|t| t.0),
        request.metadata.name.clone().unwrap_or_default(),
    )
}

/// The allow band's priority in the grant's NSG, or why there is none yet.
fn allow_priority(
    ctx: &Context,
    namespace: &str,
    grant: &PortGrant,
    now: Timestamp,
) -> Result<u32, (&'static str, String)> {
    let Some(nsg) = ctx.nsg(namespace, &grant.network_security_group) else {
        return Err((
            reason::NSG_NOT_FOUND,
            format!(
                "NetworkSecurityGroup {:?} not found in {namespace}; waiting for it",
                grant.network_security_group
            ),
        ));
    };
    let view = ctx.nsg_view(&nsg, now);
    place(
        &view.user_rules,
        grant.address,
        &[(PortRange::single(grant.number), grant.protocol)],
        &view.scope,
    )
    .map(|p| p.allow)
    .map_err(|e| (reason::NO_PRIORITY_AVAILABLE, e.to_string()))
}

fn allow_name(request: &JitRequest, name: &str, grant: &PortGrant) -> String {
    materialize::allow_rule_name(
        rule_owner(request, name),
        &grant.machine,
        grant.number,
        grant.protocol,
    )
}

/// The request as the owner of its allow rules (see [`materialize::Owner`]).
fn rule_owner<'a>(request: &'a JitRequest, name: &'a str) -> materialize::Owner<'a> {
    materialize::Owner {
        name,
        uid: request.metadata.uid.as_deref().unwrap_or_default(),
    }
}

fn owner_ref(
    request: &JitRequest,
) -> Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference, Error> {
    request
        .controller_owner_ref(&())
        .ok_or(Error::MissingField {
            kind: "JitRequest",
            field: "metadata.uid",
        })
}

/// When a grant that started at `start` ends, on a whole second: the API stores times to
/// the second, and the stored `expiresAt` must be exactly when access closes (it is what
/// agents give the kernel and what users read), never later.
fn end_of(start: Timestamp, duration: Duration) -> Timestamp {
    let end = jiff::SignedDuration::try_from(duration)
        .ok()
        .and_then(|d| start.checked_add(d).ok())
        .unwrap_or(start);
    whole_second(end)
}

/// `at` truncated to the second.
fn whole_second(at: Timestamp) -> Timestamp {
    Timestamp::from_second(at.as_second()).unwrap_or(at)
}

fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64()
}

/// `22/TCP on web-1 from 198.19.0.10, ...` for messages and events.
fn describe(grants: &[GrantStatus]) -> String {
    grants
        .iter()
        .map(|g| {
            let protocol = serde_json::to_value(g.protocol)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            format!(
                "{}/{} on {} from {}",
                g.number,
                protocol,
                g.virtual_machine,
                g.allowed_source_address_prefixes.join(",")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn phase(request: &JitRequest) -> Option<Phase> {
    request.status.as_ref().and_then(|s| s.phase)
}

fn requestor(request: &JitRequest) -> Option<&str> {
    request.spec.requestor.as_ref().map(|r| r.username.as_str())
}
