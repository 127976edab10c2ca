//! Where the operator puts its JIT rules among a user's NSG rules.
//!
//! The JIT deny must not override user rules that already govern the
//! protected ports (users keep precedence), and JIT allows must beat the
//! deny; both must avoid priorities users already took so they never
//! conflict with user rules.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::model::{Direction, Protocol, Rule};
use super::ports::PortRange;
use super::prefix::Scope;

/// Highest-precedence priority a user or JIT rule may use (Azure's bound).
pub const MIN_PRIORITY: u32 = 100;

/// Lowest-precedence priority a user or JIT rule may use (Azure's bound).
pub const MAX_PRIORITY: u32 = 4096;

/// Why JIT rules cannot be placed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Every inbound priority from `lowest` to [`MAX_PRIORITY`] is taken by
    /// user rules (or, for the deny, user rules matching the ports sit too
    /// close to the bottom), so the rule cannot be inserted without
    /// clashing with a user rule.
    #[error(
        "no free inbound priority in {lowest}..={MAX_PRIORITY} for the JIT {kind} rule; \
         free a priority or move user rules matching the JIT ports to a lower number"
    )]
    NoPriorityAvailable {
        /// Which JIT rule could not be placed: `allow` or `deny`.
        kind: &'static str,
        /// The first priority that would have been acceptable.
        lowest: u32,
    },
}

/// Priorities for one machine's JIT rules: request allows use `allow`, the
/// policy's deny uses `deny`; always `allow < deny`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Priority of the allow rules granted by requests.
    pub allow: u32,
    /// Priority of the policy's deny rule.
    pub deny: u32,
}

/// Smallest priority in `lowest..=MAX_PRIORITY` not in `taken`.
fn first_free(
    taken: &BTreeSet<u32>,
    lowest: u32,
    kind: &'static str,
) -> Result<u32, PlacementError> {
    (lowest..=MAX_PRIORITY)
        .find(|p| !taken.contains(p))
        .ok_or(PlacementError::NoPriorityAvailable { kind, lowest })
}

/// Whether `rule` already governs some of the JIT `ports` on `destination`.
fn governs(
    rule: &Rule,
    destination: IpAddr,
    ports: &[(PortRange, Protocol)],
    scope: &Scope,
) -> bool {
    rule.destination_prefixes
        .iter()
        .any(|p| p.matches(destination, scope))
        && ports.iter().any(|(range, protocol)| {
            rule.protocol.overlaps(*protocol)
                && rule.destination_ports.iter().any(|r| r.overlaps(range))
        })
}

/// Chooses priorities for the JIT rules protecting `ports` on
/// `destination`.
///
/// `user_rules` are the NSG's non-JIT rules (JIT rules among them are
/// ignored). The allow takes the first free inbound priority from
/// [`MIN_PRIORITY`]. The deny goes to the first free priority below both
/// the allow and every inbound user rule governing those ports, so such
/// user rules keep precedence; without any, it sits right below the allow,
/// i.e. at the top among non-JIT rules.
pub fn place(
    user_rules: &[Rule],
    destination: IpAddr,
    ports: &[(PortRange, Protocol)],
    scope: &Scope,
) -> Result<Placement, PlacementError> {
    let inbound: Vec<&Rule> = user_rules
        .iter()
        .filter(|r| !r.jit && r.direction == Direction::Inbound)
        .collect();
    let taken: BTreeSet<u32> = inbound.iter().map(|r| r.priority).collect();
    let allow = first_free(&taken, MIN_PRIORITY, "allow")?;
    let floor = inbound
        .iter()
        .filter(|r| governs(r, destination, ports, scope))
        .map(|r| r.priority)
        .fold(allow, u32::max);
    let deny = first_free(&taken, floor + 1, "deny")?;
    Ok(Placement { allow, deny })
}

#[cfg(test)]
mod tests {
    use super::super::model::{Access, Origin};
    use super::*;

    const VM: &str = "10.0.0.4";

    fn scope() -> Scope {
        Scope {
            virtual_network: vec!["10.0.0.0/16".parse().unwrap()],
            load_balancer: vec![],
        }
    }

    fn user(
        priority: u32,
        protocol: Protocol,
        source: &str,
        destination: &str,
        port: &str,
    ) -> Rule {
        Rule {
            name: format!("user-{priority}"),
            priority,
            direction: Direction::Inbound,
            access: Access::Allow,
            protocol,
            source_prefixes: vec![source.parse().unwrap()],
            source_ports: vec![PortRange::Any],
            destination_prefixes: vec![destination.parse().unwrap()],
            destination_ports: vec![port.parse().unwrap()],
            origin: Origin::Inline,
            jit: false,
        }
    }

