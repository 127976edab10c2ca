//! `make bench`: the enforcement agent in a real kernel. Prints a table and writes it as JSON
//! to `target/bench/agent.json`.
//!
//! - render + apply (full replace) of NSGs of 10, 1,000 and 10,000 rules;
//! - the apply of one grant (an element add) beside 10 and beside 10,000 active grants, and
//!   the ratio of the two (it must stay flat);
//! - the CPU of the agent's round before that apply (model, render, diff, hash), beside 10
//!   and beside 10,000 active grants;
//! - revoke precision with the kernel alone (no agent): grants whose element timeouts run
//!   out, `expiresAt` → first dropped connect;
//! - end to end through a control plane, the operator (in-process) and the agent binary:
//!   JitRequest created → first successful TCP connect, and `expiresAt` → first dropped
//!   connect with the agent running.
//!
//! Needs root, network namespaces and `nft`; without them it prints a loud SKIP line and
//! succeeds. Everything runs in two network namespaces of its own ("vm" and "client", one
//! veth pair, addresses from 198.18.0.0/15 only), removed on every path.

mod report;

use report::apiserver::floor;
use report::{BenchResult, Row, percentile, percentiles, print_table};

/// What the end-to-end measurement returns: the write floor, and per request the created →
/// first connect latency split at the moment the grant's SecurityRule reached a watch, and
/// the revoke lateness.
struct EndToEnd {
    floor: Vec<f64>,
    grants: Vec<Grant>,
    revokes: Vec<f64>,
}

/// One request's way to its first connect.
struct Grant {
    /// JitRequest created → first successful TCP connect.
    total: f64,
    /// JitRequest created → its SecurityRule seen by a watch (the operator's part).
    rule: f64,
}

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher::{self, watcher};
use portcullis::access::materialize::report_name;
use portcullis::agent::apply::{self, Applied, Enforcer, Nft};
use portcullis::agent::render::{self, Policy, Ruleset, Target};
use portcullis::api::jit_request::Phase;
use portcullis::api::security_rule::{LABEL_MANAGED_BY, MANAGED_BY};
use portcullis::api::{AgentReport, JitPolicy, JitRequest, NetworkSecurityGroup, SecurityRule};
use portcullis::rules::{
    self, Access, AddressPrefix, Direction, Origin, PortRange, Protocol, Rule, Scope,
};
use portcullis::testenv::{ADMIN, ControlPlane};
use serde_json::json;
use tokio::net::TcpSocket;
use tokio::sync::oneshot;

/// The protected machine's address in the "vm" namespace.
const VM: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The port the grants open; a plain TCP listener answers on it.
const PORT: u16 = 22;
/// The table of the direct (agent-less) measurements.
const TABLE: &str = "portcullis_bench";
/// NSG sizes of the render + apply measurement, with how many times each is applied.
const SIZES: [(usize, usize); 3] = [(10, 5), (1_000, 5), (10_000, 3)];
/// Active grants beside which one more grant is applied.
const ACTIVE: [usize; 2] = [10, 10_000];
/// One-grant applies measured per size of the active set.
const GRANT_APPLIES: usize = 30;
/// Sequential connects per measurement of the connect rate, and how many measurements
/// alternate between the sizes of the active set (so that drift of a busy machine hits
/// both alike).
const RATE_CONNECTS: usize = 500;
const RATE_ROUNDS: usize = 3;
/// Grants left to expire in the kernel, and the client addresses they open (198.18.2.x).
const KERNEL_REVOKES: usize = 20;
/// JitRequests of the end-to-end measurement, and their client addresses (198.18.1.x).
const E2E_REQUESTS: usize = 30;
/// Plain writes timed for the floor the end-to-end latency is compared with.
const FLOOR_WRITES: usize = 100;
/// The duration of the end-to-end requests: long enough to outlast the grant phase of the
/// later ones being measured beside them, short enough to keep the bench brief.
const E2E_DURATION: &str = "PT10S";
/// How often a probe starts a connect attempt while it waits for a grant (the resolution of
/// the created → first connect latency) and while it waits for a revocation, and how long
/// an attempt waits for the handshake before it counts as dropped (a veth answers an
/// accepted SYN in microseconds).
const PASS_PROBE_EVERY: Duration = Duration::from_millis(1);
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// How long before its `expiresAt` a grant is first probed for its end: its probes must
/// not load the machine while later grants are timed.
const DROP_PROBE_LEAD: Duration = Duration::from_millis(500);
const DROP_TIMEOUT: Duration = Duration::from_millis(250);
/// How long any single wait of the bench may last.
const DEADLINE: Duration = Duration::from_secs(60);

