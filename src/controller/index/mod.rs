//! Keyed indexes over the six watched kinds, and who each change wakes.
//!
//! Every watch event first updates these indexes (after the object cache, before any
//! reconcile is woken), so a reconcile always finds the object that woke it, and every
//! lookup a reconciler makes is a map access instead of a scan of a whole cache: a burst of
//! N requests costs O(N), not O(N²). The index holds only what lookups and wake-ups need
//! (keys, owners, phases, generations), never whole objects; those stay in the caches.
//!
//! It is plain data: each change goes in as `(key, Some(entry))` or `(key, None)` for a
//! deletion, and returns the [`Wake`]: the objects of each kind whose reconcile depends on
//! it. Tests drive it synchronously.
//!
//! Every name it holds is held once (see [`Names`]): a grant's request and rule appear in
//! several maps each, and namespaces, policies, requestors and machines in thousands of
//! entries, so copies of each would make the index a large part of the operator's memory.

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use jiff::Timestamp;
use kube::Resource;

use super::cached::CachedRule;
use crate::access::materialize::report_name;
use crate::access::materialize::{LABEL_ROLE, ROLE_DENY};
use crate::api::jit_policy::GrantState;
use crate::api::jit_request::Phase;
use crate::api::nsg_model::RuleObject;
use crate::api::{AgentReport, JitApproval, JitPolicy, JitRequest, NetworkSecurityGroup};

/// An object's namespace and name.
pub type Key = (String, String);

/// A name as the index holds it: one allocation, shared by every map that holds it.
pub type Name = Arc<str>;

/// An object's namespace and name as the index holds them.
type Held = (Name, Name);

/// A namespace, a requestor, a machine and a port: what one grant holds open.
type PortKey = (Name, Name, Name, u16);

#[cfg(test)]
fn key(namespace: &str, name: &str) -> Key {
    (namespace.to_owned(), name.to_owned())
}

/// `name` in the namespace of `of`, as a key to wake.
fn key_in(of: &Key, name: &str) -> Key {
    (of.0.clone(), name.to_owned())
}

/// The key to wake for what the index holds as `held`.
fn unheld((namespace, name): &Held) -> Key {
    (namespace.to_string(), name.to_string())
}

/// The names the index holds, each once: every name in a map is the copy held here. One no
/// map holds any more (its objects are gone) is dropped by a sweep once the set has doubled
/// since the last one: amortized O(1) per name, and churn never grows the set without bound.
#[derive(Debug)]
struct Names {
    held: HashSet<Name>,
    sweep_at: usize,
}

/// Below this many names the set is never swept.
const FEWEST_SWEPT: usize = 1024;

impl Default for Names {
    fn default() -> Self {
        Self {
            held: HashSet::new(),
            sweep_at: FEWEST_SWEPT,
        }
    }
}

impl Names {
    /// The held copy of `name`, which is held from now on if it was not.
    fn hold(&mut self, name: &str) -> Name {
        match self.held.get(name) {
            Some(held) => held.clone(),
            None => self.insert(name.into()),
        }
    }

    /// [`Names::hold`] for a name already allocated: it becomes the held copy if there is
    /// none yet.
    fn share(&mut self, name: &Name) -> Name {
        match self.held.get(name.as_ref()) {
            Some(held) => held.clone(),
            None => self.insert(name.clone()),
        }
    }

    fn insert(&mut self, name: Name) -> Name {
        if self.held.len() >= self.sweep_at {
            self.held.retain(|held| Arc::strong_count(held) > 1);
            self.sweep_at = (2 * self.held.len()).max(FEWEST_SWEPT);
        }
        self.held.insert(name.clone());
        name
    }

    /// The held copy of `name`; none if no entry holds it (then no map has it either).
    fn find(&self, name: &str) -> Option<Name> {
        self.held.get(name).cloned()
    }
}

/// What depends on an NSG: its spec, through the generation. Its status (the operator's
/// own summary) changes nothing any reconcile reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsgEntry {
    pub generation: Option<i64>,
}

impl NsgEntry {
    pub fn of(nsg: &NetworkSecurityGroup) -> Self {
        Self {
            generation: nsg.metadata.generation,
        }
    }
}

