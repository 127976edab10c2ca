//! What every reconciler shares: the client, the event recorder, the notifier, the metrics,
//! the caches of all four kinds with their indexes, and the one clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use kube::Client;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};

use k8s_openapi::api::authorization::v1::{SubjectAccessReview, SubjectAccessReviewSpec};

use super::cached::{CachedRule, Keep};
use super::index::{Index, Key};
use super::metrics::Metrics;
use crate::access::Violation;
use crate::access::materialize::{LABEL_MANAGED_BY, MANAGED_BY};
use crate::api::convert::ConvertError;
use crate::api::jit_request::Requestor;
use crate::api::nsg_model::{NsgModel, RuleObject};
use crate::api::{
    AgentReport, JitApproval, JitPolicy, JitRequest, NetworkSecurityGroup, SecurityRule,
};
use crate::rules::{self, Scope};

/// The reflector caches, read instead of the API on every hot path.
#[derive(Clone)]
pub struct Stores {
    pub nsgs: Store<NetworkSecurityGroup>,
    pub policies: Store<JitPolicy>,
    pub requests: Store<JitRequest>,
    pub rules: Store<CachedRule>,
    pub approvals: Store<JitApproval>,
    pub reports: Store<AgentReport>,
}

/// Shared state of the controllers.
pub struct Context {
    pub client: Client,
    pub events: super::events::Events,
    /// CloudEvents about requests for the configured sinks (see [`super::notify`]).
    pub notifier: super::notify::Notifier,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    /// Keys of the cached objects by what reconcilers look them up by; fed by the watches
    /// before they wake anything (see [`super::index`]).
    pub index: Mutex<Index>,
    /// Each NSG's placement view, kept until the NSG or its user rules change.
    views: Mutex<HashMap<Key, CachedView>>,
    /// The resource version each of the operator's status writes produced, until the
    /// cache has caught up with it (see [`Context::stale`]).
    written: Mutex<HashMap<WrittenKey, u64>>,
    /// Deleted requests' last records, for their policies' history.
    pub departed: super::policy::Departed,
}

/// A placement view and what it was built from: the NSG's spec (its UID and generation:
/// status writes do not count) and the revision of its user rules in the index.
struct CachedView {
    spec: (Option<String>, Option<i64>),
    revision: u64,
    view: Arc<NsgView>,
}

/// An NSG's rules, split the way JIT placement needs them.
pub struct NsgView {
    pub scope: Scope,
    /// Inline rules and `SecurityRule`s the operator did not create.
    pub user_rules: Vec<rules::Rule>,
    /// Rules that could not be read (named in conditions, never fatal).
    pub invalid: Vec<ConvertError>,
    /// When a user rule in the view expires, making it out of date.
    valid_until: Option<Timestamp>,
}

impl Context {
    /// Builds the context; Events are published as `reporter`. Starts the Event worker, so
    /// it runs inside the runtime.
    pub fn new(
        client: Client,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        stores: Stores,
        notifier: super::notify::Notifier,
    ) -> Self {
        Self {
            events: super::events::Events::start(client.clone(), reporter, metrics.clone()),
            notifier,
            client,
            metrics,
            stores,
            index: Mutex::default(),
            views: Mutex::default(),
            written: Mutex::default(),
            departed: super::policy::Departed::default(),
        }
    }

