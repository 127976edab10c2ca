//! `list`, `status` and `explain`: reading requests, and what a request would do before it
//! is made.

use jiff::Timestamp;
use kube::api::ListParams;
use serde::Serialize;

use super::request::machine_of;
use super::{Error, Outcome, Session, output, source};
use crate::access::validate::validate;
use crate::api::jit_request::{JitRequestSpec, Phase};
use crate::api::nsg_model::{NsgModel, is_managed};
use crate::api::{INITIATE, JitPolicy, JitRequest, NetworkSecurityGroup, SecurityRule};
use crate::rules::{PortRange, place};

pub async fn list(session: &Session, all: bool) -> Result<Outcome, Error> {
    let me = if all {
        None
    } else {
        Some(session.whoami().await?)
    };
    let mut requests: Vec<JitRequest> = session
        .api::<JitRequest>()
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|r| {
            me.as_ref().is_none_or(|me| {
                r.spec
                    .requestor
                    .as_ref()
                    .is_some_and(|who| &who.username == me)
            })
        })
        .collect();
    requests.sort_by_key(|r| r.metadata.creation_timestamp.as_ref().map(|t| t.0));
    if let Some(format) = session.format {
        output::print(&requests, format).map_err(Error::Output)?;
        return Ok(Outcome::Done);
    }
    let rows: Vec<Vec<String>> = requests
        .iter()
        .map(|r| {
            let status = r.status.clone().unwrap_or_default();
            vec![
                r.metadata.name.clone().unwrap_or_default(),
                r.spec.policy_name.clone(),
                r.spec
                    .requestor
                    .as_ref()
                    .map(|who| who.username.clone())
                    .unwrap_or_default(),
                status.phase.map(|p| format!("{p:?}")).unwrap_or_default(),
                status.reason.unwrap_or_default(),
                status.source.unwrap_or_default(),
                status
                    .expires_at
                    .map(|t| t.0.to_string())
                    .unwrap_or_default(),
                status.approval_state.unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(
            &[
                "NAME",
                "POLICY",
                "REQUESTOR",
                "PHASE",
                "REASON",
                "SOURCE",
                "EXPIRES",
                "APPROVALS"
            ],
            &rows
        )
    );
    Ok(Outcome::Done)
}

pub async fn status(session: &Session, name: &str) -> Result<Outcome, Error> {
    let request = session.api::<JitRequest>().get(name).await?;
    if let Some(format) = session.format {
        output::print(&request, format).map_err(Error::Output)?;
        return Ok(Outcome::Done);
    }
    let status = request.status.clone().unwrap_or_default();
    println!("Name:       {name}");
    println!("Policy:     {}", request.spec.policy_name);
    if let Some(who) = &request.spec.requestor {
        println!("Requestor:  {}", who.username);
    }
    println!(
        "Phase:      {} ({})",
        status
            .phase
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|| "-".into()),
        status.reason.clone().unwrap_or_default()
    );
    if let Some(message) = status.conditions.first().map(|c| &c.message) {
        println!("Message:    {message}");
    }
    if let Some(state) = &status.approval_state {
        println!("Approvals:  {state}");
    }
    for approval in &status.approvals {
        println!(
            "  {:?} by {} at {}{}",
            approval.decision,
            approval.approver,
            approval.time.0,
            approval
                .comment
                .as_ref()
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        );
    }
    if !status.grants.is_empty() {
        println!("Grants:");
        for grant in &status.grants {
            println!(
                "  {}/{:?} on {} from {} until {}: {:?}{}",
                grant.number,
                grant.protocol,
                grant.virtual_machine,
                grant.allowed_source_address_prefixes.join(","),
                grant.end_time.0,
                grant.status,
                grant
                    .status_reason
                    .map(|r| format!(" ({r:?})"))
                    .unwrap_or_default()
            );
        }
    }
    for violation in &status.violations {
        println!("Violation:  {violation}");
    }
    Ok(match status.phase {
        Some(Phase::Denied) => Outcome::Refused,
        Some(Phase::Expired | Phase::Revoked) => Outcome::Ended,
        _ => Outcome::Done,
    })
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The JitPolicy the request would name.
    pub policy: String,
    /// MACHINE:PORT.
    pub target: String,
    /// Where from: an IP, a CIDR, or `auto`.
    #[arg(long)]
    pub source: String,
    /// How long (ISO 8601); default: the port's maximum in the policy.
    #[arg(long)]
    pub duration: Option<String>,
}

