//! What every reconciler shares: the client, the event recorder, the metrics, the caches of
//! all four kinds, and the one clock.

use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};

use super::metrics::Metrics;
use crate::access::Violation;
use crate::access::materialize::{LABEL_MANAGED_BY, MANAGED_BY};
use crate::api::convert::{self, ConvertError};
use crate::api::jit_request::Requestor;
use crate::api::{GROUP, JitPolicy, JitRequest, NetworkSecurityGroup, SecurityRule};
use crate::rules::{self, Origin, Scope};

/// Objects whose related objects changed lately, by kind and `namespace/name`.
///
/// A controller is woken by its own watch on a related kind (a policy, a rule) but reads
/// that kind from a cache fed by another watch, which may not hold the change yet. An object
/// woken that way looks again shortly for a few seconds, so a late cache never leaves a
/// revoke, a restore or a status behind.
#[derive(Clone, Default)]
pub struct RecentChanges(
    Arc<std::sync::Mutex<std::collections::HashMap<ChangeKey, std::time::Instant>>>,
);

/// A controller's name and an object's namespace and name.
type ChangeKey = (&'static str, String, String);

impl RecentChanges {
    /// How long after a change the object keeps re-checking.
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(5);
    /// How soon a re-check comes.
    pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

    /// Notes that something `kind/namespace/name` depends on changed just now.
    pub fn record(&self, kind: &'static str, namespace: &str, name: &str) {
        let mut seen = self.0.lock().expect("recent changes lock");
        seen.retain(|_, at| at.elapsed() < Self::WINDOW);
        seen.insert(
            (kind, namespace.to_owned(), name.to_owned()),
            std::time::Instant::now(),
        );
    }

    /// `wait`, shortened to [`RecentChanges::RECHECK`] if the object was noted lately.
    pub fn recheck(
        &self,
        kind: &'static str,
        namespace: &str,
        name: &str,
        wait: Option<std::time::Duration>,
    ) -> Option<std::time::Duration> {
        let recent = self
            .0
            .lock()
            .expect("recent changes lock")
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .is_some_and(|at| at.elapsed() < Self::WINDOW);
        if recent {
            Some(wait.map_or(Self::RECHECK, |w| w.min(Self::RECHECK)))
        } else {
            wait
        }
    }
}

/// The reflector caches, read instead of the API on every hot path.
#[derive(Clone)]
pub struct Stores {
    pub nsgs: Store<NetworkSecurityGroup>,
    pub policies: Store<JitPolicy>,
    pub requests: Store<JitRequest>,
    pub rules: Store<SecurityRule>,
}

/// Shared state of the controllers.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    pub changes: RecentChanges,
    /// Deleted requests' last records, for their policies' history.
    pub departed: super::policy::Departed,
    synced: std::sync::atomic::AtomicBool,
}

/// An NSG's rules, split the way JIT placement needs them.
pub struct NsgView {
    pub scope: Scope,
    /// Inline rules and `SecurityRule`s the operator did not create.
    pub user_rules: Vec<rules::Rule>,
    /// Rules that could not be read (named in conditions, never fatal).
    pub invalid: Vec<ConvertError>,
}

