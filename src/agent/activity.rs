//! When each grant last carried a packet, for `idleTimeout`.
//!
//! The agent counts nothing itself: the kernel refreshes a flow's entry in the `jit_seen_*`
//! sets on every packet from the client of a flow a grant let in (see [`super::render`]),
//! and an entry's remaining timeout tells how long ago that was. The agent reads those sets
//! about once a second while some grant has an `idleTimeout`, keeps the latest instant per
//! flow, and finds the grants whose flows have all been silent for longer than the limit.
//!
//! It never calls a grant idle early: an idle clock starts no earlier than the grant's
//! creation, the agent's start, or the last full replace of the table (which empties the
//! sets), so activity the agent could not see is never taken for silence.

use std::collections::HashMap;
use std::net::IpAddr;

use jiff::{SignedDuration, Timestamp};

use super::render::{Policy, SEEN_TIMEOUT, Target, as_enforced};
use crate::api::nsg::IdleGrant;
use crate::rules::{Direction, Origin, Packet, Protocol};

/// One flow as the seen sets key it: destination, source, IP protocol, destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeenKey {
    pub destination: IpAddr,
    pub source: IpAddr,
    pub protocol: u8,
    pub port: u16,
}

impl SeenKey {
    /// The flow's packets as the rule model sees them (a grant matches any source port).
    fn packet(&self) -> Option<Packet> {
        let protocol = match self.protocol {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            1 | 58 => Protocol::Icmp,
            _ => return None,
        };
        Some(Packet {
            direction: Direction::Inbound,
            protocol,
            source: self.source,
            source_port: 0,
            destination: self.destination,
            destination_port: self.port,
        })
    }
}

/// Reads `nft -j list set` output: each flow with the instant of its last packet, given
/// that the sets time entries out [`SEEN_TIMEOUT`] seconds after it. The kernel reports
/// whole seconds left, so an entry is taken to be a second younger than it may be:
/// silence is never overestimated.
pub fn parse_seen(json: &str, now: Timestamp) -> Result<Vec<(SeenKey, Timestamp)>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("nft output: {e}"))?;
    let mut seen = Vec::new();
    let objects = value["nftables"].as_array().cloned().unwrap_or_default();
    for object in objects {
        let Some(elements) = object["set"]["elem"].as_array() else {
            continue;
        };
        for element in elements {
            let element = &element["elem"];
            let parts = element["val"]["concat"]
                .as_array()
                .ok_or_else(|| format!("unexpected element {element}"))?;
            let key = match parts.as_slice() {
                [destination, source, protocol, port] => SeenKey {
                    destination: address(destination)?,
                    source: address(source)?,
                    protocol: protocol_number(protocol)?,
                    port: port
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .ok_or_else(|| format!("unexpected port {port}"))?,
                },
                _ => return Err(format!("unexpected element {element}")),
            };
            let left = element["expires"].as_u64().unwrap_or(0);
            let age = u64::from(SEEN_TIMEOUT).saturating_sub(left + 1);
            let age = SignedDuration::from_secs(i64::try_from(age).unwrap_or(i64::MAX));
            seen.push((key, now.checked_sub(age).unwrap_or(now)));
        }
    }
    Ok(seen)
}

fn address(value: &serde_json::Value) -> Result<IpAddr, String> {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected address {value}"))
}

/// nft prints well-known protocols by name, others as numbers.
fn protocol_number(value: &serde_json::Value) -> Result<u8, String> {
    match value {
        serde_json::Value::String(name) => match name.as_str() {
            "tcp" => Ok(6),
            "udp" => Ok(17),
            "icmp" => Ok(1),
            "ipv6-icmp" | "icmpv6" => Ok(58),
            other => Err(format!("unexpected protocol {other}")),
        },
        other => other
            .as_u64()
            .and_then(|p| u8::try_from(p).ok())
            .ok_or_else(|| format!("unexpected protocol {other}")),
    }
}

/// The latest packet of each flow the agent has read, and the instant before which it
/// could not see any.
#[derive(Debug)]
pub struct Activity {
    last: HashMap<SeenKey, Timestamp>,
    blind_until: Timestamp,
}

impl Activity {
    /// Nothing seen yet; nothing before `now` could be seen.
    pub fn new(now: Timestamp) -> Self {
        Self {
            last: HashMap::new(),
            blind_until: now,
        }
    }

    /// The table was replaced at `now`: the sets start empty.
    pub fn restarted(&mut self, now: Timestamp) {
        self.blind_until = now;
    }

    /// Takes in what the sets show.
    pub fn record(&mut self, seen: impl IntoIterator<Item = (SeenKey, Timestamp)>) {
        for (key, at) in seen {
            let last = self.last.entry(key).or_insert(at);
            *last = (*last).max(at);
        }
    }