fn main() -> std::process::ExitCode {
    if let Some(why) = unsupported() {
        println!("\n*** SKIP agent benchmark: {why} ***\n");
        return std::process::ExitCode::SUCCESS;
    }
    report::execute(run())
}

/// Why the benchmark cannot run here, if it cannot.
fn unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (needs root, network namespaces and nft)".into());
    }
    if !std::path::Path::new("/usr/sbin/nft").exists() {
        return Some("/usr/sbin/nft is missing (apt-get install nftables)".into());
    }
    let probe = format!("pcbprobe{}", std::process::id());
    if ip(&["netns", "add", &probe]).is_err() {
        return Some("network namespaces are not permitted".into());
    }
    let _ = ip(&["netns", "del", &probe]);
    None
}

async fn run() -> BenchResult<()> {
    let kernel_sources: Vec<Ipv4Addr> = (0..KERNEL_REVOKES)
        .map(|i| Ipv4Addr::new(198, 18, 2, i as u8 + 1))
        .collect();
    let e2e_sources: Vec<Ipv4Addr> = (0..E2E_REQUESTS)
        .map(|i| Ipv4Addr::new(198, 18, 1, i as u8 + 1))
        .collect();
    let mut lab = Lab::new(&[kernel_sources.as_slice(), &e2e_sources].concat())?;
    let listener = lab.listen(PORT)?;
    let mut rows = Vec::new();

    let mut enforcer = Enforcer::new(Nft::in_netns(&lab.vm)?);
    for (size, repeats) in SIZES {
        rows.push(render_and_apply(&lab, size, repeats).await?);
    }
    let mut p50s = Vec::new();
    for active in ACTIVE {
        let samples = grant_applies(&mut enforcer, active).await?;
        p50s.push(percentile(&samples, 0.5));
        rows.push(percentiles(
            if active == ACTIVE[0] {
                "one grant apply, 10 active grants"
            } else {
                "one grant apply, 10,000 active grants"
            },
            &samples,
            None,
        ));
    }
    let ratio = p50s[1] / p50s[0];
    rows.push(Row {
        name: "grant apply ratio (10,000 / 10 active, p50)",
        value: format!("{ratio:.2}"),
        target: "≤ 1.5".into(),
        met: Some(ratio <= 1.5),
    });
    for active in ACTIVE {
        rows.push(percentiles(
            if active == ACTIVE[0] {
                "one round's CPU for a grant, 10 active grants"
            } else {
                "one round's CPU for a grant, 10,000 active grants"
            },
            &round_cpu(active)?,
            None,
        ));
    }

    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); ACTIVE.len()];
    for _ in 0..RATE_ROUNDS {
        for (i, active) in ACTIVE.iter().enumerate() {
            rates[i].push(connect_rate(&mut enforcer, &lab, *active, kernel_sources[0]).await?);
        }
    }
    let medians: Vec<f64> = rates.iter().map(|r| percentile(r, 0.5)).collect();
    for (i, name) in [
        "connect rate through the table, 10 active grants",
        "connect rate through the table, 10,000 active grants",
    ]
    .into_iter()
    .enumerate()
    {
        rows.push(Row {
            name,
            value: format!("{:.0}/s", medians[i]),
            target: String::new(),
            met: None,
        });
    }
    let ratio = medians[1] / medians[0];
    rows.push(Row {
        name: "connect rate ratio (10,000 / 10 active)",
        value: format!("{ratio:.2}"),
        target: "≥ 0.9".into(),
        met: Some(ratio >= 0.9),
    });

    let lateness = kernel_revokes(&mut enforcer, &lab, &kernel_sources).await?;
    rows.push(Row {
        met: Some(percentile(&lateness, 0.99) <= 1.0),
        ..percentiles(
            "revoke precision, kernel timeout alone",
            &lateness,
            Some("p99 ≤ 1 s".into()),
        )
    });
    enforcer.cleanup(TABLE).await?;

    let EndToEnd {
        floor,
        grants,
        revokes,
    } = end_to_end(&mut lab, &e2e_sources).await?;
    rows.push(percentiles(
        "write floor (ConfigMap create → watch)",
        &floor,
        None,
    ));
    let limit = 6.0 * percentile(&floor, 0.99);
    let total: Vec<f64> = grants.iter().map(|g| g.total).collect();
    rows.push(Row {
        met: Some(percentile(&total, 0.99) <= limit),
        ..percentiles(
            "JitRequest created → first TCP connect",
            &total,
            Some(format!("p99 ≤ 6 × floor p99 = {:.1} ms", limit * 1000.0)),
        )
    });
    let operator: Vec<f64> = grants.iter().map(|g| g.rule).collect();
    let agent: Vec<f64> = grants.iter().map(|g| g.total - g.rule).collect();
    rows.push(percentiles(
        "  of which created → rule watched",
        &operator,
        None,
    ));
    rows.push(percentiles(
        "  of which rule watched → connect",
        &agent,
        None,
    ));
    rows.push(Row {
        met: Some(percentile(&revokes, 0.99) <= 1.0),
        ..percentiles(
            "revoke precision, agent running",
            &revokes,
            Some("p99 ≤ 1 s".into()),
        )
    });
    listener.abort();
    drop(lab);

    print_table(&rows);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("agent.json"), serde_json::to_string_pretty(&rows)?)?;
    println!("\nwritten to {}", dir.join("agent.json").display());
    Ok(())
}