impl Context {
    /// Builds the context; the recorder publishes events as `reporter`.
    pub fn new(
        client: Client,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        stores: Stores,
        changes: RecentChanges,
        departed: super::policy::Departed,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            stores,
            changes,
            departed,
            synced: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The current time. Every decision that depends on time reads it here, once per
    /// reconcile, so that a reconcile reasons about one instant and tests know where the
    /// clock enters.
    pub fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    /// Resolves once every cache holds its first full list, and from then on lets
    /// [`Context::synced`] answer yes. Awaited once, by the operator's startup.
    ///
    /// Each round asks the stores afresh: a waiter parked across the stores' first list
    /// was seen to miss its wake-up, so no single wait is trusted to end.
    pub async fn wait_synced(&self) {
        loop {
            let all = futures::future::join4(
                self.stores.nsgs.wait_until_ready(),
                self.stores.policies.wait_until_ready(),
                self.stores.requests.wait_until_ready(),
                self.stores.rules.wait_until_ready(),
            );
            if tokio::time::timeout(std::time::Duration::from_millis(100), all)
                .await
                .is_ok()
            {
                break;
            }
        }
        self.synced
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether every cache holds its first full list. Until then a reconciler would act
    /// on a partial view (a missing policy, a rule not seen yet), so reconcilers check
    /// this and come back shortly instead of waiting inside the reconcile.
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The NSG `name` in `namespace`, from the cache.
    pub fn nsg(&self, namespace: &str, name: &str) -> Option<Arc<NetworkSecurityGroup>> {
        self.stores
            .nsgs
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// The policy `name` in `namespace`, from the cache.
    pub fn policy(&self, namespace: &str, name: &str) -> Option<Arc<JitPolicy>> {
        self.stores
            .policies
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// The `SecurityRule` objects that reference the NSG.
    pub fn rules_of(&self, namespace: &str, nsg: &str) -> Vec<Arc<SecurityRule>> {
        self.stores
            .rules
            .state()
            .into_iter()
            .filter(|r| {
                r.metadata.namespace.as_deref() == Some(namespace)
                    && r.spec.network_security_group_name == nsg
            })
            .collect()
    }

    /// The NSG's scope and its user rules (inline plus unmanaged objects), for placement.
    pub fn nsg_view(&self, nsg: &NetworkSecurityGroup) -> NsgView {
        let namespace = nsg.metadata.namespace.as_deref().unwrap_or_default();
        let name = nsg.metadata.name.as_deref().unwrap_or_default();
        let mut invalid = Vec::new();
        let scope = convert::scope(&nsg.spec).unwrap_or_else(|e| {
            invalid.push(e);
            Scope::default()
        });
        let mut user_rules = Vec::new();
        for inline in &nsg.spec.security_rules {
            match convert::rule(&inline.name, &inline.fields, Origin::Inline, false) {
                Ok(rule) => user_rules.push(rule),
                Err(e) => invalid.push(e),
            }
        }
        for object in self.rules_of(namespace, name) {
            if is_managed(&object) {
                continue;
            }
            match object_rule(&object) {
                Ok(rule) => user_rules.push(rule),
                Err(e) => invalid.push(e),
            }
        }
        NsgView {
            scope,
            user_rules,
            invalid,
        }
    }

    /// Publishes a Kubernetes Event about `object`. Events are best effort: a failure is
    /// logged, never fails the reconcile that already did its work.
    pub async fn event<K>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, reason, "cannot publish event");
        }
    }
}

impl Context {
    /// Asks the apiserver whether `requestor` (user, uid, groups and extra, exactly as
    /// admission recorded them) may `verb` the policy `policy` in `namespace`; returns the
    /// refusal, if any. RBAC, `resourceNames` included, and every other authorizer decide,
    /// as of now: permissions withdrawn after admission are seen.
    pub async fn may(
        &self,
        requestor: &Requestor,
        verb: &str,
        namespace: &str,
        policy: &str,
    ) -> Result<Option<Violation>, super::Error> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(requestor.username.clone()),
                uid: requestor.uid.clone().filter(|u| !u.is_empty()),
                groups: Some(requestor.groups.clone()),
                extra: (!requestor.extra.is_empty()).then(|| requestor.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()),
                    verb: Some(verb.to_owned()),
                    group: Some(GROUP.to_owned()),
                    resource: Some(JitPolicy::plural(&()).into_owned()),
                    name: Some(policy.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let reviewed = kube::Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&kube::api::PostParams::default(), &review)
            .await?;
        let status = reviewed.status.unwrap_or_default();
        if status.allowed {
            return Ok(None);
        }
        let why = status
            .reason
            .filter(|r| !r.is_empty())
            .or(status.evaluation_error.filter(|e| !e.is_empty()))
            .unwrap_or_else(|| {
                format!(
                    "no role grants the verb {verb} on it (see ClusterRole portcullis-requester)"
                )
            });
        Ok(Some(Violation::NotAuthorized {
            requestor: requestor.username.clone(),
            verb: verb.to_owned(),
            policy: policy.to_owned(),
            namespace: namespace.to_owned(),
            why,
        }))
    }
}

