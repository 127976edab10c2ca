//! Which watch events can change what the agent enforces.
//!
//! The agent watches its NSG and that NSG's `SecurityRule`s. Many of those events change
//! nothing it enforces: a status write to the NSG (the operator's summary of the agents'
//! reports), a rule's metadata. A round on each of them is
//! work in proportion to the NSG's grants, and a grant arriving meanwhile waits for it.
//! So a round runs for an event only when the event touches what the last round read:
//! the NSG's identity or spec generation, or a rule of this NSG (or one that was) at a new
//! version. Rounds that time brings (an expiry, a poll, a retry) run regardless.
//!
//! Pure: the loop turns each watch event into a [`Change`] and asks [`Inputs::moved_by`].

use std::collections::HashMap;

use kube::runtime::watcher;

use crate::api::{NetworkSecurityGroup, SecurityRule};

/// What one watch event did, reduced to what the agent's rounds read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The NSG is (now) this object at this spec generation.
    Nsg {
        uid: String,
        generation: Option<i64>,
    },
    /// The NSG was deleted.
    NsgGone,
    /// A rule of the namespace is (now) at this version, for this NSG.
    Rule {
        name: String,
        nsg: String,
        version: String,
    },
    /// A rule of the namespace was deleted.
    RuleGone { name: String },
    /// A watch listed everything again: anything may have changed.
    Relisted,
    /// Nothing the store shows yet (the items of a relist before it completes).
    Nothing,
}

impl Change {
    /// The change an NSG watch event makes.
    pub fn of_nsg(event: &watcher::Event<NetworkSecurityGroup>) -> Self {
        match event {
            watcher::Event::Apply(nsg) => Self::Nsg {
                uid: nsg.metadata.uid.clone().unwrap_or_default(),
                generation: nsg.metadata.generation,
            },
            watcher::Event::Delete(_) => Self::NsgGone,
            watcher::Event::InitDone => Self::Relisted,
            watcher::Event::Init | watcher::Event::InitApply(_) => Self::Nothing,
        }
    }

    /// The change a SecurityRule watch event makes.
    pub fn of_rule(event: &watcher::Event<SecurityRule>) -> Self {
        let name = |rule: &SecurityRule| rule.metadata.name.clone().unwrap_or_default();
        match event {
            watcher::Event::Apply(rule) => Self::Rule {
                name: name(rule),
                nsg: rule.spec.network_security_group_name.clone(),
                version: rule.metadata.resource_version.clone().unwrap_or_default(),
            },
            watcher::Event::Delete(rule) => Self::RuleGone { name: name(rule) },
            watcher::Event::InitDone => Self::Relisted,
            watcher::Event::Init | watcher::Event::InitApply(_) => Self::Nothing,
        }
    }
}

/// What the last round read: the NSG's identity and generation, and the version of each of
/// its rules. Empty (every change moves it) until a round has read the NSG.
#[derive(Debug, Default)]
pub struct Inputs {
    nsg: Option<(String, Option<i64>)>,
    rules: HashMap<String, String>,
}

impl Inputs {
    /// Records what a round read.
    pub fn record(&mut self, nsg: &NetworkSecurityGroup, rules: &[&SecurityRule]) {
        self.nsg = Some((
            nsg.metadata.uid.clone().unwrap_or_default(),
            nsg.metadata.generation,
        ));
        self.rules = rules
            .iter()
            .map(|rule| {
                (
                    rule.metadata.name.clone().unwrap_or_default(),
                    rule.metadata.resource_version.clone().unwrap_or_default(),
                )
            })
            .collect();
    }

    /// Forgets what was read, so that the next event runs a round whatever it is.
    pub fn forget(&mut self) {
        *self = Self::default();
    }

