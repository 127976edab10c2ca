//! The `SecurityRule` objects the operator owns, as pure data.
//!
//! Everything here is a function of its inputs: names, labels and specs never depend on time,
//! order of events or randomness. That is what makes reconciling idempotent (apply the same
//! object again and nothing changes), lets a restarted operator recognize its own rules, and
//! lets stale ones be found by label. The controller adds `ownerReferences` and applies them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::validate::{PortGrant, model_protocol, policy_ports};
use crate::api::SecurityRuleSpec;
#[cfg(test)]
use crate::api::jit_policy::EstablishedConnections;
use crate::api::jit_policy::PolicyVirtualMachine;
use crate::api::rule_fields::{Access, Direction, RuleFields, RuleProtocol};
use crate::fnv::Fnv;
use crate::rules::prefix::AddressPrefix;
use crate::rules::{Protocol, duration};

pub use crate::api::security_rule::{LABEL_MANAGED_BY, MANAGED_BY};
/// The NSG the rule belongs to, so an NSG's JIT rules can be listed by selector.
pub const LABEL_NSG: &str = "jit.portcullis.dev/nsg";
/// The policy the rule derives from, so a policy change can find its stale rules.
pub const LABEL_POLICY: &str = "jit.portcullis.dev/policy";
/// The request that opened an allow rule, so revoking a request finds its rules.
pub const LABEL_REQUEST: &str = "jit.portcullis.dev/request";
/// The machine the rule guards or opens.
pub const LABEL_MACHINE: &str = "jit.portcullis.dev/machine";
/// Whether the rule is a JIT deny ([`ROLE_DENY`]) or a grant ([`ROLE_ALLOW`]).
pub const LABEL_ROLE: &str = "jit.portcullis.dev/role";
/// [`LABEL_ROLE`] of a policy's deny rule.
pub const ROLE_DENY: &str = "deny";
/// [`LABEL_ROLE`] of a request's allow rule.
pub const ROLE_ALLOW: &str = "allow";

/// The longest object name Kubernetes accepts (a DNS subdomain).
const MAX_NAME: usize = 253;
/// The longest label value Kubernetes accepts.
const MAX_LABEL_VALUE: usize = 63;
/// The longest rule description the schema accepts.
const MAX_DESCRIPTION: usize = 140;

/// One rule object to apply: its name, its labels and its spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Materialized {
    /// The object name, a valid DNS subdomain.
    pub name: String,
    /// The labels, values already valid label values.
    pub labels: BTreeMap<String, String>,
    /// The rule.
    pub spec: SecurityRuleSpec,
}

/// The object that owns a rule: its name makes the rule's name readable, its UID makes it
/// unique. Names are joined with `-`, which object names may contain, so two owners' names
/// could join to the same text (request `db` on machine `prod-api` and request `db-prod` on
/// machine `api`); the short hash of the owner's UID at the end keeps their rules apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner<'a> {
    /// The owner's object name.
    pub name: &'a str,
    /// The owner's `metadata.uid`.
    pub uid: &'a str,
}

/// 8 hex digits of a hash of an owner's UID: short enough to keep names readable, and a
/// name clash between two owners is still caught, because the operator never writes over a
/// rule another object controls.
fn short_hash(text: &str) -> String {
    let hash = Fnv::of(text.as_bytes());
    format!("{:08x}", (hash ^ (hash >> 32)) as u32)
}

/// The name of a policy's deny rule for one machine: `jit-deny-{policy}-{machine}-{hash}`,
/// made valid by [`object_name`] when too long.
pub fn deny_rule_name(policy: Owner<'_>, machine: &str) -> String {
    object_name(&format!(
        "jit-deny-{}-{machine}-{}",
        policy.name,
        short_hash(policy.uid)
    ))
}

/// The name of a request's allow rule for one port:
/// `jit-allow-{request}-{machine}-{port}-{tcp|udp|any}-{hash}`, made valid by
/// [`object_name`] when too long. The protocol is part of the name because a request may
/// open one port over TCP and UDP separately.
pub fn allow_rule_name(request: Owner<'_>, machine: &str, port: u16, protocol: Protocol) -> String {
    let protocol = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
        Protocol::Any => "any",
    };
    object_name(&format!(
        "jit-allow-{}-{machine}-{port}-{protocol}-{}",
        request.name,
        short_hash(request.uid)
    ))
}

