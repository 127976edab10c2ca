//! Checks a `JitRequest` against its `JitPolicy` and computes exactly what may be opened.
//!
//! The schema (CEL) already refuses malformed values at `kubectl apply` time, but the checks
//! here never rely on it: objects written before a CRD change, or by a client that skipped
//! validation, must be refused with a clear message, never crash the operator and never open
//! more than the policy permits.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::api::jit_policy::{
    DEFAULT_MAX_DURATION, DEFAULT_PORTS, PolicyProtocol, PolicyVirtualMachine,
};
use crate::api::jit_request::RequestPort;
use crate::api::rule_fields::either;
use crate::api::{JitPolicySpec, JitRequestSpec};
use crate::rules::Protocol;
use crate::rules::duration::{self, DurationError};
use crate::rules::prefix::{AddressPrefix, Scope, any_covers};

/// One port to open on one machine: everything the allow rule needs, already parsed and
/// checked, so materializing it cannot fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortGrant {
    /// The machine's name in the policy (and the request).
    pub machine: String,
    /// The machine's address from the policy: the allow rule's only destination.
    pub address: IpAddr,
    /// The NSG that guards the machine and receives the allow rule.
    pub network_security_group: String,
    /// The destination port.
    pub number: u16,
    /// [`Protocol::Tcp`], [`Protocol::Udp`] or [`Protocol::Any`]; never ICMP.
    pub protocol: Protocol,
    /// The requested sources, normalized (host bits cleared) and deduplicated, in request
    /// order. A requested `*` becomes `0.0.0.0/0` and `::/0`, which is what it means.
    pub sources: Vec<IpNet>,
    /// How long the port stays open, at most the policy's `maxRequestAccessDuration`.
    pub duration: Duration,
}

/// Why a request may not be granted. Each message is what a user reads in
/// `kubectl describe jitr`, so it names the machine, the port and the offending values and
/// limits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// The request names a machine the policy does not protect.
    #[error("machine {machine:?} is not in the policy")]
    UnknownMachine {
        /// The machine name as requested.
        machine: String,
    },
    /// The port is not one of the machine's JIT ports.
    #[error(
        "machine {machine:?}: port {port} is not a JIT port of the policy (JIT ports: {})",
        join(allowed)
    )]
    PortNotInPolicy {
        /// The machine name.
        machine: String,
        /// The requested port.
        port: u16,
        /// The machine's JIT ports, sorted, so the user sees what may be asked for.
        allowed: Vec<u16>,
    },
    /// The policy has the port, but not for the requested protocol.
    #[error(
        "machine {machine:?}: port {port} may not be requested over {}; the policy allows {}",
        spell(*requested),
        join(allowed.iter().map(|p| spell(*p)))
    )]
    ProtocolMismatch {
        /// The machine name.
        machine: String,
        /// The requested port.
        port: u16,
        /// The protocol the request named.
        requested: PolicyProtocol,
        /// The protocols the policy lists for that port, in policy order.
        allowed: Vec<PolicyProtocol>,
    },
    /// The requested duration is longer than the port's `maxRequestAccessDuration`.
    #[error(
        "machine {machine:?}: port {port}: duration {requested} exceeds the policy maximum {max}"
    )]
    DurationTooLong {
        /// The machine name.
        machine: String,
        /// The requested port.
        port: u16,
        /// The requested duration, as written.
        requested: String,
        /// The policy's maximum, as written.
        max: String,
    },
    /// The requested duration is not an acceptable ISO 8601 duration.
    #[error("machine {machine:?}: port {port}: {reason}")]
    InvalidDuration {
        /// The machine name.
        machine: String,
        /// The requested port.
        port: u16,
        /// The requested duration, as written.
        value: String,
        /// Why it was refused (its message names the value too).
        reason: DurationError,
    },
    /// A requested source lies (at least partly) outside what the policy allows.
    #[error(
        "machine {machine:?}: port {port}: source {value} is not within the allowed source \
         prefixes ({})",
        join(allowed)
    )]
    SourceNotAllowed {
        /// The machine name.
        machine: String,
        /// The requested port.
        port: u16,
        /// The requested source, as written. (Not called `source`: thiserror would take a
        /// field of that name for the underlying error.)
        value: String,
        /// The policy's allowed prefixes, as written.
        allowed: Vec<String>,
    },
    /// A requested source is neither `*`, an IP address nor a CIDR.
    #[error(
        "machine {machine:?}: port {port}: source {value:?} is not \"*\", an IP address or a CIDR"
    )]
    InvalidSource {
        /// The machine name.
        machine: String,
        /// The requested port.
        port: u16,
        /// The rejected source, as written.
        value: String,
    },
    /// The port names no source at all; opening it would have no meaning.
    #[error(
        "machine {machine:?}: port {port}: no source given; set allowedSourceAddressPrefix \
         or allowedSourceAddressPrefixes"
    )]
    SourceMissing {
        /// The machine name.
        machine: String,
        /// The requested port.
        port: u16,
    },
    /// The same port (with an overlapping protocol) is asked for twice on one machine.
    #[error("machine {machine:?}: port {port} is requested more than once")]
    DuplicatePort {
        /// The machine name.
        machine: String,
        /// The repeated port.
        port: u16,
    },
    /// The request lists the same machine twice.
    #[error("machine {machine:?} is listed more than once in the request")]
    DuplicateMachine {
        /// The repeated machine name.
        machine: String,
    },
    /// The policy has `requireJustification` and the request gives none (or only blanks).
    #[error("the policy requires a justification, but the request gives none")]
    JustificationRequired,
    /// The policy itself is unusable for this machine (CEL should have prevented it).
    #[error("machine {machine:?}: the policy is invalid: {reason}")]
    InvalidPolicy {
        /// The machine name.
        machine: String,
        /// What is wrong with the policy.
        reason: String,
    },
    /// No authenticated requestor is recorded on the request. Raised by the controller, not
    /// by [`validate`]: who asked is a matter of authentication and authorization, which this
    /// pure layer cannot check, while what was asked is.
    #[error("no authenticated requestor is recorded on the request")]
    RequestorMissing,
    /// The apiserver's authorizer says the requestor may not use the policy (checked when
    /// the operator is about to grant: a request may wait long after admission, and
    /// permissions may have been withdrawn meanwhile).
    #[error("{requestor} may not {verb} jitpolicies/{policy} in namespace {namespace}: {why}")]
    NotAuthorized {
        /// The recorded requestor's username.
        requestor: String,
        /// The verb that was refused (`initiate`).
        verb: String,
        /// The policy the request names.
        policy: String,
        /// The request's namespace.
        namespace: String,
        /// The authorizer's reason, or what role would grant the verb.
        why: String,
    },
}

