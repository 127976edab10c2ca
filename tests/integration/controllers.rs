//! The JIT controllers end to end on a real API server: manifests applied with kubectl in
//! whatever order GitOps delivers them, observed through the objects' status and the rules
//! the operator materializes.

use std::collections::BTreeMap;
use std::process::Output;

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use portcullis::access::materialize::{
    LABEL_MANAGED_BY, LABEL_ROLE, Owner, deny_rule_name, report_name,
};
use portcullis::api::jit_policy::{GrantState, GrantStateReason, MachineState};
use portcullis::api::jit_request::Phase;
use portcullis::api::nsg::{MAX_LISTED_REPORTS, RuleOrigin};
use portcullis::api::{JitPolicy, JitRequest, NetworkSecurityGroup, SecurityRule};

use crate::support::{Ctx, TestResult, eventually, failed, inline_allow, succeeded, web_nsg};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        request_before_policy_waits_then_is_granted,
        policy_before_nsg_reports_it_then_configures,
        deny_rule_deleted_by_hand_comes_back,
        deny_rule_edited_by_hand_is_refused,
        deny_goes_below_user_rules_on_the_same_port,
        stale_deny_rules_are_removed_and_user_rules_kept,
        denied_request_lists_every_violation,
        short_grant_expires_on_time,
        deleting_a_granted_request_revokes_it,
        newer_request_of_the_same_requestor_supersedes,
        different_requestors_coexist,
        policy_shrink_revokes_active_grants,
        deleting_the_policy_cascades_and_revokes,
        nsg_reports_exposure_and_conflicts,
        many_agents_report_and_the_nsg_stays_small,
        expired_request_never_grants_again,
        kubectl_wait_for_granted_works,
        metrics_count_grants,
    ]
}

/// The tests' NSG, with `more` inline rules after `allow-http`.
fn nsg(more: &str) -> String {
    web_nsg("198.18.0.0/24", more)
}

/// A policy `web` with machines web-1 (198.18.0.10) and web-2 (198.18.0.11) on `nsg`:
/// SSH from 198.19.0.0/16 for up to an hour, and 8080/TCP.
fn policy(ports_of_web_1: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: JitPolicy
metadata:
  name: web
spec:
  virtualMachines:
  - name: web-1
    address: 198.18.0.10
    networkSecurityGroupName: nsg
    ports:
{ports_of_web_1}
  - name: web-2
    address: 198.18.0.11
    networkSecurityGroupName: nsg
    ports:
    - number: 22
      protocol: TCP
      allowedSourceAddressPrefix: 198.19.0.0/16
      maxRequestAccessDuration: PT1H
"#
    )
}

const WEB_1_PORTS: &str = r#"    - number: 22
      protocol: TCP
      allowedSourceAddressPrefix: 198.19.0.0/16
      maxRequestAccessDuration: PT1H
    - number: 8080
      protocol: TCP
      maxRequestAccessDuration: PT1H
"#;

/// A request for port `port` of web-1 from `source` for `duration` (admission records who
/// applies it as the requestor).
fn request(name: &str, port: u16, source: &str, duration: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: JitRequest
metadata:
  name: {name}
spec:
  policyName: web
  justification: testing
  virtualMachines:
  - name: web-1
    ports:
    - number: {port}
      duration: {duration}
      allowedSourceAddressPrefix: {source}
"#
    )
}

/// [`request`] applied by `who`, a requester of team `team-web`, through impersonation.
fn ask(ctx: &Ctx, name: &str, who: &str, port: u16, source: &str, duration: &str) -> Output {
    ctx.apply_as(who, &["team-web"], &request(name, port, source, duration))
}

async fn machine_state(ctx: &Ctx, machine: &str, wanted: MachineState) -> Result<(), String> {
    let policies: Api<JitPolicy> = ctx.api();
    eventually(&format!("machine {machine} to be {wanted:?}"), || async {
        let policy = policies.get_opt("web").await.ok().flatten()?;
        policy
            .status?
            .virtual_machines
            .iter()
            .any(|m| m.name == machine && m.state == wanted)
            .then_some(())
    })
    .await
}

