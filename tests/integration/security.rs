//! The install attacked by its own users. Every test is an abuse a requester (or an admin's
//! slip) could try, run through `kubectl` with impersonation (`--as`, `--as-group`) against
//! exactly the admission `deploy/` ships (`deploy/admission/`, no webhook) and the operator
//! running as its own service account.

use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
use kube::api::{Api, DeleteParams, PostParams};
use portcullis::access::materialize::{Owner, allow_rule_name, deny_rule_name, report_name};
use portcullis::api::jit_policy::{GrantState, GrantStateReason, MachineState};
use portcullis::api::jit_request::Phase;
use portcullis::api::{JitPolicy, JitRequest, SecurityRule};
use portcullis::rules::Protocol;

use crate::support::{
    Ctx, TestResult, eventually, failed, policy_admin_binding, ssh_policy, succeeded,
};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        forged_requestor_is_refused_and_forged_groups_dropped,
        foreign_policy_is_refused_at_apply_naming_initiate,
        initiate_withdrawn_while_pending_is_denied_at_grant_time,
        only_the_requestor_or_a_revoker_may_revoke,
        lookalike_names_never_share_a_rule,
        operator_never_takes_over_a_rule_it_does_not_own,
        deleting_a_request_beyond_the_bounded_history_completes,
        a_revoke_finalizer_stripped_from_a_grant_is_put_back,
        idle_reports_come_from_agents_and_count_where_the_policy_asks,
        managed_rules_are_the_operators_alone,
        admission_policies_type_check,
    ]
}

const NSG: &str = r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: NetworkSecurityGroup
metadata:
  name: nsg
spec:
  virtualNetworkPrefixes: ["198.18.0.0/24"]
"#;

/// Policy `name` protecting SSH on `machines` (`(name, address)`) of `nsg`, from
/// 198.19.0.0/16 for up to an hour.
fn policy(name: &str, machines: &[(&str, &str)]) -> String {
    let machines: String = machines
        .iter()
        .map(|(machine, address)| {
            format!(
                "  - name: {machine}
    address: {address}
    networkSecurityGroupName: nsg
    ports:
    - number: 22
      protocol: TCP
      allowedSourceAddressPrefix: 198.19.0.0/16
      maxRequestAccessDuration: PT1H
"
            )
        })
        .collect();
    format!(
        "apiVersion: jit.portcullis.dev/v1alpha1
kind: JitPolicy
metadata:
  name: {name}
spec:
  virtualMachines:
{machines}"
    )
}

/// A request `name` under `policy` for SSH on `machine` from `source`, with `extra` spec
/// lines (e.g. a forged requestor) appended.
fn request(name: &str, policy: &str, machine: &str, source: &str, extra: &str) -> String {
    format!(
        "apiVersion: jit.portcullis.dev/v1alpha1
kind: JitRequest
metadata:
  name: {name}
spec:
  policyName: {policy}
  virtualMachines:
  - name: {machine}
    ports:
    - number: 22
      duration: PT30M
      allowedSourceAddressPrefix: {source}
{extra}"
    )
}

/// A Role in the test's namespace with `rules` (YAML list items), bound to `user`.
fn role_for(ctx: &Ctx, user: &str, rules: &str) -> Result<(), String> {
    succeeded(&ctx.apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {user}
rules:
{rules}---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {user}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {user}}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}
"
    )))
    .map(drop)
}

