//! The status a decision leads to: phase, reason, the `Granted` condition and the summary
//! fields, as pure functions of the grants and the previous status.

use std::collections::BTreeSet;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;

use crate::access::validate::{PortGrant, Violation};
use crate::api::conditions::{self, Decided, reason};
use crate::api::convert::policy_protocol;
use crate::api::jit_policy::{GrantState, GrantStateReason};
use crate::api::jit_request::{GrantStatus, JitRequestStatus, Phase};

/// What one reconcile of a request decides, before it is written.
pub(super) struct Outcome {
    pub(super) status: JitRequestStatus,
    pub(super) events: Vec<(EventType, &'static str, String)>,
    pub(super) requeue: Option<Duration>,
}

/// The phase, reason, condition and summary fields that follow from the grants.
pub(super) fn settle(
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
                    GrantStateReason::Idle => reason::IDLE,
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
    let condition = granted_condition(previous, granted, why, &message, now);
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
            approvals: previous.approvals.clone(),
            approval_state: previous.approval_state.clone(),
        },
        events: Vec::new(),
        requeue: next_end.map(|end| end.duration_since(now).try_into().unwrap_or(Duration::ZERO)),
    }
}

pub(super) fn pending(
    previous: &JitRequestStatus,
    why: &'static str,
    message: String,
    now: Timestamp,
) -> Outcome {
    let condition = granted_condition(previous, false, why, &message, now);
    let changed = previous.reason.as_deref() != Some(why);
    Outcome {
        status: JitRequestStatus {
            phase: Some(Phase::Pending),
            reason: Some(why.to_owned()),
            conditions: vec![condition],
            approvals: previous.approvals.clone(),
            approval_state: previous.approval_state.clone(),
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

pub(super) fn denied(
    previous: &JitRequestStatus,
    violations: &[Violation],
    why: &'static str,
    now: Timestamp,
) -> Outcome {
    let messages: Vec<String> = violations.iter().map(ToString::to_string).collect();
    let message = format!("denied: {}", messages.join("; "));
    let condition = granted_condition(previous, false, why, &message, now);
    Outcome {
        status: JitRequestStatus {
            phase: Some(Phase::Denied),
            reason: Some(why.to_owned()),
            conditions: vec![condition],
            violations: messages,
            approvals: previous.approvals.clone(),
            approval_state: previous.approval_state.clone(),
            ..JitRequestStatus::default()
        },
        events: vec![(EventType::Warning, "Denied", message)],
        requeue: None,
    }
}

/// A request that waited `Pending` for too long: `Expired`, reason `PendingTimeout`; nothing
/// was ever opened.
pub(super) fn pending_timed_out(
    previous: &JitRequestStatus,
    message: String,
    now: Timestamp,
) -> Outcome {
    let why = reason::PENDING_TIMEOUT;
    let condition = granted_condition(previous, false, why, &message, now);
    Outcome {
        status: JitRequestStatus {
            phase: Some(Phase::Expired),
            reason: Some(why.to_owned()),
            conditions: vec![condition],
            approvals: previous.approvals.clone(),
            approval_state: previous.approval_state.clone(),
            ..JitRequestStatus::default()
        },
        events: vec![(EventType::Warning, "Expired", message)],
        requeue: None,
    }
}

/// `22/TCP on web-1 from 198.19.0.10, ...` for messages and events.
pub(super) fn describe(grants: &[GrantStatus]) -> String {
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

/// One port's grant as the status records it: `closed` when it ended before it could open
/// (its end already passed when the rule would have been written).
pub fn grant_status(grant: &PortGrant, rule: String, end: Timestamp, closed: bool) -> GrantStatus {
    GrantStatus {
        virtual_machine: grant.machine.clone(),
        number: grant.number,
        protocol: policy_protocol(grant.protocol),
        allowed_source_address_prefixes: grant
            .sources
            .iter()
            .map(|s| crate::rules::AddressPrefix::Net(*s).to_string())
            .collect(),
        rule,
        end_time: Time(end),
        status: if closed {
            GrantState::Revoked
        } else {
            GrantState::Initiated
        },
        status_reason: closed.then_some(GrantStateReason::Expired),
    }
}

/// The status of a request granted `grants` from `start`, first decided at `now`: exactly
/// what the controller writes, so tools that seed a cluster with grants (the scale bench)
/// produce objects the operator recognizes as its own and leaves alone.
pub fn granted(
    grants: Vec<GrantStatus>,
    start: Time,
    now: Timestamp,
    generation: Option<i64>,
) -> JitRequestStatus {
    let mut status = settle(&JitRequestStatus::default(), grants, Some(start), now).status;
    status.observed_generation = generation;
    status
}

/// The `Granted` condition, keeping its transition time while its status stays.
fn granted_condition(
    previous: &JitRequestStatus,
    status: bool,
    why: &'static str,
    message: &str,
    now: Timestamp,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    Decided {
        type_: conditions::GRANTED,
        status,
        reason: why,
        message: message.to_owned(),
    }
    .into_condition(&previous.conditions, None, &Time(now))
}