/// The name of policy `web`'s deny rule for `machine`: readable names plus a hash of the
/// policy's UID, computed the way the operator computes it.
async fn deny_name(ctx: &Ctx, machine: &str) -> Result<String, String> {
    let policies: Api<JitPolicy> = ctx.api();
    let policy = eventually("policy web to exist", || async {
        policies.get_opt("web").await.ok().flatten()
    })
    .await?;
    let uid = policy.metadata.uid.unwrap_or_default();
    Ok(deny_rule_name(
        Owner {
            name: "web",
            uid: &uid,
        },
        machine,
    ))
}

async fn setup(ctx: &Ctx) -> TestResult {
    succeeded(&ctx.apply(&nsg("")))?;
    succeeded(&ctx.apply(&policy(WEB_1_PORTS)))?;
    ctx.rule_named(&deny_name(ctx, "web-1").await?).await?;
    Ok(())
}

async fn request_before_policy_waits_then_is_granted(ctx: Ctx) -> TestResult {
    succeeded(&ask(&ctx, "ask", "alice", 22, "198.19.0.10", "PT10M"))?;
    let pending = ctx.phase_of("ask", Phase::Pending).await?;
    assert_eq!(
        pending.status.unwrap().reason.as_deref(),
        Some("PolicyNotFound")
    );
    succeeded(&ctx.apply(&policy(WEB_1_PORTS)))?;
    succeeded(&ctx.apply(&nsg("")))?;
    let granted = ctx.phase_of("ask", Phase::Granted).await?;
    let status = granted.status.unwrap();
    let grant = &status.grants[0];
    let deny_1 = deny_name(&ctx, "web-1").await?;
    assert_eq!((grant.number, grant.status), (22, GrantState::Initiated));
    assert_eq!(status.source.as_deref(), Some("198.19.0.10"));

    let allow = ctx.rule_named(&grant.rule).await?;
    assert_eq!(
        allow.spec.fields.source_address_prefix.as_deref(),
        Some("198.19.0.10")
    );
    assert_eq!(
        allow.spec.fields.destination_address_prefix.as_deref(),
        Some("198.18.0.10")
    );
    assert_eq!(
        allow.spec.fields.destination_port_ranges.as_deref(),
        Some(&["22".to_owned()][..])
    );
    assert_eq!(
        allow.spec.expires_at.as_ref().map(|t| t.0),
        Some(grant.end_time.0)
    );
    let owner = &allow.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("JitRequest", Some(true))
    );

    // The NSG's effective view: the denies (web-1, web-2) listed and counted, above the
    // user rules; the grant counted, not listed (an NSG may carry thousands), above them.
    let nsgs: Api<NetworkSecurityGroup> = ctx.api();
    let status = eventually("the grant counted and the denies listed", || async {
        let status = nsgs.get("nsg").await.ok()?.status?;
        let denied = status.effective_rules.iter().any(|r| r.name == deny_1);
        (status.active_grants == Some(1) && status.jit_deny_rules == Some(2) && denied)
            .then_some(status)
    })
    .await?;
    let view = status.effective_rules;
    assert!(
        !view.iter().any(|r| r.name == grant.rule),
        "a grant is listed in the NSG status"
    );
    assert_eq!(status.effective_rule_count, Some(view.len() as u32 + 1));
    let position = |name: &str| view.iter().position(|r| r.name == name).unwrap();
    assert!(position(&deny_1) < position("allow-http"));
    assert!(allow.spec.fields.priority < view[position(&deny_1)].priority);
    assert!(
        view.iter()
            .any(|r| r.name == "DenyAllInBound" && r.origin == RuleOrigin::Default)
    );
    Ok(())
}

