//! The README's walkthrough: the `examples/` manifests apply as written and show up under
//! the `portcullis` category.

use std::path::Path;

use crate::support::{Ctx, TestResult, succeeded};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![examples_apply_and_list_under_the_category]
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
