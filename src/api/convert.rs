//! From the API's strings into the pure rule model, and back into status: the one place
//! where protocols, directions, accesses and prefixes change spelling.
//!
//! The schema already refuses malformed values, but objects written before a CRD tightened,
//! or by a client that skipped validation, must never crash a controller: every conversion
//! returns an error that names the rule and the field, and the caller reports it.

use std::str::FromStr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::jit_policy::PolicyProtocol;
use super::nsg::{EffectiveRule, NetworkSecurityGroupSpec, RuleOrigin};
use super::rule_fields::{Access, Direction, RuleFields, RuleProtocol};
use crate::rules::{self, AddressPrefix, Origin, PortRange, Scope};

/// A value of an object that the model cannot represent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule}: {field} {value:?} is invalid")]
pub struct ConvertError {
    pub rule: String,
    pub field: &'static str,
    pub value: String,
}

/// What the NSG's tags stand for. Values that are not addresses or CIDRs (`*`, a tag) are
/// reported, not dropped silently, because a wrong `VirtualNetwork` changes every verdict.
/// The schema refuses them too ([`super::validation::ADDRESS_SPACE_RULE`]); this check
/// remains for objects stored before it did.
pub fn scope(spec: &NetworkSecurityGroupSpec) -> Result<Scope, ConvertError> {
    let nets = |field: &'static str, values: &[String]| -> Result<Vec<IpNet>, ConvertError> {
        values
            .iter()
            .map(|v| match AddressPrefix::from_str(v) {
                Ok(AddressPrefix::Net(net)) => Ok(net),
                _ => Err(ConvertError {
                    rule: "spec".into(),
                    field,
                    value: v.clone(),
                }),
            })
            .collect()
    };
    Ok(Scope {
        virtual_network: nets("virtualNetworkPrefixes", &spec.virtual_network_prefixes)?,
        load_balancer: nets("loadBalancerPrefixes", &spec.load_balancer_prefixes)?,
    })
}

/// Converts one rule's fields; `origin` and `jit` say where it came from.
pub fn rule(
    name: &str,
    fields: &RuleFields,
    origin: Origin,
    jit: bool,
) -> Result<rules::Rule, ConvertError> {
    let error = |field: &'static str, value: &str| ConvertError {
        rule: name.to_owned(),
        field,
        value: value.to_owned(),
    };
    let prefixes =
        |field: &'static str, values: Vec<&str>| -> Result<Vec<AddressPrefix>, ConvertError> {
            values
                .into_iter()
                .map(|v| AddressPrefix::from_str(v).map_err(|_| error(field, v)))
                .collect()
        };
    let ports = |field: &'static str, values: Vec<&str>| -> Result<Vec<PortRange>, ConvertError> {
        values
            .into_iter()
            .map(|v| PortRange::from_str(v).map_err(|_| error(field, v)))
            .collect()
    };
    Ok(rules::Rule {
        name: name.to_owned(),
        priority: fields.priority,
        direction: direction(fields.direction),
        access: access(fields.access),
        protocol: protocol(fields.protocol),
        source_prefixes: prefixes("sourceAddressPrefix", fields.source_prefixes())?,
        source_ports: ports("sourcePortRange", fields.source_ports())?,
        destination_prefixes: prefixes("destinationAddressPrefix", fields.destination_prefixes())?,
        destination_ports: ports("destinationPortRange", fields.destination_ports())?,
        origin,
        jit,
    })
}

/// The model's direction for the API's.
pub fn direction(d: Direction) -> rules::Direction {
    match d {
        Direction::Inbound => rules::Direction::Inbound,
        Direction::Outbound => rules::Direction::Outbound,
    }
}

/// The model's access for the API's.
pub fn access(a: Access) -> rules::Access {
    match a {
        Access::Allow => rules::Access::Allow,
        Access::Deny => rules::Access::Deny,
    }
}

/// The model's protocol for a policy's or request's spelling (`TCP`, `UDP`, `*`).
pub fn model_protocol(p: PolicyProtocol) -> rules::Protocol {
    match p {
        PolicyProtocol::Tcp => rules::Protocol::Tcp,
        PolicyProtocol::Udp => rules::Protocol::Udp,
        PolicyProtocol::Any => rules::Protocol::Any,
    }
}

/// A policy's spelling of a model protocol; ICMP, which policies cannot name, reads as `*`.
pub fn policy_protocol(p: rules::Protocol) -> PolicyProtocol {
    match p {
        rules::Protocol::Tcp => PolicyProtocol::Tcp,
        rules::Protocol::Udp => PolicyProtocol::Udp,
        rules::Protocol::Icmp | rules::Protocol::Any => PolicyProtocol::Any,
    }
}

/// The model's protocol for the API's NSG spelling.
pub fn protocol(p: RuleProtocol) -> rules::Protocol {
    match p {
        RuleProtocol::Tcp => rules::Protocol::Tcp,
        RuleProtocol::Udp => rules::Protocol::Udp,
        RuleProtocol::Icmp => rules::Protocol::Icmp,
        RuleProtocol::Any => rules::Protocol::Any,
    }
}