/// An agent's report: the NSG it is on, the addresses it enforces it for and the grant
/// rules it reports idle. A report not under its own name ([`report_name`] of its NSG and
/// agent) counts for nothing: no agent's report can stand in for another's, and no agent
/// has two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportEntry {
    pub nsg: Name,
    pub addresses: BTreeSet<IpAddr>,
    pub idle: BTreeSet<Name>,
}

impl ReportEntry {
    /// The entry of `report`; none when it does not count.
    pub fn of(report: &AgentReport) -> Option<Self> {
        let spec = &report.spec;
        let name = report.metadata.name.as_deref().unwrap_or_default();
        (name == report_name(&spec.network_security_group_name, &spec.report.agent)).then(|| Self {
            nsg: spec.network_security_group_name.as_str().into(),
            addresses: spec
                .report
                .addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            idle: spec
                .report
                .idle_grants
                .iter()
                .map(|g| g.rule.as_str().into())
                .collect(),
        })
    }

    fn held(self, names: &mut Names) -> Self {
        Self {
            nsg: names.share(&self.nsg),
            idle: self.idle.iter().map(|r| names.share(r)).collect(),
            ..self
        }
    }
}

/// A policy's spec generation and the NSGs its machines sit behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyEntry {
    pub generation: Option<i64>,
    pub nsgs: BTreeSet<Name>,
}

impl PolicyEntry {
    pub fn of(policy: &JitPolicy) -> Self {
        Self {
            generation: policy.metadata.generation,
            nsgs: policy
                .spec
                .virtual_machines
                .iter()
                .map(|m| m.network_security_group_name.as_str().into())
                .collect(),
        }
    }

    fn held(self, names: &mut Names) -> Self {
        Self {
            nsgs: self.nsgs.iter().map(|n| names.share(n)).collect(),
            ..self
        }
    }
}

/// A request's policy, requestor and where it is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestEntry {
    pub policy: Name,
    pub requestor: Option<Name>,
    pub phase: Option<Phase>,
    /// What the policy's history shows of it; a change wakes the policy.
    pub record: (Option<Phase>, Option<Timestamp>, Option<Timestamp>, bool),
    /// The (machine, port) pairs its open grants hold, sorted: where a newer request by the
    /// same requestor supersedes it. A vector, not a set: it holds one or a few pairs.
    pub open: Vec<(Name, u16)>,
    /// Whose approvals it counted at its last evaluation: when one is counted out (their
    /// role withdrawn), that approval's own status must say so too.
    pub approvers: Vec<String>,
}

impl RequestEntry {
    pub fn of(request: &JitRequest) -> Self {
        let status = request.status.as_ref();
        let phase = status.and_then(|s| s.phase);
        Self {
            policy: request.spec.policy_name.as_str().into(),
            requestor: request
                .spec
                .requestor
                .as_ref()
                .map(|r| r.username.as_str().into()),
            phase,
            record: (
                phase,
                status.and_then(|s| s.start_time.as_ref()).map(|t| t.0),
                status.and_then(|s| s.expires_at.as_ref()).map(|t| t.0),
                request.metadata.deletion_timestamp.is_some(),
            ),
            open: match status {
                Some(status) if phase == Some(Phase::Granted) => {
                    let mut open: Vec<(Name, u16)> = status
                        .grants
                        .iter()
                        .filter(|g| g.status == GrantState::Initiated)
                        .map(|g| (g.virtual_machine.as_str().into(), g.number))
                        .collect();
                    open.sort();
                    open.dedup();
                    open
                }
                _ => Vec::new(),
            },
            approvers: status
                .map(|s| s.approvals.iter().map(|a| a.approver.clone()).collect())
                .unwrap_or_default(),
        }
    }

    fn held(mut self, names: &mut Names) -> Self {
        self.policy = names.share(&self.policy);
        self.requestor = self.requestor.map(|r| names.share(&r));
        for (machine, _) in &mut self.open {
            *machine = names.share(machine);
        }
        self.open.shrink_to_fit();
        self
    }

    fn live(&self) -> bool {
        !self.phase.is_some_and(Phase::is_terminal)
    }

    fn waiting(&self) -> bool {
        matches!(self.phase, None | Some(Phase::Pending))
    }

    fn granted(&self) -> bool {
        self.phase == Some(Phase::Granted)
    }
}

/// The kind of object controlling an operator rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerKind {
    Policy,
    Request,
    Other,
}

