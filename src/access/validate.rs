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
    DEFAULT_MAX_DURATION, DEFAULT_PORTS, EstablishedConnections, PolicyProtocol,
    PolicyVirtualMachine,
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
    /// What the grant's connections do when it ends (the policy port's setting).
    pub established_connections: EstablishedConnections,
    /// How long the grant may carry no packet before it is revoked (the policy port's
    /// setting).
    pub idle_timeout: Option<Duration>,
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
    /// A scheduled start further ahead than [`MAX_START_AHEAD`] from the request.
    #[error("startTime {start} is more than 7 days after the request was made ({created})")]
    StartTooFarAhead {
        /// The requested start, RFC 3339.
        start: String,
        /// When the request was made.
        created: String,
    },
    /// An approver allowed to decide rejected the request.
    #[error("rejected by {approver}: {}", comment.as_deref().unwrap_or("no comment given"))]
    Rejected {
        /// Who rejected it.
        approver: String,
        /// Their comment.
        comment: Option<String>,
    },
}

/// How far ahead of its creation a request may schedule its start: a week.
pub const MAX_START_AHEAD: Duration = Duration::from_secs(7 * 86_400);

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
    /// What a grant's connections do when it ends.
    pub established_connections: EstablishedConnections,
    /// How long a grant may go without a packet, as written.
    pub idle_timeout: Option<String>,
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
                established_connections: EstablishedConnections::Keep,
                idle_timeout: None,
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
                    established_connections: p.established_connections,
                    idle_timeout: p.idle_timeout.clone(),
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
            if let (Some((protocol, sources, duration, entry)), Some(address)) = (checked, address)
            {
                let idle_timeout = match entry
                    .idle_timeout
                    .as_deref()
                    .map(duration::parse_policy_max)
                {
                    None => None,
                    Some(Ok(limit)) => Some(limit),
                    Some(Err(e)) => {
                        violations.push(Violation::InvalidPolicy {
                            machine: machine.to_owned(),
                            reason: format!("port {}: idleTimeout: {e}", port.number),
                        });
                        continue;
                    }
                };
                grants.push(PortGrant {
                    machine: machine.to_owned(),
                    address,
                    network_security_group: policy_vm.network_security_group_name.clone(),
                    number: port.number,
                    protocol,
                    sources,
                    duration,
                    established_connections: entry.established_connections,
                    idle_timeout,
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

/// Checks one requested port; returns its grant protocol, sources, duration and the policy
/// entry when it passes, after recording every violation it finds. `seen` holds the (port, protocol)
/// pairs already requested on the machine.
fn check_port<'a>(
    machine: &str,
    port: &RequestPort,
    allowed: &'a [AllowedPort],
    seen: &mut Vec<(u16, Protocol)>,
    violations: &mut Violations,
) -> Option<(Protocol, Vec<IpNet>, Duration, &'a AllowedPort)> {
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
        (Some(d), Some(s)) if clean => Some((protocol, s, d, entry)),
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
mod tests;
