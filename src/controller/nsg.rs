//! The NSG controller: computes each NSG's effective rules (inline rules, `SecurityRule`
//! objects that have not expired, Azure's defaults), priority conflicts, and the management
//! ports exposed to the Internet, and writes them to status only when they change, with a
//! summary of the agents' [`AgentReport`]s. Grants are counted there, not listed, and so are
//! the JIT denies of an NSG in front of many machines and the reports of many agents: the
//! status stays small however many machines, grants and agents an NSG has.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use crate::controller::runner::Action;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::context::Context;
use super::{Config, Error, name_and_namespace};
use crate::access::validate::{model_protocol, policy_ports};
use crate::api::conditions::{self, Decided, reason};
use crate::api::convert::{self};
use crate::api::nsg::{EnforcementReport, Exposure, MAX_LISTED_REPORTS, MAX_LISTENING_HOSTS};
use crate::api::nsg_model::NsgModel;
use crate::api::{AgentReport, NetworkSecurityGroup, NetworkSecurityGroupStatus};
use crate::rules::{self, AddressPrefix, Direction, Origin, Packet, Protocol, Scope};

pub const NAME: &str = "nsg";
/// Management ports Defender checks on every machine, besides those policies name.
const MANAGEMENT_PORTS: [u16; 4] = [22, 3389, 5985, 5986];
/// Coalesces a burst of rule changes (many grants at once) into one status write; the
/// status is a view for people, enforcement does not wait for it.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// However long the burst, the status is at most this old.
const MAX_DELAY: Duration = Duration::from_secs(60);
/// Under steady churn (grants on one NSG further apart than the debounce) an NSG's status
/// is written at most this often, not once per grant: a burst of 1,000 grants over 50 NSGs
/// cost 1,034 NSG status writes before it.
const SPACING: Duration = Duration::from_secs(2);
/// How many JIT deny rules the status lists before it only counts them (see [`listed`]).
const MAX_LISTED_DENIES: usize = 256;
/// A safety net: even with no change and no expiry ahead, look again this often.
const RESYNC: Duration = Duration::from_secs(600);
/// Addresses from the documentation ranges, used as "somebody on the Internet" when
/// probing exposure; the first one outside the virtual network is used.
const INTERNET_PROBES: [Ipv4Addr; 3] = [
    Ipv4Addr::new(203, 0, 113, 1),
    Ipv4Addr::new(198, 51, 100, 1),
    Ipv4Addr::new(192, 0, 2, 1),
];
/// The same for IPv6 destinations (2001:db8::/32 is documentation space).
const INTERNET_PROBES_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1),
];

/// How the NSG controller runs: bursts of rule changes are coalesced.
pub fn config(config: &Config) -> crate::controller::runner::Settings {
    crate::controller::runner::Settings {
        concurrency: config.concurrency.into(),
        debounce: DEBOUNCE,
        max_delay: MAX_DELAY,
        spacing: SPACING,
    }
}