    /// The grants of `policy` with an `idleTimeout` that no packet crossed for that long
    /// at `now`, with the last packet seen of each; flows no grant of `policy` matches
    /// are forgotten.
    pub fn idle(&mut self, policy: &Policy, target: &Target, now: Timestamp) -> Vec<IdleGrant> {
        let rules = as_enforced(policy, target);
        let packets: Vec<(SeenKey, Packet)> = self
            .last
            .keys()
            .filter_map(|k| Some((*k, k.packet()?)))
            .collect();
        let mut idle = Vec::new();
        let mut matched = std::collections::HashSet::new();
        for rule in &rules {
            let Origin::SecurityRule { name } = &rule.origin else {
                continue;
            };
            let Some(limit) = policy.idle.get(name) else {
                continue;
            };
            if policy.expiries.get(name).is_none_or(|end| *end <= now) {
                continue;
            }
            let mut last: Option<Timestamp> = None;
            for (key, packet) in &packets {
                if rule.matches(packet, &policy.scope) {
                    matched.insert(*key);
                    last = last.max(self.last.get(key).copied());
                }
            }
            let clock = limit
                .since
                .max(self.blind_until)
                .max(last.unwrap_or(limit.since));
            let quiet = now.duration_since(clock);
            if quiet >= SignedDuration::try_from(limit.limit).unwrap_or(SignedDuration::MAX) {
                idle.push(IdleGrant {
                    rule: name.clone(),
                    last_packet: last.map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
                });
            }
        }
        self.last.retain(|key, _| matched.contains(key));
        idle.sort_by(|a, b| a.rule.cmp(&b.rule));
        idle
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::agent::render::{IdleLimit, Mode};
    use crate::rules::{Access, AddressPrefix, PortRange, Rule, Scope};

    fn now() -> Timestamp {
        "2030-01-01T00:00:00Z".parse().unwrap()
    }

    fn at(seconds: i64) -> Timestamp {
        now() + SignedDuration::from_secs(seconds)
    }

    fn grant(name: &str, source: &str, port: u16) -> Rule {
        Rule {
            name: name.into(),
            priority: 100,
            direction: Direction::Inbound,
            access: Access::Allow,
            protocol: Protocol::Tcp,
            source_prefixes: vec![source.parse().unwrap()],
            source_ports: vec![PortRange::Any],
            destination_prefixes: vec![AddressPrefix::Net("198.18.0.10/32".parse().unwrap())],
            destination_ports: vec![PortRange::single(port)],
            origin: Origin::SecurityRule { name: name.into() },
            jit: true,
        }
    }

    fn key(source: &str, port: u16) -> SeenKey {
        SeenKey {
            destination: "198.18.0.10".parse().unwrap(),
            source: source.parse().unwrap(),
            protocol: 6,
            port,
        }
    }

    fn target() -> Target {
        Target {
            table: "portcullis".into(),
            addresses: vec!["198.18.0.10".parse().unwrap()],
            mode: Mode::Host,
        }
    }

    #[test]
    fn reads_flows_and_their_last_packet_from_nft() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "inet",
            "name": "jit_seen_v4", "table": "portcullis", "flags": ["timeout"], "timeout": 90000,
            "elem": [{"elem": {"val": {"concat": ["198.18.0.10", "198.18.0.20", "tcp", 22]},
            "expires": 89989}}, {"elem": {"val": {"concat": ["2001:2::10", "2001:2::20", 17, 53]},
            "expires": 89999}}]}}]}"#;
        let seen = parse_seen(json, now()).unwrap();
        assert_eq!(
            seen,
            [
                (key("198.18.0.20", 22), at(-10)),
                (
                    SeenKey {
                        destination: "2001:2::10".parse().unwrap(),
                        source: "2001:2::20".parse().unwrap(),
                        protocol: 17,
                        port: 53,
                    },
                    now()
                )
            ]
        );
        assert!(
            parse_seen(
                "{\"nftables\": [{\"set\": {\"elem\": [{\"elem\": {\"val\": 1}}]}}]}",
                now()
            )
            .is_err()
        );
    }

    #[test]
    fn a_grant_is_idle_once_its_flows_are_silent_for_its_limit() {
        let limit = |seconds| IdleLimit {
            limit: Duration::from_secs(seconds),
            since: at(-100),
        };
        let policy = Policy {
            rules: vec![
                grant("busy", "198.18.0.20", 22),
                grant("quiet", "198.18.0.21", 22),
                grant("never", "198.18.0.22", 22),
                grant("unlimited", "198.18.0.23", 22),
            ],
            scope: Scope::default(),
            expiries: ["busy", "quiet", "never", "unlimited"]
                .into_iter()
                .map(|n| (n.to_owned(), at(3600)))
                .collect(),
            closing: Default::default(),
            idle: BTreeMap::from([
                ("busy".to_owned(), limit(30)),
                ("quiet".to_owned(), limit(30)),
                ("never".to_owned(), limit(30)),
            ]),
        };
        let mut activity = Activity::new(at(-200));
        activity.record([
            (key("198.18.0.20", 22), at(-5)),
            (key("198.18.0.21", 22), at(-40)),
            (key("198.18.0.23", 22), at(-90)),
            // Another port of the same source is another grant's flow.
            (key("198.18.0.20", 80), at(-1)),
        ]);
        let idle = activity.idle(&policy, &target(), now());
        let names: Vec<&str> = idle.iter().map(|g| g.rule.as_str()).collect();
        assert_eq!(names, ["never", "quiet"]);
        assert_eq!(idle[1].last_packet.as_ref().map(|t| t.0), Some(at(-40)));
        assert_eq!(idle[0].last_packet, None);
        // Flows of no grant are forgotten.
        assert!(!activity.last.contains_key(&key("198.18.0.20", 80)));

        // After a full replace (empty sets), nobody is idle until a whole limit passes.
        activity.restarted(at(-10));
        assert!(activity.idle(&policy, &target(), now()).is_empty());
        assert_eq!(activity.idle(&policy, &target(), at(20)).len(), 2);
        assert_eq!(activity.idle(&policy, &target(), at(25)).len(), 3);
    }
}
