//! The effective rule view and the evaluation oracle.
//!
//! [`evaluate`] is the single definition of NSG semantics in the project:
//! status reporting uses it and the nftables agent is differentially tested
//! against it, so it is kept as a plain first-match scan.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::model::{Access, Direction, Origin, Packet, Protocol, Rule};
use super::ports::PortRange;
use super::prefix::{AddressPrefix, Scope};

/// The outcome of evaluating one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the packet passes.
    pub access: Access,
    /// Name of the deciding rule, so a verdict can be explained; empty when
    /// no rule matched.
    pub rule: String,
}

/// Rules of one direction sharing one priority, which makes the verdict
/// depend on an arbitrary tie-break; reported as a condition so users fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// Direction shared by the rules.
    pub direction: Direction,
    /// Priority shared by the rules.
    pub priority: u32,
    /// Names of the clashing rules, sorted.
    pub rules: Vec<String>,
}

fn default_rule(
    name: &str,
    priority: u32,
    direction: Direction,
    access: Access,
    source: AddressPrefix,
    destination: AddressPrefix,
) -> Rule {
    Rule {
        name: name.to_owned(),
        priority,
        direction,
        access,
        protocol: Protocol::Any,
        source_prefixes: vec![source],
        source_ports: vec![PortRange::Any],
        destination_prefixes: vec![destination],
        destination_ports: vec![PortRange::Any],
        origin: Origin::Default,
        jit: false,
    }
}

/// Azure's built-in rules, present in every NSG below all user rules: inside
/// the virtual network and from the load balancer everything is allowed,
/// outbound Internet is allowed, everything else is denied.
pub fn default_rules() -> Vec<Rule> {
    use AddressPrefix::{Any, AzureLoadBalancer, Internet, VirtualNetwork};
    use Direction::{Inbound, Outbound};
    vec![
        default_rule(
            "AllowVnetInBound",
            65000,
            Inbound,
            Access::Allow,
            VirtualNetwork,
            VirtualNetwork,
        ),
        default_rule(
            "AllowLoadBalancerInBound",
            65001,
            Inbound,
            Access::Allow,
            AzureLoadBalancer,
            Any,
        ),
        default_rule("DenyAllInBound", 65500, Inbound, Access::Deny, Any, Any),
        default_rule(
            "AllowVnetOutBound",
            65000,
            Outbound,
            Access::Allow,
            VirtualNetwork,
            VirtualNetwork,
        ),
        default_rule(
            "AllowInternetOutBound",
            65001,
            Outbound,
            Access::Allow,
            Any,
            Internet,
        ),
        default_rule("DenyAllOutBound", 65500, Outbound, Access::Deny, Any, Any),
    ]
}

/// Rank used to order rules that share a priority (a conflict anyway), so
/// the effective view is deterministic whatever order objects were listed.
fn origin_rank(origin: &Origin) -> u8 {
    match origin {
        Origin::Inline => 0,
        Origin::SecurityRule { .. } => 1,
        Origin::Default => 2,
    }
}

fn effective_order(a: &Rule, b: &Rule) -> Ordering {
    a.direction
        .cmp(&b.direction)
        .then(a.priority.cmp(&b.priority))
        .then(origin_rank(&a.origin).cmp(&origin_rank(&b.origin)))
        .then_with(|| a.name.cmp(&b.name))
}

/// The effective view: `rules` plus the defaults, inbound first, then by
/// priority, origin (inline, SecurityRule, default) and name. This order is
/// what [`evaluate`] scans, and what status shows.
pub fn effective(rules: impl IntoIterator<Item = Rule>) -> Vec<Rule> {
    let mut all: Vec<Rule> = rules.into_iter().chain(default_rules()).collect();
    all.sort_by(effective_order);
    all
}

