//! `make bench`: the operator against a real local control plane. Two scenarios, each on a
//! control plane of its own; each prints a table and writes it as JSON to
//! `target/bench/{scenario}.json`. `cargo bench --bench operator -- scale` (or `standard`)
//! runs one; `-- grant` runs only the floor, admission and grant-latency rows of `standard`,
//! `-- burst` only its burst rows, `-- rss` only its fill.
//!
//! `standard`:
//! - floor: one plain write observed through a watch (the physical limit of one write here);
//! - admission: a JitRequest create (requestor stamped, `initiate` authorized, by the
//!   admission policies `deploy/` ships) beside a ConfigMap create, as the same requester;
//! - grant latency: JitRequest created → allow rules exist and status `Granted`;
//! - revoke lateness: `expiresAt` → allow rules deleted and status `Expired`;
//! - start lateness: a scheduled request's `startTime` → status `Granted` (rules exist);
//! - burst: 1,000 requests over 50 policies at once, beside a plain client making the same
//!   number of API writes;
//! - notifications: grant latency with a `--notify-url` sink that never answers, against
//!   none (each on a fresh operator);
//! - API writes per grant, from the apiserver's own request counters;
//! - the operator's peak RSS with 10,000 active grants (the earlier phases' grants, topped up);
//! - last, with the operator stopped: the burst's API calls made by a plain client (what the
//!   burst costs beyond them is the operator's own).
//!
//! `scale`: 100,000 grants over 10,000 machines, and 10,000 machines behind one NSG (see
//! [`scale`]).

mod report;
mod scale;

use report::apiserver::{floor, namespace, observe, wait_for};
use report::{BenchResult, Row, percentile, percentiles, print_table};

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use portcullis::api::jit_request::Phase;
use portcullis::api::{JitPolicy, JitRequest, NetworkSecurityGroup, SecurityRule};
use portcullis::testenv::{ADMIN, ControlPlane, OPERATOR};
use serde_json::json;

const GRANTS: usize = 200;
const REVOKES: usize = 100;
const BURST: usize = 1_000;
const BURST_POLICIES: usize = 50;
const RSS_GRANTS: usize = 10_000;
/// The 10,000 grants are spread like a real fleet: many NSGs of moderate size.
const RSS_POLICIES: usize = 200;
/// Machines per policy where a namespace needs more.
const MACHINES_PER_POLICY: usize = 50;
/// Requests in flight at once when creating many.
const PARALLEL: usize = 32;

fn main() -> std::process::ExitCode {
    let chosen: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |name: &str| chosen.is_empty() || chosen.iter().any(|c| c == name);
    // Only on their own: `standard` has these rows.
    let grant_only = chosen.iter().any(|c| c == "grant");
    let rss_only = chosen.iter().any(|c| c == "rss");
    let burst_alone = chosen.iter().any(|c| c == "burst");
    report::execute(async move {
        if wants("standard") {
            write("operator", &standard().await?)?;
        }
        if grant_only {
            write("grant", &grant().await?)?;
        }
        if rss_only {
            write("rss", &rss().await?)?;
        }
        if burst_alone {
            write("burst", &burst_only().await?)?;
        }
        if wants("scale") {
            write("scale", &scale::run().await?)?;
        }
        Ok(())
    })
}

/// Prints `rows` and writes them to `target/bench/{name}.json`.
fn write(name: &str, rows: &[Row]) -> BenchResult<()> {
    print_table(rows);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(rows)?)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

/// What every scenario here starts from: a control plane of its own with the product
/// installed, the admin, the requesters (admission stamps and authorizes their requests, as
/// on a cluster) and a ready operator.
async fn start_scenario() -> BenchResult<(ControlPlane, Client, Requesters, Operator)> {
    let plane = ControlPlane::start().await?;
    portcullis::testenv::install::product(&plane).await?;
    let admin = plane.client(ADMIN).await?;
    let requesters = Requesters::new(&plane, GRANTS).await?;
    let operator = Operator::start(&plane)?;
    operator.ready().await?;
    Ok((plane, admin, requesters, operator))
}

