//! Discovery: the management ports listening on the machine (`ss -l`), reported so that the
//! NSG's exposure can name the ports that are really served and reachable from the
//! Internet without JIT, as Defender's "not configured" recommendation does.
//!
//! The ports looked for are the management ports (SSH, RDP, WinRM) and every port a JIT
//! rule guards on this machine. A socket counts when it listens on a wildcard address or
//! one of the protected addresses; one bound to loopback only is out of every NSG's reach.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::Error;
use super::apply::Nft;
use crate::api::nsg::ListeningPort;
use crate::api::rule_fields::RuleProtocol;
use crate::rules::{PortRange, Rule, Scope};

/// The ports Defender checks on every machine.
pub const MANAGEMENT_PORTS: [u16; 4] = [22, 3389, 5985, 5986];
/// A JIT rule's port range wider than this is not expanded into ports to look for (the
/// operator's rules name single ports).
const MAX_SPAN: u32 = 64;

/// The ports to look for: the management ports and those of the JIT rules aimed at one of
/// `addresses`.
pub fn wanted(rules: &[Rule], addresses: &[IpAddr], scope: &Scope) -> BTreeSet<u16> {
    let mut ports: BTreeSet<u16> = MANAGEMENT_PORTS.into_iter().collect();
    let aimed = rules.iter().filter(|r| {
        r.jit
            && addresses
                .iter()
                .any(|a| r.destination_prefixes.iter().any(|p| p.matches(*a, scope)))
    });
    for rule in aimed {
        for range in &rule.destination_ports {
            if let PortRange::Range { start, end } = *range
                && u32::from(end) - u32::from(start) < MAX_SPAN
            {
                ports.extend(start..=end);
            }
        }
    }
    ports
}

/// The sockets in `ss -Hln` output (`-t` or `-u`, given as `protocol`) that listen on one of
/// `ports`, on a wildcard address or one of `addresses`.
pub fn parse(
    output: &str,
    protocol: RuleProtocol,
    ports: &BTreeSet<u16>,
    addresses: &[IpAddr],
) -> Vec<ListeningPort> {
    let mut found = Vec::new();
    for line in output.lines() {
        // State, Recv-Q, Send-Q, local address:port, peer address:port.
        let Some(local) = line.split_whitespace().nth(3) else {
            continue;
        };
        let Some((address, port)) = local.rsplit_once(':') else {
            continue;
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        if !ports.contains(&port) {
            continue;
        }
        let address = address.trim_start_matches('[').trim_end_matches(']');
        let address = address.split('%').next().unwrap_or(address);
        let reachable = match address {
            "*" => true,
            text => text
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified() || addresses.contains(&ip)),
        };
        if reachable {
            found.push(ListeningPort { port, protocol });
        }
    }
    found
}

/// The listening management ports of the machine (where `nft` runs: the host, or the
/// agent's network namespace).
pub async fn discover(
    nft: &Nft,
    ports: &BTreeSet<u16>,
    addresses: &[IpAddr],
) -> Result<Vec<ListeningPort>, Error> {
    let mut found = Vec::new();
    for (flag, protocol) in [("-Hltn", RuleProtocol::Tcp), ("-Hlun", RuleProtocol::Udp)] {
        let output = nft.output("ss", &[flag]).await.map_err(Error::Listening)?;
        found.extend(parse(&output, protocol, ports, addresses));
    }
    found.sort();
    found.dedup();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Access, AddressPrefix, Direction, Origin, Protocol};

    #[test]
    fn looks_for_management_ports_and_those_jit_guards_here() {
        let here: IpAddr = "198.18.0.10".parse().unwrap();
        let deny = |address: &str, ports: &[&str]| Rule {
            name: "deny".into(),
            priority: 1000,
            direction: Direction::Inbound,
            access: Access::Deny,
            protocol: Protocol::Tcp,
            source_prefixes: vec![AddressPrefix::Any],
            source_ports: vec![PortRange::Any],
            destination_prefixes: vec![address.parse().unwrap()],
            destination_ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
            origin: Origin::SecurityRule {
                name: "deny".into(),
            },
            jit: true,
        };
        let rules = [
            deny("198.18.0.10", &["8443", "9000-9001", "10000-20000"]),
            deny("198.18.0.99", &["7000"]),
        ];
        let wanted = wanted(&rules, &[here], &Scope::default());
        assert_eq!(
            wanted.into_iter().collect::<Vec<_>>(),
            [22, 3389, 5985, 5986, 8443, 9000, 9001]
        );
    }

    #[test]
    fn counts_sockets_reachable_on_the_machines_addresses() {
        let output = "\
LISTEN 0      128          0.0.0.0:22        0.0.0.0:*
LISTEN 0      128        127.0.0.1:5985      0.0.0.0:*
LISTEN 0      128      198.18.0.10:3389      0.0.0.0:*
LISTEN 0      128      198.18.0.11:5986      0.0.0.0:*
LISTEN 0      128             [::]:8443         [::]:*
LISTEN 0      128   [fe80::1%eth0]:9000         [::]:*
LISTEN 0      128                *:80             *:*
";
        let ports: BTreeSet<u16> = [22, 3389, 5985, 5986, 8443, 9000].into_iter().collect();
        let addresses: Vec<IpAddr> =
            vec!["198.18.0.10".parse().unwrap(), "fe80::1".parse().unwrap()];
        let found: Vec<u16> = parse(output, RuleProtocol::Tcp, &ports, &addresses)
            .into_iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(found, [22, 3389, 8443, 9000]);
    }
}