/// Runs `ip ARGS`, failing with its standard error.
fn ip(args: &[&str]) -> BenchResult<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into())
    }
}

/// Network namespaces this benchmark added, deleted on drop whatever path it took.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: String) -> BenchResult<()> {
        ip(&["netns", "add", &name])?;
        self.0.push(name);
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The "vm" and "client" namespaces, the agent started for them and its log directory.
/// Dropping it ends the agent, then removes the namespaces.
struct Lab {
    vm: String,
    dir: tempfile::TempDir,
    agent: Option<Child>,
    probe: Probe,
    /// Held for its `Drop`, which runs after `Lab`'s own (the agent is gone by then).
    _namespaces: Namespaces,
}

impl Lab {
    /// "vm" (address [`VM`]) and "client" (addresses `sources`) joined by a veth pair.
    fn new(sources: &[Ipv4Addr]) -> BenchResult<Self> {
        let id = std::process::id();
        let (vm, client) = (format!("pcbvm{id}"), format!("pcbcl{id}"));
        let mut namespaces = Namespaces(Vec::new());
        namespaces.add(vm.clone())?;
        namespaces.add(client.clone())?;
        let (vm_ns, client_ns) = (vm.as_str(), client.as_str());
        ip(&[
            "-n", vm_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            client_ns,
        ])?;
        for ns in [vm_ns, client_ns] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        ip(&[
            "-n",
            vm_ns,
            "addr",
            "add",
            &format!("{VM}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", vm_ns, "route", "add", "198.18.0.0/15", "dev", "eth0"])?;
        for source in sources {
            let address = format!("{source}/32");
            ip(&["-n", client_ns, "addr", "add", &address, "dev", "eth0"])?;
        }
        let route = format!("{VM}/32");
        ip(&["-n", client_ns, "route", "add", &route, "dev", "eth0"])?;
        Ok(Lab {
            probe: Probe::new(&client)?,
            vm,
            dir: tempfile::tempdir()?,
            agent: None,
            _namespaces: namespaces,
        })
    }

    /// A listener on the vm's `port`, accepting and dropping connections until aborted.
    fn listen(&self, port: u16) -> BenchResult<tokio::task::JoinHandle<()>> {
        let listener = in_netns(&self.vm, move || {
            let listener = std::net::TcpListener::bind(SocketAddr::from((VM, port)))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        Ok(tokio::spawn(async move {
            while listener.accept().await.is_ok() {}
        }))
    }

    /// Ends the agent, if one runs, and waits for it.
    fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Reaped before the namespaces go (`_namespaces` drops after this).
        self.stop_agent();
    }
}

/// Runs `make` on a short-lived thread that entered network namespace `netns`: sockets
/// belong to the namespace they were created in, wherever they are used afterwards.
fn in_netns<T: Send + 'static>(
    netns: &str,
    make: impl FnOnce() -> BenchResult<T> + Send + 'static,
) -> BenchResult<T> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || {
        enter(&path)?;
        make()
    })
    .join()
    .map_err(|_| "namespace thread panicked")?
}

/// Moves the calling thread into the network namespace at `path` (and only that thread).
fn enter(path: &str) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    // SAFETY: setns on a valid namespace fd; it changes only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

