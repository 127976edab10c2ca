//! What a reconcile decides for a request: grant, wait or deny one not granted yet; close
//! what expired, was superseded or is no longer allowed; revoke on deletion.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::controller::runner::Action;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource;
use kube::runtime::events::EventType;

use super::finish;
use super::status::{Outcome, denied, describe, grant_status, pending, pending_timed_out, settle};
use crate::access::approve::{Judgement, Tally};
use crate::access::materialize;
use crate::access::validate::MAX_START_AHEAD;
use crate::access::validate::{PortGrant, Violation, validate};
use crate::api::INITIATE;
use crate::api::JitPolicy;
use crate::api::JitRequest;
use crate::api::conditions::reason;
use crate::api::convert::policy_protocol;
use crate::api::jit_policy::DEFAULT_PENDING_TIMEOUT;
use crate::api::jit_policy::{GrantState, GrantStateReason, PolicyProtocol};
use crate::api::jit_request::{JitRequestStatus, Phase};
use crate::controller::approval;
use crate::controller::context::Context;
use crate::controller::{Error, name_and_namespace};
use crate::rules::duration;
use crate::rules::{PortRange, place};
use std::sync::Arc;

/// Deletes every rule `request` controls.
pub(super) async fn close_all(
    request: &JitRequest,
    ctx: &Context,
    namespace: &str,
) -> Result<(), Error> {
    let uid = request.metadata.uid.as_deref().unwrap_or_default();
    for rule in ctx.rules_owned_by(namespace, uid) {
        ctx.delete_rule(namespace, &rule.name).await?;
    }
    Ok(())
}