async fn standard() -> BenchResult<Vec<Row>> {
    let (plane, admin, requesters, mut operator) = start_scenario().await?;
    let (mut rows, per_grant) = grant_rows(&admin, &requesters).await?;

    let lateness = revoke_lateness(&admin, &requesters).await?;
    rows.push(Row {
        met: Some(percentile(&lateness, 0.99) <= 0.5),
        ..percentiles(
            "revoke lateness (expiresAt → closed)",
            &lateness,
            Some("p99 ≤ 500 ms".into()),
        )
    });

    let lateness = start_lateness(&admin, &requesters).await?;
    rows.push(Row {
        met: Some(percentile(&lateness, 0.99) <= 0.5),
        ..percentiles(
            "start lateness (startTime → granted), 10 starts a second",
            &lateness,
            Some("p99 ≤ 500 ms (as revoke lateness)".into()),
        )
    });

    let processes = measured_processes(&plane, &operator);
    let (burst_seconds, burst_cost) = metered("burst", &admin, &processes, async {
        burst(&admin, &requesters).await
    })
    .await?;
    let plain_seconds = plain_writes(&admin, (BURST as f64 * (1.0 + per_grant)).round()).await?;
    rows.push(Row {
        name: "burst: 1,000 requests / 50 policies",
        value: format!("{burst_seconds:.2} s (plain client, same writes: {plain_seconds:.2} s)"),
        target: format!("≤ 1.5 × plain = {:.2} s", 1.5 * plain_seconds),
        met: Some(burst_seconds <= 1.5 * plain_seconds),
    });
    rows.push(burst_cost_row(&burst_cost));

    rows.push(notify_ratio(&plane, &admin, &requesters, &mut operator).await?);

    // The earlier phases left grants active: the fill tops them up to the target's count.
    let fill_start = Instant::now();
    let (adding, active) = fill(&admin, &requesters, RSS_GRANTS).await?;
    let fill_seconds = fill_start.elapsed().as_secs_f64();
    let rss = operator.peak_rss_mib()?;
    rows.push(Row {
        name: "grant throughput (the fill, over 200 policies)",
        value: format!(
            "{:.0} grants/s ({adding} grants)",
            adding as f64 / fill_seconds
        ),
        target: "-".into(),
        met: None,
    });
    rows.push(Row {
        name: "operator peak RSS, 10,000 active grants",
        value: format!("{rss:.1} MiB ({active} grants active, {adding} of them the fill's)"),
        target: "≤ 100 MiB".into(),
        met: Some(rss <= 100.0),
    });
    // Last: the operator is stopped for it, and its objects would weigh on the RSS above.
    operator.stop();
    rows.push(by_hand_row(&plane, &admin, &requesters, &processes[1..], burst_seconds).await?);
    drop(plane);
    Ok(rows)
}

/// The burst's API calls made by hand (the operator stopped), against the operator's
/// `burst_seconds`; `control_plane` are the processes whose CPU time it reports.
async fn by_hand_row(
    plane: &ControlPlane,
    admin: &Client,
    requesters: &Requesters,
    control_plane: &[(&str, u32)],
    burst_seconds: f64,
) -> BenchResult<Row> {
    let (by_hand, cost) = metered("burst by hand", admin, control_plane, async {
        burst_by_hand(plane, admin, requesters).await
    })
    .await?;
    Ok(Row {
        name: "burst: 1,000 requests / 50 policies, the operator's API calls made by hand",
        value: format!(
            "{by_hand:.2} s; the operator's burst takes {:.2} × that; CPU {}",
            burst_seconds / by_hand,
            cost.cpu
        ),
        target: "-".into(),
        met: None,
    })
}

/// What a stretch of the run cost: CPU time by process ([`CpuMeter::read`]) and the API
/// requests served, by `verb resource[/subresource]`.
struct Cost {
    cpu: String,
    served: BTreeMap<String, f64>,
}

impl Cost {
    /// How many `call`s (`POST events`) were served.
    fn served(&self, call: &str) -> f64 {
        self.served.get(call).copied().unwrap_or(0.0)
    }
}

/// Runs `work`, returning its result and what it cost `processes` and the apiserver; the
/// requests served go to stderr too, most first.
async fn metered<T>(
    what: &str,
    admin: &Client,
    processes: &[(&str, u32)],
    work: impl Future<Output = BenchResult<T>>,
) -> BenchResult<(T, Cost)> {
    let meter = CpuMeter::start(processes)?;
    let before = api_calls(admin).await?;
    let done = work.await?;
    let cpu = meter.read()?;
    let served: BTreeMap<String, f64> = api_calls(admin)
        .await?
        .into_iter()
        .map(|(call, count)| {
            let since = count - before.get(&call).copied().unwrap_or(0.0);
            (call, since)
        })
        .filter(|(_, count)| *count > 0.0)
        .collect();
    let mut most: Vec<(&String, &f64)> = served.iter().collect();
    most.sort_by(|a, b| b.1.total_cmp(a.1));
    eprintln!("{what}: API requests served");
    for (call, count) in most {
        eprintln!("  {count:>8.0} {call}");
    }
    Ok((done, Cost { cpu, served }))
}

/// The `burst` scenario: only the burst and its API calls made by hand, with the CPU time
/// and API requests of each (the quick loop while working on the burst).
async fn burst_only() -> BenchResult<Vec<Row>> {
    let (plane, admin, requesters, mut operator) = start_scenario().await?;
    let processes = measured_processes(&plane, &operator);
    let (seconds, cost) = metered("burst", &admin, &processes, async {
        burst(&admin, &requesters).await
    })
    .await?;
    operator.stop();
    let mut rows = vec![
        Row {
            name: "burst: 1,000 requests / 50 policies",
            value: format!("{seconds:.2} s"),
            target: "-".into(),
            met: None,
        },
        burst_cost_row(&cost),
    ];
    rows.push(by_hand_row(&plane, &admin, &requesters, &processes[1..], seconds).await?);
    Ok(rows)
}

