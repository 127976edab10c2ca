//! From an NSG's effective inbound rules to the nftables ruleset that enforces them, as a
//! value. Pure: no kernel, no clock (the caller passes `now`), no Kubernetes, so the
//! translation is unit-tested here and differentially tested against [`rules::evaluate`]
//! with real packets in the integration tests.
//!
//! The table (family `inet`, so one ruleset covers IPv4 and IPv6) has one base chain,
//! hooked at filter priority with policy accept: `input` on the machine itself, `forward`
//! on a gateway in front of machines ([`Mode`]). Its rules, in order:
//!
//! 1. `ct state established,related accept` for flows no grant let in: a revoke or an
//!    expiry never cuts a live session (Azure's promise), and the common case costs one rule.
//! 2. flows a grant let in carry the [`GRANT_MARK`]: each of their packets from the client
//!    refreshes the flow's entry in the `jit_seen_*` set, which the kernel stamps with the
//!    time (element timeouts), so the agent learns when each grant last carried a packet
//!    without counting anything itself (`idleTimeout`).
//! 3. flows a `Close` grant let in also carry the [`CLOSE_MARK`]; their packets pass only
//!    while a grant still covers them (the same set lookup as a new connection, in the flow's original
//!    direction), else TCP gets a reset and the rest is dropped. That is how such flows are
//!    cut within a second of the end even with the agent dead: the check is the kernel's,
//!    on every packet, against elements the kernel itself expires. Marks rather than
//!    deleting conntrack entries, because a deleted entry is re-created by the flow's next
//!    packet (loose TCP tracking) and would need the agent alive at the instant of expiry.
//! 4. on the machine: loopback and IPv6 neighbour discovery are accepted: they never cross
//!    an Azure NSG (host-local traffic and the link layer are below it), and dropping ND
//!    breaks IPv6.
//! 5. packets to an address that is not one of the agent's `return` (the policy accepts them):
//!    the NSG governs the machine's addresses, nothing else on the host. A family in which
//!    the machine has no address is left alone likewise, which is why the agent protects
//!    every local address by default (see [`machine_wide`]).
//! 6. the NSG rules in evaluation order, each as one or more nft rules with the rule's
//!    verdict (Allow = accept, Deny = drop); a final `drop` mirrors [`rules::evaluate`],
//!    which fails closed when no rule matches.
//!
//! JIT grants (operator rules with `expiresAt`) are not rules but elements of interval sets
//! with a kernel timeout, matched by one rule per run of consecutive grants: per-packet cost
//! does not grow with the number of grants, a grant closes in the kernel even when nothing
//! else runs, and adding or removing one is an element update, not a reload.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use jiff::Timestamp;
use nftables::expr::{
    BinaryOperation, CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
};
use nftables::schema::{Chain, NfListObject, Rule as NftRule, Set, SetFlag, SetType, SetTypeValue};
use nftables::stmt::{Mangle, Match, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::fnv::Fnv;
use crate::rules::{Access, AddressPrefix, Direction, Origin, PortRange, Protocol, Rule, Scope};

/// The conntrack mark bit of the flows a `Close` grant let in. One bit, set with `|` and
/// tested with `&`, so every other bit stays free for whatever else marks connections.
pub const CLOSE_MARK: u32 = 0x0040_0000;
/// The conntrack mark bit of every flow a grant let in, `Keep` or `Close`.
pub const GRANT_MARK: u32 = 0x0020_0000;
/// How long a flow's entry stays in a `jit_seen_*` set after its last packet: longer than
/// any grant (24 h at most), so that an entry's age is exact for as long as it matters.
pub const SEEN_TIMEOUT: u32 = 25 * 60 * 60;
/// How many flows the `jit_seen_*` sets track at once, per family; past that a flow's
/// packets still pass, they only go unseen (its grant may then be found idle).
const SEEN_SIZE: u32 = 65_536;
/// Protocol numbers as `meta l4proto` sees them.
const TCP: u32 = 6;
const UDP: u32 = 17;
const ICMP: u32 = 1;
const ICMPV6: u32 = 58;
/// ICMPv6 router solicitation/advertisement and neighbour solicitation/advertisement.
const NEIGHBOUR_DISCOVERY: [u32; 4] = [133, 134, 135, 136];

/// What the agent enforces: the NSG's effective rules, as [`rules::effective`] orders them
/// (defaults included, expired rules already left out), the scope that gives tags their
/// meaning, and the `expiresAt` of each `SecurityRule` object that has one.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Effective rules in evaluation order; only inbound ones are enforced.
    pub rules: Vec<Rule>,
    /// What `VirtualNetwork`, `Internet` and `AzureLoadBalancer` stand for.
    pub scope: Scope,
    /// `expiresAt` by `SecurityRule` object name.
    pub expiries: BTreeMap<String, Timestamp>,
    /// The `SecurityRule` objects whose connections end with them
    /// (`establishedConnections: Close`), by name.
    pub closing: BTreeSet<String>,
    /// The `SecurityRule` objects with an `idleTimeout`, by name.
    pub idle: BTreeMap<String, IdleLimit>,
}

/// How long a grant may go without a packet, and since when it is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleLimit {
    /// The rule's `idleTimeout`.
    pub limit: std::time::Duration,
    /// When the rule was created: a grant that never carried a packet is idle from then.
    pub since: Timestamp,
}

/// Where the agent stands, which decides the packets its chain sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// On the protected machine: packets to its own addresses (hook `input`).
    #[default]
    Host,
    /// On a router or firewall in front of the machines (`--gateway`): packets it forwards
    /// to their addresses (hook `forward`).
    Gateway,
}