/// A request not granted yet: wait, deny, or grant. A request still waiting when its
/// policy's `pendingTimeout` has passed since it was made (or since its `startTime`) ends
/// `Expired`; a waiting one looks again at that deadline at the latest.
pub(super) async fn evaluate(
    request: &JitRequest,
    previous: &JitRequestStatus,
    now: Timestamp,
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Outcome, Error> {
    let policy = ctx.policy(namespace, &request.spec.policy_name);
    let timeout = pending_timeout(policy.as_deref());
    let made = request
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(now, |t| t.0);
    let waiting_since = request
        .spec
        .start_time
        .as_ref()
        .map_or(made, |start| made.max(start.0));
    let deadline = waiting_since
        .checked_add(jiff::SignedDuration::try_from(timeout).unwrap_or(jiff::SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX);
    if request.spec.requestor.is_some() && now >= deadline {
        let waited_for = previous.reason.as_deref().unwrap_or("its evaluation");
        return Ok(pending_timed_out(
            previous,
            format!(
                "still pending after {} (waiting for {waited_for}); the policy's pendingTimeout has passed",
                duration::format(timeout)
            ),
            now,
        ));
    }
    let mut outcome = decide(request, previous, policy, now, ctx, namespace, name).await?;
    if outcome.status.phase == Some(Phase::Pending) {
        let left = Duration::try_from(deadline.duration_since(now)).unwrap_or(Duration::ZERO);
        outcome.requeue = Some(outcome.requeue.map_or(left, |r| r.min(left)));
    }
    Ok(outcome)
}

/// The policy's `pendingTimeout`, or the default when there is no policy (yet) or it says
/// nothing readable.
fn pending_timeout(policy: Option<&JitPolicy>) -> Duration {
    let default = || duration::parse(DEFAULT_PENDING_TIMEOUT).expect("a valid default");
    policy
        .and_then(|p| p.spec.pending_timeout.as_deref())
        .and_then(|t| duration::parse(t).ok())
        .unwrap_or_else(default)
}

/// [`evaluate`] once the request is known to be within its wait.
async fn decide(
    request: &JitRequest,
    previous: &JitRequestStatus,
    policy: Option<Arc<JitPolicy>>,
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
    let Some(policy) = policy else {
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
    let starts = request.spec.start_time.as_ref().map(|t| t.0);
    let grants = match (
        validate(&policy.spec, &request.spec),
        too_far_ahead(request),
    ) {
        (Ok(grants), None) => grants,
        (Ok(_), Some(late)) => {
            return Ok(denied(previous, &[late], reason::POLICY_VIOLATION, now));
        }
        (Err(mut violations), late) => {
            violations.extend(late);
            return Ok(denied(previous, &violations, reason::POLICY_VIOLATION, now));
        }
    };
    // Approvals may come before a scheduled start; one counted rejection ends it at once.
    let needed = policy
        .spec
        .approval
        .as_ref()
        .map_or(0, |a| usize::from(a.approvals_required));
    let judged = if needed > 0 {
        Some(approval::judge(request, namespace, ctx).await?)
    } else {
        None
    };
    let with_approvals = |mut outcome: Outcome| {
        // Always a value, so `kubectl get` rows keep their columns: `-` for no approval step.
        outcome.status.approval_state = Some("-".to_owned());
        if let Some(judged) = &judged {
            let approved = match judged.tally {
                Tally::Approved(n) => n,
                Tally::Rejected { .. } => 0,
            };
            outcome.status.approvals = judged.records.clone();
            outcome.status.approval_state = Some(format!("{}/{needed}", approved.min(needed)));
        }
        outcome
    };
    if let Some(Judgement {
        tally: Tally::Rejected { approver, comment },
        ..
    }) = &judged
    {
        let rejected = Violation::Rejected {
            approver: approver.clone(),
            comment: comment.clone(),
        };
        return Ok(with_approvals(denied(
            previous,
            &[rejected],
            reason::REJECTED,
            now,
        )));
    }
    if let Some(start) = starts.filter(|start| *start > now) {
        let mut outcome = pending(
            previous,
            reason::SCHEDULED,
            format!("scheduled: access begins at {start}"),
            now,
        );
        outcome.requeue =
            Some(Duration::try_from(start.duration_since(now)).unwrap_or(Duration::ZERO));
        return Ok(with_approvals(outcome));
    }
    if let Some(Judgement {
        tally: Tally::Approved(approved),
        ..
    }) = &judged
        && *approved < needed
    {
        return Ok(with_approvals(pending(
            previous,
            reason::AWAITING_APPROVAL,
            format!(
                "{approved} of {needed} approvals; waiting for approvers with the verb approve on jitpolicies/{}",
                request.spec.policy_name
            ),
            now,
        )));
    }
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
            let rule = owned.iter().find(|r| r.name == rule_name)?;
            let expires = rule.spec.expires_at.as_ref()?.0;
            expires
                .checked_sub(jiff::SignedDuration::try_from(grant.duration).ok()?)
                .ok()
        })
        .min()
        // A scheduled grant starts at its start, however late this reconcile runs, so it
        // also ends on time.
        .unwrap_or_else(|| whole_second(starts.filter(|s| *s <= now).unwrap_or(now)));

    let owner = owner_ref(request)?;
    let mut grants_opened = Vec::with_capacity(placed.len());
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
        grants_opened.push(grant_status(grant, rule.name, end, closed));
    }
    let who = requestor(request).unwrap_or("unknown requestor").to_owned();
    let mut outcome = with_approvals(settle(previous, grants_opened, Some(Time(start)), now));
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

/// A `startTime` more than [`MAX_START_AHEAD`] after the request was made.
fn too_far_ahead(request: &JitRequest) -> Option<Violation> {
    let start = request.spec.start_time.as_ref()?.0;
    let made = request.metadata.creation_timestamp.as_ref()?.0;
    let limit = made
        .checked_add(jiff::SignedDuration::try_from(MAX_START_AHEAD).ok()?)
        .ok()?;
    (start > limit).then(|| Violation::StartTooFarAhead {
        start: start.to_string(),
        created: made.to_string(),
    })
}

/// A granted request: close what expired, was superseded or is no longer allowed.
pub(super) async fn review(
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
        } else if current.is_some_and(|p| {
            // Only where the policy asks for an idle limit: an agent's report is trusted
            // to say a grant was silent, not to end grants the policy lets stay silent.
            p.idle_timeout.is_some()
                && ctx.reported_idle(namespace, &p.network_security_group, &grant.rule, p.address)
        }) {
            Some(GrantStateReason::Idle)
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
pub(super) async fn cleanup(request: &JitRequest, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.now();
    let (_, namespace) = name_and_namespace(request, "JitRequest")?;
    close_all(request, ctx, &namespace).await?;
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

/// The open grants of `request` that newer granted requests by the same requestor also
/// hold: `(machine, port, protocol)`. The source does not matter (the SPEC's contract: the
/// same requestor, machine and port), so a requestor who moves extends from the new place.
fn newer_grants(
    request: &JitRequest,
    ctx: &Context,
    namespace: &str,
) -> BTreeSet<(String, u16, PolicyProtocol)> {
    let Some(me) = requestor(request) else {
        return BTreeSet::new();
    };
    let mine = order_key(request);
    let open = request
        .status
        .iter()
        .flat_map(|s| &s.grants)
        .filter(|g| g.status == GrantState::Initiated);
    let mut newer = BTreeSet::new();
    for grant in open {
        let held = ctx
            .granted_on(namespace, me, &grant.virtual_machine, grant.number)
            .into_iter()
            .filter(|r| r.spec.policy_name == request.spec.policy_name)
            .filter(|r| phase(r) == Some(Phase::Granted) && order_key(r) > mine)
            .any(|r| {
                r.status.iter().flat_map(|s| &s.grants).any(|g| {
                    g.status == GrantState::Initiated
                        && g.virtual_machine == grant.virtual_machine
                        && g.number == grant.number
                        && g.protocol == grant.protocol
                })
            });
        if held {
            newer.insert((grant.virtual_machine.clone(), grant.number, grant.protocol));
        }
    }
    newer
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
pub(super) fn end_of(start: Timestamp, duration: Duration) -> Timestamp {
    let end = jiff::SignedDuration::try_from(duration)
        .ok()
        .and_then(|d| start.checked_add(d).ok())
        .unwrap_or(start);
    whole_second(end)
}

/// `at` truncated to the second.
pub(super) fn whole_second(at: Timestamp) -> Timestamp {
    Timestamp::from_second(at.as_second()).unwrap_or(at)
}

pub(super) fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64()
}

fn phase(request: &JitRequest) -> Option<Phase> {
    request.status.as_ref().and_then(|s| s.phase)
}

pub(super) fn requestor(request: &JitRequest) -> Option<&str> {
    request.spec.requestor.as_ref().map(|r| r.username.as_str())
}