/// Where the burst's time went: CPU by process, and the writes it cost besides each
/// request's own (the NSG and policy summaries, and the Events, which the operator
/// publishes off the grant path: those not posted within the burst follow it).
fn burst_cost_row(cost: &Cost) -> Row {
    Row {
        name: "burst: CPU time by process; summary writes; Events posted within it",
        value: format!(
            "{}; {:.0} NSG and {:.0} policy status writes; {:.0} Events",
            cost.cpu,
            cost.served("APPLY networksecuritygroups/status"),
            cost.served("APPLY jitpolicies/status"),
            cost.served("POST events"),
        ),
        target: "-".into(),
        met: None,
    }
}

/// The operator, then the apiserver and etcd: the processes whose CPU time is reported.
fn measured_processes(plane: &ControlPlane, operator: &Operator) -> Vec<(&'static str, u32)> {
    let mut processes = vec![("operator", operator.pid())];
    processes.extend(
        ["kube-apiserver", "etcd"]
            .into_iter()
            .filter_map(|name| Some((name, plane.pid_of(name)?))),
    );
    processes
}

/// The burst's API work with no operator: a plain client makes, for each of [`BURST`]
/// requests over [`BURST_POLICIES`] fresh policies, the calls the operator makes to grant it
/// (a SubjectAccessReview, the allow rule, the status, the Event) right after creating it,
/// [`PARALLEL`] requests at a time. What the burst costs beyond this is the operator's own.
async fn burst_by_hand(
    plane: &ControlPlane,
    admin: &Client,
    requesters: &Requesters,
) -> BenchResult<f64> {
    use k8s_openapi::api::authorization::v1::SubjectAccessReview;
    use k8s_openapi::api::events::v1::Event;
    use kube::api::{Patch, PatchParams};
    use portcullis::api::INITIATE;
    use portcullis::controller::context::access_review;
    use portcullis::rules::{PortRange, Protocol, Scope, place};
    let operator = plane.client(OPERATOR).await?;
    let mut policies = Vec::new();
    for p in 0..BURST_POLICIES {
        let ns = format!("bench-by-hand-{p}");
        namespace(admin, &ns).await?;
        policy(admin, &ns, 1).await?;
        policies.push(
            Api::<JitPolicy>::namespaced(admin.clone(), &ns)
                .get("web-0")
                .await?,
        );
    }
    let priority = place(
        &[],
        "198.18.0.1".parse()?,
        &[(PortRange::single(22), Protocol::Tcp)],
        &Scope::default(),
    )?
    .allow;
    let (policies, operator) = (&policies, &operator);
    let start = Instant::now();
    futures::stream::iter(0..BURST)
        .map(|i| async move {
            let ns = format!("bench-by-hand-{}", i % BURST_POLICIES);
            let created =
                Api::<JitRequest>::namespaced(requesters.get(i / BURST_POLICIES).clone(), &ns)
                    .create(
                        &PostParams::default(),
                        &request(&format!("hand-{i}"), i, 0, "PT24H")?,
                    )
                    .await?;
            let requestor = created.spec.requestor.as_ref().ok_or("not stamped")?;
            let review = access_review(requestor, INITIATE, &ns, &created.spec.policy_name);
            Api::<SubjectAccessReview>::all(operator.clone())
                .create(&PostParams::default(), &review)
                .await?;
            let (rule, status) =
                scale::granted_by_hand(&created, &policies[i % BURST_POLICIES], priority)?;
            Api::<SecurityRule>::namespaced(operator.clone(), &ns)
                .create(&PostParams::default(), &rule)
                .await?;
            let name = created.metadata.name.clone().unwrap_or_default();
            Api::<JitRequest>::namespaced(operator.clone(), &ns)
                .patch_status(
                    &name,
                    &PatchParams::apply(portcullis::controller::MANAGER).force(),
                    &Patch::Apply(json!({
                        "apiVersion": "jit.portcullis.dev/v1alpha1",
                        "kind": "JitRequest",
                        "status": status,
                    })),
                )
                .await?;
            let event: Event = serde_json::from_value(json!({
                "metadata": {"name": format!("{name}.granted")},
                "eventTime": jiff::Timestamp::now().to_string(),
                "reportingController": portcullis::controller::MANAGER,
                "reportingInstance": "bench",
                "action": "Granted",
                "reason": "Granted",
                "type": "Normal",
                "note": "granted by hand",
                "regarding": {
                    "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "JitRequest",
                    "namespace": ns, "name": name, "uid": created.metadata.uid,
                },
            }))?;
            Api::<Event>::namespaced(operator.clone(), &ns)
                .create(&PostParams::default(), &event)
                .await?;
            BenchResult::Ok(())
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(start.elapsed().as_secs_f64())
}

/// The `grant` scenario: the floor, admission, and sequential grant latency with the API
/// writes each grant costs, on a control plane of its own (the quick loop while working on
/// the grant path; `standard` includes these rows).
async fn grant() -> BenchResult<Vec<Row>> {
    let (_plane, admin, requesters, mut operator) = start_scenario().await?;
    let (rows, _) = grant_rows(&admin, &requesters).await?;
    operator.stop();
    Ok(rows)
}

/// The `rss` scenario: only the fill to [`RSS_GRANTS`] grants, on a control plane of its
/// own, with the operator's peak and current resident memory then (the quick loop while
/// working on memory). `standard`'s row holds as many grants, partly its earlier phases'
/// (after more churn, so it may read higher); the current figure tells a transient peak
/// from what stays.
async fn rss() -> BenchResult<Vec<Row>> {
    let (_plane, admin, requesters, mut operator) = start_scenario().await?;
    let (_, active) = fill(&admin, &requesters, RSS_GRANTS).await?;
    let peak = operator.peak_rss_mib()?;
    let current = memory_mib(operator.pid(), "VmRSS")?;
    operator.stop();
    Ok(vec![
        Row {
            name: "operator peak RSS, 10,000 active grants",
            value: format!("{peak:.1} MiB ({active} grants active)"),
            target: "≤ 100 MiB".into(),
            met: Some(peak <= 100.0),
        },
        Row {
            name: "operator current RSS, 10,000 active grants",
            value: format!("{current:.1} MiB"),
            target: "-".into(),
            met: None,
        },
    ])
}

/// The rows `standard` and `grant` share, and the operator's API writes per grant.
async fn grant_rows(admin: &Client, requesters: &Requesters) -> BenchResult<(Vec<Row>, f64)> {
    let client = requesters.get(0).clone();
    let mut rows = Vec::new();

    let floor = floor(admin, "bench-floor", GRANTS).await?;
    rows.push(percentiles("floor: write → watch event", &floor, None));

    let (configmaps, requests) = admission(admin, &client).await?;
    let configmap_p50 = percentile(&configmaps, 0.5);
    rows.push(percentiles(
        "floor: dry-run ConfigMap create (requester)",
        &configmaps,
        None,
    ));
    rows.push(Row {
        met: Some(percentile(&requests, 0.5) <= 1.5 * configmap_p50),
        ..percentiles(
            "dry-run JitRequest create through admission",
            &requests,
            Some(format!(
                "p50 ≤ 1.5 × ConfigMap p50 = {:.2} ms",
                1.5 * configmap_p50 * 1e3
            )),
        )
    });

    let (grant, writes) = grant_latency(admin, requesters, "bench-grant", GRANTS).await?;
    let floor_p99 = percentile(&floor, 0.99);
    let grant_p99 = percentile(&grant, 0.99);
    rows.push(Row {
        met: Some(grant_p99 <= 4.0 * floor_p99),
        ..percentiles(
            "grant latency (200 sequential)",
            &grant,
            Some(format!(
                "p99 ≤ 4 × floor p99 = {:.1} ms",
                4.0 * floor_p99 * 1e3
            )),
        )
    });
    let per_grant = writes / GRANTS as f64;
    rows.push(Row {
        name: "API writes per grant (operator)",
        value: format!("{per_grant:.2}"),
        target: "≤ 3".into(),
        met: Some(per_grant <= 3.0),
    });

    Ok((rows, per_grant))
}

/// Clients acting as distinct requesters (`requester-N` in group `team-web`, which the
/// harness binds to the shipped `portcullis-requester` role), so that requests for the same
/// machine coexist instead of superseding one another. Each has made a call before it is
/// used, so no measurement pays for a TLS handshake.
struct Requesters(Vec<Client>);

impl Requesters {
    async fn new(plane: &ControlPlane, count: usize) -> BenchResult<Self> {
        let team = portcullis::testenv::ALICE.groups[0];
        let mut clients = Vec::with_capacity(count);
        for i in 0..count {
            let client = plane
                .impersonating(&format!("requester-{i}"), &[team])
                .await?;
            client.apiserver_version().await?;
            clients.push(client);
        }
        Ok(Self(clients))
    }

    /// Makes each client call the apiserver once more: a connection idle for longer than
    /// the client pool keeps one (90 s, as during the scale bench's seeding) is gone, and
    /// the next call would time a TLS handshake instead of the product.
    async fn warm(&self) -> BenchResult<()> {
        for client in &self.0 {
            client.apiserver_version().await?;
        }
        Ok(())
    }

    /// Requester `i` (modulo the pool).
    fn get(&self, i: usize) -> &Client {
        &self.0[i % self.0.len()]
    }
}

/// The operator binary (built with the benchmark's optimizations) in its own process, as
/// its own service account.
struct Operator {
    child: Child,
    /// Where it serves `/readyz` and `/metrics`.
    http: std::net::SocketAddr,
}

impl Operator {
    fn start(plane: &ControlPlane) -> BenchResult<Self> {
        Self::start_with(plane, &[])
    }

    /// [`Operator::start`] with `args` added to `portcullis controller`.
    fn start_with(plane: &ControlPlane, args: &[&str]) -> BenchResult<Self> {
        let port = portcullis::testenv::free_port()?;
        let http = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["controller", "--http-addr", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("KUBECONFIG", plane.kubeconfig(OPERATOR.name))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Self { child, http })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The kernel's high-water mark of the process's resident memory.
    fn peak_rss_mib(&self) -> BenchResult<f64> {
        memory_mib(self.child.id(), "VmHWM")
    }

    /// `GET path` on the operator's HTTP endpoint: the status code and the body (`None`
    /// while nothing listens yet).
    async fn get(&self, path: &str) -> BenchResult<Option<(u16, String)>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut stream) = tokio::net::TcpStream::connect(self.http).await else {
            return Ok(None);
        };
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: operator\r\n\r\n").as_bytes())
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let code = response
            .split_whitespace()
            .nth(1)
            .ok_or("empty HTTP response")?
            .parse()?;
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok(Some((code, body.to_owned())))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Replaces this operator with a fresh one started with `args`, once that one is ready.
    async fn restart(&mut self, plane: &ControlPlane, args: &[&str]) -> BenchResult<()> {
        self.stop();
        *self = Self::start_with(plane, args)?;
        self.ready().await
    }

    /// Returns once `/readyz` answers 200: the caches are synced and reconciling runs.
    async fn ready(&self) -> BenchResult<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !matches!(self.get("/readyz").await, Ok(Some((200, _)))) {
            if Instant::now() > deadline {
                return Err("the operator is not ready after 2 minutes".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// CPU time (user and system) the given processes spend from [`CpuMeter::start`] on, from
/// `/proc`: where a stretch of the run spent the machine's two cores.
struct CpuMeter<'a>(Vec<(&'a str, u32, f64)>);

impl<'a> CpuMeter<'a> {
    fn start(processes: &[(&'a str, u32)]) -> BenchResult<Self> {
        let started = processes
            .iter()
            .map(|&(name, pid)| Ok((name, pid, cpu_seconds(pid)?)))
            .collect::<BenchResult<_>>()?;
        Ok(Self(started))
    }

    /// `name seconds` for each process since the start, e.g. `operator 4.1 s, etcd 2.0 s`.
    fn read(&self) -> BenchResult<String> {
        let spent = self
            .0
            .iter()
            .map(|&(name, pid, start)| Ok(format!("{name} {:.1} s", cpu_seconds(pid)? - start)))
            .collect::<BenchResult<Vec<_>>>()?;
        Ok(spent.join(", "))
    }
}

/// The user and system CPU seconds process `pid` has used (`/proc/PID/stat` fields 14, 15).
fn cpu_seconds(pid: u32) -> BenchResult<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it start at field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .ok_or("malformed stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf reads a constant of the running system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / per_second)
}

/// A memory figure of process `pid` from `/proc` (`VmRSS` now, `VmHWM` its peak), in MiB.
fn memory_mib(pid: u32, field: &str) -> BenchResult<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .ok_or_else(|| format!("no {field} for process {pid}"))?
        .parse()?;
    Ok(kib / 1024.0)
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An NSG and, on it, `machines` machines in namespace `ns`: vm-0, vm-1, ... in policies of
/// [`MACHINES_PER_POLICY`] (web-0 holds vm-0 to vm-49, and so on; a policy lists at most 64).
async fn policy(client: &Client, ns: &str, machines: usize) -> BenchResult<()> {
    let nsgs: Api<NetworkSecurityGroup> = Api::namespaced(client.clone(), ns);
    nsgs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "nsg"},
            "spec": {"virtualNetworkPrefixes": ["198.18.0.0/16"]}
        }))?,
    )
    .await?;
    let policies: Api<JitPolicy> = Api::namespaced(client.clone(), ns);
    for first in (0..machines).step_by(MACHINES_PER_POLICY) {
        let vms: Vec<_> = (first..machines.min(first + MACHINES_PER_POLICY))
            .map(|m| {
                json!({
                    "name": format!("vm-{m}"),
                    "address": format!("198.18.{}.{}", m / 250, m % 250 + 1),
                    "networkSecurityGroupName": "nsg",
                    "ports": [{"number": 22, "protocol": "TCP", "maxRequestAccessDuration": "PT24H"}]
                })
            })
            .collect();
        let name = format!("web-{}", first / MACHINES_PER_POLICY);
        policies
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": name}, "spec": {"virtualMachines": vms}}),
                )?,
            )
            .await?;
    }
    Ok(())
}

