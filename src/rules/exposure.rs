//! User rules that undo a JIT deny.
//!
//! Placement puts a machine's deny just below the user rules that already govern its JIT
//! ports, so that users keep precedence. The price: a user's allow above the deny (`Allow
//! TCP 22 from Internet` at priority 100) keeps the port open to whoever it names, and the
//! deny protects nothing from them. This module finds those rules, so the policy can say the
//! machine is exposed rather than protected.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::model::{Access, Direction, Origin, Protocol, Rule};
use super::prefix::{AddressPrefix, Scope, any_covers};

/// One JIT port of a machine and who the policy lets request it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtectedPort {
    /// The destination port.
    pub number: u16,
    /// [`Protocol::Tcp`], [`Protocol::Udp`] or [`Protocol::Any`].
    pub protocol: Protocol,
    /// The sources a request may name; a source outside them never gets in through JIT, so
    /// a user rule letting it in is what exposure means. `*` allows every source.
    pub allowed_sources: Vec<AddressPrefix>,
}

/// A user rule above the JIT deny that opens a protected port to sources the policy does
/// not allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposure<'a> {
    /// The user's rule.
    pub rule: &'a Rule,
    /// The protected port it opens.
    pub port: u16,
    /// The protocol both the rule and the port cover (`*` when both are `*`).
    pub protocol: Protocol,
    /// The rule's sources that are not within the port's allowed sources.
    pub sources: Vec<AddressPrefix>,
}

/// The rules among `user_rules` that expose a `ports` entry of the machine at `address`
/// despite its deny at `deny_priority`: inbound allows above the deny (lower number) whose
/// destination covers the address, whose destination ports and protocol include the port,
/// and whose sources are not all within the port's allowed sources. Sorted by priority, then
/// rule name, then port order, so that a status built from it only changes when they do.
///
/// It judges each rule on its own: a user deny above an allow is not subtracted from the
/// allow's sources, so an allow that such a deny shadows completely is still reported. The
/// error is on the side of saying "exposed", never of hiding an exposure.
pub fn exposures<'a>(
    user_rules: &'a [Rule],
    scope: &Scope,
    address: IpAddr,
    deny_priority: u32,
    ports: &[ProtectedPort],
) -> Vec<Exposure<'a>> {
    let mut above: Vec<&Rule> = user_rules
        .iter()
        .filter(|r| {
            !r.jit
                && r.direction == Direction::Inbound
                && r.access == Access::Allow
                && r.priority < deny_priority
                && !r.source_ports.is_empty()
                && r.destination_prefixes
                    .iter()
                    .any(|p| p.matches(address, scope))
        })
        .collect();
    above.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));

    let mut found = Vec::new();
    for rule in above {
        for port in ports {
            let Some(protocol) = shared_protocol(rule.protocol, port.protocol) else {
                continue;
            };
            if !rule
                .destination_ports
                .iter()
                .any(|r| r.contains(port.number))
            {
                continue;
            }
            let allowed = merged(&port.allowed_sources);
            let sources: Vec<AddressPrefix> = rule
                .source_prefixes
                .iter()
                .filter(|s| !within(s, &allowed, scope))
                .cloned()
                .collect();
            if !sources.is_empty() {
                found.push(Exposure {
                    rule,
                    port: port.number,
                    protocol,
                    sources,
                });
            }
        }
    }
    found
}

/// The traffic a rule and a JIT port both cover, if any. ICMP has no ports, so an ICMP
/// rule opens no JIT port (and a JIT port is never ICMP).
fn shared_protocol(rule: Protocol, port: Protocol) -> Option<Protocol> {
    match (rule, port) {
        (Protocol::Icmp, _) | (_, Protocol::Icmp) => None,
        (Protocol::Any, p) | (p, Protocol::Any) => Some(p),
        (a, b) => (a == b).then_some(a),
    }
}

