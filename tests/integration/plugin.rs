//! `kubectl jit` against the local control plane, as a requester (alice's own kubeconfig)
//! and as approvers (the admin's kubeconfig with `--as`), the way users run it.

use std::os::fd::AsRawFd;
use std::process::Output;

use jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use portcullis::api::jit_request::Phase;
use portcullis::api::{JitPolicy, JitRequest, SecurityRule};
use portcullis::testenv::APPROVERS;

use crate::enforcement::{ip, skipped};
use crate::support::{Ctx, TestResult, allow_rules, eventually, ssh_policy, succeeded, web_nsg};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        request_waits_until_granted_and_hints_ssh,
        a_denied_request_exits_non_zero_with_every_reason,
        explain_matches_what_the_operator_then_does,
        extend_hands_over_and_revoke_ends_access,
        a_request_waiting_for_approval_is_granted_by_approve,
        source_auto_is_the_address_of_the_interface_towards_the_machine,
    ]
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// `kubectl jit ARGS` as `user` (their kubeconfig) in the test's namespace.
fn jit(ctx: &Ctx, user: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-jit"))
        .arg("--kubeconfig")
        .arg(ctx.plane.kubeconfig(user))
        .args(args)
        .args(["-n", &ctx.ns])
        .output()
        .expect("kubectl-jit runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Fails unless `output` exited with `code`.
fn exited(output: &Output, code: i32) -> Result<String, Error> {
    if output.status.code() == Some(code) {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "kubectl jit exited {:?}, not {code}:\n{}",
            output.status.code(),
            text(output)
        )
        .into())
    }
}

/// SSH on web-1 (198.18.0.10) from 198.19.0.0/16, with `extra` policy fields.
async fn setup(ctx: &Ctx, extra: &str) -> Result<(), Error> {
    succeeded(&ctx.apply(&web_nsg("198.19.0.0/28", "")))?;
    let policy = ssh_policy("198.19.0.0/16", "").replacen("spec:\n", &format!("spec:\n{extra}"), 1);
    succeeded(&ctx.apply(&policy))?;
    let policies: Api<JitPolicy> = ctx.api();
    eventually("the policy's deny rule", || async {
        let status = policies.get_opt("web").await.ok().flatten()?.status?;
        status.virtual_machines.first()?.deny_rule.clone()
    })
    .await?;
    Ok(())
}

/// The name in `jitrequest/NAME created: ...`.
fn created_name(stdout: &str) -> Result<String, Error> {
    stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("jitrequest/")?
                .split_once(' ')
                .map(|(n, _)| n.to_owned())
        })
        .ok_or_else(|| format!("no request name in:\n{stdout}").into())
}

async fn request_waits_until_granted_and_hints_ssh(ctx: Ctx) -> TestResult {
    setup(&ctx, "").await?;
    let out = jit(
        &ctx,
        "alice",
        &[
            "request",
            "web",
            "web-1",
            "--source",
            "198.19.0.10",
            "--justification",
            "deploy",
            "--wait",
        ],
    );
    let stdout = exited(&out, 0)?;
    assert!(stdout.contains("granted until"), "{stdout}");
    assert!(stdout.contains("ssh 198.18.0.10"), "{stdout}");
    let name = created_name(&stdout)?;
    // Defaults from the policy: its one port, its maximum duration.
    let request = ctx.api::<JitRequest>().get(&name).await?;
    let port = &request.spec.virtual_machines[0].ports[0];
    assert_eq!((port.number, port.duration.as_str()), (22, "PT1H"));
    let listed = exited(&jit(&ctx, "alice", &["list"]), 0)?;
    assert!(
        listed.contains(&name) && listed.contains("Granted"),
        "{listed}"
    );
    // Bob made nothing: his list is empty, `--all` shows alice's.
    let bobs = exited(&jit(&ctx, "bob", &["list"]), 0)?;
    assert!(!bobs.contains(&name), "{bobs}");
    let all = exited(&jit(&ctx, "bob", &["list", "--all"]), 0)?;
    assert!(all.contains(&name), "{all}");
    let json = exited(&jit(&ctx, "alice", &["status", &name, "-o", "json"]), 0)?;
    let value: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(value["status"]["phase"], "Granted");
    Ok(())
}