type SocketRequest = (Ipv4Addr, oneshot::Sender<std::io::Result<TcpSocket>>);

/// Connect attempts from the client namespace to the vm's [`PORT`]. Sockets come from a
/// thread that stays in the client namespace (no thread per attempt); the thread ends when
/// the last clone of the probe is dropped.
#[derive(Clone)]
struct Probe(mpsc::Sender<SocketRequest>);

impl Probe {
    fn new(netns: &str) -> BenchResult<Self> {
        let (sender, requests) = mpsc::channel::<SocketRequest>();
        let path = format!("/var/run/netns/{netns}");
        let (ready, entered) = mpsc::channel();
        std::thread::spawn(move || {
            let entered = enter(&path);
            let failed = entered.is_err();
            let _ = ready.send(entered);
            if failed {
                return;
            }
            while let Ok((source, reply)) = requests.recv() {
                let socket = TcpSocket::new_v4().and_then(|socket| {
                    socket.bind(SocketAddr::from((source, 0)))?;
                    Ok(socket)
                });
                let _ = reply.send(socket);
            }
        });
        entered.recv()??;
        Ok(Self(sender))
    }

    /// One connect attempt from `source`: true if the SYN passed the firewall.
    async fn passes(&self, source: Ipv4Addr) -> BenchResult<bool> {
        let (reply, socket) = oneshot::channel();
        self.0
            .send((source, reply))
            .map_err(|_| "the socket thread is gone")?;
        let socket = socket.await??;
        match tokio::time::timeout(DROP_TIMEOUT, socket.connect(SocketAddr::from((VM, PORT)))).await
        {
            Err(_) => Ok(false),
            Ok(Ok(_)) => Ok(true),
            // A RST: the SYN passed the firewall.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(true),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Waits for the first attempt from `source` that passes, starting one every
    /// [`PASS_PROBE_EVERY`] without waiting for earlier ones; returns when it completed.
    async fn first_pass(&self, source: Ipv4Addr) -> BenchResult<Instant> {
        let deadline = Instant::now() + DEADLINE;
        let mut attempts = futures::stream::FuturesUnordered::new();
        let mut tick = tokio::time::interval(PASS_PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => attempts.push(self.passes(source)),
                Some(passed) = attempts.next() => {
                    if passed? {
                        return Ok(Instant::now());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no connect from {source} passed within {DEADLINE:?}").into());
            }
        }
    }

    /// Probes from `source` until an attempt is dropped; returns when that attempt started
    /// (the state of the firewall at that moment refused its SYN).
    async fn first_drop(&self, source: Ipv4Addr) -> BenchResult<Timestamp> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let started = Timestamp::now();
            if !self.passes(source).await? {
                return Ok(started);
            }
            if Instant::now() > deadline {
                return Err(format!("connects from {source} still pass after {DEADLINE:?}").into());
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }
}

/// A small deterministic generator (SplitMix64): every run benchmarks the same NSGs.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn target() -> Target {
    Target {
        table: TABLE.into(),
        addresses: vec![IpAddr::V4(VM)],
        mode: render::Mode::Host,
    }
}

/// The vm's /28 is the virtual network: the clients are "Internet".
fn scope() -> Scope {
    Scope {
        virtual_network: vec!["198.18.0.0/28".parse().expect("valid net")],
        load_balancer: Vec::new(),
    }
}

/// `count` random-ish inbound rules at distinct priorities (from 100 up: past 4,096, Azure's
/// bound for one NSG, when there are that many), sources inside 198.18.0.0/15.
fn random_rules(count: usize) -> Vec<Rule> {
    let mut random = Random(count as u64);
    (0..count)
        .map(|i| {
            let source = match random.below(4) {
                0 => AddressPrefix::VirtualNetwork,
                1 => AddressPrefix::Internet,
                _ => format!(
                    "198.{}.{}.0/{}",
                    18 + random.below(2),
                    random.below(256),
                    24 + random.below(9)
                )
                .parse()
                .expect("valid prefix"),
            };
            let start = 1 + random.below(60_000) as u16;
            let ports = if random.below(2) == 0 {
                PortRange::single(start)
            } else {
                format!("{start}-{}", start + random.below(1_000) as u16)
                    .parse()
                    .expect("valid ports")
            };
            Rule {
                name: format!("rule-{i}"),
                priority: 100 + i as u32,
                direction: Direction::Inbound,
                access: if random.below(2) == 0 {
                    Access::Allow
                } else {
                    Access::Deny
                },
                protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Any][random.below(3) as usize],
                source_prefixes: vec![source],
                source_ports: vec![PortRange::Any],
                destination_prefixes: vec![if random.below(2) == 0 {
                    AddressPrefix::Any
                } else {
                    AddressPrefix::Net(IpAddr::V4(VM).into())
                }],
                destination_ports: vec![ports],
                origin: Origin::Inline,
                jit: false,
            }
        })
        .collect()
}

/// Renders and applies (a full replace, as a fresh agent does) an NSG of `size` rules
/// `repeats` times; the row gives the medians.
async fn render_and_apply(lab: &Lab, size: usize, repeats: usize) -> BenchResult<Row> {
    let policy = Policy {
        rules: rules::effective(random_rules(size)),
        scope: scope(),
        ..Policy::default()
    };
    let (mut renders, mut applies) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let now = Timestamp::now();
        let started = Instant::now();
        let ruleset = render::render(&policy, &target(), now);
        renders.push(started.elapsed().as_secs_f64());
        let mut enforcer = Enforcer::new(Nft::in_netns(&lab.vm)?);
        let (how, took) = enforcer.timed_apply(ruleset, now).await?;
        if how != Applied::Full {
            return Err(format!("a fresh enforcer applied {how:?}, not a full replace").into());
        }
        applies.push(took.as_secs_f64());
    }
    Ok(Row {
        name: match size {
            10 => "render + apply, 10 rules",
            1_000 => "render + apply, 1,000 rules",
            _ => "render + apply, 10,000 rules",
        },
        value: format!(
            "render {:.2} ms + apply {:.1} ms (median of {repeats})",
            percentile(&renders, 0.5) * 1e3,
            percentile(&applies, 0.5) * 1e3
        ),
        target: "-".into(),
        met: None,
    })
}