async fn policy_before_nsg_reports_it_then_configures(ctx: Ctx) -> TestResult {
    succeeded(&ctx.apply(&policy(WEB_1_PORTS)))?;
    let deny_1 = deny_name(&ctx, "web-1").await?;
    machine_state(&ctx, "web-1", MachineState::NetworkSecurityGroupNotFound).await?;
    succeeded(&ctx.apply(&nsg("")))?;
    machine_state(&ctx, "web-1", MachineState::Configured).await?;
    let deny = ctx.rule_named(&deny_1).await?;
    assert_eq!(
        deny.spec.fields.destination_port_ranges.as_deref(),
        Some(&["22".to_owned(), "8080".to_owned()][..])
    );
    assert_eq!(
        deny.spec.fields.destination_address_prefix.as_deref(),
        Some("198.18.0.10")
    );
    let labels = deny.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get(LABEL_MANAGED_BY).map(String::as_str),
        Some("portcullis")
    );
    assert_eq!(labels.get(LABEL_ROLE).map(String::as_str), Some("deny"));
    let listed = succeeded(&ctx.kubectl(&["get", "jitp", "web"]))?;
    assert!(
        listed.contains("2/2"),
        "printer columns show configured machines:\n{listed}"
    );
    Ok(())
}

async fn deny_rule_deleted_by_hand_comes_back(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    let deny_1 = deny_name(&ctx, "web-1").await?;
    let rules: Api<SecurityRule> = ctx.api();
    let before = rules.get(&deny_1).await?;
    rules.delete(&deny_1, &DeleteParams::default()).await?;
    eventually("the deny rule to come back", || async {
        let now = rules.get_opt(&deny_1).await.ok().flatten()?;
        (now.metadata.uid != before.metadata.uid).then_some(())
    })
    .await?;
    Ok(())
}

async fn deny_rule_edited_by_hand_is_refused(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    let deny_1 = deny_name(&ctx, "web-1").await?;
    let rules: Api<SecurityRule> = ctx.api();
    let original = rules.get(&deny_1).await?;
    // Even the cluster admin may not turn a JIT deny into an allow: only the operator
    // writes its rules (deploy/admission/securityrules.yaml).
    let refused = failed(&ctx.kubectl(&[
        "patch",
        "nsgrule",
        deny_1.as_str(),
        "--type=merge",
        "-p",
        r#"{"spec":{"access":"Allow","priority":4000}}"#,
    ]))?;
    assert!(
        refused.contains("written only by the Portcullis operator"),
        "{refused}"
    );
    assert_eq!(rules.get(&deny_1).await?.spec, original.spec);
    Ok(())
}

async fn deny_goes_below_user_rules_on_the_same_port(ctx: Ctx) -> TestResult {
    let with_ssh = nsg(&inline_allow("allow-ssh-bastion", 400, "198.18.0.5", 22));
    succeeded(&ctx.apply(&with_ssh))?;
    succeeded(&ctx.apply(&policy(WEB_1_PORTS)))?;
    let deny_1 = deny_name(&ctx, "web-1").await?;
    let deny = ctx.rule_named(&deny_1).await?;
    assert_eq!(
        deny.spec.fields.priority, 401,
        "the deny goes just below the user's SSH rule"
    );
    // Without a user rule on its ports the deny takes the top non-JIT priority.
    succeeded(&ctx.apply(&nsg("")))?;
    let rules: Api<SecurityRule> = ctx.api();
    eventually("the deny to move up to 101", || async {
        (rules.get(&deny_1).await.ok()?.spec.fields.priority == 101).then_some(())
    })
    .await?;
    Ok(())
}

async fn stale_deny_rules_are_removed_and_user_rules_kept(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    let deny_1 = deny_name(&ctx, "web-1").await?;
    let deny_2 = deny_name(&ctx, "web-2").await?;
    ctx.rule_named(&deny_2).await?;
    // A rule the operator did not create, even one named and labelled like its own (only
    // the operator may add the managed-by label: admission refuses it to anyone else).
    let lookalike = r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: SecurityRule
metadata:
  name: jit-deny-web-web-3
  labels:
    jit.portcullis.dev/policy: web
    jit.portcullis.dev/role: deny
spec:
  networkSecurityGroupName: nsg
  priority: 2000
  direction: Inbound
  access: Deny
  protocol: Tcp
  sourceAddressPrefix: "*"
  sourcePortRange: "*"
  destinationAddressPrefix: 198.18.0.12
  destinationPortRange: "22"
"#;
    succeeded(&ctx.apply(lookalike))?;
    // web-2 removed from the policy, web-1's address changed.
    let shrunk = policy(WEB_1_PORTS)
        .split("  - name: web-2")
        .next()
        .unwrap()
        .replace("198.18.0.10", "198.18.0.20");
    succeeded(&ctx.apply(&shrunk))?;
    ctx.rule_gone(&deny_2).await?;
    let rules: Api<SecurityRule> = ctx.api();
    eventually("web-1's deny to follow its new address", || async {
        let deny = rules.get(&deny_1).await.ok()?;
        (deny.spec.fields.destination_address_prefix.as_deref() == Some("198.18.0.20"))
            .then_some(())
    })
    .await?;
    let policies: Api<JitPolicy> = ctx.api();
    eventually("the policy to observe its new generation", || async {
        let p = policies.get("web").await.ok()?;
        (p.status?.observed_generation == p.metadata.generation).then_some(())
    })
    .await?;
    assert!(
        rules.get_opt("jit-deny-web-web-3").await?.is_some(),
        "a user's rule was deleted"
    );
    Ok(())
}