async fn a_denied_request_exits_non_zero_with_every_reason(ctx: Ctx) -> TestResult {
    setup(&ctx, "").await?;
    let out = jit(
        &ctx,
        "alice",
        &[
            "request",
            "web",
            "web-1:2222",
            "--source",
            "203.0.113.5",
            "--duration",
            "PT2H",
            "--wait",
        ],
    );
    let stdout = exited(&out, 2)?;
    assert!(stdout.contains("denied:"), "{stdout}");
    assert!(
        stdout.contains("2222") && stdout.contains("not a JIT port"),
        "{stdout}"
    );
    // A refusal by RBAC names the verb, in one line.
    let out = jit(
        &ctx,
        "bob",
        &["request", "web", "web-1", "--source", "198.19.0.10"],
    );
    let error = text(&out);
    assert!(!out.status.success(), "{error}");
    assert!(
        error.contains("initiate") || error.contains("create"),
        "{error}"
    );
    assert_eq!(error.trim().lines().count(), 1, "{error}");
    Ok(())
}

async fn explain_matches_what_the_operator_then_does(ctx: Ctx) -> TestResult {
    setup(&ctx, "").await?;
    // Alice as a viewer too: placement reads the NSG and its rules.
    let out = jit(
        &ctx,
        "admin",
        &[
            "--as",
            "alice",
            "--as-group",
            "team-web",
            "--as-group",
            "viewers",
            "explain",
            "web",
            "web-1:22",
            "--source",
            "198.19.0.10",
            "--duration",
            "PT30M",
            "-o",
            "json",
        ],
    );
    let explained: serde_json::Value = serde_json::from_str(&exited(&out, 0)?)?;
    assert_eq!(explained["refusals"], serde_json::json!([]));
    let priority = explained["priority"].as_u64().ok_or("no priority")?;
    let expires: Timestamp = explained["expiresAt"]
        .as_str()
        .ok_or("no expiry")?
        .parse()?;
    let policy = ctx.api::<JitPolicy>().get("web").await?;
    let deny = policy.status.unwrap_or_default().virtual_machines[0]
        .deny_rule
        .clone();
    assert_eq!(explained["beats"].as_str(), deny.as_deref());
    // Nothing was created.
    assert!(
        ctx.api::<JitRequest>()
            .list(&Default::default())
            .await?
            .items
            .is_empty()
    );
    let out = jit(
        &ctx,
        "alice",
        &[
            "request",
            "web",
            "web-1:22",
            "--source",
            "198.19.0.10",
            "--duration",
            "PT30M",
            "--wait",
        ],
    );
    exited(&out, 0)?;
    let rules = ctx
        .api::<SecurityRule>()
        .list(&Default::default())
        .await?
        .items;
    let allow = allow_rules(&rules);
    assert_eq!(allow.len(), 1);
    assert_eq!(u64::from(allow[0].spec.fields.priority), priority);
    let actual = allow[0].spec.expires_at.as_ref().ok_or("no expiresAt")?.0;
    let drift = actual.duration_since(expires).abs();
    if drift > SignedDuration::from_secs(5) {
        return Err(format!("explain said until {expires}, the grant ends {actual}").into());
    }
    // And a source outside the policy: every reason, nothing created; without read access
    // to the NSG the priority is left out, and said so.
    let out = jit(
        &ctx,
        "alice",
        &["explain", "web", "web-1:22", "--source", "203.0.113.5"],
    );
    let said = exited(&out, 2)?;
    assert!(
        said.contains("203.0.113.5") && said.contains("not within"),
        "{said}"
    );
    let out = jit(
        &ctx,
        "alice",
        &["explain", "web", "web-1:22", "--source", "198.19.0.11"],
    );
    let said = exited(&out, 0)?;
    assert!(said.contains("priority is unknown"), "{said}");
    Ok(())
}