/// The name of agent `agent`'s [`AgentReport`](crate::api::AgentReport) on NSG `nsg`:
/// `{nsg}.{agent}` when the NSG's name has no dot and the whole is a valid object name (the
/// first dot then tells the two apart); otherwise `{agent, cleaned}-{16 hex digits}` of a
/// hash of both, which holds no dot and so never equals a name of the first form. The
/// operator counts a report only under this name, so no agent's report can hide behind
/// another's, and two reports never claim the same agent.
pub fn report_name(nsg: &str, agent: &str) -> String {
    let plain = format!("{nsg}.{agent}");
    if !nsg.contains('.') && plain.len() <= MAX_NAME && is_dns_subdomain(&plain) {
        return plain;
    }
    let hash = Fnv::of(format!("{nsg}\0{agent}").as_bytes());
    let cleaned: String = agent
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NAME - 17)
        .collect();
    let keep = cleaned.trim_matches('-');
    if keep.is_empty() {
        format!("{hash:016x}")
    } else {
        format!("{keep}-{hash:016x}")
    }
}

/// `name` lowercased when that is a valid object name. Otherwise (too long, or characters a
/// DNS subdomain refuses) it is reduced to `[a-z0-9-]`, truncated and suffixed with `-` and
/// 8 hex digits of a hash of the full name: different inputs keep different names, and the
/// same input always gives the same name.
fn object_name(name: &str) -> String {
    let lower = name.to_lowercase();
    if lower.len() <= MAX_NAME && is_dns_subdomain(&lower) {
        return lower;
    }
    let cleaned: String = lower
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    shorten(&cleaned, name, MAX_NAME)
}

/// `value` when it is a valid label value (at most 63 characters, alphanumerics with `-`,
/// `_`, `.` inside). Otherwise reduced to those characters, truncated and suffixed with `-`
/// and 8 hex digits of a hash of the full value, so long object names (up to 253 characters)
/// can still be selected by label without colliding. Selectors must use this function too.
pub fn label_value(value: &str) -> String {
    if value.len() <= MAX_LABEL_VALUE && is_label_value(value) {
        return value.to_owned();
    }
    let cleaned: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    shorten(&cleaned, value, MAX_LABEL_VALUE)
}

/// Cuts `cleaned` (ASCII only) so that it plus `-` and the 8-digit hash of `original` fit in
/// `max`, dropping non-alphanumerics at both ends so the result starts and ends with an
/// alphanumeric.
fn shorten(cleaned: &str, original: &str, max: usize) -> String {
    let hash = short_hash(original);
    let keep = &cleaned[..cleaned.len().min(max - hash.len() - 1)];
    let keep = keep.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if keep.is_empty() {
        hash
    } else {
        format!("{keep}-{hash}")
    }
}

/// Kubernetes' DNS-1123 subdomain: dot-separated labels of `[a-z0-9-]` that start and end
/// alphanumeric (the length is checked by the caller).
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
        })
}

/// Kubernetes' label value: empty, or alphanumerics with `-`, `_`, `.` inside (the length is
/// checked by the caller).
fn is_label_value(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.is_empty()
        || (bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric())
}

