//! The operator at fleet size, on a control plane of its own.
//!
//! 1. Baseline: grant latency with about 100 grants active.
//! 2. One NSG in front of 10,000 machines (200 policies of 50): the operator places a deny
//!    per machine, then 10,000 requests arrive from 16 clients at once, through the
//!    admission `deploy/` ships. Every request must be granted, no object may pass 1 MiB and
//!    admission must refuse nothing. Then each machine's agent reports (10,000 AgentReports,
//!    16 writers): the NSG must count them all and stay small.
//! 3. 100,000 grants over 10,000 more machines (100 namespaces, each one NSG and two
//!    policies of 50 machines, ten requesters per machine), written straight to the API
//!    while the operator is stopped, exactly as the operator would have written them
//!    (`materialize`, `rule_manifest` and `request::status` are the operator's own code):
//!    the operator is not what that part measures. Then the operator starts on it: time to
//!    list (ready), time until every object has been reconciled once, the API writes that
//!    start costs (none are needed), its memory, and grant latency at that size.
//!
//! The control plane's own memory (apiserver, etcd, the GC's controller-manager) and the
//! etcd database size are reported for sizing. `PORTCULLIS_BENCH_MACHINES=N` scales both
//! fleets down (N machines each) for a quick run; the README's numbers use the default.

use super::*;

use kube::Resource;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams};
use portcullis::access::materialize::{self, LABEL_ROLE, Owner, ROLE_DENY};
use portcullis::access::validate::validate;
use portcullis::api::AgentReport;
use portcullis::controller::context::rule_manifest;
use portcullis::controller::request::status;
use portcullis::rules::{PortRange, Protocol, Scope, place};
use portcullis::testenv::{ADMIN, OPERATOR, install};

/// Machines in each fleet (overridable for quick runs, see the module documentation).
const MACHINES: usize = 10_000;
/// Grants per machine in the seeded fleet: 100,000 in all.
const GRANTS_PER_MACHINE: usize = 10;
/// Machines per namespace (and NSG) in the seeded fleet.
const MACHINES_PER_NAMESPACE: usize = 100;
/// Grants timed at each size.
const SAMPLES: usize = 100;
/// Grants active while the baseline is timed.
const BASELINE_ACTIVE: usize = 100;
/// Clients asking at once behind the one NSG (as in the report that found the problem).
const ONE_NSG_CLIENTS: usize = 16;
/// Writes in flight while seeding.
const SEED_PARALLEL: usize = 64;
/// etcd refuses objects over 1.5 MiB; the target keeps a margin.
const MAX_OBJECT: usize = 1 << 20;

