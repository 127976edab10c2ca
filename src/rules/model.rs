//! Plain NSG rule data, independent of how rules are stored (inline in an
//! NSG spec, as SecurityRule objects, or built in defaults), plus the one
//! definition of when a rule matches a packet.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::ports::PortRange;
use super::prefix::{AddressPrefix, Scope};

/// Why a string is not a valid enum field value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The value is not one of the accepted spellings; Azure spellings are
    /// case-sensitive, and the message lists them so the fix is obvious.
    #[error("invalid {field} {value:?}: expected one of {expected}")]
    Invalid {
        /// Which kind of field was being parsed (`direction`, ...).
        field: &'static str,
        /// The rejected input, verbatim.
        value: String,
        /// The accepted spellings.
        expected: &'static str,
    },
}

fn invalid(field: &'static str, value: &str, expected: &'static str) -> ModelError {
    ModelError::Invalid {
        field,
        value: value.to_owned(),
        expected,
    }
}

/// Which traffic a rule governs, seen from the protected machines. Ordered
/// Inbound first because the effective view lists inbound rules first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic arriving at the machines.
    Inbound,
    /// Traffic leaving the machines.
    Outbound,
}

impl FromStr for Direction {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "Inbound" => Ok(Direction::Inbound),
            "Outbound" => Ok(Direction::Outbound),
            _ => Err(invalid("direction", s, "Inbound, Outbound")),
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Inbound => "Inbound",
            Direction::Outbound => "Outbound",
        })
    }
}

/// What a matching rule does with the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Let the packet through.
    Allow,
    /// Drop the packet.
    Deny,
}

impl FromStr for Access {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "Allow" => Ok(Access::Allow),
            "Deny" => Ok(Access::Deny),
            _ => Err(invalid("access", s, "Allow, Deny")),
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Allow => "Allow",
            Access::Deny => "Deny",
        })
    }
}

/// A rule's protocol, or a packet's (for packets never [`Protocol::Any`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (v4 and v6); has no ports.
    Icmp,
    /// `*`: every protocol (rules only).
    Any,
}

impl Protocol {
    /// Parses the JIT policy/request spelling (`TCP`, `UDP`, `*`), which
    /// differs from the NSG spelling accepted by [`FromStr`]; Azure JIT has
    /// no ICMP ports, so `ICMP` is refused.
    pub fn from_policy(s: &str) -> Result<Self, ModelError> {
        match s {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "*" => Ok(Protocol::Any),
            _ => Err(invalid("protocol", s, "TCP, UDP, *")),
        }
    }

    /// Whether a rule with this protocol applies to a packet of
    /// `packet_protocol`.
    pub fn matches(&self, packet_protocol: Protocol) -> bool {
        *self == Protocol::Any || *self == packet_protocol
    }

    /// Whether some packet could match both protocols; used by placement to
    /// decide whether a user rule governs the same traffic as a JIT rule.
    pub fn overlaps(&self, other: Protocol) -> bool {
        *self == Protocol::Any || other == Protocol::Any || *self == other
    }
}

impl FromStr for Protocol {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "Tcp" => Ok(Protocol::Tcp),
            "Udp" => Ok(Protocol::Udp),
            "Icmp" => Ok(Protocol::Icmp),
            "*" => Ok(Protocol::Any),
            _ => Err(invalid("protocol", s, "Tcp, Udp, Icmp, *")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "Tcp",
            Protocol::Udp => "Udp",
            Protocol::Icmp => "Icmp",
            Protocol::Any => "*",
        })
    }
}

/// Where a rule in the effective view comes from, so status can show users
/// which object to edit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// `spec.securityRules[]` of the NSG itself.
    Inline,
    /// A `SecurityRule` object, by name.
    SecurityRule {
        /// Name of the SecurityRule object.
        name: String,
    },
    /// One of Azure's built-in default rules.
    Default,
}