    /// The current time. Every decision that depends on time reads it here, once per
    /// reconcile, so that a reconcile reasons about one instant and tests know where the
    /// clock enters.
    pub fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    /// The NSG `name` in `namespace`, from the cache.
    pub fn nsg(&self, namespace: &str, name: &str) -> Option<Arc<NetworkSecurityGroup>> {
        self.stores
            .nsgs
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// Whether the agents enforcing NSG `nsg` at `address` agree that the grant rule
    /// `rule` is idle (see [`Index::reported_idle`]).
    pub fn reported_idle(&self, namespace: &str, nsg: &str, rule: &str, address: IpAddr) -> bool {
        self.index().reported_idle(namespace, nsg, rule, address)
    }

    /// The agents' reports on the NSG `nsg` (those that count: see
    /// [`ReportEntry`](super::index::ReportEntry)).
    pub fn reports_on(&self, namespace: &str, nsg: &str) -> Vec<Arc<AgentReport>> {
        let names = self.index().reports_on(namespace, nsg);
        cached(&self.stores.reports, namespace, names)
    }

    /// The request `name` in `namespace`, from the cache.
    pub fn request(&self, namespace: &str, name: &str) -> Option<Arc<JitRequest>> {
        self.stores
            .requests
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// The approvals deciding on request `request` in `namespace`.
    pub fn approvals_of(&self, namespace: &str, request: &str) -> Vec<Arc<JitApproval>> {
        let names = self.index().approvals_of(namespace, request);
        cached(&self.stores.approvals, namespace, names)
    }

    /// The policy `name` in `namespace`, from the cache.
    pub fn policy(&self, namespace: &str, name: &str) -> Option<Arc<JitPolicy>> {
        self.stores
            .policies
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// The `SecurityRule` objects that reference the NSG.
    pub fn rules_of(&self, namespace: &str, nsg: &str) -> Vec<Arc<CachedRule>> {
        let names = self.index().rules_on(namespace, nsg);
        cached(&self.stores.rules, namespace, names)
    }

    /// The policies with a machine behind the NSG.
    pub fn policies_on(&self, namespace: &str, nsg: &str) -> Vec<Arc<JitPolicy>> {
        let names = self.index().policies_on(namespace, nsg);
        cached(&self.stores.policies, namespace, names)
    }

    /// Every request naming the policy.
    pub fn requests_of(&self, namespace: &str, policy: &str) -> Vec<Arc<JitRequest>> {
        let names = self.index().requests_of(namespace, policy);
        cached(&self.stores.requests, namespace, names)
    }

    /// The granted requests of `requestor` in `namespace` holding `port` on `machine` open.
    pub fn granted_on(
        &self,
        namespace: &str,
        requestor: &str,
        machine: &str,
        port: u16,
    ) -> Vec<Arc<JitRequest>> {
        let names = self.index().granted_on(namespace, requestor, machine, port);
        cached(&self.stores.requests, namespace, names)
    }

    /// The operator's rules in `namespace` that `owner_uid` controls.
    pub fn rules_owned_by(&self, namespace: &str, owner_uid: &str) -> Vec<Arc<CachedRule>> {
        let keys = self.index().rules_owned_by(owner_uid);
        let names = keys
            .into_iter()
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, name)| name)
            .collect();
        cached(&self.stores.rules, namespace, names)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().expect("index lock")
    }

    /// The NSG's scope and its user rules (inline plus unmanaged objects), for placement.
    /// Built once per change of the NSG or its user rules, not once per grant.
    pub fn nsg_view(&self, nsg: &NetworkSecurityGroup, now: Timestamp) -> Arc<NsgView> {
        let namespace = nsg.metadata.namespace.as_deref().unwrap_or_default();
        let name = nsg.metadata.name.as_deref().unwrap_or_default();
        let key = (namespace.to_owned(), name.to_owned());
        // The revision is read before the rules: a view built from rules newer than its
        // revision is only rebuilt once too often, never kept too long.
        let (user_rules, revision) = self.index().user_rules_on(namespace, name);
        let spec = (nsg.metadata.uid.clone(), nsg.metadata.generation);
        if let Some(cached) = self.views.lock().expect("views lock").get(&key)
            && cached.revision == revision
            && cached.spec == spec
            && cached.view.valid_until.is_none_or(|at| at > now)
        {
            return cached.view.clone();
        }
        let objects = cached(&self.stores.rules, namespace, user_rules);
        let view = Arc::new(NsgView::build(nsg, &objects, now));
        self.views.lock().expect("views lock").insert(
            key,
            CachedView {
                spec,
                revision,
                view: view.clone(),
            },
        );
        view
    }

    /// Queues a Kubernetes Event about `object` (see [`super::events`]): best effort, and
    /// never a wait on the reconcile that already did its work.
    pub fn event<K>(&self, object: &K, type_: EventType, reason: &str, action: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        self.events.publish(object.object_ref(&()), event);
    }
}

/// The SubjectAccessReview of whether `requestor` (user, uid, groups and extra, exactly as
/// admission recorded them) may `verb` the policy `policy` in `namespace`.
pub fn access_review(
    requestor: &Requestor,
    verb: &str,
    namespace: &str,
    policy: &str,
) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(requestor.username.clone()),
            uid: requestor.uid.clone().filter(|u| !u.is_empty()),
            groups: Some(requestor.groups.clone()),
            extra: (!requestor.extra.is_empty()).then(|| requestor.extra.clone()),
            resource_attributes: Some(crate::api::access_attributes(
                namespace,
                verb,
                &JitPolicy::plural(&()),
                Some(policy),
            )),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
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
        let review = access_review(requestor, verb, namespace, policy);
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
pub fn ownership(rule: &CachedRule, owner_uid: &str) -> Ownership {
    match &rule.controller {
        Some(o) if o.uid == owner_uid && rule.managed() => Ownership::Ours,
        Some(o) => Ownership::Foreign(format!("it is controlled by {} {}", o.kind, o.name)),
        None if rule.managed() => Ownership::Foreign("it has no controlling owner".to_owned()),
        None => Ownership::Foreign(format!(
            "it is a user's rule (no {LABEL_MANAGED_BY}={MANAGED_BY} label)"
        )),
    }
}

impl Context {
    /// Writes `status` by server-side apply as the operator's field manager. Fields other
    /// managers own are left alone.
    pub async fn apply_status<K, S>(&self, object: &K, status: &S) -> Result<K, super::Error>
    where
        K: super::Watched + Resource<Scope = kube::core::NamespaceResourceScope>,
        S: serde::Serialize + std::fmt::Debug + Sync,
    {
        let written = apply_status_as(&self.client, object, status, super::MANAGER).await?;
        if let Some(version) = revision(&written) {
            let (name, namespace) = super::name_and_namespace(object, "object")?;
            self.written
                .lock()
                .expect("written lock")
                .insert(written_key::<K>(&namespace, &name), version);
        }
        Ok(written)
    }

