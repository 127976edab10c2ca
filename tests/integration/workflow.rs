//! The request workflow beyond Azure: approvals by distinct authorized approvers (never the
//! requestor), a rejection that denies, pending requests that time out, and scheduled
//! grants. Every identity acts by impersonation with exactly the RBAC the test binds.

use jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use portcullis::api::jit_request::Phase;
use portcullis::api::{JitApproval, JitRequest};
use portcullis::testenv::APPROVERS;

use crate::support::{
    Ctx, TestResult, approver_binding, eventually, ssh_policy, succeeded, web_nsg,
};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        two_distinct_authorized_approvers_grant,
        one_rejection_denies_with_its_comment,
        a_pending_request_expires_at_its_pending_timeout,
        a_scheduled_request_opens_at_its_start_for_its_duration,
        a_start_more_than_a_week_ahead_is_denied,
        an_approval_stops_counting_when_its_approver_loses_the_role,
    ]
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The NSG and policy `web` with `extra` policy fields (at spec level, two-space indent).
fn setup(ctx: &Ctx, extra: &str) -> Result<(), Error> {
    succeeded(&ctx.apply(&web_nsg("198.19.0.0/28", "")))?;
    let policy = ssh_policy("198.19.0.0/16", "").replacen("spec:\n", &format!("spec:\n{extra}"), 1);
    succeeded(&ctx.apply(&policy))?;
    Ok(())
}

/// Alice's request for SSH on web-1, with `more` spec fields.
fn request(name: &str, duration: &str, more: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: JitRequest
metadata:
  name: {name}
spec:
  policyName: web
  justification: deploy
{more}  virtualMachines:
  - name: web-1
    ports:
    - number: 22
      duration: {duration}
      allowedSourceAddressPrefix: 198.19.0.10
"#
    )
}

fn approval(name: &str, request: &str, decision: &str, comment: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: JitApproval
metadata:
  name: {name}
spec:
  requestName: {request}
  decision: {decision}
  comment: {comment}
"#
    )
}

/// Binds, in the test's namespace, `portcullis-approver` to user alice (so that she could
/// approve others' requests, and her own is refused on its merits, not by RBAC), and a role
/// that may only create approvals to group `hopefuls`.
fn bind_roles(ctx: &Ctx) -> Result<(), Error> {
    succeeded(&ctx.apply(&approver_binding("alice")))?;
    succeeded(&ctx.apply(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: approval-writer
rules:
- apiGroups: ["jit.portcullis.dev"]
  resources: ["jitapprovals"]
  verbs: ["create", "get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: hopefuls-write-approvals
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: approval-writer}
subjects:
- {kind: Group, apiGroup: rbac.authorization.k8s.io, name: hopefuls}
"#,
    ))?;
    Ok(())
}

/// The approval's (counted, reason) once the operator has judged it.
async fn judged(ctx: &Ctx, name: &str) -> Result<(bool, String), Error> {
    let approvals: Api<JitApproval> = ctx.api();
    Ok(eventually(&format!("jita/{name} to be judged"), || async {
        let status = approvals.get_opt(name).await.ok().flatten()?.status?;
        Some((status.counted, status.reason?))
    })
    .await?)
}

/// The request once its phase and reason are these.
async fn until_reason(
    ctx: &Ctx,
    name: &str,
    phase: Phase,
    reason: &str,
) -> Result<JitRequest, Error> {
    let requests: Api<JitRequest> = ctx.api();
    Ok(
        eventually(&format!("jitr/{name} to be {phase:?}/{reason}"), || async {
            let request = requests.get_opt(name).await.ok().flatten()?;
            let status = request.status.as_ref()?;
            (status.phase == Some(phase) && status.reason.as_deref() == Some(reason))
                .then_some(request)
        })
        .await?,
    )
}

