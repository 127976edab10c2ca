//! `NetworkSecurityGroup` (`nsg`): the firewall. The user owns the spec (often in GitOps);
//! the operator only ever writes status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rule_fields::{Access, Direction, RuleFields, RuleProtocol};
use super::validation::{ADDRESS_SPACE_MESSAGE, ADDRESS_SPACE_RULE};

/// The desired firewall: user-owned inline rules plus the address space that gives the
/// `VirtualNetwork` and `Internet` tags their meaning.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "jit.portcullis.dev",
    version = "v1alpha1",
    kind = "NetworkSecurityGroup",
    namespaced,
    shortname = "nsg",
    category = "portcullis",
    status = "NetworkSecurityGroupStatus",
    doc = "A network security group: ordered allow/deny rules with Azure NSG semantics.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Rules",
        type_ = "integer",
        json_path = ".status.effectiveRuleCount"
    ),
    printcolumn(
        name = "Denies",
        type_ = "integer",
        json_path = ".status.jitDenyRules",
        description = "JIT deny rules in force (one per protected machine and policy)"
    ),
    printcolumn(name = "Grants", type_ = "integer", json_path = ".status.activeGrants"),
    printcolumn(name = "Agents", type_ = "integer", json_path = ".status.agents"),
    printcolumn(
        name = "Enforced",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Enforced\")].status"
    ),
    printcolumn(
        name = "Exposed",
        type_ = "string",
        json_path = ".status.exposedPorts",
        description = "Management ports reachable from Internet or *"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.securityRules) || self.securityRules.all(a, self.securityRules.filter(b, b.direction == a.direction && b.priority == a.priority).size() == 1)"
).message("securityRules: priority must be unique per direction").field_path(".securityRules"))]
pub struct NetworkSecurityGroupSpec {
    /// The prefixes the `VirtualNetwork` tag stands for; `Internet` is everything else.
    /// Addresses and CIDRs only: a tag here would define a tag by itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new(ADDRESS_SPACE_RULE).message(ADDRESS_SPACE_MESSAGE))]
    pub virtual_network_prefixes: Vec<String>,
    /// The prefixes the `AzureLoadBalancer` tag stands for (health probes); empty by default.
    /// Addresses and CIDRs only, like `virtualNetworkPrefixes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new(ADDRESS_SPACE_RULE).message(ADDRESS_SPACE_MESSAGE))]
    pub load_balancer_prefixes: Vec<String>,
    /// The user's rules. The operator never edits them; what it adds lives in `SecurityRule`
    /// objects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub security_rules: Vec<InlineRule>,
}

/// One user rule written inside the NSG.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InlineRule {
    /// Unique within the NSG.
    #[schemars(
        length(min = 1, max = 80),
        regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
    )]
    pub name: String,
    #[serde(flatten)]
    pub fields: RuleFields,
}

/// What the operator and the agents observed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSecurityGroupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Inline rules, SecurityRule objects and the defaults, in evaluation order. JIT grants
    /// are counted in `activeGrants`, not listed, and JIT denies (one per protected machine)
    /// are listed up to 256 and only counted in `jitDenyRules` beyond: an NSG may carry
    /// thousands of each, and the object must stay far below etcd's size limit. Each is a
    /// SecurityRule of its own (`kubectl get nsgrule -l jit.portcullis.dev/nsg=NAME`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effective_rules: Vec<EffectiveRule>,
    /// How many rules are in force, grants included (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_rule_count: Option<u32>,
    /// How many JIT deny rules (one per protected machine) are in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jit_deny_rules: Option<u32>,
    /// How many JIT grants (allow rules of granted requests) are in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_grants: Option<u32>,
    /// Management ports the inbound rules open to `Internet` or `*`: Defender's
    /// "management ports should be protected with JIT".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposure: Vec<Exposure>,
    /// `exposure` as a short list of ports (for `kubectl get`), e.g. `22/Tcp,3389/Tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<String>,
    /// How many agents report on this NSG (each an `AgentReport`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<u32>,
    /// The agents' reports, copied by the operator from their `AgentReport`s: those with
    /// an error first, then those behind the NSG's generation, then by agent, at most
    /// [`MAX_LISTED_REPORTS`] (`kubectl get agentreports` lists every one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["agent".into()]))]
    pub enforcement: Vec<EnforcementReport>,
}