/// A grant as the operator writes it: a `SecurityRule` allowing one source on [`PORT`].
fn grant(index: usize) -> Rule {
    Rule {
        name: format!("grant-{index}"),
        priority: 100 + index as u32,
        direction: Direction::Inbound,
        access: Access::Allow,
        protocol: Protocol::Tcp,
        source_prefixes: vec![AddressPrefix::Net(
            IpAddr::V4(Ipv4Addr::new(
                198,
                19,
                (index / 250) as u8,
                (index % 250) as u8 + 1,
            ))
            .into(),
        )],
        source_ports: vec![PortRange::Any],
        destination_prefixes: vec![AddressPrefix::Net(IpAddr::V4(VM).into())],
        destination_ports: vec![PortRange::single(PORT)],
        origin: Origin::SecurityRule {
            name: format!("grant-{index}"),
        },
        jit: true,
    }
}

/// The ruleset of `grants` (each expiring at its own instant) above a few user rules.
fn granted(grants: &[(Rule, Timestamp)], now: Timestamp) -> Ruleset {
    let mut model: Vec<Rule> = grants.iter().map(|(rule, _)| rule.clone()).collect();
    model.extend(random_rules(10).into_iter().map(|mut rule| {
        rule.priority += 20_000;
        rule
    }));
    let policy = Policy {
        rules: rules::effective(model),
        scope: scope(),
        expiries: grants
            .iter()
            .map(|(rule, expires)| (rule.name.clone(), *expires))
            .collect(),
        closing: Default::default(),
        idle: Default::default(),
    };
    render::render(&policy, &target(), now)
}

/// Applies `active` grants, then one more grant at a time; returns how long each of those
/// one-grant applies took (the render is not included: it is the caller's work).
async fn grant_applies(enforcer: &mut Enforcer, active: usize) -> BenchResult<Vec<f64>> {
    let now = Timestamp::now();
    let expires = now + SignedDuration::from_hours(1);
    let mut grants: Vec<(Rule, Timestamp)> = (0..active).map(|i| (grant(i), expires)).collect();
    enforcer.invalidate();
    enforcer.apply(granted(&grants, now), now).await?;
    let mut samples = Vec::new();
    for extra in 0..GRANT_APPLIES {
        grants.push((grant(active + extra), expires));
        let now = Timestamp::now();
        let ruleset = granted(&grants, now);
        let (how, took) = enforcer.timed_apply(ruleset, now).await?;
        if how != Applied::Grants {
            return Err(
                format!("one more grant was applied as {how:?}, not an element add").into(),
            );
        }
        samples.push(took.as_secs_f64());
    }
    Ok(samples)
}

