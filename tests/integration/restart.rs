//! The operator killed with SIGKILL at awkward moments and started again: nothing is
//! re-opened, duplicated or extended, and no expiry is lost. These tests run their own
//! control plane and operator process, so the shared in-process operator never sees them.

use kube::api::Api;
use portcullis::api::jit_request::Phase;
use portcullis::api::{JitRequest, SecurityRule};
use portcullis::testenv::ADMIN;

use crate::support::{Ctx, Operator, TestResult, allow_rules, eventually, own_plane};

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

async fn phase(requests: &Api<JitRequest>, wanted: Phase) -> Result<JitRequest, String> {
    eventually(&format!("the request to be {wanted:?}"), || async {
        let request = requests.get("ask").await.ok()?;
        (request.status.as_ref()?.phase? == wanted).then_some(request)
    })
    .await
}

async fn killed_while_granted_keeps_the_expiry(_ctx: Ctx) -> TestResult {
    let (plane, client) = own_plane().await?;
    let requests: Api<JitRequest> = Api::namespaced(client.clone(), "default");
    let rules: Api<SecurityRule> = Api::namespaced(client.clone(), "default");
    let operator = Operator::start(&plane, &[])?;
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

    let operator = Operator::start(&plane, &[])?;
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
    let operator = Operator::start(&plane, &[])?;
    plane.apply(SETUP).await?;
    let granted = phase(&requests, Phase::Granted).await?;
    let end = granted.status.unwrap().expires_at.ok_or("no expiresAt")?;
    operator.kill();
    // Down past the end: the rule is still there, but it is never effective.
    eventually("the grant's end to pass", || async {
        (jiff::Timestamp::now() > end.0).then_some(())
    })
    .await?;
    let operator = Operator::start(&plane, &[])?;
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