/// Where an effective rule came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RuleOrigin {
    /// `spec.securityRules` of the NSG.
    Inline,
    /// A `SecurityRule` object referencing the NSG.
    SecurityRule,
    /// One of the Azure default rules.
    Default,
}

/// One rule as evaluated, with every list spelled out in plural form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveRule {
    pub name: String,
    pub priority: u32,
    pub direction: Direction,
    pub access: Access,
    pub protocol: RuleProtocol,
    pub source_address_prefixes: Vec<String>,
    pub source_port_ranges: Vec<String>,
    pub destination_address_prefixes: Vec<String>,
    pub destination_port_ranges: Vec<String>,
    pub origin: RuleOrigin,
    /// Set for rules the operator materialized for JIT (denies and grants).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub jit: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
}

/// A management port reachable from outside the virtual network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Exposure {
    pub port: u16,
    pub protocol: RuleProtocol,
    /// The allow rule that exposes it.
    pub rule: String,
    /// The source the rule allows (`*` or `Internet`).
    pub source: String,
    /// The agents (by `enforcement[].agent`, the host name by default) that report the
    /// port listening on their machine, the first [`MAX_LISTENING_HOSTS`] sorted: exposed
    /// and really served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listening_on: Vec<String>,
}

/// How many agents' reports an NSG's status lists.
pub const MAX_LISTED_REPORTS: usize = 32;

/// How many hosts an exposure names in `listeningOn`.
pub const MAX_LISTENING_HOSTS: usize = 16;

/// A management port an agent found listening on its machine.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct ListeningPort {
    pub port: u16,
    pub protocol: RuleProtocol,
}

/// How many idle grants one report lists; the rest follow once these are revoked.
pub const MAX_REPORTED_IDLE: usize = 512;
/// How long a reported error may be, in characters.
pub const MAX_REPORTED_ERROR: usize = 1024;

/// What one agent applied on its host. Bounded in every list and string: an agent writes
/// it, and the operator copies it into the NSG's status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnforcementReport {
    /// The agent's identity (unique per host), the list-map key.
    #[schemars(length(min = 1, max = 253))]
    pub agent: String,
    #[schemars(length(max = 253))]
    pub host: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    pub addresses: Vec<String>,
    /// The NSG generation and the hash of the rules the agent applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[schemars(length(max = 64))]
    pub rules_hash: String,
    pub applied_at: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_REPORTED_ERROR))]
    pub error: Option<String>,
    /// Grants with an `idleTimeout` that carried no packet through this agent for that
    /// long: the operator revokes them (`Idle`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_REPORTED_IDLE))]
    pub idle_grants: Vec<IdleGrant>,
    /// The management ports (and those JIT guards here) listening on the machine, on a
    /// wildcard address or one of `addresses`. Gateways report none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub listening_ports: Vec<ListeningPort>,
}

/// A grant an agent saw idle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdleGrant {
    /// The grant's `SecurityRule`.
    #[schemars(length(max = 253))]
    pub rule: String,
    /// When the agent last saw a packet of it; absent: none since the grant began (or
    /// since the agent started, whichever is later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_packet: Option<Time>,
}

/// A report of agent `agent` with no error, idle grant or listening port, at generation 3:
/// for the tests of what writes, indexes and summarizes reports.
#[cfg(test)]
pub fn report_of(agent: &str) -> EnforcementReport {
    EnforcementReport {
        agent: agent.into(),
        host: agent.into(),
        addresses: vec!["198.18.0.10".into()],
        observed_generation: Some(3),
        rules_hash: "abc".into(),
        applied_at: Time(jiff::Timestamp::UNIX_EPOCH),
        error: None,
        idle_grants: Vec::new(),
        listening_ports: Vec::new(),
    }
}

/// An NSG with nothing in it, named `name` in `namespace`: for the tests of what caches,
/// indexes and runs over NSGs.
#[cfg(test)]
pub fn empty(namespace: &str, name: &str) -> NetworkSecurityGroup {
    let mut nsg = NetworkSecurityGroup::new(
        name,
        NetworkSecurityGroupSpec {
            virtual_network_prefixes: Vec::new(),
            load_balancer_prefixes: Vec::new(),
            security_rules: Vec::new(),
        },
    );
    nsg.metadata.namespace = Some(namespace.to_owned());
    nsg
}
