//! The attack on placement: the JIT deny goes just below user rules that match its ports
//! (they keep precedence), so an admin's `Allow TCP 22 from Internet` above it keeps SSH open
//! to everyone while the policy would say the machine is protected. The policy must say
//! `Exposed` instead, name the rule, and turn `Configured` again once the rule admits only
//! sources the policy allows.

use std::collections::BTreeMap;

use kube::api::Api;
use portcullis::api::conditions::{self, reason};
use portcullis::api::jit_policy::MachineState;
use portcullis::api::{JitPolicy, SecurityRule};

use crate::support::{Ctx, TestResult, eventually, inline_allow, ssh_policy, succeeded, web_nsg};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        inline_rule_exposes_until_fixed,
        security_rule_exposes_until_fixed,
    ]
}

/// The NSG of the machines, with `rules` (YAML list items) inline.
fn nsg(rules: &str) -> String {
    web_nsg("198.18.0.0/24", rules)
}

/// The admin's SSH rule at priority 100, from `source`, as an inline rule.
fn inline_ssh(source: &str) -> String {
    inline_allow("ssh-for-admins", 100, source, 22)
}

/// The same rule as a user's own `SecurityRule` object (no managed-by label).
fn ssh_object(source: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: SecurityRule
metadata:
  name: ssh-for-admins
spec:
  networkSecurityGroupName: nsg
  priority: 100
  direction: Inbound
  access: Allow
  protocol: Tcp
  sourceAddressPrefix: "{source}"
  sourcePortRange: "*"
  destinationAddressPrefix: "*"
  destinationPortRange: "22"
"#
    )
}

/// SSH on web-1 (198.18.0.10) may be requested from 198.19.0.0/16 only.
fn policy() -> String {
    ssh_policy("198.19.0.0/16", "")
}

/// The policy once web-1 is in state `wanted`.
async fn web_1(ctx: &Ctx, wanted: MachineState) -> Result<JitPolicy, String> {
    let policies: Api<JitPolicy> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    eventually(&format!("web-1 to be {wanted:?}"), || async {
        let policy = policies.get_opt("web").await.ok().flatten()?;
        policy
            .status
            .as_ref()?
            .virtual_machines
            .iter()
            .any(|m| m.name == "web-1" && m.state == wanted)
            .then_some(policy)
    })
    .await
}

/// Checks what an exposed web-1 must show: a machine message and a `Ready=False/Exposed`
/// condition naming the rule, its priority and source and the port; the deny still in place
/// (below the user's rule); and `kubectl get jitp` showing it at a glance.
async fn assert_exposed(ctx: &Ctx, policy: &JitPolicy, kind: &str, source: &str) -> TestResult {
    let status = policy.status.as_ref().ok_or("no status")?;
    let machine = &status.virtual_machines[0];
    for needle in [
        format!("{kind} \"ssh-for-admins\" (priority 100)"),
        format!("open to {source}"),
        "port 22/Tcp".to_owned(),
    ] {
        assert!(
            machine.message.contains(&needle),
            "the machine message lacks {needle:?}: {}",
            machine.message
        );
    }
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::READY)
        .ok_or("no Ready condition")?;
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", reason::EXPOSED),
        "{ready:?}"
    );
    assert!(
        ready.message.contains("web-1") && ready.message.contains("ssh-for-admins"),
        "the Ready message names neither the machine nor the rule: {}",
        ready.message
    );

    let deny = machine
        .deny_rule
        .as_deref()
        .ok_or("no deny rule reported")?;
    let rules: Api<SecurityRule> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let deny = eventually("the deny rule to exist", || async {
        rules.get_opt(deny).await.ok().flatten()
    })
    .await?;
    assert!(
        deny.spec.fields.priority > 100,
        "the deny stays below the user's rule: {}",
        deny.spec.fields.priority
    );

    let listed = succeeded(&ctx.kubectl(&["get", "jitp", "web"]))?;
    let row: BTreeMap<&str, &str> = listed
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .zip(listed.lines().nth(1).unwrap_or_default().split_whitespace())
        .collect();
    assert_eq!(
        (row.get("READY"), row.get("MACHINES")),
        (Some(&"False"), Some(&"0/1")),
        "{listed}"
    );
    Ok(())
}

/// Checks that web-1 is protected again and the policy `Ready`.
fn assert_protected(policy: &JitPolicy) -> TestResult {
    let status = policy.status.as_ref().ok_or("no status")?;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::READY)
        .ok_or("no Ready condition")?;
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", reason::RECONCILED),
        "{ready:?}"
    );
    assert_eq!(status.configured_machines.as_deref(), Some("1/1"));
    Ok(())
}

async fn inline_rule_exposes_until_fixed(ctx: Ctx) -> TestResult {
    succeeded(&ctx.apply(&nsg(&inline_ssh("Internet"))))?;
    succeeded(&ctx.apply(&policy()))?;
    let policy = web_1(&ctx, MachineState::Exposed).await?;
    assert_exposed(&ctx, &policy, "NSG rule", "Internet").await?;

    // The admin narrows the rule to part of what the policy allows: nothing is exposed.
    succeeded(&ctx.apply(&nsg(&inline_ssh("198.19.0.0/24"))))?;
    assert_protected(&web_1(&ctx, MachineState::Configured).await?)
}

async fn security_rule_exposes_until_fixed(ctx: Ctx) -> TestResult {
    succeeded(&ctx.apply(&nsg("")))?;
    succeeded(&ctx.apply(&policy()))?;
    assert_protected(&web_1(&ctx, MachineState::Configured).await?)?;

    // A rule added later, as its own object, opens SSH to everyone above the deny.
    succeeded(&ctx.apply(&ssh_object("*")))?;
    let policy = web_1(&ctx, MachineState::Exposed).await?;
    assert_exposed(&ctx, &policy, "SecurityRule", "*").await?;

    succeeded(&ctx.apply(&ssh_object("198.19.0.0/24")))?;
    assert_protected(&web_1(&ctx, MachineState::Configured).await?)
}
