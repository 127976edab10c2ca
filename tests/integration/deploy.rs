//! What users apply to a real cluster is accepted by a real API server.

use std::path::Path;

use crate::support::{Ctx, TestResult, succeeded};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![kustomization_passes_server_dry_run]
}

async fn kustomization_passes_server_dry_run(ctx: Ctx) -> TestResult {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    // A server-side dry run creates nothing, so the namespaced objects need their namespace
    // to exist already; a real `apply -k` creates it first in the same call.
    succeeded(&ctx.kubectl(&["create", "namespace", "portcullis-system"]))?;
    let out = succeeded(&ctx.kubectl(&[
        "apply",
        "--dry-run=server",
        "--namespace=portcullis-system",
        "-k",
        &deploy.display().to_string(),
    ]))?;
    for expected in [
        "customresourcedefinition.apiextensions.k8s.io/jitrequests.jit.portcullis.dev",
        "serviceaccount/portcullis-operator",
        "clusterrole.rbac.authorization.k8s.io/portcullis-requester",
        "deployment.apps/portcullis-operator",
    ] {
        if !out.contains(expected) {
            return Err(format!("dry run output lacks {expected}:\n{out}").into());
        }
    }
    Ok(())
}
