//! `make bench`: the admission webhook, served in-process and registered with a real local
//! control plane exactly as `portcullis dev` does it. Prints a table and writes it as JSON to
//! `target/bench/webhook.json`.
//!
//! - floor: 200 concurrent server-side dry-run creates of a ConfigMap (no webhook involved);
//! - 200 concurrent server-side dry-run `JitRequest` creates as alice: the whole admission
//!   chain (mutate, validate with its policy read and SubjectAccessReview) as the client
//!   sees it;
//! - the webhook's own handling: 200 concurrent `AdmissionReview`s POSTed straight to
//!   `/mutate` and to `/validate` over HTTPS (rustls, trusting the plane's CA);
//! - the same creates and `/validate` POSTs one at a time: the latency of a review that
//!   does not queue behind 199 others on a two-core machine.
//!
//! Every measurement follows a warm-up of the same shape, so connections (client →
//! apiserver → webhook) are open and TLS handshakes are not counted.

mod report;

use report::{BenchResult, Row, percentile, percentiles, print_table};

use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Client;
use kube::api::{Api, PostParams};
use portcullis::api::{JitPolicy, JitRequest, NetworkSecurityGroup};
use portcullis::testenv::{ADMIN, ALICE, ControlPlane};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

/// Reviews in flight at once, as the issue asks.
const CONCURRENT: usize = 200;
/// Sequential reviews: the latency of one review when nothing queues beside it.
const SEQUENTIAL: usize = 200;
const NAMESPACE: &str = "bench-webhook";
/// The target for the p99 of a review, SubjectAccessReview included.
const TARGET_P99: f64 = 0.020;

fn main() -> std::process::ExitCode {
    report::execute(run())
}

async fn run() -> BenchResult<()> {
    let plane = ControlPlane::start().await?;
    let admin = plane.client(ADMIN).await?;
    portcullis::testenv::crds::install(&admin).await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = portcullis::dev::serve_webhook(&plane, &admin, async {
        let _ = stopped.await;
    })
    .await?;
    set_up(&admin).await?;
    let alice = plane.client(ALICE).await?;
    let mut rows = Vec::new();

    let floor = floor(&alice).await?;
    rows.push(percentiles(
        "floor: dry-run ConfigMap create, 200 concurrent",
        &floor,
        None,
    ));
    let webhook = webhook_client(&server.addr.to_string(), &plane.pki().ca_pem)?;
    for (name, shape) in [
        (
            "dry-run JitRequest create as alice, 200 concurrent",
            Shape::Burst,
        ),
        (
            "dry-run JitRequest create as alice, one by one",
            Shape::OneByOne,
        ),
    ] {
        rows.push(judged(name, &creates(&alice, shape).await?));
    }
    for (name, path, shape) in [
        (
            "webhook /mutate direct, 200 concurrent",
            "/mutate",
            Shape::Burst,
        ),
        (
            "webhook /validate direct (SAR), 200 concurrent",
            "/validate",
            Shape::Burst,
        ),
        (
            "webhook /validate direct (SAR), one by one",
            "/validate",
            Shape::OneByOne,
        ),
    ] {
        rows.push(judged(name, &direct(&webhook, path, shape).await?));
    }

    let _ = stop.send(());
    let _ = server.task.await;
    print_table(&rows);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("webhook.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    println!("\nwritten to {}", dir.join("webhook.json").display());
    drop(plane);
    Ok(())
}

/// The namespace, policy `web` and alice's right to create requests and `initiate` it (the
/// setup of the webhook integration tests).
async fn set_up(admin: &Client) -> BenchResult<()> {
    let params = PostParams::default();
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(admin.clone())
        .create(&params, &namespace)
        .await?;
    Api::<NetworkSecurityGroup>::namespaced(admin.clone(), NAMESPACE)
        .create(
            &params,
            &serde_json::from_value(json!({
                "metadata": {"name": "nsg"},
                "spec": {"virtualNetworkPrefixes": ["198.18.0.0/24"]}
            }))?,
        )
        .await?;
    Api::<JitPolicy>::namespaced(admin.clone(), NAMESPACE)
        .create(
            &params,
            &serde_json::from_value(json!({
                "metadata": {"name": "web"},
                "spec": {
                    "requireJustification": true,
                    "virtualMachines": [{
                        "name": "web-1",
                        "address": "198.18.0.10",
                        "networkSecurityGroupName": "nsg",
                        "ports": [{
                            "number": 22,
                            "protocol": "TCP",
                            "allowedSourceAddressPrefix": "198.19.0.0/16",
                            "maxRequestAccessDuration": "PT1H"
                        }]
                    }]
                }
            }))?,
        )
        .await?;
    Api::<Role>::namespaced(admin.clone(), NAMESPACE)
        .create(
            &params,
            &serde_json::from_value(json!({
                "metadata": {"name": "web-requester"},
                "rules": [
                    {
                        "apiGroups": ["jit.portcullis.dev"],
                        "resources": ["jitrequests"],
                        "verbs": ["get", "list", "watch", "create", "delete"]
                    },
                    {
                        "apiGroups": ["jit.portcullis.dev"],
                        "resources": ["jitpolicies"],
                        "resourceNames": ["web"],
                        "verbs": ["get", "initiate"]
                    },
                    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}
                ]
            }))?,
        )
        .await?;
    Api::<RoleBinding>::namespaced(admin.clone(), NAMESPACE)
        .create(
            &params,
            &serde_json::from_value(json!({
                "metadata": {"name": "alice-web-requester"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "web-requester"
                },
                "subjects": [{
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "User",
                    "name": ALICE.name
                }]
            }))?,
        )
        .await?;
    Ok(())
}