/// One NSG rule with every field parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Rule name, unique enough to be reported as the deciding rule.
    pub name: String,
    /// Lower wins; user rules use 100–4096, defaults 65000+ (hence `u32`).
    pub priority: u32,
    /// Traffic direction the rule governs.
    pub direction: Direction,
    /// Verdict when the rule matches.
    pub access: Access,
    /// Protocol the rule governs.
    pub protocol: Protocol,
    /// Sources; the rule matches if any of them matches.
    pub source_prefixes: Vec<AddressPrefix>,
    /// Source ports; the rule matches if any of them matches.
    pub source_ports: Vec<PortRange>,
    /// Destinations; the rule matches if any of them matches.
    pub destination_prefixes: Vec<AddressPrefix>,
    /// Destination ports; the rule matches if any of them matches.
    pub destination_ports: Vec<PortRange>,
    /// Where the rule comes from.
    pub origin: Origin,
    /// Materialized by the operator (a JIT deny or a JIT allow), so placement
    /// and conflict detection can tell the operator's rules from users'.
    pub jit: bool,
}

/// A packet to evaluate, as seen by the NSG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Whether it enters or leaves the protected machines.
    pub direction: Direction,
    /// A concrete protocol, never [`Protocol::Any`] (such a packet would
    /// only match `*` rules).
    pub protocol: Protocol,
    /// Source address.
    pub source: IpAddr,
    /// Source port (ignored for ICMP).
    pub source_port: u16,
    /// Destination address.
    pub destination: IpAddr,
    /// Destination port (ignored for ICMP).
    pub destination_port: u16,
}

impl Rule {
    /// Whether the rule applies to `packet`: same direction, protocol
    /// matches, and some source prefix, source port range, destination
    /// prefix and destination port range each match. An empty list matches
    /// nothing. ICMP has no ports, so for ICMP packets the port ranges are
    /// ignored (as Azure does).
    pub fn matches(&self, packet: &Packet, scope: &Scope) -> bool {
        let ports_match = packet.protocol == Protocol::Icmp
            || (self
                .source_ports
                .iter()
                .any(|r| r.contains(packet.source_port))
                && self
                    .destination_ports
                    .iter()
                    .any(|r| r.contains(packet.destination_port)));
        self.direction == packet.direction
            && self.protocol.matches(packet.protocol)
            && self
                .source_prefixes
                .iter()
                .any(|p| p.matches(packet.source, scope))
            && self
                .destination_prefixes
                .iter()
                .any(|p| p.matches(packet.destination, scope))
            && ports_match
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_parse_and_display_nsg_spelling() {
        for (s, d) in [
            ("Inbound", Direction::Inbound),
            ("Outbound", Direction::Outbound),
        ] {
            assert_eq!(s.parse::<Direction>(), Ok(d));
            assert_eq!(d.to_string(), s);
        }
        for (s, a) in [("Allow", Access::Allow), ("Deny", Access::Deny)] {
            assert_eq!(s.parse::<Access>(), Ok(a));
            assert_eq!(a.to_string(), s);
        }
        for (s, p) in [
            ("Tcp", Protocol::Tcp),
            ("Udp", Protocol::Udp),
            ("Icmp", Protocol::Icmp),
            ("*", Protocol::Any),
        ] {
            assert_eq!(s.parse::<Protocol>(), Ok(p));
            assert_eq!(p.to_string(), s);
        }
    }

    #[test]
    fn enums_reject_other_spellings() {
        assert_eq!(
            "inbound".parse::<Direction>(),
            Err(ModelError::Invalid {
                field: "direction",
                value: "inbound".into(),
                expected: "Inbound, Outbound"
            })
        );
        assert!("".parse::<Direction>().is_err());
        assert!("allow".parse::<Access>().is_err());
        assert!("Permit".parse::<Access>().is_err());
        for bad in ["TCP", "tcp", "Any", "", "Esp"] {
            let err = bad.parse::<Protocol>().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("invalid protocol {bad:?}: expected one of Tcp, Udp, Icmp, *")
            );
        }
    }