    /// Whether `change` may change what a round would enforce for NSG `nsg`.
    pub fn moved_by(&self, nsg: &str, change: &Change) -> bool {
        match change {
            Change::Nothing => false,
            Change::Relisted | Change::NsgGone => true,
            Change::Nsg { uid, generation } => {
                self.nsg.as_ref() != Some(&(uid.clone(), *generation))
            }
            Change::Rule {
                name,
                nsg: of,
                version,
            } => match self.rules.get(name) {
                // One the last round read: moved at a new version, or to another NSG.
                Some(read) => read != version || of != nsg,
                // A rule it did not read: only if it is (now) one of this NSG's.
                None => of == nsg || self.nsg.is_none(),
            },
            Change::RuleGone { name } => self.rules.contains_key(name) || self.nsg.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;

    fn nsg(uid: &str, generation: i64) -> NetworkSecurityGroup {
        let mut nsg: NetworkSecurityGroup =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "nsg"}, "spec": {}}))
                .unwrap();
        nsg.metadata.uid = Some(uid.into());
        nsg.metadata.generation = Some(generation);
        nsg
    }

    fn rule(name: &str, of: &str, version: &str) -> SecurityRule {
        let mut rule: SecurityRule = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "networkSecurityGroupName": of,
                "priority": 100,
                "direction": "Inbound",
                "access": "Allow",
                "protocol": "Tcp",
                "sourceAddressPrefix": "198.18.1.1",
                "sourcePortRange": "*",
                "destinationAddressPrefix": "198.18.0.10",
                "destinationPortRange": "22"
            }
        }))
        .unwrap();
        rule.metadata = ObjectMeta {
            resource_version: Some(version.into()),
            ..rule.metadata
        };
        rule
    }

    fn read() -> Inputs {
        let mut inputs = Inputs::default();
        inputs.record(&nsg("u1", 3), &[&rule("grant-a", "nsg", "10")]);
        inputs
    }

    fn apply(rule: SecurityRule) -> Change {
        Change::of_rule(&watcher::Event::Apply(rule))
    }

    #[test]
    fn status_writes_to_the_nsg_move_nothing() {
        // A status write keeps the generation; the event carries the same identity.
        let status_write = Change::of_nsg(&watcher::Event::Apply(nsg("u1", 3)));
        assert!(!read().moved_by("nsg", &status_write));
    }

    #[test]
    fn a_new_spec_or_a_new_nsg_of_the_same_name_moves_it() {
        let inputs = read();
        for event in [
            watcher::Event::Apply(nsg("u1", 4)),
            watcher::Event::Apply(nsg("u2", 3)),
            watcher::Event::Delete(nsg("u1", 3)),
        ] {
            assert!(inputs.moved_by("nsg", &Change::of_nsg(&event)), "{event:?}");
        }
    }

    #[test]
    fn rules_of_this_nsg_move_it_and_others_do_not() {
        let inputs = read();
        // New, changed, deleted, or moved away: all change what is enforced.
        assert!(inputs.moved_by("nsg", &apply(rule("grant-b", "nsg", "11"))));
        assert!(inputs.moved_by("nsg", &apply(rule("grant-a", "nsg", "12"))));
        assert!(inputs.moved_by("nsg", &apply(rule("grant-a", "other", "12"))));
        let gone = Change::of_rule(&watcher::Event::Delete(rule("grant-a", "nsg", "10")));
        assert!(inputs.moved_by("nsg", &gone));
        // The same version again (a relist's item), another NSG's rules: nothing.
        assert!(!inputs.moved_by("nsg", &apply(rule("grant-a", "nsg", "10"))));
        assert!(!inputs.moved_by("nsg", &apply(rule("grant-c", "other", "13"))));
        let other_gone = Change::of_rule(&watcher::Event::Delete(rule("grant-c", "other", "13")));
        assert!(!inputs.moved_by("nsg", &other_gone));
    }

    #[test]
    fn a_skipped_event_never_hides_a_change_of_what_the_round_reads() {
        // Random events on an NSG and four rules moving between two NSGs, applied to a
        // store as the reflector would; a round runs whenever `moved_by` says so. Whenever
        // it says no, the NSG's identity and this NSG's rules (name → version) in the
        // store must be exactly what the last round read.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let mut store_nsg: Option<NetworkSecurityGroup> = Some(nsg("u0", 1));
        let mut store_rules: HashMap<String, SecurityRule> = HashMap::new();
        let mut inputs = Inputs::default();
        let mut version = 0;
        let read = |nsg: &Option<NetworkSecurityGroup>, rules: &HashMap<String, SecurityRule>| {
            let mine: std::collections::BTreeMap<String, String> = rules
                .values()
                .filter(|r| r.spec.network_security_group_name == "nsg")
                .map(|r| {
                    (
                        r.metadata.name.clone().unwrap(),
                        r.metadata.resource_version.clone().unwrap(),
                    )
                })
                .collect();
            let identity = nsg
                .as_ref()
                .map(|n| (n.metadata.uid.clone().unwrap(), n.metadata.generation));
            (identity, mine)
        };
        let mut last_read = None;
        for step in 0..20_000 {
            version += 1;
            let change = match next(6) {
                0 => {
                    // A status write (same generation), a spec change, or a new object.
                    let (uid, generation) = store_nsg
                        .as_ref()
                        .map(|n| {
                            (
                                n.metadata.uid.clone().unwrap(),
                                n.metadata.generation.unwrap(),
                            )
                        })
                        .unwrap_or(("u0".into(), 1));
                    let updated = match next(3) {
                        0 => nsg(&uid, generation),
                        1 => nsg(&uid, generation + 1),
                        _ => nsg(&format!("u{version}"), 1),
                    };
                    store_nsg = Some(updated.clone());
                    Change::of_nsg(&watcher::Event::Apply(updated))
                }
                1 if store_nsg.is_some() && next(4) == 0 => {
                    let gone = store_nsg.take().unwrap();
                    Change::of_nsg(&watcher::Event::Delete(gone))
                }
                1..=3 => {
                    let name = format!("rule-{}", next(4));
                    let of = if next(2) == 0 { "nsg" } else { "other" };
                    let updated = rule(&name, of, &version.to_string());
                    store_rules.insert(name, updated.clone());
                    Change::of_rule(&watcher::Event::Apply(updated))
                }
                4 => {
                    let name = format!("rule-{}", next(4));
                    match store_rules.remove(&name) {
                        Some(gone) => Change::of_rule(&watcher::Event::Delete(gone)),
                        None => Change::Nothing,
                    }
                }
                _ => {
                    // A relist's item: the store is not updated before the relist ends.
                    let name = format!("rule-{}", next(4));
                    let item = rule(&name, "nsg", &version.to_string());
                    Change::of_rule(&watcher::Event::InitApply(item))
                }
            };
            if inputs.moved_by("nsg", &change) {
                // The round: reads the NSG (returns early without one) and its rules.
                match &store_nsg {
                    Some(current) => {
                        let mut mine: Vec<&SecurityRule> = store_rules
                            .values()
                            .filter(|r| r.spec.network_security_group_name == "nsg")
                            .collect();
                        mine.sort_by_key(|r| r.metadata.name.clone());
                        inputs.record(current, &mine);
                        last_read = Some(read(&store_nsg, &store_rules));
                    }
                    None => {
                        inputs.forget();
                        last_read = None;
                    }
                }
            } else if let Some(last) = &last_read {
                assert_eq!(
                    &read(&store_nsg, &store_rules),
                    last,
                    "step {step}: {change:?} was skipped but changed what a round reads"
                );
            }
        }
    }

    #[test]
    fn before_a_round_read_anything_or_after_a_relist_every_change_counts() {
        let empty = Inputs::default();
        assert!(empty.moved_by("nsg", &apply(rule("grant-c", "other", "13"))));
        assert!(empty.moved_by("nsg", &Change::of_nsg(&watcher::Event::Apply(nsg("u1", 3)))));
        let mut inputs = read();
        assert!(inputs.moved_by("nsg", &Change::Relisted));
        inputs.forget();
        assert!(inputs.moved_by("nsg", &Change::RuleGone { name: "x".into() }));
        // The items of a relist wait for its end.
        let item = Change::of_rule(&watcher::Event::InitApply(rule("grant-a", "nsg", "10")));
        assert!(!read().moved_by("nsg", &item));
    }
}