async fn denied_request_lists_every_violation(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    let bad = request("bad", 22, "203.0.113.9", "PT2H").replace(
        "  - name: web-1\n    ports:\n",
        "  - name: web-9\n    ports:\n    - number: 22\n      duration: PT1M\n      allowedSourceAddressPrefix: 198.19.0.1\n  - name: web-1\n    ports:\n    - number: 3389\n      duration: PT1M\n      allowedSourceAddressPrefix: 198.19.0.1\n",
    );
    succeeded(&ctx.apply_as("alice", &["team-web"], &bad))?;
    let denied = ctx.phase_of("bad", Phase::Denied).await?;
    let status = denied.status.unwrap();
    let all = status.violations.join("\n");
    for needle in ["web-9", "3389", "PT2H", "203.0.113.9"] {
        assert!(
            all.contains(needle),
            "violations do not mention {needle}:\n{all}"
        );
    }
    assert_eq!(status.violations.len(), 4, "{all}");
    assert_eq!(status.reason.as_deref(), Some("PolicyViolation"));
    let rules: Api<SecurityRule> = ctx.api();
    assert!(
        rules
            .list(&Default::default())
            .await?
            .items
            .iter()
            .all(|r| !r
                .metadata
                .name
                .as_deref()
                .unwrap_or_default()
                .starts_with("jit-allow"))
    );
    Ok(())
}

async fn short_grant_expires_on_time(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    succeeded(&ask(&ctx, "short", "alice", 22, "198.19.0.10", "PT3S"))?;
    let granted = ctx.phase_of("short", Phase::Granted).await?;
    let grant = granted.status.unwrap().grants[0].clone();
    let expired = ctx.phase_of("short", Phase::Expired).await?;
    ctx.rule_gone(&grant.rule).await?;
    let closed = &expired.status.unwrap().grants[0];
    assert_eq!(
        (closed.status, closed.status_reason),
        (GrantState::Revoked, Some(GrantStateReason::Expired))
    );
    let history = eventually("the policy's history to show the expiry", || async {
        let policy: JitPolicy = ctx.api().get("web").await.ok()?;
        let record = policy
            .status?
            .requests
            .into_iter()
            .find(|r| r.request == "short")?;
        (record.virtual_machines[0].ports[0].status_reason == Some(GrantStateReason::Expired))
            .then_some(record)
    })
    .await?;
    assert_eq!(history.requestor, "alice");
    let events = succeeded(&ctx.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=short",
        "-o",
        "jsonpath={.items[*].reason}",
    ]))?;
    assert!(
        events.contains("Granted") && events.contains("Expired"),
        "events: {events}"
    );
    Ok(())
}

async fn deleting_a_granted_request_revokes_it(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    succeeded(&ask(&ctx, "early", "alice", 22, "198.19.0.10", "PT30M"))?;
    let granted = ctx.phase_of("early", Phase::Granted).await?;
    let rule = granted.status.unwrap().grants[0].rule.clone();
    ctx.rule_named(&rule).await?;
    succeeded(&ctx.kubectl(&["delete", "jitr", "early", "--wait=true"]))?;
    let rules: Api<SecurityRule> = ctx.api();
    assert!(
        rules.get_opt(&rule).await?.is_none(),
        "the allow rule outlived its request"
    );
    let record = eventually("the history to record the revocation", || async {
        let policy: JitPolicy = ctx.api().get("web").await.ok()?;
        let record = policy
            .status?
            .requests
            .into_iter()
            .find(|r| r.request == "early")?;
        (record.virtual_machines[0].ports[0].status_reason == Some(GrantStateReason::UserRequested))
            .then_some(record)
    })
    .await?;
    assert_eq!(
        record.virtual_machines[0].ports[0].status,
        GrantState::Revoked
    );
    Ok(())
}

