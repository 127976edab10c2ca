//! What the caches keep of each watched kind. The reconciled kinds are kept as objects (the
//! controllers and the finalizer hand whole objects around), less what no reconciler reads
//! and what can be as large as the object itself. `SecurityRule`s, one per grant and so the
//! largest cache, are kept as a [`CachedRule`]: only what their readers use.

use std::borrow::Cow;
use std::collections::BTreeMap;

use jiff::Timestamp;
use kube::Resource;
use kube::runtime::reflector::Lookup;

use super::Watched;
use crate::access::materialize::{
    LABEL_MACHINE, LABEL_MANAGED_BY, LABEL_NSG, LABEL_POLICY, LABEL_REQUEST, LABEL_ROLE, MANAGED_BY,
};
use crate::api::nsg_model::RuleObject;
use crate::api::security_rule::SecurityRuleSpec;
use crate::api::{
    AgentReport, JitApproval, JitPolicy, JitRequest, NetworkSecurityGroup, SecurityRule,
};

/// How a watched kind is kept in its cache.
pub trait Keep: Watched {
    /// What the cache holds of one object.
    type Kept: Lookup<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static;

    fn keep(self) -> Self::Kept;
}

macro_rules! kept_whole {
    ($($kind:ty),*) => {$(
        impl Keep for $kind {
            type Kept = Self;

            fn keep(mut self) -> Self {
                slim(&mut self);
                self
            }
        }
    )*};
}

kept_whole!(
    NetworkSecurityGroup,
    JitPolicy,
    JitRequest,
    JitApproval,
    AgentReport
);

impl Keep for SecurityRule {
    type Kept = CachedRule;

    fn keep(self) -> CachedRule {
        CachedRule::of(self)
    }
}

/// What `kubectl apply` keeps on every object it applies: a second copy of the object.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Leaves out of the cache what no reconciler reads and what can be as large as the object
/// itself: `managedFields`, and the copy `kubectl apply` keeps in an annotation. Policies,
/// requests and NSGs are applied with kubectl; at 100,000 requests that halves the cache.
fn slim<K: Watched>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove(LAST_APPLIED);
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// What the operator keeps of a `SecurityRule`, for the NSG model and JIT placement (name,
/// creation, spec), the ownership and drift checks before it writes one of its own (the
/// controlling owner, its labels, the spec) and the index (the same). The object as
/// decoded takes about 2.7 KiB; this about half, and there is one per grant.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedRule {
    pub name: String,
    pub namespace: String,
    /// When the object was created: an idle timeout counts from then.
    pub created: Option<Timestamp>,
    pub labels: RuleLabels,
    /// The controlling owner reference, if any (the others are not read).
    pub controller: Option<Controller>,
    pub spec: SecurityRuleSpec,
}

/// The owner reference that controls an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Controller {
    pub kind: String,
    pub name: String,
    pub uid: String,
}

impl CachedRule {
    pub fn of(rule: SecurityRule) -> Self {
        let meta = rule.metadata;
        Self {
            name: meta.name.unwrap_or_default(),
            namespace: meta.namespace.unwrap_or_default(),
            created: meta.creation_timestamp.map(|t| t.0),
            labels: meta.labels.as_ref().map(RuleLabels::of).unwrap_or_default(),
            controller: meta
                .owner_references
                .into_iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map(|o| Controller {
                    kind: o.kind,
                    name: o.name,
                    uid: o.uid,
                }),
            spec: rule.spec,
        }
    }
}

impl RuleObject for CachedRule {
    fn object_name(&self) -> &str {
        &self.name
    }

    fn managed(&self) -> bool {
        self.labels.get(LABEL_MANAGED_BY) == Some(MANAGED_BY)
    }

    fn created(&self) -> Option<Timestamp> {
        self.created
    }

    fn rule_spec(&self) -> &SecurityRuleSpec {
        &self.spec
    }
}

impl Lookup for CachedRule {
    type DynamicType = ();

