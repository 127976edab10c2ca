//! The operator killed with SIGKILL at awkward moments and started again: nothing is
//! re-opened, duplicated or extended, and no expiry is lost. These tests run their own
//! control plane and operator process, so the shared in-process operator never sees them.

use std::process::{Child, Command, Stdio};

use kube::Client;
use kube::api::Api;
use portcullis::api::jit_request::Phase;
use portcullis::api::{JitRequest, SecurityRule};
use portcullis::testenv::{ADMIN, ControlPlane, OPERATOR};

use crate::support::{Ctx, TestResult, eventually};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        killed_while_granted_keeps_the_expiry,
        expiry_passing_while_down_never_reopens
    ]
}

const SETUP: &str = r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: NetworkSecurityGroup
metadata:
  name: nsg
  namespace: default
spec:
  virtualNetworkPrefixes: ["198.18.0.0/24"]
---
apiVersion: jit.portcullis.dev/v1alpha1
kind: JitPolicy
metadata:
  name: web
  namespace: default
spec:
  virtualMachines:
  - name: web-1
    address: 198.18.0.10
    networkSecurityGroupName: nsg
    ports:
    - number: 22
      protocol: TCP
      maxRequestAccessDuration: PT1H
---
apiVersion: jit.portcullis.dev/v1alpha1
kind: JitRequest
metadata:
  name: ask
  namespace: default
spec:
  policyName: web
  virtualMachines:
  - name: web-1
    ports:
    - number: 22
      duration: PT8S
      allowedSourceAddressPrefix: 198.19.0.10
"#;

/// The operator as a separate process, as its own service account, so that it can be
/// killed outright; its log (JSON lines) is kept in the plane's directory.
struct Operator(Child, std::path::PathBuf);

impl Operator {
    fn start(plane: &ControlPlane) -> Result<Self, std::io::Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = plane.dir().join(format!("operator-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args([
                "controller",
                "--log-format=json",
                "--http-addr",
                &format!("127.0.0.1:{port}"),
            ])
            .env("KUBECONFIG", plane.kubeconfig(OPERATOR.name))
            .env(
                "RUST_LOG",
                "debug,hyper=info,tower=info,rustls=info,h2=info",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Self(child, log))
    }

    /// The decision records (`portcullis::audit` lines) this process has logged so far.
    fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.1)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["target"] == portcullis::controller::request::AUDIT_TARGET)
            .collect()
    }

    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn own_plane() -> Result<(ControlPlane, Client), Box<dyn std::error::Error + Send + Sync>> {
    let plane = ControlPlane::start().await?;
    portcullis::testenv::install::product(&plane).await?;
    let client = plane.client(ADMIN).await?;
    Ok((plane, client))
}

async fn phase(requests: &Api<JitRequest>, wanted: Phase) -> Result<JitRequest, String> {
    eventually(&format!("the request to be {wanted:?}"), || async {
        let request = requests.get("ask").await.ok()?;
        (request.status.as_ref()?.phase? == wanted).then_some(request)
    })
    .await
}

fn allow_rules(rules: &[SecurityRule]) -> Vec<&SecurityRule> {
    rules
        .iter()
        .filter(|r| {
            r.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("jit-allow-"))
        })
        .collect()
}

async fn killed_while_granted_keeps_the_expiry(_ctx: Ctx) -> TestResult {
    let (plane, client) = own_plane().await?;
    let requests: Api<JitRequest> = Api::namespaced(client.clone(), "default");
    let rules: Api<SecurityRule> = Api::namespaced(client.clone(), "default");
    let operator = Operator::start(&plane)?;
    plane.apply(SETUP).await?;
    let granted = phase(&requests, Phase::Granted).await?;
    let end = granted
        .status
        .as_ref()
        .unwrap()
        .expires_at
        .clone()
        .ok_or("no expiresAt")?;
    let before = rules.list(&Default::default()).await?.items;
    let allow_before = allow_rules(&before);
    assert_eq!(allow_before.len(), 1);
    let granted_record = eventually("the grant's audit record", || async {
        operator
            .audit_records()
            .into_iter()
            .find(|r| r["fields"]["decision"] == "Granted")
    })
    .await?;
    let fields = &granted_record["fields"];
    for (field, wanted) in [
        ("requestor", ADMIN.name),
        ("policy", "web"),
        ("machine", "web-1"),
        ("source", "198.19.0.10"),
        ("reason", "AccessGranted"),
    ] {
        assert_eq!(
            fields[field], wanted,
            "audit field {field}: {granted_record}"
        );
    }
    assert_eq!(fields["port"], 22, "{granted_record}");
    assert_eq!(fields["end"], end.0.to_string(), "{granted_record}");
    operator.kill();

    let operator = Operator::start(&plane)?;
    let expired = phase(&requests, Phase::Expired).await?;
    let status = expired.status.unwrap();
    assert_eq!(
        status.start_time,
        granted.status.as_ref().unwrap().start_time,
        "the restart moved the start"
    );
    assert_eq!(status.grants[0].end_time, end, "the restart moved the end");
    let after = rules.list(&Default::default()).await?.items;
    assert!(
        allow_rules(&after).is_empty(),
        "the allow rule outlived the expiry"
    );
    assert!(
        jiff::Timestamp::now() >= end.0,
        "expired before its end time"
    );
    let expired_record = operator
        .audit_records()
        .into_iter()
        .find(|r| r["fields"]["decision"] == "Expired")
        .ok_or("no audit record of the expiry")?;
    assert_eq!(expired_record["fields"]["reason"], "Expired");
    operator.kill();
    drop(plane);
    Ok(())
}

async fn expiry_passing_while_down_never_reopens(_ctx: Ctx) -> TestResult {
    let (plane, client) = own_plane().await?;
    let requests: Api<JitRequest> = Api::namespaced(client.clone(), "default");
    let rules: Api<SecurityRule> = Api::namespaced(client.clone(), "default");
    let operator = Operator::start(&plane)?;
    plane.apply(SETUP).await?;
    let granted = phase(&requests, Phase::Granted).await?;
    let end = granted.status.unwrap().expires_at.ok_or("no expiresAt")?;
    operator.kill();
    // Down past the end: the rule is still there, but it is never effective.
    eventually("the grant's end to pass", || async {
        (jiff::Timestamp::now() > end.0).then_some(())
    })
    .await?;
    let operator = Operator::start(&plane)?;
    let expired = phase(&requests, Phase::Expired).await?;
    assert_eq!(expired.status.unwrap().grants[0].end_time, end);
    eventually("the stale allow rule to be deleted", || async {
        let items = rules.list(&Default::default()).await.ok()?.items;
        allow_rules(&items).is_empty().then_some(())
    })
    .await?;
    // And it stays closed: the request is terminal.
    let still = requests.get("ask").await?;
    assert_eq!(still.status.unwrap().phase, Some(Phase::Expired));
    operator.kill();
    drop(plane);
    Ok(())
}