/// The policy's deny rule for one machine: inbound traffic from anywhere to all its JIT
/// ports is dropped, until a grant's allow rule (higher precedence) opens a port.
///
/// The protocol is `*` when the ports mix protocols or one is `*`: one rule must close them
/// all, and denying a little more (the other protocol on a JIT port) is the safe side.
pub fn deny_rule(policy: Owner<'_>, machine: &PolicyVirtualMachine, priority: u32) -> Materialized {
    let ports = policy_ports(machine);
    let mut protocols = ports.iter().map(|p| model_protocol(p.protocol));
    let first = protocols.next().unwrap_or(Protocol::Any);
    let protocol = if protocols.all(|p| p == first) {
        first
    } else {
        Protocol::Any
    };
    let mut numbers: Vec<u16> = ports.iter().map(|p| p.number).collect();
    numbers.sort_unstable();
    numbers.dedup();

    let mut labels = common_labels(
        &machine.network_security_group_name,
        policy.name,
        &machine.name,
    );
    labels.insert(LABEL_ROLE.to_owned(), ROLE_DENY.to_owned());

    Materialized {
        name: deny_rule_name(policy, &machine.name),
        labels,
        spec: SecurityRuleSpec {
            network_security_group_name: machine.network_security_group_name.clone(),
            fields: RuleFields {
                priority,
                direction: Direction::Inbound,
                access: Access::Deny,
                protocol: rule_protocol(protocol),
                source_address_prefix: Some("*".to_owned()),
                source_address_prefixes: None,
                source_port_range: Some("*".to_owned()),
                source_port_ranges: None,
                destination_address_prefix: Some(machine.address.clone()),
                destination_address_prefixes: None,
                destination_port_range: None,
                destination_port_ranges: Some(numbers.iter().map(u16::to_string).collect()),
                description: Some(description(format!(
                    "JIT deny for machine {}: its JIT ports stay closed until a JitRequest \
                     is granted",
                    machine.name
                ))),
            },
            expires_at: None,
            established_connections: None,
            idle_timeout: None,
        },
    }
}

/// A request's allow rule for one granted port: inbound from exactly the granted sources to
/// the machine's address and port, until `expires_at` (after which it is never effective,
/// even if nobody deleted it yet).
pub fn allow_rule(
    request: Owner<'_>,
    policy: &str,
    grant: &PortGrant,
    priority: u32,
    expires_at: jiff::Timestamp,
) -> Materialized {
    let mut sources: Vec<String> = grant
        .sources
        .iter()
        .map(|n| AddressPrefix::Net(*n).to_string())
        .collect();
    let (source, sources) = if sources.len() == 1 {
        (sources.pop(), None)
    } else {
        (None, Some(sources))
    };

    let mut labels = common_labels(&grant.network_security_group, policy, &grant.machine);
    labels.insert(LABEL_REQUEST.to_owned(), label_value(request.name));
    labels.insert(LABEL_ROLE.to_owned(), ROLE_ALLOW.to_owned());

    Materialized {
        name: allow_rule_name(request, &grant.machine, grant.number, grant.protocol),
        labels,
        spec: SecurityRuleSpec {
            network_security_group_name: grant.network_security_group.clone(),
            fields: RuleFields {
                priority,
                direction: Direction::Inbound,
                access: Access::Allow,
                protocol: rule_protocol(grant.protocol),
                source_address_prefix: source,
                source_address_prefixes: sources,
                source_port_range: Some("*".to_owned()),
                source_port_ranges: None,
                destination_address_prefix: Some(grant.address.to_string()),
                destination_address_prefixes: None,
                destination_port_range: None,
                destination_port_ranges: Some(vec![grant.number.to_string()]),
                description: Some(description(format!(
                    "JIT access to machine {} port {} granted by JitRequest {}",
                    grant.machine, grant.number, request.name
                ))),
            },
            expires_at: Some(Time(expires_at)),
            established_connections: (!grant.established_connections.is_keep())
                .then_some(grant.established_connections),
            idle_timeout: grant.idle_timeout.map(duration::format),
        },
    }
}

/// The labels every JIT rule carries.
fn common_labels(nsg: &str, policy: &str, machine: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_NSG.to_owned(), label_value(nsg)),
        (LABEL_POLICY.to_owned(), label_value(policy)),
        (LABEL_MACHINE.to_owned(), label_value(machine)),
    ])
}

/// The NSG-rule spelling of a model protocol.
fn rule_protocol(p: Protocol) -> RuleProtocol {
    match p {
        Protocol::Tcp => RuleProtocol::Tcp,
        Protocol::Udp => RuleProtocol::Udp,
        Protocol::Icmp => RuleProtocol::Icmp,
        Protocol::Any => RuleProtocol::Any,
    }
}