pub async fn run() -> BenchResult<Vec<Row>> {
    let machines = std::env::var("PORTCULLIS_BENCH_MACHINES")
        .ok()
        .map(|v| v.parse::<usize>())
        .transpose()?
        .unwrap_or(MACHINES);
    let plane = ControlPlane::start().await?;
    install::product(&plane).await?;
    let admin = plane.client(ADMIN).await?;
    let requesters = Requesters::new(&plane, BASELINE_ACTIVE + SAMPLES).await?;
    let mut operator = Operator::start(&plane)?;
    let mut rows = Vec::new();

    // 1. Baseline.
    let floor_small = floor(&admin, "scale-floor-baseline", GRANTS).await?;
    rows.push(percentiles(
        "floor: write → watch event, small cluster",
        &floor_small,
        None,
    ));
    grant_latency(&admin, &requesters, "scale-baseline", BASELINE_ACTIVE).await?;
    let baseline = timed_grants(&admin, &requesters, "scale-baseline-timed").await?;
    let baseline_p99 = percentile(&baseline, 0.99);
    rows.push(percentiles(
        "grant latency, ~100 active grants",
        &baseline,
        None,
    ));

    // 2. One NSG in front of every machine.
    rows.extend(one_nsg(&admin, &requesters, machines).await?);

    // 3. The seeded fleet.
    operator.stop();
    let seeding = Instant::now();
    let seeded = seed(&plane, &requesters, machines).await?;
    println!(
        "seeded {seeded} grants over {machines} machines in {:.0} s",
        seeding.elapsed().as_secs_f64()
    );
    let requests_total = count::<JitRequest>(&admin).await?;
    let writes_before = api_writes(&admin).await?;
    let started = Instant::now();
    let operator = Operator::start(&plane)?;
    until(&operator, "ready", |_| true, "/readyz").await?;
    let ready = started.elapsed().as_secs_f64();
    let totals = [
        ("request", requests_total),
        ("policy", count::<JitPolicy>(&admin).await?),
        ("nsg", count::<NetworkSecurityGroup>(&admin).await?),
    ];
    let reconciled = |metrics: &str| {
        totals
            .iter()
            .all(|(controller, total)| reconciles(metrics, controller) >= *total as f64)
    };
    until(&operator, "every object reconciled", reconciled, "/metrics").await?;
    let settled = started.elapsed().as_secs_f64();
    let start_writes = api_writes(&admin).await? - writes_before;
    let grants_label = format!("{} grants, {} machines", seeded, machines);
    rows.push(Row {
        name: "start: lists done (ready)",
        value: format!("{ready:.1} s ({grants_label})"),
        target: "-".into(),
        met: None,
    });
    rows.push(Row {
        name: "start: every object reconciled once",
        value: format!("{settled:.1} s ({requests_total} requests)"),
        target: "-".into(),
        met: None,
    });
    rows.push(Row {
        name: "start: API writes",
        value: format!(
            "{start_writes:.0} ({} policies and NSGs; the seeded ones had no status yet)",
            totals[1].1 + totals[2].1
        ),
        target: "-".into(),
        met: None,
    });
    // What the control plane itself costs at this size: the same plain writes as above.
    let floor_at_size = floor(&admin, "scale-floor-at-size", GRANTS).await?;
    rows.push(percentiles(
        "floor: write → watch event, at size",
        &floor_at_size,
        None,
    ));
    requesters.warm().await?;
    let at_size = timed_grants(&admin, &requesters, "scale-at-size-timed").await?;
    let at_size_p99 = percentile(&at_size, 0.99);
    rows.push(Row {
        met: Some(at_size_p99 <= 1.5 * baseline_p99),
        ..percentiles(
            "grant latency at size",
            &at_size,
            Some(format!(
                "p99 ≤ 1.5 × baseline p99 = {:.1} ms",
                1.5 * baseline_p99 * 1e3
            )),
        )
    });
    let rss = operator.peak_rss_mib()?;
    rows.push(Row {
        name: "operator peak RSS at size",
        value: format!(
            "{rss:.0} MiB (now {:.0} MiB)",
            memory_mib(operator.pid(), "VmRSS")?
        ),
        target: "≤ 1 GiB".into(),
        met: Some(rss <= 1024.0),
    });
    for (name, component) in [
        ("kube-apiserver RSS at size", "kube-apiserver"),
        ("etcd RSS at size", "etcd"),
        (
            "kube-controller-manager RSS (GC)",
            "kube-controller-manager",
        ),
    ] {
        let pid = plane.pid_of(component).ok_or("component not running")?;
        rows.push(Row {
            name,
            value: format!(
                "{:.0} MiB (peak {:.0} MiB)",
                memory_mib(pid, "VmRSS")?,
                memory_mib(pid, "VmHWM")?
            ),
            target: "-".into(),
            met: None,
        });
    }
    let db = std::fs::metadata(plane.dir().join("etcd/member/snap/db"))?.len();
    rows.push(Row {
        name: "etcd database at size",
        value: format!("{:.0} MiB", db as f64 / 1048576.0),
        target: "-".into(),
        met: None,
    });
    drop(operator);
    drop(plane);
    Ok(rows)
}

/// [`SAMPLES`] sequential grants in a fresh namespace.
async fn timed_grants(admin: &Client, requesters: &Requesters, ns: &str) -> BenchResult<Vec<f64>> {
    Ok(grant_latency(admin, requesters, ns, SAMPLES).await?.0)
}