/// The allowed sources with adjacent explicit networks aggregated, so that two allowed
/// /25s are seen to cover the /24 a rule names ([`any_covers`] asks one prefix alone).
fn merged(allowed: &[AddressPrefix]) -> Vec<AddressPrefix> {
    let nets: Vec<IpNet> = allowed
        .iter()
        .filter_map(|p| match p {
            AddressPrefix::Net(n) => Some(*n),
            _ => None,
        })
        .collect();
    allowed
        .iter()
        .filter(|p| !matches!(p, AddressPrefix::Net(_)))
        .cloned()
        .chain(IpNet::aggregate(&nets).into_iter().map(AddressPrefix::Net))
        .collect()
}

/// Every IPv4 and every IPv6 address.
const EVERYWHERE: [IpNet; 2] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0)),
];

/// Whether every address `source` stands for is within `allowed`. Tags resolve through
/// `scope`: `VirtualNetwork` is its prefixes (none: it admits nobody, so it is within
/// anything). `Internet` is within the same tag, or within what covers every address: its
/// exact extent (all but the virtual network) is not a list of prefixes, and reading it as
/// everything can only report an exposure too many.
fn within(source: &AddressPrefix, allowed: &[AddressPrefix], scope: &Scope) -> bool {
    let nets: Vec<IpNet> = match source {
        AddressPrefix::Net(n) => vec![*n],
        AddressPrefix::VirtualNetwork => scope.virtual_network.clone(),
        AddressPrefix::AzureLoadBalancer => scope.load_balancer.clone(),
        AddressPrefix::Any | AddressPrefix::Internet => EVERYWHERE.to_vec(),
    };
    allowed.contains(source) || nets.iter().all(|n| any_covers(allowed, n, scope))
}

