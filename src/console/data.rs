//! What the console shows and does, as the user: the machines and ports they may request,
//! their requests, and the requests waiting for their approval.

use kube::api::{DeleteParams, ListParams, PostParams};
use serde::Serialize;
use serde_json::json;

use super::{Ask, Decision};
use crate::access::validate::policy_ports;
use crate::api::jit_approval::APPROVE;
use crate::api::jit_request::Phase;
use crate::api::{INITIATE, JitApproval, JitPolicy, JitRequest};
use crate::plugin::{Error, Session, source};

/// Everything the page renders.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    pub user: String,
    pub namespace: String,
    /// Policies the user may `initiate`, with their machines and ports.
    pub policies: Vec<PolicyView>,
    /// The user's requests, newest first.
    pub requests: Vec<RequestView>,
    /// Others' requests waiting for approvals the user may give.
    pub to_approve: Vec<RequestView>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    pub name: String,
    pub approvals_required: u8,
    pub machines: Vec<MachineView>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineView {
    pub name: String,
    pub address: String,
    /// The address the machine would see from here ("My IP").
    pub my_address: Option<String>,
    pub ports: Vec<PortView>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortView {
    pub number: u16,
    pub protocol: String,
    /// The longest duration the policy allows, ISO 8601, and in seconds for the form.
    pub max_duration: String,
    pub max_seconds: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestView {
    pub name: String,
    pub policy: String,
    pub requestor: String,
    pub phase: String,
    pub reason: String,
    pub what: String,
    pub expires_at: Option<String>,
    pub approvals: Option<String>,
    pub justification: Option<String>,
}

pub async fn overview(session: &Session) -> Result<Overview, Error> {
    let user = session.whoami().await?;
    let policies = session
        .api::<JitPolicy>()
        .list(&ListParams::default())
        .await?
        .items;
    let mut views = Vec::new();
    let mut approvable = Vec::new();
    for policy in &policies {
        let name = policy.metadata.name.clone().unwrap_or_default();
        if may(session, APPROVE, &name).await? {
            approvable.push(name.clone());
        }
        if !may(session, INITIATE, &name).await? {
            continue;
        }
        let machines = policy
            .spec
            .virtual_machines
            .iter()
            .map(|vm| MachineView {
                name: vm.name.clone(),
                address: vm.address.clone(),
                my_address: vm
                    .address
                    .parse()
                    .ok()
                    .and_then(|a| source::auto(a).ok())
                    .map(|n| n.addr().to_string()),
                ports: policy_ports(vm)
                    .into_iter()
                    .map(|p| PortView {
                        number: p.number,
                        protocol: serde_json::to_value(p.protocol)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        max_seconds: crate::rules::duration::parse(&p.max_duration)
                            .map_or(0, |d| d.as_secs()),
                        max_duration: p.max_duration,
                    })
                    .collect(),
            })
            .collect();
        views.push(PolicyView {
            name,
            approvals_required: policy
                .spec
                .approval
                .as_ref()
                .map_or(0, |a| a.approvals_required),
            machines,
        });
    }
    let mut requests = session
        .api::<JitRequest>()
        .list(&ListParams::default())
        .await?
        .items;
    requests
        .sort_by_key(|r| std::cmp::Reverse(r.metadata.creation_timestamp.as_ref().map(|t| t.0)));
    let requestor = |r: &JitRequest| {
        r.spec
            .requestor
            .as_ref()
            .map(|w| w.username.clone())
            .unwrap_or_default()
    };
    let mine = requests
        .iter()
        .filter(|r| requestor(r) == user)
        .map(view)
        .collect();
    let to_approve = requests
        .iter()
        .filter(|r| requestor(r) != user && approvable.contains(&r.spec.policy_name))
        .filter(|r| {
            r.status.as_ref().is_some_and(|s| {
                s.phase == Some(Phase::Pending)
                    && s.reason.as_deref() == Some("AwaitingApproval")
                    && !s.approvals.iter().any(|a| a.approver == user)
            })
        })
        .map(view)
        .collect();
    Ok(Overview {
        user,
        namespace: session.namespace.clone(),
        policies: views,
        requests: mine,
        to_approve,
    })
}

fn view(request: &JitRequest) -> RequestView {
    let status = request.status.clone().unwrap_or_default();
    let what = request
        .spec
        .virtual_machines
        .iter()
        .flat_map(|vm| {
            vm.ports.iter().map(move |p| {
                format!(
                    "{} port {} from {} for {}",
                    vm.name,
                    p.number,
                    p.allowed_source_address_prefix
                        .clone()
                        .or_else(|| p
                            .allowed_source_address_prefixes
                            .as_ref()
                            .map(|s| s.join(",")))
                        .unwrap_or_default(),
                    p.duration
                )
            })
        })
        .collect::<Vec<_>>()
        .join("; ");
    RequestView {
        name: request.metadata.name.clone().unwrap_or_default(),
        policy: request.spec.policy_name.clone(),
        requestor: request
            .spec
            .requestor
            .as_ref()
            .map(|w| w.username.clone())
            .unwrap_or_default(),
        phase: status
            .phase
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|| "Submitted".into()),
        reason: status.reason.unwrap_or_default(),
        what,
        expires_at: status.expires_at.map(|t| t.0.to_string()),
        approvals: status.approval_state.filter(|s| s != "-"),
        justification: request.spec.justification.clone(),
    }
}

/// Whether the user may `verb` the policy `name`.
async fn may(session: &Session, verb: &str, name: &str) -> Result<bool, Error> {
    session.may(verb, "jitpolicies", Some(name)).await
}

/// Creates the request the form describes, from the user's own address towards the machine.
pub async fn request(session: &Session, ask: &Ask) -> Result<String, Error> {
    let policy = session.api::<JitPolicy>().get(&ask.policy).await?;
    let machine = policy
        .spec
        .virtual_machines
        .iter()
        .find(|m| m.name == ask.machine)
        .ok_or_else(|| Error::Usage(format!("machine {:?} is not in the policy", ask.machine)))?;
    let address = machine
        .address
        .parse()
        .map_err(|_| Error::Usage(format!("machine address {:?}", machine.address)))?;
    let source =
        source::auto(address).map_err(|e| Error::Usage(format!("no route to {address}: {e}")))?;
    let mut spec = json!({
        "policyName": ask.policy,
        "virtualMachines": [{"name": ask.machine, "ports": [{
            "number": ask.port, "duration": ask.duration,
            "allowedSourceAddressPrefix": source.to_string(),
        }]}],
    });
    if let Some(justification) = ask
        .justification
        .as_deref()
        .filter(|j| !j.trim().is_empty())
    {
        spec["justification"] = json!(justification);
    }
    let request: JitRequest = serde_json::from_value(json!({
        "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "JitRequest",
        "metadata": {"generateName": format!("{}-", ask.policy)},
        "spec": spec,
    }))
    .map_err(|e| Error::Usage(e.to_string()))?;
    let created = session
        .api::<JitRequest>()
        .create(&PostParams::default(), &request)
        .await?;
    Ok(created.metadata.name.unwrap_or_default())
}

pub async fn revoke(session: &Session, name: &str) -> Result<(), Error> {
    session
        .api::<JitRequest>()
        .delete(name, &DeleteParams::default())
        .await?;
    Ok(())
}

pub async fn decide(session: &Session, name: &str, decision: &Decision) -> Result<String, Error> {
    if decision.decision != "Approve" && decision.decision != "Reject" {
        return Err(Error::Usage("decision must be Approve or Reject".into()));
    }
    let mut spec = json!({"requestName": name, "decision": decision.decision});
    if let Some(comment) = &decision.comment {
        spec["comment"] = json!(comment);
    }
    let approval: JitApproval = serde_json::from_value(json!({
        "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "JitApproval",
        "metadata": {"generateName": format!("{name}-")},
        "spec": spec,
    }))
    .map_err(|e| Error::Usage(e.to_string()))?;
    let created = session
        .api::<JitApproval>()
        .create(&PostParams::default(), &approval)
        .await?;
    Ok(created.metadata.name.unwrap_or_default())
}
