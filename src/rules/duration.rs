//! ISO 8601 durations (`PT3H`, `PT1H30M`, `P1D`) as JIT policies and
//! requests spell them, converted to whole seconds.
//!
//! Parsing is delegated to jiff; this module only adds the rules that make a
//! duration usable as an access window: exact seconds, positive, no calendar
//! units, and the policy bounds.

use std::time::Duration;

use jiff::fmt::temporal::SpanParser;
use jiff::{SpanRelativeTo, SpanTotal, Unit};

/// jiff's ISO 8601 parser only: `Span`'s `FromStr` also accepts jiff's
/// "friendly" format (`3h`), which the API does not promise.
static PARSER: SpanParser = SpanParser::new();

/// Shortest `maxRequestAccessDuration` / request `duration` allowed.
pub const MIN_DURATION: Duration = Duration::from_secs(1);

/// Longest `maxRequestAccessDuration` / request `duration` allowed (24 h),
/// as in Azure JIT.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Why a string is not an acceptable duration. Every variant keeps the input
/// so a status message can name the offending field value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not ISO 8601 at all (jiff's explanation is included).
    #[error("invalid ISO 8601 duration {value:?}: {reason}")]
    Syntax {
        /// The rejected input, verbatim.
        value: String,
        /// Why jiff refused it.
        reason: String,
    },
    /// Years and months have no fixed length, so an access window in them
    /// would be ambiguous.
    #[error(
        "duration {value:?} uses years or months, whose length varies; use days (P1D) or hours (PT24H)"
    )]
    CalendarUnits {
        /// The rejected input, verbatim.
        value: String,
    },
    /// Zero or negative: such a window would grant nothing or be nonsense.
    #[error("duration {value:?} must be positive")]
    NotPositive {
        /// The rejected input, verbatim.
        value: String,
    },
    /// Rules expire at second precision; a fraction of a second cannot be
    /// honoured exactly.
    #[error("duration {value:?} is not a whole number of seconds")]
    SubSecond {
        /// The rejected input, verbatim.
        value: String,
    },
    /// Longer than the allowed maximum (the policy's, or [`MAX_DURATION`]).
    #[error("duration {value:?} exceeds the maximum {}", format(*max))]
    TooLong {
        /// The rejected input, verbatim.
        value: String,
        /// The bound that was violated.
        max: Duration,
    },
}

/// Parses a positive ISO 8601 duration into whole seconds; days count as
/// 24 hours (there is no time zone to make them anything else).
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let value = || s.to_owned();
    let span = PARSER
        .parse_span(without_leading_zeros(s))
        .map_err(|e| DurationError::Syntax {
            value: value(),
            reason: e.to_string(),
        })?;
    if span.get_years() != 0 || span.get_months() != 0 {
        return Err(DurationError::CalendarUnits { value: value() });
    }
    if span.is_negative() || span.is_zero() {
        return Err(DurationError::NotPositive { value: value() });
    }
    let total = span
        .total(SpanTotal::from(Unit::Second).relative(SpanRelativeTo::days_are_24_hours()))
        .map_err(|e| DurationError::Syntax {
            value: value(),
            reason: e.to_string(),
        })?;
    if total.fract() != 0.0 {
        return Err(DurationError::SubSecond { value: value() });
    }
    // `total` is a positive whole number bounded by jiff's span limits, far
    // below 2^53, so the conversion is exact.
    Ok(Duration::from_secs(total as u64))
}

/// `s` with the redundant leading zeros of each whole number dropped (`PT0001S` → `PT1S`).
///
/// The schema counts `PT000000000000000000000000001S` as one second (CEL's `int()` reads
/// leading zeros, and the field may be 32 characters long), while jiff reads at most 21
/// digits per number, whatever their value; the meaning is not in doubt, so the code
/// accepts it too. Digits after a decimal separator are a fraction, where zeros are
/// significant, and stay as written.
fn without_leading_zeros(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut previous = None;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let starts_whole_number =
            c == '0' && !previous.is_some_and(|p: char| p.is_ascii_digit() || p == '.' || p == ',');
        if starts_whole_number && chars.peek().is_some_and(char::is_ascii_digit) {
            continue;
        }
        out.push(c);
        previous = Some(c);
    }
    out
}

/// Parses like [`parse`] and refuses anything longer than `max`, e.g. a
/// request longer than its policy's `maxRequestAccessDuration`.
pub fn parse_bounded(s: &str, max: Duration) -> Result<Duration, DurationError> {
    let d = parse(s)?;
    if d > max {
        return Err(DurationError::TooLong {
            value: s.to_owned(),
            max,
        });
    }
    Ok(d)
}

/// Parses a policy's `maxRequestAccessDuration`, which must lie within
/// [`MIN_DURATION`, `MAX_DURATION`]. The lower bound needs no check of its
/// own: [`parse`] only returns positive whole seconds, i.e. at least 1 s.
pub fn parse_policy_max(s: &str) -> Result<Duration, DurationError> {
    parse_bounded(s, MAX_DURATION)
}