    fn kind(dyntype: &()) -> Cow<'_, str> {
        <SecurityRule as Resource>::kind(dyntype)
    }

    fn group(dyntype: &()) -> Cow<'_, str> {
        <SecurityRule as Resource>::group(dyntype)
    }

    fn version(dyntype: &()) -> Cow<'_, str> {
        <SecurityRule as Resource>::version(dyntype)
    }

    fn plural(dyntype: &()) -> Cow<'_, str> {
        <SecurityRule as Resource>::plural(dyntype)
    }

    fn name(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.name))
    }

    fn namespace(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.namespace))
    }

    fn resource_version(&self) -> Option<Cow<'_, str>> {
        None
    }

    fn uid(&self) -> Option<Cow<'_, str>> {
        None
    }
}

/// The labels the operator sets on its own rules: all it reads back (whether it made a rule,
/// the rule's role, and, to restore a hand edit, every one it sets). Any other label is a
/// user's and not kept.
pub const KEPT_LABELS: [&str; 6] = [
    LABEL_MANAGED_BY,
    LABEL_ROLE,
    LABEL_NSG,
    LABEL_POLICY,
    LABEL_MACHINE,
    LABEL_REQUEST,
];

/// A rule's values of the [`KEPT_LABELS`], one after another in one string: a map of six
/// would cost a tree node and a copy of each key per rule, and six strings six allocations
/// of at least 32 bytes each, for values of a few characters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleLabels {
    values: Box<str>,
    /// Where each label's value lies in `values`; none for a label not set.
    spans: [Option<(u16, u16)>; KEPT_LABELS.len()],
}

impl RuleLabels {
    fn of(labels: &BTreeMap<String, String>) -> Self {
        let mut values = String::new();
        let spans = KEPT_LABELS.map(|key| {
            let value = labels.get(key)?;
            let start = values.len();
            values.push_str(value);
            // A label value has at most 63 characters.
            Some((
                u16::try_from(start).ok()?,
                u16::try_from(values.len()).ok()?,
            ))
        });
        Self {
            values: values.into(),
            spans,
        }
    }

    /// The value of label `key`; none for a label not set, or not kept.
    pub fn get(&self, key: &str) -> Option<&str> {
        let at = KEPT_LABELS.iter().position(|k| *k == key)?;
        let (start, end) = self.spans[at]?;
        self.values.get(usize::from(start)..usize::from(end))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::access::materialize;

    #[test]
    fn the_cache_keeps_no_copy_of_the_object_and_the_users_annotations() {
        let mut object = crate::api::nsg::empty("a", "web");
        object.metadata.managed_fields = Some(vec![Default::default()]);
        object.metadata.annotations = Some(
            [
                (LAST_APPLIED.to_owned(), "{\"a copy\": true}".to_owned()),
                ("team".to_owned(), "web".to_owned()),
            ]
            .into(),
        );
        let mut object = object.keep();
        assert_eq!(object.metadata.managed_fields, None);
        let annotations = object.metadata.annotations.clone().unwrap();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["team"]);
        object.metadata.annotations = Some([(LAST_APPLIED.to_owned(), String::new())].into());
        assert_eq!(object.keep().metadata.annotations, None);
    }

    fn grant_rule() -> SecurityRule {
        serde_json::from_value(json!({
            "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "SecurityRule",
            "metadata": {
                "name": "jit-allow-r-vm-22-tcp-0123abcd", "namespace": "team",
                "uid": "u-rule", "resourceVersion": "42", "generation": 1,
                "creationTimestamp": "2026-11-24T11:00:00Z",
                "labels": {
                    LABEL_MANAGED_BY: MANAGED_BY, LABEL_ROLE: "allow", LABEL_NSG: "nsg",
                    LABEL_POLICY: "web", LABEL_MACHINE: "vm", LABEL_REQUEST: "r",
                    "team": "web",
                },
                "annotations": { "note": "kept by nobody" },
                "finalizers": ["example.com/hold"],
                "managedFields": [{ "manager": "portcullis-controller" }],
                "ownerReferences": [
                    { "apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u0" },
                    { "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "JitRequest",
                      "name": "r", "uid": "u-r", "controller": true,
                      "blockOwnerDeletion": true },
                ],
            },
            "spec": {
                "networkSecurityGroupName": "nsg", "priority": 100, "direction": "Inbound",
                "access": "Allow", "protocol": "Tcp", "sourceAddressPrefix": "198.19.0.1",
                "sourcePortRange": "*", "destinationAddressPrefix": "198.18.0.1",
                "destinationPortRanges": ["22"], "expiresAt": "2026-11-24T12:00:00Z",
                "idleTimeout": "PT5M",
            },
        }))
        .unwrap()
    }