    #[test]
    fn protocol_policy_spelling() {
        assert_eq!(Protocol::from_policy("TCP"), Ok(Protocol::Tcp));
        assert_eq!(Protocol::from_policy("UDP"), Ok(Protocol::Udp));
        assert_eq!(Protocol::from_policy("*"), Ok(Protocol::Any));
        for bad in ["Tcp", "tcp", "ICMP", "Icmp", ""] {
            assert!(Protocol::from_policy(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn protocol_matching_and_overlap() {
        assert!(Protocol::Any.matches(Protocol::Tcp));
        assert!(Protocol::Any.matches(Protocol::Icmp));
        assert!(Protocol::Tcp.matches(Protocol::Tcp));
        assert!(!Protocol::Tcp.matches(Protocol::Udp));
        assert!(!Protocol::Udp.matches(Protocol::Icmp));
        assert!(Protocol::Tcp.overlaps(Protocol::Any));
        assert!(Protocol::Any.overlaps(Protocol::Udp));
        assert!(Protocol::Udp.overlaps(Protocol::Udp));
        assert!(!Protocol::Udp.overlaps(Protocol::Tcp));
    }

    fn ssh_from(source: &str) -> Rule {
        Rule {
            name: "ssh".into(),
            priority: 100,
            direction: Direction::Inbound,
            access: Access::Allow,
            protocol: Protocol::Tcp,
            source_prefixes: vec![source.parse().unwrap()],
            source_ports: vec![PortRange::Any],
            destination_prefixes: vec!["10.0.0.4".parse().unwrap()],
            destination_ports: vec!["22".parse().unwrap(), "2222-2230".parse().unwrap()],
            origin: Origin::Inline,
            jit: false,
        }
    }

    fn packet(protocol: Protocol, source: &str, destination: &str, port: u16) -> Packet {
        Packet {
            direction: Direction::Inbound,
            protocol,
            source: source.parse().unwrap(),
            source_port: 40000,
            destination: destination.parse().unwrap(),
            destination_port: port,
        }
    }

    #[test]
    fn rule_matches_every_field() {
        let scope = Scope {
            virtual_network: vec!["10.0.0.0/16".parse().unwrap()],
            load_balancer: vec![],
        };
        let rule = ssh_from("Internet");
        let cases = [
            (packet(Protocol::Tcp, "203.0.113.9", "10.0.0.4", 22), true),
            (packet(Protocol::Tcp, "203.0.113.9", "10.0.0.4", 2225), true),
            (packet(Protocol::Tcp, "203.0.113.9", "10.0.0.4", 23), false),
            (packet(Protocol::Udp, "203.0.113.9", "10.0.0.4", 22), false),
            (packet(Protocol::Tcp, "10.0.9.9", "10.0.0.4", 22), false),
            (packet(Protocol::Tcp, "203.0.113.9", "10.0.0.5", 22), false),
            (
                Packet {
                    direction: Direction::Outbound,
                    ..packet(Protocol::Tcp, "203.0.113.9", "10.0.0.4", 22)
                },
                false,
            ),
        ];
        for (p, want) in cases {
            assert_eq!(rule.matches(&p, &scope), want, "{p:?}");
        }
    }

    #[test]
    fn icmp_packets_ignore_ports() {
        let scope = Scope::default();
        let mut rule = ssh_from("*");
        rule.protocol = Protocol::Any;
        assert!(rule.matches(&packet(Protocol::Icmp, "1.2.3.4", "10.0.0.4", 0), &scope));
        assert!(!rule.matches(&packet(Protocol::Udp, "1.2.3.4", "10.0.0.4", 0), &scope));
        rule.protocol = Protocol::Tcp;
        assert!(!rule.matches(&packet(Protocol::Icmp, "1.2.3.4", "10.0.0.4", 22), &scope));
    }

    #[test]
    fn source_port_must_match() {
        let scope = Scope::default();
        let mut rule = ssh_from("*");
        rule.source_ports = vec!["1024-2048".parse().unwrap()];
        assert!(!rule.matches(&packet(Protocol::Tcp, "1.2.3.4", "10.0.0.4", 22), &scope));
        let p = Packet {
            source_port: 1500,
            ..packet(Protocol::Tcp, "1.2.3.4", "10.0.0.4", 22)
        };
        assert!(rule.matches(&p, &scope));
    }

    #[test]
    fn empty_lists_match_nothing() {
        let scope = Scope::default();
        let p = packet(Protocol::Tcp, "1.2.3.4", "10.0.0.4", 22);
        let mut rule = ssh_from("*");
        assert!(rule.matches(&p, &scope));
        rule.destination_ports.clear();
        assert!(!rule.matches(&p, &scope));
        let mut rule = ssh_from("*");
        rule.source_prefixes.clear();
        assert!(!rule.matches(&p, &scope));
    }
}