/// Requester rights limited to the policy `web`, as the README shows them.
const WEB_REQUESTER: &str = r#"- apiGroups: ["jit.portcullis.dev"]
  resources: ["jitrequests"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: ["jit.portcullis.dev"]
  resources: ["jitpolicies"]
  resourceNames: ["web"]
  verbs: ["get", "initiate"]
"#;

/// The UID of the object that controls `rule`.
fn controller_uid(rule: &SecurityRule) -> Option<String> {
    rule.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
}

async fn setup(ctx: &Ctx) -> TestResult {
    succeeded(&ctx.apply(NSG))?;
    succeeded(&ctx.apply(&policy("web", &[("web-1", "198.18.0.10")])))?;
    Ok(())
}

/// Hole: with only `deploy/` installed, a requester could write any `spec.requestor`.
async fn forged_requestor_is_refused_and_forged_groups_dropped(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    let forged = request(
        "forged",
        "web",
        "web-1",
        "198.19.0.10",
        "  requestor:\n    username: mallory\n",
    );
    let refused = failed(&ctx.apply_as("alice", &["team-web"], &forged))?;
    assert!(
        refused.contains("spec.requestor must be the caller alice"),
        "{refused}"
    );
    // Naming oneself but claiming more groups (or another uid) is rewritten to the truth.
    let inflated = request(
        "inflated",
        "web",
        "web-1",
        "198.19.0.10",
        "  requestor:\n    username: alice\n    uid: \"0\"\n    groups: [\"system:masters\"]\n",
    );
    succeeded(&ctx.apply_as("alice", &["team-web"], &inflated))?;
    let stored = Api::<JitRequest>::namespaced(ctx.client.clone(), &ctx.ns)
        .get("inflated")
        .await?;
    let requestor = stored.spec.requestor.ok_or("no requestor stamped")?;
    assert_eq!(requestor.username, "alice");
    assert_ne!(requestor.uid.as_deref(), Some("0"), "{requestor:?}");
    assert!(
        !requestor.groups.iter().any(|g| g == "system:masters")
            && requestor.groups.iter().any(|g| g == "team-web"),
        "{requestor:?}"
    );
    assert!(
        stored
            .metadata
            .finalizers
            .unwrap_or_default()
            .iter()
            .any(|f| f == portcullis::api::jit_request::REVOKE_FINALIZER),
        "admission adds the revoke finalizer"
    );
    ctx.phase_of("inflated", Phase::Granted).await?;
    Ok(())
}

/// Hole: a requester could request under a policy they may not `initiate`.
async fn foreign_policy_is_refused_at_apply_naming_initiate(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    succeeded(&ctx.apply(&policy("db", &[("db-1", "198.18.0.20")])))?;
    role_for(&ctx, "dave", WEB_REQUESTER)?;
    let refused = failed(&ctx.apply_as(
        "dave",
        &[],
        &request("sneaky", "db", "db-1", "198.19.0.10", ""),
    ))?;
    let wanted = format!(
        "dave may not initiate jitpolicies/db in namespace {}",
        ctx.ns
    );
    assert!(refused.contains(&wanted), "{refused}");
    // A policy that does not exist yet is no loophole: the check is by name.
    let refused = failed(&ctx.apply_as(
        "dave",
        &[],
        &request("early", "later", "db-1", "198.19.0.10", ""),
    ))?;
    assert!(
        refused.contains("may not initiate jitpolicies/later"),
        "{refused}"
    );
    // The policy dave may use works.
    succeeded(&ctx.apply_as(
        "dave",
        &[],
        &request("fine", "web", "web-1", "198.19.0.10", ""),
    ))?;
    ctx.phase_of("fine", Phase::Granted).await?;
    // Without any role, RBAC refuses before admission does.
    failed(&ctx.apply_as(
        "nobody",
        &[],
        &request("nope", "web", "web-1", "198.19.0.10", ""),
    ))?;
    Ok(())
}

/// Hole: authorization was checked once, at admission; a request waiting `Pending` was
/// granted later even after the requester lost `initiate`.
async fn initiate_withdrawn_while_pending_is_denied_at_grant_time(ctx: Ctx) -> TestResult {
    role_for(&ctx, "erin", WEB_REQUESTER)?;
    // The policy is not there yet, so the request waits.
    succeeded(&ctx.apply_as(
        "erin",
        &[],
        &request("waiting", "web", "web-1", "198.19.0.10", ""),
    ))?;
    let pending = ctx.phase_of("waiting", Phase::Pending).await?;
    assert_eq!(
        pending.status.and_then(|s| s.reason).as_deref(),
        Some("PolicyNotFound")
    );
    succeeded(&ctx.kubectl(&["delete", "rolebinding", "erin"]))?;
    eventually("RBAC to drop erin's initiate", || async {
        let out = ctx.kubectl(&[
            "auth",
            "can-i",
            "initiate",
            "jitpolicies.jit.portcullis.dev/web",
            "--as=erin",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .eq("no")
            .then_some(())
    })
    .await?;
    setup(&ctx).await?;
    let denied = ctx.phase_of("waiting", Phase::Denied).await?;
    let status = denied.status.unwrap_or_default();
    assert_eq!(status.reason.as_deref(), Some("NotAuthorized"));
    let violations = status.violations.join("; ");
    assert!(
        violations.contains(&format!(
            "erin may not initiate jitpolicies/web in namespace {}",
            ctx.ns
        )),
        "{violations}"
    );
    let rules: Api<SecurityRule> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let allows: Vec<_> = rules
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|r| {
            r.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("jit-allow-"))
        })
        .collect();
    assert!(allows.is_empty(), "a rule was opened: {allows:?}");
    Ok(())
}

/// Hole: anyone with `delete` on jitrequests revoked anyone's grant.
async fn only_the_requestor_or_a_revoker_may_revoke(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    succeeded(&ctx.apply_as(
        "alice",
        &["team-web"],
        &request("alices", "web", "web-1", "198.19.0.10", ""),
    ))?;
    ctx.phase_of("alices", Phase::Granted).await?;
    // mallory is a requester too (the same ClusterRole, with `delete` on jitrequests).
    let refused = failed(&ctx.kubectl_impersonating(
        "mallory",
        &["team-web"],
        &["delete", "jitr", "alices", "--wait=false"],
        None,
    ))?;
    assert!(
        refused.contains("mallory may not revoke jitrequests/alices")
            && refused.contains("revoke on jitpolicies/web"),
        "{refused}"
    );
    ctx.phase_of("alices", Phase::Granted).await?;
    // A policy admin holds `revoke` (deploy/user-roles.yaml) and may.
    succeeded(&ctx.apply(&policy_admin_binding("frank")))?;
    succeeded(&ctx.kubectl_impersonating(
        "frank",
        &[],
        &["delete", "jitr", "alices", "--wait=true"],
        None,
    ))?;
    // And a requestor may always revoke their own.
    succeeded(&ctx.apply_as(
        "alice",
        &["team-web"],
        &request("again", "web", "web-1", "198.19.0.10", ""),
    ))?;
    ctx.phase_of("again", Phase::Granted).await?;
    succeeded(&ctx.kubectl_impersonating(
        "alice",
        &["team-web"],
        &["delete", "jitr", "again", "--wait=true"],
        None,
    ))?;
    Ok(())
}

/// Hole: an agent's report that a grant is idle ends it (`Revoked`/`Idle`), and the
/// operator took it for any grant of the NSG, also on a port whose policy sets no
/// `idleTimeout`. Reports are `AgentReport`s, which requesters and policy admins may not
/// write, and which an agent may write only for an NSG it holds the verb `report` on (as
/// deploy/agent/rbac.yaml gives it its one NSG): an agent of another NSG is refused at
/// admission, and so is an agent on one node reporting as another. A report naming a grant
/// of a port without an idle limit is ignored, while the same report ends the grant of a
/// port with one.
async fn idle_reports_come_from_agents_and_count_where_the_policy_asks(ctx: Ctx) -> TestResult {
    succeeded(&ctx.apply(NSG))?;
    let rdp = "    - number: 3389
      protocol: TCP
      allowedSourceAddressPrefix: 198.19.0.0/16
      maxRequestAccessDuration: PT1H
      idleTimeout: PT1H
";
    succeeded(&ctx.apply(&ssh_policy("198.19.0.0/16", rdp)))?;
    let rdp = "    - number: 3389
      duration: PT30M
      allowedSourceAddressPrefix: 198.19.0.10
";
    succeeded(&ctx.apply_as(
        "alice",
        &["team-web"],
        &request("alices", "web", "web-1", "198.19.0.10", rdp),
    ))?;
    let granted = ctx.phase_of("alices", Phase::Granted).await?;
    let grants = granted.status.ok_or("no status")?.grants;
    let idle: Vec<serde_json::Value> = grants
        .iter()
        .map(|g| serde_json::json!({"rule": g.rule}))
        .collect();
    let report = serde_json::json!({
        "apiVersion": "jit.portcullis.dev/v1alpha1",
        "kind": "AgentReport",
        "metadata": {"name": report_name("nsg", "vm-1")},
        "spec": {
            "networkSecurityGroupName": "nsg",
            "agent": "vm-1", "host": "vm-1", "addresses": ["198.18.0.10"], "observedGeneration": 1,
            "rulesHash": "0123456789abcdef", "appliedAt": "2026-01-01T00:00:00Z",
            "idleGrants": idle
        }
    })
    .to_string();
    succeeded(&ctx.apply(&policy_admin_binding("frank")))?;
    role_for(&ctx, "agent-other", &agent_rules("other-nsg"))?;
    role_for(&ctx, "agent-nsg", &agent_rules("nsg"))?;
    // Applied as an agent applies it (a patch, no read first).
    let apply = [
        "apply",
        "--server-side",
        "--field-manager=portcullis-agent-vm-1",
        "--force-conflicts",
        "-f",
        "-",
    ];
    // The DaemonSet's agents hold tokens bound to their node: one reports as its node only.
    let on_node = |node: &str| {
        let mut args = vec![format!(
            "--as-user-extra=authentication.kubernetes.io/node-name={node}"
        )];
        args.extend(apply.iter().map(|a| (*a).to_owned()));
        args
    };
    let plain: Vec<String> = apply.iter().map(|a| (*a).to_owned()).collect();
    let refusals = [
        (
            "mallory",
            &["team-web"][..],
            plain.clone(),
            "cannot patch resource \"agentreports\"",
        ),
        (
            "frank",
            &[][..],
            plain.clone(),
            "cannot patch resource \"agentreports\"",
        ),
        (
            "agent-other",
            &[][..],
            plain,
            "agent-other may not report on networksecuritygroups/nsg",
        ),
        (
            "agent-nsg",
            &[][..],
            on_node("node-2"),
            "the agent on node node-2 reports as that node: spec.agent must be node-2, not vm-1",
        ),
    ];
    for (user, groups, args, why) in refusals {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let refused = failed(&ctx.kubectl_impersonating(user, groups, &args, Some(&report)))?;
        assert!(refused.contains(why), "{user}: {refused}");
    }
    // Written as the NSG's agent on its node writes it: the grant with an idle limit ends,
    // the other stays.
    let on_vm_1 = on_node("vm-1");
    let on_vm_1: Vec<&str> = on_vm_1.iter().map(String::as_str).collect();
    succeeded(&ctx.kubectl_impersonating("agent-nsg", &[], &on_vm_1, Some(&report)))?;
    let requests: Api<JitRequest> = ctx.api();
    let after = eventually("the 3389 grant revoked as idle", || async {
        let status = requests.get("alices").await.ok()?.status?;
        status
            .grants
            .iter()
            .any(|g| {
                g.number == 3389
                    && g.status == GrantState::Revoked
                    && g.status_reason == Some(GrantStateReason::Idle)
            })
            .then_some(status)
    })
    .await?;
    let ssh = after
        .grants
        .iter()
        .find(|g| g.number == 22)
        .ok_or("no SSH grant")?;
    assert_eq!(ssh.status, GrantState::Initiated, "{after:?}");
    assert_eq!(after.phase, Some(Phase::Granted), "{after:?}");
    Ok(())
}

/// What deploy/agent/rbac.yaml gives an agent, for NSG `nsg`: read the NSG and hold
/// `report` on it, read rules, write reports.
fn agent_rules(nsg: &str) -> String {
    format!(
        r#"- apiGroups: ["jit.portcullis.dev"]
  resources: ["networksecuritygroups"]
  resourceNames: ["{nsg}"]
  verbs: ["get", "list", "watch", "report"]
- apiGroups: ["jit.portcullis.dev"]
  resources: ["securityrules"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["jit.portcullis.dev"]
  resources: ["agentreports"]
  verbs: ["get", "list", "watch", "create", "patch"]
"#
    )
}

/// Hole: names joined with `-` collided: request `db` on machine `prod-api` and request
/// `db-prod` on machine `api` shared one allow rule, the second taking it over; policy
/// `x-y`/machine `z` and policy `x`/machine `y-z` shared one deny rule.
async fn lookalike_names_never_share_a_rule(ctx: Ctx) -> TestResult {
    succeeded(&ctx.apply(NSG))?;
    succeeded(&ctx.apply(&policy(
        "p",
        &[("prod-api", "198.18.0.30"), ("api", "198.18.0.31")],
    )))?;
    succeeded(&ctx.apply(&policy("x-y", &[("z", "198.18.0.40")])))?;
    succeeded(&ctx.apply(&policy("x", &[("y-z", "198.18.0.41")])))?;
    for (name, machine) in [("db", "prod-api"), ("db-prod", "api")] {
        succeeded(&ctx.apply_as(
            "alice",
            &["team-web"],
            &request(name, "p", machine, "198.19.0.10", ""),
        ))?;
    }
    let db = ctx.phase_of("db", Phase::Granted).await?;
    let db_prod = ctx.phase_of("db-prod", Phase::Granted).await?;
    let rule_of = |r: &JitRequest| r.status.as_ref().unwrap().grants[0].rule.clone();
    assert_ne!(rule_of(&db), rule_of(&db_prod));
    for request in [&db, &db_prod] {
        let uid = request.metadata.uid.clone().unwrap_or_default();
        let name = request.metadata.name.as_deref().unwrap_or_default();
        let machine = &request.spec.virtual_machines[0].name;
        let expected = allow_rule_name(Owner { name, uid: &uid }, machine, 22, Protocol::Tcp);
        assert_eq!(rule_of(request), expected);
        let rule = ctx.rule_named(&expected).await?;
        assert_eq!(controller_uid(&rule), Some(uid), "{expected} changed hands");
    }
    // Revoking one leaves the other open.
    succeeded(&ctx.kubectl(&["delete", "jitr", "db-prod", "--wait=true"]))?;
    ctx.rule_named(&rule_of(&db)).await?;
    ctx.phase_of("db", Phase::Granted).await?;

    for (policy, machine) in [("x-y", "z"), ("x", "y-z")] {
        let owner = ctx.policy_named(policy).await?;
        let uid = owner.metadata.uid.clone().unwrap_or_default();
        let name = deny_rule_name(
            Owner {
                name: policy,
                uid: &uid,
            },
            machine,
        );
        let rule = ctx.rule_named(&name).await?;
        assert_eq!(controller_uid(&rule), Some(uid), "{name} changed hands");
    }
    Ok(())
}

/// Names are unique per owner, yet a rule of that name may already be there (a user's rule,
/// or a hash clash): the operator reports it and never writes over it.
async fn operator_never_takes_over_a_rule_it_does_not_own(ctx: Ctx) -> TestResult {
    // The policy first: without its NSG nothing is materialized yet.
    succeeded(&ctx.apply(&policy("web", &[("web-1", "198.18.0.10")])))?;
    let owner = ctx.policy_named("web").await?;
    let uid = owner.metadata.uid.clone().unwrap_or_default();
    let name = deny_rule_name(
        Owner {
            name: "web",
            uid: &uid,
        },
        "web-1",
    );
    // A policy admin's own rule squats the name the deny rule will need.
    succeeded(&ctx.apply(&format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: SecurityRule
metadata:
  name: {name}
spec:
  networkSecurityGroupName: nsg
  priority: 3000
  direction: Inbound
  access: Allow
  protocol: Tcp
  sourceAddressPrefix: 198.18.0.0/24
  sourcePortRange: "*"
  destinationAddressPrefix: "*"
  destinationPortRange: "8443"
"#
    )))?;
    succeeded(&ctx.apply(NSG))?;
    let policies: Api<JitPolicy> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let reported = eventually("the policy to report the conflict", || async {
        let policy = policies.get("web").await.ok()?;
        let status = policy.status?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
        (ready.status == "False" && ready.reason == "RuleConflict").then_some(status)
    })
    .await?;
    let machine = &reported.virtual_machines[0];
    assert_eq!(machine.state, MachineState::RuleConflict);
    assert!(machine.message.contains(&name), "{}", machine.message);
    let squatter = ctx.rule_named(&name).await?;
    assert_eq!(
        squatter.spec.fields.access,
        portcullis::api::rule_fields::Access::Allow
    );
    assert!(
        squatter.metadata.owner_references.is_none() && squatter.metadata.labels.is_none(),
        "the operator took the rule over: {:?}",
        squatter.metadata
    );
    Ok(())
}

/// Hole: a granted request stripped of its revoke finalizer (by anyone who may patch it)
/// would be deleted without the operator revoking first. The operator puts it back, and a
/// later delete still revokes.
async fn a_revoke_finalizer_stripped_from_a_grant_is_put_back(ctx: Ctx) -> TestResult {
    use portcullis::api::jit_request::REVOKE_FINALIZER;
    setup(&ctx).await?;
    succeeded(&ctx.apply_as(
        "alice",
        &["team-web"],
        &request("kept", "web", "web-1", "198.19.0.10", ""),
    ))?;
    let granted = ctx.phase_of("kept", Phase::Granted).await?;
    let rule = granted.status.ok_or("no status")?.grants[0].rule.clone();
    succeeded(&ctx.kubectl(&[
        "patch",
        "jitrequest",
        "kept",
        "--type=json",
        "-p",
        r#"[{"op": "remove", "path": "/metadata/finalizers"}]"#,
    ]))?;
    let requests: Api<JitRequest> = ctx.api();
    eventually("the revoke finalizer to be put back", || async {
        let finalizers = requests.get("kept").await.ok()?.metadata.finalizers?;
        finalizers
            .iter()
            .any(|f| f == REVOKE_FINALIZER)
            .then_some(())
    })
    .await?;
    succeeded(&ctx.kubectl(&["delete", "jitrequest", "kept", "--wait=true"]))?;
    ctx.rule_gone(&rule).await?;
    Ok(())
}

/// Hole: with more than 50 requests under one policy, deleting an old one hung in its
/// finalizer, waiting for the bounded history to record it.
async fn deleting_a_request_beyond_the_bounded_history_completes(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    let requests: Api<JitRequest> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    succeeded(&ctx.apply(&request("oldest", "web", "web-1", "198.19.0.10", "")))?;
    let oldest = ctx.phase_of("oldest", Phase::Granted).await?;
    let started = oldest
        .status
        .and_then(|s| s.start_time)
        .ok_or("no start time")?;
    // Every later request starts in a later second, so `oldest` falls out of the history.
    eventually(
        "the clock to pass the oldest grant's start second",
        || async { (jiff::Timestamp::now().as_second() > started.0.as_second()).then_some(()) },
    )
    .await?;
    let limit = portcullis::controller::policy::HISTORY_LIMIT;
    for i in 0..limit {
        let newer: JitRequest = serde_yaml_ng::from_str(&request(
            &format!("newer-{i:02}"),
            "web",
            "web-1",
            "198.19.0.10",
            "",
        ))?;
        requests.create(&PostParams::default(), &newer).await?;
    }
    let policies: Api<JitPolicy> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    eventually("the history to be full without the oldest", || async {
        let history = policies.get("web").await.ok()?.status?.requests;
        (history.len() == limit && !history.iter().any(|r| r.request == "oldest")).then_some(())
    })
    .await?;
    requests.delete("oldest", &DeleteParams::default()).await?;
    eventually("the oldest request to be gone", || async {
        matches!(requests.get_opt("oldest").await, Ok(None)).then_some(())
    })
    .await?;
    Ok(())
}

/// Only the operator writes the rules the agents enforce: not a requester, not even the
/// cluster admin (who would have to remove the label first, which is refused too).
async fn managed_rules_are_the_operators_alone(ctx: Ctx) -> TestResult {
    setup(&ctx).await?;
    let owner = ctx.policy_named("web").await?;
    let uid = owner.metadata.uid.clone().unwrap_or_default();
    let deny = deny_rule_name(
        Owner {
            name: "web",
            uid: &uid,
        },
        "web-1",
    );
    ctx.rule_named(&deny).await?;
    let forged = r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: SecurityRule
metadata:
  name: forged-allow
  labels:
    app.kubernetes.io/managed-by: portcullis
spec:
  networkSecurityGroupName: nsg
  priority: 100
  direction: Inbound
  access: Allow
  protocol: Tcp
  sourceAddressPrefix: "*"
  sourcePortRange: "*"
  destinationAddressPrefix: "*"
  destinationPortRange: "22"
"#;
    let refused = failed(&ctx.apply(forged))?;
    assert!(
        refused.contains("admin may not write SecurityRule forged-allow"),
        "{refused}"
    );
    for patch in [
        r#"{"metadata":{"labels":{"app.kubernetes.io/managed-by":null}}}"#,
        r#"{"metadata":{"ownerReferences":null}}"#,
        r#"{"spec":{"destinationPortRange":"2222","destinationPortRanges":null}}"#,
    ] {
        let refused = failed(&ctx.kubectl(&[
            "patch",
            "nsgrule",
            deny.as_str(),
            "--type=merge",
            "-p",
            patch,
        ]))?;
        assert!(
            refused.contains("written only by the Portcullis operator"),
            "{patch}: {refused}"
        );
    }
    // Metadata that GitOps tools and other controllers write is not the operator's alone.
    succeeded(&ctx.kubectl(&[
        "annotate",
        "nsgrule",
        deny.as_str(),
        "example.com/reviewed=yes",
    ]))?;
    Ok(())
}

/// The shipped policies compile against the CRDs without warnings: a typo in a field name
/// would otherwise surface only as a refusal (or a pass) at request time.
async fn admission_policies_type_check(ctx: Ctx) -> TestResult {
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(ctx.client.clone());
    for name in [
        "portcullis-jitrequest-create",
        "portcullis-jitrequest-delete",
        "portcullis-managed-securityrules",
    ] {
        let checked = eventually(&format!("{name} to be type checked"), || async {
            let policy = policies.get(name).await.ok()?;
            let status = policy.status?;
            (status.observed_generation == policy.metadata.generation).then_some(status)
        })
        .await?;
        let warnings = checked
            .type_checking
            .and_then(|t| t.expression_warnings)
            .unwrap_or_default();
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
    }
    Ok(())
}