    #[test]
    fn a_rule_keeps_what_its_readers_use() {
        let object = grant_rule();
        let spec = object.spec.clone();
        let kept = object.keep();
        assert_eq!(
            (kept.name.as_str(), kept.namespace.as_str()),
            ("jit-allow-r-vm-22-tcp-0123abcd", "team")
        );
        assert_eq!(kept.created, Some("2026-11-24T11:00:00Z".parse().unwrap()));
        assert_eq!(kept.spec, spec);
        assert_eq!(
            kept.controller,
            Some(Controller {
                kind: "JitRequest".into(),
                name: "r".into(),
                uid: "u-r".into(),
            })
        );
        assert!(kept.managed());
        for (key, value) in [
            (LABEL_MANAGED_BY, MANAGED_BY),
            (LABEL_ROLE, "allow"),
            (LABEL_NSG, "nsg"),
            (LABEL_POLICY, "web"),
            (LABEL_MACHINE, "vm"),
            (LABEL_REQUEST, "r"),
        ] {
            assert_eq!(kept.labels.get(key), Some(value), "{key}");
        }
        // Dropped: the user's label, and what identifies a version (no reader compares
        // versions of rules; the store is keyed by namespace and name).
        assert_eq!(kept.labels.get("team"), None);
        assert_eq!(Lookup::resource_version(&kept), None);
        assert_eq!(Lookup::uid(&kept), None);
    }

    #[test]
    fn a_users_rule_is_kept_as_unmanaged_without_owner() {
        let mut object = grant_rule();
        object.metadata.labels = Some([("team".to_owned(), "web".to_owned())].into());
        object.metadata.owner_references = None;
        let kept = object.keep();
        assert!(!kept.managed());
        assert_eq!(kept.labels, RuleLabels::default());
        assert_eq!(kept.controller, None);
    }

    #[test]
    fn an_empty_label_is_set_and_a_missing_one_is_not() {
        let labels = RuleLabels::of(
            &[
                (LABEL_ROLE.to_owned(), String::new()),
                (LABEL_REQUEST.to_owned(), "r".to_owned()),
            ]
            .into(),
        );
        assert_eq!(labels.get(LABEL_ROLE), Some(""));
        assert_eq!(labels.get(LABEL_REQUEST), Some("r"));
        assert_eq!(labels.get(LABEL_NSG), None);
    }

    #[test]
    fn every_label_the_operator_sets_is_kept() {
        // Its drift check compares them all: one not kept would look changed every time.
        let policy: crate::api::JitPolicySpec = serde_json::from_value(json!({
            "virtualMachines": [{
                "name": "vm", "address": "198.18.0.1", "networkSecurityGroupName": "nsg",
                "ports": [{ "number": 22, "protocol": "TCP", "maxRequestAccessDuration": "PT1H" }],
            }],
        }))
        .unwrap();
        let owner = materialize::Owner {
            name: "web",
            uid: "u-web",
        };
        let mut labels: Vec<String> = policy
            .virtual_machines
            .iter()
            .flat_map(|machine| {
                materialize::deny_rule(owner, machine, 4000)
                    .labels
                    .into_keys()
            })
            .collect();
        let grant = crate::access::validate::validate(
            &policy,
            &serde_json::from_value(json!({
                "policyName": "web",
                "virtualMachines": [{ "name": "vm", "ports": [{
                    "number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "198.19.0.1",
                }]}],
            }))
            .unwrap(),
        )
        .unwrap()
        .remove(0);
        let request = materialize::Owner {
            name: "r",
            uid: "u-r",
        };
        let end = "2026-11-24T12:00:00Z".parse().unwrap();
        labels.extend(
            materialize::allow_rule(request, "web", &grant, 100, end)
                .labels
                .into_keys(),
        );
        assert!(!labels.is_empty());
        for label in labels {
            assert!(KEPT_LABELS.contains(&label.as_str()), "{label} is not kept");
        }
    }
}