/// A request for vm-`machine` from source number `source`.
fn request(name: &str, source: usize, machine: usize, duration: &str) -> BenchResult<JitRequest> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "policyName": format!("web-{}", machine / MACHINES_PER_POLICY),
            "virtualMachines": [{"name": format!("vm-{machine}"), "ports": [{
                "number": 22,
                "duration": duration,
                "allowedSourceAddressPrefix":
                    format!("198.19.{}.{}", source / 250 % 250, source % 250 + 1)
            }]}]
        }
    }))?)
}

/// Dry-run creates (admission runs in full, nothing is stored) of ConfigMaps and of
/// JitRequests by the requester, alternating so both see the same machine load.
async fn admission(admin: &Client, requester: &Client) -> BenchResult<(Vec<f64>, Vec<f64>)> {
    let ns = "bench-admission";
    namespace(admin, ns).await?;
    let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(json!({
        "metadata": {"name": "configmaps"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}],
    }))?;
    Api::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await?;
    let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "configmaps"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmaps"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "requester-0"}],
    }))?;
    Api::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let maps: Api<ConfigMap> = Api::namespaced(requester.clone(), ns);
    let requests: Api<JitRequest> = Api::namespaced(requester.clone(), ns);
    let (mut configmaps, mut jit) = (Vec::new(), Vec::new());
    for i in 0..GRANTS {
        let map: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("m-{i}")}}))?;
        let start = Instant::now();
        maps.create(&dry_run, &map).await?;
        configmaps.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        requests
            .create(&dry_run, &request(&format!("r-{i}"), i, 0, "PT1H")?)
            .await?;
        jit.push(start.elapsed().as_secs_f64());
    }
    Ok((configmaps, jit))
}