impl Mode {
    /// The name of the one base chain.
    pub fn chain(self) -> &'static str {
        match self {
            Mode::Host => "input",
            Mode::Gateway => "forward",
        }
    }

    fn hook(self) -> NfHook {
        match self {
            Mode::Host => NfHook::Input,
            Mode::Gateway => NfHook::Forward,
        }
    }
}

/// Where the ruleset goes: the table the agent owns, the addresses it protects and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Name of the agent's `inet` table.
    pub table: String,
    /// The machine's addresses (a gateway: the addresses of the machines behind it);
    /// packets to other addresses are not the NSG's business.
    pub addresses: Vec<IpAddr>,
    /// On the machine, or in front of machines.
    pub mode: Mode,
}

/// An address family, for the per-family halves of the ruleset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }

    /// The payload protocol name of the network header (`ip` or `ip6`).
    fn header(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    fn addr_type(self) -> SetType {
        match self {
            Family::V4 => SetType::Ipv4Addr,
            Family::V6 => SetType::Ipv6Addr,
        }
    }

    fn icmp(self) -> u32 {
        match self {
            Family::V4 => ICMP,
            Family::V6 => ICMPV6,
        }
    }

    /// `meta nfproto ipv4` (or `ipv6`): the packet is of this family.
    fn nfproto(self) -> Statement<'static> {
        let name = match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        };
        matches(
            meta(MetaKey::Nfproto),
            Operator::EQ,
            Expression::String(name.into()),
        )
    }

    fn everything(self) -> IpNet {
        match self {
            Family::V4 => "0.0.0.0/0".parse().expect("valid net"),
            Family::V6 => "::/0".parse().expect("valid net"),
        }
    }
}

/// One element of a grant set: destination address, source prefix, protocol and
/// destination port range. Elements of one set never overlap (the kernel's concatenated
/// interval sets refuse overlaps), see [`disjoint_sources`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantKey {
    /// One of the agent's addresses.
    pub destination: IpAddr,
    /// Source prefix, same family as `destination`.
    pub source: IpNet,
    /// IP protocol number.
    pub protocol: u8,
    /// Inclusive destination port range (`0-65535` for ICMP, whose "port" is ignored).
    pub ports: (u16, u16),
}

/// The desired content of the agent's table. The skeleton (chains, sets, rules) and the
/// grant elements are kept apart so that a change of grants alone can be applied as an
/// element update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    /// The table's name (family `inet`).
    pub table: String,
    /// Chain, sets and rules, in the order they must be added (sets before the rules
    /// that reference them).
    pub skeleton: Vec<NfListObject<'static>>,
    /// Grant elements by set name, each with the instant it expires.
    pub grants: BTreeMap<String, BTreeMap<GrantKey, Timestamp>>,
}

/// Sorts every `flags` list in nft JSON. The nftables crate keeps flags in a `HashSet`,
/// which serializes them in a different order in every instance: hashed as they come, one
/// ruleset had a new hash in every render, and the agent rewrote its report on every event,
/// each write waking it again.
fn sort_flags(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Array(items) => items.iter_mut().for_each(sort_flags),
        serde_json::Value::Object(fields) => {
            for (key, field) in fields.iter_mut() {
                match field {
                    serde_json::Value::Array(flags) if key == "flags" => {
                        flags.sort_by_key(ToString::to_string);
                    }
                    _ => sort_flags(field),
                }
            }
        }
        _ => {}
    }
}

impl Ruleset {
    /// A short stable hash of everything the ruleset enforces (FNV-1a over the skeleton's
    /// canonical JSON and the grant elements' bytes): what agents report as `rulesHash`, so
    /// that two agents or two runs can be compared, and what the agent's report is
    /// rewritten on when it changes. Computed once per applied change, on the loop that
    /// applies the next grant: elements are fed as bytes, not formatted (formatting each
    /// key and expiry took 5.6 ms at 10,000 grants, the whole hash now 0.5 ms).
    pub fn hash(&self) -> String {
        let mut hash = Fnv::default();
        hash.feed(self.table.as_bytes());
        let mut skeleton =
            serde_json::to_value(&self.skeleton).expect("nftables objects serialize");
        sort_flags(&mut skeleton);
        hash.feed(skeleton.to_string().as_bytes());
        for (set, elements) in &self.grants {
            hash.feed(set.as_bytes());
            hash.feed(&[0]);
            for (key, expires) in elements {
                for address in [key.destination, key.source.addr()] {
                    match address {
                        IpAddr::V4(v4) => hash.feed(&v4.octets()),
                        IpAddr::V6(v6) => hash.feed(&v6.octets()),
                    }
                }
                hash.feed(&[key.source.prefix_len(), key.protocol]);
                hash.feed(&key.ports.0.to_be_bytes());
                hash.feed(&key.ports.1.to_be_bytes());
                hash.feed(&expires.as_second().to_be_bytes());
                hash.feed(&expires.subsec_nanosecond().to_be_bytes());
            }
        }
        format!("{:016x}", hash.finish())
    }

    /// How many grant elements the ruleset holds.
    pub fn grant_count(&self) -> usize {
        self.grants.values().map(BTreeMap::len).sum()
    }
}

/// Whether going from `applied` to `desired` only adds grant elements: same skeleton, same
/// grant sets, and every element in force still there with the same expiry.
pub fn only_adds_grants(applied: &Ruleset, desired: &Ruleset) -> bool {
    applied.table == desired.table
        && applied.skeleton == desired.skeleton
        && applied.grants.keys().eq(desired.grants.keys())
        && applied
            .grants
            .iter()
            .all(|(set, elements)| changed(elements, &desired.grants[set]).0.is_empty())
}

