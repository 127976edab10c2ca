//! Notifications (`--notify-url`): a sink served by the test receives a request's
//! CloudEvents in order, and sinks that never answer or refuse connections slow neither a
//! grant, an expiry, nor the sinks that work. These tests run their own control plane and
//! operator process, started with the sinks' URLs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, PostParams};
use portcullis::api::jit_request::Phase;
use portcullis::api::{JitApproval, JitPolicy, JitRequest};
use portcullis::testenv::{ADMIN, APPROVERS};
use serde_json::{Value, json};

use crate::support::{Ctx, Operator, TestResult, eventually, own_plane};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        a_sink_receives_each_step_in_order,
        dead_sinks_slow_neither_grants_nor_the_working_sink
    ]
}

/// The NSG and policy `web` (SSH on web-1 and web-2) in `default`; `approval` is added to
/// the policy's spec.
fn setup(approval: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
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
{approval}  virtualMachines:
  - name: web-1
    address: 198.18.0.10
    networkSecurityGroupName: nsg
    ports:
    - number: 22
      protocol: TCP
      maxRequestAccessDuration: PT1H
  - name: web-2
    address: 198.18.0.11
    networkSecurityGroupName: nsg
    ports:
    - number: 22
      protocol: TCP
      maxRequestAccessDuration: PT1H
"#
    )
}

/// A request for SSH on `machine` from 198.19.0.10 (a newer one for the same machine would
/// supersede the older).
fn request(name: &str, duration: &str, machine: &str) -> Result<JitRequest, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": "jit.portcullis.dev/v1alpha1",
        "kind": "JitRequest",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "policyName": "web",
            "virtualMachines": [{"name": machine, "ports": [{
                "number": 22, "duration": duration, "allowedSourceAddressPrefix": "198.19.0.10",
            }]}],
        },
    }))
}

