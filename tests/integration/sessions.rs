//! What the end of a grant does to the sessions it let in, on the machine and through a
//! gateway: with `establishedConnections: Close` a held SSH session is cut within a second
//! of the expiry, with `Keep` (the default) it runs on; new connections are refused either
//! way. Real sshd, real ssh clients, namespaces addressed from 198.18.0.0/15 only.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use kube::api::Api;
use portcullis::api::JitRequest;
use portcullis::api::jit_request::Phase;

use crate::enforcement::{
    A, B, DROP_TIMEOUT, Error, KEEP_PORT, Lab, enforced, expiry, granted, request as ssh_request,
    skipped,
};
use crate::support::{Ctx, TestResult, ssh_policy, succeeded};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        expiry_cuts_close_sessions_and_keeps_the_others,
        a_gateway_guards_a_machine_without_an_agent,
        an_idle_grant_is_revoked_and_a_busy_one_is_not,
        an_extension_hands_over_without_a_gap,
    ]
}

/// SSH on port 22 closes its sessions at the end of a grant; the same sshd on
/// [`KEEP_PORT`] keeps them. Both may be requested from the clients' /28.
fn policy() -> String {
    ssh_policy(
        "198.18.0.16/28",
        &format!(
            "      establishedConnections: Close
    - number: {KEEP_PORT}
      protocol: TCP
      allowedSourceAddressPrefix: 198.18.0.16/28
      maxRequestAccessDuration: PT1H
"
        ),
    )
}

/// Both ports for 12 s from A.
fn request() -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: JitRequest
metadata:
  name: both
spec:
  policyName: web
  justification: testing sessions
  virtualMachines:
  - name: web-1
    ports:
    - number: 22
      duration: PT12S
      allowedSourceAddressPrefix: {A}
    - number: {KEEP_PORT}
      duration: PT12S
      allowedSourceAddressPrefix: {A}
"#
    )
}