/// One JIT port of a policy machine with the policy defaults applied, so that validation and
/// materialization read a single, complete shape instead of re-deriving the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedPort {
    /// The port number.
    pub number: u16,
    /// The policy's protocol for it (`*` when a listed port omits it).
    pub protocol: PolicyProtocol,
    /// The allowed source prefixes as written; `["*"]` when neither field is set.
    pub allowed_sources: Vec<String>,
    /// The longest access one request may get, as written.
    pub max_duration: String,
}

/// The machine's JIT ports with defaults applied: when `ports` is omitted, Azure's defaults
/// (22, 3389, 5985, 5986 over TCP, any source, `PT3H`); a listed port without sources allows
/// any source (`*`).
pub fn policy_ports(machine: &PolicyVirtualMachine) -> Vec<AllowedPort> {
    match &machine.ports {
        None => DEFAULT_PORTS
            .iter()
            .map(|&number| AllowedPort {
                number,
                protocol: PolicyProtocol::Tcp,
                allowed_sources: vec!["*".to_owned()],
                max_duration: DEFAULT_MAX_DURATION.to_owned(),
            })
            .collect(),
        Some(ports) => ports
            .iter()
            .map(|p| {
                let sources = either(
                    &p.allowed_source_address_prefix,
                    &p.allowed_source_address_prefixes,
                );
                AllowedPort {
                    number: p.number,
                    protocol: p.protocol,
                    allowed_sources: if sources.is_empty() {
                        vec!["*".to_owned()]
                    } else {
                        sources.into_iter().map(str::to_owned).collect()
                    },
                    max_duration: p.max_request_access_duration.clone(),
                }
            })
            .collect(),
    }
}

pub use crate::api::convert::model_protocol;

