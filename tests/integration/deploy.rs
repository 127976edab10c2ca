//! What users apply to a real cluster is accepted by a real API server.

use std::path::Path;

use serde::Deserialize;

use crate::support::{Ctx, TestResult, succeeded};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        kustomization_passes_server_dry_run,
        agent_rbac_reaches_only_its_own_nsg
    ]
}

async fn kustomization_passes_server_dry_run(ctx: Ctx) -> TestResult {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    // A server-side dry run creates nothing, so the namespaced objects need their namespace
    // to exist already (the harness installed it); a real `apply -k` creates it first.
    let out = succeeded(&ctx.kubectl(&[
        "apply",
        "--dry-run=server",
        "--namespace=portcullis-system",
        "-k",
        &deploy.display().to_string(),
    ]))?;
    // Cluster-scoped objects carry no namespace (kustomize would stamp one on kinds it does
    // not know are cluster-scoped, like the admission policies).
    let rendered = succeeded(&ctx.kubectl(&["kustomize", &deploy.display().to_string()]))?;
    for document in serde_yaml_ng::Deserializer::from_str(&rendered) {
        let object = serde_yaml_ng::Value::deserialize(document)?;
        let kind = object["kind"].as_str().unwrap_or_default();
        if kind.contains("AdmissionPolicy") && !object["metadata"]["namespace"].is_null() {
            return Err(format!("{kind} {:?} has a namespace", object["metadata"]["name"]).into());
        }
    }
    for expected in [
        "customresourcedefinition.apiextensions.k8s.io/jitrequests.jit.portcullis.dev",
        "serviceaccount/portcullis-operator",
        "clusterrole.rbac.authorization.k8s.io/portcullis-requester",
        "deployment.apps/portcullis-operator",
        "mutatingadmissionpolicy.admissionregistration.k8s.io/portcullis-requestor",
        "validatingadmissionpolicy.admissionregistration.k8s.io/portcullis-jitrequest-create",
        "validatingadmissionpolicy.admissionregistration.k8s.io/portcullis-jitrequest-delete",
        "validatingadmissionpolicy.admissionregistration.k8s.io/portcullis-managed-securityrules",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/portcullis-managed-securityrules",
        "validatingadmissionpolicy.admissionregistration.k8s.io/portcullis-agentreports",
        "customresourcedefinition.apiextensions.k8s.io/agentreports.jit.portcullis.dev",
    ] {
        if !out.contains(expected) {
            return Err(format!("dry run output lacks {expected}:\n{out}").into());
        }
    }
    Ok(())
}

/// The agent's shipped RBAC: its NSG (read, and the verb `report` that admission asks of an
/// AgentReport's writer), the rules of its namespace, its reports, and nothing else (no
/// other NSG, no NSG status, no other namespace, no writes to rules or requests). The
/// agent's service account is in its own namespace, portcullis-agent (created first, as
/// `kubectl apply -k deploy/agent/` does).
async fn agent_rbac_reaches_only_its_own_nsg(ctx: Ctx) -> TestResult {
    let agent_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/agent");
    let namespace = std::fs::read_to_string(agent_dir.join("namespace.yaml"))?;
    let rbac = std::fs::read_to_string(agent_dir.join("rbac.yaml"))?;
    ctx.plane
        .apply(&format!("{namespace}\n---\n{rbac}"))
        .await?;
    let agent = "system:serviceaccount:portcullis-agent:portcullis-agent";
    let may = |verb: &str, resource: &str, namespace: &str, subresource: Option<&str>| {
        let mut args = vec![
            "auth".to_owned(),
            "can-i".to_owned(),
            verb.to_owned(),
            resource.to_owned(),
            format!("--namespace={namespace}"),
            format!("--as={agent}"),
        ];
        if let Some(sub) = subresource {
            args.push(format!("--subresource={sub}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ctx.kubectl(&args);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    let nsg = "networksecuritygroups.jit.portcullis.dev/web-nsg";
    let other = "networksecuritygroups.jit.portcullis.dev/db-nsg";
    let checks = [
        (may("watch", nsg, "default", None), true, "watch its NSG"),
        (
            may("report", nsg, "default", None),
            true,
            "report on its NSG",
        ),
        (
            may("patch", "agentreports.jit.portcullis.dev", "default", None),
            true,
            "write reports",
        ),
        (
            may("patch", nsg, "default", Some("status")),
            false,
            "patch its NSG's status",
        ),
        (
            may("report", other, "default", None),
            false,
            "report on another NSG",
        ),
        (
            may("list", "securityrules.jit.portcullis.dev", "default", None),
            true,
            "list rules",
        ),
        (
            may("get", other, "default", None),
            false,
            "read another NSG",
        ),
        (
            may("patch", other, "default", Some("status")),
            false,
            "patch another NSG's status",
        ),
        (
            may("patch", nsg, "default", None),
            false,
            "patch its NSG's spec",
        ),
        (
            may("watch", nsg, "kube-system", None),
            false,
            "watch another namespace",
        ),
        (
            may(
                "create",
                "securityrules.jit.portcullis.dev",
                "default",
                None,
            ),
            false,
            "create rules",
        ),
        (
            may("delete", "jitrequests.jit.portcullis.dev", "default", None),
            false,
            "delete requests",
        ),
    ];
    for (allowed, expected, what) in checks {
        if allowed != expected {
            return Err(format!("the agent may {what}: {allowed}, expected {expected}").into());
        }
    }
    Ok(())
}