/// A request for port 22 of web-1 that policy `web` allows, with no requestor: the
/// mutating webhook stamps it.
fn web_request(name: &str) -> BenchResult<JitRequest> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "jit.portcullis.dev/v1alpha1",
        "kind": "JitRequest",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "policyName": "web",
            "justification": "Rotate the TLS certificate",
            "virtualMachines": [{"name": "web-1", "ports": [{
                "number": 22,
                "duration": "PT30M",
                "allowedSourceAddressPrefix": "198.19.0.10"
            }]}]
        }
    }))?)
}

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..Default::default()
    }
}

/// How a batch of calls is issued.
#[derive(Clone, Copy)]
enum Shape {
    /// [`CONCURRENT`] calls at once.
    Burst,
    /// [`SEQUENTIAL`] calls one after the other.
    OneByOne,
}

/// A warm-up batch, then the measured batch, of `shape`; each call's client-side latency.
async fn measure<F, Fut>(shape: Shape, call: F) -> BenchResult<Vec<f64>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = BenchResult<()>>,
{
    let timed = |i: usize| {
        let called = call(i);
        async move {
            let start = Instant::now();
            called.await.map(|()| start.elapsed().as_secs_f64())
        }
    };
    let mut samples = Vec::new();
    for round in 0..2 {
        samples = match shape {
            Shape::Burst => join_all((0..CONCURRENT).map(|i| timed(round * CONCURRENT + i)))
                .await
                .into_iter()
                .collect::<BenchResult<_>>()?,
            Shape::OneByOne => {
                let mut one_by_one = Vec::new();
                for i in 0..SEQUENTIAL {
                    one_by_one.push(timed(round * SEQUENTIAL + i).await?);
                }
                one_by_one
            }
        };
    }
    Ok(samples)
}