/// Decides whether `request` may be granted under `policy`.
///
/// Returns the grants, in request order, or every violation found (each reported once), so a
/// denied user can fix the whole request at once. The rules:
///
/// - every requested machine is in the policy and appears once in the request;
/// - every requested port is a JIT port of that machine. A request that names a protocol
///   gets the policy entry with exactly that protocol, else the `*` entry (and keeps the
///   protocol it named); a request naming `*` needs a `*` entry, since it would open more.
///   A request that omits the protocol gets the policy entry's protocol; if the policy lists
///   the number under several protocols, the `*` entry is chosen, else TCP, else UDP, so the
///   choice never depends on list order;
/// - the same port is not requested twice on a machine with overlapping protocols (`*`
///   overlaps everything): the grants would open the same traffic twice;
/// - the duration is a valid ISO 8601 duration no longer than the entry's
///   `maxRequestAccessDuration` (itself at most 24 h);
/// - at least one source is given, each is `*`, an IP address or a CIDR, and each lies
///   wholly inside one allowed prefix; `*` only where the policy allows `*`;
/// - with `requireJustification`, the justification is not blank.
///
/// The requestor is not checked here: see [`Violation::RequestorMissing`].
pub fn validate(
    policy: &JitPolicySpec,
    request: &JitRequestSpec,
) -> Result<Vec<PortGrant>, Vec<Violation>> {
    let mut violations = Violations::default();
    let mut grants = Vec::new();

    if policy.require_justification
        && request
            .justification
            .as_deref()
            .is_none_or(|j| j.trim().is_empty())
    {
        violations.push(Violation::JustificationRequired);
    }

    let mut requested: HashMap<&str, Vec<(u16, Protocol)>> = HashMap::new();
    for vm in &request.virtual_machines {
        let machine = vm.name.as_str();
        if requested.contains_key(machine) {
            violations.push(Violation::DuplicateMachine {
                machine: machine.to_owned(),
            });
        }
        let seen = requested.entry(machine).or_default();
        let Some(policy_vm) = policy.virtual_machines.iter().find(|m| m.name == vm.name) else {
            violations.push(Violation::UnknownMachine {
                machine: machine.to_owned(),
            });
            continue;
        };
        let address = match policy_vm.address.parse::<IpAddr>() {
            Ok(address) => Some(address),
            Err(_) => {
                violations.push(Violation::InvalidPolicy {
                    machine: machine.to_owned(),
                    reason: format!("address {:?} is not an IP address", policy_vm.address),
                });
                None
            }
        };
        let allowed = policy_ports(policy_vm);
        for port in &vm.ports {
            let checked = check_port(machine, port, &allowed, seen, &mut violations);
            if let (Some((protocol, sources, duration)), Some(address)) = (checked, address) {
                grants.push(PortGrant {
                    machine: machine.to_owned(),
                    address,
                    network_security_group: policy_vm.network_security_group_name.clone(),
                    number: port.number,
                    protocol,
                    sources,
                    duration,
                });
            }
        }
    }

    if violations.0.is_empty() {
        Ok(grants)
    } else {
        Err(violations.0)
    }
}

/// Violations in the order found, each kept once: a machine listed twice must not repeat
/// the same complaint about the policy.
#[derive(Default)]
struct Violations(Vec<Violation>);

impl Violations {
    fn push(&mut self, v: Violation) {
        if !self.0.contains(&v) {
            self.0.push(v);
        }
    }
}

/// Checks one requested port; returns its grant protocol, sources and duration when it
/// passes, after recording every violation it finds. `seen` holds the (port, protocol)
/// pairs already requested on the machine.
fn check_port(
    machine: &str,
    port: &RequestPort,
    allowed: &[AllowedPort],
    seen: &mut Vec<(u16, Protocol)>,
    violations: &mut Violations,
) -> Option<(Protocol, Vec<IpNet>, Duration)> {
    let number = port.number;
    let (entry, protocol) = resolve_entry(machine, port, allowed, violations)?;
    let before = violations.0.len();

    if seen
        .iter()
        .any(|&(n, p)| n == number && p.overlaps(protocol))
    {
        violations.push(Violation::DuplicatePort {
            machine: machine.to_owned(),
            port: number,
        });
    }
    seen.push((number, protocol));

    let duration = check_duration(machine, port, entry, violations);
    let sources = check_sources(machine, port, entry, violations);

    let clean = violations.0.len() == before;
    match (duration, sources) {
        (Some(d), Some(s)) if clean => Some((protocol, s, d)),
        _ => None,
    }
}

/// Finds the policy entry a requested port falls under and the protocol the grant gets, or
/// records why there is none. See [`validate`] for the choice among several entries.
fn resolve_entry<'a>(
    machine: &str,
    port: &RequestPort,
    allowed: &'a [AllowedPort],
    violations: &mut Violations,
) -> Option<(&'a AllowedPort, Protocol)> {
    let candidates: Vec<&AllowedPort> =
        allowed.iter().filter(|a| a.number == port.number).collect();
    if candidates.is_empty() {
        let mut numbers: Vec<u16> = allowed.iter().map(|a| a.number).collect();
        numbers.sort_unstable();
        numbers.dedup();
        violations.push(Violation::PortNotInPolicy {
            machine: machine.to_owned(),
            port: port.number,
            allowed: numbers,
        });
        return None;
    }
    let with = |p: PolicyProtocol| candidates.iter().copied().find(|a| a.protocol == p);
    match port.protocol {
        Some(requested) => match with(requested).or_else(|| with(PolicyProtocol::Any)) {
            Some(entry) => Some((entry, model_protocol(requested))),
            None => {
                violations.push(Violation::ProtocolMismatch {
                    machine: machine.to_owned(),
                    port: port.number,
                    requested,
                    allowed: candidates.iter().map(|a| a.protocol).collect(),
                });
                None
            }
        },
        None => [
            PolicyProtocol::Any,
            PolicyProtocol::Tcp,
            PolicyProtocol::Udp,
        ]
        .into_iter()
        .find_map(with)
        .map(|entry| (entry, model_protocol(entry.protocol))),
    }
}

