//! CEL expressions and messages shared by the schemas. They live in one place so that the
//! NSG's inline rules, SecurityRule objects, policies and requests refuse bad input with the
//! same words, and so the tests can name the messages they expect.

/// An address prefix: `*`, a service tag, an IPv4/IPv6 address or CIDR.
pub const PREFIX_RULE: &str = "self == '*' || self in ['VirtualNetwork', 'Internet', 'AzureLoadBalancer'] || isIP(self) || isCIDR(self)";
/// The same check over a list of prefixes.
pub const PREFIXES_RULE: &str = "self.all(p, p == '*' || p in ['VirtualNetwork', 'Internet', 'AzureLoadBalancer'] || isIP(p) || isCIDR(p))";
/// Why a prefix was refused.
pub const PREFIX_MESSAGE: &str =
    "must be '*', VirtualNetwork, Internet, AzureLoadBalancer, or an IPv4/IPv6 address or CIDR";

/// A source address for a JIT rule: an address or CIDR, or `*` (no tags: a grant names a
/// concrete requester address).
pub const SOURCE_RULE: &str = "self == '*' || isIP(self) || isCIDR(self)";
/// The same check over a list.
pub const SOURCES_RULE: &str = "self.all(p, p == '*' || isIP(p) || isCIDR(p))";
/// Why a JIT source prefix was refused.
pub const SOURCE_MESSAGE: &str = "must be '*' or an IPv4/IPv6 address or CIDR";

/// The shape of a port range; the numeric checks are [`PORT_RANGE_RULE`].
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
/// summed, in seconds, from the components the pattern allows.
pub fn duration_rule() -> String {
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
        "!self.endsWith('T') && self.matches('{DURATION_PATTERN}') && {total} >= 1 && {total} <= 86400"
    )
}
/// Why a duration was refused.
pub const DURATION_MESSAGE: &str =
    "must be an ISO 8601 duration such as PT3H, PT30M or PT1H30M, from 1 second to 24 hours";

/// Exactly one of a singular field and its plural form.
pub fn exactly_one(singular: &str, plural: &str) -> String {
    format!("has(self.{singular}) != has(self.{plural})")
}
