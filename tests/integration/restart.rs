//! The operator killed with SIGKILL at awkward moments and started again: nothing is
//! re-opened, duplicated or extended, and no expiry is lost. These tests run their own
//! control plane and operator process, so the shared in-process operator never sees them.

use std::process::{Child, Command, Stdio};

use kube::Client;
use kube::api::Api;
use portcullis::api::jit_request::Phase;
use portcullis::api::{JitRequest, SecurityRule};
use portcullis::testenv::{ADMIN, ControlPlane};

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
  requestor:
    username: alice
  virtualMachines:
  - name: web-1
    ports:
    - number: 22
      duration: PT8S
      allowedSourceAddressPrefix: 198.19.0.10
"#;

/// The operator as a separate process, so that it can be killed outright.
struct Operator(Child);

impl Operator {
    fn start(plane: &ControlPlane) -> Result<Self, std::io::Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["controller", "--http-addr", &format!("127.0.0.1:{port}")])
            .env("KUBECONFIG", plane.kubeconfig(ADMIN.name))
            .env(
                "RUST_LOG",
                "debug,hyper=info,tower=info,rustls=info,h2=info",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                plane.dir().join(format!("operator-{port}.log")),
            )?)
            .spawn()?;
        Ok(Self(child))
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
    let client = plane.client(ADMIN).await?;
    portcullis::testenv::crds::install(&client).await?;
    Ok((plane, client))
}

fn apply(plane: &ControlPlane, yaml: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(plane.kubectl())
        .args([
            "--kubeconfig",
            &plane.kubeconfig(ADMIN.name).display().to_string(),
            "apply",
            "-f",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    out.status
        .success()
        .then_some(())
        .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
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
    apply(&plane, SETUP)?;
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
    operator.kill();
    drop(plane);
    Ok(())
}

async fn expiry_passing_while_down_never_reopens(_ctx: Ctx) -> TestResult {
    let (plane, client) = own_plane().await?;
    let requests: Api<JitRequest> = Api::namespaced(client.clone(), "default");
    let rules: Api<SecurityRule> = Api::namespaced(client.clone(), "default");
    let operator = Operator::start(&plane)?;
    apply(&plane, SETUP)?;
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
