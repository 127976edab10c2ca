//! `portcullis agent`: enforces one NSG on the machine it runs on, with nftables.
//!
//! It watches the NSG and the `SecurityRule`s that reference it, renders the effective
//! inbound rules for the machine's addresses ([`render`]), puts them into its own table
//! ([`apply`]) and reports what it applied in an [`AgentReport`] object of its own
//! ([`report`]), which the operator summarizes into the NSG's `status.enforcement`.
//!
//! Failure behaviour, by design:
//! - API server unreachable: the watches retry with backoff and nothing is re-applied; the
//!   kernel keeps the last ruleset, and grants still expire there (element timeouts).
//! - restart or reboot: the ruleset last applied is kept on disk ([`state`], written before
//!   a change that closes anything reaches the kernel, just after one that only adds a
//!   grant) and put back at start, before the agent contacts the
//!   apiserver, grants with the time they have left; then the first full replace from the
//!   watches swaps in the current state in one transaction, so no closed port is ever open
//!   in between.
//! - an NSG it cannot use (missing, unreadable rules): the last good table stays and the
//!   error is reported.
//! - addresses: with no `--address`, every local address is protected ([`addresses`]), and
//!   a JIT rule aimed at the machine covers all of them (see [`render`]).
//! - SIGTERM: the table stays (a stopped agent must not open the machine); `--cleanup`
//!   removes it explicitly.

pub mod activity;
pub mod addresses;
pub mod apply;
pub mod cut;
pub mod inputs;
pub mod listening;
pub mod render;
pub mod report;
pub mod saver;
pub mod state;

use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::api::convert::ConvertError;
use crate::api::nsg::{EnforcementReport, IdleGrant, ListeningPort};
use crate::api::nsg_model::NsgModel;
use crate::api::{AgentReport, NetworkSecurityGroup, SecurityRule};
use crate::rules::{self};
use activity::Activity;
use apply::{Applied, Enforcer, Nft};
use inputs::{Change, Inputs};
use render::{Mode, Policy, Ruleset, Target};
use report::{Reported, Written};
use saver::Saver;
use state::State;

/// The table name when `--table` is not given.
pub const DEFAULT_TABLE: &str = "portcullis";
/// The full table is re-asserted this often even without a change, so an out-of-band edit
/// of the table does not last.
const RESYNC: Duration = Duration::from_secs(300);
/// How often the machine's own addresses are read again when no `--address` is given: a
/// round triggered by a grant reuses what was read less than this long ago (no process on
/// the grant path), and the agent wakes at least this often, so an address that appears
/// without any NSG change is protected within this time.
const ADDRESS_POLL: Duration = Duration::from_secs(5);
/// How soon a failed apply or status report is retried.
const RETRY: Duration = Duration::from_secs(2);
/// How often the machine's listening ports are read again (on the machine, not a gateway).
const DISCOVERY_POLL: Duration = Duration::from_secs(10);
/// How often the seen sets are read while some grant has an `idleTimeout`: an idle grant
/// is reported within this of its limit.
const ACTIVITY_POLL: Duration = Duration::from_secs(1);

/// Why the agent cannot start, or why one enforcement round failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid NSG reference {0:?}: expected NAMESPACE/NAME")]
    NsgRef(String),
    #[error("no address to protect: none given and none found on the machine")]
    NoAddress,
    #[error("addresses: {0}")]
    Addresses(String),
    #[error("listening ports: {0}")]
    Listening(String),
    #[error("state: {0}")]
    State(String),
    #[error("invalid network namespace name {0:?}")]
    Netns(String),
    #[error("nft: {0}")]
    Nft(String),
    #[error("the NSG cannot be enforced as written: {0}")]
    Invalid(String),
}

