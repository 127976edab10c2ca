//! Two operator replicas with leader election: the leader killed mid-burst hands over to the
//! standby, and nothing is granted twice, missed, or left open.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use portcullis::api::jit_request::Phase;
use portcullis::api::{JitRequest, SecurityRule};
use portcullis::testenv::ControlPlane;

use crate::support::{Ctx, Operator, TestResult, allow_rules, eventually, own_plane};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![leader_killed_mid_burst_hands_over]
}

const MACHINES: usize = 24;
/// How soon after the leader dies the standby must lead (the bound).
const HANDOVER: Duration = Duration::from_secs(15);

fn setup() -> String {
    let machines: String = (0..MACHINES)
        .map(|i| {
            format!(
                "  - name: m{i}\n    address: 198.18.0.{}\n    networkSecurityGroupName: nsg\n    \
                 ports: [{{number: 22, protocol: TCP, maxRequestAccessDuration: PT1H}}]\n",
                10 + i
            )
        })
        .collect();
    format!(
        "apiVersion: jit.portcullis.dev/v1alpha1\nkind: NetworkSecurityGroup\nmetadata: \
         {{name: nsg, namespace: default}}\nspec:\n  virtualNetworkPrefixes: [198.18.0.0/24]\n---\n\
         apiVersion: jit.portcullis.dev/v1alpha1\nkind: JitPolicy\nmetadata: \
         {{name: fleet, namespace: default}}\nspec:\n  virtualMachines:\n{machines}"
    )
}

fn request(i: usize) -> JitRequest {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "JitRequest",
        "metadata": { "name": format!("r{i}"), "namespace": "default" },
        "spec": { "policyName": "fleet", "virtualMachines": [{ "name": format!("m{i}"),
            "ports": [{ "number": 22, "duration": "PT20S",
                        "allowedSourceAddressPrefix": "198.19.0.10" }] }] },
    }))
    .expect("a valid request")
}

fn replica(plane: &ControlPlane, identity: &str) -> Result<Operator, std::io::Error> {
    Operator::start(
        plane,
        &[
            "--leader-elect",
            "--identity",
            identity,
            "--lease-namespace",
            "portcullis-system",
        ],
    )
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("portcullis-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

async fn leader_killed_mid_burst_hands_over(_ctx: Ctx) -> TestResult {
    let (plane, client) = own_plane().await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "portcullis-system");
    let requests: Api<JitRequest> = Api::namespaced(client.clone(), "default");
    let rules: Api<SecurityRule> = Api::namespaced(client.clone(), "default");

    let first = replica(&plane, "replica-a")?;
    eventually("replica-a to lead", || async {
        (holder(&leases).await? == "replica-a").then_some(())
    })
    .await?;
    let second = replica(&plane, "replica-b")?;
    plane.apply(&setup()).await?;

    // The first half of the burst, until the leader has granted some of it.
    let create = |range: std::ops::Range<usize>| {
        let requests = requests.clone();
        async move {
            futures::future::try_join_all(range.map(|i| {
                let requests = requests.clone();
                async move { requests.create(&PostParams::default(), &request(i)).await }
            }))
            .await
        }
    };
    create(0..MACHINES / 2).await?;
    eventually("the leader to grant part of the burst", || async {
        let list = requests.list(&Default::default()).await.ok()?;
        let granted = list
            .items
            .iter()
            .filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(Phase::Granted))
            .count();
        (granted > 0).then_some(())
    })
    .await?;
    let killed = Instant::now();
    let audit_a = first.kill_keeping_log();
    // The second half arrives with no leader.
    create(MACHINES / 2..MACHINES).await?;
    eventually("replica-b to lead", || async {
        (holder(&leases).await? == "replica-b").then_some(())
    })
    .await?;
    let handover = killed.elapsed();
    eprintln!("leader: the standby led {handover:?} after the leader was killed");
    assert!(
        handover <= HANDOVER,
        "the standby led {handover:?} after the leader died (bound {HANDOVER:?})"
    );

    // Every request is granted and expires, under one leader or the other.
    let ended = eventually("every request to expire", || async {
        let list = requests.list(&Default::default()).await.ok()?.items;
        let all = list.len() == MACHINES
            && list
                .iter()
                .all(|r| r.status.as_ref().and_then(|s| s.phase) == Some(Phase::Expired));
        all.then_some(list)
    })
    .await?;
    for request in &ended {
        let status = request.status.as_ref().expect("status");
        assert_eq!(status.reason.as_deref(), Some("Expired"), "{request:?}");
        assert!(status.start_time.is_some(), "never granted: {request:?}");
    }
    eventually("no allow rule left behind", || async {
        let items = rules.list(&Default::default()).await.ok()?.items;
        allow_rules(&items).is_empty().then_some(())
    })
    .await?;

    // One grant per request: every record of it (a record is logged before the status
    // is written, so one the killed leader logged may be repeated by its successor) names
    // the start and end the request shows. Requests only the successor saw have exactly one.
    let mut records: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for record in audit_a.into_iter().chain(second.audit_records()) {
        let fields = &record["fields"];
        if fields["decision"] == "Granted" {
            let field = |name: &str| fields[name].as_str().unwrap_or_default().to_owned();
            records
                .entry(field("request"))
                .or_default()
                .push((field("start"), field("end")));
        }
    }
    for request in &ended {
        let name = request.metadata.name.clone().unwrap_or_default();
        let number: usize = name.trim_start_matches('r').parse()?;
        let status = request.status.as_ref().expect("status");
        let shown = (
            status
                .start_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            status.grants[0].end_time.0.to_string(),
        );
        let logged = records.get(&name).cloned().unwrap_or_default();
        assert!(
            !logged.is_empty() && logged.iter().all(|r| *r == shown),
            "{name}: status {shown:?}, records {logged:?}"
        );
        if number >= MACHINES / 2 {
            assert_eq!(
                logged.len(),
                1,
                "{name} was granted by one replica: {logged:?}"
            );
        }
    }
    second.kill();
    drop(plane);
    Ok(())
}