async fn extend_hands_over_and_revoke_ends_access(ctx: Ctx) -> TestResult {
    setup(&ctx, "").await?;
    let out = jit(
        &ctx,
        "alice",
        &[
            "request",
            "web",
            "web-1",
            "--source",
            "198.19.0.10",
            "--wait",
        ],
    );
    let first = created_name(&exited(&out, 0)?)?;
    let out = jit(
        &ctx,
        "alice",
        &["extend", &first, "--duration", "PT45M", "--wait"],
    );
    let second = created_name(&exited(&out, 0)?)?;
    let ended = ctx.phase_of(&first, Phase::Revoked).await?;
    assert_eq!(
        ended.status.and_then(|s| s.reason).as_deref(),
        Some("NewerRequestInitiated")
    );
    exited(&jit(&ctx, "alice", &["revoke", &second]), 0)?;
    let requests: Api<JitRequest> = ctx.api();
    eventually("the revoked request to go", || async {
        requests
            .get_opt(&second)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    // Bob may not revoke alice's requests: admission says so, in one line.
    let out = jit(
        &ctx,
        "alice",
        &[
            "request",
            "web",
            "web-1",
            "--source",
            "198.19.0.10",
            "--wait",
        ],
    );
    let third = created_name(&exited(&out, 0)?)?;
    let refused = jit(&ctx, "bob", &["revoke", &third]);
    assert!(!refused.status.success(), "{}", text(&refused));
    Ok(())
}

async fn a_request_waiting_for_approval_is_granted_by_approve(ctx: Ctx) -> TestResult {
    setup(&ctx, "  approval:\n    approvalsRequired: 1\n").await?;
    let out = jit(
        &ctx,
        "alice",
        &[
            "request",
            "web",
            "web-1",
            "--source",
            "198.19.0.10",
            "--wait",
        ],
    );
    let stdout = exited(&out, 3)?;
    assert!(stdout.contains("waiting"), "{stdout}");
    let name = created_name(&stdout)?;
    // Alice's own approval does not count (exit 2), carol's does.
    let own = jit(
        &ctx,
        "admin",
        &["--as", "alice", "--as-group", APPROVERS, "approve", &name],
    );
    let said = exited(&own, 2)?;
    assert!(said.contains("SelfApproval"), "{said}");
    let carol = jit(
        &ctx,
        "admin",
        &[
            "--as",
            "carol",
            "--as-group",
            APPROVERS,
            "approve",
            &name,
            "--comment",
            "ok",
        ],
    );
    exited(&carol, 0)?;
    ctx.phase_of(&name, Phase::Granted).await?;
    Ok(())
}

/// In a namespace with two interfaces, the address towards each destination is that of
/// the interface the route takes.
async fn source_auto_is_the_address_of_the_interface_towards_the_machine(_ctx: Ctx) -> TestResult {
    if skipped("source_auto_is_the_address_of_the_interface_towards_the_machine") {
        return Ok(());
    }
    let netns = format!("pcsrc{}", std::process::id());
    ip(&["netns", "add", &netns])?;
    let result = (|| -> Result<(), Error> {
        for (link, address) in [("d0", "198.18.5.1/24"), ("d1", "198.18.6.1/24")] {
            let peer = format!("{link}p");
            ip(&[
                "-n", &netns, "link", "add", link, "type", "veth", "peer", "name", &peer,
            ])?;
            ip(&["-n", &netns, "addr", "add", address, "dev", link])?;
            ip(&["-n", &netns, "link", "set", link, "up"])?;
            ip(&["-n", &netns, "link", "set", &peer, "up"])?;
        }
        ip(&["-n", &netns, "route", "add", "198.18.7.0/24", "dev", "d1"])?;
        let path = format!("/var/run/netns/{netns}");
        let found = std::thread::spawn(move || -> Result<Vec<String>, String> {
            let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            // SAFETY: setns on a valid namespace fd; it changes only this short-lived thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            ["198.18.5.9", "198.18.7.9"]
                .iter()
                .map(|d| {
                    portcullis::plugin::source::auto(d.parse().expect("an address"))
                        .map(|s| s.to_string())
                        .map_err(|e| e.to_string())
                })
                .collect()
        })
        .join()
        .map_err(|_| "the namespace thread panicked")??;
        assert_eq!(found, ["198.18.5.1/32", "198.18.6.1/32"]);
        Ok(())
    })();
    let _ = ip(&["netns", "del", &netns]);
    result?;
    Ok(())
}