/// What the agent enforces, where and under which name.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the NSG.
    pub namespace: String,
    /// Name of the NSG.
    pub nsg: String,
    /// The machine's addresses (what the NSG's destinations are matched against); empty:
    /// every address the machine has, read again every [`ADDRESS_POLL`]. A gateway
    /// protects these and every machine address the NSG's JIT rules name.
    pub addresses: Vec<IpAddr>,
    /// On the machine, or in front of machines (`--gateway`).
    pub mode: Mode,
    /// Where the applied ruleset is kept across restarts.
    pub state_dir: PathBuf,
    /// The nftables table the agent owns (family `inet`).
    pub table: String,
    /// The agent's identity: with the NSG's, the name of its [`AgentReport`] (see
    /// [`report_name`](crate::access::materialize::report_name)) and the suffix of its
    /// field manager; unique per machine (the host name by default).
    pub agent: String,
    /// The host name reported with it.
    pub host: String,
    /// Where `nft` runs.
    pub nft: Nft,
}

impl Config {
    /// Parses `NAMESPACE/NAME`.
    pub fn nsg_ref(value: &str) -> Result<(String, String), Error> {
        match value.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok((namespace.to_owned(), name.to_owned()))
            }
            _ => Err(Error::NsgRef(value.to_owned())),
        }
    }

    /// The field manager of this agent's status writes.
    pub fn field_manager(&self) -> String {
        format!("portcullis-agent-{}", self.agent)
    }

    /// The addresses to protect now: those given, or the machine's own. A gateway's come
    /// from the NSG ([`render::machine_addresses`]) and may be none yet.
    async fn current_addresses(&self) -> Result<Vec<IpAddr>, Error> {
        if self.mode == Mode::Gateway {
            return Ok(self.addresses.clone());
        }
        let addresses = if self.addresses.is_empty() {
            addresses::local(&self.nft).await?
        } else {
            self.addresses.clone()
        };
        if addresses.is_empty() {
            return Err(Error::NoAddress);
        }
        Ok(addresses)
    }
}

/// The machine's host name, as the kernel knows it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The policy to enforce: the NSG's inline rules and its `SecurityRule` objects that have
/// not expired at `now`, plus the defaults, in evaluation order. Unreadable values are
/// returned as errors rather than skipped: leaving out a deny would open what it closes.
pub fn policy(
    nsg: &NetworkSecurityGroup,
    objects: &[&SecurityRule],
    now: Timestamp,
) -> Result<Policy, Vec<ConvertError>> {
    let model = NsgModel::new(nsg, objects.iter().copied(), now);
    if !model.invalid.is_empty() {
        return Err(model.invalid);
    }
    Ok(Policy {
        rules: rules::effective(model.rules),
        scope: model.scope,
        expiries: model.expiries,
        closing: model.closing,
        idle: model
            .idle
            .into_iter()
            .map(|(name, (limit, since))| (name, render::IdleLimit { limit, since }))
            .collect(),
    })
}

/// Removes the agent's table and nothing else.
pub async fn cleanup(nft: Nft, table: &str) -> Result<(), Error> {
    Enforcer::new(nft).cleanup(table).await
}

