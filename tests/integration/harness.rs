//! The harness itself: a control plane leaves nothing behind when it stops, and the
//! garbage collector it runs really cascades owner references.

use std::path::Path;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, PostParams};
use portcullis::testenv::{ADMIN, ALICE, BOB, ControlPlane};

use crate::support::{Ctx, TestResult, eventually};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        stopping_leaves_no_process_and_no_directory,
        identities_authenticate_with_their_groups,
        garbage_collector_cascades_owner_references,
    ]
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purpose; the harness reaps its children anyway.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

async fn stopping_leaves_no_process_and_no_directory(_ctx: Ctx) -> TestResult {
    let plane = ControlPlane::start().await?;
    let pids = plane.pids();
    let dir = plane.dir().to_path_buf();
    if pids.len() != 3 || !pids.iter().all(|pid| alive(*pid)) || !dir.is_dir() {
        return Err(format!(
            "expected 3 live components and a directory, got {pids:?} {}",
            dir.display()
        )
        .into());
    }
    drop(plane);
    let leftovers: Vec<u32> = pids.into_iter().filter(|pid| alive(*pid)).collect();
    if !leftovers.is_empty() {
        return Err(format!("processes outlived the control plane: {leftovers:?}").into());
    }
    if Path::new(&dir).exists() {
        return Err(format!("{} outlived the control plane", dir.display()).into());
    }
    Ok(())
}

async fn identities_authenticate_with_their_groups(ctx: Ctx) -> TestResult {
    for (user, group) in [
        (ADMIN, "system:masters"),
        (ALICE, "team-web"),
        (BOB, "viewers"),
    ] {
        let out = ctx.kubectl_as(
            user,
            &["auth", "whoami", "-o", "jsonpath={.status.userInfo}"],
            None,
        );
        let info = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !info.contains(user.name) || !info.contains(group) {
            return Err(format!(
                "whoami as {}: {info} {}",
                user.name,
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
    }
    // Non-admins have no rights until a role grants them some.
    let denied = ctx.kubectl_as(BOB, &["get", "configmaps"], None);
    if denied.status.success() || !String::from_utf8_lossy(&denied.stderr).contains("forbidden") {
        return Err("bob could list configmaps without any role".into());
    }
    Ok(())
}

async fn garbage_collector_cascades_owner_references(ctx: Ctx) -> TestResult {
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let owner = maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "owner"}}))?,
        )
        .await?;
    let uid = owner.metadata.uid.clone().ok_or("owner has no uid")?;
    let dependent: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "dependent",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]
        }
    }))?;
    maps.create(&PostParams::default(), &dependent).await?;
    maps.delete("owner", &DeleteParams::default()).await?;
    eventually("the garbage collector to delete the dependent", || async {
        matches!(maps.get_opt("dependent").await, Ok(None)).then_some(())
    })
    .await?;
    Ok(())
}