fn phase_is(request: &JitRequest, phase: Phase) -> bool {
    request.status.as_ref().and_then(|s| s.phase) == Some(phase)
}

/// `count` requests for one machine in a fresh namespace `ns`, one after another, each by
/// its own requester: how long each takes from create to `Granted`, and the API writes the
/// operator made for them. Those are counted from when the new policy has settled (its deny
/// rule and first statuses are per policy, not per grant) to when all is settled after the
/// grants, and the benchmark's own creates are left out.
async fn grant_latency(
    admin: &Client,
    requesters: &Requesters,
    ns: &str,
    count: usize,
) -> BenchResult<(Vec<f64>, f64)> {
    namespace(admin, ns).await?;
    policy(admin, ns, 1).await?;
    let granted = observe(Api::<JitRequest>::namespaced(admin.clone(), ns), |r| {
        phase_is(r, Phase::Granted)
    });
    let writes_before = settled_writes(admin).await?;
    let mut samples = Vec::new();
    for i in 0..count {
        let name = format!("grant-{i}");
        let start = Instant::now();
        Api::<JitRequest>::namespaced(requesters.get(i).clone(), ns)
            .create(&PostParams::default(), &request(&name, i, 0, "PT24H")?)
            .await?;
        samples.push(
            wait_for(&granted, &name)
                .await?
                .duration_since(start)
                .as_secs_f64(),
        );
    }
    // Counted once settled again: the policy's history and the NSG's grant count are
    // written after the grants, once for the whole run.
    let writes = settled_writes(admin).await? - writes_before - count as f64;
    Ok((samples, writes))
}

