//! The fields of one NSG rule, shared by a `NetworkSecurityGroup`'s inline rules and by a
//! `SecurityRule` object, so both are written, validated and evaluated identically.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validation::{
    PORT_RANGE_MESSAGE, PORT_RANGE_PATTERN, PORT_RANGE_RULE, PORT_RANGES_RULE, PREFIX_MESSAGE,
    PREFIX_RULE, PREFIXES_RULE,
};

/// Which way the traffic flows relative to the protected machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Access {
    Allow,
    Deny,
}

/// An NSG rule's protocol, spelled as Azure spells it in NSG rules.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum RuleProtocol {
    Tcp,
    Udp,
    Icmp,
    #[serde(rename = "*")]
    Any,
}

/// The fields that make an NSG rule, less its name (inline rules carry a name; a
/// `SecurityRule` takes its object name).
///
/// Each address and port field comes singular or plural, as in Azure: exactly one of the two.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(super::validation::exactly_one("sourceAddressPrefix", "sourceAddressPrefixes"))
        .message("exactly one of sourceAddressPrefix or sourceAddressPrefixes must be set"),
    validation = Rule::new(super::validation::exactly_one("sourcePortRange", "sourcePortRanges"))
        .message("exactly one of sourcePortRange or sourcePortRanges must be set"),
    validation = Rule::new(super::validation::exactly_one("destinationAddressPrefix", "destinationAddressPrefixes"))
        .message("exactly one of destinationAddressPrefix or destinationAddressPrefixes must be set"),
    validation = Rule::new(super::validation::exactly_one("destinationPortRange", "destinationPortRanges"))
        .message("exactly one of destinationPortRange or destinationPortRanges must be set"),
)]
pub struct RuleFields {
    /// 100 to 4096; the lower number is evaluated first and wins.
    #[schemars(range(min = 100, max = 4096))]
    pub priority: u32,
    pub direction: Direction,
    pub access: Access,
    pub protocol: RuleProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(PREFIX_RULE).message(PREFIX_MESSAGE))]
    pub source_address_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new(PREFIXES_RULE).message(PREFIX_MESSAGE))]
    pub source_address_prefixes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 11), regex(pattern = PORT_RANGE_PATTERN))]
    #[x_kube(validation = Rule::new(PORT_RANGE_RULE).message(PORT_RANGE_MESSAGE))]
    pub source_port_range: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), inner(length(max = 11)))]
    #[x_kube(validation = Rule::new(PORT_RANGES_RULE).message(PORT_RANGE_MESSAGE))]
    pub source_port_ranges: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(PREFIX_RULE).message(PREFIX_MESSAGE))]
    pub destination_address_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new(PREFIXES_RULE).message(PREFIX_MESSAGE))]
    pub destination_address_prefixes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 11), regex(pattern = PORT_RANGE_PATTERN))]
    #[x_kube(validation = Rule::new(PORT_RANGE_RULE).message(PORT_RANGE_MESSAGE))]
    pub destination_port_range: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), inner(length(max = 11)))]
    #[x_kube(validation = Rule::new(PORT_RANGES_RULE).message(PORT_RANGE_MESSAGE))]
    pub destination_port_ranges: Option<Vec<String>>,
    /// Free text for people reading the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 140))]
    pub description: Option<String>,
}

impl RuleFields {
    /// The source prefixes whichever of the singular or plural field holds them.
    pub fn source_prefixes(&self) -> Vec<&str> {
        either(&self.source_address_prefix, &self.source_address_prefixes)
    }
    /// The source port ranges, singular or plural.
    pub fn source_ports(&self) -> Vec<&str> {
        either(&self.source_port_range, &self.source_port_ranges)
    }
    /// The destination prefixes, singular or plural.
    pub fn destination_prefixes(&self) -> Vec<&str> {
        either(
            &self.destination_address_prefix,
            &self.destination_address_prefixes,
        )
    }
    /// The destination port ranges, singular or plural.
    pub fn destination_ports(&self) -> Vec<&str> {
        either(&self.destination_port_range, &self.destination_port_ranges)
    }
}

/// Azure's "one of a singular or a plural field" read as one list. The schema guarantees at
/// most one is set; if both were (an object written before the CRD), both count.
pub(crate) fn either<'a>(one: &'a Option<String>, many: &'a Option<Vec<String>>) -> Vec<&'a str> {
    one.iter()
        .chain(many.iter().flatten())
        .map(String::as_str)
        .collect()
}
