//! The agent failing closed: a restart with the apiserver out of reach puts the stored
//! table back (a reboot opens nothing), and a protected port is closed on every address
//! of the machine, IPv4 and IPv6, not only the one the policy names. Same lab as
//! [`crate::enforcement`]; addresses from 198.18.0.0/15 and 2001:2::/48 only.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use jiff::Timestamp;
use kube::api::Api;
use portcullis::api::NetworkSecurityGroup;

use crate::enforcement::{
    A, B, Error, Lab, SLOW_CONNECT, VM, VM_6, agent_report, enforced, expiry, granted, ip, nsg,
    policy, request, skipped,
};
use crate::support::{Ctx, TestResult, eventually, succeeded};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        a_restart_without_apiserver_restores_the_table,
        a_ruleset_that_cannot_be_stored_is_enforced_and_reported,
        every_address_of_the_machine_is_protected,
    ]
}

/// The vm's second IPv4 address; the clients' IPv6 addresses.
const VM_2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
/// An address the vm gets while the agent runs.
const VM_3: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
const A_6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x20);
const B_6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x21);

async fn a_restart_without_apiserver_restores_the_table(ctx: Ctx) -> TestResult {
    if skipped("a_restart_without_apiserver_restores_the_table") {
        return Ok(());
    }
    let mut lab = Lab::new(&[A, B])?;
    lab.start_agent(&ctx, "vm-1")?;
    enforced(&ctx, &lab, "vm-1").await?;
    succeeded(&ctx.apply(&policy()))?;
    succeeded(&ctx.apply_as("alice", &["team-web"], &request("ssh-a", A.into(), "PT30S")))?;
    granted(&ctx, "ssh-a").await?;
    let expires = expiry(&ctx, "ssh-a").await?;
    // Nothing listens on 22: a SYN that passes is answered by a reset.
    lab.until(A, 22, true).await?;
    lab.until(B, 22, false).await?;
    // An added grant is stored just after it is applied, off the agent's loop: the reboot
    // comes once it is on disk (before that, a restart restores less, never more).
    let state = lab.path("state").join("portcullis.json");
    eventually("the grant stored", || async {
        std::fs::read_to_string(&state)
            .is_ok_and(|stored| stored.contains(&A.to_string()))
            .then_some(())
    })
    .await?;

    // A reboot: the agent gone, the kernel's table gone, the apiserver out of reach.
    let mut agent = lab.agent.take().ok_or("no agent")?;
    agent.kill().await?;
    agent.wait().await?;
    // The killed agent may leave an `nft` child that finishes its transaction after the
    // delete, so the table is deleted until the port is seen open.
    eventually("port 22 open without the agent's table", || async {
        let _ = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.vm,
                "nft",
                "delete",
                "table",
                "inet",
                "portcullis",
            ])
            .status();
        lab.connect_to(B.into(), VM.into(), 22, SLOW_CONNECT)
            .await
            .passed()
            .then_some(())
    })
    .await?;
    let admin = std::fs::read_to_string(ctx.plane.kubeconfig("admin"))?;
    let unreachable = lab.path("unreachable.kubeconfig");
    // Port 9 on loopback: nothing listens, every connect is refused.
    std::fs::write(
        &unreachable,
        admin.replace(ctx.plane.server(), "https://127.0.0.1:9"),
    )?;
    let started = Instant::now();
    lab.start_agent_with(&ctx, "vm-1", &["--address", &VM.to_string()], &unreachable)?;
    lab.until(B, 22, false).await?;
    let closed_after = started.elapsed();
    if closed_after.as_secs_f64() > 2.0 {
        return Err(format!("port 22 closed {closed_after:?} after the agent started").into());
    }
    // The grant still works, and still ends on time, with nobody to ask.
    if !lab
        .connect_to(A.into(), VM.into(), 22, SLOW_CONNECT)
        .await
        .passed()
    {
        return Err(format!("the restored grant does not admit A:\n{}", lab.agent_log()).into());
    }
    lab.until(A, 22, false).await?;
    let late = Timestamp::now().duration_since(expires).as_secs_f64();
    if !(-0.5..=2.5).contains(&late) {
        return Err(format!("the restored grant ended {late:.2} s after its expiry").into());
    }
    if !lab.agent_log().contains("stored ruleset restored") {
        return Err(format!("no restore in the agent log:\n{}", lab.agent_log()).into());
    }
    Ok(())
}

