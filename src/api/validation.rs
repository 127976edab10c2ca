//! CEL expressions and messages shared by the schemas. They live in one place so that the
//! NSG's inline rules, SecurityRule objects, policies and requests refuse bad input with the
//! same words, and so the tests can name the messages they expect.

/// An address prefix: `*`, a service tag, an IPv4/IPv6 address or CIDR.
///
/// `isCIDR` alone takes `198.18.0.1/24`: whoever writes that may mean the host or the /24,
/// and a rule must not guess (Azure refuses it too), so a CIDR must equal its masked form.
/// `isIP`/`isCIDR` already refuse IPv4 octets with leading zeros, IPv6 zones and
/// IPv4-mapped IPv6 (`::ffff:198.18.0.1`), and `crate::rules::AddressPrefix` refuses them
/// alike.
pub const PREFIX_RULE: &str = "self == '*' || self in ['VirtualNetwork', 'Internet', 'AzureLoadBalancer'] || isIP(self) || (isCIDR(self) && cidr(self) == cidr(self).masked())";
/// The same check over a list of prefixes.
pub const PREFIXES_RULE: &str = "self.all(p, p == '*' || p in ['VirtualNetwork', 'Internet', 'AzureLoadBalancer'] || isIP(p) || (isCIDR(p) && cidr(p) == cidr(p).masked()))";
/// Why a prefix was refused.
pub const PREFIX_MESSAGE: &str = "must be '*', VirtualNetwork, Internet, AzureLoadBalancer, an IPv4/IPv6 address, or a CIDR with no bits set after the prefix length (198.18.0.0/24, not 198.18.0.1/24)";

/// An NSG's address space (`virtualNetworkPrefixes`, `loadBalancerPrefixes`): addresses and
/// CIDRs only. These lists define what the tags stand for, so a tag (or `*`) in them would
/// be circular; the conversion refuses one, and the NSG would stop being enforced.
pub const ADDRESS_SPACE_RULE: &str =
    "self.all(p, isIP(p) || (isCIDR(p) && cidr(p) == cidr(p).masked()))";
/// Why an address-space entry was refused.
pub const ADDRESS_SPACE_MESSAGE: &str = "must be IPv4/IPv6 addresses or CIDRs with no bits set after the prefix length; '*' and service tags are not allowed here, this list defines what the tags stand for";

/// A source address for a JIT rule: an address or CIDR, or `*` (no tags: a grant names a
/// concrete requester address). CIDRs as in [`PREFIX_RULE`].
pub const SOURCE_RULE: &str =
    "self == '*' || isIP(self) || (isCIDR(self) && cidr(self) == cidr(self).masked())";
/// The same check over a list.
pub const SOURCES_RULE: &str =
    "self.all(p, p == '*' || isIP(p) || (isCIDR(p) && cidr(p) == cidr(p).masked()))";
/// Why a JIT source prefix was refused.
pub const SOURCE_MESSAGE: &str = "must be '*', an IPv4/IPv6 address, or a CIDR with no bits set after the prefix length (198.18.0.0/24, not 198.18.0.1/24)";

/// The shape of a port range; the numeric checks are [`PORT_RANGE_RULE`]. Leading zeros
/// (`00022`) are harmless: CEL's `int()` and `crate::rules::PortRange` both read them as
/// decimal.
pub const PORT_RANGE_PATTERN: &str = r"^([*]|[0-9]{1,5}(-[0-9]{1,5})?)$";
/// A port range's bounds: each end at most 65535, start not above end.
pub const PORT_RANGE_RULE: &str = "self == '*' || (self.split('-').all(p, int(p) <= 65535) && int(self.split('-')[0]) <= int(self.split('-')[self.split('-').size() - 1]))";
/// The same check over a list of ranges.
pub const PORT_RANGES_RULE: &str = "self.all(r, r.matches('^([*]|[0-9]{1,5}(-[0-9]{1,5})?)$') && (r == '*' || (r.split('-').all(p, int(p) <= 65535) && int(r.split('-')[0]) <= int(r.split('-')[r.split('-').size() - 1]))))";
/// Why a port range was refused.
pub const PORT_RANGE_MESSAGE: &str =
    "must be '*', a port (0-65535) or a range 'start-end' with start <= end <= 65535";

/// The shape of an ISO 8601 duration of days, hours, minutes and seconds (`PT3H`, `PT1H30M`,
/// `P1D`); calendar units are ambiguous and refused.
pub const DURATION_PATTERN: &str = r"^P([0-9]+D)?(T([0-9]+H)?([0-9]+M)?([0-9]+S)?)?$";
/// A duration's total between 1 s and 24 h. CEL has no ISO 8601 parser, so the total is
/// summed, in seconds, from the components the pattern allows. A component's leading zeros
/// (`PT0001S`) read as decimal, in CEL's `int()` as in `crate::rules::duration::parse`.
pub fn duration_rule() -> String {
    duration_rule_up_to(86_400)
}

/// A duration's total between 1 s and `max` seconds (see [`duration_rule`]).
pub fn duration_rule_up_to(max: u64) -> String {
    let total = [("D", 86_400), ("H", 3_600), ("M", 60), ("S", 1)]
        .iter()
        .map(|(unit, seconds)| {
            format!(
                "(self.matches('[0-9]+{unit}') ? int(self.find('[0-9]+{unit}').replace('{unit}', '')) * {seconds} : 0)"
            )
        })
        .collect::<Vec<_>>()
        .join(" + ");
    format!(
        "!self.endsWith('T') && self.matches('{DURATION_PATTERN}') && {total} >= 1 && {total} <= {max}"
    )
}
/// Why a duration was refused.
pub const DURATION_MESSAGE: &str =
    "must be an ISO 8601 duration such as PT3H, PT30M or PT1H30M, from 1 second to 24 hours";

/// The longest a request may stay `Pending`, in seconds: a week.
pub const MAX_PENDING_SECONDS: u64 = 7 * 86_400;
/// Why a `pendingTimeout` was refused.
pub const PENDING_MESSAGE: &str =
    "must be an ISO 8601 duration such as PT1H, PT30M or P1D, from 1 second to 7 days";

/// Exactly one of a singular field and its plural form.
pub fn exactly_one(singular: &str, plural: &str) -> String {
    format!("has(self.{singular}) != has(self.{plural})")
}

/// An RFC 3339 timestamp as clients parse it: date, `T`, time, at most nine fraction digits,
/// `Z` or a numeric offset.
pub const TIMESTAMP_PATTERN: &str = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$";