/// A rule's NSG, whether the operator made it, and who controls it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleEntry {
    pub nsg: Name,
    /// Carries the operator's label: a JIT deny or grant, not a user's rule.
    pub managed: bool,
    pub deny: bool,
    /// The controlling owner: kind, name, UID.
    pub owner: Option<(OwnerKind, Name, Name)>,
}

impl RuleEntry {
    pub fn of(rule: &CachedRule) -> Self {
        let owner = rule.controller.as_ref().map(|o| {
            let kind = if o.kind == JitPolicy::kind(&()) {
                OwnerKind::Policy
            } else if o.kind == JitRequest::kind(&()) {
                OwnerKind::Request
            } else {
                OwnerKind::Other
            };
            (kind, o.name.as_str().into(), o.uid.as_str().into())
        });
        Self {
            nsg: rule.spec.network_security_group_name.as_str().into(),
            managed: rule.managed(),
            deny: rule.labels.get(LABEL_ROLE) == Some(ROLE_DENY),
            owner,
        }
    }

    fn held(self, names: &mut Names) -> Self {
        Self {
            nsg: names.share(&self.nsg),
            owner: self
                .owner
                .map(|(kind, name, uid)| (kind, names.share(&name), names.share(&uid))),
            ..self
        }
    }
}

/// The request an approval decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalEntry {
    pub request: Name,
}

impl ApprovalEntry {
    pub fn of(approval: &JitApproval) -> Self {
        Self {
            request: approval.spec.request_name.as_str().into(),
        }
    }

    fn held(self, names: &mut Names) -> Self {
        Self {
            request: names.share(&self.request),
        }
    }
}

/// The objects whose reconciles a change concerns, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wake {
    pub nsgs: BTreeSet<Key>,
    /// Policies whose deny rules may have to change (their spec, their deny rules, the
    /// NSG rules the denies are placed among).
    pub policies: BTreeSet<Key>,
    /// Policies woken by what only their status shows (a request's history record, their
    /// own status write), and nothing they enforce: they may wait (see
    /// [`Pace::Spaced`](super::runner::Pace)).
    pub policy_histories: BTreeSet<Key>,
    pub requests: BTreeSet<Key>,
    pub approvals: BTreeSet<Key>,
}

impl Wake {
    /// Adds what `other` wakes.
    pub fn merge(&mut self, other: Wake) {
        self.nsgs.extend(other.nsgs);
        self.policies.extend(other.policies);
        self.policy_histories.extend(other.policy_histories);
        self.requests.extend(other.requests);
        self.approvals.extend(other.approvals);
    }
}

/// A set-valued map whose empty sets are removed, so it never grows with keys gone.
///
/// Most keys hold one value (an owner's one rule, a requestor's one grant of a port), and a
/// one-element `BTreeSet` allocates a whole node (eleven slots): at 100,000 grants that is
/// a tenth of the operator's memory. So a lone value is kept as itself.
#[derive(Debug)]
struct Multi<K, V>(HashMap<K, Bucket<V>>);

/// The values under one key of a [`Multi`]: never empty.
#[derive(Debug)]
enum Bucket<V> {
    One(V),
    Many(BTreeSet<V>),
}

impl<K, V> Default for Multi<K, V> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<K: std::hash::Hash + Eq, V: Ord + Clone> Multi<K, V> {
    fn insert(&mut self, key: K, value: V) {
        use std::collections::hash_map::Entry;
        match self.0.entry(key) {
            Entry::Vacant(vacant) => {
                vacant.insert(Bucket::One(value));
            }
            Entry::Occupied(mut occupied) => match occupied.get_mut() {
                Bucket::One(one) if *one == value => {}
                Bucket::One(one) => {
                    let first = one.clone();
                    *occupied.get_mut() = Bucket::Many(BTreeSet::from([first, value]));
                }
                Bucket::Many(many) => {
                    many.insert(value);
                }
            },
        }
    }

    fn remove(&mut self, key: &K, value: &V) {
        let Some(bucket) = self.0.get_mut(key) else {
            return;
        };
        let gone = match bucket {
            Bucket::One(one) => one == value,
            Bucket::Many(many) => {
                many.remove(value);
                // A `Many` holds two or more, so one removal leaves at least one.
                if many.len() == 1
                    && let Some(last) = many.pop_first()
                {
                    *bucket = Bucket::One(last);
                }
                false
            }
        };
        if gone {
            self.0.remove(key);
        }
    }