pub async fn reconcile(nsg: Arc<NetworkSecurityGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let now = ctx.now();
    let (name, namespace) = name_and_namespace(nsg.as_ref(), "NetworkSecurityGroup")?;
    let objects = ctx.rules_of(&namespace, &name);
    let reports = ctx.reports_on(&namespace, &name);
    let model = NsgModel::new(&nsg, objects.iter().map(Arc::as_ref), now);
    let next_expiry = model.next_expiry();
    let (scope, invalid) = (model.scope, model.invalid);
    let expiries = model.expiries;
    let effective = rules::effective(model.rules);
    let conflicts = rules::conflicts(&effective);
    let exposure = exposure(
        &effective,
        &scope,
        &management_ports(&ctx, &namespace, &name),
        &listening(&reports),
    );

    let previous = nsg.status.clone().unwrap_or_default();
    let generation = nsg.metadata.generation;
    let now_time = Time(now);
    let ready = if invalid.is_empty() {
        Decided {
            type_: conditions::READY,
            status: true,
            reason: reason::RECONCILED,
            message: format!("{} effective rules", effective.len()),
        }
    } else {
        Decided {
            type_: conditions::READY,
            status: false,
            reason: reason::INVALID_RULE,
            message: invalid
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        }
    };
    let conflict = if conflicts.is_empty() {
        Decided {
            type_: conditions::CONFLICT,
            status: false,
            reason: reason::NO_CONFLICT,
            message: "every priority is unique per direction".into(),
        }
    } else {
        Decided {
            type_: conditions::CONFLICT,
            status: true,
            reason: reason::CONFLICTING_PRIORITIES,
            message: conflicts
                .iter()
                .map(|c| {
                    format!(
                        "{:?} priority {}: {}",
                        c.direction,
                        c.priority,
                        c.rules.join(", ")
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        }
    };
    let enforced = enforced(&reports, generation);
    let exposed_ports: BTreeSet<String> = exposure
        .iter()
        .map(|e| format!("{}/{:?}", e.port, e.protocol))
        .collect();
    let denies = jit_denies(&effective);
    let status = NetworkSecurityGroupStatus {
        observed_generation: generation,
        conditions: [ready, conflict, enforced]
            .into_iter()
            .map(|d| d.into_condition(&previous.conditions, generation, &now_time))
            .collect(),
        effective_rule_count: Some(effective.len() as u32),
        jit_deny_rules: Some(denies as u32),
        active_grants: Some(effective.iter().filter(|r| is_grant(r)).count() as u32),
        effective_rules: listed(&effective, denies)
            .into_iter()
            .map(|r| {
                let expires_at = match &r.origin {
                    Origin::SecurityRule { name } => expiries.get(name).map(|at| Time(*at)),
                    _ => None,
                };
                convert::effective_rule(r, expires_at)
            })
            .collect(),
        exposure,
        exposed_ports: (!exposed_ports.is_empty())
            .then(|| exposed_ports.into_iter().collect::<Vec<_>>().join(",")),
        agents: Some(reports.len() as u32),
        enforcement: listed_reports(&reports, generation),
    };
    if previous != status {
        let written = ctx.apply_status(nsg.as_ref(), &status).await?;
        drop_unlisted_reports(&ctx, &written, &status.enforcement).await?;
    }
    let wait = next_expiry
        .and_then(|at| at.duration_since(now).try_into().ok())
        .map_or(RESYNC, |d: Duration| d.min(RESYNC));
    Ok(Action::requeue(wait))
}

/// Whether every agent on the NSG enforces its `generation`: the `Enforced` condition.
fn enforced(reports: &[Arc<AgentReport>], generation: Option<i64>) -> Decided {
    let decided = |status, reason, message| Decided {
        type_: conditions::ENFORCED,
        status,
        reason,
        message,
    };
    let agents = |of: &[&EnforcementReport]| {
        let mut names: Vec<&str> = of.iter().map(|r| r.agent.as_str()).collect();
        names.sort_unstable();
        let more = names.len().saturating_sub(MAX_NAMED_AGENTS);
        names.truncate(MAX_NAMED_AGENTS);
        let mut text = names.join(", ");
        if more > 0 {
            text.push_str(&format!(" and {more} more"));
        }
        text
    };
    let of_agents = |n: usize| format!("{n} agent{}", if n == 1 { "" } else { "s" });
    let all: Vec<&EnforcementReport> = reports.iter().map(|r| &r.spec.report).collect();
    let failing: Vec<&EnforcementReport> =
        all.iter().copied().filter(|r| r.error.is_some()).collect();
    let behind: Vec<&EnforcementReport> = all
        .iter()
        .copied()
        .filter(|r| r.error.is_none() && r.observed_generation != generation)
        .collect();
    if all.is_empty() {
        decided(
            false,
            reason::NO_AGENTS,
            "no agent reports on this NSG: nothing enforces it".into(),
        )
    } else if let Some(first) = failing.first() {
        decided(
            false,
            reason::AGENT_ERROR,
            format!(
                "{} of {} report an error and keep their last good rules ({}); {}: {}",
                failing.len(),
                of_agents(all.len()),
                agents(&failing),
                first.agent,
                first.error.as_deref().unwrap_or_default()
            ),
        )
    } else if !behind.is_empty() {
        decided(
            false,
            reason::AGENTS_BEHIND,
            format!(
                "{} of {} have not applied generation {} yet ({})",
                behind.len(),
                of_agents(all.len()),
                generation.unwrap_or_default(),
                agents(&behind)
            ),
        )
    } else {
        decided(
            true,
            reason::AGENTS_IN_SYNC,
            format!(
                "{} enforce{} generation {}",
                of_agents(all.len()),
                if all.len() == 1 { "s" } else { "" },
                generation.unwrap_or_default()
            ),
        )
    }
}

/// How many agents a condition message names.
const MAX_NAMED_AGENTS: usize = 5;

/// The reports the status lists: those with an error first, then those behind
/// `generation`, then the rest, each group by agent; at most [`MAX_LISTED_REPORTS`]. Each
/// agent has one report here: a report counts only under the name its NSG and agent give
/// it (see [`ReportEntry`](super::index::ReportEntry)).
fn listed_reports(reports: &[Arc<AgentReport>], generation: Option<i64>) -> Vec<EnforcementReport> {
    let mut listed: Vec<&EnforcementReport> = reports.iter().map(|r| &r.spec.report).collect();
    listed.sort_by(|a, b| {
        let rank = |r: &EnforcementReport| (r.error.is_none(), r.observed_generation == generation);
        rank(a).cmp(&rank(b)).then_with(|| a.agent.cmp(&b.agent))
    });
    listed
        .into_iter()
        .take(MAX_LISTED_REPORTS)
        .cloned()
        .collect()
}

/// Removes from the NSG's status the report entries it no longer lists that another field
/// manager still holds: those the agents of earlier releases wrote there themselves, each
/// as `portcullis-agent-NAME`. An empty apply under that manager's name releases what it
/// held, and the apiserver drops what nobody holds any more. Nothing to do (and no call)
/// once they are gone.
async fn drop_unlisted_reports(
    ctx: &Context,
    written: &NetworkSecurityGroup,
    listed: &[EnforcementReport],
) -> Result<(), Error> {
    let stale = written
        .status
        .iter()
        .flat_map(|s| &s.enforcement)
        .any(|e| !listed.iter().any(|l| l.agent == e.agent));
    if !stale {
        return Ok(());
    }
    let holders: Vec<&str> = written
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:status/f:enforcement").is_some())
        })
        .filter_map(|m| m.manager.as_deref())
        .filter(|m| *m != super::MANAGER)
        .collect();
    for manager in holders {
        tracing::info!(
            nsg = written.metadata.name.as_deref().unwrap_or_default(),
            manager,
            "dropping a report an earlier agent wrote into the NSG status"
        );
        ctx.release_status(written, manager).await?;
    }
    Ok(())
}

/// The effective rules the status lists: every rule but the grants (counted, never listed),
/// with the JIT denies (`denies` of them) while there are at most [`MAX_LISTED_DENIES`] of them. Past that
/// they are only counted too: an NSG in front of 10,000 machines carries 10,000 denies,
/// about 3 MiB of status, and etcd refuses objects over 1.5 MiB.
fn listed(effective: &[rules::Rule], denies: usize) -> Vec<&rules::Rule> {
    effective
        .iter()
        .filter(|r| !is_grant(r))
        .filter(|r| denies <= MAX_LISTED_DENIES || !is_jit_deny(r))
        .collect()
}

/// How many JIT denies `effective` holds.
fn jit_denies(effective: &[rules::Rule]) -> usize {
    effective.iter().filter(|r| is_jit_deny(r)).count()
}

fn is_jit_deny(rule: &rules::Rule) -> bool {
    rule.jit && rule.access == rules::Access::Deny
}

/// Whether `rule` is a JIT grant (counted in the status, never listed).
fn is_grant(rule: &rules::Rule) -> bool {
    rule.jit && rule.access == rules::Access::Allow
}

/// The management ports of this NSG: the well-known ones plus every port a policy names
/// for a machine behind it, with the protocol to probe.
fn management_ports(
    ctx: &Context,
    namespace: &str,
    nsg: &str,
) -> Vec<(u16, Protocol, Option<IpAddr>)> {
    let mut ports: Vec<(u16, Protocol, Option<IpAddr>)> = MANAGEMENT_PORTS
        .iter()
        .map(|p| (*p, Protocol::Tcp, None))
        .collect();
    for policy in ctx.policies_on(namespace, nsg) {
        for machine in policy
            .spec
            .virtual_machines
            .iter()
            .filter(|m| m.network_security_group_name == nsg)
        {
            let address = machine.address.parse::<IpAddr>().ok();
            for port in policy_ports(machine) {
                let protocol = match model_protocol(port.protocol) {
                    Protocol::Any => Protocol::Tcp,
                    p => p,
                };
                ports.push((port.number, protocol, address));
            }
            if let Some(address) = address {
                ports.extend(
                    MANAGEMENT_PORTS
                        .iter()
                        .map(|p| (*p, Protocol::Tcp, Some(address))),
                );
            }
        }
    }
    ports.sort();
    ports.dedup();
    ports
}

/// The ports agents found listening, each on every address its agent protects, with the
/// agent's name.
fn listening(reports: &[Arc<AgentReport>]) -> Vec<(u16, Protocol, IpAddr, String)> {
    let mut probes = Vec::new();
    for report in reports.iter().map(|r| &r.spec.report) {
        let addresses: Vec<IpAddr> = report
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        for listening in &report.listening_ports {
            let protocol = convert::protocol(listening.protocol);
            for address in &addresses {
                probes.push((listening.port, protocol, *address, report.agent.clone()));
            }
        }
    }
    probes
}

/// "Somebody on the Internet" for a destination of `destination`'s family: a documentation
/// address outside the virtual network.
fn internet_source(destination: IpAddr, scope: &Scope) -> Option<IpAddr> {
    let outside = |a: &IpAddr| !scope.virtual_network.iter().any(|n| n.contains(a));
    match destination {
        IpAddr::V4(_) => INTERNET_PROBES.iter().map(|a| IpAddr::V4(*a)).find(outside),
        IpAddr::V6(_) => INTERNET_PROBES_V6
            .iter()
            .map(|a| IpAddr::V6(*a))
            .find(outside),
    }
}

/// Management ports that a packet from the Internet would reach without JIT, each with the
/// rule that lets it in; with the agents that report the port listening (`listening`
/// probes each such port on each of the agent's addresses). It asks the evaluation (first
/// matching rule in effective order) rather than scanning rules, so shadowed allows are not
/// reported and a JIT deny above them hides them. Grants are left out: a port open by a
/// grant is open *with* JIT, until it ends.
fn exposure(
    effective: &[rules::Rule],
    scope: &Scope,
    ports: &[(u16, Protocol, Option<IpAddr>)],
    listening: &[(u16, Protocol, IpAddr, String)],
) -> Vec<Exposure> {
    let probed = Probed::new(effective);
    let generic_destinations = destinations(effective, scope);
    let mut found: Vec<Exposure> = Vec::new();
    let probes = ports
        .iter()
        .flat_map(|(port, protocol, machine)| {
            let candidates: Vec<IpAddr> = match machine {
                Some(address) => vec![*address],
                None => generic_destinations.clone(),
            };
            candidates
                .into_iter()
                .map(move |destination| (*port, *protocol, destination, None))
        })
        .chain(
            listening
                .iter()
                .map(|(port, protocol, address, host)| (*port, *protocol, *address, Some(host))),
        );
    for (port, protocol, destination, host) in probes {
        {
            let (port, protocol) = (&port, &protocol);
            let Some(source) = internet_source(destination, scope) else {
                continue;
            };
            let packet = Packet {
                direction: Direction::Inbound,
                protocol: *protocol,
                source,
                source_port: 49152,
                destination,
                destination_port: *port,
            };
            let Some(rule) = probed
                .toward(destination)
                .map(|i| &effective[i])
                .find(|r| r.matches(&packet, scope))
            else {
                continue;
            };
            if rule.access != rules::Access::Allow {
                continue;
            }
            let exposure = Exposure {
                port: *port,
                protocol: convert::rule_protocol(*protocol),
                rule: rule.name.clone(),
                source: rule
                    .source_prefixes
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                listening_on: Vec::new(),
            };
            let same = |e: &Exposure| {
                (e.port, e.protocol, &e.rule, &e.source)
                    == (
                        exposure.port,
                        exposure.protocol,
                        &exposure.rule,
                        &exposure.source,
                    )
            };
            let index = match found.iter().position(same) {
                Some(index) => index,
                None => {
                    found.push(exposure);
                    found.len() - 1
                }
            };
            if let Some(host) = host {
                found[index].listening_on.push(host.clone());
            }
        }
    }
    for exposure in &mut found {
        exposure.listening_on.sort();
        exposure.listening_on.dedup();
        exposure.listening_on.truncate(MAX_LISTENING_HOSTS);
    }
    found
}

/// The effective rules an exposure probe can meet, as positions in effective order. An NSG
/// in front of 10,000 machines has 10,000 JIT denies, each aimed at one machine's address;
/// probing every machine against all of them would cost O(machines²). A rule aimed only at
/// single hosts can match only packets to those hosts, so it is kept with each host and
/// met by that host's probes alone, which decides exactly as the full scan would.
struct Probed {
    /// Rules that may match any destination (the users' rules, the defaults).
    base: Vec<usize>,
    /// Rules aimed only at single hosts, by host.
    by_host: HashMap<IpAddr, Vec<usize>>,
}

impl Probed {
    fn new(effective: &[rules::Rule]) -> Self {
        let mut probed = Self {
            base: Vec::new(),
            by_host: HashMap::new(),
        };
        for (i, rule) in effective.iter().enumerate() {
            if rule.jit && rule.access == rules::Access::Allow {
                continue;
            }
            let hosts: Option<Vec<IpAddr>> = rule
                .destination_prefixes
                .iter()
                .map(|p| match p {
                    AddressPrefix::Net(net) if net.prefix_len() == net.max_prefix_len() => {
                        Some(net.addr())
                    }
                    _ => None,
                })
                .collect();
            match hosts {
                Some(hosts) if !hosts.is_empty() => {
                    for host in hosts {
                        probed.by_host.entry(host).or_default().push(i);
                    }
                }
                _ => probed.base.push(i),
            }
        }
        probed
    }

    /// The positions of the rules a packet to `host` can meet, in effective order.
    fn toward(&self, host: IpAddr) -> impl Iterator<Item = usize> + '_ {
        let mut own = self
            .by_host
            .get(&host)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .copied()
            .peekable();
        let mut base = self.base.iter().copied().peekable();
        std::iter::from_fn(move || match (own.peek(), base.peek()) {
            (Some(a), Some(b)) if a < b => own.next(),
            (Some(_), None) => own.next(),
            _ => base.next(),
        })
    }
}