/// What `explain` found, also its `-o json|yaml` form.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Explanation {
    machine: String,
    address: String,
    port: u16,
    protocol: String,
    source: String,
    duration: String,
    /// The allow rule's priority, the one the operator takes now.
    priority: Option<u32>,
    /// The JIT deny the grant goes above.
    beats: Option<String>,
    beats_priority: Option<u32>,
    /// When access would end if granted now.
    expires_at: Option<String>,
    approvals_required: u8,
    refusals: Vec<String>,
    /// What could not be worked out, and why (e.g. no read access to the NSG).
    notes: Vec<String>,
}

pub async fn explain(session: &Session, args: ExplainArgs) -> Result<Outcome, Error> {
    let policy = session
        .api::<JitPolicy>()
        .get_opt(&args.policy)
        .await?
        .ok_or_else(|| Error::Usage(format!("jitpolicy {:?} not found", args.policy)))?;
    let (machine, port) = args
        .target
        .split_once(':')
        .and_then(|(m, p)| Some((m, p.parse::<u16>().ok()?)))
        .ok_or_else(|| Error::Usage(format!("{}: expected MACHINE:PORT", args.target)))?;
    let vm = machine_of(&policy, machine)?;
    let address: std::net::IpAddr = vm
        .address
        .parse()
        .map_err(|_| Error::Usage(format!("machine {machine}: address {:?}", vm.address)))?;
    let source = if args.source == "auto" {
        source::auto(address)
            .map_err(|e| Error::Usage(format!("--source auto: {e}")))?
            .to_string()
    } else {
        args.source.clone()
    };
    let max = crate::access::validate::policy_ports(vm)
        .into_iter()
        .find(|p| p.number == port)
        .map(|p| p.max_duration);
    let duration = args
        .duration
        .clone()
        .or(max)
        .unwrap_or_else(|| "PT1H".to_owned());
    let spec: JitRequestSpec = serde_json::from_value(serde_json::json!({
        "policyName": args.policy,
        "virtualMachines": [{"name": machine, "ports": [{
            "number": port, "duration": duration, "allowedSourceAddressPrefix": source,
        }]}],
    }))
    .map_err(|e| Error::Usage(e.to_string()))?;
    let now = Timestamp::now();
    let mut refusals: Vec<String> = Vec::new();
    let mut explanation = Explanation {
        machine: machine.to_owned(),
        address: address.to_string(),
        port,
        protocol: "TCP".to_owned(),
        source: source.clone(),
        duration: duration.clone(),
        priority: None,
        beats: None,
        beats_priority: None,
        expires_at: None,
        approvals_required: policy
            .spec
            .approval
            .as_ref()
            .map_or(0, |a| a.approvals_required),
        refusals: Vec::new(),
        notes: Vec::new(),
    };
    match validate(&policy.spec, &spec) {
        Err(violations) => refusals.extend(violations.iter().map(ToString::to_string)),
        Ok(grants) => {
            if let Some(grant) = grants.first() {
                explanation.protocol =
                    serde_json::to_value(crate::api::convert::policy_protocol(grant.protocol))
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                let end = now
                    .checked_add(jiff::SignedDuration::try_from(grant.duration).unwrap_or_default())
                    .unwrap_or(now);
                explanation.expires_at = Some(
                    Timestamp::from_second(end.as_second())
                        .unwrap_or(end)
                        .to_string(),
                );
                match placement(session, grant, now).await {
                    Ok(Ok(priority)) => explanation.priority = Some(priority),
                    Ok(Err(why)) => refusals.push(why),
                    // Placement reads the NSG and its rules (role portcullis-viewer); without
                    // them the rest of the answer still holds.
                    Err(Error::Api { message: why, .. }) => explanation
                        .notes
                        .push(format!("the rule's priority is unknown: {why}")),
                    Err(other) => return Err(other),
                }
            }
        }
    }
    if let Some(machine) = policy
        .status
        .iter()
        .flat_map(|s| &s.virtual_machines)
        .find(|m| m.name == machine)
    {
        explanation.beats = machine.deny_rule.clone();
        explanation.beats_priority = machine.deny_priority;
    }
    if let Some(refusal) = may_initiate(session, &args.policy).await? {
        refusals.push(refusal);
    }
    explanation.refusals = refusals;
    if let Some(format) = session.format {
        output::print(&explanation, format).map_err(Error::Output)?;
    } else {
        print_explanation(&explanation);
    }
    Ok(if explanation.refusals.is_empty() {
        Outcome::Done
    } else {
        Outcome::Refused
    })
}