/// What [`changed`] finds: the grants gone, and those added with their expiry.
pub type Changes<'a> = (Vec<&'a GrantKey>, Vec<(&'a GrantKey, &'a Timestamp)>);

/// The grants of one set in `old` and not in `new` with the same expiry, and those of `new`
/// not in `old` with it: one walk over both in key order. A grant on top of 10,000 costs
/// a pass over them whatever is done, but a lookup of each in the other map made it a
/// search per element (about 1.5 ms more at 10,000, in the grant update and again in the
/// check whether a change only adds grants).
pub fn changed<'a>(
    old: &'a BTreeMap<GrantKey, Timestamp>,
    new: &'a BTreeMap<GrantKey, Timestamp>,
) -> Changes<'a> {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let (mut gone, mut added) = (Vec::new(), Vec::new());
    let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => return (gone, added),
            (Some(&(key, _)), None) => {
                gone.push(key);
                old.next();
            }
            (None, Some(&entry)) => {
                added.push(entry);
                new.next();
            }
            (Some(&(was, then)), Some(&(key, expires))) => match was.cmp(key) {
                Less => {
                    gone.push(was);
                    old.next();
                }
                Greater => {
                    added.push((key, expires));
                    new.next();
                }
                Equal => {
                    if then != expires {
                        gone.push(was);
                        added.push((key, expires));
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
}

/// Builds the ruleset enforcing `policy` on `target` at `now`.
pub fn render(policy: &Policy, target: &Target, now: Timestamp) -> Ruleset {
    let mut builder = Builder {
        table: target.table.clone(),
        mode: target.mode,
        scope: &policy.scope,
        addresses: target.addresses.clone(),
        skeleton: Vec::new(),
        rules: Vec::new(),
        flow_checks_at: 0,
        grant_sets: Vec::new(),
        grants: BTreeMap::new(),
    };
    builder.skeleton.push(NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: builder.table.clone().into(),
        name: target.mode.chain().into(),
        _type: Some(NfChainType::Filter),
        hook: Some(target.mode.hook()),
        prio: Some(0),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }));
    builder.preamble();

    let widened: Vec<Cow<'_, Rule>> = policy
        .rules
        .iter()
        .filter(|r| r.direction == Direction::Inbound)
        .map(|r| machine_wide(r, target, &policy.scope))
        .collect();
    let inbound: Vec<&Rule> = widened.iter().map(AsRef::as_ref).collect();
    let object = |rule: &Rule| match &rule.origin {
        Origin::SecurityRule { name } => Some(name.clone()),
        _ => None,
    };
    let grant_of = |rule: &Rule| {
        let name = object(rule).filter(|_| is_grant(rule))?;
        let expires = *policy.expiries.get(&name)?;
        Some(GrantOf {
            expires,
            closing: policy.closing.contains(&name),
        })
    };
    // The first run of grants sits where the first grant is, or at the top when there is
    // none: then the first grant of a typical NSG (grants take the top priorities) is an
    // element update, not a reload.
    let mut run = 0;
    let mut in_run = false;
    if !inbound.iter().any(|r| grant_of(r).is_some()) {
        builder.grant_run(run);
        run += 1;
    }
    let mut pending: Vec<(&Rule, GrantOf)> = Vec::new();
    for rule in inbound {
        match grant_of(rule) {
            Some(grant) => {
                if !in_run {
                    builder.grant_run(run);
                    in_run = true;
                }
                pending.push((rule, grant));
            }
            None => {
                if in_run {
                    builder.grant_elements(run, &pending, now);
                    pending.clear();
                    run += 1;
                    in_run = false;
                }
                builder.rule(rule);
            }
        }
    }
    if in_run {
        builder.grant_elements(run, &pending, now);
    }
    builder.finish()
}

/// The policy's rules as they apply at `target` (see [`machine_wide`]), in evaluation
/// order: what [`crate::rules::evaluate`] must be asked for the verdicts the rendered
/// ruleset gives.
pub fn as_enforced(policy: &Policy, target: &Target) -> Vec<Rule> {
    policy
        .rules
        .iter()
        .map(|r| machine_wide(r, target, &policy.scope).into_owned())
        .collect()
}

/// The machine addresses a gateway protects for `policy`: every single address a JIT rule
/// is aimed at (the operator aims each policy machine's deny, and its grants, at the
/// machine's address), in order, without repeats.
pub fn machine_addresses(policy: &Policy) -> Vec<IpAddr> {
    let addresses: BTreeSet<IpAddr> = policy
        .rules
        .iter()
        .filter(|r| r.jit)
        .flat_map(|r| &r.destination_prefixes)
        .filter_map(|p| match p {
            AddressPrefix::Net(net) if net.prefix_len() == net.max_prefix_len() => Some(net.addr()),
            _ => None,
        })
        .collect();
    addresses.into_iter().collect()
}

/// The set of one family's flows seen lately, each stamped with its last packet (see
/// [`SEEN_TIMEOUT`]).
pub fn seen_set(family: Family) -> String {
    format!("jit_seen_{}", family.suffix())
}

/// destination . source . protocol . port, for a family.
fn grant_key_type(family: Family) -> SetTypeValue<'static> {
    SetTypeValue::Concatenated(
        vec![
            family.addr_type(),
            family.addr_type(),
            SetType::InetProto,
            SetType::InetService,
        ]
        .into(),
    )
}

/// How a grant rule is enforced: until when, and whether its flows end with it.
#[derive(Clone, Copy, Debug)]
struct GrantOf {
    expires: Timestamp,
    closing: bool,
}

