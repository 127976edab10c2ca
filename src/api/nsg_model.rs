//! The one conversion of an NSG and its `SecurityRule` objects into the rule model.
//!
//! The operator's status, its JIT placement and the agent's enforcement all read an NSG
//! through [`NsgModel::new`], so they cannot disagree about what a rule means, which rules
//! are in force at an instant, or what is unreadable.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::convert::{self, ConvertError};
use super::jit_policy::EstablishedConnections;
use super::nsg::NetworkSecurityGroup;
use super::security_rule::{LABEL_MANAGED_BY, MANAGED_BY, SecurityRule, SecurityRuleSpec};
use crate::rules::{self, Origin, Scope, duration};

/// An NSG's rules in the model, as of one instant.
#[derive(Debug)]
pub struct NsgModel {
    pub scope: Scope,
    /// Inline rules and the objects in force, unordered ([`rules::effective`] orders them).
    pub rules: Vec<rules::Rule>,
    /// When each object rule that has an expiry stops being in force, by rule name.
    pub expiries: BTreeMap<String, Timestamp>,
    /// The object rules with an expiry whose connections end with them
    /// (`establishedConnections: Close`), by rule name.
    pub closing: BTreeSet<String>,
    /// The object rules with an expiry and an `idleTimeout`, by rule name: the timeout and
    /// when the object was created (a grant that never carried a packet is idle from then).
    pub idle: BTreeMap<String, (Duration, Timestamp)>,
    /// What could not be read. Never skipped silently: leaving out a deny would open what
    /// it closes, so enforcement refuses a model with errors and the status names them.
    pub invalid: Vec<ConvertError>,
}

/// A `SecurityRule` object as the model reads it: the object itself, or what a cache keeps
/// of it (the operator's keeps only what its readers use).
pub trait RuleObject {
    /// The object's name, which its rule takes.
    fn object_name(&self) -> &str;
    /// Whether the operator created it (see [`is_managed`]).
    fn managed(&self) -> bool;
    /// When it was created.
    fn created(&self) -> Option<Timestamp>;
    fn rule_spec(&self) -> &SecurityRuleSpec;
}

impl RuleObject for SecurityRule {
    fn object_name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    fn managed(&self) -> bool {
        is_managed(self)
    }

    fn created(&self) -> Option<Timestamp> {
        self.metadata.creation_timestamp.as_ref().map(|t| t.0)
    }

    fn rule_spec(&self) -> &SecurityRuleSpec {
        &self.spec
    }
}

impl NsgModel {
    /// `nsg` with `objects` (the `SecurityRule`s naming it) at `now`: an object whose
    /// `expiresAt` has passed is not in force, deleted yet or not.
    pub fn new<'a, R: RuleObject + 'a>(
        nsg: &NetworkSecurityGroup,
        objects: impl IntoIterator<Item = &'a R>,
        now: Timestamp,
    ) -> Self {
        let mut invalid = Vec::new();
        let scope = convert::scope(&nsg.spec).unwrap_or_else(|e| {
            invalid.push(e);
            Scope::default()
        });
        let mut rules = Vec::new();
        for inline in &nsg.spec.security_rules {
            match convert::rule(&inline.name, &inline.fields, Origin::Inline, false) {
                Ok(rule) => rules.push(rule),
                Err(e) => invalid.push(e),
            }
        }
        let mut expiries = BTreeMap::new();
        let mut closing = BTreeSet::new();
        let mut idle = BTreeMap::new();
        for object in objects {
            let spec = object.rule_spec();
            if expired(spec.expires_at.as_ref(), now) {
                continue;
            }
            match object_rule(object) {
                Ok(rule) => {
                    if let Some(at) = &spec.expires_at {
                        expiries.insert(rule.name.clone(), at.0);
                        if spec.established_connections == Some(EstablishedConnections::Close) {
                            closing.insert(rule.name.clone());
                        }
                        match idle_limit(object) {
                            Ok(None) => {}
                            Ok(Some(limit)) => {
                                idle.insert(rule.name.clone(), limit);
                            }
                            Err(e) => invalid.push(e),
                        }
                    }
                    rules.push(rule);
                }
                Err(e) => invalid.push(e),
            }
        }
        Self {
            scope,
            rules,
            expiries,
            closing,
            idle,
            invalid,
        }
    }

    /// When the next object rule expires, changing the model.
    pub fn next_expiry(&self) -> Option<Timestamp> {
        self.expiries.values().min().copied()
    }
}