/// The apiserver's write count once it has stopped moving for half a second: what was set
/// up has been acted on.
async fn settled_writes(admin: &Client) -> BenchResult<f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = api_writes(admin).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = api_writes(admin).await?;
        if now == last {
            return Ok(now);
        }
        if Instant::now() > deadline {
            return Err("API writes still going on a minute after setting up a policy".into());
        }
        last = now;
    }
}

/// Grant latency on a fresh operator with a notification sink that takes connections and
/// never answers, against a fresh operator with none: [`GRANTS`] sequential grants each.
/// Publishing is a queue push on the reconcile path and the sink's worker waits on a
/// timer, so the two should not differ beyond the noise of a shared two-core machine: p50
/// within 10 % (p99 is shown; of 200 samples it is the third slowest, too noisy to bound
/// that tightly). Leaves `operator` restarted without a sink.
async fn notify_ratio(
    plane: &ControlPlane,
    admin: &Client,
    requesters: &Requesters,
    operator: &mut Operator,
) -> BenchResult<Row> {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink = format!("http://{}/events", silent.local_addr()?);
    let connections = Arc::new(Mutex::new(Vec::new()));
    let holder = tokio::spawn({
        let connections = connections.clone();
        async move {
            while let Ok((connection, _)) = silent.accept().await {
                connections.lock().expect("lock").push(connection);
            }
        }
    });
    operator.restart(plane, &[]).await?;
    let (none, _) = grant_latency(admin, requesters, "bench-notify-none", GRANTS).await?;
    operator.restart(plane, &["--notify-url", &sink]).await?;
    let (dead, _) = grant_latency(admin, requesters, "bench-notify-dead", GRANTS).await?;
    let posted = connections.lock().expect("lock").len();
    holder.abort();
    if posted == 0 {
        return Err("the operator never connected to the notification sink".into());
    }
    operator.restart(plane, &[]).await?;
    let ratio = |q| percentile(&dead, q) / percentile(&none, q);
    Ok(Row {
        name: "grant latency, never-answering sink / none",
        value: format!(
            "p50 {:.1} / {:.1} ms = {:.2}, p99 {:.1} / {:.1} ms = {:.2}",
            percentile(&dead, 0.5) * 1e3,
            percentile(&none, 0.5) * 1e3,
            ratio(0.5),
            percentile(&dead, 0.99) * 1e3,
            percentile(&none, 0.99) * 1e3,
            ratio(0.99),
        ),
        target: "p50 ratio ≤ 1.1".into(),
        met: Some(ratio(0.5) <= 1.1),
    })
}