async fn two_distinct_authorized_approvers_grant(ctx: Ctx) -> TestResult {
    setup(&ctx, "  approval:\n    approvalsRequired: 2\n")?;
    bind_roles(&ctx)?;
    succeeded(&ctx.apply_as("alice", &["team-web"], &request("ask", "PT10M", "")))?;
    let waiting = until_reason(&ctx, "ask", Phase::Pending, "AwaitingApproval").await?;
    assert_eq!(
        waiting.status.and_then(|s| s.approval_state).as_deref(),
        Some("0/2")
    );
    // Her own approval, one by somebody without `approve`, and a forged approver: none
    // counts, and the request still waits.
    succeeded(&ctx.apply_as(
        "alice",
        &["team-web"],
        &approval("self", "ask", "Approve", "me"),
    ))?;
    succeeded(&ctx.apply_as(
        "mallory",
        &["hopefuls"],
        &approval("mallory", "ask", "Approve", "trust-me"),
    ))?;
    let forged = approval("forged", "ask", "Approve", "x") + "  approver:\n    username: carol\n";
    let refused = ctx.apply_as("mallory", &["hopefuls"], &forged);
    if refused.status.success()
        || !String::from_utf8_lossy(&refused.stderr).contains("must be the caller")
    {
        return Err(format!("a forged approver was not refused: {refused:?}").into());
    }
    assert_eq!(judged(&ctx, "self").await?, (false, "SelfApproval".into()));
    assert_eq!(
        judged(&ctx, "mallory").await?,
        (false, "NotAuthorized".into())
    );
    // Bob approves twice: one approval.
    succeeded(&ctx.apply_as(
        "bob",
        &[APPROVERS],
        &approval("bob-1", "ask", "Approve", "ok"),
    ))?;
    succeeded(&ctx.apply_as(
        "bob",
        &[APPROVERS],
        &approval("bob-2", "ask", "Approve", "again"),
    ))?;
    assert_eq!(judged(&ctx, "bob-1").await?, (true, "Counted".into()));
    assert_eq!(
        judged(&ctx, "bob-2").await?,
        (false, "DuplicateApprover".into())
    );
    let requests: Api<JitRequest> = ctx.api();
    eventually("1/2 approvals", || async {
        let status = requests.get_opt("ask").await.ok().flatten()?.status?;
        (status.approval_state.as_deref() == Some("1/2") && status.phase == Some(Phase::Pending))
            .then_some(())
    })
    .await?;
    // Carol's makes two distinct approvers: granted, both recorded.
    succeeded(&ctx.apply_as(
        "carol",
        &[APPROVERS],
        &approval("carol", "ask", "Approve", "fine"),
    ))?;
    let granted = ctx.phase_of("ask", Phase::Granted).await?;
    let status = granted.status.unwrap_or_default();
    let approvers: Vec<&str> = status
        .approvals
        .iter()
        .map(|a| a.approver.as_str())
        .collect();
    assert_eq!(approvers, ["bob", "carol"]);
    assert_eq!(status.approval_state.as_deref(), Some("2/2"));
    // What `kubectl get` shows.
    let table = succeeded(&ctx.kubectl(&["get", "jitr", "ask"]))?;
    assert!(
        table.contains("APPROVALS") && table.contains("2/2"),
        "{table}"
    );
    let table = succeeded(&ctx.kubectl(&["get", "jita"]))?;
    assert!(
        table.contains("COUNTED") && table.contains("carol"),
        "{table}"
    );
    Ok(())
}

async fn one_rejection_denies_with_its_comment(ctx: Ctx) -> TestResult {
    setup(&ctx, "  approval:\n    approvalsRequired: 1\n")?;
    bind_roles(&ctx)?;
    succeeded(&ctx.apply_as("alice", &["team-web"], &request("ask", "PT10M", "")))?;
    until_reason(&ctx, "ask", Phase::Pending, "AwaitingApproval").await?;
    // An unauthorized rejection changes nothing; an approver's denies.
    succeeded(&ctx.apply_as(
        "mallory",
        &["hopefuls"],
        &approval("mallory", "ask", "Reject", "spite"),
    ))?;
    assert_eq!(
        judged(&ctx, "mallory").await?,
        (false, "NotAuthorized".into())
    );
    succeeded(&ctx.apply_as(
        "carol",
        &[APPROVERS],
        &approval("carol-rejects", "ask", "Reject", "change-freeze-this-week"),
    ))?;
    let denied = until_reason(&ctx, "ask", Phase::Denied, "Rejected").await?;
    let status = denied.status.unwrap_or_default();
    let message = status.violations.join("; ");
    assert!(
        message.contains("carol") && message.contains("change-freeze-this-week"),
        "{message}"
    );
    Ok(())
}

async fn a_pending_request_expires_at_its_pending_timeout(ctx: Ctx) -> TestResult {
    setup(
        &ctx,
        "  pendingTimeout: PT4S\n  approval:\n    approvalsRequired: 1\n",
    )?;
    succeeded(&ctx.apply_as("alice", &["team-web"], &request("ask", "PT10M", "")))?;
    until_reason(&ctx, "ask", Phase::Pending, "AwaitingApproval").await?;
    let expired = until_reason(&ctx, "ask", Phase::Expired, "PendingTimeout").await?;
    let created = expired
        .metadata
        .creation_timestamp
        .as_ref()
        .ok_or("no creation time")?
        .0;
    let waited = Timestamp::now().duration_since(created);
    if waited < SignedDuration::from_secs(4) {
        return Err(format!("expired after {waited:#}, before its pendingTimeout").into());
    }
    // Closed for good: a late approval does not revive it.
    succeeded(&ctx.apply_as(
        "carol",
        &[APPROVERS],
        &approval("late", "ask", "Approve", "sorry"),
    ))?;
    assert_eq!(judged(&ctx, "late").await?, (false, "RequestClosed".into()));
    let requests: Api<JitRequest> = ctx.api();
    let after = requests.get("ask").await?.status.unwrap_or_default();
    assert_eq!(after.phase, Some(Phase::Expired));
    Ok(())
}

