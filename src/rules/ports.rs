//! Port ranges as NSG rules spell them: `*`, `22` or `1000-2000`.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a port range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// The value is not `*`, a port, or `start-end` with `start <= end`; the
    /// value is kept so status messages can point at the offending field.
    #[error(
        "invalid port range {value:?}: expected \"*\", a port (0-65535) or \
         \"start-end\" with start <= end"
    )]
    Invalid {
        /// The rejected input, verbatim.
        value: String,
    },
}

/// An inclusive range of TCP/UDP ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortRange {
    /// `*`: every port.
    Any,
    /// `start..=end`; a single port has `start == end`. The parser
    /// guarantees `start <= end`.
    Range {
        /// First port, inclusive.
        start: u16,
        /// Last port, inclusive.
        end: u16,
    },
}

impl PortRange {
    /// A range holding exactly `port`, for policies that list port numbers.
    pub fn single(port: u16) -> Self {
        PortRange::Range {
            start: port,
            end: port,
        }
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        match *self {
            PortRange::Any => true,
            PortRange::Range { start, end } => (start..=end).contains(&port),
        }
    }

    /// Whether the two ranges share at least one port; placement uses it to
    /// find user rules that already govern the ports a JIT deny covers.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        match (*self, *other) {
            (PortRange::Any, _) | (_, PortRange::Any) => true,
            (PortRange::Range { start: a, end: b }, PortRange::Range { start: c, end: d }) => {
                a <= d && c <= b
            }
        }
    }
}

/// Parses a decimal port; only ASCII digits, so signs and spaces that
/// `u16::from_str` would accept or that hide typos are refused.
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || PortRangeError::Invalid {
            value: s.to_owned(),
        };
        if s == "*" {
            return Ok(PortRange::Any);
        }
        let (start, end) = match s.split_once('-') {
            Some((a, b)) => (parse_port(a), parse_port(b)),
            None => (parse_port(s), parse_port(s)),
        };
        match (start, end) {
            (Some(start), Some(end)) if start <= end => Ok(PortRange::Range { start, end }),
            _ => Err(invalid()),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PortRange::Any => f.write_str("*"),
            PortRange::Range { start, end } if start == end => write!(f, "{start}"),
            PortRange::Range { start, end } => write!(f, "{start}-{end}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u16, end: u16) -> PortRange {
        PortRange::Range { start, end }
    }

    #[test]
    fn parses_and_displays() {
        let cases = [
            ("*", PortRange::Any),
            ("22", range(22, 22)),
            ("0", range(0, 0)),
            ("65535", range(65535, 65535)),
            ("1000-2000", range(1000, 2000)),
            ("0-65535", range(0, 65535)),
            ("80-80", range(80, 80)),
            // The schema's pattern allows up to five digits and CEL's `int()` reads them as
            // decimal: so does the parser.
            ("00022", range(22, 22)),
            ("00080-00443", range(80, 443)),
        ];
        for (input, want) in cases {
            let got: PortRange = input.parse().unwrap();
            assert_eq!(got, want, "parsing {input}");
            assert_eq!(got.to_string().parse::<PortRange>().unwrap(), want);
        }
        assert_eq!(range(22, 22).to_string(), "22");
        assert_eq!(range(80, 80).to_string(), "80");
        assert_eq!(range(1000, 2000).to_string(), "1000-2000");
        assert_eq!(PortRange::Any.to_string(), "*");
        assert_eq!(PortRange::single(3389), range(3389, 3389));
    }

    #[test]
    fn rejects_bad_ranges_naming_the_value() {
        for bad in [
            "",
            "abc",
            "70000",
            "65536",
            "2000-1000",
            "1-2-3",
            "-1",
            "1-",
            "-",
            "+22",
            " 22",
            "22 ",
            "1000 - 2000",
            "**",
            "22,23",
        ] {
            let err = bad.parse::<PortRange>().unwrap_err();
            assert_eq!(
                err,
                PortRangeError::Invalid {
                    value: bad.to_owned()
                }
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn contains_ports() {
        let cases = [
            (PortRange::Any, 0, true),
            (PortRange::Any, 65535, true),
            (range(22, 22), 22, true),
            (range(22, 22), 23, false),
            (range(1000, 2000), 999, false),
            (range(1000, 2000), 1000, true),
            (range(1000, 2000), 2000, true),
            (range(1000, 2000), 2001, false),
        ];
        for (r, port, want) in cases {
            assert_eq!(r.contains(port), want, "{r} ∋ {port}");
        }
    }

    #[test]
    fn overlaps_ranges() {
        let cases = [
            (PortRange::Any, range(22, 22), true),
            (range(22, 22), PortRange::Any, true),
            (range(22, 22), range(22, 22), true),
            (range(22, 22), range(23, 23), false),
            (range(1000, 2000), range(2000, 3000), true),
            (range(1000, 2000), range(2001, 3000), false),
            (range(1000, 2000), range(1500, 1600), true),
            (range(1500, 1600), range(1000, 2000), true),
            (range(0, 21), range(22, 65535), false),
        ];
        for (a, b, want) in cases {
            assert_eq!(a.overlaps(&b), want, "{a} ∩ {b}");
            assert_eq!(b.overlaps(&a), want, "{b} ∩ {a}");
        }
    }
}