/// The allow band's priority for `grant` in its NSG now, as the operator computes it: the
/// NSG's inline rules and the users' SecurityRules in force, through [`place`].
async fn placement(
    session: &Session,
    grant: &crate::access::validate::PortGrant,
    now: Timestamp,
) -> Result<Result<u32, String>, Error> {
    let Some(nsg) = session
        .api::<NetworkSecurityGroup>()
        .get_opt(&grant.network_security_group)
        .await?
    else {
        return Ok(Err(format!(
            "NetworkSecurityGroup {:?} not found: the request would wait for it",
            grant.network_security_group
        )));
    };
    let objects = session
        .api::<SecurityRule>()
        .list(&ListParams::default())
        .await?
        .items;
    let users = objects
        .iter()
        .filter(|o| o.spec.network_security_group_name == grant.network_security_group)
        .filter(|o| !is_managed(o));
    let model = NsgModel::new(&nsg, users, now);
    Ok(place(
        &model.rules,
        grant.address,
        &[(PortRange::single(grant.number), grant.protocol)],
        &model.scope,
    )
    .map(|p| p.allow)
    .map_err(|e| e.to_string()))
}

/// The apiserver's answer to whether the user may `initiate` the policy (and create
/// requests): the refusal, if any.
async fn may_initiate(session: &Session, policy: &str) -> Result<Option<String>, Error> {
    for (verb, resource, name) in [
        (INITIATE, "jitpolicies", Some(policy)),
        ("create", "jitrequests", None),
    ] {
        if !session.may(verb, resource, name).await? {
            let what = name.map_or(resource.to_owned(), |n| format!("{resource}/{n}"));
            return Ok(Some(format!(
                "you may not {verb} {what} in namespace {}: no role grants it \
                 (see ClusterRole portcullis-requester)",
                session.namespace
            )));
        }
    }
    Ok(None)
}

fn print_explanation(e: &Explanation) {
    println!(
        "would open:  {}/{} on {} ({}) from {} for {}",
        e.port, e.protocol, e.machine, e.address, e.source, e.duration
    );
    if let Some(priority) = e.priority {
        match (&e.beats, e.beats_priority) {
            (Some(deny), Some(at)) => {
                println!("priority:    {priority}, above the JIT deny {deny} at {at}")
            }
            _ => println!("priority:    {priority}"),
        }
    }
    if let Some(until) = &e.expires_at {
        println!("until:       {until} (if granted now)");
    }
    if e.approvals_required > 0 {
        println!(
            "approvals:   {} needed from approvers of the policy",
            e.approvals_required
        );
    }
    for note in &e.notes {
        println!("note:        {note}");
    }
    if e.refusals.is_empty() {
        println!("refusals:    none: it would be granted");
    } else {
        println!("refusals:");
        for refusal in &e.refusals {
            println!("  - {refusal}");
        }
    }
}