/// Polls the operator's `path` until it answers 200 with a body `done` accepts.
async fn until(
    operator: &Operator,
    what: &str,
    done: impl Fn(&str) -> bool,
    path: &str,
) -> BenchResult<()> {
    let deadline = Instant::now() + Duration::from_secs(1200);
    loop {
        if let Some((200, body)) = operator.get(path).await?
            && done(&body)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("operator not {what} after 20 minutes").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many objects of kind `K` the cluster holds.
async fn count<K>(client: &Client) -> BenchResult<usize>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    Ok(Api::<K>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await?
        .items
        .len())
}

/// `portcullis_reconciles_total{controller="NAME"}` in a metrics text.
fn reconciles(metrics: &str, controller: &str) -> f64 {
    let series = format!("portcullis_reconciles_total{{controller=\"{controller}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Phase 2: `machines` machines behind one NSG, one request each from many clients at once.
async fn one_nsg(
    admin: &Client,
    requesters: &Requesters,
    machines: usize,
) -> BenchResult<Vec<Row>> {
    let ns = "scale-one-nsg";
    namespace(admin, ns).await?;
    let started = Instant::now();
    policy(admin, ns, machines).await?;
    let rules: Api<SecurityRule> = Api::namespaced(admin.clone(), ns);
    let denies = ListParams::default().labels(&format!("{LABEL_ROLE}={ROLE_DENY}"));
    let deadline = Instant::now() + Duration::from_secs(1200);
    while rules.list_metadata(&denies).await?.items.len() < machines {
        if Instant::now() > deadline {
            return Err("deny rules not all placed after 20 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let placed = started.elapsed().as_secs_f64();

    let granted = observe(Api::<JitRequest>::namespaced(admin.clone(), ns), |r| {
        phase_is(r, Phase::Granted)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let refusals: Vec<String> = futures::stream::iter(0..machines)
        .map(|m| {
            let api: Api<JitRequest> = Api::namespaced(requesters.get(m).clone(), ns);
            async move {
                let request = request(&format!("one-{m}"), m, m, "PT24H").ok()?;
                api.create(&PostParams::default(), &request)
                    .await
                    .err()
                    .map(|e| e.to_string())
            }
        })
        .buffer_unordered(ONE_NSG_CLIENTS)
        .filter_map(std::future::ready)
        .collect()
        .await;
    let deadline = Instant::now() + Duration::from_secs(1800);
    let accepted = machines - refusals.len();
    loop {
        let done = granted.lock().expect("lock").len();
        if done >= accepted {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {done} of {accepted} granted after 30 minutes").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (reports_written, reports_counted) = agent_reports(admin, ns, machines).await?;
    let (largest, size) = largest_object(admin, ns).await?;
    Ok(vec![
        Row {
            name: "one NSG: deny rules placed",
            value: format!("{machines} machines in {placed:.1} s"),
            target: "-".into(),
            met: None,
        },
        Row {
            name: "one NSG: every request granted",
            value: format!(
                "{accepted}/{machines} in {seconds:.1} s ({:.0} grants/s)",
                accepted as f64 / seconds
            ),
            target: format!("{machines}/{machines}"),
            met: Some(accepted == machines),
        },
        Row {
            name: "one NSG: refused at admission",
            value: match refusals.first() {
                Some(first) => format!("{} (first: {first})", refusals.len()),
                None => "0".into(),
            },
            target: "0".into(),
            met: Some(refusals.is_empty()),
        },
        Row {
            name: "one NSG: an agent's report per machine, written / counted in the NSG",
            value: format!(
                "{machines} in {reports_written:.1} s ({:.0}/s) / {reports_counted:.1} s later",
                machines as f64 / reports_written
            ),
            target: "-".into(),
            met: None,
        },
        Row {
            name: "one NSG: largest object",
            value: format!("{:.0} KiB ({largest})", size as f64 / 1024.0),
            target: "≤ 1 MiB".into(),
            met: Some(size <= MAX_OBJECT),
        },
    ])
}

/// Each of `machines` agents' reports on the NSG of `ns`, written as an agent writes its own
/// (server-side apply), [`ONE_NSG_CLIENTS`] at a time: how long the writes took, and how
/// long after them the NSG's status counted them all.
async fn agent_reports(admin: &Client, ns: &str, machines: usize) -> BenchResult<(f64, f64)> {
    let nsgs: Api<NetworkSecurityGroup> = Api::namespaced(admin.clone(), ns);
    let uid = nsgs
        .get("nsg")
        .await?
        .metadata
        .uid
        .ok_or("NSG without uid")?;
    let reports: Api<AgentReport> = Api::namespaced(admin.clone(), ns);
    let started = Instant::now();
    futures::stream::iter(0..machines)
        .map(|m| {
            let (reports, uid) = (reports.clone(), uid.clone());
            async move {
                let agent = format!("vm-{m}");
                let name = materialize::report_name("nsg", &agent);
                let report = json!({
                    "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "AgentReport",
                    "metadata": {"name": name, "ownerReferences": [{
                        "apiVersion": "jit.portcullis.dev/v1alpha1",
                        "kind": "NetworkSecurityGroup", "name": "nsg", "uid": uid
                    }]},
                    "spec": {
                        "networkSecurityGroupName": "nsg", "agent": agent, "host": agent,
                        "addresses": [format!("198.18.{}.{}", m / 250, m % 250 + 1)],
                        "observedGeneration": 1, "rulesHash": "0123456789abcdef",
                        "appliedAt": "2026-01-01T00:00:00Z",
                        "listeningPorts": [{"port": 22, "protocol": "Tcp"}]
                    }
                });
                let params = PatchParams::apply(&format!("portcullis-agent-{agent}")).force();
                reports.patch(&name, &params, &Patch::Apply(&report)).await
            }
        })
        .buffer_unordered(ONE_NSG_CLIENTS)
        .try_collect::<Vec<_>>()
        .await?;
    let written = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let agents = nsgs.get("nsg").await?.status.and_then(|s| s.agents);
        if agents == Some(machines as u32) {
            break;
        }
        if Instant::now() > deadline {
            return Err(
                format!("the NSG counts {agents:?} of {machines} agents after 5 minutes").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((written, started.elapsed().as_secs_f64() - written))
}

/// The largest NSG, policy or request in `ns` as the API serves it.
async fn largest_object(admin: &Client, ns: &str) -> BenchResult<(String, usize)> {
    let mut sizes: Vec<(String, usize)> = Vec::new();
    for object in Api::<NetworkSecurityGroup>::namespaced(admin.clone(), ns)
        .list(&ListParams::default())
        .await?
    {
        sizes.push((
            format!("nsg/{}", object.metadata.name.clone().unwrap_or_default()),
            serde_json::to_vec(&object)?.len(),
        ));
    }
    for object in Api::<JitPolicy>::namespaced(admin.clone(), ns)
        .list(&ListParams::default())
        .await?
    {
        sizes.push((
            format!(
                "jitpolicy/{}",
                object.metadata.name.clone().unwrap_or_default()
            ),
            serde_json::to_vec(&object)?.len(),
        ));
    }
    for object in Api::<JitRequest>::namespaced(admin.clone(), ns)
        .list(&ListParams::default())
        .await?
    {
        sizes.push((
            format!(
                "jitrequest/{}",
                object.metadata.name.clone().unwrap_or_default()
            ),
            serde_json::to_vec(&object)?.len(),
        ));
    }
    sizes
        .into_iter()
        .max_by_key(|(_, size)| *size)
        .ok_or_else(|| "no objects".into())
}

/// Phase 3: writes `machines` machines with [`GRANTS_PER_MACHINE`] grants each, as the
/// operator would have; returns the number of grants.
/// The allow rule and the `Granted` status the operator would write for `created` (a
/// request for one port of `policy`, for 24 hours from now) at `priority`, built with the
/// operator's own code.
pub fn granted_by_hand(
    created: &JitRequest,
    policy: &JitPolicy,
    priority: u32,
) -> BenchResult<(SecurityRule, serde_json::Value)> {
    let grant = validate(&policy.spec, &created.spec)
        .map_err(|v| format!("request refused: {v:?}"))?
        .pop()
        .ok_or("no grant")?;
    let now = jiff::Timestamp::now();
    let start = jiff::Timestamp::from_second(now.as_second())?;
    let end = start.checked_add(jiff::SignedDuration::from_hours(24))?;
    let namespace = created.metadata.namespace.as_deref().unwrap_or_default();
    let owner = Owner {
        name: created.metadata.name.as_deref().unwrap_or_default(),
        uid: created.metadata.uid.as_deref().unwrap_or_default(),
    };
    let allow = materialize::allow_rule(owner, &created.spec.policy_name, &grant, priority, end);
    let reference = created
        .controller_owner_ref(&())
        .ok_or("request without uid")?;
    let rule = serde_json::from_value(rule_manifest(namespace, &allow, &reference))?;
    let status = status::granted(
        vec![status::grant_status(&grant, allow.name, end, false)],
        Time(start),
        now,
        created.metadata.generation,
    );
    Ok((rule, serde_json::to_value(status)?))
}

async fn seed(
    plane: &ControlPlane,
    requesters: &Requesters,
    machines: usize,
) -> BenchResult<usize> {
    let admin = plane.client(ADMIN).await?;
    let operator = plane.client(OPERATOR).await?;
    // An NSG with no user rules: the operator places allows and denies at these priorities.
    let placement = place(
        &[],
        "198.18.0.1".parse()?,
        &[(PortRange::single(22), Protocol::Tcp)],
        &Scope::default(),
    )?;
    let namespaces = machines.div_ceil(MACHINES_PER_NAMESPACE);
    let mut grants = 0;
    for n in 0..namespaces {
        let ns = format!("scale-{n}");
        namespace(&admin, &ns).await?;
        let here = MACHINES_PER_NAMESPACE.min(machines - n * MACHINES_PER_NAMESPACE);
        policy(&admin, &ns, here).await?;
        let policies: Vec<JitPolicy> = Api::<JitPolicy>::namespaced(admin.clone(), &ns)
            .list(&ListParams::default())
            .await?
            .items;
        let rules: Api<SecurityRule> = Api::namespaced(operator.clone(), &ns);
        let create = PostParams::default();
        futures::stream::iter(
            policies
                .iter()
                .flat_map(|p| p.spec.virtual_machines.iter().map(move |m| (p, m))),
        )
        .map(|(policy, machine)| {
            let rules = rules.clone();
            let create = &create;
            let ns = &ns;
            async move {
                let owner = Owner {
                    name: policy.metadata.name.as_deref().unwrap_or_default(),
                    uid: policy.metadata.uid.as_deref().unwrap_or_default(),
                };
                let deny = materialize::deny_rule(owner, machine, placement.deny);
                let reference = policy
                    .controller_owner_ref(&())
                    .ok_or("policy without uid")?;
                let object = serde_json::from_value(rule_manifest(ns, &deny, &reference))?;
                rules.create(create, &object).await?;
                BenchResult::Ok(())
            }
        })
        .buffer_unordered(SEED_PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;

        let policies = &policies;
        let admin = &admin;
        let rules = &rules;
        let ns = ns.as_str();
        grants += futures::stream::iter(
            (0..here).flat_map(|m| (0..GRANTS_PER_MACHINE).map(move |j| (m, j))),
        )
        .map(|(m, j)| async move {
            let name = format!("seed-{m}-{j}");
            // Requester j asks for every machine: a requestor's newer grant of the same
            // port would supersede the older one.
            let created = Api::<JitRequest>::namespaced(requesters.get(j).clone(), ns)
                .create(
                    &PostParams::default(),
                    &request(&name, j * MACHINES_PER_NAMESPACE + m, m, "PT24H")?,
                )
                .await?;
            let policy = policies
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(&created.spec.policy_name))
                .ok_or("no policy")?;
            let (rule, status) = granted_by_hand(&created, policy, placement.allow)?;
            rules.create(&PostParams::default(), &rule).await?;
            Api::<JitRequest>::namespaced(admin.clone(), ns)
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "status": status })),
                )
                .await?;
            BenchResult::Ok(1)
        })
        .buffer_unordered(SEED_PARALLEL)
        .try_fold(0, |sum, one| async move { Ok(sum + one) })
        .await?;
        if (n + 1) % 10 == 0 {
            println!("seeded {} of {namespaces} namespaces", n + 1);
        }
    }
    Ok(grants)
}
