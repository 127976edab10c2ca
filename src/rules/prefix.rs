//! Address prefixes as Azure NSG rules spell them: `*`, a service tag, an IP
//! address or a CIDR.
//!
//! Tags only have a meaning relative to one NSG (its virtual network), so
//! matching always takes a [`Scope`] that says what the tags resolve to.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Why a string is not an address prefix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressPrefixError {
    /// The value is neither `*`, a known tag, an IP address nor a CIDR; the
    /// value is kept so status messages can point at the offending field.
    #[error(
        "invalid address prefix {value:?}: expected \"*\", a service tag \
         (VirtualNetwork, Internet, AzureLoadBalancer), an IP address or a CIDR"
    )]
    Invalid {
        /// The rejected input, verbatim.
        value: String,
    },
}

/// One source or destination address prefix of an NSG rule.
///
/// Single addresses are stored as full-length networks (/32, /128) so that
/// matching and containment have one code path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AddressPrefix {
    /// `*`: every address, of both families.
    Any,
    /// The `VirtualNetwork` tag: the NSG's own virtual network prefixes.
    VirtualNetwork,
    /// The `Internet` tag: every address outside the virtual network.
    Internet,
    /// The `AzureLoadBalancer` tag: the health-probe source addresses, which
    /// Azure allows by default; usually empty in a cluster.
    AzureLoadBalancer,
    /// An explicit network, host bits already cleared.
    Net(IpNet),
}

/// What the service tags resolve to for one NSG.
///
/// Kept separate from the rules because the same rules are evaluated for
/// different NSGs (and in tests) with different networks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// Prefixes of the NSG's virtual network (`VirtualNetwork`); everything
    /// else is `Internet`.
    pub virtual_network: Vec<IpNet>,
    /// Prefixes the `AzureLoadBalancer` tag stands for; empty means the tag
    /// matches nothing.
    pub load_balancer: Vec<IpNet>,
}

impl AddressPrefix {
    /// Whether `ip` belongs to this prefix, resolving tags through `scope`.
    pub fn matches(&self, ip: IpAddr, scope: &Scope) -> bool {
        match self {
            AddressPrefix::Any => true,
            AddressPrefix::VirtualNetwork => scope.virtual_network.iter().any(|n| n.contains(&ip)),
            AddressPrefix::Internet => !scope.virtual_network.iter().any(|n| n.contains(&ip)),
            AddressPrefix::AzureLoadBalancer => scope.load_balancer.iter().any(|n| n.contains(&ip)),
            AddressPrefix::Net(n) => n.contains(&ip),
        }
    }

    /// Whether every address of `net` belongs to this prefix.
    ///
    /// Used to check that a requested source lies inside what a policy
    /// allows: a request must never open more than the policy permits, so
    /// partial overlap is not enough.
    pub fn covers(&self, net: &IpNet, scope: &Scope) -> bool {
        match self {
            AddressPrefix::Any => true,
            AddressPrefix::VirtualNetwork => union_contains(&scope.virtual_network, net),
            AddressPrefix::Internet => !scope.virtual_network.iter().any(|v| overlaps(v, net)),
            AddressPrefix::AzureLoadBalancer => union_contains(&scope.load_balancer, net),
            AddressPrefix::Net(n) => n.contains(net),
        }
    }
}

/// Whether one of `prefixes` alone covers `net`.
///
/// Deliberately conservative: a `net` split across two explicit prefixes is
/// not covered, which can only refuse a request, never widen one.
pub fn any_covers(prefixes: &[AddressPrefix], net: &IpNet, scope: &Scope) -> bool {
    prefixes.iter().any(|p| p.covers(net, scope))
}

/// Whether the union of `nets` contains `net`; aggregating first makes
/// adjacent prefixes (two /25s) cover the /24 they form together.
fn union_contains(nets: &[IpNet], net: &IpNet) -> bool {
    IpNet::aggregate(&nets.to_vec())
        .iter()
        .any(|n| n.contains(net))
}

/// CIDR blocks are aligned, so two of them overlap exactly when one contains
/// the other.
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// Accepts what the CRD schema accepts, with the same meaning: `*`, a tag (case-sensitive,
/// as Azure spells it), an address (a host network, /32 or /128) or a CIDR, IPv6 hex in
/// either case.
///
/// A CIDR with bits set after its prefix length (`198.18.0.5/24`) is read as the network it
/// lies in. The schema refuses such values, because whoever writes one may have meant the
/// single host; objects stored before it did keep the meaning every earlier version gave
/// them rather than lose a rule (possibly a deny) on upgrade.
impl FromStr for AddressPrefix {
    type Err = AddressPrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "*" => return Ok(AddressPrefix::Any),
            "VirtualNetwork" => return Ok(AddressPrefix::VirtualNetwork),
            "Internet" => return Ok(AddressPrefix::Internet),
            "AzureLoadBalancer" => return Ok(AddressPrefix::AzureLoadBalancer),
            _ => {}
        }
        let net = match s.split_once('/') {
            Some((address, length)) => parse_address(address)
                .zip(parse_prefix_length(length))
                .and_then(|(ip, length)| IpNet::new(ip, length).ok()),
            None => parse_address(s).map(IpNet::from),
        };
        net.map(|n| AddressPrefix::Net(n.trunc()))
            .ok_or_else(|| AddressPrefixError::Invalid {
                value: s.to_owned(),
            })
    }
}

