//! The JitApproval controller: tells each approver whether their decision counts.
//!
//! The request controller decides with the same judgement ([`judge`]); this one only writes
//! it where the approver looks, the approval's status. While the request waits, decisions
//! are judged afresh (an approver's role may come or go); once the request is granted or
//! closed, a decision counts exactly when the request recorded it.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::controller::runner::Action;

use super::context::Context;
use super::{Config, Error, name_and_namespace};
use crate::access::approve::{self, Judgement, Verdict};
use crate::api::jit_approval::{APPROVE, JitApprovalStatus};
use crate::api::jit_request::Phase;
use crate::api::{JitApproval, JitRequest};

pub const NAME: &str = "approval";

/// How the approval controller runs.
pub fn config(config: &Config) -> crate::controller::runner::Settings {
    crate::controller::runner::Settings::immediate(config.concurrency.into())
}

/// The judgement of every decision on `request` as of now: the apiserver is asked once per
/// approver whether they may `approve` its policy.
pub async fn judge(
    request: &JitRequest,
    namespace: &str,
    ctx: &Context,
) -> Result<Judgement, Error> {
    judge_asking(request, namespace, ctx, |_| true).await
}

/// [`judge`], asking the apiserver only about the approvers `ask` names and taking the
/// others as allowed. Their verdicts may then be wrong, but the verdicts of those asked
/// about are right: a decision's verdict depends on no other approver's answer (see
/// [`approve::judge`]). One approval's reconcile so asks one question, not one per approver.
async fn judge_asking(
    request: &JitRequest,
    namespace: &str,
    ctx: &Context,
    ask: impl Fn(&str) -> bool,
) -> Result<Judgement, Error> {
    let name = request.metadata.name.as_deref().unwrap_or_default();
    let requestor = request
        .spec
        .requestor
        .as_ref()
        .map(|r| r.username.as_str())
        .unwrap_or_default();
    let approvals = ctx.approvals_of(namespace, name);
    let approvals: Vec<&JitApproval> = approvals.iter().map(Arc::as_ref).collect();
    let mut refusals = BTreeMap::new();
    let mut asked = std::collections::BTreeSet::new();
    for approval in approve::to_authorize(requestor, &approvals) {
        let Some(approver) = &approval.spec.approver else {
            continue;
        };
        if !ask(&approver.username) || !asked.insert(approver.username.clone()) {
            continue;
        }
        if let Some(refusal) = ctx
            .may(approver, APPROVE, namespace, &request.spec.policy_name)
            .await?
        {
            let why = match refusal {
                crate::access::Violation::NotAuthorized { why, .. } => why,
                other => other.to_string(),
            };
            refusals.insert(approver.username.clone(), why);
        }
    }
    Ok(approve::judge(requestor, &approvals, &refusals))
}

pub async fn reconcile(approval: Arc<JitApproval>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (name, namespace) = name_and_namespace(approval.as_ref(), "JitApproval")?;
    let previous = approval.status.clone().unwrap_or_default();
    let approver = approval
        .spec
        .approver
        .as_ref()
        .map_or("(no approver)", |a| a.username.as_str());
    let (counted, reason, message) = match ctx.request(&namespace, &approval.spec.request_name) {
        None => (
            false,
            "RequestNotFound".to_owned(),
            format!(
                "not counted: JitRequest {:?} not found in {namespace}",
                approval.spec.request_name
            ),
        ),
        Some(request) => {
            let phase = request.status.as_ref().and_then(|s| s.phase);
            let requestor = request
                .spec
                .requestor
                .as_ref()
                .map_or("", |r| r.username.as_str());
            if matches!(phase, None | Some(Phase::Pending)) {
                let mine = approval.spec.approver.as_ref().map(|a| a.username.as_str());
                let judged =
                    judge_asking(&request, &namespace, &ctx, |who| Some(who) == mine).await?;
                let verdict = judged
                    .verdicts
                    .get(&name)
                    .cloned()
                    .unwrap_or(Verdict::ApproverMissing);
                (
                    verdict == Verdict::Counted,
                    verdict.reason().to_owned(),
                    verdict.message(approver, requestor, &request.spec.policy_name),
                )
            } else if recorded(&request, &approval) {
                (
                    true,
                    Verdict::Counted.reason().to_owned(),
                    format!("counted by the request, now {phase:?}"),
                )
            } else if previous.reason.is_some() {
                // Judged while the request waited: that verdict stands.
                return Ok(Action::await_change());
            } else {
                (
                    false,
                    "RequestClosed".to_owned(),
                    format!("not counted: the request was already {phase:?}"),
                )
            }
        }
    };
    let status = JitApprovalStatus {
        observed_generation: approval.metadata.generation,
        counted,
        reason: Some(reason),
        message,
    };
    if status != previous {
        ctx.apply_status(approval.as_ref(), &status).await?;
    }
    Ok(Action::await_change())
}

/// Whether `request` recorded `approval`'s decision among those it counted.
fn recorded(request: &JitRequest, approval: &JitApproval) -> bool {
    let Some(approver) = &approval.spec.approver else {
        return false;
    };
    let created = approval.metadata.creation_timestamp.as_ref();
    request.status.iter().flat_map(|s| &s.approvals).any(|r| {
        r.approver == approver.username
            && r.decision == approval.spec.decision
            && Some(&r.time) == created
    })
}