/// Parses the requested duration and bounds it by the entry's maximum.
fn check_duration(
    machine: &str,
    port: &RequestPort,
    entry: &AllowedPort,
    violations: &mut Violations,
) -> Option<Duration> {
    let max = match duration::parse_policy_max(&entry.max_duration) {
        Ok(max) => Some(max),
        Err(e) => {
            violations.push(Violation::InvalidPolicy {
                machine: machine.to_owned(),
                reason: format!("port {}: maxRequestAccessDuration: {e}", port.number),
            });
            None
        }
    };
    let requested = match duration::parse(&port.duration) {
        Ok(d) => d,
        Err(reason) => {
            violations.push(Violation::InvalidDuration {
                machine: machine.to_owned(),
                port: port.number,
                value: port.duration.clone(),
                reason,
            });
            return None;
        }
    };
    // Without a usable policy maximum the absolute bound still applies, so the user learns
    // about an over-long request even while the policy is being fixed.
    let (bound, shown) = match max {
        Some(max) => (max, entry.max_duration.clone()),
        None => (
            duration::MAX_DURATION,
            duration::format(duration::MAX_DURATION),
        ),
    };
    if requested > bound {
        violations.push(Violation::DurationTooLong {
            machine: machine.to_owned(),
            port: port.number,
            requested: port.duration.clone(),
            max: shown,
        });
        return None;
    }
    max.map(|_| requested)
}

/// Parses the requested sources and checks each lies inside one allowed prefix.
fn check_sources(
    machine: &str,
    port: &RequestPort,
    entry: &AllowedPort,
    violations: &mut Violations,
) -> Option<Vec<IpNet>> {
    let mut allowed = Vec::new();
    for value in &entry.allowed_sources {
        match source_prefix(value) {
            Some(prefix) => allowed.push(prefix),
            None => violations.push(Violation::InvalidPolicy {
                machine: machine.to_owned(),
                reason: format!(
                    "port {}: allowed source {value:?} is not \"*\", an IP address or a CIDR",
                    port.number
                ),
            }),
        }
    }

    let requested = either(
        &port.allowed_source_address_prefix,
        &port.allowed_source_address_prefixes,
    );
    if requested.is_empty() {
        violations.push(Violation::SourceMissing {
            machine: machine.to_owned(),
            port: port.number,
        });
        return None;
    }

    let mut sources = Vec::new();
    let mut ok = true;
    for value in requested {
        let (nets, permitted) = match source_prefix(value) {
            Some(AddressPrefix::Net(net)) => {
                (vec![net], any_covers(&allowed, &net, &Scope::default()))
            }
            Some(_) => (ANYWHERE.to_vec(), allowed.contains(&AddressPrefix::Any)),
            None => {
                violations.push(Violation::InvalidSource {
                    machine: machine.to_owned(),
                    port: port.number,
                    value: value.to_owned(),
                });
                ok = false;
                continue;
            }
        };
        if !permitted {
            violations.push(Violation::SourceNotAllowed {
                machine: machine.to_owned(),
                port: port.number,
                value: value.to_owned(),
                allowed: entry.allowed_sources.clone(),
            });
            ok = false;
            continue;
        }
        for net in nets {
            if !sources.contains(&net) {
                sources.push(net);
            }
        }
    }
    ok.then_some(sources)
}

/// What a requested `*` opens: every IPv4 and every IPv6 address. Only a policy `*` allows
/// it, so a policy listing `0.0.0.0/0` alone does not silently open IPv6 too.
const ANYWHERE: [IpNet; 2] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0)),
];

/// A JIT source: `*` or an address or CIDR. Service tags are refused: they only mean
/// something relative to an NSG's virtual network, and resolving them without one would
/// make `Internet` cover everything.
fn source_prefix(value: &str) -> Option<AddressPrefix> {
    match value.parse::<AddressPrefix>() {
        Ok(p @ (AddressPrefix::Any | AddressPrefix::Net(_))) => Some(p),
        _ => None,
    }
}

/// The policy/request spelling of a protocol, for messages users compare with their YAML.
fn spell(p: PolicyProtocol) -> &'static str {
    match p {
        PolicyProtocol::Tcp => "TCP",
        PolicyProtocol::Udp => "UDP",
        PolicyProtocol::Any => "*",
    }
}