    /// Applies an empty status to `object` as field manager `manager`: the apiserver drops
    /// every status field that manager alone held.
    pub async fn release_status<K>(&self, object: &K, manager: &str) -> Result<(), super::Error>
    where
        K: super::Watched + Resource<Scope = kube::core::NamespaceResourceScope>,
    {
        let empty = serde_json::Map::new();
        apply_status_as(&self.client, object, &empty, manager).await?;
        Ok(())
    }

    /// Whether the cached `object` is older than the operator's own last status write to
    /// it. A reconcile woken by a related object (a grant's rule appearing) can run before
    /// the watch delivers that write; deciding again from the older copy would repeat the
    /// decision (a second status write, a second audit record), so every controller skips
    /// such a reconcile (`drive` in the controller module).
    ///
    /// Resource versions are compared as the numbers kube-apiserver makes them (etcd
    /// revisions); one that is not a number is never taken for stale.
    pub fn stale<K: Resource<DynamicType = ()>>(&self, object: &K) -> bool {
        let (Some(namespace), Some(name)) = (&object.meta().namespace, &object.meta().name) else {
            return false;
        };
        let key = written_key::<K>(namespace, name);
        let mut written = self.written.lock().expect("written lock");
        let Some(&ours) = written.get(&key) else {
            return false;
        };
        match revision(object) {
            Some(cached) if cached < ours => true,
            _ => {
                written.remove(&key);
                false
            }
        }
    }

    /// Forgets the status writes to an object that is gone.
    pub fn forget_written<K: Resource<DynamicType = ()>>(&self, namespace: &str, name: &str) {
        self.written
            .lock()
            .expect("written lock")
            .remove(&written_key::<K>(namespace, name));
    }
}

/// The body of a status write, serialized straight from the status: a JSON tree of it
/// first would cost many times its size (a policy's history is hundreds of nodes), once per
/// write in flight.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusPatch<'a, S> {
    api_version: std::borrow::Cow<'static, str>,
    kind: std::borrow::Cow<'static, str>,
    status: &'a S,
}