/// Enforces the NSG until `shutdown` resolves. Errors of one round (nft refused, status
/// not written) are logged, reported and retried; only shutdown ends the loop.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    // Before anything talks to the apiserver: what was enforced before the restart.
    let state = State::new(&config.state_dir, &config.table);
    let mut enforcer = Enforcer::new(config.nft.clone());
    restore(&state, &mut enforcer).await;
    notify_ready();
    let hash = enforcer
        .applied()
        .map_or_else(|| "none".to_owned(), Ruleset::hash);
    let addresses = config.current_addresses().await?;
    let nsgs: Api<NetworkSecurityGroup> = Api::namespaced(client.clone(), &config.namespace);
    let objects: Api<SecurityRule> = Api::namespaced(client.clone(), &config.namespace);
    let reports: Api<AgentReport> = Api::namespaced(client, &config.namespace);
    let report_name = crate::access::materialize::report_name(&config.nsg, &config.agent);
    let (nsg_store, nsg_writer) = reflector::store();
    let (rule_store, rule_writer) = reflector::store();
    let (report_store, report_writer) = reflector::store();
    // Only the rules of this NSG (the CRD's selectable field): an agent holds and hears
    // its own NSG's rules, not every grant of the namespace's other NSGs. A rule moved to
    // another NSG leaves the selection, which the watch delivers as a delete.
    let nsg_events = reflector::reflector(
        nsg_writer,
        watcher::watcher(
            nsgs.clone(),
            watcher::Config::default().fields(&format!("metadata.name={}", config.nsg)),
        ),
    )
    .default_backoff()
    .map(|event| event.map(|e| Change::of_nsg(&e)));
    let rule_events = reflector::reflector(
        rule_writer,
        watcher::watcher(
            objects,
            watcher::Config::default().fields(&format!(
                "{}={}",
                crate::api::security_rule::NSG_FIELD,
                config.nsg
            )),
        ),
    )
    .default_backoff()
    .map(|event| event.map(|e| Change::of_rule(&e)));
    // Its own report, to write it again if it is deleted or changed by someone else.
    let report_events = reflector::reflector(
        report_writer,
        watcher::watcher(
            reports.clone(),
            watcher::Config::default().fields(&format!("metadata.name={report_name}")),
        ),
    )
    .default_backoff()
    .map(|event| event.map(|_| Change::Nothing));
    let mut events = pin!(futures::stream::select_all([
        nsg_events.map(|e| (NSG_WATCH, e)).boxed(),
        rule_events.map(|e| (RULE_WATCH, e)).boxed(),
        report_events.map(|e| (REPORT_WATCH, e)).boxed(),
    ]));
    let mut shutdown = pin!(shutdown);
    let mut synced = [false, false];
    let mut agent = Agent {
        enforcer,
        hash,
        saver: Saver::new(state.clone()),
        inputs: Inputs::default(),
        addresses,
        addresses_read: tokio::time::Instant::now(),
        nsg_store,
        rule_store,
        reports,
        report_store,
        report_name,
        reported: None,
        written: None,
        report_stale: false,
        applied_at: None,
        activity: Activity::new(Timestamp::now()),
        idle: Vec::new(),
        listening: Vec::new(),
        listening_wanted: Default::default(),
        listening_read: None,
        missing_warned: false,
        config,
    };
    tracing::info!(
        nsg = %format!("{}/{}", agent.config.namespace, agent.config.nsg),
        table = agent.config.table,
        addresses = ?agent.addresses,
        state = %state.path().display(),
        "agent started"
    );
    let mut wake = tokio::time::Instant::now() + RESYNC;
    let mut resync = tokio::time::Instant::now() + RESYNC;
    // Whether an event since the last round may have changed what is enforced.
    let mut moved = false;
    loop {
        let due = tokio::select! {
            () = &mut shutdown => break,
            event = events.next() => {
                let Some(event) = event else { break };
                moved |= agent.heard(&mut synced, event);
                // What else is ready joins the same round: a burst is one round, not one
                // per event.
                while let Some(Some(event)) = events.next().now_or_never() {
                    moved |= agent.heard(&mut synced, event);
                }
                false
            }
            () = agent.saver.failure_changed() => true,
            () = tokio::time::sleep_until(wake) => true,
        };
        if synced != [true, true] {
            wake = tokio::time::Instant::now() + RESYNC;
            continue;
        }
        if !due && !moved {
            continue;
        }
        moved = false;
        if tokio::time::Instant::now() >= resync {
            agent.enforcer.invalidate();
            resync = tokio::time::Instant::now() + RESYNC;
        }
        let next = agent.round().await;
        wake = tokio::time::Instant::now() + next.min(RESYNC);
    }
    // The last store asked for, on disk before the process ends if the disk allows.
    let _ = tokio::time::timeout(RETRY, agent.saver.settled()).await;
    tracing::info!("agent stopped; its table stays in force");
    Ok(())
}

/// Which watch an event came from: the first two must list before any round runs (the
/// index into `synced`); the report's needs not.
const NSG_WATCH: usize = 0;
const RULE_WATCH: usize = 1;
const REPORT_WATCH: usize = 2;