/// Decides `packet`: the first rule of `effective` (in slice order) that
/// matches it wins. `effective` must come from [`effective`], which orders
/// rules by priority. If nothing matches, which cannot happen when the
/// defaults are present, the packet is denied with an empty rule name, so
/// the function is total and fails closed.
pub fn evaluate(effective: &[Rule], packet: &Packet, scope: &Scope) -> Verdict {
    match effective.iter().find(|r| r.matches(packet, scope)) {
        Some(rule) => Verdict {
            access: rule.access,
            rule: rule.name.clone(),
        },
        None => Verdict {
            access: Access::Deny,
            rule: String::new(),
        },
    }
}

/// Groups of two or more rules with the same direction and priority, ordered
/// by direction then priority. Groups made only of JIT rules with the same
/// access are not conflicts: grants share the allow priority and several
/// machines' denies may share one, and their order cannot change a verdict.
pub fn conflicts(rules: &[Rule]) -> Vec<Conflict> {
    let mut groups: BTreeMap<(Direction, u32), Vec<&Rule>> = BTreeMap::new();
    for rule in rules {
        groups
            .entry((rule.direction, rule.priority))
            .or_default()
            .push(rule);
    }
    groups
        .into_iter()
        .filter(|(_, group)| group.len() >= 2)
        .filter(|(_, group)| {
            let first = group[0].access;
            !group.iter().all(|r| r.jit && r.access == first)
        })
        .map(|((direction, priority), group)| {
            let mut names: Vec<String> = group.iter().map(|r| r.name.clone()).collect();
            names.sort();
            Conflict {
                direction,
                priority,
                rules: names,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn scope() -> Scope {
        Scope {
            virtual_network: vec!["10.0.0.0/16".parse().unwrap()],
            load_balancer: vec!["168.63.129.16/32".parse().unwrap()],
        }
    }

    fn rule(name: &str, priority: u32, access: Access, source: &str, port: &str) -> Rule {
        Rule {
            name: name.into(),
            priority,
            direction: Direction::Inbound,
            access,
            protocol: Protocol::Tcp,
            source_prefixes: vec![source.parse().unwrap()],
            source_ports: vec![PortRange::Any],
            destination_prefixes: vec!["10.0.0.4".parse().unwrap()],
            destination_ports: vec![port.parse().unwrap()],
            origin: Origin::Inline,
            jit: false,
        }
    }

    fn packet(direction: Direction, source: &str, destination: &str, port: u16) -> Packet {
        Packet {
            direction,
            protocol: Protocol::Tcp,
            source: source.parse::<IpAddr>().unwrap(),
            source_port: 50000,
            destination: destination.parse::<IpAddr>().unwrap(),
            destination_port: port,
        }
    }

    fn verdict(access: Access, rule: &str) -> Verdict {
        Verdict {
            access,
            rule: rule.into(),
        }
    }

    #[test]
    fn default_rules_are_azures() {
        let summary: Vec<(String, u32, Direction, Access, String, String)> = default_rules()
            .into_iter()
            .map(|r| {
                assert_eq!(r.origin, Origin::Default);
                assert_eq!(r.protocol, Protocol::Any);
                assert!(!r.jit);
                (
                    r.name,
                    r.priority,
                    r.direction,
                    r.access,
                    r.source_prefixes[0].to_string(),
                    r.destination_prefixes[0].to_string(),
                )
            })
            .collect();
        let s = |x: &str| x.to_owned();
        use Access::{Allow, Deny};
        use Direction::{Inbound, Outbound};
        assert_eq!(
            summary,
            vec![
                (
                    s("AllowVnetInBound"),
                    65000,
                    Inbound,
                    Allow,
                    s("VirtualNetwork"),
                    s("VirtualNetwork")
                ),
                (
                    s("AllowLoadBalancerInBound"),
                    65001,
                    Inbound,
                    Allow,
                    s("AzureLoadBalancer"),
                    s("*")
                ),
                (s("DenyAllInBound"), 65500, Inbound, Deny, s("*"), s("*")),
                (
                    s("AllowVnetOutBound"),
                    65000,
                    Outbound,
                    Allow,
                    s("VirtualNetwork"),
                    s("VirtualNetwork")
                ),
                (
                    s("AllowInternetOutBound"),
                    65001,
                    Outbound,
                    Allow,
                    s("*"),
                    s("Internet")
                ),
                (s("DenyAllOutBound"), 65500, Outbound, Deny, s("*"), s("*")),
            ]
        );
    }

    #[test]
    fn effective_sorts_deterministically() {
        let mut out = rule("z-out", 100, Access::Allow, "*", "80");
        out.direction = Direction::Outbound;
        let mut object = rule("a-object", 200, Access::Deny, "*", "22");
        object.origin = Origin::SecurityRule {
            name: "a-object".into(),
        };
        let inline_b = rule("b-inline", 200, Access::Allow, "*", "22");
        let inline_c = rule("c-inline", 200, Access::Allow, "*", "22");
        let low = rule("low", 4096, Access::Allow, "*", "22");
        let input = vec![low, out, object, inline_c, inline_b];
        let names = |rules: Vec<Rule>| rules.into_iter().map(|r| r.name).collect::<Vec<_>>();
        let want = vec![
            "b-inline",
            "c-inline",
            "a-object",
            "low",
            "AllowVnetInBound",
            "AllowLoadBalancerInBound",
            "DenyAllInBound",
            "z-out",
            "AllowVnetOutBound",
            "AllowInternetOutBound",
            "DenyAllOutBound",
        ];
        assert_eq!(names(effective(input.clone())), want);
        let mut reversed = input;
        reversed.reverse();
        assert_eq!(names(effective(reversed)), want);
    }

    #[test]
    fn defaults_decide_when_no_user_rule_matches() {
        let rules = effective([]);
        let s = scope();
        let cases = [
            (
                packet(Direction::Inbound, "10.0.1.1", "10.0.0.4", 22),
                verdict(Access::Allow, "AllowVnetInBound"),
            ),
            (
                packet(Direction::Inbound, "203.0.113.9", "10.0.0.4", 22),
                verdict(Access::Deny, "DenyAllInBound"),
            ),
            (
                packet(Direction::Inbound, "168.63.129.16", "10.0.0.4", 80),
                verdict(Access::Allow, "AllowLoadBalancerInBound"),
            ),
            (
                packet(Direction::Outbound, "10.0.0.4", "10.0.2.2", 443),
                verdict(Access::Allow, "AllowVnetOutBound"),
            ),
            (
                packet(Direction::Outbound, "10.0.0.4", "198.51.100.1", 443),
                verdict(Access::Allow, "AllowInternetOutBound"),
            ),
        ];
        for (p, want) in cases {
            assert_eq!(evaluate(&rules, &p, &s), want, "{p:?}");
        }
    }

    #[test]
    fn outbound_to_non_vnet_is_denied_without_internet_default() {
        let rules: Vec<Rule> = effective([])
            .into_iter()
            .filter(|r| r.name != "AllowInternetOutBound")
            .collect();
        let p = packet(Direction::Outbound, "10.0.0.4", "198.51.100.1", 443);
        assert_eq!(
            evaluate(&rules, &p, &scope()),
            verdict(Access::Deny, "DenyAllOutBound")
        );
    }

    #[test]
    fn first_match_by_priority_wins() {
        let s = scope();
        let internet_ssh = packet(Direction::Inbound, "203.0.113.9", "10.0.0.4", 22);
        let vnet_ssh = packet(Direction::Inbound, "10.0.5.5", "10.0.0.4", 22);

        let rules = effective([
            rule("allow-ssh", 300, Access::Allow, "Internet", "22"),
            rule("deny-ssh", 200, Access::Deny, "*", "22"),
        ]);
        assert_eq!(
            evaluate(&rules, &internet_ssh, &s),
            verdict(Access::Deny, "deny-ssh")
        );
        assert_eq!(
            evaluate(&rules, &vnet_ssh, &s),
            verdict(Access::Deny, "deny-ssh")
        );

        let rules = effective([
            rule("allow-ssh", 100, Access::Allow, "Internet", "22"),
            rule("deny-ssh", 200, Access::Deny, "*", "22"),
        ]);
        assert_eq!(
            evaluate(&rules, &internet_ssh, &s),
            verdict(Access::Allow, "allow-ssh")
        );
        assert_eq!(
            evaluate(&rules, &vnet_ssh, &s),
            verdict(Access::Deny, "deny-ssh")
        );

        let http = packet(Direction::Inbound, "203.0.113.9", "10.0.0.4", 80);
        assert_eq!(
            evaluate(&rules, &http, &s),
            verdict(Access::Deny, "DenyAllInBound")
        );
    }

    #[test]
    fn user_deny_beats_vnet_default() {
        let rules = effective([rule(
            "deny-vnet-ssh",
            4096,
            Access::Deny,
            "VirtualNetwork",
            "22",
        )]);
        let p = packet(Direction::Inbound, "10.0.5.5", "10.0.0.4", 22);
        assert_eq!(
            evaluate(&rules, &p, &scope()),
            verdict(Access::Deny, "deny-vnet-ssh")
        );
        let other = packet(Direction::Inbound, "10.0.5.5", "10.0.0.4", 23);
        assert_eq!(
            evaluate(&rules, &other, &scope()),
            verdict(Access::Allow, "AllowVnetInBound")
        );
    }

    #[test]
    fn inbound_rules_do_not_decide_outbound_packets() {
        let rules = effective([rule("allow-all", 100, Access::Allow, "*", "*")]);
        let mut p = packet(Direction::Outbound, "10.0.0.4", "10.0.0.4", 22);
        p.source = "10.0.0.4".parse().unwrap();
        assert_eq!(
            evaluate(&rules, &p, &scope()),
            verdict(Access::Allow, "AllowVnetOutBound")
        );
    }

    #[test]
    fn no_rules_at_all_fails_closed() {
        let p = packet(Direction::Inbound, "10.0.1.1", "10.0.0.4", 22);
        assert_eq!(evaluate(&[], &p, &scope()), verdict(Access::Deny, ""));
    }

    #[test]
    fn conflicts_group_same_direction_and_priority() {
        let mut outbound = rule("out", 200, Access::Deny, "*", "22");
        outbound.direction = Direction::Outbound;
        let rules = vec![
            rule("b", 200, Access::Allow, "*", "22"),
            rule("a", 200, Access::Deny, "*", "22"),
            rule("alone", 300, Access::Deny, "*", "22"),
            outbound,
            rule("c", 150, Access::Allow, "*", "80"),
            rule("d", 150, Access::Allow, "*", "81"),
            rule("e", 150, Access::Allow, "*", "82"),
        ];
        assert_eq!(
            conflicts(&rules),
            vec![
                Conflict {
                    direction: Direction::Inbound,
                    priority: 150,
                    rules: vec!["c".into(), "d".into(), "e".into()],
                },
                Conflict {
                    direction: Direction::Inbound,
                    priority: 200,
                    rules: vec!["a".into(), "b".into()],
                },
            ]
        );
    }

    #[test]
    fn jit_rules_with_same_access_do_not_conflict() {
        let jit = |name: &str, priority, access| Rule {
            jit: true,
            ..rule(name, priority, access, "*", "22")
        };
        let rules = vec![
            jit("grant-1", 100, Access::Allow),
            jit("grant-2", 100, Access::Allow),
            jit("deny-vm1", 101, Access::Deny),
            jit("deny-vm2", 101, Access::Deny),
            jit("mixed-allow", 102, Access::Allow),
            jit("mixed-deny", 102, Access::Deny),
            jit("jit-allow", 103, Access::Allow),
            rule("user", 103, Access::Allow, "*", "22"),
        ];
        assert_eq!(
            conflicts(&rules),
            vec![
                Conflict {
                    direction: Direction::Inbound,
                    priority: 102,
                    rules: vec!["mixed-allow".into(), "mixed-deny".into()],
                },
                Conflict {
                    direction: Direction::Inbound,
                    priority: 103,
                    rules: vec!["jit-allow".into(), "user".into()],
                },
            ]
        );
    }

    #[test]
    fn defaults_do_not_conflict() {
        assert_eq!(conflicts(&effective([])), vec![]);
    }
}