/// Server-side applies `status` to `object` as field manager `manager`; the object as
/// written.
async fn apply_status_as<K, S>(
    client: &Client,
    object: &K,
    status: &S,
    manager: &str,
) -> Result<K, super::Error>
where
    K: super::Watched + Resource<Scope = kube::core::NamespaceResourceScope>,
    S: serde::Serialize + std::fmt::Debug + Sync,
{
    let (name, namespace) = super::name_and_namespace(object, "object")?;
    let api: kube::Api<K> = kube::Api::namespaced(client.clone(), &namespace);
    let patch = StatusPatch {
        api_version: K::api_version(&()),
        kind: K::kind(&()),
        status,
    };
    Ok(api
        .patch_status(
            &name,
            &kube::api::PatchParams::apply(manager).force(),
            &kube::api::Patch::Apply(&patch),
        )
        .await?)
}

/// The kind, namespace and name of an object the operator wrote status to.
type WrittenKey = (String, String, String);

fn written_key<K: Resource<DynamicType = ()>>(namespace: &str, name: &str) -> WrittenKey {
    (
        K::kind(&()).into_owned(),
        namespace.to_owned(),
        name.to_owned(),
    )
}

fn revision<K: Resource>(object: &K) -> Option<u64> {
    object.meta().resource_version.as_deref()?.parse().ok()
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
        let object = rule_manifest(namespace, desired, &owner);
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
                    current = api
                        .get_opt(&desired.name)
                        .await?
                        .map(|rule| Arc::new(rule.keep()));
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
                    .all(|(k, v)| rule.labels.get(k) == Some(v.as_str()));
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

    /// Forgets the placement view of an NSG that is gone.
    pub fn forget_view(&self, namespace: &str, nsg: &str) {
        self.views
            .lock()
            .expect("views lock")
            .remove(&(namespace.to_owned(), nsg.to_owned()));
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
}

/// The cached objects `names` in `namespace` (a name not cached any more is skipped).
fn cached<K>(store: &Store<K>, namespace: &str, names: Vec<String>) -> Vec<Arc<K>>
where
    K: kube::runtime::reflector::Lookup<DynamicType = ()> + Clone,
{
    names
        .iter()
        .filter_map(|name| store.get(&ObjectRef::new(name).within(namespace)))
        .collect()
}

impl NsgView {
    /// The view of `nsg` with the users' `SecurityRule` objects among `objects`, at `now`.
    fn build(nsg: &NetworkSecurityGroup, objects: &[Arc<CachedRule>], now: Timestamp) -> Self {
        let model = NsgModel::new(
            nsg,
            objects.iter().map(Arc::as_ref).filter(|o| !o.managed()),
            now,
        );
        Self {
            valid_until: model.next_expiry(),
            scope: model.scope,
            user_rules: model.rules,
            invalid: model.invalid,
        }
    }
}

/// The SecurityRule object the operator writes for `desired`, controlled by `owner`: one
/// definition for its create, its server-side apply, and tools that seed a cluster with the
/// operator's objects (the scale bench).
pub fn rule_manifest(
    namespace: &str,
    desired: &crate::access::materialize::Materialized,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": SecurityRule::api_version(&()),
        "kind": SecurityRule::kind(&()),
        "metadata": {
            "name": desired.name,
            "namespace": namespace,
            "labels": desired.labels,
            "ownerReferences": [owner],
        },
        "spec": desired.spec,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rule(labels: serde_json::Value, owners: serde_json::Value) -> CachedRule {
        serde_json::from_value::<SecurityRule>(json!({
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
        .keep()
    }

    fn owner(uid: &str, controller: bool) -> serde_json::Value {
        json!([{ "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "JitPolicy",
                 "name": "x", "uid": uid, "controller": controller }])
    }

    #[test]
    fn a_status_patch_is_the_status_under_the_kind() {
        let status = crate::api::JitApprovalStatus {
            counted: true,
            reason: Some("Counted".into()),
            ..Default::default()
        };
        let patch = StatusPatch {
            api_version: JitApproval::api_version(&()),
            kind: JitApproval::kind(&()),
            status: &status,
        };
        assert_eq!(
            serde_json::to_value(&patch).unwrap(),
            json!({
                "apiVersion": "jit.portcullis.dev/v1alpha1",
                "kind": "JitApproval",
                "status": serde_json::to_value(&status).unwrap(),
            })
        );
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