async fn newer_request_of_the_same_requestor_supersedes(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    succeeded(&ask(&ctx, "first", "alice", 22, "198.19.0.10", "PT30M"))?;
    let first = ctx.phase_of("first", Phase::Granted).await?;
    succeeded(&ask(&ctx, "second", "alice", 22, "198.19.0.11", "PT30M"))?;
    ctx.phase_of("second", Phase::Granted).await?;
    let revoked = ctx.phase_of("first", Phase::Revoked).await?;
    assert_eq!(
        revoked.status.unwrap().reason.as_deref(),
        Some("NewerRequestInitiated")
    );
    ctx.rule_gone(&first.status.unwrap().grants[0].rule).await?;
    Ok(())
}

async fn different_requestors_coexist(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    succeeded(&ask(&ctx, "alices", "alice", 22, "198.19.0.10", "PT30M"))?;
    ctx.phase_of("alices", Phase::Granted).await?;
    succeeded(&ask(&ctx, "carols", "carol", 22, "198.19.0.12", "PT30M"))?;
    ctx.phase_of("carols", Phase::Granted).await?;
    let requests: Api<JitRequest> = ctx.api();
    let alices = requests.get("alices").await?;
    assert_eq!(alices.status.unwrap().phase, Some(Phase::Granted));
    Ok(())
}

async fn policy_shrink_revokes_active_grants(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    succeeded(&ask(
        &ctx,
        "http-alt",
        "alice",
        8080,
        "198.19.0.10",
        "PT30M",
    ))?;
    let granted = ctx.phase_of("http-alt", Phase::Granted).await?;
    let only_ssh = WEB_1_PORTS
        .split("    - number: 8080")
        .next()
        .unwrap()
        .to_owned();
    succeeded(&ctx.apply(&policy(&only_ssh)))?;
    let revoked = ctx.phase_of("http-alt", Phase::Revoked).await?;
    assert_eq!(
        revoked.status.unwrap().reason.as_deref(),
        Some("PolicyChanged")
    );
    ctx.rule_gone(&granted.status.unwrap().grants[0].rule)
        .await?;
    Ok(())
}

async fn deleting_the_policy_cascades_and_revokes(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    let deny_1 = deny_name(&ctx, "web-1").await?;
    let deny_2 = deny_name(&ctx, "web-2").await?;
    succeeded(&ask(&ctx, "orphan", "alice", 22, "198.19.0.10", "PT30M"))?;
    let granted = ctx.phase_of("orphan", Phase::Granted).await?;
    succeeded(&ctx.kubectl(&["delete", "jitp", "web"]))?;
    // The garbage collector removes the owned deny rules; the request controller revokes.
    ctx.rule_gone(&deny_1).await?;
    ctx.rule_gone(&deny_2).await?;
    ctx.phase_of("orphan", Phase::Revoked).await?;
    ctx.rule_gone(&granted.status.unwrap().grants[0].rule)
        .await?;
    Ok(())
}

