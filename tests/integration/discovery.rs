//! Discovery: the agent reports the management ports (and the ports JIT guards) listening
//! on its machine, and the NSG's exposure names the ones the Internet reaches without JIT
//! with the agents that serve them. Real sshd in a namespace addressed from 198.18.0.0/15.

use kube::api::Api;
use portcullis::api::NetworkSecurityGroup;
use portcullis::api::nsg::ListeningPort;
use portcullis::api::rule_fields::RuleProtocol;

use crate::enforcement::{A, B, Error, KEEP_PORT, Lab, skipped};
use crate::support::{Ctx, TestResult, eventually, inline_allow, succeeded, web_nsg};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![listening_ports_open_to_the_internet_are_exposed]
}

/// JIT on the second sshd port of web-1; its deny lands below the user's allow.
fn policy() -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: JitPolicy
metadata:
  name: alt
spec:
  virtualMachines:
  - name: web-1
    address: 198.18.0.10
    networkSecurityGroupName: nsg
    ports:
    - number: {KEEP_PORT}
      protocol: TCP
      maxRequestAccessDuration: PT1H
"#
    )
}

/// Waits until agent `vm-1` reports `ports` listening and the exposure of each names it.
async fn exposed_and_served(ctx: &Ctx, lab: &Lab, ports: &[u16]) -> Result<(), Error> {
    let nsgs: Api<NetworkSecurityGroup> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let wanted: Vec<ListeningPort> = ports
        .iter()
        .map(|port| ListeningPort {
            port: *port,
            protocol: RuleProtocol::Tcp,
        })
        .collect();
    eventually(
        &format!("ports {ports:?} reported listening and exposed"),
        || async {
            let status = nsgs.get_opt("nsg").await.ok().flatten()?.status?;
            let report = status.enforcement.iter().find(|r| r.agent == "vm-1")?;
            (report.listening_ports == wanted
                && ports.iter().all(|port| {
                    status
                        .exposure
                        .iter()
                        .any(|e| e.port == *port && e.listening_on == ["vm-1"])
                }))
            .then_some(())
        },
    )
    .await
    .map_err(|e| format!("{e}\nagent log:\n{}", lab.agent_log()))?;
    Ok(())
}

async fn listening_ports_open_to_the_internet_are_exposed(ctx: Ctx) -> TestResult {
    if skipped("listening_ports_open_to_the_internet_are_exposed") {
        return Ok(());
    }
    let mut lab = Lab::new(&[A, B])?;
    lab.start_sshd().await?;
    lab.start_agent(&ctx, "vm-1")?;
    let open = format!(
        "{}{}",
        inline_allow("ssh-open", 200, "*", 22),
        inline_allow("alt-open", 210, "*", KEEP_PORT)
    );
    succeeded(&ctx.apply(&web_nsg("198.18.0.0/28", &open)))?;
    // sshd serves 22 and the second port, but only 22 is a management port.
    exposed_and_served(&ctx, &lab, &[22]).await?;
    // Once a policy guards the second port it is looked for too; the user's allow above
    // the JIT deny exposes it.
    succeeded(&ctx.apply(&policy()))?;
    exposed_and_served(&ctx, &lab, &[22, KEEP_PORT]).await?;
    Ok(())
}