/// What to do when a watch fails because the CRDs in the cluster predate this agent: the
/// SecurityRule CRD without the selectable field the agent selects by, or no AgentReport
/// CRD at all. Retrying cannot help (the agent keeps its table, and applies or reports
/// nothing new, until the CRDs are upgraded, which `helm upgrade` never does).
fn outdated_crd(error: &watcher::Error) -> Option<&'static str> {
    let (watcher::Error::InitialListFailed(kube::Error::Api(status))
    | watcher::Error::WatchStartFailed(kube::Error::Api(status))) = error
    else {
        return None;
    };
    match status.code {
        400 if status.message.contains("field label not supported") => Some(
            "the SecurityRule CRD predates this agent (no selectable field \
             spec.networkSecurityGroupName): apply crds/portcullis.yaml from this release",
        ),
        404 => Some(
            "a CRD this agent needs is not installed (AgentReport is new in this release): \
             apply crds/portcullis.yaml from this release",
        ),
        _ => None,
    }
}

/// Puts the stored ruleset back into the kernel. A failure is logged, not fatal: the agent
/// goes on to enforce from the apiserver as soon as it answers.
async fn restore(state: &State, enforcer: &mut Enforcer) {
    let now = Timestamp::now();
    match state.load(now) {
        Ok(None) => tracing::info!("no stored ruleset; enforcing once the NSG is read"),
        Ok(Some(ruleset)) => {
            let grants = ruleset.grant_count();
            match enforcer.apply(ruleset, now).await {
                Ok(_) => tracing::info!(grants, "stored ruleset restored"),
                Err(error) => tracing::warn!(%error, "cannot restore the stored ruleset"),
            }
        }
        Err(error) => tracing::warn!(%error, "stored ruleset unusable"),
    }
}