/// Agents report in objects of their own (`AgentReport`), and the NSG's status summarizes
/// them: however many agents, the NSG stays small (it lists 32, failing ones first, and
/// counts the rest); a report not under its own name counts for nothing; and the entries
/// the agents of earlier releases wrote into the NSG's status themselves are dropped.
async fn many_agents_report_and_the_nsg_stays_small(ctx: Ctx) -> TestResult {
    use futures::{StreamExt, TryStreamExt};
    use portcullis::api::AgentReport;
    succeeded(&ctx.apply(&nsg("")))?;
    let nsgs: Api<NetworkSecurityGroup> = ctx.api();
    let uid = eventually("the NSG", || async {
        nsgs.get("nsg").await.ok()?.metadata.uid
    })
    .await?;
    // As an agent of the last release wrote its report.
    let old = serde_json::json!({
        "apiVersion": "jit.portcullis.dev/v1alpha1",
        "kind": "NetworkSecurityGroup",
        "status": {"enforcement": [{
            "agent": "old-node", "host": "old-node", "rulesHash": "0123",
            "appliedAt": "2026-01-01T00:00:00Z"
        }]}
    });
    nsgs.patch_status(
        "nsg",
        &PatchParams::apply("portcullis-agent-old-node").force(),
        &Patch::Apply(&old),
    )
    .await?;
    let reports: Api<AgentReport> = ctx.api();
    let agents = 500;
    let report = |name: String, agent: String, error: Option<&str>| {
        serde_json::json!({
            "apiVersion": "jit.portcullis.dev/v1alpha1",
            "kind": "AgentReport",
            "metadata": {
                "name": name,
                "ownerReferences": [{
                    "apiVersion": "jit.portcullis.dev/v1alpha1",
                    "kind": "NetworkSecurityGroup", "name": "nsg", "uid": uid
                }]
            },
            "spec": {
                "networkSecurityGroupName": "nsg",
                "agent": agent, "host": agent,
                "addresses": ["198.18.0.10"], "observedGeneration": 1,
                "rulesHash": "0123456789abcdef", "appliedAt": "2026-01-01T00:00:00Z",
                "error": error
            }
        })
    };
    let mut objects: Vec<serde_json::Value> = (0..agents)
        .map(|i| {
            let agent = format!("node-{i:04}");
            let error = (i == agents - 1).then_some("nft: refused");
            report(report_name("nsg", &agent), agent, error)
        })
        .collect();
    // Under another agent's name: it must not count, or stand in for that agent.
    objects.push(report("forged".into(), "node-0000".into(), Some("forged")));
    futures::stream::iter(objects)
        .map(|object| {
            let reports = reports.clone();
            async move {
                let name = object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let params = PatchParams::apply("portcullis-agent").force();
                reports.patch(&name, &params, &Patch::Apply(&object)).await
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<_>>()
        .await?;
    let status = eventually("the NSG to count every agent", || async {
        let status = nsgs.get("nsg").await.ok()?.status?;
        (status.agents == Some(agents as u32)
            && !status.enforcement.iter().any(|e| e.agent == "old-node"))
        .then_some(status)
    })
    .await?;
    assert_eq!(status.enforcement.len(), MAX_LISTED_REPORTS);
    assert_eq!(
        status.enforcement[0].agent,
        format!("node-{:04}", agents - 1)
    );
    assert_eq!(status.enforcement[1].agent, "node-0000");
    assert_eq!(status.enforcement[1].error, None);
    let enforced = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Enforced")
        .ok_or("no Enforced condition")?;
    assert_eq!(
        (enforced.status.as_str(), enforced.reason.as_str()),
        ("False", "AgentError")
    );
    assert!(
        enforced
            .message
            .starts_with(&format!("1 of {agents} agents")),
        "{}",
        enforced.message
    );
    let size = serde_json::to_vec(&nsgs.get("nsg").await?)?.len();
    assert!(size < 64 * 1024, "the NSG is {size} bytes");
    Ok(())
}

async fn nsg_reports_exposure_and_conflicts(ctx: Ctx) -> TestResult {
    let exposed = nsg(&inline_allow("ssh-from-anywhere", 500, "*", 22));
    succeeded(&ctx.apply(&exposed))?;
    let nsgs: Api<NetworkSecurityGroup> = ctx.api();
    let status = eventually("exposure of port 22", || async {
        let status = nsgs.get("nsg").await.ok()?.status?;
        (!status.exposure.is_empty()).then_some(status)
    })
    .await?;
    assert_eq!(status.exposed_ports.as_deref(), Some("22/Tcp"));
    assert_eq!(status.exposure[0].rule, "ssh-from-anywhere");
    let listed = succeeded(&ctx.kubectl(&["get", "nsg", "nsg"]))?;
    assert!(listed.contains("22/Tcp"), "{listed}");

    // A user SecurityRule at an inline rule's priority is a conflict.
    let clash = r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: SecurityRule
metadata:
  name: clash
spec:
  networkSecurityGroupName: nsg
  priority: 300
  direction: Inbound
  access: Deny
  protocol: Tcp
  sourceAddressPrefix: "*"
  sourcePortRange: "*"
  destinationAddressPrefix: "*"
  destinationPortRange: "80"
"#;
    succeeded(&ctx.apply(clash))?;
    let conflict = eventually("a PriorityConflict condition", || async {
        let status = nsgs.get("nsg").await.ok()?.status?;
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "PriorityConflict" && c.status == "True")
    })
    .await?;
    assert!(
        conflict.message.contains("allow-http") && conflict.message.contains("clash"),
        "{}",
        conflict.message
    );
    Ok(())
}

async fn expired_request_never_grants_again(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    let manifest = request("once", 22, "198.19.0.10", "PT2S");
    succeeded(&ctx.apply_as("alice", &["team-web"], &manifest))?;
    let expired = ctx.phase_of("once", Phase::Expired).await?;
    let rule = expired.status.as_ref().unwrap().grants[0].rule.clone();
    // Re-applying the same manifest (a GitOps tool's resync) changes nothing.
    succeeded(&ctx.apply(&manifest))?;
    let requests: Api<JitRequest> = ctx.api();
    requests
        .patch(
            "once",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"touched": "yes"}}})),
        )
        .await?;
    let policies: Api<JitPolicy> = ctx.api();
    // Wait until the operator has seen the touch: the policy's history is recomputed from it.
    eventually("the policy to process the touched request", || async {
        let p = policies.get("web").await.ok()?;
        p.status?
            .requests
            .iter()
            .any(|r| r.request == "once")
            .then_some(())
    })
    .await?;
    let again = requests.get("once").await?;
    assert_eq!(again.status.unwrap().phase, Some(Phase::Expired));
    let rules: Api<SecurityRule> = ctx.api();
    assert!(rules.get_opt(&rule).await?.is_none());
    Ok(())
}