/// A JIT rule aimed at one of the machine's addresses, aimed at all of them.
///
/// The operator's rules name the one address a policy gives the machine, but the machine
/// answers on every address it has: its IPv6 addresses, a second IPv4 address. A JIT deny
/// that closed the port on one of them only would be walked around with `ssh -6`, so a JIT
/// rule that concerns this machine concerns all of it: the deny closes every address, and a
/// grant opens the port on the machine's addresses of the grant's source family (a grant
/// names a machine, a port and a source; it never opens more than those). Users' rules
/// are enforced as written. A gateway knows one address per machine, and a rule aimed at
/// one machine must not reach the others, so there every rule is enforced as written.
fn machine_wide<'a>(rule: &'a Rule, target: &Target, scope: &Scope) -> Cow<'a, Rule> {
    let addresses = &target.addresses;
    let aimed_here = target.mode == Mode::Host
        && rule.jit
        && addresses.iter().any(|a| {
            rule.destination_prefixes
                .iter()
                .any(|p| p.matches(*a, scope))
        });
    if !aimed_here {
        return Cow::Borrowed(rule);
    }
    Cow::Owned(Rule {
        destination_prefixes: addresses
            .iter()
            .map(|a| AddressPrefix::Net(IpNet::from(*a)))
            .collect(),
        ..rule.clone()
    })
}

/// Whether a rule is rendered as set elements: an operator-made allow with ports and
/// prefixes a set element can express (no source-port restriction, no `Internet` source,
/// whose complement is not a prefix).
fn is_grant(rule: &Rule) -> bool {
    rule.jit
        && rule.access == Access::Allow
        && rule.source_ports.contains(&PortRange::Any)
        && !rule.source_prefixes.contains(&AddressPrefix::Internet)
}

struct Builder<'s> {
    table: String,
    mode: Mode,
    scope: &'s Scope,
    addresses: Vec<IpAddr>,
    /// Chain and sets.
    skeleton: Vec<NfListObject<'static>>,
    /// Rules, added after every set.
    rules: Vec<NfListObject<'static>>,
    /// Where the checks of marked flows go once every grant set is known.
    flow_checks_at: usize,
    /// Every grant set, of either kind, with its family.
    grant_sets: Vec<(Family, String)>,
    grants: BTreeMap<String, BTreeMap<GrantKey, Timestamp>>,
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

/// `ct mark & BITS != 0` (`set`), or `== 0`.
fn marked(bits: u32, set: bool) -> Statement<'static> {
    matches(
        Expression::BinaryOperation(Box::new(BinaryOperation::AND(
            ct("mark"),
            Expression::Number(bits),
        ))),
        if set { Operator::NEQ } else { Operator::EQ },
        Expression::Number(0),
    )
}

/// `ct direction original` (or `reply`): which way the packet goes in its flow.
fn direction(which: &'static str) -> Statement<'static> {
    matches(
        ct("direction"),
        Operator::EQ,
        Expression::String(which.into()),
    )
}

/// `ct state STATE[,STATE]`.
fn ct_state(states: &[&'static str]) -> Statement<'static> {
    let right = match states {
        [one] => Expression::String((*one).into()),
        many => Expression::List(
            many.iter()
                .map(|s| Expression::String((*s).into()))
                .collect(),
        ),
    };
    matches(ct("state"), Operator::IN, right)
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn net(net: &IpNet) -> Expression<'static> {
    if net.prefix_len() == net.max_prefix_len() {
        Expression::String(net.addr().to_string().into())
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(Expression::String(net.network().to_string().into())),
            len: u32::from(net.prefix_len()),
        }))
    }
}

fn port_range((start, end): (u16, u16)) -> Expression<'static> {
    if start == end {
        Expression::Number(u32::from(start))
    } else {
        Expression::Range(Box::new(nftables::expr::Range {
            range: [
                Expression::Number(u32::from(start)),
                Expression::Number(u32::from(end)),
            ],
        }))
    }
}