/// One address per place an inbound allow (a grant aside) could point at: each
/// virtual-network prefix and each concrete destination prefix, or the unspecified address
/// when there is none.
fn destinations(effective: &[rules::Rule], scope: &Scope) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = scope.virtual_network.iter().map(|n| n.network()).collect();
    for rule in effective
        .iter()
        .filter(|r| r.direction == Direction::Inbound && r.access == rules::Access::Allow && !r.jit)
    {
        for prefix in &rule.destination_prefixes {
            if let AddressPrefix::Net(net) = prefix {
                out.push(net.network());
            }
        }
    }
    if out.is_empty() {
        out.push(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Access, PortRange};

    fn report(agent: &str, generation: i64, error: Option<&str>) -> Arc<AgentReport> {
        let mut nsg = crate::api::nsg::empty("team", "web-nsg");
        nsg.metadata.uid = Some("nsg-uid".into());
        let entry = EnforcementReport {
            observed_generation: Some(generation),
            error: error.map(str::to_owned),
            ..crate::api::nsg::report_of(agent)
        };
        Arc::new(crate::agent::report::object(agent, &nsg, entry))
    }

    #[test]
    fn enforced_says_which_agents_fail_or_lag() {
        let none = enforced(&[], Some(3));
        assert_eq!((none.status, none.reason), (false, reason::NO_AGENTS));
        let synced = enforced(&[report("vm-1", 3, None), report("vm-2", 3, None)], Some(3));
        assert_eq!(
            (synced.status, synced.reason),
            (true, reason::AGENTS_IN_SYNC)
        );
        assert_eq!(synced.message, "2 agents enforce generation 3");
        let one = enforced(&[report("vm-1", 3, None)], Some(3));
        assert_eq!(one.message, "1 agent enforces generation 3");
        let behind = enforced(&[report("vm-1", 3, None), report("vm-2", 2, None)], Some(3));
        assert_eq!(
            (behind.status, behind.reason),
            (false, reason::AGENTS_BEHIND)
        );
        assert!(behind.message.contains("(vm-2)"), "{}", behind.message);
        // An error outranks lag, and names the agent and what it said.
        let failing = enforced(
            &[
                report("vm-1", 2, None),
                report("vm-2", 3, Some("nft: refused")),
            ],
            Some(3),
        );
        assert_eq!(
            (failing.status, failing.reason),
            (false, reason::AGENT_ERROR)
        );
        assert!(
            failing.message.ends_with("vm-2: nft: refused"),
            "{}",
            failing.message
        );
        let many: Vec<_> = (0..9)
            .map(|i| report(&format!("vm-{i}"), 1, None))
            .collect();
        let message = enforced(&many, Some(3)).message;
        assert!(message.contains("vm-4 and 4 more"), "{message}");
    }

    #[test]
    fn the_status_lists_failing_and_lagging_agents_first_and_a_bounded_number() {
        let mut reports: Vec<_> = (0..100)
            .map(|i| report(&format!("vm-{i:03}"), 3, None))
            .collect();
        reports.push(report("vm-zzz", 3, Some("nft: refused")));
        reports.push(report("vm-yyy", 2, None));
        let listed = listed_reports(&reports, Some(3));
        assert_eq!(listed.len(), MAX_LISTED_REPORTS);
        let agents: Vec<&str> = listed.iter().map(|r| r.agent.as_str()).collect();
        assert_eq!(agents[..3], ["vm-zzz", "vm-yyy", "vm-000"]);
        assert_eq!(listed_reports(&reports[..2], Some(3)).len(), 2);
    }

    fn rule(
        name: &str,
        priority: u32,
        access: Access,
        source: &str,
        port: &str,
        jit: bool,
    ) -> rules::Rule {
        rules::Rule {
            name: name.into(),
            priority,
            direction: Direction::Inbound,
            access,
            protocol: Protocol::Tcp,
            source_prefixes: vec![source.parse().unwrap()],
            source_ports: vec![PortRange::Any],
            destination_prefixes: vec![AddressPrefix::Any],
            destination_ports: vec![port.parse().unwrap()],
            origin: Origin::Inline,
            jit,
        }
    }

    fn scope() -> Scope {
        Scope {
            virtual_network: vec!["198.18.0.0/24".parse().unwrap()],
            load_balancer: vec![],
        }
    }

    #[test]
    fn reports_management_ports_open_to_the_internet() {
        let effective = rules::effective([
            rule("ssh-anywhere", 200, Access::Allow, "*", "22", false),
            rule(
                "rdp-internet",
                210,
                Access::Allow,
                "Internet",
                "3389",
                false,
            ),
            rule("http", 220, Access::Allow, "Internet", "80", false),
        ]);
        let ports = [
            (22, Protocol::Tcp, None),
            (3389, Protocol::Tcp, None),
            (5985, Protocol::Tcp, None),
        ];
        let found = exposure(&effective, &scope(), &ports, &[]);
        let shown: Vec<(u16, &str, &str)> = found
            .iter()
            .map(|e| (e.port, e.rule.as_str(), e.source.as_str()))
            .collect();
        assert_eq!(
            shown,
            vec![
                (22, "ssh-anywhere", "*"),
                (3389, "rdp-internet", "Internet")
            ]
        );
    }

    #[test]
    fn a_jit_deny_above_the_allow_hides_the_exposure() {
        let effective = rules::effective([
            rule("jit-deny", 150, Access::Deny, "*", "22", true),
            rule("ssh-anywhere", 200, Access::Allow, "*", "22", false),
        ]);
        assert!(exposure(&effective, &scope(), &[(22, Protocol::Tcp, None)], &[]).is_empty());
    }

    fn aimed(mut rule: rules::Rule, host: &str) -> rules::Rule {
        rule.destination_prefixes = vec![host.parse().unwrap()];
        rule
    }

    #[test]
    fn host_rules_decide_only_probes_to_their_host() {
        let effective = rules::effective([
            // vm-1's JIT deny hides the user's allow to it; vm-2 has no deny.
            aimed(
                rule("deny-vm-1", 150, Access::Deny, "*", "22", true),
                "198.18.0.1",
            ),
            aimed(
                rule("ssh-vm-1", 200, Access::Allow, "Internet", "22", false),
                "198.18.0.1",
            ),
            aimed(
                rule("ssh-vm-2", 210, Access::Allow, "Internet", "22", false),
                "198.18.0.2",
            ),
            // A grant open to everyone is access with JIT, not exposure.
            aimed(
                rule("grant", 100, Access::Allow, "*", "3389", true),
                "198.18.0.3",
            ),
        ]);
        let machine = |last: &str| Some(format!("198.18.0.{last}").parse().unwrap());
        let ports = [
            (22, Protocol::Tcp, machine("1")),
            (3389, Protocol::Tcp, machine("3")),
        ];
        assert!(exposure(&effective, &scope(), &ports, &[]).is_empty());
        let ports = [(22, Protocol::Tcp, None)];
        let found = exposure(&effective, &scope(), &ports, &[]);
        let rules: Vec<&str> = found.iter().map(|e| e.rule.as_str()).collect();
        assert_eq!(rules, vec!["ssh-vm-2"]);
        // Every probe decides as the scan of all rules but grants would.
        let without_grants: Vec<rules::Rule> = effective
            .iter()
            .filter(|r| !(r.jit && r.access == Access::Allow))
            .cloned()
            .collect();
        let probed = Probed::new(&effective);
        for host in ["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.0"] {
            for port in [22, 3389, 80] {
                let packet = Packet {
                    direction: Direction::Inbound,
                    protocol: Protocol::Tcp,
                    source: "203.0.113.1".parse().unwrap(),
                    source_port: 49152,
                    destination: host.parse().unwrap(),
                    destination_port: port,
                };
                let scanned = rules::evaluate(&without_grants, &packet, &scope()).rule;
                let met = probed
                    .toward(packet.destination)
                    .map(|i| &effective[i])
                    .find(|r| r.matches(&packet, &scope()))
                    .map(|r| r.name.clone());
                assert_eq!(met, Some(scanned), "{host}:{port}");
            }
        }
    }

    #[test]
    fn grants_are_counted_and_denies_listed_until_there_are_too_many() {
        let deny = |i: u32| {
            aimed(
                rule(&format!("deny-{i}"), 150, Access::Deny, "*", "22", true),
                &format!("198.18.{}.{}", i / 250, i % 250 + 1),
            )
        };
        let user = rule("http", 300, Access::Allow, "Internet", "80", false);
        let grant = rule("grant", 100, Access::Allow, "198.19.0.1", "22", true);
        let few: Vec<rules::Rule> = (0..MAX_LISTED_DENIES as u32)
            .map(deny)
            .chain([user.clone(), grant.clone()])
            .collect();
        let effective = rules::effective(few);
        let names: Vec<&str> = listed(&effective, jit_denies(&effective))
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert!(names.contains(&"deny-0") && names.contains(&"http"));
        assert!(!names.contains(&"grant"));
        assert_eq!(
            names.len(),
            MAX_LISTED_DENIES + 1 + rules::default_rules().len()
        );
        let many: Vec<rules::Rule> = (0..=MAX_LISTED_DENIES as u32)
            .map(deny)
            .chain([user, grant])
            .collect();
        let effective = rules::effective(many);
        let names: Vec<&str> = listed(&effective, jit_denies(&effective))
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names.len(), 1 + rules::default_rules().len());
        assert!(names.contains(&"http"));
    }

    #[test]
    fn vnet_only_access_is_not_exposure() {
        let effective = rules::effective([rule(
            "ssh-vnet",
            200,
            Access::Allow,
            "VirtualNetwork",
            "22",
            false,
        )]);
        assert!(exposure(&effective, &scope(), &[(22, Protocol::Tcp, None)], &[]).is_empty());
    }

    #[test]
    fn listening_ports_reachable_from_the_internet_name_their_hosts() {
        let effective = rules::effective([
            rule("web-admin", 200, Access::Allow, "*", "8443", false),
            rule("ssh-anywhere", 210, Access::Allow, "Internet", "22", false),
        ]);
        let at = |address: &str| address.parse::<IpAddr>().unwrap();
        let listening = [
            (8443, Protocol::Tcp, at("198.18.0.10"), "vm-a".to_owned()),
            (8443, Protocol::Tcp, at("2001:2::10"), "vm-a".to_owned()),
            (8443, Protocol::Tcp, at("198.18.0.11"), "vm-b".to_owned()),
            // Only the port the rule opens: 9000 is served but closed by DenyAllInBound.
            (9000, Protocol::Tcp, at("198.18.0.10"), "vm-a".to_owned()),
        ];
        let found = exposure(
            &effective,
            &scope(),
            &[(22, Protocol::Tcp, None)],
            &listening,
        );
        let summary: Vec<(u16, &str, Vec<&str>)> = found
            .iter()
            .map(|e| {
                (
                    e.port,
                    e.rule.as_str(),
                    e.listening_on.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (22, "ssh-anywhere", vec![]),
                (8443, "web-admin", vec!["vm-a", "vm-b"]),
            ]
        );
    }
}
