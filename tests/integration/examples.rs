//! The README's walkthrough: the `examples/` manifests apply as written and show up under
//! the `portcullis` category.

use std::path::Path;

use portcullis::api::jit_request::Phase;
use portcullis::testenv::APPROVERS;

use crate::support::{Ctx, TestResult, eventually, succeeded};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        examples_apply_and_list_under_the_category,
        the_approval_walkthrough_grants_after_two_approvers,
    ]
}

async fn examples_apply_and_list_under_the_category(ctx: Ctx) -> TestResult {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    succeeded(&ctx.kubectl(&["apply", "-f", &examples.display().to_string()]))?;
    let listed = succeeded(&ctx.kubectl(&["get", "portcullis"]))?;
    for expected in [
        "networksecuritygroup.jit.portcullis.dev/web-nsg",
        "jitpolicy.jit.portcullis.dev/web",
        "jitrequest.jit.portcullis.dev/ssh-web-1",
    ] {
        if !listed.contains(expected) {
            return Err(format!("`kubectl get portcullis` lacks {expected}:\n{listed}").into());
        }
    }
    let columns = succeeded(&ctx.kubectl(&["get", "jitr"]))?;
    let header = columns.lines().next().unwrap_or_default();
    for column in ["POLICY", "REQUESTOR", "PHASE", "SOURCE", "EXPIRES", "AGE"] {
        if !header.contains(column) {
            return Err(format!("`kubectl get jitr` lacks the {column} column:\n{columns}").into());
        }
    }
    Ok(())
}

/// The README's approval example, command by command: alice's request waits for two
/// approvals and is granted once bob and carol approve.
async fn the_approval_walkthrough_grants_after_two_approvers(ctx: Ctx) -> TestResult {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let file = |name: &str| examples.join(name).display().to_string();
    succeeded(&ctx.kubectl(&["apply", "-f", &file("nsg.yaml")]))?;
    succeeded(&ctx.kubectl(&["apply", "-f", &file("approvals/jitpolicy.yaml")]))?;
    succeeded(&ctx.kubectl_impersonating(
        "alice",
        &["team-web"],
        &["apply", "-f", &file("jitrequest.yaml")],
        None,
    ))?;
    let requests: kube::Api<portcullis::api::JitRequest> = ctx.api();
    eventually("0/2 approvals", || async {
        let status = requests.get_opt("ssh-web-1").await.ok().flatten()?.status?;
        (status.approval_state.as_deref() == Some("0/2")).then_some(())
    })
    .await?;
    for approver in ["bob", "carol"] {
        let approval = format!(
            "apiVersion: jit.portcullis.dev/v1alpha1\nkind: JitApproval\n\
             metadata: {{name: ssh-web-1-{approver}}}\n\
             spec: {{requestName: ssh-web-1, decision: Approve, comment: \"ticket 42\"}}\n"
        );
        succeeded(&ctx.apply_as(approver, &[APPROVERS], &approval))?;
    }
    ctx.phase_of("ssh-web-1", Phase::Granted).await?;
    let listed = succeeded(&ctx.kubectl(&["get", "jita"]))?;
    if listed
        .lines()
        .skip(1)
        .filter(|l| l.contains("true"))
        .count()
        != 2
    {
        return Err(format!("both approvals should count:\n{listed}").into());
    }
    Ok(())
}