/// An address as Kubernetes' CEL `isIP` reads it, so that the code accepts exactly what the
/// schema does: no leading zeros in IPv4 octets (`010` reads as octal 8 to some tools, as
/// decimal 10 to others) and no IPv4-mapped IPv6 (`::ffff:198.18.0.1`: whether it should
/// match IPv4 packets is anyone's guess). `ipnet`'s own CIDR parser takes leading zeros,
/// hence the address is parsed here with the standard library, which refuses them.
fn parse_address(s: &str) -> Option<IpAddr> {
    match s.parse::<IpAddr>().ok()? {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => None,
        ip => Some(ip),
    }
}

/// A prefix length in plain decimal, without the sign or leading zeros (`/024`) that Go's
/// `netip.ParsePrefix`, and so CEL's `isCIDR`, refuses; the range is `IpNet::new`'s check.
fn parse_prefix_length(s: &str) -> Option<u8> {
    let plain = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !plain || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for AddressPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressPrefix::Any => f.write_str("*"),
            AddressPrefix::VirtualNetwork => f.write_str("VirtualNetwork"),
            AddressPrefix::Internet => f.write_str("Internet"),
            AddressPrefix::AzureLoadBalancer => f.write_str("AzureLoadBalancer"),
            AddressPrefix::Net(n) if n.prefix_len() == n.max_prefix_len() => {
                write!(f, "{}", n.addr())
            }
            AddressPrefix::Net(n) => write!(f, "{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn scope() -> Scope {
        Scope {
            virtual_network: vec![net("10.0.0.0/16"), net("fd00::/64")],
            load_balancer: vec![net("168.63.129.16/32")],
        }
    }

    #[test]
    fn parses_and_displays() {
        let cases = [
            ("*", AddressPrefix::Any, "*"),
            (
                "VirtualNetwork",
                AddressPrefix::VirtualNetwork,
                "VirtualNetwork",
            ),
            ("Internet", AddressPrefix::Internet, "Internet"),
            (
                "AzureLoadBalancer",
                AddressPrefix::AzureLoadBalancer,
                "AzureLoadBalancer",
            ),
            (
                "10.1.2.3",
                AddressPrefix::Net(net("10.1.2.3/32")),
                "10.1.2.3",
            ),
            (
                "10.1.2.3/32",
                AddressPrefix::Net(net("10.1.2.3/32")),
                "10.1.2.3",
            ),
            (
                "10.1.0.0/16",
                AddressPrefix::Net(net("10.1.0.0/16")),
                "10.1.0.0/16",
            ),
            (
                "198.18.0.5/24",
                AddressPrefix::Net(net("198.18.0.0/24")),
                "198.18.0.0/24",
            ),
            (
                "0.0.0.0/0",
                AddressPrefix::Net(net("0.0.0.0/0")),
                "0.0.0.0/0",
            ),
            (
                "2001:db8::1",
                AddressPrefix::Net(net("2001:db8::1/128")),
                "2001:db8::1",
            ),
            (
                "2001:db8::1/48",
                AddressPrefix::Net(net("2001:db8::/48")),
                "2001:db8::/48",
            ),
            (
                "2001:DB8::/32",
                AddressPrefix::Net(net("2001:db8::/32")),
                "2001:db8::/32",
            ),
            (
                "2001:0db8:0001::/48",
                AddressPrefix::Net(net("2001:db8:1::/48")),
                "2001:db8:1::/48",
            ),
            (
                "::198.18.0.1",
                AddressPrefix::Net(net("::c612:1/128")),
                "::c612:1",
            ),
        ];
        for (input, want, shown) in cases {
            let got: AddressPrefix = input.parse().unwrap();
            assert_eq!(got, want, "parsing {input}");
            assert_eq!(got.to_string(), shown, "displaying {input}");
            assert_eq!(
                shown.parse::<AddressPrefix>().unwrap(),
                want,
                "round trip {input}"
            );
        }
    }

    #[test]
    fn rejects_garbage_naming_the_value() {
        for bad in [
            "",
            "any",
            "internet",
            "virtualnetwork",
            "10.0.0.256",
            "10.0.0.0/33",
            "2001:db8::/129",
            "10.0.0.0/",
            " 10.0.0.1",
            "10.0.0.1 ",
            "host.example",
            // What Kubernetes' CEL `isIP`/`isCIDR` refuse, so the schema does too.
            "198.018.0.0/24",
            "198.18.0.01",
            "198.18.0.0/024",
            "198.18.0.0/+24",
            "::ffff:198.18.0.1",
            "::ffff:198.18.0.0/120",
            "fe80::1%eth0",
            "fe80::/64%eth0",
        ] {
            let err = bad.parse::<AddressPrefix>().unwrap_err();
            assert_eq!(
                err,
                AddressPrefixError::Invalid {
                    value: bad.to_owned()
                }
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn matches_addresses() {
        let s = scope();
        let p = |x: &str| x.parse::<AddressPrefix>().unwrap();
        let cases = [
            ("*", "8.8.8.8", true),
            ("*", "2001:db8::1", true),
            ("VirtualNetwork", "10.0.3.4", true),
            ("VirtualNetwork", "fd00::5", true),
            ("VirtualNetwork", "10.1.0.1", false),
            ("VirtualNetwork", "fd00:0:0:1::5", false),
            ("Internet", "10.1.0.1", true),
            ("Internet", "2001:db8::1", true),
            ("Internet", "10.0.3.4", false),
            ("Internet", "fd00::5", false),
            ("AzureLoadBalancer", "168.63.129.16", true),
            ("AzureLoadBalancer", "168.63.129.17", false),
            ("10.0.1.0/24", "10.0.1.255", true),
            ("10.0.1.0/24", "10.0.2.0", false),
            ("10.0.1.0/24", "::ffff:10.0.1.1", false),
            ("10.0.1.7", "10.0.1.7", true),
            ("10.0.1.7", "10.0.1.8", false),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
        ];
        for (prefix, addr, want) in cases {
            assert_eq!(p(prefix).matches(ip(addr), &s), want, "{prefix} ∋ {addr}");
        }
    }

    #[test]
    fn load_balancer_tag_matches_nothing_by_default() {
        let s = Scope::default();
        assert!(!AddressPrefix::AzureLoadBalancer.matches(ip("168.63.129.16"), &s));
        assert!(!AddressPrefix::VirtualNetwork.matches(ip("10.0.0.1"), &s));
        assert!(AddressPrefix::Internet.matches(ip("10.0.0.1"), &s));
    }

    #[test]
    fn covers_networks() {
        let s = scope();
        let p = |x: &str| x.parse::<AddressPrefix>().unwrap();
        let cases = [
            ("*", "0.0.0.0/0", true),
            ("*", "::/0", true),
            ("VirtualNetwork", "10.0.5.0/24", true),
            ("VirtualNetwork", "10.0.0.0/16", true),
            ("VirtualNetwork", "10.0.0.0/15", false),
            ("VirtualNetwork", "fd00::/80", true),
            ("Internet", "203.0.113.0/24", true),
            ("Internet", "203.0.113.7/32", true),
            ("Internet", "10.0.0.0/8", false),
            ("Internet", "10.0.1.0/24", false),
            ("Internet", "0.0.0.0/0", false),
            ("Internet", "2001:db8::/32", true),
            ("Internet", "fd00::/16", false),
            ("AzureLoadBalancer", "168.63.129.16/32", true),
            ("AzureLoadBalancer", "168.63.129.0/24", false),
            ("203.0.113.0/24", "203.0.113.8/29", true),
            ("203.0.113.0/24", "203.0.113.0/24", true),
            ("203.0.113.0/24", "203.0.112.0/23", false),
            ("203.0.113.0/24", "2001:db8::/64", false),
            ("2001:db8::/32", "2001:db8:1::/48", true),
            ("2001:db8::/32", "2001:db8::/31", false),
        ];
        for (prefix, n, want) in cases {
            assert_eq!(p(prefix).covers(&net(n), &s), want, "{prefix} ⊇ {n}");
        }
    }

    #[test]
    fn virtual_network_covers_adjacent_halves() {
        let s = Scope {
            virtual_network: vec![net("10.0.0.0/25"), net("10.0.0.128/25")],
            load_balancer: vec![],
        };
        assert!(AddressPrefix::VirtualNetwork.covers(&net("10.0.0.0/24"), &s));
        assert!(!AddressPrefix::VirtualNetwork.covers(&net("10.0.0.0/23"), &s));
    }

    #[test]
    fn any_covers_needs_one_prefix_containing_the_net() {
        let s = scope();
        let allowed = [
            AddressPrefix::Net(net("203.0.113.0/25")),
            AddressPrefix::Net(net("203.0.113.128/25")),
        ];
        assert!(any_covers(&allowed, &net("203.0.113.200/32"), &s));
        assert!(!any_covers(&allowed, &net("203.0.113.0/24"), &s));
        assert!(!any_covers(&allowed, &net("198.51.100.1/32"), &s));
        assert!(!any_covers(&[], &net("198.51.100.1/32"), &s));
        assert!(any_covers(&[AddressPrefix::Any], &net("::/0"), &s));
    }
}