/// What a sink received: each POST's content type and body, in order.
type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// A sink on 127.0.0.1 that answers every POST to `/events` with 202; returns its URL.
async fn sink() -> Result<(String, Received), std::io::Error> {
    let received: Received = Arc::default();
    let app = axum::Router::new().route(
        "/events",
        axum::routing::post({
            let received = received.clone();
            move |headers: http::HeaderMap, body: axum::body::Bytes| {
                let received = received.clone();
                async move {
                    let content_type = headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let event = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    received.lock().expect("lock").push((content_type, event));
                    http::StatusCode::ACCEPTED
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/events", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, received))
}

/// Returns once the operator has configured policy `web` (its machines' deny rules are in
/// place): it has the policy and NSG cached, so a request is decided at once, not left
/// `Pending` for a policy it has not seen yet.
async fn configured(client: &kube::Client) -> Result<(), String> {
    let policies: Api<JitPolicy> = Api::namespaced(client.clone(), "default");
    eventually("jitp/web to be configured", || async {
        let status = policies.get_opt("web").await.ok().flatten()?.status?;
        (status.configured_machines.as_deref() == Some("2/2")).then_some(())
    })
    .await
}

/// When the event `kind` about request `name` is at the sink (polled: within 50 ms).
async fn arrival(received: &Received, name: &str, kind: &str) -> Result<Instant, String> {
    let (subject, type_) = (
        format!("default/{name}"),
        format!("dev.portcullis.request.{kind}"),
    );
    eventually(
        &format!("the {kind} event of {name} at the sink"),
        || async {
            let seen = received.lock().expect("lock");
            seen.iter()
                .any(|(_, e)| e["subject"] == subject.as_str() && e["type"] == type_.as_str())
                .then(Instant::now)
        },
    )
    .await
}

/// The events `received` once there are at least `count`.
async fn events(received: &Received, count: usize) -> Result<Vec<(String, Value)>, String> {
    eventually(&format!("{count} events at the sink"), || async {
        let seen = received.lock().expect("lock").clone();
        (seen.len() >= count).then_some(seen)
    })
    .await
}

async fn phase(
    requests: &Api<JitRequest>,
    name: &str,
    wanted: Phase,
) -> Result<JitRequest, String> {
    eventually(&format!("jitr/{name} to be {wanted:?}"), || async {
        let request = requests.get_opt(name).await.ok().flatten()?;
        (request.status.as_ref()?.phase? == wanted).then_some(request)
    })
    .await
}

async fn a_sink_receives_each_step_in_order(_ctx: Ctx) -> TestResult {
    let (plane, client) = own_plane().await?;
    let (url, received) = sink().await?;
    let _operator = Operator::start(&plane, &["--notify-url", &url])?;
    plane
        .apply(&setup("  approval:\n    approvalsRequired: 1\n"))
        .await?;
    configured(&client).await?;
    let requests: Api<JitRequest> = Api::namespaced(client.clone(), "default");
    requests
        .create(&PostParams::default(), &request("ask", "PT10M", "web-1")?)
        .await?;
    phase(&requests, "ask", Phase::Pending).await?;
    events(&received, 1).await?;

    // Carol approves: approved, then granted.
    let carol = plane.impersonating("carol", &[APPROVERS]).await?;
    let approval: JitApproval = serde_json::from_value(json!({
        "apiVersion": "jit.portcullis.dev/v1alpha1",
        "kind": "JitApproval",
        "metadata": {"name": "carol", "namespace": "default"},
        "spec": {"requestName": "ask", "decision": "Approve", "comment": "ok"},
    }))?;
    Api::<JitApproval>::namespaced(carol, "default")
        .create(&PostParams::default(), &approval)
        .await?;
    let granted = phase(&requests, "ask", Phase::Granted).await?;
    let granted_status = granted.status.clone().ok_or("no status")?;
    let uid = granted.metadata.uid.clone().ok_or("no uid")?;

    // Deleting the request revokes it.
    requests.delete("ask", &DeleteParams::default()).await?;
    eventually("jitr/ask to be gone", || async {
        matches!(requests.get_opt("ask").await, Ok(None)).then_some(())
    })
    .await?;
    let seen = events(&received, 4).await?;

    let kinds = ["pending", "approved", "granted", "revoked"];
    let types: Vec<&str> = seen
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap_or_default())
        .collect();
    let wanted: Vec<String> = kinds
        .iter()
        .map(|k| format!("dev.portcullis.request.{k}"))
        .collect();
    assert_eq!(types, wanted, "{seen:#?}");
    let mut ids = std::collections::BTreeSet::new();
    for ((content_type, event), kind) in seen.iter().zip(kinds) {
        assert_eq!(content_type, "application/cloudevents+json", "{event}");
        assert_eq!(event["specversion"], "1.0", "{event}");
        assert_eq!(event["source"], "/portcullis/operator", "{event}");
        assert_eq!(event["subject"], "default/ask", "{event}");
        assert_eq!(event["datacontenttype"], "application/json", "{event}");
        assert_eq!(event["id"], format!("{uid}/{kind}"), "{event}");
        let time = event["time"].as_str().ok_or("no time")?;
        time.parse::<jiff::Timestamp>()
            .map_err(|e| format!("time {time:?} is not RFC 3339: {e}"))?;
        ids.insert(event["id"].to_string());
        let data = &event["data"];
        assert_eq!(data["requestor"], ADMIN.name, "{event}");
        assert_eq!(data["policy"], "web", "{event}");
        assert_eq!(data["source"], json!(["198.19.0.10"]), "{event}");
        // Asked for without a protocol (the policy's), granted as TCP; the approval came
        // with the grant, so its event describes the grant.
        let protocol = if kind == "pending" {
            Value::Null
        } else {
            json!("TCP")
        };
        assert_eq!(
            data["machines"],
            json!([{"name": "web-1", "ports": [{"number": 22, "protocol": protocol}]}]),
            "{event}"
        );
    }
    assert_eq!(ids.len(), kinds.len(), "ids repeat: {seen:#?}");

    let data = |i: usize| &seen[i].1["data"];
    assert_eq!(data(0)["reason"], "AwaitingApproval");
    assert_eq!(data(0)["approvals"], "0/1");
    assert_eq!(data(0)["end"], Value::Null);
    assert_eq!(data(1)["approvals"], "1/1");
    let start = granted_status.start_time.ok_or("no start")?.0.to_string();
    let end = granted_status.expires_at.ok_or("no end")?.0.to_string();
    assert_eq!(data(2)["reason"], "AccessGranted");
    assert_eq!(data(2)["start"], start.as_str());
    assert_eq!(data(2)["end"], end.as_str());
    assert_eq!(data(3)["reason"], "UserRequested");
    assert_eq!(data(3)["start"], start.as_str());
    drop(plane);
    Ok(())
}

async fn dead_sinks_slow_neither_grants_nor_the_working_sink(_ctx: Ctx) -> TestResult {
    let (plane, client) = own_plane().await?;
    // A sink that takes connections and never answers, one where nothing listens, and one
    // that works, listed last.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let silent_url = format!("http://{}/events", silent.local_addr()?);
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            connections.push(connection);
        }
    });
    let closed_url = {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("http://{}/events", closed.local_addr()?)
    };
    let (url, received) = sink().await?;
    let _operator = Operator::start(
        &plane,
        &[
            &format!("--notify-url={silent_url},{closed_url}"),
            "--notify-url",
            &url,
        ],
    )?;
    plane.apply(&setup("")).await?;
    configured(&client).await?;
    let requests: Api<JitRequest> = Api::namespaced(client.clone(), "default");

    // The first grant gives the dead sinks an event they are stuck on from then on.
    requests
        .create(&PostParams::default(), &request("first", "PT10M", "web-1")?)
        .await?;
    phase(&requests, "first", Phase::Granted).await?;
    arrival(&received, "first", "granted").await?;

    // A grant while they are stuck is as prompt as ever, and so is its event at the sink
    // that works: each sink has its own queue. Posting to the silent sink takes 5 s before
    // it is retried, to the closed one 15 s of retries before it is given up.
    let bound = Duration::from_secs(3);
    let created = Instant::now();
    requests
        .create(&PostParams::default(), &request("second", "PT3S", "web-2")?)
        .await?;
    let granted = phase(&requests, "second", Phase::Granted).await?;
    let grant_latency = created.elapsed();
    let delivered = arrival(&received, "second", "granted").await? - created;
    assert!(
        grant_latency < bound,
        "granted {grant_latency:?} after its creation beside dead sinks"
    );
    assert!(
        delivered < bound,
        "the working sink got the grant {delivered:?} after the request's creation"
    );

    // Neither is the expiry late, nor its event.
    let end = granted
        .status
        .and_then(|s| s.expires_at)
        .ok_or("no expiresAt")?
        .0;
    phase(&requests, "second", Phase::Expired).await?;
    let late = jiff::Timestamp::now().duration_since(end);
    assert!(
        late < jiff::SignedDuration::from_secs(2),
        "expired {late:?} after its end beside dead sinks"
    );
    arrival(&received, "second", "expired").await?;
    let seen = received.lock().expect("lock").clone();
    let order: Vec<(&str, &str)> = seen
        .iter()
        .map(|(_, e)| {
            (
                e["subject"].as_str().unwrap_or_default(),
                e["type"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("default/first", "dev.portcullis.request.granted"),
            ("default/second", "dev.portcullis.request.granted"),
            ("default/second", "dev.portcullis.request.expired"),
        ]
    );
    held.abort();
    drop(plane);
    Ok(())
}