/// Formats `d` (truncated to whole seconds) canonically: hours, minutes and
/// seconds only (`PT1H30M`, `PT20S`, `PT24H`), so equal durations always
/// print the same and the output parses back to the same value.
pub fn format(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::from("PT");
    if h > 0 {
        out.push_str(&format!("{h}H"));
    }
    if m > 0 {
        out.push_str(&format!("{m}M"));
    }
    if s > 0 || secs == 0 {
        out.push_str(&format!("{s}S"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;

    #[test]
    fn parses_valid_durations() {
        let cases = [
            ("PT3H", 3 * H),
            ("PT30M", 30 * 60),
            ("PT1H30M", 90 * 60),
            ("PT20S", 20),
            ("PT1S", 1),
            ("PT90M", 90 * 60),
            ("P1D", 24 * H),
            ("P1DT1H", 25 * H),
            ("P1W", 7 * 24 * H),
            ("PT1.5H", 90 * 60),
            ("PT0.5M", 30),
            ("PT24H", 24 * H),
            ("pt3h", 3 * H),
            // Spellings the schema accepts, with the meaning its CEL total gives them.
            ("P0DT0H0M1S", 1),
            ("PT86400S", 24 * H),
            ("PT0H1440M", 24 * H),
            ("PT0001H", H),
            ("P00001D", 24 * H),
            ("PT000000000000000000000000001S", 1),
            // Zeros after a decimal separator are significant.
            ("PT1.05H", 3780),
            ("PT1,05H", 3780),
        ];
        for (input, secs) in cases {
            assert_eq!(parse(input), Ok(Duration::from_secs(secs)), "{input}");
        }
    }

    #[test]
    fn rejects_invalid_durations() {
        let syntax = |e: &DurationError| matches!(e, DurationError::Syntax { .. });
        let calendar = |e: &DurationError| matches!(e, DurationError::CalendarUnits { .. });
        let not_positive = |e: &DurationError| matches!(e, DurationError::NotPositive { .. });
        let sub_second = |e: &DurationError| matches!(e, DurationError::SubSecond { .. });
        type Check = fn(&DurationError) -> bool;
        let cases: [(&str, Check); 15] = [
            ("", syntax),
            ("3h", syntax),
            ("3 hours", syntax),
            ("PT1H30", syntax),
            ("PT", syntax),
            ("P", syntax),
            ("1H", syntax),
            ("PT1H ", syntax),
            ("P1Y", calendar),
            ("P1M", calendar),
            ("P1MT1H", calendar),
            ("PT0S", not_positive),
            ("-PT1H", not_positive),
            ("PT0.5S", sub_second),
            ("PT1.000000001S", sub_second),
        ];
        for (input, check) in cases {
            let err = parse(input).unwrap_err();
            assert!(check(&err), "{input}: unexpected {err:?}");
            assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
        }
    }

    #[test]
    fn bounded_rejects_over_max_and_names_the_limit() {
        let max = Duration::from_secs(3 * H);
        assert_eq!(parse_bounded("PT3H", max), Ok(max));
        assert_eq!(
            parse_bounded("PT2H59M59S", max),
            Ok(Duration::from_secs(3 * H - 1))
        );
        let err = parse_bounded("PT3H1S", max).unwrap_err();
        assert_eq!(
            err,
            DurationError::TooLong {
                value: "PT3H1S".into(),
                max
            }
        );
        assert_eq!(
            err.to_string(),
            "duration \"PT3H1S\" exceeds the maximum PT3H"
        );
        assert!(matches!(
            parse_bounded("PT0S", max),
            Err(DurationError::NotPositive { .. })
        ));
    }

    #[test]
    fn policy_max_is_between_one_second_and_a_day() {
        assert_eq!(parse_policy_max("PT1S"), Ok(MIN_DURATION));
        assert_eq!(parse_policy_max("PT24H"), Ok(MAX_DURATION));
        assert_eq!(parse_policy_max("P1D"), Ok(MAX_DURATION));
        assert_eq!(parse_policy_max("PT3H"), Ok(Duration::from_secs(3 * H)));
        assert_eq!(
            parse_policy_max("PT24H1S"),
            Err(DurationError::TooLong {
                value: "PT24H1S".into(),
                max: MAX_DURATION
            })
        );
        assert!(matches!(
            parse_policy_max("PT0S"),
            Err(DurationError::NotPositive { .. })
        ));
    }

    #[test]
    fn formats_canonically_and_round_trips() {
        let cases = [
            (90 * 60, "PT1H30M"),
            (20, "PT20S"),
            (24 * H, "PT24H"),
            (3 * H, "PT3H"),
            (30 * 60, "PT30M"),
            (H + 1, "PT1H1S"),
            (3661, "PT1H1M1S"),
            (0, "PT0S"),
        ];
        for (secs, want) in cases {
            assert_eq!(format(Duration::from_secs(secs)), want);
            if secs > 0 {
                assert_eq!(parse(want), Ok(Duration::from_secs(secs)));
            }
        }
        assert_eq!(format(Duration::from_millis(1500)), "PT1S");
    }
}