/// Joins values with `, ` for messages.
fn join<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn policy(value: Value) -> JitPolicySpec {
        serde_json::from_value(value).unwrap()
    }

    /// A policy exercising every port shape: singular and plural sources, `*`, UDP, and a
    /// machine on the defaults.
    fn fixture() -> JitPolicySpec {
        policy(json!({
            "requireJustification": true,
            "virtualMachines": [
                {
                    "name": "web",
                    "address": "10.0.0.4",
                    "networkSecurityGroupName": "nsg-a",
                    "ports": [
                        {"number": 22, "protocol": "TCP",
                         "allowedSourceAddressPrefix": "203.0.113.0/24",
                         "maxRequestAccessDuration": "PT3H"},
                        {"number": 3389, "protocol": "TCP",
                         "allowedSourceAddressPrefixes": ["198.51.100.0/24", "2001:db8::/32"],
                         "maxRequestAccessDuration": "PT1H"},
                        {"number": 53, "protocol": "*"},
                        {"number": 161, "protocol": "UDP", "maxRequestAccessDuration": "PT30M"}
                    ]
                },
                {"name": "db", "address": "fd00::10", "networkSecurityGroupName": "nsg-b"}
            ]
        }))
    }

    fn request(justification: Option<&str>, machines: Value) -> JitRequestSpec {
        serde_json::from_value(json!({
            "policyName": "p",
            "justification": justification,
            "virtualMachines": machines,
        }))
        .unwrap()
    }

    /// One machine, one port: the shape of most cases.
    fn one(machine: &str, port: Value) -> JitRequestSpec {
        request(
            Some("ticket 42"),
            json!([{"name": machine, "ports": [port]}]),
        )
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    /// The machine and port a violation is about, to check its message names them.
    fn subject(v: &Violation) -> (Option<&str>, Option<u16>) {
        use Violation::*;
        match v {
            UnknownMachine { machine } | DuplicateMachine { machine } => (Some(machine), None),
            InvalidPolicy { machine, .. } => (Some(machine), None),
            PortNotInPolicy { machine, port, .. }
            | ProtocolMismatch { machine, port, .. }
            | DurationTooLong { machine, port, .. }
            | InvalidDuration { machine, port, .. }
            | SourceNotAllowed { machine, port, .. }
            | InvalidSource { machine, port, .. }
            | SourceMissing { machine, port }
            | DuplicatePort { machine, port } => (Some(machine), Some(*port)),
            JustificationRequired | RequestorMissing | NotAuthorized { .. } => (None, None),
        }
    }

    /// A table row: name, policy, request, the exact violations, words the messages contain.
    type Case = (
        &'static str,
        JitPolicySpec,
        JitRequestSpec,
        Vec<Violation>,
        &'static [&'static str],
    );

    #[test]
    fn every_violation_is_reported_precisely() {
        let p = fixture();
        let cases: Vec<Case> = vec![
            (
                "unknown machine",
                p.clone(),
                one(
                    "mail",
                    json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"}),
                ),
                vec![Violation::UnknownMachine { machine: s("mail") }],
                &["not in the policy"],
            ),
            (
                "port not in policy",
                p.clone(),
                one(
                    "web",
                    json!({"number": 8080, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"}),
                ),
                vec![Violation::PortNotInPolicy {
                    machine: s("web"),
                    port: 8080,
                    allowed: vec![22, 53, 161, 3389],
                }],
                &["JIT ports: 22, 53, 161, 3389"],
            ),
            (
                "protocol mismatch",
                p.clone(),
                one(
                    "web",
                    json!({"number": 22, "protocol": "UDP", "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"}),
                ),
                vec![Violation::ProtocolMismatch {
                    machine: s("web"),
                    port: 22,
                    requested: PolicyProtocol::Udp,
                    allowed: vec![PolicyProtocol::Tcp],
                }],
                &["over UDP", "allows TCP"],
            ),
            (
                "a requested * protocol needs a policy *",
                p.clone(),
                one(
                    "web",
                    json!({"number": 22, "protocol": "*", "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"}),
                ),
                vec![Violation::ProtocolMismatch {
                    machine: s("web"),
                    port: 22,
                    requested: PolicyProtocol::Any,
                    allowed: vec![PolicyProtocol::Tcp],
                }],
                &["over *"],
            ),
            (
                "duration too long",
                p.clone(),
                one(
                    "web",
                    json!({"number": 3389, "duration": "PT2H", "allowedSourceAddressPrefix": "198.51.100.7"}),
                ),
                vec![Violation::DurationTooLong {
                    machine: s("web"),
                    port: 3389,
                    requested: s("PT2H"),
                    max: s("PT1H"),
                }],
                &["PT2H", "maximum PT1H"],
            ),
            (
                "invalid duration",
                p.clone(),
                one(
                    "web",
                    json!({"number": 22, "duration": "P1M", "allowedSourceAddressPrefix": "203.0.113.5"}),
                ),
                vec![Violation::InvalidDuration {
                    machine: s("web"),
                    port: 22,
                    value: s("P1M"),
                    reason: DurationError::CalendarUnits { value: s("P1M") },
                }],
                &["\"P1M\""],
            ),
            (
                "source outside the allowed prefix",
                p.clone(),
                one(
                    "web",
                    json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "198.51.100.7"}),
                ),
                vec![Violation::SourceNotAllowed {
                    machine: s("web"),
                    port: 22,
                    value: s("198.51.100.7"),
                    allowed: vec![s("203.0.113.0/24")],
                }],
                &["198.51.100.7", "203.0.113.0/24"],
            ),
            (
                "source only partly inside the allowed prefix",
                p.clone(),
                one(
                    "web",
                    json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.112.0/23"}),
                ),
                vec![Violation::SourceNotAllowed {
                    machine: s("web"),
                    port: 22,
                    value: s("203.0.112.0/23"),
                    allowed: vec![s("203.0.113.0/24")],
                }],
                &["203.0.112.0/23"],
            ),
            (
                "source * where the policy does not allow *",
                p.clone(),
                one(
                    "web",
                    json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}),
                ),
                vec![Violation::SourceNotAllowed {
                    machine: s("web"),
                    port: 22,
                    value: s("*"),
                    allowed: vec![s("203.0.113.0/24")],
                }],
                &["source *"],
            ),
            (
                "source that is a service tag",
                p.clone(),
                one(
                    "web",
                    json!({"number": 53, "duration": "PT1H", "allowedSourceAddressPrefix": "Internet"}),
                ),
                vec![Violation::InvalidSource {
                    machine: s("web"),
                    port: 53,
                    value: s("Internet"),
                }],
                &["\"Internet\""],
            ),
            (
                "source that is garbage",
                p.clone(),
                one(
                    "web",
                    json!({"number": 53, "duration": "PT1H", "allowedSourceAddressPrefixes": ["10.0.0.300"]}),
                ),
                vec![Violation::InvalidSource {
                    machine: s("web"),
                    port: 53,
                    value: s("10.0.0.300"),
                }],
                &["\"10.0.0.300\""],
            ),
            (
                "no source",
                p.clone(),
                one("web", json!({"number": 53, "duration": "PT1H"})),
                vec![Violation::SourceMissing {
                    machine: s("web"),
                    port: 53,
                }],
                &["no source"],
            ),
            (
                "same port twice",
                p.clone(),
                request(
                    Some("x"),
                    json!([{"name": "web", "ports": [
                        {"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"},
                        {"number": 22, "protocol": "TCP", "duration": "PT2H", "allowedSourceAddressPrefix": "203.0.113.6"}
                    ]}]),
                ),
                vec![Violation::DuplicatePort {
                    machine: s("web"),
                    port: 22,
                }],
                &["more than once"],
            ),
            (
                "same port with overlapping protocols",
                p.clone(),
                request(
                    Some("x"),
                    json!([{"name": "web", "ports": [
                        {"number": 53, "protocol": "UDP", "duration": "PT1H", "allowedSourceAddressPrefix": "*"},
                        {"number": 53, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}
                    ]}]),
                ),
                vec![Violation::DuplicatePort {
                    machine: s("web"),
                    port: 53,
                }],
                &["more than once"],
            ),
            (
                "same machine twice",
                p.clone(),
                request(
                    Some("x"),
                    json!([
                        {"name": "db", "ports": [{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}]},
                        {"name": "db", "ports": [{"number": 3389, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}]}
                    ]),
                ),
                vec![Violation::DuplicateMachine { machine: s("db") }],
                &["more than once"],
            ),
            (
                "blank justification",
                p.clone(),
                request(
                    Some(" \t\n"),
                    json!([{"name": "db", "ports": [{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}]}]),
                ),
                vec![Violation::JustificationRequired],
                &["justification"],
            ),
            (
                "missing justification",
                p.clone(),
                request(
                    None,
                    json!([{"name": "db", "ports": [{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}]}]),
                ),
                vec![Violation::JustificationRequired],
                &["justification"],
            ),
            (
                "policy address that is not an IP",
                policy(
                    json!({"virtualMachines": [{"name": "m", "address": "m.example", "networkSecurityGroupName": "n"}]}),
                ),
                one(
                    "m",
                    json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}),
                ),
                vec![Violation::InvalidPolicy {
                    machine: s("m"),
                    reason: s("address \"m.example\" is not an IP address"),
                }],
                &["m.example"],
            ),
            (
                "policy maximum that is not a duration",
                policy(
                    json!({"virtualMachines": [{"name": "m", "address": "10.0.0.1", "networkSecurityGroupName": "n",
                    "ports": [{"number": 22, "protocol": "TCP", "maxRequestAccessDuration": "PT48H"}]}]}),
                ),
                one(
                    "m",
                    json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}),
                ),
                vec![Violation::InvalidPolicy {
                    machine: s("m"),
                    reason: s(
                        "port 22: maxRequestAccessDuration: duration \"PT48H\" exceeds the maximum PT24H",
                    ),
                }],
                &["PT48H"],
            ),
            (
                "policy source that is a tag (would cover everything without a scope)",
                policy(
                    json!({"virtualMachines": [{"name": "m", "address": "10.0.0.1", "networkSecurityGroupName": "n",
                    "ports": [{"number": 22, "protocol": "TCP", "allowedSourceAddressPrefix": "Internet"}]}]}),
                ),
                one(
                    "m",
                    json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"}),
                ),
                vec![
                    Violation::InvalidPolicy {
                        machine: s("m"),
                        reason: s(
                            "port 22: allowed source \"Internet\" is not \"*\", an IP address or a CIDR",
                        ),
                    },
                    Violation::SourceNotAllowed {
                        machine: s("m"),
                        port: 22,
                        value: s("203.0.113.5"),
                        allowed: vec![s("Internet")],
                    },
                ],
                &["Internet"],
            ),
        ];
        for (name, policy, request, want, mentions) in cases {
            let got = validate(&policy, &request).expect_err(name);
            assert_eq!(got, want, "{name}");
            for v in &got {
                let message = v.to_string();
                let (machine, port) = subject(v);
                if let Some(machine) = machine {
                    assert!(
                        message.contains(&format!("{machine:?}")),
                        "{name}: {message}"
                    );
                }
                if let Some(port) = port {
                    assert!(
                        message.contains(&format!("port {port}")),
                        "{name}: {message}"
                    );
                }
            }
            let all: Vec<String> = got.iter().map(ToString::to_string).collect();
            for m in mentions {
                assert!(
                    all.iter().any(|a| a.contains(m)),
                    "{name}: {m:?} not in {all:?}"
                );
            }
        }
    }

    #[test]
    fn requestor_missing_reads_well() {
        assert_eq!(
            Violation::RequestorMissing.to_string(),
            "no authenticated requestor is recorded on the request"
        );
    }

    #[test]
    fn reports_all_violations_at_once_in_request_order() {
        let got = validate(
            &fixture(),
            &request(
                Some(""),
                json!([
                    {"name": "mail", "ports": [{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}]},
                    {"name": "web", "ports": [
                        {"number": 23, "duration": "PT1H", "allowedSourceAddressPrefix": "*"},
                        {"number": 22, "duration": "PT4H", "allowedSourceAddressPrefixes": ["203.0.113.5", "192.0.2.1", "nope"]}
                    ]}
                ]),
            ),
        )
        .unwrap_err();
        assert_eq!(
            got,
            vec![
                Violation::JustificationRequired,
                Violation::UnknownMachine { machine: s("mail") },
                Violation::PortNotInPolicy {
                    machine: s("web"),
                    port: 23,
                    allowed: vec![22, 53, 161, 3389]
                },
                Violation::DurationTooLong {
                    machine: s("web"),
                    port: 22,
                    requested: s("PT4H"),
                    max: s("PT3H")
                },
                Violation::SourceNotAllowed {
                    machine: s("web"),
                    port: 22,
                    value: s("192.0.2.1"),
                    allowed: vec![s("203.0.113.0/24")]
                },
                Violation::InvalidSource {
                    machine: s("web"),
                    port: 22,
                    value: s("nope")
                },
            ]
        );
    }

    #[test]
    fn omitted_ports_mean_the_defaults() {
        let p = fixture();
        let db = &p.virtual_machines[1];
        let want: Vec<AllowedPort> = [22, 3389, 5985, 5986]
            .into_iter()
            .map(|number| AllowedPort {
                number,
                protocol: PolicyProtocol::Tcp,
                allowed_sources: vec![s("*")],
                max_duration: s("PT3H"),
            })
            .collect();
        assert_eq!(policy_ports(db), want);

        let ok = |port: Value| validate(&p, &one("db", port));
        assert!(ok(json!({"number": 5986, "duration": "PT3H", "allowedSourceAddressPrefix": "192.0.2.1"})).is_ok());
        assert_eq!(
            ok(
                json!({"number": 5985, "duration": "PT3H1S", "allowedSourceAddressPrefix": "192.0.2.1"})
            ),
            Err(vec![Violation::DurationTooLong {
                machine: s("db"),
                port: 5985,
                requested: s("PT3H1S"),
                max: s("PT3H")
            }])
        );
        assert_eq!(
            ok(
                json!({"number": 22, "protocol": "UDP", "duration": "PT1H", "allowedSourceAddressPrefix": "192.0.2.1"})
            ),
            Err(vec![Violation::ProtocolMismatch {
                machine: s("db"),
                port: 22,
                requested: PolicyProtocol::Udp,
                allowed: vec![PolicyProtocol::Tcp]
            }])
        );
    }

    #[test]
    fn listed_ports_default_to_any_protocol_and_source() {
        let p = fixture();
        let ports = policy_ports(&p.virtual_machines[0]);
        assert_eq!(
            ports[2],
            AllowedPort {
                number: 53,
                protocol: PolicyProtocol::Any,
                allowed_sources: vec![s("*")],
                max_duration: s("PT3H")
            }
        );
        assert_eq!(
            ports[1].allowed_sources,
            vec![s("198.51.100.0/24"), s("2001:db8::/32")]
        );
    }

    #[test]
    fn star_source_needs_a_policy_star_and_opens_both_families() {
        let open = |policy_source: &str, requested: &str| {
            let p = policy(
                json!({"virtualMachines": [{"name": "m", "address": "10.0.0.1", "networkSecurityGroupName": "n",
                "ports": [{"number": 22, "protocol": "TCP", "allowedSourceAddressPrefix": policy_source}]}]}),
            );
            validate(&p, &one("m", json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": requested})))
                .map(|g| g[0].sources.clone())
        };
        assert_eq!(open("*", "*"), Ok(vec![net("0.0.0.0/0"), net("::/0")]));
        assert!(
            open("0.0.0.0/0", "*").is_err(),
            "0.0.0.0/0 does not allow IPv6 too"
        );
        assert_eq!(open("0.0.0.0/0", "0.0.0.0/0"), Ok(vec![net("0.0.0.0/0")]));
        assert_eq!(open("*", "2001:db8::7"), Ok(vec![net("2001:db8::7/128")]));
    }

    #[test]
    fn ipv6_sources_are_checked_by_containment() {
        let p = fixture();
        let ok = |sources: Value| {
            validate(
                &p,
                &one(
                    "web",
                    json!({"number": 3389, "duration": "PT1H", "allowedSourceAddressPrefixes": sources}),
                ),
            )
        };
        assert_eq!(
            ok(json!(["2001:db8:1::/48", "2001:db8::1"])).unwrap()[0].sources,
            vec![net("2001:db8:1::/48"), net("2001:db8::1/128")]
        );
        assert_eq!(
            ok(json!(["2001:db9::1"])),
            Err(vec![Violation::SourceNotAllowed {
                machine: s("web"),
                port: 3389,
                value: s("2001:db9::1"),
                allowed: vec![s("198.51.100.0/24"), s("2001:db8::/32")],
            }])
        );
        assert!(
            ok(json!(["2001:db8::/31"])).is_err(),
            "wider than the allowed /32"
        );
    }

    #[test]
    fn omitted_protocol_picks_star_then_tcp_whatever_the_order() {
        let grant_protocol = |protocols: &[&str], requested: Option<&str>| {
            let ports: Vec<Value> = protocols
                .iter()
                .map(|p| json!({"number": 22, "protocol": p, "maxRequestAccessDuration": if *p == "UDP" { "PT10M" } else { "PT3H" }}))
                .collect();
            let p = policy(
                json!({"virtualMachines": [{"name": "m", "address": "10.0.0.1", "networkSecurityGroupName": "n", "ports": ports}]}),
            );
            let mut port = json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "192.0.2.1"});
            if let Some(r) = requested {
                port["protocol"] = json!(r);
            }
            validate(&p, &one("m", port)).map(|g| g[0].protocol)
        };
        assert_eq!(
            grant_protocol(&["UDP", "TCP", "*"], None),
            Ok(Protocol::Any)
        );
        assert_eq!(grant_protocol(&["UDP", "TCP"], None), Ok(Protocol::Tcp));
        assert_eq!(grant_protocol(&["TCP", "UDP"], None), Ok(Protocol::Tcp));
        assert_eq!(
            grant_protocol(&["UDP"], None),
            Err(vec![Violation::DurationTooLong {
                machine: s("m"),
                port: 22,
                requested: s("PT1H"),
                max: s("PT10M"),
            }])
        );
        assert_eq!(grant_protocol(&["*"], Some("UDP")), Ok(Protocol::Udp));
        assert!(
            grant_protocol(&["TCP", "UDP"], Some("UDP")).is_err(),
            "the UDP entry's PT10M applies"
        );
        assert_eq!(
            grant_protocol(&["UDP", "*"], Some("TCP")),
            Ok(Protocol::Tcp)
        );
    }

    #[test]
    fn grants_exactly_what_was_asked_in_request_order() {
        let got = validate(
            &fixture(),
            &request(
                Some("incident 7"),
                json!([
                    {"name": "web", "ports": [
                        {"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"},
                        {"number": 3389, "protocol": "TCP", "duration": "PT30M",
                         "allowedSourceAddressPrefixes": ["198.51.100.0/25", "2001:db8:1::/48", "198.51.100.9/25"]},
                        {"number": 53, "protocol": "UDP", "duration": "PT20S", "allowedSourceAddressPrefix": "*"},
                        {"number": 161, "duration": "PT30M", "allowedSourceAddressPrefix": "192.0.2.0/24"}
                    ]},
                    {"name": "db", "ports": [
                        {"number": 5985, "duration": "P0DT3H", "allowedSourceAddressPrefix": "*"}
                    ]}
                ]),
            ),
        )
        .unwrap();
        let web = |number, protocol, sources: &[&str], secs| PortGrant {
            machine: s("web"),
            address: "10.0.0.4".parse().unwrap(),
            network_security_group: s("nsg-a"),
            number,
            protocol,
            sources: sources.iter().map(|x| net(x)).collect(),
            duration: Duration::from_secs(secs),
        };
        assert_eq!(
            got,
            vec![
                web(22, Protocol::Tcp, &["203.0.113.5/32"], 3600),
                web(
                    3389,
                    Protocol::Tcp,
                    &["198.51.100.0/25", "2001:db8:1::/48"],
                    1800
                ),
                web(53, Protocol::Udp, &["0.0.0.0/0", "::/0"], 20),
                web(161, Protocol::Udp, &["192.0.2.0/24"], 1800),
                PortGrant {
                    machine: s("db"),
                    address: "fd00::10".parse().unwrap(),
                    network_security_group: s("nsg-b"),
                    number: 5985,
                    protocol: Protocol::Tcp,
                    sources: vec![net("0.0.0.0/0"), net("::/0")],
                    duration: Duration::from_secs(3 * 3600),
                },
            ]
        );
    }
}