/// The API's NSG spelling of a model protocol.
pub fn rule_protocol(p: rules::Protocol) -> RuleProtocol {
    match p {
        rules::Protocol::Tcp => RuleProtocol::Tcp,
        rules::Protocol::Udp => RuleProtocol::Udp,
        rules::Protocol::Icmp => RuleProtocol::Icmp,
        rules::Protocol::Any => RuleProtocol::Any,
    }
}

/// One evaluated rule as the NSG status shows it.
pub fn effective_rule(rule: &rules::Rule, expires_at: Option<Time>) -> EffectiveRule {
    let strings = |items: &mut dyn Iterator<Item = String>| items.collect::<Vec<_>>();
    EffectiveRule {
        name: rule.name.clone(),
        priority: rule.priority,
        direction: match rule.direction {
            rules::Direction::Inbound => Direction::Inbound,
            rules::Direction::Outbound => Direction::Outbound,
        },
        access: match rule.access {
            rules::Access::Allow => Access::Allow,
            rules::Access::Deny => Access::Deny,
        },
        protocol: rule_protocol(rule.protocol),
        source_address_prefixes: strings(&mut rule.source_prefixes.iter().map(ToString::to_string)),
        source_port_ranges: strings(&mut rule.source_ports.iter().map(ToString::to_string)),
        destination_address_prefixes: strings(
            &mut rule.destination_prefixes.iter().map(ToString::to_string),
        ),
        destination_port_ranges: strings(
            &mut rule.destination_ports.iter().map(ToString::to_string),
        ),
        origin: match rule.origin {
            Origin::Inline => RuleOrigin::Inline,
            Origin::SecurityRule { .. } => RuleOrigin::SecurityRule,
            Origin::Default => RuleOrigin::Default,
        },
        jit: rule.jit,
        expires_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::rule_fields::RuleFields;

    fn fields() -> RuleFields {
        RuleFields {
            priority: 200,
            direction: Direction::Inbound,
            access: Access::Allow,
            protocol: RuleProtocol::Tcp,
            source_address_prefix: Some("198.19.0.10".into()),
            source_address_prefixes: None,
            source_port_range: Some("*".into()),
            source_port_ranges: None,
            destination_address_prefix: None,
            destination_address_prefixes: Some(vec!["198.18.0.10".into(), "VirtualNetwork".into()]),
            destination_port_range: None,
            destination_port_ranges: Some(vec!["22".into(), "1000-2000".into()]),
            description: None,
        }
    }

    #[test]
    fn converts_singular_and_plural_fields() {
        let rule = rule("r", &fields(), Origin::Inline, false).unwrap();
        assert_eq!(
            rule.source_prefixes,
            vec![AddressPrefix::from_str("198.19.0.10").unwrap()]
        );
        assert_eq!(rule.destination_prefixes.len(), 2);
        assert_eq!(
            rule.destination_ports,
            vec![
                PortRange::single(22),
                PortRange::Range {
                    start: 1000,
                    end: 2000
                }
            ]
        );
        assert_eq!(rule.protocol, rules::Protocol::Tcp);
        let shown = effective_rule(&rule, None);
        assert_eq!(shown.destination_port_ranges, vec!["22", "1000-2000"]);
        assert_eq!(shown.source_address_prefixes, vec!["198.19.0.10"]);
    }

    #[test]
    fn a_bad_value_names_the_rule_and_field() {
        let mut bad = fields();
        bad.destination_port_ranges = Some(vec!["22".into(), "ssh".into()]);
        let error = rule("r", &bad, Origin::Inline, false).unwrap_err();
        assert_eq!(
            error,
            ConvertError {
                rule: "r".into(),
                field: "destinationPortRange",
                value: "ssh".into()
            }
        );
    }

    #[test]
    fn scope_rejects_tags_as_address_space() {
        for field in ["virtualNetworkPrefixes", "loadBalancerPrefixes"] {
            for tag in ["*", "VirtualNetwork", "Internet", "AzureLoadBalancer"] {
                let spec: NetworkSecurityGroupSpec = serde_json::from_value(serde_json::json!({
                    field: ["198.18.0.0/24", tag]
                }))
                .unwrap();
                let error = scope(&spec).unwrap_err();
                assert_eq!((error.field, error.value.as_str()), (field, tag));
            }
        }
    }

    #[test]
    fn scope_reads_addresses_and_cidrs_as_the_schema_does() {
        let spec: NetworkSecurityGroupSpec = serde_json::from_value(serde_json::json!({
            "virtualNetworkPrefixes": ["198.18.0.0/24", "2001:DB8::/32", "198.19.0.7"],
            "loadBalancerPrefixes": ["198.18.1.0/28"]
        }))
        .unwrap();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            scope(&spec),
            Ok(Scope {
                virtual_network: vec![
                    net("198.18.0.0/24"),
                    net("2001:db8::/32"),
                    net("198.19.0.7/32")
                ],
                load_balancer: vec![net("198.18.1.0/28")],
            })
        );
    }
}
