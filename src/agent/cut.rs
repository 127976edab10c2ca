//! Ending the sessions of a `Close` grant at once, on the machine itself.
//!
//! The kernel already refuses every later packet of such a flow (see [`super::render`]), but
//! a session that sends nothing would only learn at its next packet. On the machine the
//! agent can do better the moment it sees the grant end: it destroys the machine's own
//! sockets of those flows (`ss -K`, the kernel's socket-destroy interface), which sends the
//! client a reset. A gateway holds no sockets of the machines behind it; there the kernel
//! check alone ends the flows.

use std::collections::BTreeMap;

use jiff::Timestamp;

use super::Error;
use super::apply::Nft;
use super::render::{GrantKey, Ruleset};

/// The `Close` grant elements of `before` that `after` no longer holds at `now`, and that no
/// element of `after` (of any kind) still covers: their flows must end.
pub fn ended(before: &Ruleset, after: &Ruleset, now: Timestamp) -> Vec<GrantKey> {
    let closing: Vec<&GrantKey> = before
        .grants
        .iter()
        .filter(|(set, _)| set.contains("close"))
        .flat_map(|(_, elements)| elements.keys())
        .collect();
    // The common case, every round: no Close grant in force, nothing to look up.
    if closing.is_empty() {
        return Vec::new();
    }
    let live: Vec<&GrantKey> = after
        .grants
        .values()
        .flat_map(|elements: &BTreeMap<GrantKey, Timestamp>| {
            elements.iter().filter(|(_, at)| **at > now).map(|(k, _)| k)
        })
        .collect();
    closing
        .into_iter()
        .filter(|key| !live.iter().any(|other| covers(other, key)))
        .copied()
        .collect()
}

/// Whether element `outer` holds every flow `inner` holds.
fn covers(outer: &GrantKey, inner: &GrantKey) -> bool {
    outer.destination == inner.destination
        && outer.protocol == inner.protocol
        && outer.source.contains(&inner.source)
        && outer.ports.0 <= inner.ports.0
        && inner.ports.1 <= outer.ports.1
}

/// `ss` arguments destroying the established TCP sockets of `key`'s flows on this machine:
/// local address and port range, peer in the source prefix.
pub fn ss_args(key: &GrantKey) -> Vec<String> {
    vec![
        "-K".into(),
        "-tn".into(),
        "state".into(),
        "established".into(),
        "(".into(),
        "src".into(),
        key.destination.to_string(),
        "and".into(),
        "sport".into(),
        ">=".into(),
        format!(":{}", key.ports.0),
        "and".into(),
        "sport".into(),
        "<=".into(),
        format!(":{}", key.ports.1),
        "and".into(),
        "dst".into(),
        key.source.to_string(),
        ")".into(),
    ]
}

/// Destroys the machine's sockets of the flows of `keys` (TCP; other protocols have no
/// session to end), where `nft` runs.
pub async fn cut(nft: &Nft, keys: &[GrantKey]) -> Result<(), Error> {
    for key in keys.iter().filter(|k| k.protocol == 6) {
        let args = ss_args(key);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nft.output("ss", &args).await.map_err(Error::Listening)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(source: &str, ports: (u16, u16)) -> GrantKey {
        GrantKey {
            destination: "198.18.0.10".parse().unwrap(),
            source: source.parse().unwrap(),
            protocol: 6,
            ports,
        }
    }

    fn ruleset(sets: &[(&str, GrantKey, i64)]) -> Ruleset {
        let mut grants: BTreeMap<String, BTreeMap<GrantKey, Timestamp>> = BTreeMap::new();
        for (set, key, seconds) in sets {
            grants.entry((*set).to_owned()).or_default().insert(
                *key,
                Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(*seconds),
            );
        }
        Ruleset {
            table: "portcullis".into(),
            skeleton: Vec::new(),
            grants,
        }
    }

    #[test]
    fn a_close_grant_that_ended_uncovered_is_cut_and_nothing_else() {
        let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(100);
        let before = ruleset(&[
            ("jit_host_close_v4", key("198.18.0.20/32", (22, 22)), 200),
            ("jit_host_close_v4", key("198.18.0.21/32", (22, 22)), 200),
            ("jit_host_close_v4", key("198.18.0.22/32", (22, 22)), 99),
            ("jit_host_allow_v4", key("198.18.0.23/32", (22, 22)), 200),
        ]);
        let after = ruleset(&[
            // .20 extended by a Keep grant of a range of ports: still covered, kept.
            ("jit_allow_v4", key("198.18.0.20/32", (20, 30)), 300),
            // .22 still listed, but expired at `now`.
            ("jit_host_close_v4", key("198.18.0.22/32", (22, 22)), 99),
        ]);
        let cut = ended(&before, &after, now);
        assert_eq!(
            cut,
            [
                key("198.18.0.21/32", (22, 22)),
                key("198.18.0.22/32", (22, 22))
            ]
        );
        assert_eq!(
            ss_args(&cut[0]).join(" "),
            "-K -tn state established ( src 198.18.0.10 and sport >= :22 and sport <= :22 and dst 198.18.0.21/32 )"
        );
    }
}