/// What one agent round costs before `nft` runs when a grant arrives beside `active` others,
/// from the objects as the watches hold them (the NSG and its grants' SecurityRules, as the
/// operator writes them): the NSG model, the render, the comparison with what is applied,
/// the grant diff and the hash the report carries. Pure CPU, one sample per extra grant.
fn round_cpu(active: usize) -> BenchResult<Vec<f64>> {
    let now = Timestamp::now();
    let expires = (now + SignedDuration::from_hours(1)).to_string();
    let nsg: NetworkSecurityGroup = serde_json::from_value(json!({
        "metadata": {"name": "nsg", "namespace": "bench", "uid": "nsg-uid", "generation": 1},
        "spec": {"virtualNetworkPrefixes": ["198.18.0.0/28"]}
    }))?;
    let object = |index: usize| -> BenchResult<SecurityRule> {
        let source = Ipv4Addr::new(198, 19, (index / 250) as u8, (index % 250) as u8 + 1);
        Ok(serde_json::from_value(json!({
            "metadata": {
                "name": format!("grant-{index}"),
                "resourceVersion": index.to_string(),
                "labels": {LABEL_MANAGED_BY: MANAGED_BY}
            },
            "spec": {
                "networkSecurityGroupName": "nsg", "priority": 100, "direction": "Inbound",
                "access": "Allow", "protocol": "Tcp", "sourceAddressPrefix": source.to_string(),
                "sourcePortRange": "*", "destinationAddressPrefix": VM.to_string(),
                "destinationPortRange": PORT.to_string(), "expiresAt": expires
            }
        }))?)
    };
    let mut objects = (0..active).map(object).collect::<BenchResult<Vec<_>>>()?;
    let render = |objects: &[SecurityRule]| -> BenchResult<Ruleset> {
        let refs: Vec<&SecurityRule> = objects.iter().collect();
        let policy = portcullis::agent::policy(&nsg, &refs, now)
            .map_err(|invalid| format!("{invalid:?}"))?;
        Ok(render::render(&policy, &target(), now))
    };
    let mut applied = render(&objects)?;
    let mut samples = Vec::new();
    for extra in 0..GRANT_APPLIES {
        objects.push(object(active + extra)?);
        let started = Instant::now();
        let desired = render(&objects)?;
        let changed = desired != applied;
        let update = apply::grant_update(&applied, &desired, now);
        let hash = desired.hash();
        samples.push(started.elapsed().as_secs_f64());
        if !changed || update.is_none() || hash.is_empty() {
            return Err("one more grant did not render as an element update".into());
        }
        applied = desired;
    }
    Ok(samples)
}

/// Connects per second from `source` through the table with `active` grants in force and
/// one for `source`: sequential, each a whole TCP handshake with the listener, so the
/// kernel's verdict on every SYN is part of each.
async fn connect_rate(
    enforcer: &mut Enforcer,
    lab: &Lab,
    active: usize,
    source: Ipv4Addr,
) -> BenchResult<f64> {
    let now = Timestamp::now();
    let expires = now + SignedDuration::from_hours(1);
    let mut grants: Vec<(Rule, Timestamp)> = (0..active).map(|i| (grant(i), expires)).collect();
    let mut mine = grant(active);
    mine.source_prefixes = vec![AddressPrefix::Net(IpAddr::V4(source).into())];
    grants.push((mine, expires));
    enforcer.apply(granted(&grants, now), now).await?;
    let connects = async |count: usize| -> BenchResult<()> {
        for _ in 0..count {
            if !lab.probe.passes(source).await? {
                return Err(format!("a granted connect from {source} was dropped").into());
            }
        }
        Ok(())
    };
    connects(RATE_CONNECTS / 10).await?;
    let started = Instant::now();
    connects(RATE_CONNECTS).await?;
    Ok(RATE_CONNECTS as f64 / started.elapsed().as_secs_f64())
}