/// An anonymous set, or the single value when there is only one (nft's canonical form).
fn set_of(mut items: Vec<Expression<'static>>) -> Expression<'static> {
    if items.len() == 1 {
        items.remove(0)
    } else {
        Expression::Named(NamedExpression::Set(
            items
                .into_iter()
                .map(nftables::expr::SetItem::Element)
                .collect(),
        ))
    }
}

/// Prefixes of one family, merged so that no two overlap (sets refuse overlapping
/// intervals).
fn merged_nets(nets: impl IntoIterator<Item = IpNet>, family: Family) -> Vec<IpNet> {
    let nets: Vec<IpNet> = nets
        .into_iter()
        .filter(|n| Family::of(&n.addr()) == family)
        .collect();
    IpNet::aggregate(&nets)
}

/// Port ranges merged into sorted, disjoint, non-adjacent intervals; `None` for "any port".
fn merged_ports(ranges: &[PortRange]) -> Option<Vec<(u16, u16)>> {
    let mut spans: Vec<(u16, u16)> = Vec::new();
    for range in ranges {
        match *range {
            PortRange::Any => return None,
            PortRange::Range { start, end } => spans.push((start, end)),
        }
    }
    spans.sort();
    let mut merged: Vec<(u16, u16)> = Vec::new();
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if u32::from(start) <= u32::from(last.1) + 1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    Some(merged)
}

/// The concrete prefixes a tag or prefix stands for (`Internet` and `*` have none: they
/// are rendered as a negated set match and as no match at all).
fn concrete(prefix: &AddressPrefix, scope: &Scope) -> Vec<IpNet> {
    match prefix {
        AddressPrefix::Net(n) => vec![*n],
        AddressPrefix::VirtualNetwork => scope.virtual_network.clone(),
        AddressPrefix::AzureLoadBalancer => scope.load_balancer.clone(),
        AddressPrefix::Any | AddressPrefix::Internet => Vec::new(),
    }
}

/// How a rule's protocol and ports are matched: `meta l4proto` values (empty: any
/// protocol) and the port sets (`None`: any port).
struct L4 {
    protocols: Vec<u32>,
    source_ports: Option<Vec<(u16, u16)>>,
    destination_ports: Option<Vec<(u16, u16)>>,
}

/// The protocol/port alternatives of a rule in `family`, with [`Rule::matches`]'s
/// semantics: ICMP ignores ports, `*` covers TCP, UDP and ICMP (and, when no port is
/// restricted, every other protocol too), and an empty port list matches no TCP/UDP packet.
fn l4_alternatives(rule: &Rule, family: Family) -> Vec<L4> {
    let icmp = L4 {
        protocols: vec![family.icmp()],
        source_ports: None,
        destination_ports: None,
    };
    let ported = |protocols: Vec<u32>| {
        if rule.source_ports.is_empty() || rule.destination_ports.is_empty() {
            return None;
        }
        Some(L4 {
            protocols,
            source_ports: merged_ports(&rule.source_ports),
            destination_ports: merged_ports(&rule.destination_ports),
        })
    };
    match rule.protocol {
        Protocol::Icmp => vec![icmp],
        Protocol::Tcp => ported(vec![TCP]).into_iter().collect(),
        Protocol::Udp => ported(vec![UDP]).into_iter().collect(),
        Protocol::Any => match ported(vec![TCP, UDP]) {
            Some(l4) if l4.source_ports.is_none() && l4.destination_ports.is_none() => {
                vec![L4 {
                    protocols: Vec::new(),
                    ..l4
                }]
            }
            Some(l4) => vec![l4, icmp],
            None => vec![icmp],
        },
    }
}

impl Builder<'_> {
    fn addresses_of(&self, family: Family) -> Vec<IpAddr> {
        self.addresses
            .iter()
            .filter(|a| Family::of(a) == family)
            .copied()
            .collect()
    }

    fn families(&self) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|f| !self.addresses_of(*f).is_empty())
            .collect()
    }

    fn rule_object(&self, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
        NfListObject::Rule(NftRule {
            family: NfFamily::INet,
            table: self.table.clone().into(),
            chain: self.mode.chain().into(),
            expr: expr.into(),
            ..NftRule::default()
        })
    }

    fn push_rule(&mut self, expr: Vec<Statement<'static>>) {
        let rule = self.rule_object(expr);
        self.rules.push(rule);
    }

    fn push_set(&mut self, name: String, set_type: SetTypeValue<'static>, flags: &[SetFlag]) {
        self.skeleton.push(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: self.table.clone().into(),
            name: name.into(),
            set_type,
            flags: Some(flags.iter().copied().collect()),
            ..Set::default()
        })));
    }

    /// Everything before the NSG rules: established flows, loopback, neighbour discovery,
    /// other addresses, and the `vnet_*` sets that `Internet` matches are negated against.
    fn preamble(&mut self) {
        self.push_rule(vec![
            ct_state(&["established", "related"]),
            marked(GRANT_MARK | CLOSE_MARK, false),
            Statement::Accept(None),
        ]);
        self.flow_checks_at = self.rules.len();
        // Loopback and neighbour discovery are never forwarded: a gateway has no use for
        // these two.
        if self.mode == Mode::Host {
            self.push_rule(vec![
                matches(
                    meta(MetaKey::Iifname),
                    Operator::EQ,
                    Expression::String("lo".into()),
                ),
                Statement::Accept(None),
            ]);
            if !self.addresses_of(Family::V6).is_empty() {
                self.push_rule(vec![
                    matches(
                        meta(MetaKey::L4proto),
                        Operator::EQ,
                        Expression::Number(ICMPV6),
                    ),
                    matches(
                        payload("icmpv6", "type"),
                        Operator::EQ,
                        set_of(
                            NEIGHBOUR_DISCOVERY
                                .iter()
                                .map(|t| Expression::Number(*t))
                                .collect(),
                        ),
                    ),
                    Statement::Accept(None),
                ]);
            }
        }
        for family in Family::ALL {
            let mine = self.addresses_of(family);
            let not_mine = if mine.is_empty() {
                family.nfproto()
            } else {
                matches(
                    payload(family.header(), "daddr"),
                    Operator::NEQ,
                    set_of(mine.iter().map(|a| net(&IpNet::from(*a))).collect()),
                )
            };
            self.push_rule(vec![not_mine, Statement::Return(None)]);
        }
        for family in self.families() {
            let name = format!("vnet_{}", family.suffix());
            self.push_set(
                name.clone(),
                SetTypeValue::Single(family.addr_type()),
                &[SetFlag::Interval],
            );
            let nets = merged_nets(self.scope.virtual_network.iter().copied(), family);
            if !nets.is_empty() {
                self.push_elements(&name, nets.iter().map(net).collect());
            }
            self.skeleton.push(NfListObject::Set(Box::new(Set {
                family: NfFamily::INet,
                table: self.table.clone().into(),
                name: seen_set(family).into(),
                set_type: grant_key_type(family),
                // No `dynamic` flag: nft 1.0.6 refuses it in JSON, and sets it itself for a
                // set the packet path updates.
                flags: Some([SetFlag::Timeout].into_iter().collect()),
                timeout: Some(SEEN_TIMEOUT),
                size: Some(SEEN_SIZE),
                ..Set::default()
            })));
        }
    }

    fn push_elements(&mut self, set: &str, elements: Vec<Expression<'static>>) {
        self.skeleton
            .push(NfListObject::Element(nftables::schema::Element {
                family: NfFamily::INet,
                table: self.table.clone().into(),
                name: set.to_owned().into(),
                elem: elements.into(),
            }));
    }

    /// One NSG rule: for each family, destination, source and protocol/port alternative,
    /// an nft rule with the rule's verdict (consecutive rules with one verdict are their
    /// union, which is how a rule's lists are "any of").
    fn rule(&mut self, rule: &Rule) {
        let verdict = match rule.access {
            Access::Allow => Statement::Accept(None),
            Access::Deny => Statement::Drop(None),
        };
        for family in self.families() {
            let mine = self.addresses_of(family);
            // Packets that get here are addressed to one of `mine`, so the destination
            // match reduces to which of them the rule's destinations contain.
            let destinations: Vec<IpAddr> = mine
                .iter()
                .filter(|a| {
                    rule.destination_prefixes
                        .iter()
                        .any(|p| p.matches(**a, self.scope))
                })
                .copied()
                .collect();
            if destinations.is_empty() {
                continue;
            }
            let destination = (destinations.len() < mine.len()).then(|| {
                matches(
                    payload(family.header(), "daddr"),
                    Operator::EQ,
                    set_of(destinations.iter().map(|a| net(&IpNet::from(*a))).collect()),
                )
            });
            let mut sources: Vec<Option<Statement<'static>>> = Vec::new();
            if rule.source_prefixes.contains(&AddressPrefix::Any) {
                sources.push(None);
            } else {
                let nets = merged_nets(
                    rule.source_prefixes
                        .iter()
                        .flat_map(|p| concrete(p, self.scope)),
                    family,
                );
                if !nets.is_empty() {
                    sources.push(Some(matches(
                        payload(family.header(), "saddr"),
                        Operator::EQ,
                        set_of(nets.iter().map(net).collect()),
                    )));
                }
                if rule.source_prefixes.contains(&AddressPrefix::Internet) {
                    sources.push(Some(matches(
                        payload(family.header(), "saddr"),
                        Operator::NEQ,
                        Expression::String(format!("@vnet_{}", family.suffix()).into()),
                    )));
                }
            }
            for source in &sources {
                for l4 in l4_alternatives(rule, family) {
                    let mut expr: Vec<Statement<'static>> = Vec::new();
                    if destination.is_none() && source.is_none() {
                        // Nothing else ties this rule to its family: without this it
                        // would also decide the other family's packets.
                        expr.push(family.nfproto());
                    }
                    expr.extend(destination.clone());
                    expr.extend(source.clone());
                    if !l4.protocols.is_empty() {
                        expr.push(matches(
                            meta(MetaKey::L4proto),
                            Operator::EQ,
                            set_of(
                                l4.protocols
                                    .iter()
                                    .map(|p| Expression::Number(*p))
                                    .collect(),
                            ),
                        ));
                    }
                    for (field, ports) in [
                        ("sport", &l4.source_ports),
                        ("dport", &l4.destination_ports),
                    ] {
                        if let Some(ports) = ports {
                            expr.push(matches(
                                payload("th", field),
                                Operator::EQ,
                                set_of(ports.iter().map(|r| port_range(*r)).collect()),
                            ));
                        }
                    }
                    expr.push(verdict.clone());
                    self.push_rule(expr);
                }
            }
        }
    }

    /// The set of run `run`'s grants of one family whose flows outlive them
    /// (`jit_allow{run}_v4`) or end with them (`jit_close{run}_v4`); run 0 has no number.
    /// Grants of one source address to one port go to the `jit_host_*` twin, a hash set.
    fn grant_set(run: usize, family: Family, closing: bool, exact: bool) -> String {
        let kind = match (exact, closing) {
            (false, false) => "allow",
            (false, true) => "close",
            (true, false) => "host_allow",
            (true, true) => "host_close",
        };
        match run {
            0 => format!("jit_{kind}_{}", family.suffix()),
            n => format!("jit_{kind}{n}_{}", family.suffix()),
        }
    }

    /// `update @jit_seen_v4 { KEY }`: the flow of this packet was just seen.
    fn seen(family: Family) -> Statement<'static> {
        Statement::Set(nftables::stmt::Set {
            op: nftables::stmt::SetOp::Update,
            elem: Self::grant_key(family),
            set: format!("@{}", seen_set(family)).into(),
        })
    }

    /// The key of a grant set, from a packet of a flow's original direction.
    fn grant_key(family: Family) -> Expression<'static> {
        Expression::Named(NamedExpression::Concat(vec![
            payload(family.header(), "daddr"),
            payload(family.header(), "saddr"),
            meta(MetaKey::L4proto),
            payload("th", "dport"),
        ]))
    }

    /// The sets of one run of grants and the rules that match them:
    /// `ip daddr . ip saddr . meta l4proto . th dport @jit_allow_v4 accept`, and the same
    /// for `@jit_close_v4` marking the flow with [`CLOSE_MARK`]. The destination is part of
    /// the key so that a grant for one of several addresses opens only that one. Each has
    /// a hash-set twin for grants of one source address to one port (what the operator
    /// writes for a request from one address): adding to an interval set makes nft read the
    /// whole set first to check overlaps, so one grant's apply would grow with the grants
    /// in force; a hash set takes it as it is. Every set exists whether or not a grant uses
    /// it, so that a grant of any kind is an element update.
    fn grant_run(&mut self, run: usize) {
        for family in self.families() {
            for (closing, exact) in [(false, true), (false, false), (true, true), (true, false)] {
                let name = Self::grant_set(run, family, closing, exact);
                let flags: &[SetFlag] = if exact {
                    &[SetFlag::Timeout]
                } else {
                    &[SetFlag::Interval, SetFlag::Timeout]
                };
                self.push_set(name.clone(), grant_key_type(family), flags);
                let mark = if closing {
                    GRANT_MARK | CLOSE_MARK
                } else {
                    GRANT_MARK
                };
                self.push_rule(vec![
                    matches(
                        Self::grant_key(family),
                        Operator::EQ,
                        Expression::String(format!("@{name}").into()),
                    ),
                    Statement::Mangle(Mangle {
                        key: ct("mark"),
                        value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
                            ct("mark"),
                            Expression::Number(mark),
                        ]))),
                    }),
                    Self::seen(family),
                    Statement::Accept(None),
                ]);
                self.grants.entry(name.clone()).or_default();
                self.grant_sets.push((family, name));
            }
        }
    }

    /// The checks of the flows a grant let in (the marked ones; the others were accepted
    /// before): related packets pass (an ICMP error carries no session); a packet from the
    /// client is recorded in the seen set; a `Keep` flow's packets pass; a `Close` flow's
    /// established packet passes while some grant set still holds its flow, looked up in
    /// the flow's original direction (a gateway also forwards the replies); otherwise TCP
    /// is answered with a reset, so both ends learn at once, and anything else is dropped.
    fn flow_checks(&self) -> Vec<NfListObject<'static>> {
        let mut checks =
            vec![self.rule_object(vec![ct_state(&["related"]), Statement::Accept(None)])];
        for family in self.families() {
            checks.push(self.rule_object(vec![
                ct_state(&["established"]),
                direction("original"),
                family.nfproto(),
                Self::seen(family),
            ]));
        }
        checks.push(self.rule_object(vec![
            ct_state(&["established"]),
            marked(CLOSE_MARK, false),
            Statement::Accept(None),
        ]));
        for (family, set) in &self.grant_sets {
            let set = Expression::String(format!("@{set}").into());
            checks.push(self.rule_object(vec![
                ct_state(&["established"]),
                direction("original"),
                matches(Self::grant_key(*family), Operator::EQ, set.clone()),
                Statement::Accept(None),
            ]));
            if self.mode == Mode::Gateway {
                let reply_key = Expression::Named(NamedExpression::Concat(vec![
                    payload(family.header(), "saddr"),
                    payload(family.header(), "daddr"),
                    meta(MetaKey::L4proto),
                    payload("th", "sport"),
                ]));
                checks.push(self.rule_object(vec![
                    ct_state(&["established"]),
                    direction("reply"),
                    matches(reply_key, Operator::EQ, set),
                    Statement::Accept(None),
                ]));
            }
        }
        checks.push(self.rule_object(vec![
            ct_state(&["established"]),
            matches(
                meta(MetaKey::L4proto),
                Operator::EQ,
                Expression::Number(TCP),
            ),
            Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
        ]));
        checks.push(self.rule_object(vec![ct_state(&["established"]), Statement::Drop(None)]));
        checks
    }

    /// The elements of one run, in the set of their kind: every (destination, source,
    /// protocol, port range) the grants allow, made disjoint, each expiring at the latest
    /// expiry that covers it.
    fn grant_elements(&mut self, run: usize, grants: &[(&Rule, GrantOf)], now: Timestamp) {
        for closing in [false, true] {
            let kind: Vec<(&Rule, Timestamp)> = grants
                .iter()
                .filter(|(_, grant)| grant.closing == closing)
                .map(|(rule, grant)| (*rule, grant.expires))
                .collect();
            self.grant_elements_of(run, closing, &kind, now);
        }
    }

    fn grant_elements_of(
        &mut self,
        run: usize,
        closing: bool,
        grants: &[(&Rule, Timestamp)],
        now: Timestamp,
    ) {
        for family in self.families() {
            let mine = self.addresses_of(family);
            // (destination, protocol) -> [(source, ports, expires)]
            let mut groups: BTreeMap<(IpAddr, u8), Vec<GrantItem>> = BTreeMap::new();
            for (rule, expires) in grants {
                if *expires <= now {
                    continue;
                }
                let sources: Vec<IpNet> = if rule.source_prefixes.contains(&AddressPrefix::Any) {
                    vec![family.everything()]
                } else {
                    merged_nets(
                        rule.source_prefixes
                            .iter()
                            .flat_map(|p| concrete(p, self.scope)),
                        family,
                    )
                };
                let ported: Vec<(u8, Vec<(u16, u16)>)> = {
                    let ports = merged_ports(&rule.destination_ports)
                        .unwrap_or_else(|| vec![(0, u16::MAX)]);
                    let full = vec![(0, u16::MAX)];
                    let icmp = family.icmp() as u8;
                    match rule.protocol {
                        Protocol::Tcp => vec![(TCP as u8, ports)],
                        Protocol::Udp => vec![(UDP as u8, ports)],
                        Protocol::Icmp => vec![(icmp, full)],
                        Protocol::Any => {
                            vec![(TCP as u8, ports.clone()), (UDP as u8, ports), (icmp, full)]
                        }
                    }
                };
                for destination in mine.iter().filter(|a| {
                    rule.destination_prefixes
                        .iter()
                        .any(|p| p.matches(**a, self.scope))
                }) {
                    for (protocol, ranges) in &ported {
                        // An empty port list allows no TCP/UDP packet; ICMP ignores it.
                        if rule.destination_ports.is_empty()
                            && u32::from(*protocol) != family.icmp()
                        {
                            continue;
                        }
                        let group = groups.entry((*destination, *protocol)).or_default();
                        for source in &sources {
                            for range in ranges {
                                group.push((*source, *range, *expires));
                            }
                        }
                    }
                }
            }
            // Collected unordered and sorted once: a map insert per element compares keys
            // all the way down the tree, which was a third of a round at 10,000 grants.
            let mut exact: Vec<(GrantKey, Timestamp)> = Vec::new();
            let mut ranged: Vec<(GrantKey, Timestamp)> = Vec::new();
            for ((destination, protocol), items) in groups {
                // One address to one port: an exact key, at the latest expiry among the
                // grants naming it; the rest made disjoint for the interval set. A packet
                // passes while either set holds it, which is the union the grants allow.
                let (hosts, rest): (Vec<GrantItem>, Vec<GrantItem>) =
                    items.into_iter().partition(|(source, ports, _)| {
                        source.prefix_len() == source.max_prefix_len() && ports.0 == ports.1
                    });
                let hosts = hosts.into_iter().map(|item| (true, item));
                let rest = disjoint(&rest, family)
                    .into_iter()
                    .map(|item| (false, item));
                for (is_exact, (source, ports, expires)) in hosts.chain(rest) {
                    let key = GrantKey {
                        destination,
                        source,
                        protocol,
                        ports,
                    };
                    if is_exact { &mut exact } else { &mut ranged }.push((key, expires));
                }
            }
            for (is_exact, elements) in [(true, exact), (false, ranged)] {
                // Each run's set is filled once, here (built from sorted keys in one pass).
                self.grants.insert(
                    Self::grant_set(run, family, closing, is_exact),
                    latest_per_key(elements).into_iter().collect(),
                );
            }
        }
    }

    fn finish(mut self) -> Ruleset {
        // Nothing matched: deny, as the oracle does (the defaults normally decide first).
        self.push_rule(vec![Statement::Drop(None)]);
        let checks = self.flow_checks();
        self.rules
            .splice(self.flow_checks_at..self.flow_checks_at, checks);
        let mut skeleton = self.skeleton;
        skeleton.extend(self.rules);
        Ruleset {
            table: self.table,
            skeleton,
            grants: self.grants,
        }
    }
}