/// Tells systemd (`Type=notify`) that the stored ruleset is back in the kernel, so the
/// units ordered after the agent (the network) start only then. Does nothing outside
/// systemd (no `NOTIFY_SOCKET`).
fn notify_ready() {
    if let Some(target) = std::env::var_os("NOTIFY_SOCKET")
        && let Err(error) = notify(&target, "READY=1")
    {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// Sends `state` to the notification socket `target` (a path, or `@name` for an abstract
/// socket, as systemd passes it).
fn notify(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let address = match target.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(target)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &address)?;
    Ok(())
}

struct Agent {
    config: Config,
    enforcer: Enforcer,
    /// The hash of the ruleset in force, computed when it changes.
    hash: String,
    /// Keeps the ruleset in force on disk.
    saver: Saver,
    /// What the last round read, to tell the events that change it.
    inputs: Inputs,
    /// The addresses protected in the last round.
    addresses: Vec<IpAddr>,
    /// When they were read (without `--address`).
    addresses_read: tokio::time::Instant,
    nsg_store: Store<NetworkSecurityGroup>,
    rule_store: Store<SecurityRule>,
    reports: Api<AgentReport>,
    /// The agent's own report, as its watch shows it.
    report_store: Store<AgentReport>,
    report_name: String,
    reported: Option<Reported>,
    /// The report as last written, and whether the cluster's has stopped being it.
    written: Option<Written>,
    report_stale: bool,
    applied_at: Option<Timestamp>,
    /// When the grants' flows last carried a packet.
    activity: Activity,
    /// The grants found idle in the last round.
    idle: Vec<IdleGrant>,
    /// The listening ports found last, which ports were looked for, and when.
    listening: Vec<ListeningPort>,
    listening_wanted: std::collections::BTreeSet<u16>,
    listening_read: Option<tokio::time::Instant>,
    missing_warned: bool,
}

impl Agent {
    /// Takes one watch event: whether it may change what is enforced (see [`inputs`]), or
    /// the agent's report is no longer what it wrote ([`report::stale`]). Marks the NSG and
    /// rule watches synced at the end of their first list; a failed watch changes nothing
    /// (it retries, and the applied rules stay).
    fn heard(
        &mut self,
        synced: &mut [bool; 2],
        (which, event): (usize, Result<Change, watcher::Error>),
    ) -> bool {
        match event {
            Ok(_) if which == REPORT_WATCH => {
                let stored = self
                    .report_store
                    .get(&ObjectRef::new(&self.report_name).within(&self.config.namespace));
                let stale = report::stale(self.written.as_ref(), stored.as_deref());
                self.report_stale |= stale;
                stale
            }
            Ok(change) => {
                synced[which] |= change == Change::Relisted;
                self.inputs.moved_by(&self.config.nsg, &change)
            }
            Err(error) => {
                match outdated_crd(&error) {
                    Some(fix) => {
                        tracing::error!(%error, fix, "cannot watch; keeping the applied rules")
                    }
                    None => {
                        tracing::warn!(%error, "watch failed; keeping the applied rules and retrying")
                    }
                }
                false
            }
        }
    }

    /// One enforcement round from the caches; returns how long until the next one is due
    /// (the next expiry, or a retry after a failure).
    async fn round(&mut self) -> Duration {
        let now = Timestamp::now();
        let Some(nsg) = self
            .nsg_store
            .get(&ObjectRef::new(&self.config.nsg).within(&self.config.namespace))
        else {
            if !self.missing_warned {
                tracing::warn!("the NSG does not exist; keeping the applied rules");
                self.missing_warned = true;
            }
            self.inputs.forget();
            return RESYNC;
        };
        self.missing_warned = false;
        let objects = self.rule_store.state();
        let mine: Vec<&SecurityRule> = objects
            .iter()
            .map(AsRef::as_ref)
            .filter(|r| r.spec.network_security_group_name == self.config.nsg)
            .collect();
        self.inputs.record(&nsg, &mine);
        let next_expiry = mine
            .iter()
            .filter_map(|r| r.spec.expires_at.as_ref().map(|t| t.0))
            .filter(|at| *at > now)
            .min();
        let outcome = match policy(&nsg, &mine, now) {
            Err(invalid) => Err(Error::Invalid(
                invalid
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
            Ok(policy) => match self.refresh_addresses(&policy).await {
                Ok(()) => {
                    let target = Target {
                        table: self.config.table.clone(),
                        addresses: self.addresses.clone(),
                        mode: self.config.mode,
                    };
                    let desired = render::render(&policy, &target, now);
                    let ended = match (self.config.mode, self.enforcer.applied()) {
                        (Mode::Host, Some(before)) => cut::ended(before, &desired, now),
                        _ => Vec::new(),
                    };
                    let applied = self.enforce(desired, now).await;
                    if applied.is_ok() && !ended.is_empty() {
                        // After the kernel stopped admitting them: nothing re-opens.
                        match cut::cut(&self.config.nft, &ended).await {
                            Ok(()) => {
                                tracing::info!(flows = ended.len(), "ended Close sessions cut")
                            }
                            Err(error) => tracing::warn!(%error, "cannot cut ended Close sessions"),
                        }
                    }
                    if matches!(applied, Ok(Applied::Full)) {
                        self.activity.restarted(now);
                    }
                    self.idle = self.idle_grants(&policy, &target, now).await;
                    self.discover(&policy, &target).await;
                    applied
                }
                Err(error) => Err(error),
            },
        };
        let watching_idle = !self.idle_watch_empty(&mine, now);
        let error = match outcome {
            Ok(Applied::Unchanged) => None,
            Ok(applied) => {
                self.applied_at = Some(now);
                let ruleset = self.enforcer.applied().expect("an applied ruleset");
                self.hash = ruleset.hash();
                tracing::info!(
                    how = ?applied,
                    hash = self.hash,
                    grants = ruleset.grant_count(),
                    "rules applied"
                );
                None
            }
            Err(error) => {
                tracing::warn!(%error, "cannot enforce the NSG; keeping the applied rules");
                Some(error.to_string())
            }
        };
        let error = error.or_else(|| {
            self.saver
                .failure()
                .map(|error| format!("enforced but not stored: {error}"))
        });
        let failed = error.is_some();
        let reported = self.report(&nsg, error).await;
        let mut until_expiry = next_expiry
            .and_then(|at| Duration::try_from(at.duration_since(now)).ok())
            .unwrap_or(RESYNC);
        if self.reads_addresses() {
            until_expiry = until_expiry.min(ADDRESS_POLL);
        }
        if watching_idle {
            until_expiry = until_expiry.min(ACTIVITY_POLL);
        }
        if self.config.mode == Mode::Host {
            until_expiry = until_expiry.min(DISCOVERY_POLL);
        }
        if failed || !reported {
            until_expiry.min(RETRY)
        } else {
            until_expiry
        }
    }

    /// Whether no grant among `rules` has an `idleTimeout` and time left at `now`.
    fn idle_watch_empty(&self, rules: &[&SecurityRule], now: Timestamp) -> bool {
        !rules.iter().any(|r| {
            r.spec.idle_timeout.is_some()
                && r.spec.expires_at.as_ref().is_some_and(|end| end.0 > now)
        })
    }

    /// Reads the seen sets when some grant has an `idleTimeout`, and returns the grants
    /// silent for longer. A failed read is logged and keeps the last answer: it must not
    /// revoke anything.
    async fn idle_grants(
        &mut self,
        policy: &Policy,
        target: &Target,
        now: Timestamp,
    ) -> Vec<IdleGrant> {
        if policy.idle.is_empty() {
            return Vec::new();
        }
        let families: std::collections::BTreeSet<render::Family> =
            target.addresses.iter().map(render::Family::of).collect();
        for family in families {
            let set = render::seen_set(family);
            match self.config.nft.list_set(&self.config.table, &set).await {
                Ok(json) => match activity::parse_seen(&json, Timestamp::now()) {
                    Ok(seen) => self.activity.record(seen),
                    Err(error) => {
                        tracing::warn!(%error, set, "cannot read the seen set");
                        return self.idle.clone();
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, set, "cannot read the seen set");
                    return self.idle.clone();
                }
            }
        }
        let idle = self.activity.idle(policy, target, now);
        if idle != self.idle {
            tracing::info!(idle = ?idle.iter().map(|g| &g.rule).collect::<Vec<_>>(), "idle grants");
        }
        idle
    }

    /// Reads the listening ports again when [`DISCOVERY_POLL`] has passed or the ports to
    /// look for changed (on the machine only: a gateway's own sockets are not the
    /// machines'). A failed read keeps the last answer.
    async fn discover(&mut self, policy: &Policy, target: &Target) {
        if self.config.mode != Mode::Host {
            return;
        }
        let ports = listening::wanted(&policy.rules, &target.addresses, &policy.scope);
        if ports == self.listening_wanted
            && self
                .listening_read
                .is_some_and(|at| at.elapsed() < DISCOVERY_POLL)
        {
            return;
        }
        self.listening_read = Some(tokio::time::Instant::now());
        match listening::discover(&self.config.nft, &ports, &target.addresses).await {
            Ok(found) => {
                if found != self.listening {
                    tracing::info!(listening = ?found, "listening management ports");
                }
                self.listening = found;
                self.listening_wanted = ports;
            }
            Err(error) => tracing::warn!(%error, "cannot read the listening ports"),
        }
    }

    /// Whether the machine's own addresses are read (on the machine, no `--address`).
    fn reads_addresses(&self) -> bool {
        self.config.mode == Mode::Host && self.config.addresses.is_empty()
    }

    /// A gateway's addresses: those given and the machines' of `policy`. On the machine:
    /// its addresses read again if they are read at all and the last reading is
    /// [`ADDRESS_POLL`] old.
    async fn refresh_addresses(&mut self, policy: &Policy) -> Result<(), Error> {
        if self.config.mode == Mode::Gateway {
            let mut addresses = self.config.addresses.clone();
            addresses.extend(render::machine_addresses(policy));
            addresses.sort_unstable();
            addresses.dedup();
            self.addresses = addresses;
        } else if self.reads_addresses() && self.addresses_read.elapsed() >= ADDRESS_POLL {
            self.addresses = self.config.current_addresses().await?;
            self.addresses_read = tokio::time::Instant::now();
        }
        Ok(())
    }

    /// Applies `desired` and stores it. A change that closes anything (a revoked grant, a
    /// new deny) is stored first, so that a crash in between restores the new state rather
    /// than one the change already shrank; a change that only adds grants is applied first
    /// and stored in the background ([`saver`]), since a store that lacks them restores
    /// less access, never more, and the grant need not wait for the disk. A ruleset the
    /// kernel refused is not left on disk; the one in force is stored again. A failed store
    /// does not stop enforcement; it is reported, and retried each round until it succeeds.
    async fn enforce(&mut self, desired: Ruleset, now: Timestamp) -> Result<Applied, Error> {
        let changed = self.enforcer.applied() != Some(&desired);
        let must_store = changed || self.saver.failure().is_some();
        let store_first = changed
            && !self
                .enforcer
                .applied()
                .is_some_and(|applied| render::only_adds_grants(applied, &desired));
        if store_first && let Err(error) = self.saver.save_now(desired.clone()).await {
            tracing::warn!(%error, "cannot store the ruleset; enforcing it all the same");
        }
        let applied = self.enforcer.apply(desired, now).await;
        if must_store
            && (applied.is_err() || !store_first)
            && let Some(in_force) = self.enforcer.applied()
        {
            // After a refused change: what is in force; after an added grant: the new state.
            self.saver.save_later(in_force.clone());
        }
        applied
    }

    /// Writes this agent's report when what it says changed, or when the one in the cluster
    /// stopped being what the agent wrote (deleted by hand, say): the report is the agent's
    /// own, and only the agent puts it back. False if the write failed (retried with the
    /// next round).
    async fn report(&mut self, nsg: &NetworkSecurityGroup, error: Option<String>) -> bool {
        let current = Reported {
            nsg: nsg.metadata.uid.clone(),
            generation: nsg.metadata.generation,
            hash: self.hash.clone(),
            error,
            idle: self.idle.clone(),
            listening: self.listening.clone(),
        };
        if !self.report_stale && self.reported.as_ref() == Some(&current) {
            return true;
        }
        let entry = EnforcementReport {
            agent: self.config.agent.clone(),
            host: self.config.host.clone(),
            addresses: self.addresses.iter().map(ToString::to_string).collect(),
            observed_generation: current.generation,
            rules_hash: current.hash.clone(),
            applied_at: Time(self.applied_at.unwrap_or_else(Timestamp::now)),
            error: current.error.clone(),
            idle_grants: current.idle.clone(),
            listening_ports: current.listening.clone(),
        };
        let object = report::object(&self.report_name, nsg, entry);
        let params = PatchParams::apply(&self.config.field_manager()).force();
        match self
            .reports
            .patch(&self.report_name, &params, &Patch::Apply(&object))
            .await
        {
            Ok(written) => {
                self.written = Written::of(&written);
                self.report_stale = false;
                self.reported = Some(current);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot write the agent's report; retrying");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outdated_crd_is_named_as_the_cause() {
        let refused = |message: &str| {
            let mut status = kube::core::Status::failure(message, "BadRequest");
            status.code = 400;
            watcher::Error::InitialListFailed(kube::Error::Api(status.boxed()))
        };
        // What the apiserver answers for a field a CRD does not declare selectable.
        let old = refused("field label not supported: spec.networkSecurityGroupName");
        assert!(outdated_crd(&old).unwrap().contains("crds/portcullis.yaml"));
        // What it answers for a kind no CRD serves.
        let mut missing = kube::core::Status::failure("the server could not find it", "NotFound");
        missing.code = 404;
        let missing = watcher::Error::InitialListFailed(kube::Error::Api(missing.boxed()));
        assert!(outdated_crd(&missing).unwrap().contains("AgentReport"));
        assert_eq!(outdated_crd(&refused("the server is shutting down")), None);
        assert_eq!(outdated_crd(&watcher::Error::NoResourceVersion), None);
    }

    #[test]
    fn systemd_hears_ready_on_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        notify(path.as_os_str(), "READY=1").unwrap();
        let mut buffer = [0; 16];
        let read = socket.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..read], b"READY=1");
        assert!(notify(std::ffi::OsStr::new("/nonexistent/notify"), "READY=1").is_err());
    }
}