/// Cuts a description to what the schema accepts; long object names must not make the
/// rule itself invalid.
fn description(text: String) -> String {
    if text.chars().count() <= MAX_DESCRIPTION {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_DESCRIPTION - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn machine(ports: serde_json::Value) -> PolicyVirtualMachine {
        let mut vm =
            json!({"name": "web-1", "address": "10.0.0.4", "networkSecurityGroupName": "nsg-a"});
        if !ports.is_null() {
            vm["ports"] = ports;
        }
        serde_json::from_value(vm).unwrap()
    }

    /// An owner with a fixed UID, so expected names are stable.
    fn owner(name: &str) -> Owner<'_> {
        Owner {
            name,
            uid: "0d6f7a8e-1b2c-4d5e-8f90-123456789abc",
        }
    }

    fn valid_name(name: &str) -> bool {
        name.len() <= MAX_NAME && is_dns_subdomain(name)
    }

    fn valid_label(value: &str) -> bool {
        value.len() <= MAX_LABEL_VALUE && is_label_value(value)
    }

    #[test]
    fn short_names_are_kept_readable() {
        let h = short_hash(owner("").uid);
        assert_eq!(
            deny_rule_name(owner("ssh"), "web-1"),
            format!("jit-deny-ssh-web-1-{h}")
        );
        assert_eq!(
            allow_rule_name(owner("alice-1"), "web-1", 22, Protocol::Tcp),
            format!("jit-allow-alice-1-web-1-22-tcp-{h}")
        );
        assert_eq!(
            allow_rule_name(owner("r.v2"), "db", 53, Protocol::Udp),
            format!("jit-allow-r.v2-db-53-udp-{h}")
        );
        assert_eq!(
            allow_rule_name(owner("r"), "db", 53, Protocol::Any),
            format!("jit-allow-r-db-53-any-{h}")
        );
        assert_eq!(
            deny_rule_name(owner("Mixed"), "M"),
            format!("jit-deny-mixed-m-{h}")
        );
        assert_eq!(label_value("web-1"), "web-1");
        assert_eq!(label_value("a.b_C-9"), "a.b_C-9");
        assert_eq!(label_value(""), "");
    }

    #[test]
    fn names_joined_alike_from_different_owners_differ() {
        // Request `db` on machine `prod-api` and request `db-prod` on machine `api` join to
        // the same text; their owners' UIDs keep the rules apart.
        let db = Owner {
            name: "db",
            uid: "uid-1",
        };
        let db_prod = Owner {
            name: "db-prod",
            uid: "uid-2",
        };
        assert_ne!(
            allow_rule_name(db, "prod-api", 22, Protocol::Tcp),
            allow_rule_name(db_prod, "api", 22, Protocol::Tcp)
        );
        let x_y = Owner {
            name: "x-y",
            uid: "uid-3",
        };
        let x = Owner {
            name: "x",
            uid: "uid-4",
        };
        assert_ne!(deny_rule_name(x_y, "z"), deny_rule_name(x, "y-z"));
        // The same owner always gets the same name: a restarted operator finds its rules.
        assert_eq!(
            deny_rule_name(x, "y-z"),
            deny_rule_name(
                Owner {
                    name: "x",
                    uid: "uid-4"
                },
                "y-z"
            )
        );
    }

    #[test]
    fn long_or_odd_names_stay_valid_unique_and_deterministic() {
        let long_a = format!("{}a", "x".repeat(252));
        let long_b = format!("{}b", "x".repeat(252));
        let names = [
            allow_rule_name(owner(&long_a), "web-1", 22, Protocol::Tcp),
            allow_rule_name(owner(&long_b), "web-1", 22, Protocol::Tcp),
            allow_rule_name(owner(&long_a), "web-1", 22, Protocol::Udp),
            deny_rule_name(owner(&long_a), "web-1"),
            deny_rule_name(owner(&long_b), "web-1"),
            deny_rule_name(owner("a..b"), "-x-"),
            deny_rule_name(owner("a"), "b_c"),
        ];
        for name in &names {
            assert!(valid_name(name), "{name:?} ({} chars)", name.len());
        }
        let mut distinct = names.to_vec();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        assert_eq!(
            names[0],
            allow_rule_name(owner(&long_a), "web-1", 22, Protocol::Tcp)
        );
        assert_eq!(names[0].len(), MAX_NAME);
        assert!(names[0].starts_with("jit-allow-xxx"));

        let values = [
            label_value(&long_a),
            label_value(&long_b),
            label_value(&"y".repeat(64)),
            label_value("-lead.and.trail-"),
            label_value("sp ace/slash"),
            label_value("---"),
        ];
        for value in &values {
            assert!(valid_label(value), "{value:?} ({} chars)", value.len());
        }
        let mut distinct = values.to_vec();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), values.len(), "{values:?}");
        assert_eq!(values[0], label_value(&long_a));
        assert_eq!(values[0].len(), MAX_LABEL_VALUE);
    }

    #[test]
    fn deny_closes_all_policy_ports_with_one_protocol() {
        let protocol_of = |ports| {
            deny_rule(owner("p"), &machine(ports), 150)
                .spec
                .fields
                .protocol
        };
        assert_eq!(protocol_of(serde_json::Value::Null), RuleProtocol::Tcp);
        assert_eq!(
            protocol_of(
                json!([{"number": 53, "protocol": "UDP"}, {"number": 161, "protocol": "UDP"}])
            ),
            RuleProtocol::Udp
        );
        assert_eq!(
            protocol_of(
                json!([{"number": 22, "protocol": "TCP"}, {"number": 53, "protocol": "UDP"}])
            ),
            RuleProtocol::Any
        );
        assert_eq!(
            protocol_of(json!([{"number": 22, "protocol": "TCP"}, {"number": 8080}])),
            RuleProtocol::Any
        );

        let deny = deny_rule(
            owner("ssh-policy"),
            &machine(json!([
                {"number": 5986, "protocol": "TCP"},
                {"number": 22, "protocol": "TCP"},
                {"number": 22, "protocol": "UDP"},
                {"number": 443, "protocol": "TCP"}
            ])),
            150,
        );
        assert_eq!(
            deny.name,
            deny_rule_name(owner("ssh-policy"), "web-1"),
            "the rule is named after its owner"
        );
        assert_eq!(
            deny.labels,
            BTreeMap::from([
                (s(LABEL_MANAGED_BY), s("portcullis")),
                (s(LABEL_NSG), s("nsg-a")),
                (s(LABEL_POLICY), s("ssh-policy")),
                (s(LABEL_MACHINE), s("web-1")),
                (s(LABEL_ROLE), s("deny")),
            ])
        );
        assert_eq!(deny.spec.network_security_group_name, "nsg-a");
        assert_eq!(deny.spec.expires_at, None);
        let f = &deny.spec.fields;
        assert_eq!(
            (f.priority, f.direction, f.access, f.protocol),
            (150, Direction::Inbound, Access::Deny, RuleProtocol::Any)
        );
        assert_eq!(f.source_prefixes(), ["*"]);
        assert_eq!(f.source_ports(), ["*"]);
        assert_eq!(f.destination_prefixes(), ["10.0.0.4"]);
        assert_eq!(f.destination_ports(), ["22", "443", "5986"]);
        assert_eq!(f.destination_port_range, None);
        assert!(f.description.as_deref().unwrap().contains("web-1"));

        let defaults = deny_rule(owner("p"), &machine(serde_json::Value::Null), 150);
        assert_eq!(
            defaults.spec.fields.destination_ports(),
            ["22", "3389", "5985", "5986"]
        );
    }

    fn grant(sources: &[&str]) -> PortGrant {
        PortGrant {
            machine: s("web-1"),
            address: "fd00::10".parse().unwrap(),
            network_security_group: s("nsg-a"),
            number: 3389,
            protocol: Protocol::Tcp,
            sources: sources.iter().map(|x| x.parse().unwrap()).collect(),
            duration: Duration::from_secs(3600),
            established_connections: EstablishedConnections::Keep,
            idle_timeout: None,
        }
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    #[test]
    fn allow_opens_exactly_the_grant_until_it_expires() {
        let expires: jiff::Timestamp = "2030-01-02T03:04:05Z".parse().unwrap();
        let allow = allow_rule(
            owner("alice-1"),
            "rdp",
            &grant(&["203.0.113.5/32"]),
            100,
            expires,
        );
        assert_eq!(
            allow.name,
            allow_rule_name(owner("alice-1"), "web-1", 3389, Protocol::Tcp)
        );
        assert_eq!(
            allow.labels,
            BTreeMap::from([
                (s(LABEL_MANAGED_BY), s("portcullis")),
                (s(LABEL_NSG), s("nsg-a")),
                (s(LABEL_POLICY), s("rdp")),
                (s(LABEL_REQUEST), s("alice-1")),
                (s(LABEL_MACHINE), s("web-1")),
                (s(LABEL_ROLE), s("allow")),
            ])
        );
        assert_eq!(allow.spec.network_security_group_name, "nsg-a");
        assert_eq!(allow.spec.expires_at, Some(Time(expires)));
        let f = &allow.spec.fields;
        assert_eq!(
            (f.priority, f.direction, f.access, f.protocol),
            (100, Direction::Inbound, Access::Allow, RuleProtocol::Tcp)
        );
        assert_eq!(f.source_address_prefix.as_deref(), Some("203.0.113.5"));
        assert_eq!(f.source_address_prefixes, None);
        assert_eq!(f.source_ports(), ["*"]);
        assert_eq!(f.destination_address_prefix.as_deref(), Some("fd00::10"));
        assert_eq!(f.destination_port_ranges, Some(vec![s("3389")]));

        let mut many = grant(&["0.0.0.0/0", "::/0"]);
        many.protocol = Protocol::Any;
        let allow = allow_rule(owner("alice-1"), "rdp", &many, 101, expires);
        assert_eq!(
            allow.name,
            allow_rule_name(owner("alice-1"), "web-1", 3389, Protocol::Any)
        );
        let f = &allow.spec.fields;
        assert_eq!(f.protocol, RuleProtocol::Any);
        assert_eq!(f.source_address_prefix, None);
        assert_eq!(
            f.source_address_prefixes,
            Some(vec![s("0.0.0.0/0"), s("::/0")])
        );
    }

    #[test]
    fn descriptions_fit_the_schema_for_long_names() {
        let expires = jiff::Timestamp::UNIX_EPOCH;
        let long = "r".repeat(253);
        let allow = allow_rule(owner(&long), "p", &grant(&["192.0.2.1/32"]), 100, expires);
        let text = allow.spec.fields.description.unwrap();
        assert_eq!(text.chars().count(), MAX_DESCRIPTION);
        assert!(text.ends_with('…'));
    }

    #[test]
    fn materialized_rules_serialize_with_the_api_field_names() {
        let expires: jiff::Timestamp = "2030-01-02T03:04:05Z".parse().unwrap();
        let allow = allow_rule(owner("a"), "p", &grant(&["192.0.2.1/32"]), 100, expires);
        let value = serde_json::to_value(&allow.spec).unwrap();
        assert_eq!(value["sourceAddressPrefix"], "192.0.2.1");
        assert_eq!(value["destinationPortRanges"], json!(["3389"]));
        assert_eq!(value["expiresAt"], "2030-01-02T03:04:05Z");
        assert_eq!(value["protocol"], "Tcp");
    }

    #[test]
    fn report_names_are_readable_valid_and_never_shared() {
        assert_eq!(report_name("web-nsg", "vm-1"), "web-nsg.vm-1");
        assert_eq!(
            report_name("web-nsg", "vm-1.example.com"),
            "web-nsg.vm-1.example.com"
        );
        // Split differently, the same text would be one name: the second form has no dot.
        let dotted = report_name("web.nsg", "vm-1");
        assert_ne!(dotted, report_name("web", "nsg.vm-1"));
        assert!(
            !dotted.contains('.') && dotted.starts_with("vm-1-"),
            "{dotted}"
        );
        let odd = [
            ("web-nsg", "VM_1"),
            ("web-nsg", "VM-1"),
            ("web.nsg", "vm-1"),
            ("web-nsg", &"a".repeat(300)),
            ("web-nsg", "___"),
        ];
        let names: std::collections::BTreeSet<String> =
            odd.iter().map(|(n, a)| report_name(n, a)).collect();
        assert_eq!(names.len(), odd.len(), "{names:?}");
        for name in &names {
            assert!(name.len() <= MAX_NAME && is_dns_subdomain(name), "{name}");
        }
        assert_eq!(
            report_name("web-nsg", "VM_1"),
            report_name("web-nsg", "VM_1")
        );
    }
}