async fn a_scheduled_request_opens_at_its_start_for_its_duration(ctx: Ctx) -> TestResult {
    // A short pendingTimeout: the wait for the start must not count against it.
    setup(
        &ctx,
        "  pendingTimeout: PT3S\n  approval:\n    approvalsRequired: 1\n",
    )?;
    let start = Timestamp::from_second(Timestamp::now().as_second() + 8)?;
    succeeded(&ctx.apply_as(
        "alice",
        &["team-web"],
        &request("later", "PT4S", &format!("  startTime: \"{start}\"\n")),
    ))?;
    until_reason(&ctx, "later", Phase::Pending, "Scheduled").await?;
    // Approved before its start: it still waits for the start.
    succeeded(&ctx.apply_as(
        "carol",
        &[APPROVERS],
        &approval("ok", "later", "Approve", "go"),
    ))?;
    assert_eq!(judged(&ctx, "ok").await?, (true, "Counted".into()));
    let requests: Api<JitRequest> = ctx.api();
    let still = requests.get("later").await?.status.unwrap_or_default();
    if Timestamp::now() < start && still.phase != Some(Phase::Pending) {
        return Err(format!("granted before its start: {still:?}").into());
    }
    let granted = ctx.phase_of("later", Phase::Granted).await?;
    let opened = Timestamp::now();
    let status = granted.status.unwrap_or_default();
    assert_eq!(status.start_time.as_ref().map(|t| t.0), Some(start));
    assert_eq!(
        status.expires_at.as_ref().map(|t| t.0),
        Some(start + SignedDuration::from_secs(4))
    );
    let late = opened.duration_since(start);
    if late > SignedDuration::from_secs(2) {
        return Err(format!("opened {late:#} after its start").into());
    }
    let rules: Vec<_> = crate::support::allow_rules(
        &ctx.api::<portcullis::api::SecurityRule>()
            .list(&Default::default())
            .await?
            .items,
    )
    .into_iter()
    .filter_map(|r| r.spec.expires_at.clone())
    .collect();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].0, start + SignedDuration::from_secs(4));
    let expired = ctx.phase_of("later", Phase::Expired).await?;
    assert_eq!(
        expired.status.and_then(|s| s.reason).as_deref(),
        Some("Expired")
    );
    Ok(())
}

async fn a_start_more_than_a_week_ahead_is_denied(ctx: Ctx) -> TestResult {
    setup(&ctx, "")?;
    let start = Timestamp::now() + SignedDuration::from_hours(8 * 24);
    let start = Timestamp::from_second(start.as_second())?;
    succeeded(&ctx.apply_as(
        "alice",
        &["team-web"],
        &request("far", "PT10M", &format!("  startTime: \"{start}\"\n")),
    ))?;
    let denied = until_reason(&ctx, "far", Phase::Denied, "PolicyViolation").await?;
    let violations = denied.status.unwrap_or_default().violations.join("; ");
    assert!(violations.contains("more than 7 days"), "{violations}");
    Ok(())
}

/// Approvals are judged again at every evaluation: one whose approver lost `approve`
/// since counts no more, so a request cannot be pushed through with an old decision, and
/// the approval's status says so.
async fn an_approval_stops_counting_when_its_approver_loses_the_role(ctx: Ctx) -> TestResult {
    setup(&ctx, "  approval:\n    approvalsRequired: 2\n")?;
    bind_roles(&ctx)?;
    succeeded(&ctx.apply(&approver_binding("dave")))?;
    succeeded(&ctx.apply_as("alice", &["team-web"], &request("ask", "PT10M", "")))?;
    until_reason(&ctx, "ask", Phase::Pending, "AwaitingApproval").await?;
    succeeded(&ctx.apply_as("dave", &[], &approval("dave", "ask", "Approve", "ok")))?;
    assert_eq!(judged(&ctx, "dave").await?, (true, "Counted".into()));
    succeeded(&ctx.kubectl(&["delete", "rolebinding", "dave-approves"]))?;
    succeeded(&ctx.apply_as(
        "carol",
        &[APPROVERS],
        &approval("carol", "ask", "Approve", "ok"),
    ))?;
    assert_eq!(judged(&ctx, "carol").await?, (true, "Counted".into()));
    let requests: Api<JitRequest> = ctx.api();
    eventually("the request to count carol alone", || async {
        let status = requests.get_opt("ask").await.ok().flatten()?.status?;
        let approvers: Vec<&str> = status
            .approvals
            .iter()
            .map(|a| a.approver.as_str())
            .collect();
        (approvers == ["carol"] && status.phase == Some(Phase::Pending)).then_some(())
    })
    .await?;
    // Dave is told too: his approval's own status no longer says it counts.
    let approvals: Api<JitApproval> = ctx.api();
    eventually("dave's approval to say it no longer counts", || async {
        let status = approvals.get_opt("dave").await.ok().flatten()?.status?;
        (!status.counted && status.reason.as_deref() == Some("NotAuthorized")).then_some(())
    })
    .await?;
    Ok(())
}