    /// Puts `value` under `key` or takes it out, as `present` says.
    fn set(&mut self, key: K, value: V, present: bool) {
        if present {
            self.insert(key, value);
        } else {
            self.remove(&key, &value);
        }
    }

    /// The values under `key`, in order.
    fn get<'a>(&'a self, key: &K) -> impl Iterator<Item = &'a V> + use<'a, K, V> {
        let (one, many) = match self.0.get(key) {
            None => (None, None),
            Some(Bucket::One(one)) => (Some(one), None),
            Some(Bucket::Many(many)) => (None, Some(many)),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// The indexes. See the module documentation.
#[derive(Debug, Default)]
pub struct Index {
    nsgs: HashMap<Held, NsgEntry>,
    reports: HashMap<Held, ReportEntry>,
    /// (namespace, NSG) → the agents' reports on it.
    reports_by_nsg: Multi<Held, Name>,
    /// (namespace, NSG, address) → the reports of the agents enforcing the NSG there.
    enforcers: Multi<(Name, Name, IpAddr), Name>,
    policies: HashMap<Held, PolicyEntry>,
    requests: HashMap<Held, RequestEntry>,
    rules: HashMap<Held, RuleEntry>,
    /// (namespace, NSG) → policies with a machine behind it.
    policies_by_nsg: Multi<Held, Name>,
    /// (namespace, policy) → every request naming it (its history).
    requests_by_policy: Multi<Held, Name>,
    /// (namespace, policy) → its requests not terminal yet.
    live_by_policy: Multi<Held, Name>,
    /// (namespace, policy) → its requests not granted yet.
    waiting_by_policy: Multi<Held, Name>,
    /// (namespace, requestor, machine, port) → granted requests holding that port open.
    granted_by_port: Multi<PortKey, Name>,
    /// (namespace, request) → the approvals deciding on it.
    approvals_by_request: Multi<Held, Name>,
    approvals: HashMap<Held, ApprovalEntry>,
    /// (namespace, NSG) → every SecurityRule naming it.
    rules_by_nsg: Multi<Held, Name>,
    /// (namespace, NSG) → users' SecurityRules naming it (what JIT placement works around).
    user_rules_by_nsg: Multi<Held, Name>,
    /// Owner UID → the operator's rules it controls.
    rules_by_owner: Multi<Name, Held>,
    /// (namespace, NSG) → a number that changes whenever its user rules do, so a placement
    /// view built from them can be kept until it is out of date.
    user_rules_revision: HashMap<Held, u64>,
    revision: u64,
    granted: usize,
    names: Names,
}

impl Index {
    /// `key` as held: its names are held from now on.
    fn hold(&mut self, (namespace, name): &Key) -> Held {
        (self.names.hold(namespace), self.names.hold(name))
    }

    /// The held key of `name` in `namespace`, if the index holds both names.
    fn held(&self, namespace: &str, name: &str) -> Option<Held> {
        Some((self.names.find(namespace)?, self.names.find(name)?))
    }

    /// Records the NSG `key` as it is now (`None`: deleted).
    pub fn nsg(&mut self, key: Key, entry: Option<NsgEntry>) -> Wake {
        let mut wake = Wake::default();
        let held = self.hold(&key);
        let before = match &entry {
            Some(entry) => {
                wake.nsgs.insert(key.clone());
                self.nsgs.insert(held.clone(), entry.clone())
            }
            None => self.nsgs.remove(&held),
        };
        // Policies place their denies, and waiting requests their grants, from the spec.
        if before.map(|b| b.generation) != entry.map(|e| e.generation) {
            for policy in self.policies_by_nsg.get(&held) {
                let policy = (held.0.clone(), policy.clone());
                wake.requests
                    .extend(self.waiting_by_policy.get(&policy).map(|r| key_in(&key, r)));
                wake.policies.insert(unheld(&policy));
            }
        }
        wake
    }

    /// Records the agent report `key` as it is now (`None`: deleted, or not counted): its
    /// NSG's summary is written again. What it says of idle grants, or where it enforces,
    /// may make every enforcer of a grant agree that it is idle (see
    /// [`Index::reported_idle`]): the requests of the grants idle in any report on those
    /// addresses look again.
    pub fn report(&mut self, key: Key, entry: Option<ReportEntry>) -> Wake {
        let mut wake = Wake::default();
        let held = self.hold(&key);
        let entry = entry.map(|e| e.held(&mut self.names));
        let before = match &entry {
            Some(entry) => self.reports.insert(held.clone(), entry.clone()),
            None => self.reports.remove(&held),
        };
        if before == entry {
            // Only the report's other fields changed: the summary shows them.
            wake.nsgs.extend(entry.iter().map(|e| key_in(&key, &e.nsg)));
            return wake;
        }
        let (namespace, name) = &held;
        let mut places = BTreeSet::new();
        for (entry, present) in [(&before, false), (&entry, true)] {
            let Some(entry) = entry else { continue };
            self.reports_by_nsg.set(
                (namespace.clone(), entry.nsg.clone()),
                name.clone(),
                present,
            );
            for address in &entry.addresses {
                let place = (namespace.clone(), entry.nsg.clone(), *address);
                self.enforcers.set(place.clone(), name.clone(), present);
                places.insert(place);
            }
            wake.nsgs.insert(key_in(&key, &entry.nsg));
        }
        for place in places {
            for report in self.enforcers.get(&place) {
                let Some(report) = self.reports.get(&(namespace.clone(), report.clone())) else {
                    continue;
                };
                for rule in &report.idle {
                    if let Some(RuleEntry {
                        owner: Some((OwnerKind::Request, request, _)),
                        ..
                    }) = self.rules.get(&(namespace.clone(), rule.clone()))
                    {
                        wake.requests.insert(key_in(&key, request));
                    }
                }
            }
        }
        wake
    }

    /// Records the policy `key` as it is now (`None`: deleted).
    pub fn policy(&mut self, key: Key, entry: Option<PolicyEntry>) -> Wake {
        let mut wake = Wake::default();
        let held = self.hold(&key);
        if let Some(entry) = &entry {
            // A new spec is enforced at once; any other write (its own status) may wait.
            let before = self.policies.get(&held).map(|b| b.generation);
            if before == Some(entry.generation) {
                wake.policy_histories.insert(key.clone());
            } else {
                wake.policies.insert(key.clone());
            }
        }
        let entry = entry.map(|e| e.held(&mut self.names));
        let before = match &entry {
            Some(entry) => self.policies.insert(held.clone(), entry.clone()),
            None => self.policies.remove(&held),
        };
        let (namespace, name) = &held;
        for nsg in before.iter().flat_map(|b| &b.nsgs) {
            self.policies_by_nsg
                .remove(&(namespace.clone(), nsg.clone()), name);
        }
        for nsg in entry.iter().flat_map(|e| &e.nsgs) {
            self.policies_by_nsg
                .insert((namespace.clone(), nsg.clone()), name.clone());
        }
        if before.as_ref().map(|b| b.generation) != entry.as_ref().map(|e| e.generation) {
            // The NSGs' exposure probes the policy's ports; live requests are checked
            // against the policy again (a grant it no longer allows is revoked).
            wake.nsgs.extend(
                before
                    .iter()
                    .chain(entry.iter())
                    .flat_map(|e| &e.nsgs)
                    .map(|nsg| key_in(&key, nsg)),
            );
            wake.requests
                .extend(self.live_by_policy.get(&held).map(|r| key_in(&key, r)));
        }
        wake
    }

    /// Records the request `key` as it is now (`None`: deleted).
    pub fn request(&mut self, key: Key, entry: Option<RequestEntry>) -> Wake {
        let mut wake = Wake::default();
        if entry.is_some() {
            wake.requests.insert(key.clone());
        }
        let held = self.hold(&key);
        let entry = entry.map(|e| e.held(&mut self.names));
        let before = match &entry {
            Some(entry) => self.requests.insert(held.clone(), entry.clone()),
            None => self.requests.remove(&held),
        };
        let (namespace, name) = &held;
        for (entry, present) in [(&before, false), (&entry, true)] {
            let Some(entry) = entry else { continue };
            let policy = (namespace.clone(), entry.policy.clone());
            self.requests_by_policy
                .set(policy.clone(), name.clone(), present);
            self.live_by_policy
                .set(policy.clone(), name.clone(), present && entry.live());
            self.waiting_by_policy
                .set(policy, name.clone(), present && entry.waiting());
            if let Some(requestor) = &entry.requestor {
                for (machine, port) in &entry.open {
                    self.granted_by_port.set(
                        (namespace.clone(), requestor.clone(), machine.clone(), *port),
                        name.clone(),
                        present,
                    );
                }
            }
            if entry.granted() {
                if present {
                    self.granted += 1;
                } else {
                    self.granted -= 1;
                }
            }
        }
        // Its approvals' statuses follow its phase (closed requests count nothing new) and
        // what it counted.
        if before.as_ref().map(|b| (b.phase, &b.approvers))
            != entry.as_ref().map(|e| (e.phase, &e.approvers))
        {
            wake.approvals.extend(
                self.approvals_by_request
                    .get(&held)
                    .map(|a| key_in(&key, a)),
            );
        }
        if before.as_ref().map(|b| &b.record) != entry.as_ref().map(|e| &e.record)
            || before.as_ref().map(|b| &b.policy) != entry.as_ref().map(|e| &e.policy)
        {
            wake.policy_histories.extend(
                before
                    .iter()
                    .chain(entry.iter())
                    .map(|e| key_in(&key, &e.policy)),
            );
        }
        // A request that just opened a port supersedes its requestor's older grants of the
        // same port: those look at it now.
        if let Some(entry) = &entry
            && let Some(requestor) = &entry.requestor
        {
            for (machine, port) in entry
                .open
                .iter()
                .filter(|o| !before.as_ref().is_some_and(|b| b.open.contains(*o)))
            {
                let port = (namespace.clone(), requestor.clone(), machine.clone(), *port);
                wake.requests.extend(
                    self.granted_by_port
                        .get(&port)
                        .filter(|peer| *peer != name)
                        .map(|peer| key_in(&key, peer)),
                );
            }
        }
        wake
    }

    /// Records the SecurityRule `key` as it is now (`None`: deleted). The entry holds no
    /// spec, so every event wakes: a hand edit of a deny rule's ports changes no entry but
    /// must reach the policy that restores it.
    pub fn rule(&mut self, key: Key, entry: Option<RuleEntry>) -> Wake {
        let mut wake = Wake::default();
        let held = self.hold(&key);
        let entry = entry.map(|e| e.held(&mut self.names));
        let before = match &entry {
            Some(entry) => self.rules.insert(held.clone(), entry.clone()),
            None => self.rules.remove(&held),
        };
        let name = &held.1;
        for (entry, present) in [(&before, false), (&entry, true)] {
            let Some(entry) = entry else { continue };
            let nsg = (held.0.clone(), entry.nsg.clone());
            self.rules_by_nsg.set(nsg.clone(), name.clone(), present);
            self.user_rules_by_nsg
                .set(nsg.clone(), name.clone(), present && !entry.managed);
            if let Some((_, _, uid)) = &entry.owner {
                self.rules_by_owner
                    .set(uid.clone(), held.clone(), present && entry.managed);
            }
            wake.nsgs.insert(unheld(&nsg));
            if entry.managed {
                // The operator's rule changed or went: its owner restores or accepts it.
                match &entry.owner {
                    Some((OwnerKind::Policy, owner, _)) if entry.deny => {
                        wake.policies.insert(key_in(&key, owner));
                    }
                    Some((OwnerKind::Request, owner, _)) => {
                        wake.requests.insert(key_in(&key, owner));
                    }
                    _ => {}
                }
            } else {
                // A user's rule can move where the policies' denies go.
                self.revision += 1;
                wake.policies
                    .extend(self.policies_by_nsg.get(&nsg).map(|p| key_in(&key, p)));
                self.user_rules_revision.insert(nsg, self.revision);
            }
        }
        wake
    }

    /// Records the approval `key` as it is now (`None`: deleted): it and its request wake.
    pub fn approval(&mut self, key: Key, entry: Option<ApprovalEntry>) -> Wake {
        let mut wake = Wake::default();
        let held = self.hold(&key);
        let entry = entry.map(|e| e.held(&mut self.names));
        let before = match &entry {
            Some(entry) => {
                wake.approvals.insert(key.clone());
                self.approvals.insert(held.clone(), entry.clone())
            }
            None => self.approvals.remove(&held),
        };
        for (entry, present) in [(&before, false), (&entry, true)] {
            let Some(entry) = entry else { continue };
            let request = (held.0.clone(), entry.request.clone());
            self.approvals_by_request
                .set(request.clone(), held.1.clone(), present);
            if self.requests.contains_key(&request) {
                wake.requests.insert(unheld(&request));
            }
        }
        wake
    }

    /// The names under `name` in `namespace` in `multi`.
    fn names_under(&self, multi: &Multi<Held, Name>, namespace: &str, name: &str) -> Vec<String> {
        self.held(namespace, name)
            .map(|key| multi.get(&key).map(|n| n.to_string()).collect())
            .unwrap_or_default()
    }

    /// The approvals deciding on `request` in `namespace`.
    pub fn approvals_of(&self, namespace: &str, request: &str) -> Vec<String> {
        self.names_under(&self.approvals_by_request, namespace, request)
    }

    /// The agents' reports on NSG `nsg` in `namespace` (those that count).
    pub fn reports_on(&self, namespace: &str, nsg: &str) -> Vec<String> {
        self.names_under(&self.reports_by_nsg, namespace, nsg)
    }

    /// Whether the grant rule `rule` to `address` is idle by the agents' reports on NSG
    /// `nsg` in `namespace`: some agent enforces the NSG at that address, and every one that
    /// does reports it idle. An agent that does not enforce there cannot say (a gateway a
    /// session does not cross, or an agent lying about another machine's grants), and one
    /// that sees traffic outweighs any that sees none.
    pub fn reported_idle(&self, namespace: &str, nsg: &str, rule: &str, address: IpAddr) -> bool {
        let (Some(namespace), Some(nsg)) = (self.names.find(namespace), self.names.find(nsg))
        else {
            return false;
        };
        let mut enforcers = self
            .enforcers
            .get(&(namespace.clone(), nsg, address))
            .peekable();
        enforcers.peek().is_some()
            && enforcers.all(|report| {
                self.reports
                    .get(&(namespace.clone(), report.clone()))
                    .is_some_and(|r| r.idle.contains(rule))
            })
    }

    /// The policies with a machine behind NSG `nsg` in `namespace`.
    pub fn policies_on(&self, namespace: &str, nsg: &str) -> Vec<String> {
        self.names_under(&self.policies_by_nsg, namespace, nsg)
    }

    /// Every request naming `policy` in `namespace`.
    pub fn requests_of(&self, namespace: &str, policy: &str) -> Vec<String> {
        self.names_under(&self.requests_by_policy, namespace, policy)
    }

    /// The granted requests of `requestor` in `namespace` holding `port` on `machine` open.
    pub fn granted_on(
        &self,
        namespace: &str,
        requestor: &str,
        machine: &str,
        port: u16,
    ) -> Vec<String> {
        let (Some(namespace), Some(requestor), Some(machine)) = (
            self.names.find(namespace),
            self.names.find(requestor),
            self.names.find(machine),
        ) else {
            return Vec::new();
        };
        self.granted_by_port
            .get(&(namespace, requestor, machine, port))
            .map(|n| n.to_string())
            .collect()
    }

    /// Every SecurityRule naming NSG `nsg` in `namespace`.
    pub fn rules_on(&self, namespace: &str, nsg: &str) -> Vec<String> {
        self.names_under(&self.rules_by_nsg, namespace, nsg)
    }

    /// The users' SecurityRules naming NSG `nsg` in `namespace`, and their revision.
    pub fn user_rules_on(&self, namespace: &str, nsg: &str) -> (Vec<String>, u64) {
        let revision = self
            .held(namespace, nsg)
            .and_then(|nsg| self.user_rules_revision.get(&nsg).copied());
        (
            self.names_under(&self.user_rules_by_nsg, namespace, nsg),
            revision.unwrap_or(0),
        )
    }

    /// The operator's rules the object with UID `owner` controls.
    pub fn rules_owned_by(&self, owner: &str) -> Vec<Key> {
        self.names
            .find(owner)
            .map(|owner| self.rules_by_owner.get(&owner).map(unheld).collect())
            .unwrap_or_default()
    }

    /// How many requests are granted right now.
    pub fn granted(&self) -> usize {
        self.granted
    }
}