    fn ssh(priority: u32) -> Rule {
        user(priority, Protocol::Tcp, "Internet", VM, "22")
    }

    fn http(priority: u32) -> Rule {
        user(priority, Protocol::Tcp, "*", "*", "80")
    }

    fn jit_ports() -> Vec<(PortRange, Protocol)> {
        [22, 3389, 5985, 5986]
            .into_iter()
            .map(|p| (PortRange::single(p), Protocol::Tcp))
            .collect()
    }

    fn placed(rules: &[Rule]) -> Result<Placement, PlacementError> {
        place(rules, VM.parse().unwrap(), &jit_ports(), &scope())
    }

    fn at(allow: u32, deny: u32) -> Result<Placement, PlacementError> {
        Ok(Placement { allow, deny })
    }

    #[test]
    fn empty_nsg_takes_the_top() {
        assert_eq!(placed(&[]), at(100, 101));
    }

    #[test]
    fn skips_a_user_rule_at_the_top() {
        assert_eq!(placed(&[http(100)]), at(101, 102));
        assert_eq!(placed(&[ssh(100)]), at(101, 102));
    }

    #[test]
    fn deny_goes_just_below_matching_user_rules() {
        assert_eq!(placed(&[ssh(300)]), at(100, 301));
        assert_eq!(placed(&[ssh(300), ssh(250), http(500)]), at(100, 301));
    }

    #[test]
    fn non_matching_user_rules_do_not_push_the_deny() {
        assert_eq!(placed(&[http(300)]), at(100, 101));
        assert_eq!(
            placed(&[user(300, Protocol::Tcp, "*", "10.0.0.5", "22")]),
            at(100, 101)
        );
        assert_eq!(
            placed(&[user(300, Protocol::Udp, "*", VM, "22")]),
            at(100, 101)
        );
        assert_eq!(
            placed(&[user(300, Protocol::Tcp, "*", VM, "23-3388")]),
            at(100, 101)
        );
    }

    #[test]
    fn broad_user_rules_match() {
        assert_eq!(
            placed(&[user(300, Protocol::Any, "*", "*", "*")]),
            at(100, 301)
        );
        assert_eq!(
            placed(&[user(300, Protocol::Tcp, "*", "VirtualNetwork", "3000-4000")]),
            at(100, 301)
        );
        assert_eq!(
            placed(&[user(300, Protocol::Tcp, "*", "10.0.0.0/24", "5986")]),
            at(100, 301)
        );
        assert_eq!(
            placed(&[user(300, Protocol::Tcp, "*", "Internet", "22")]),
            at(100, 101)
        );
    }

    #[test]
    fn matching_user_rule_at_the_bottom_leaves_no_room() {
        let err = placed(&[ssh(4096)]).unwrap_err();
        assert_eq!(
            err,
            PlacementError::NoPriorityAvailable {
                kind: "deny",
                lowest: 4097
            }
        );
        assert!(err.to_string().contains("JIT deny rule"), "{err}");
        assert!(err.to_string().contains("4096"), "{err}");
    }

    #[test]
    fn fully_taken_band_leaves_no_room_for_the_allow() {
        let rules: Vec<Rule> = (MIN_PRIORITY..=MAX_PRIORITY).map(http).collect();
        assert_eq!(
            placed(&rules),
            Err(PlacementError::NoPriorityAvailable {
                kind: "allow",
                lowest: 100
            })
        );
    }

    #[test]
    fn taken_priorities_are_skipped() {
        assert_eq!(placed(&[http(100), http(101), http(103)]), at(102, 104));
        assert_eq!(placed(&[http(100), http(102)]), at(101, 103));
        assert_eq!(
            placed(&[http(100), ssh(300), http(301), http(302), http(304)]),
            at(101, 303)
        );
        assert_eq!(
            placed(&[ssh(4095), http(4096)]),
            Err(PlacementError::NoPriorityAvailable {
                kind: "deny",
                lowest: 4096
            })
        );
    }

    #[test]
    fn jit_and_outbound_rules_are_ignored() {
        let jit = Rule {
            jit: true,
            ..ssh(100)
        };
        let outbound = Rule {
            direction: Direction::Outbound,
            ..ssh(101)
        };
        assert_eq!(placed(&[jit, outbound]), at(100, 101));
    }
}