async fn kubectl_wait_for_granted_works(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    succeeded(&ask(&ctx, "waited", "alice", 22, "198.19.0.10", "PT30M"))?;
    succeeded(&ctx.kubectl(&[
        "wait",
        "--for=jsonpath={.status.phase}=Granted",
        "jitr/waited",
        "--timeout=60s",
    ]))?;
    let listed = succeeded(&ctx.kubectl(&["get", "jitr", "waited"]))?;
    let row: BTreeMap<&str, &str> = listed
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .zip(listed.lines().nth(1).unwrap().split_whitespace())
        .collect();
    assert_eq!(row.get("POLICY"), Some(&"web"));
    assert_eq!(row.get("REQUESTOR"), Some(&"alice"));
    assert_eq!(row.get("PHASE"), Some(&"Granted"));
    assert_eq!(row.get("SOURCE"), Some(&"198.19.0.10"));
    Ok(())
}

async fn metrics_count_grants(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    succeeded(&ask(&ctx, "counted", "alice", 22, "198.19.0.10", "PT30M"))?;
    ctx.phase_of("counted", Phase::Granted).await?;
    let body = http_get(ctx.operator, "/metrics").await?;
    for needle in [
        "portcullis_grants_total{result=\"Granted\"}",
        "portcullis_active_grants",
        "portcullis_grant_latency_seconds_count",
    ] {
        assert!(
            body.contains(needle),
            "missing {needle} in /metrics:\n{body}"
        );
    }
    // The gauge is recounted on a timer: it must come to count this grant (tests share the
    // operator, so other grants may be open too).
    let operator = ctx.operator;
    eventually(
        "the active-grants gauge to count the grant",
        || async move {
            let body = http_get(operator, "/metrics").await.ok()?;
            let value: f64 = body
                .lines()
                .find_map(|l| l.strip_prefix("portcullis_active_grants "))?
                .trim()
                .parse()
                .ok()?;
            (value >= 1.0).then_some(())
        },
    )
    .await?;
    assert!(http_get(ctx.operator, "/readyz").await?.contains("ok"));
    Ok(())
}

/// A plain HTTP/1.0 GET, enough for the operator's own endpoints.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String, std::io::Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}