async fn revoke_lateness(admin: &Client, requesters: &Requesters) -> BenchResult<Vec<f64>> {
    namespace(admin, "bench-revoke").await?;
    policy(admin, "bench-revoke", 1).await?;
    let requests: Api<JitRequest> = Api::namespaced(admin.clone(), "bench-revoke");
    let rules: Api<SecurityRule> = Api::namespaced(admin.clone(), "bench-revoke");
    let expired = observe(
        Api::<JitRequest>::namespaced(admin.clone(), "bench-revoke"),
        |r| phase_is(r, Phase::Expired),
    );
    // Rule deletions, observed as the rule disappearing from a watch.
    let deleted = Arc::new(Mutex::new(HashMap::<String, Instant>::new()));
    {
        let deleted = deleted.clone();
        tokio::spawn(async move {
            let mut events = watcher(rules, watcher::Config::default()).boxed();
            while let Ok(Some(event)) = events.try_next().await {
                if let watcher::Event::Delete(rule) = event {
                    deleted
                        .lock()
                        .expect("lock")
                        .insert(rule.metadata.name.unwrap_or_default(), Instant::now());
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut expiring = Vec::new();
    for i in 0..REVOKES {
        let name = format!("revoke-{i}");
        Api::<JitRequest>::namespaced(requesters.get(i).clone(), "bench-revoke")
            .create(&PostParams::default(), &request(&name, i, 0, "PT3S")?)
            .await?;
        expiring.push(name);
        tokio::time::sleep(Duration::from_millis(37)).await;
    }
    let mut samples = Vec::new();
    for name in &expiring {
        let closed_at = wait_for(&expired, name).await?;
        let request = requests.get(name).await?;
        let grant = request
            .status
            .and_then(|s| s.grants.into_iter().next())
            .ok_or("no grant")?;
        let rule_gone = wait_for(&deleted, &grant.rule).await?;
        let closed_wall = wall_seconds(closed_at.max(rule_gone));
        let expires = grant.end_time.0.as_millisecond() as f64 / 1e3;
        samples.push((closed_wall - expires).max(0.0));
    }
    Ok(samples)
}

/// The wall-clock time, in seconds since the epoch, of a past `instant`: instants and
/// timestamps meet through "now".
fn wall_seconds(instant: Instant) -> f64 {
    let (now_instant, now_wall) = (Instant::now(), jiff::Timestamp::now());
    now_wall.as_millisecond() as f64 / 1e3 - now_instant.duration_since(instant).as_secs_f64()
}

/// Scheduled requests, ten to a start second, made a few seconds ahead: how late after its
/// `startTime` is each seen `Granted` (its rules are written before the status says so)?
async fn start_lateness(admin: &Client, requesters: &Requesters) -> BenchResult<Vec<f64>> {
    let ns = "bench-start";
    namespace(admin, ns).await?;
    policy(admin, ns, 1).await?;
    let granted = observe(Api::<JitRequest>::namespaced(admin.clone(), ns), |r| {
        phase_is(r, Phase::Granted)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = jiff::Timestamp::now().as_second() + 4;
    let mut scheduled = Vec::new();
    for i in 0..REVOKES {
        let name = format!("start-{i}");
        let start = jiff::Timestamp::from_second(first + (i / 10) as i64)?;
        let mut request = request(&name, i, 0, "PT1M")?;
        request.spec.start_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(start));
        Api::<JitRequest>::namespaced(requesters.get(i).clone(), ns)
            .create(&PostParams::default(), &request)
            .await?;
        scheduled.push((name, start));
    }
    let mut samples = Vec::new();
    for (name, start) in &scheduled {
        let granted_wall = wall_seconds(wait_for(&granted, name).await?);
        samples.push((granted_wall - start.as_millisecond() as f64 / 1e3).max(0.0));
    }
    Ok(samples)
}

/// [`BURST`] requests over [`BURST_POLICIES`] fresh policies, [`PARALLEL`] at a time: the
/// seconds until all are granted.
async fn burst(admin: &Client, requesters: &Requesters) -> BenchResult<f64> {
    for p in 0..BURST_POLICIES {
        let ns = format!("bench-burst-{p}");
        namespace(admin, &ns).await?;
        policy(admin, &ns, 1).await?;
    }
    let granted = observe(Api::<JitRequest>::all(admin.clone()), |r| {
        phase_is(r, Phase::Granted)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = Instant::now();
    futures::stream::iter(0..BURST)
        .map(|i| {
            let api: Api<JitRequest> = Api::namespaced(
                requesters.get(i / BURST_POLICIES).clone(),
                &format!("bench-burst-{}", i % BURST_POLICIES),
            );
            async move {
                api.create(
                    &PostParams::default(),
                    &request(&format!("burst-{i}"), i, 0, "PT24H")?,
                )
                .await
                .map_err(Into::into)
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e: Box<dyn std::error::Error + Send + Sync>| e)?;
    for i in 0..BURST {
        wait_for(&granted, &format!("burst-{i}")).await?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// A plain client making `writes` ConfigMap creates with the burst's parallelism: the
/// burst's yardstick, as many writes as it cost (the creates plus the operator's writes).
async fn plain_writes(admin: &Client, writes: f64) -> BenchResult<f64> {
    let writes = writes as usize;
    let maps: Api<ConfigMap> = Api::namespaced(admin.clone(), "bench-floor");
    let start = Instant::now();
    futures::stream::iter(0..writes)
        .map(|i| {
            let maps = maps.clone();
            async move {
                let map: ConfigMap =
                    serde_json::from_value(json!({"metadata": {"name": format!("plain-{i}")}}))?;
                maps.create(&PostParams::default(), &map)
                    .await
                    .map_err(Into::into)
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e: Box<dyn std::error::Error + Send + Sync>| e)?;
    Ok(start.elapsed().as_secs_f64())
}

/// Tops the cluster's active grants up to `target` with long grants over [`RSS_POLICIES`]
/// fresh policies. Grants of earlier phases may end meanwhile, so it adds until the count
/// holds. Returns how many it added and how many are active then.
async fn fill(
    admin: &Client,
    requesters: &Requesters,
    target: usize,
) -> BenchResult<(usize, usize)> {
    for p in 0..RSS_POLICIES {
        let ns = format!("bench-rss-{p}");
        namespace(admin, &ns).await?;
        policy(admin, &ns, 1).await?;
    }
    let granted = observe(Api::<JitRequest>::all(admin.clone()), |r| {
        phase_is(r, Phase::Granted)
    });
    let mut added = 0;
    loop {
        let active = active_grants(admin).await?;
        if active >= target {
            return Ok((added, active));
        }
        let more = target - active;
        add_grants(requesters, added, more).await?;
        added += more;
        let deadline = Instant::now() + Duration::from_secs(1200);
        loop {
            let done = granted
                .lock()
                .expect("lock")
                .keys()
                .filter(|k| k.starts_with("rss-"))
                .count();
            if done >= added {
                break;
            }
            if Instant::now() > deadline {
                return Err(
                    format!("only {done} of {added} grants active after 20 minutes").into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Creates `count` requests `rss-{first}`… over the fill's policies, [`PARALLEL`] at a time.
async fn add_grants(requesters: &Requesters, first: usize, count: usize) -> BenchResult<()> {
    futures::stream::iter(first..first + count)
        .map(|i| {
            let api: Api<JitRequest> = Api::namespaced(
                requesters.get(i / RSS_POLICIES).clone(),
                &format!("bench-rss-{}", i % RSS_POLICIES),
            );
            async move {
                api.create(
                    &PostParams::default(),
                    &request(&format!("rss-{i}"), BURST + i, 0, "PT24H")?,
                )
                .await
                .map_err(Into::into)
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e: Box<dyn std::error::Error + Send + Sync>| e)?;
    Ok(())
}

/// How many requests in the cluster are `Granted` now.
async fn active_grants(admin: &Client) -> BenchResult<usize> {
    let requests: Api<JitRequest> = Api::all(admin.clone());
    let list = requests.list(&Default::default()).await?.items;
    Ok(list.iter().filter(|r| phase_is(r, Phase::Granted)).count())
}

/// Requests the apiserver has served so far, by `verb resource[/subresource]`.
async fn api_calls(client: &Client) -> BenchResult<BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut calls = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |name: &str| {
            line.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .unwrap_or_default()
                .to_owned()
        };
        let mut key = format!("{} {}", label("verb"), label("resource"));
        let sub = label("subresource");
        if !sub.is_empty() {
            key = format!("{key}/{sub}");
        }
        let count: f64 = line.rsplit(' ').next().unwrap_or("0").parse()?;
        *calls.entry(key).or_insert(0.0) += count;
    }
    Ok(calls)
}

/// Write requests the apiserver has served so far (create, update, patch, apply, delete),
/// SubjectAccessReviews and Leases left out.
async fn api_writes(client: &Client) -> BenchResult<f64> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        // A SubjectAccessReview is a question, not a write: nothing is stored.
        .filter(|l| !l.contains("resource=\"subjectaccessreviews\""))
        // The apiserver renews its own identity Lease every 10 s, whatever is going on (the
        // benchmark's operator runs without leader election).
        .filter(|l| !l.contains("resource=\"leases\""))
        .filter(|l| {
            [
                "\"POST\"",
                "\"PUT\"",
                "\"PATCH\"",
                "\"APPLY\"",
                "\"DELETE\"",
            ]
            .iter()
            .any(|v| l.contains(&format!("verb={v}")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}