/// `elements` sorted by key, one per key with the latest expiry among its duplicates (an
/// address granted twice holds until the later grant ends).
fn latest_per_key(mut elements: Vec<(GrantKey, Timestamp)>) -> Vec<(GrantKey, Timestamp)> {
    elements.sort_unstable();
    // Sorted by key, then expiry: the last of each run of equal keys is the latest.
    let mut latest: Vec<(GrantKey, Timestamp)> = Vec::with_capacity(elements.len());
    for (key, expires) in elements {
        match latest.last_mut() {
            Some((last, at)) if *last == key => *at = expires,
            _ => latest.push((key, expires)),
        }
    }
    latest
}

/// A grant as set elements see it: source prefix, destination port range, expiry.
type GrantItem = (IpNet, (u16, u16), Timestamp);

/// Makes grant items (source prefix, port range, expiry) disjoint: ports are cut at every
/// range boundary, and per port segment the sources become non-overlapping prefixes, each
/// with the latest expiry of the grants covering it. The union and the expiry of every
/// (source, port) point are unchanged.
fn disjoint(items: &[GrantItem], family: Family) -> Vec<GrantItem> {
    let mut cuts: Vec<u32> = items
        .iter()
        .flat_map(|(_, (start, end), _)| [u32::from(*start), u32::from(*end) + 1])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    for pair in cuts.windows(2) {
        let segment = (pair[0] as u16, (pair[1] - 1) as u16);
        let covering: Vec<(IpNet, Timestamp)> = items
            .iter()
            .filter(|(_, (start, end), _)| *start <= segment.0 && segment.1 <= *end)
            .map(|(source, _, expires)| (*source, *expires))
            .collect();
        if covering.is_empty() {
            continue;
        }
        let mut sources = Vec::new();
        disjoint_sources(family.everything(), None, &covering, &mut sources);
        out.extend(
            sources
                .into_iter()
                .map(|(source, expires)| (source, segment, expires)),
        );
    }
    out
}

/// Splits `node` into disjoint prefixes that carry the latest expiry of the `items` (all
/// inside `node`) covering them, walking down the prefix tree only where a more specific
/// item outlives what covers it.
fn disjoint_sources(
    node: IpNet,
    inherited: Option<Timestamp>,
    items: &[(IpNet, Timestamp)],
    out: &mut Vec<(IpNet, Timestamp)>,
) {
    let here = items
        .iter()
        .filter(|(net, _)| *net == node)
        .map(|(_, expires)| *expires)
        .chain(inherited)
        .max();
    let inner: Vec<(IpNet, Timestamp)> = items
        .iter()
        .filter(|(net, expires)| *net != node && here.is_none_or(|h| *expires > h))
        .copied()
        .collect();
    if inner.is_empty() {
        if let Some(expires) = here {
            out.push((node, expires));
        }
        return;
    }
    let Ok(halves) = node.subnets(node.prefix_len() + 1) else {
        return;
    };
    for half in halves {
        let within: Vec<(IpNet, Timestamp)> = items
            .iter()
            .filter(|(net, _)| *net != node && half.contains(net))
            .copied()
            .collect();
        disjoint_sources(half, here, &within, out);
    }
}

#[cfg(test)]
mod tests;