/// Whose an existing rule is, as far as writing it goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Ownership {
    /// The operator's, controlled by the owner about to write it.
    Ours,
    /// Not to be written: someone else's, with who holds it, for the conflict report.
    Foreign(String),
}

/// Whether the operator may write `rule` on behalf of the owner with UID `owner_uid`: only a
/// managed rule that owner controls. A managed rule another object controls (two owners'
/// names clashing) or a user's rule of the same name is someone else's.
pub fn ownership(rule: &SecurityRule, owner_uid: &str) -> Ownership {
    let controller = rule
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    match controller {
        Some(o) if o.uid == owner_uid && is_managed(rule) => Ownership::Ours,
        Some(o) => Ownership::Foreign(format!("it is controlled by {} {}", o.kind, o.name)),
        None if is_managed(rule) => Ownership::Foreign("it has no controlling owner".to_owned()),
        None => Ownership::Foreign(format!(
            "it is a user's rule (no {LABEL_MANAGED_BY}={MANAGED_BY} label)"
        )),
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
pub fn object_rule(object: &SecurityRule) -> Result<rules::Rule, ConvertError> {
    let name = object.metadata.name.clone().unwrap_or_default();
    convert::rule(
        &name,
        &object.spec.fields,
        Origin::SecurityRule { name: name.clone() },
        is_managed(object),
    )
}

/// Whether a rule's `expiresAt` has passed at `now`: such a rule is never effective.
pub fn expired(expires_at: Option<&Time>, now: Timestamp) -> bool {
    expires_at.is_some_and(|t| t.0 <= now)
}

impl Context {
    /// Writes `status` by server-side apply as the operator's field manager. Fields other
    /// managers own (agents' enforcement reports) are left alone.
    pub async fn apply_status<K>(
        &self,
        object: &K,
        status: serde_json::Value,
    ) -> Result<(), super::Error>
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let (name, namespace) = super::name_and_namespace(object, "object")?;
        let api: kube::Api<K> = kube::Api::namespaced(self.client.clone(), &namespace);
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        api.patch_status(
            &name,
            &kube::api::PatchParams::apply(super::MANAGER).force(),
            &kube::api::Patch::Apply(&patch),
        )
        .await?;
        Ok(())
    }
}

impl Context {
    /// Ensures the operator's `SecurityRule` exists exactly as `desired`, owned by `owner`.
    ///
    /// Reads the cache first and writes only on a difference, so a steady state costs no API
    /// calls. A rule of that name that another object controls, or that the operator did not
    /// create, is never written over: that is [`super::Error::RuleConflict`]. A new rule is
    /// created with a plain create, which fails rather than takes over an object the cache
    /// has not seen yet; a deleted or hand-edited rule of ours is restored by server-side
    /// apply with force (the operator's fields win, anything else a user added stays).
    pub async fn ensure_rule(
        &self,
        namespace: &str,
        desired: &crate::access::materialize::Materialized,
        owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    ) -> Result<bool, super::Error> {
        let api = kube::Api::<SecurityRule>::namespaced(self.client.clone(), namespace);
        let mut current = self
            .stores
            .rules
            .get(&ObjectRef::new(&desired.name).within(namespace));
        let object = serde_json::json!({
            "apiVersion": SecurityRule::api_version(&()),
            "kind": SecurityRule::kind(&()),
            "metadata": {
                "name": desired.name,
                "namespace": namespace,
                "labels": desired.labels,
                "ownerReferences": [owner],
            },
            "spec": desired.spec,
        });
        if current.is_none() {
            let new: SecurityRule =
                serde_json::from_value(object.clone()).expect("a materialized rule deserializes");
            let params = kube::api::PostParams {
                field_manager: Some(super::MANAGER.to_owned()),
                ..kube::api::PostParams::default()
            };
            match api.create(&params, &new).await {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    current = api.get_opt(&desired.name).await?.map(Arc::new);
                }
                Err(error) => return Err(error.into()),
            }
        }
        if let Some(rule) = &current {
            match ownership(rule, &owner.uid) {
                Ownership::Ours => {}
                Ownership::Foreign(holder) => {
                    return Err(super::Error::RuleConflict {
                        rule: desired.name.clone(),
                        owner: format!("{} {}", owner.kind, owner.name),
                        holder,
                    });
                }
            }
            let in_place = rule.spec == desired.spec
                && desired
                    .labels
                    .iter()
                    .all(|(k, v)| rule.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
            if in_place {
                return Ok(false);
            }
        }
        api.patch(
            &desired.name,
            &kube::api::PatchParams::apply(super::MANAGER).force(),
            &kube::api::Patch::Apply(&object),
        )
        .await?;
        Ok(true)
    }

    /// Deletes an operator rule; one that is already gone is fine.
    pub async fn delete_rule(&self, namespace: &str, name: &str) -> Result<(), super::Error> {
        let api = kube::Api::<SecurityRule>::namespaced(self.client.clone(), namespace);
        match api
            .delete(name, &kube::api::DeleteParams::background())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// The operator's rules in `namespace` that `owner_uid` controls.
    pub fn rules_owned_by(&self, namespace: &str, owner_uid: &str) -> Vec<Arc<SecurityRule>> {
        self.stores
            .rules
            .state()
            .into_iter()
            .filter(|r| {
                r.metadata.namespace.as_deref() == Some(namespace)
                    && is_managed(r)
                    && r.metadata.owner_references.as_ref().is_some_and(|refs| {
                        refs.iter()
                            .any(|o| o.uid == owner_uid && o.controller == Some(true))
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rule(labels: serde_json::Value, owners: serde_json::Value) -> SecurityRule {
        serde_json::from_value(json!({
            "apiVersion": "jit.portcullis.dev/v1alpha1",
            "kind": "SecurityRule",
            "metadata": { "name": "jit-deny-x-y-z-1234abcd", "labels": labels, "ownerReferences": owners },
            "spec": {
                "networkSecurityGroupName": "nsg", "priority": 100,
                "direction": "Inbound", "access": "Deny", "protocol": "Tcp",
                "sourceAddressPrefix": "*", "sourcePortRange": "*",
                "destinationAddressPrefix": "*", "destinationPortRange": "22",
            },
        }))
        .unwrap()
    }

    fn owner(uid: &str, controller: bool) -> serde_json::Value {
        json!([{ "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "JitPolicy",
                 "name": "x", "uid": uid, "controller": controller }])
    }

    #[test]
    fn only_the_controlling_owners_managed_rule_is_ours() {
        let managed = json!({ LABEL_MANAGED_BY: MANAGED_BY });
        assert_eq!(
            ownership(&rule(managed.clone(), owner("u-1", true)), "u-1"),
            Ownership::Ours
        );
        // Another owner's rule of the same name (two owners' names clashing) is not ours.
        let Ownership::Foreign(why) = ownership(&rule(managed.clone(), owner("u-2", true)), "u-1")
        else {
            panic!("another owner's rule was taken for ours");
        };
        assert!(why.contains("JitPolicy x"), "{why}");
        // Neither is a rule without a controller, nor a user's rule with that name.
        assert!(matches!(
            ownership(&rule(managed, owner("u-1", false)), "u-1"),
            Ownership::Foreign(_)
        ));
        let Ownership::Foreign(why) = ownership(&rule(json!({}), json!(null)), "u-1") else {
            panic!("a user's rule was taken for ours");
        };
        assert!(why.contains("user's rule"), "{why}");
    }
}