/// Whether the operator created this rule (and so may change or delete it).
pub fn is_managed(rule: &SecurityRule) -> bool {
    rule.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_MANAGED_BY))
        .is_some_and(|v| v == MANAGED_BY)
}

/// A `SecurityRule` object in the model, named after the object.
pub fn object_rule(object: &impl RuleObject) -> Result<rules::Rule, ConvertError> {
    let name = object.object_name();
    convert::rule(
        name,
        &object.rule_spec().fields,
        Origin::SecurityRule {
            name: name.to_owned(),
        },
        object.managed(),
    )
}

/// An object's `idleTimeout` and creation time, if it has a timeout.
fn idle_limit(object: &impl RuleObject) -> Result<Option<(Duration, Timestamp)>, ConvertError> {
    let Some(timeout) = &object.rule_spec().idle_timeout else {
        return Ok(None);
    };
    let limit = duration::parse(timeout).map_err(|_| ConvertError {
        rule: object.object_name().to_owned(),
        field: "idleTimeout",
        value: timeout.clone(),
    })?;
    let since = object.created().unwrap_or(Timestamp::UNIX_EPOCH);
    Ok(Some((limit, since)))
}

/// Whether a rule's `expiresAt` has passed at `now`: such a rule is never effective.
pub fn expired(expires_at: Option<&Time>, now: Timestamp) -> bool {
    expires_at.is_some_and(|t| t.0 <= now)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(name: &str, port: &str, expires: Option<&str>, managed: bool) -> SecurityRule {
        let labels = if managed {
            json!({ LABEL_MANAGED_BY: MANAGED_BY })
        } else {
            json!({})
        };
        serde_json::from_value(json!({
            "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "SecurityRule",
            "metadata": { "name": name, "labels": labels },
            "spec": {
                "networkSecurityGroupName": "nsg", "priority": 100, "direction": "Inbound",
                "access": "Allow", "protocol": "Tcp", "sourceAddressPrefix": "198.18.1.1",
                "sourcePortRange": "*", "destinationAddressPrefix": "*",
                "destinationPortRange": port, "expiresAt": expires,
            },
        }))
        .unwrap()
    }

    fn closing(name: &str, port: &str, expires: Option<&str>) -> SecurityRule {
        let mut rule = object(name, port, expires, true);
        rule.spec.established_connections = Some(EstablishedConnections::Close);
        rule.spec.idle_timeout = Some("PT5M".into());
        rule.metadata.creation_timestamp = Some(Time("2026-11-24T11:00:00Z".parse().unwrap()));
        rule
    }

    #[test]
    fn expired_objects_are_out_and_unreadable_ones_reported() {
        let nsg: NetworkSecurityGroup = serde_json::from_value(json!({
            "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "NetworkSecurityGroup",
            "metadata": { "name": "nsg" },
            "spec": { "virtualNetworkPrefixes": ["198.18.0.0/24"], "securityRules": [{
                "name": "ssh", "priority": 200, "direction": "Inbound", "access": "Allow",
                "protocol": "Tcp", "sourceAddressPrefix": "*", "sourcePortRange": "*",
                "destinationAddressPrefix": "*", "destinationPortRange": "22" }] },
        }))
        .unwrap();
        let now: Timestamp = "2026-11-24T12:00:00Z".parse().unwrap();
        let objects = [
            object("open", "22", Some("2026-11-24T13:00:00Z"), true),
            object("gone", "22", Some("2026-11-24T12:00:00Z"), true),
            object("user", "80", None, false),
            closing("cut", "22", Some("2026-11-24T13:00:00Z")),
            object("broken", "port-x", None, false),
        ];
        let model = NsgModel::new(&nsg, &objects, now);
        let names: Vec<&str> = model.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["ssh", "open", "user", "cut"]);
        assert_eq!(model.closing, BTreeSet::from(["cut".to_owned()]));
        assert_eq!(
            model.idle,
            BTreeMap::from([(
                "cut".to_owned(),
                (
                    Duration::from_secs(300),
                    "2026-11-24T11:00:00Z".parse().unwrap()
                )
            )])
        );
        assert!(model.rules[1].jit && !model.rules[2].jit);
        assert_eq!(
            model.next_expiry(),
            Some("2026-11-24T13:00:00Z".parse().unwrap())
        );
        assert_eq!(model.invalid.len(), 1);
        assert_eq!(model.invalid[0].rule, "broken");
        assert_eq!(model.scope.virtual_network.len(), 1);
    }
}
