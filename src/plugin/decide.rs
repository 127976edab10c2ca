//! `approve`, `reject` and `revoke`: decisions on others' requests and the end of one's own.

use std::time::{Duration, Instant};

use kube::api::{DeleteParams, PostParams};
use serde_json::json;

use super::{Error, Outcome, Session, output};
use crate::api::{JitApproval, JitRequest};

/// How long `approve`/`reject` waits for the operator's verdict on the decision.
const VERDICT_WAIT: Duration = Duration::from_secs(15);

/// Creates the user's decision on request `name` and reports whether it counts.
pub async fn decide(
    session: &Session,
    name: &str,
    decision: &str,
    comment: Option<String>,
) -> Result<Outcome, Error> {
    // A clear error for a typo, before an approval of nothing is created.
    session.api::<JitRequest>().get(name).await?;
    let mut spec = json!({"requestName": name, "decision": decision});
    if let Some(comment) = comment {
        spec["comment"] = json!(comment);
    }
    let approval: JitApproval = serde_json::from_value(json!({
        "apiVersion": "jit.portcullis.dev/v1alpha1",
        "kind": "JitApproval",
        "metadata": {"generateName": format!("{name}-")},
        "spec": spec,
    }))
    .map_err(|e| Error::Usage(e.to_string()))?;
    let approvals = session.api::<JitApproval>();
    let created = approvals.create(&PostParams::default(), &approval).await?;
    let approval_name = created.metadata.name.clone().unwrap_or_default();
    let deadline = Instant::now() + VERDICT_WAIT;
    let judged = loop {
        let current = approvals.get(&approval_name).await?;
        if current.status.as_ref().is_some_and(|s| s.reason.is_some()) || Instant::now() > deadline
        {
            break current;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Some(format) = session.format {
        output::print(&judged, format).map_err(Error::Output)?;
    }
    let status = judged.status.unwrap_or_default();
    if session.format.is_none() {
        match &status.reason {
            Some(reason) => println!(
                "jitapproval/{approval_name}: {decision} on jitrequest/{name}: {reason}: {}",
                status.message
            ),
            None => println!(
                "jitapproval/{approval_name}: {decision} on jitrequest/{name}: not judged yet"
            ),
        }
    }
    Ok(if status.counted {
        Outcome::Done
    } else if status.reason.is_none() {
        Outcome::TimedOut
    } else {
        Outcome::Refused
    })
}

/// Deletes request `name`: its access ends at once (admission allows it to its requestor
/// and to whoever may `revoke` its policy).
pub async fn revoke(session: &Session, name: &str) -> Result<Outcome, Error> {
    session
        .api::<JitRequest>()
        .delete(name, &DeleteParams::default())
        .await?;
    if session.format.is_none() {
        println!("jitrequest/{name} revoked");
    }
    Ok(Outcome::Done)
}