/// Grants for `sources` whose `expiresAt` are a few seconds away and staggered over one
/// second (so that the round-up of element timeouts to whole seconds is sampled evenly), then
/// nothing but the kernel: how late after `expiresAt` is each source's first dropped connect?
async fn kernel_revokes(
    enforcer: &mut Enforcer,
    lab: &Lab,
    sources: &[Ipv4Addr],
) -> BenchResult<Vec<f64>> {
    let now = Timestamp::now();
    let step = 1_000 / sources.len() as i64;
    let grants: Vec<(Rule, Timestamp)> = sources
        .iter()
        .enumerate()
        .map(|(i, source)| {
            let mut rule = grant(i);
            rule.source_prefixes = vec![AddressPrefix::Net(IpAddr::V4(*source).into())];
            let expires = now + SignedDuration::from_millis(3_000 + step * i as i64);
            (rule, expires)
        })
        .collect();
    enforcer.invalidate();
    enforcer.apply(granted(&grants, now), now).await?;
    let probes = grants.iter().zip(sources).map(|((_, expires), source)| {
        let expires = *expires;
        async move {
            // Open now, dropped after the expiry.
            lab.probe.first_pass(*source).await?;
            let dropped = lab.probe.first_drop(*source).await?;
            BenchResult::Ok(lateness(dropped, expires))
        }
    });
    futures::future::try_join_all(probes).await
}

/// Seconds from `expires` to `closed`, never negative (closing early would be a bug the
/// integration tests catch, not a precision figure).
fn lateness(closed: Timestamp, expires: Timestamp) -> f64 {
    closed.duration_since(expires).as_secs_f64().max(0.0)
}

/// The whole path: a control plane, the operator in-process and the agent binary enforcing
/// into the vm namespace. Requests are created one after the other, each by its own source;
/// returns the plain write floor of that apiserver, the created → first connect latencies
/// and the `expiresAt` → first dropped connect lateness of every request.
async fn end_to_end(lab: &mut Lab, sources: &[Ipv4Addr]) -> BenchResult<EndToEnd> {
    let plane = ControlPlane::start().await?;
    portcullis::testenv::install::product(&plane).await?;
    let client = plane.client(ADMIN).await?;
    let operator_client = plane.client(portcullis::testenv::OPERATOR).await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let config = portcullis::controller::Config {
        http_addr: std::net::SocketAddr::from(([127, 0, 0, 1], portcullis::testenv::free_port()?)),
        ..Default::default()
    };
    let operator = tokio::spawn(portcullis::controller::run(
        operator_client,
        config,
        async {
            let _ = stopped.await;
        },
    ));
    // The first writes to a fresh apiserver are slow: warm it up, so the floor is what
    // a write costs once it runs, like the operator's requests after it.
    floor(&client, "bench-agent-floor-warmup", FLOOR_WRITES).await?;
    let floor = floor(&client, "bench-agent-floor", FLOOR_WRITES).await?;
    let result =
        measure_end_to_end(lab, &plane, &client, sources)
            .await
            .map(|(grants, revokes)| EndToEnd {
                floor,
                grants,
                revokes,
            });
    let _ = stop.send(());
    let _ = operator.await;
    lab.stop_agent();
    let _ =
        portcullis::agent::cleanup(Nft::in_netns(&lab.vm)?, portcullis::agent::DEFAULT_TABLE).await;
    drop(plane);
    result.map_err(|e| format!("{e}\nagent log:\n{}", lab.agent_log()).into())
}