/// The vm gets [`VM_2`] and [`VM_6`], the client [`A_6`] and [`B_6`].
/// A full or read-only disk must not open anything or stop enforcement: the rules are
/// applied, the agent's report says they are not stored (a restart would not restore
/// them), and once the disk takes the file again the report says so without any other
/// change.
async fn a_ruleset_that_cannot_be_stored_is_enforced_and_reported(ctx: Ctx) -> TestResult {
    if skipped("a_ruleset_that_cannot_be_stored_is_enforced_and_reported") {
        return Ok(());
    }
    let mut lab = Lab::new(&[A, B])?;
    // A file where the state directory would be: every store fails.
    let state = lab.path("state");
    std::fs::write(&state, b"")?;
    lab.start_agent(&ctx, "vm-1")?;
    succeeded(&ctx.apply(&nsg()))?;
    succeeded(&ctx.apply(&policy()))?;
    let error = || async {
        let report = agent_report(&ctx, "vm-1").await?.spec.report;
        Some((report.error, report.rules_hash))
    };
    eventually("the agent to report that it cannot store", || async {
        let (error, hash) = error().await?;
        (hash != "none" && error?.contains("enforced but not stored")).then_some(())
    })
    .await
    .map_err(|e| format!("{e}\nagent log:\n{}", lab.agent_log()))?;
    lab.until(B, 22, false).await?;
    succeeded(&ctx.apply_as("alice", &["team-web"], &request("ssh-a", A.into(), "PT1M")))?;
    granted(&ctx, "ssh-a").await?;
    lab.until(A, 22, true).await?;

    std::fs::remove_file(&state)?;
    eventually("the agent to report the ruleset stored", || async {
        error().await?.0.is_none().then_some(())
    })
    .await
    .map_err(|e| format!("{e}\nagent log:\n{}", lab.agent_log()))?;
    let stored = std::fs::read_to_string(state.join("portcullis.json"))?;
    if !stored.contains(&A.to_string()) {
        return Err("the stored ruleset lacks the grant".into());
    }
    Ok(())
}

fn dual_stack(lab: &Lab) -> Result<(), Error> {
    let (vm, client) = (lab.vm.as_str(), lab.client.as_str());
    ip(&[
        "-n",
        vm,
        "addr",
        "add",
        &format!("{VM_2}/32"),
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        client,
        "route",
        "add",
        &format!("{VM_2}/32"),
        "dev",
        "eth0",
    ])?;
    lab.add_ipv6(VM_6, &[A_6, B_6])
}

async fn every_address_of_the_machine_is_protected(ctx: Ctx) -> TestResult {
    if skipped("every_address_of_the_machine_is_protected") {
        return Ok(());
    }
    let mut lab = Lab::new(&[A, B])?;
    dual_stack(&lab)?;
    // No --address: the agent protects whatever the machine has.
    let kubeconfig = ctx.plane.kubeconfig("admin");
    lab.start_agent_with(&ctx, "vm-1", &[], &kubeconfig)?;
    enforced(&ctx, &lab, "vm-1").await?;
    let nsgs: Api<NetworkSecurityGroup> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    eventually("the agent to report every address", || async {
        let status = nsgs.get_opt("nsg").await.ok().flatten()?.status?;
        let mine = status.enforcement.iter().find(|r| r.agent == "vm-1")?;
        [VM.to_string(), VM_2.to_string(), VM_6.to_string()]
            .iter()
            .all(|a| mine.addresses.contains(a))
            .then_some(())
    })
    .await?;
    // The policy names 198.18.0.10 only, and lets IPv6 clients ask too.
    let dual = policy().replace(
        "allowedSourceAddressPrefix: 198.18.0.16/28",
        "allowedSourceAddressPrefixes: [198.18.0.16/28, \"2001:2::/48\"]",
    );
    if dual == policy() {
        return Err("the policy template changed; the test would not test IPv6".into());
    }
    succeeded(&ctx.apply(&dual))?;
    let (a, a_6, b_6): (IpAddr, IpAddr, IpAddr) = (A.into(), A_6.into(), B_6.into());
    for (source, destination) in [(a, VM.into()), (a, VM_2.into()), (a_6, VM_6.into())] {
        lab.until_to(source, destination, 22, false).await?;
    }
    // An IPv6 grant opens the machine's IPv6 address to that source, and nothing else.
    succeeded(&ctx.apply_as("alice", &["team-web"], &request("ssh-6", a_6, "PT10M")))?;
    granted(&ctx, "ssh-6").await?;
    lab.until_to(a_6, VM_6.into(), 22, true).await?;
    for (source, destination) in [(b_6, VM_6.into()), (a, VM.into()), (a, VM_2.into())] {
        if lab
            .connect_to(source, destination, 22, crate::enforcement::DROP_TIMEOUT)
            .await
            .passed()
        {
            return Err(format!("{source} reached {destination}:22 with another's grant").into());
        }
    }
    // An address that appears later, with no NSG change to wake the agent, is closed too.
    let (vm, client) = (lab.vm.as_str(), lab.client.as_str());
    ip(&[
        "-n",
        vm,
        "addr",
        "add",
        &format!("{VM_3}/32"),
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        client,
        "route",
        "add",
        &format!("{VM_3}/32"),
        "dev",
        "eth0",
    ])?;
    lab.until_to(a, VM_3.into(), 22, false).await?;
    Ok(())
}