/// A held SSH session running a line echo.
struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Session {
    async fn open(lab: &Lab, source: Ipv4Addr, port: u16) -> Result<Self, Error> {
        let mut child = lab
            .ssh_to(
                source,
                port,
                "while read line; do echo \"echo $line\"; done",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no ssh stdin")?;
        let lines = BufReader::new(child.stdout.take().ok_or("no ssh stdout")?).lines();
        let mut session = Session {
            child,
            stdin,
            lines,
        };
        session.round_trip("hello").await?;
        Ok(session)
    }

    /// Sends `word` and waits for its echo: an error when the session is gone (reset,
    /// closed) or silent for `Session::SILENT`.
    async fn round_trip(&mut self, word: &str) -> Result<(), Error> {
        self.stdin.write_all(format!("{word}\n").as_bytes()).await?;
        let line = tokio::time::timeout(Self::SILENT, self.lines.next_line())
            .await
            .map_err(|_| format!("the session did not answer {word}"))??;
        if line.as_deref() != Some(&format!("echo {word}")) {
            return Err(format!("the session answered {line:?} to {word}").into());
        }
        Ok(())
    }

    /// How long an echo may take before the session counts as cut (on a veth pair it
    /// takes milliseconds; a reset ends the session at once).
    const SILENT: Duration = Duration::from_secs(3);
}

/// With the lab's agent enforcing and the NSG in place: policy, grant, held sessions, then
/// the expiry: the `Close` session is cut within a second and never before the expiry, the
/// `Keep` one still answers, and new connections are refused on both ports. With
/// `idle_cut` (an agent on the machine itself) a `Close` session that sends nothing ends
/// by itself too, within a second of the expiry.
async fn sessions_across_expiry(ctx: &Ctx, lab: &Lab, idle_cut: bool) -> Result<(), Error> {
    succeeded(&ctx.apply(&policy()))?;
    for port in [22, KEEP_PORT] {
        lab.until(A, port, false).await?;
    }
    succeeded(&ctx.apply_as("alice", &["team-web"], &request()))?;
    granted(ctx, "both").await?;
    for port in [22, KEEP_PORT] {
        lab.until(A, port, true).await?;
        if lab
            .connect_to(B.into(), crate::enforcement::VM.into(), port, DROP_TIMEOUT)
            .await
            .passed()
        {
            return Err(format!("B reached port {port} with A's grant").into());
        }
    }
    let expires = expiry(ctx, "both").await?;
    let mut closing = Session::open(lab, A, 22).await?;
    let mut kept = Session::open(lab, A, KEEP_PORT).await?;
    let mut silent = Session::open(lab, A, 22).await?;
    let mut probe = 0;
    let cut_at = loop {
        probe += 1;
        let sent = Timestamp::now();
        if closing.round_trip(&format!("probe{probe}")).await.is_err() {
            break sent;
        }
        if sent.duration_since(expires) > SignedDuration::from_secs(1) {
            return Err(format!(
                "the Close session still answered {:#} after the expiry",
                sent.duration_since(expires)
            )
            .into());
        }
        // Probes a few times a second, so the instant of the cut is known to within this.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let late = cut_at.duration_since(expires);
    if late < SignedDuration::ZERO {
        return Err(format!("the Close session was cut {:#} before the expiry", -late).into());
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), closing.child.wait()).await;
    if !ended.is_ok_and(|status| status.is_ok_and(|s| !s.success())) {
        return Err("the cut ssh client did not end with an error".into());
    }
    if idle_cut {
        // Nothing was sent on this one since the grant ended; the agent cut it anyway.
        let ended = tokio::time::timeout(Duration::from_secs(5), silent.child.wait()).await;
        let gone = Timestamp::now().duration_since(expires);
        if !ended.is_ok_and(|status| status.is_ok()) || gone > SignedDuration::from_secs(2) {
            return Err(format!(
                "the silent Close session was not ended by itself ({gone:#} after the expiry)\n{}",
                lab.agent_log()
            )
            .into());
        }
    } else {
        drop(silent);
    }
    kept.round_trip("after-expiry").await.map_err(|e| {
        format!(
            "the Keep session did not survive the expiry: {e}\n{}",
            lab.agent_log()
        )
    })?;
    for port in [22, KEEP_PORT] {
        lab.until(A, port, false).await?;
    }
    if lab.ssh_logs_in(A).await? {
        return Err("a new ssh from A logged in after the expiry".into());
    }
    eprintln!("sessions: the Close session was cut {late:#} after the expiry");
    Ok(())
}

async fn expiry_cuts_close_sessions_and_keeps_the_others(ctx: Ctx) -> TestResult {
    if skipped("expiry_cuts_close_sessions_and_keeps_the_others") {
        return Ok(());
    }
    let mut lab = Lab::new(&[A, B])?;
    lab.start_sshd().await?;
    lab.start_agent(&ctx, "vm-1")?;
    enforced(&ctx, &lab, "vm-1").await?;
    sessions_across_expiry(&ctx, &lab, true).await?;
    Ok(())
}

/// The machine runs no agent; the router in front of it runs `agent --gateway` with no
/// address given: the machine's address comes from the NSG's JIT rules.
async fn a_gateway_guards_a_machine_without_an_agent(ctx: Ctx) -> TestResult {
    if skipped("a_gateway_guards_a_machine_without_an_agent") {
        return Ok(());
    }
    let mut lab = Lab::routed(&[A, B])?;
    lab.start_sshd().await?;
    let kubeconfig = ctx.plane.kubeconfig("admin");
    lab.start_agent_with(&ctx, "gateway-1", &["--gateway"], &kubeconfig)?;
    enforced(&ctx, &lab, "gateway-1").await?;
    sessions_across_expiry(&ctx, &lab, false).await?;
    Ok(())
}

/// The phase and reason of request `name`.
async fn phase(ctx: &Ctx, name: &str) -> Result<(Option<Phase>, Option<String>), Error> {
    let requests: Api<JitRequest> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let status = requests.get(name).await?.status.unwrap_or_default();
    Ok((status.phase, status.reason))
}

/// Two grants of SSH with `idleTimeout: PT5S`: bob's carries nothing and is revoked
/// `Idle`; alice's carries a held session's traffic and stays, past its limit several
/// times over, until the session falls silent.
async fn an_idle_grant_is_revoked_and_a_busy_one_is_not(ctx: Ctx) -> TestResult {
    if skipped("an_idle_grant_is_revoked_and_a_busy_one_is_not") {
        return Ok(());
    }
    let mut lab = Lab::new(&[A, B])?;
    lab.start_sshd().await?;
    lab.start_agent(&ctx, "vm-1")?;
    enforced(&ctx, &lab, "vm-1").await?;
    succeeded(&ctx.apply(&ssh_policy("198.18.0.16/28", "      idleTimeout: PT5S\n")))?;
    lab.until(A, 22, false).await?;
    succeeded(&ctx.apply_as(
        "alice",
        &["team-web"],
        &ssh_request("busy", A.into(), "PT3M"),
    ))?;
    succeeded(&ctx.apply_as(
        "bob",
        &["team-web"],
        &ssh_request("quiet", B.into(), "PT3M"),
    ))?;
    granted(&ctx, "busy").await?;
    granted(&ctx, "quiet").await?;
    let mut session = Session::open(&lab, A, 22).await?;
    let granted_at = Timestamp::now();
    // Alice talks twice a second; bob's grant must end for being idle meanwhile.
    let mut word = 0;
    let mut talk = async |session: &mut Session| -> Result<(), Error> {
        word += 1;
        session.round_trip(&format!("w{word}")).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    };
    loop {
        talk(&mut session).await?;
        match phase(&ctx, "quiet").await? {
            (Some(Phase::Granted), _) => {}
            (Some(Phase::Revoked), Some(reason)) if reason == "Idle" => break,
            other => return Err(format!("bob's idle grant ended as {other:?}").into()),
        }
        if Timestamp::now().duration_since(granted_at) > SignedDuration::from_secs(30) {
            return Err(
                format!("bob's grant was not revoked as idle:\n{}", lab.agent_log()).into(),
            );
        }
    }
    lab.until(B, 22, false).await?;
    // Alice's grant outlives its limit while it carries traffic...
    let busy_until = Timestamp::now() + SignedDuration::from_secs(8);
    while Timestamp::now() < busy_until {
        talk(&mut session).await?;
        if phase(&ctx, "busy").await?.0 != Some(Phase::Granted) {
            return Err("alice's busy grant ended while it carried traffic".into());
        }
    }
    // ...and ends once it falls silent.
    drop(session);
    ctx.phase_of("busy", Phase::Revoked).await?;
    if phase(&ctx, "busy").await?.1.as_deref() != Some("Idle") {
        return Err(format!("alice's grant ended as {:?}", phase(&ctx, "busy").await?).into());
    }
    Ok(())
}

/// Alice extends her access with a newer request for the same machine, port and source
/// while a client connects every few milliseconds: every connect passes across the
/// hand-over, and the older request ends `NewerRequestInitiated` only once the newer rule
/// exists.
async fn an_extension_hands_over_without_a_gap(ctx: Ctx) -> TestResult {
    if skipped("an_extension_hands_over_without_a_gap") {
        return Ok(());
    }
    let mut lab = Lab::new(&[A, B])?;
    lab.start_sshd().await?;
    lab.start_agent(&ctx, "vm-1")?;
    enforced(&ctx, &lab, "vm-1").await?;
    succeeded(&ctx.apply(&ssh_policy("198.18.0.16/28", "")))?;
    lab.until(A, 22, false).await?;
    succeeded(&ctx.apply_as(
        "alice",
        &["team-web"],
        &ssh_request("first", A.into(), "PT1M"),
    ))?;
    granted(&ctx, "first").await?;
    lab.until(A, 22, true).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probing = {
        let (stop, vm) = (stop.clone(), crate::enforcement::VM);
        let lab = &lab;
        async move {
            let (mut passed, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let at = Timestamp::now();
                let verdict = lab.connect_to(A.into(), vm.into(), 22, DROP_TIMEOUT).await;
                if verdict.passed() {
                    passed += 1;
                } else {
                    failed.push(format!("{at}: {verdict:?}"));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (passed, failed)
        }
    };
    let handing_over = async {
        succeeded(&ctx.apply_as(
            "alice",
            &["team-web"],
            &ssh_request("second", A.into(), "PT2M"),
        ))?;
        granted(&ctx, "second").await?;
        let requests: Api<JitRequest> = Api::namespaced(ctx.client.clone(), &ctx.ns);
        let ended = crate::support::eventually("the first request to be superseded", || async {
            let status = requests.get_opt("first").await.ok().flatten()?.status?;
            (status.phase == Some(Phase::Revoked)
                && status.reason.as_deref() == Some("NewerRequestInitiated"))
            .then_some(status)
        })
        .await?;
        // Connects go on a little after the hand-over, then stop.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        Result::<_, Error>::Ok(ended)
    };
    let ((passed, failed), ended) = tokio::join!(probing, handing_over);
    let ended = ended?;
    if !failed.is_empty() {
        return Err(format!(
            "{} of {} connects failed across the hand-over: {failed:?}\n{}",
            failed.len(),
            passed + failed.len(),
            lab.agent_log()
        )
        .into());
    }
    let revoked_at = ended
        .conditions
        .iter()
        .find(|c| c.type_ == "Granted")
        .map(|c| c.last_transition_time.0)
        .ok_or("no Granted condition on the first request")?;
    let second = Api::<JitRequest>::namespaced(ctx.client.clone(), &ctx.ns)
        .get("second")
        .await?;
    let rule = second
        .status
        .as_ref()
        .and_then(|s| s.grants.first())
        .map(|g| g.rule.clone())
        .ok_or("the second request has no grant")?;
    let created = ctx
        .rule_named(&rule)
        .await?
        .metadata
        .creation_timestamp
        .ok_or("the newer rule has no creation time")?
        .0;
    if created > revoked_at {
        return Err(format!(
            "the first request ended at {revoked_at}, before the newer rule existed ({created})"
        )
        .into());
    }
    eprintln!("sessions: {passed} connects across the hand-over, none failed");
    Ok(())
}