/// What 200 concurrent dry-run creates cost the apiserver alone (a ConfigMap has no
/// webhook), as alice, after a warm-up.
async fn floor(alice: &Client) -> BenchResult<Vec<f64>> {
    let maps: Api<ConfigMap> = Api::namespaced(alice.clone(), NAMESPACE);
    // Alice's right to create ConfigMaps may take a moment to reach the authorizer's cache.
    let probe: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "probe"}}))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while maps.create(&dry_run(), &probe).await.is_err() {
        if Instant::now() > deadline {
            return Err("alice cannot create ConfigMaps".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let create = |i: usize| {
        let maps = maps.clone();
        async move {
            let map: ConfigMap =
                serde_json::from_value(json!({"metadata": {"name": format!("floor-{i}")}}))?;
            maps.create(&dry_run(), &map).await?;
            Ok(())
        }
    };
    measure(Shape::Burst, create).await
}

/// Dry-run JitRequest creates as alice, each checked to come back stamped
/// with her as the requestor.
async fn creates(alice: &Client, shape: Shape) -> BenchResult<Vec<f64>> {
    let requests: Api<JitRequest> = Api::namespaced(alice.clone(), NAMESPACE);
    let create = |i: usize| {
        let requests = requests.clone();
        async move {
            let created = requests
                .create(&dry_run(), &web_request(&format!("bench-{i}"))?)
                .await?;
            match created.spec.requestor {
                Some(r) if r.username == ALICE.name => Ok(()),
                other => Err(format!("created with requestor {other:?}, not alice").into()),
            }
        }
    };
    measure(shape, create).await
}

/// An HTTPS client for the webhook's address that trusts the plane's CA and nothing else
/// (kube's client: rustls, connection pooling; it sends no credentials here).
fn webhook_client(addr: &str, ca_pem: &str) -> BenchResult<Client> {
    let mut config = kube::Config::new(format!("https://{addr}").parse()?);
    config.root_cert = Some(
        CertificateDer::pem_slice_iter(ca_pem.as_bytes())
            .map(|cert| cert.map(|c| c.to_vec()))
            .collect::<Result<_, _>>()?,
    );
    Ok(Client::try_from(config)?)
}

/// The review the apiserver sends for alice's create of `name` (after mutation, so with her
/// as the requestor).
fn review(name: &str) -> BenchResult<Value> {
    let mut object = serde_json::to_value(web_request(name)?)?;
    object["spec"]["requestor"] =
        json!({"username": ALICE.name, "uid": ALICE.name, "groups": ALICE.groups});
    let kind = json!({"group": "jit.portcullis.dev", "version": "v1alpha1", "kind": "JitRequest"});
    let resource =
        json!({"group": "jit.portcullis.dev", "version": "v1alpha1", "resource": "jitrequests"});
    let groups = [ALICE.groups, &["system:authenticated"]].concat();
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("bench-{name}"),
            "kind": kind,
            "resource": resource,
            "requestKind": kind,
            "requestResource": resource,
            "name": name,
            "namespace": NAMESPACE,
            "operation": "CREATE",
            "userInfo": {
                "username": ALICE.name,
                "uid": ALICE.name,
                "groups": groups
            },
            "object": object,
            "dryRun": true,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    }))
}

/// Reviews POSTed to the webhook's `path`; each must be allowed.
async fn direct(webhook: &Client, path: &'static str, shape: Shape) -> BenchResult<Vec<f64>> {
    let post = |i: usize| {
        let webhook = webhook.clone();
        async move {
            let body = serde_json::to_vec(&review(&format!("direct-{i}"))?)?;
            let request = http::Request::post(path)
                .header("content-type", "application/json")
                .body(body)?;
            let answer: Value = serde_json::from_str(&webhook.request_text(request).await?)?;
            if answer["response"]["allowed"] != json!(true) {
                return Err(format!("{path} refused the review: {answer}").into());
            }
            Ok(())
        }
    };
    measure(shape, post).await
}

/// A percentiles row held to [`TARGET_P99`].
fn judged(name: &'static str, samples: &[f64]) -> Row {
    Row {
        met: Some(percentile(samples, 0.99) <= TARGET_P99),
        ..percentiles(
            name,
            samples,
            Some(format!("p99 ≤ {:.0} ms", TARGET_P99 * 1e3)),
        )
    }
}