async fn measure_end_to_end(
    lab: &mut Lab,
    plane: &ControlPlane,
    client: &Client,
    sources: &[Ipv4Addr],
) -> BenchResult<(Vec<Grant>, Vec<f64>)> {
    let ns = "bench-agent";
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    let nsgs: Api<NetworkSecurityGroup> = Api::namespaced(client.clone(), ns);
    let reports: Api<AgentReport> = Api::namespaced(client.clone(), ns);
    nsgs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "nsg"},
            "spec": {"virtualNetworkPrefixes": ["198.18.0.0/28"]}
        }))?,
    )
    .await?;
    Api::<JitPolicy>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "web"},
                "spec": {"virtualMachines": [{
                    "name": "vm-0",
                    "address": VM.to_string(),
                    "networkSecurityGroupName": "nsg",
                    "ports": [{
                        "number": PORT,
                        "protocol": "TCP",
                        "allowedSourceAddressPrefix": "198.18.1.0/24",
                        "maxRequestAccessDuration": "PT1H"
                    }]
                }]}
            }))?,
        )
        .await?;

    let log = std::fs::File::create(lab.dir.path().join("agent.log"))?;
    lab.agent = Some(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["agent", "--nsg", &format!("{ns}/nsg")])
            .args(["--address", &VM.to_string(), "--agent-name", "bench"])
            .args(["--netns", &lab.vm])
            .arg("--state-dir")
            .arg(lab.dir.path().join("state"))
            .env("KUBECONFIG", plane.kubeconfig(ADMIN.name))
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?,
    );
    // Enforcing once it reported, and the port closed.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reported = reports
            .get_opt(&report_name("nsg", "bench"))
            .await?
            .is_some_and(|r| r.spec.report.error.is_none() && r.spec.report.rules_hash != "none");
        if reported && !lab.probe.passes(sources[0]).await? {
            break;
        }
        if Instant::now() > deadline {
            return Err("the agent did not enforce the NSG".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // When each request's grant rule reached a watch like the agent's.
    let rules: Api<SecurityRule> = Api::namespaced(client.clone(), ns);
    let (seen, mut rule_seen) = tokio::sync::mpsc::unbounded_channel();
    let rule_watch = tokio::spawn(async move {
        let config = watcher::Config::default().labels(&format!(
            "{}={}",
            portcullis::access::materialize::LABEL_ROLE,
            portcullis::access::materialize::ROLE_ALLOW
        ));
        let mut events = watcher(rules, config).boxed();
        while let Some(Ok(event)) = events.next().await {
            if matches!(event, watcher::Event::InitDone)
                && seen.send((String::new(), Instant::now())).is_err()
            {
                break;
            }
            if let watcher::Event::Apply(rule) = event
                && let Some(request) = rule
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(portcullis::access::materialize::LABEL_REQUEST))
                && seen.send((request.clone(), Instant::now())).is_err()
            {
                break;
            }
        }
    });
    // Listening before the first request is created.
    tokio::time::timeout(DEADLINE, rule_seen.recv())
        .await?
        .ok_or("the rule watch ended")?;
    let mut watched = std::collections::HashMap::new();
    let mut latencies = Vec::new();
    let mut revokes = Vec::new();
    // Each request by its own requester, so that none supersedes another; each client has
    // connected once before it is timed, so no TLS handshake is counted as the product's.
    let team = portcullis::testenv::ALICE.groups[0];
    let mut requesters = Vec::with_capacity(sources.len());
    for i in 0..sources.len() {
        let requester = plane.impersonating(&format!("user-{i}"), &[team]).await?;
        let requests: Api<JitRequest> = Api::namespaced(requester, ns);
        requests.list(&ListParams::default().limit(1)).await?;
        requesters.push(requests);
    }
    for ((i, source), requests) in sources.iter().enumerate().zip(requesters) {
        let request: JitRequest = serde_json::from_value(json!({
            "metadata": {"name": format!("e2e-{i}")},
            "spec": {
                "policyName": "web",
                "virtualMachines": [{"name": "vm-0", "ports": [{
                    "number": PORT,
                    "duration": E2E_DURATION,
                    "allowedSourceAddressPrefix": source.to_string()
                }]}]
            }
        }))?;
        let started = Instant::now();
        requests.create(&PostParams::default(), &request).await?;
        let open = lab.probe.first_pass(*source).await?;
        let name = format!("e2e-{i}");
        let rule = loop {
            if let Some(at) = watched.get(&name) {
                break *at;
            }
            let (request, at) = tokio::time::timeout(DEADLINE, rule_seen.recv())
                .await?
                .ok_or("the rule watch ended")?;
            watched.entry(request).or_insert(at);
        };
        latencies.push(Grant {
            total: open.duration_since(started).as_secs_f64(),
            rule: rule.saturating_duration_since(started).as_secs_f64(),
        });
        // The expiry the operator recorded, then watched in the background.
        let expires = loop {
            let status = requests.get(&name).await?.status;
            let granted = status
                .as_ref()
                .filter(|s| s.phase == Some(Phase::Granted))
                .and_then(|s| s.grants.first())
                .map(|g| g.end_time.0);
            if let Some(expires) = granted {
                break expires;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Watched from now on, beside the next requests' grants.
        let (probe, source) = (lab.probe.clone(), *source);
        revokes.push(tokio::spawn(async move {
            let lead = SignedDuration::try_from(DROP_PROBE_LEAD)?;
            let until = expires.checked_sub(lead)?.duration_since(Timestamp::now());
            tokio::time::sleep(Duration::try_from(until).unwrap_or_default()).await;
            let dropped = probe.first_drop(source).await?;
            BenchResult::Ok(lateness(dropped, expires))
        }));
    }
    rule_watch.abort();
    let mut lateness = Vec::new();
    for revoke in revokes {
        lateness.push(revoke.await??);
    }
    Ok((latencies, lateness))
}