/// What a person reads in the policy status: the port, who it is open to, and the rule to
/// edit, e.g. `port 22/Tcp is open to Internet by NSG rule "allow-ssh" (priority 100)`.
impl fmt::Display for Exposure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.rule.origin {
            Origin::Inline => "NSG rule",
            Origin::SecurityRule { .. } => "SecurityRule",
            Origin::Default => "default rule",
        };
        let sources: Vec<String> = self.sources.iter().map(ToString::to_string).collect();
        write!(
            f,
            "port {}/{} is open to {} by {kind} {:?} (priority {})",
            self.port,
            self.protocol,
            sources.join(","),
            self.rule.name,
            self.rule.priority
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::ports::PortRange;
    use super::*;

    const VM: &str = "198.18.0.10";
    const DENY: u32 = 101;

    fn scope() -> Scope {
        Scope {
            virtual_network: vec!["198.18.0.0/24".parse().unwrap()],
            load_balancer: vec![],
        }
    }

    fn allow(priority: u32, protocol: Protocol, sources: &[&str], port: &str) -> Rule {
        Rule {
            name: format!("user-{priority}"),
            priority,
            direction: Direction::Inbound,
            access: Access::Allow,
            protocol,
            source_prefixes: sources.iter().map(|s| s.parse().unwrap()).collect(),
            source_ports: vec![PortRange::Any],
            destination_prefixes: vec![VM.parse().unwrap()],
            destination_ports: vec![port.parse().unwrap()],
            origin: Origin::Inline,
            jit: false,
        }
    }

    fn ssh_from(sources: &[&str]) -> Rule {
        allow(100, Protocol::Tcp, sources, "22")
    }

    fn port(number: u16, protocol: Protocol, allowed: &[&str]) -> ProtectedPort {
        ProtectedPort {
            number,
            protocol,
            allowed_sources: allowed.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    /// SSH allowed from 198.19.0.0/16 only.
    fn ssh_policy() -> Vec<ProtectedPort> {
        vec![port(22, Protocol::Tcp, &["198.19.0.0/16"])]
    }

    fn found(rules: &[Rule], ports: &[ProtectedPort]) -> Vec<(String, u16, Protocol, String)> {
        exposures(rules, &scope(), VM.parse().unwrap(), DENY, ports)
            .iter()
            .map(|e| {
                let sources: Vec<String> = e.sources.iter().map(ToString::to_string).collect();
                (e.rule.name.clone(), e.port, e.protocol, sources.join(","))
            })
            .collect()
    }

    fn exposed(rule: Rule, ports: &[ProtectedPort]) -> bool {
        !found(&[rule], ports).is_empty()
    }

    #[test]
    fn a_rule_from_the_internet_exposes_the_port() {
        let rules = [ssh_from(&["Internet"])];
        assert_eq!(
            found(&rules, &ssh_policy()),
            vec![("user-100".into(), 22, Protocol::Tcp, "Internet".into())]
        );
        let all = exposures(&rules, &scope(), VM.parse().unwrap(), DENY, &ssh_policy());
        assert_eq!(
            all[0].to_string(),
            "port 22/Tcp is open to Internet by NSG rule \"user-100\" (priority 100)"
        );
    }

    #[test]
    fn a_rule_from_anywhere_or_a_wider_network_exposes_the_port() {
        assert!(exposed(ssh_from(&["*"]), &ssh_policy()));
        assert!(exposed(ssh_from(&["198.19.0.0/15"]), &ssh_policy()));
        assert!(exposed(ssh_from(&["203.0.113.7"]), &ssh_policy()));
        // A bastion in the virtual network is a source the policy does not allow either.
        assert!(exposed(ssh_from(&["VirtualNetwork"]), &ssh_policy()));
    }

    #[test]
    fn a_rule_from_exactly_an_allowed_network_does_not_expose() {
        assert!(!exposed(ssh_from(&["198.19.0.0/16"]), &ssh_policy()));
        assert!(!exposed(ssh_from(&["198.19.0.0/24"]), &ssh_policy()));
        assert!(!exposed(ssh_from(&["198.19.7.7"]), &ssh_policy()));
    }

    #[test]
    fn only_the_sources_outside_the_policy_are_named() {
        let rules = [ssh_from(&["198.19.0.0/24", "Internet", "198.20.0.1"])];
        assert_eq!(
            found(&rules, &ssh_policy()),
            vec![(
                "user-100".into(),
                22,
                Protocol::Tcp,
                "Internet,198.20.0.1".into()
            )]
        );
    }

    #[test]
    fn a_rule_below_the_deny_does_not_expose() {
        assert!(!exposed(
            allow(DENY + 1, Protocol::Tcp, &["Internet"], "22"),
            &ssh_policy()
        ));
        assert!(exposed(
            allow(DENY - 1, Protocol::Tcp, &["Internet"], "22"),
            &ssh_policy()
        ));
    }

    #[test]
    fn a_deny_an_outbound_or_a_jit_rule_does_not_expose() {
        let deny = Rule {
            access: Access::Deny,
            ..ssh_from(&["Internet"])
        };
        let outbound = Rule {
            direction: Direction::Outbound,
            ..ssh_from(&["Internet"])
        };
        let jit = Rule {
            jit: true,
            ..ssh_from(&["Internet"])
        };
        for rule in [deny, outbound, jit] {
            assert!(!exposed(rule, &ssh_policy()));
        }
    }

    #[test]
    fn another_port_protocol_or_address_does_not_expose() {
        assert!(!exposed(
            allow(100, Protocol::Tcp, &["*"], "23-3388"),
            &ssh_policy()
        ));
        assert!(!exposed(
            allow(100, Protocol::Udp, &["*"], "22"),
            &ssh_policy()
        ));
        assert!(!exposed(
            allow(100, Protocol::Icmp, &["*"], "*"),
            &[port(22, Protocol::Any, &["198.19.0.0/16"])]
        ));
        let elsewhere = Rule {
            destination_prefixes: vec!["198.18.0.11".parse().unwrap()],
            ..ssh_from(&["*"])
        };
        assert!(!exposed(elsewhere, &ssh_policy()));
        let no_source_port = Rule {
            source_ports: vec![],
            ..ssh_from(&["*"])
        };
        assert!(!exposed(no_source_port, &ssh_policy()));
    }

    #[test]
    fn broad_rules_cover_the_port() {
        let everything = allow(100, Protocol::Any, &["*"], "*");
        assert_eq!(
            found(&[everything], &ssh_policy()),
            vec![("user-100".into(), 22, Protocol::Tcp, "*".into())]
        );
        let to_the_vnet = Rule {
            destination_prefixes: vec!["VirtualNetwork".parse().unwrap()],
            ..allow(100, Protocol::Tcp, &["Internet"], "20-30")
        };
        assert!(exposed(to_the_vnet, &ssh_policy()));
        let udp_and_tcp = [port(53, Protocol::Any, &["198.19.0.0/16"])];
        assert_eq!(
            found(&[allow(100, Protocol::Udp, &["*"], "53")], &udp_and_tcp),
            vec![("user-100".into(), 53, Protocol::Udp, "*".into())]
        );
    }

    #[test]
    fn a_star_policy_source_allows_every_rule_source() {
        let open = [port(22, Protocol::Tcp, &["*"])];
        for source in ["*", "Internet", "VirtualNetwork", "203.0.113.7", "::/0"] {
            assert!(!exposed(ssh_from(&[source]), &open), "{source}");
        }
    }

    #[test]
    fn tags_resolve_through_the_scope() {
        let vnet_allowed = [port(22, Protocol::Tcp, &["198.18.0.0/16"])];
        assert!(!exposed(ssh_from(&["VirtualNetwork"]), &vnet_allowed));
        assert!(exposed(ssh_from(&["Internet"]), &vnet_allowed));
        // Every address of both families is what Internet can reach at most.
        let everywhere = [port(22, Protocol::Tcp, &["0.0.0.0/0", "::/0"])];
        assert!(!exposed(ssh_from(&["Internet"]), &everywhere));
        assert!(!exposed(ssh_from(&["*"]), &everywhere));
        let v4_only = [port(22, Protocol::Tcp, &["0.0.0.0/0"])];
        assert!(exposed(ssh_from(&["*"]), &v4_only));
        // No load balancer prefixes: the tag admits nobody.
        assert!(!exposed(ssh_from(&["AzureLoadBalancer"]), &ssh_policy()));
    }

    #[test]
    fn adjacent_allowed_networks_cover_the_network_they_form() {
        let halves = [port(
            22,
            Protocol::Tcp,
            &["198.19.0.0/25", "198.19.0.128/25"],
        )];
        assert!(!exposed(ssh_from(&["198.19.0.0/24"]), &halves));
        assert!(exposed(ssh_from(&["198.19.0.0/23"]), &halves));
    }

    #[test]
    fn exposures_come_in_priority_then_name_order() {
        let rules = [
            allow(300, Protocol::Tcp, &["*"], "22"),
            Rule {
                name: "b".into(),
                ..allow(200, Protocol::Tcp, &["*"], "*")
            },
            Rule {
                name: "a".into(),
                ..allow(200, Protocol::Tcp, &["*"], "3389")
            },
        ];
        let ports = [
            port(22, Protocol::Tcp, &["198.19.0.0/16"]),
            port(3389, Protocol::Tcp, &["198.19.0.0/16"]),
        ];
        let order: Vec<(String, u16)> =
            exposures(&rules, &scope(), VM.parse().unwrap(), 400, &ports)
                .iter()
                .map(|e| (e.rule.name.clone(), e.port))
                .collect();
        assert_eq!(
            order,
            vec![
                ("a".into(), 3389),
                ("b".into(), 22),
                ("b".into(), 3389),
                ("user-300".into(), 22)
            ]
        );
    }
}
