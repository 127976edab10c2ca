//! What the webhook decides for each review. The checks that need no API call are plain
//! functions, unit-tested below; the two that do (the policy and the SubjectAccessReview)
//! run concurrently so a review costs one round trip.
//!
//! The request-versus-policy check is [`access::validate`], the very function the controller
//! runs: admission refuses early what the controller would deny, with the same words.

use crate::api::jit_request::REVOKE_FINALIZER;
use std::collections::HashSet;

use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::{Config, Error};
use crate::access::materialize::{LABEL_MANAGED_BY, MANAGED_BY};
use crate::access::{self, Violation};
use crate::api::jit_request::Requestor;
use crate::api::{
    GROUP, JitPolicy, JitPolicySpec, JitRequest, NetworkSecurityGroup, NetworkSecurityGroupSpec,
    SecurityRule, convert,
};
use crate::rules;

/// The custom verb on `jitpolicies` that lets a user request access under a policy: the
/// analogue of Azure's `jitNetworkAccessPolicies/initiate/action`.
pub const INITIATE: &str = "initiate";

/// A webhook's answer to one review.
#[derive(Debug, PartialEq)]
pub enum Decision {
    Allow,
    /// Allow, after applying this JSON patch (mutating webhook only).
    Patch(json_patch::Patch),
    /// Refuse; the message is what `kubectl` prints.
    Deny(String),
}

impl Decision {
    /// Refuses with every problem in one message, or allows when there are none.
    fn from_problems(what: &str, problems: Vec<String>) -> Self {
        if problems.is_empty() {
            Self::Allow
        } else {
            Self::Deny(format!("{what}: {}", problems.join("; ")))
        }
    }

    /// The admission response for `request`.
    pub fn respond(
        self,
        request: &AdmissionRequest<DynamicObject>,
    ) -> Result<AdmissionResponse, Error> {
        let response = AdmissionResponse::from(request);
        Ok(match self {
            Self::Allow => response,
            Self::Patch(patch) => response.with_patch(patch)?,
            Self::Deny(message) => response.deny(message),
        })
    }
}

/// The webhook's decisions, with the client it reads policies and reviews access with.
pub struct Admission {
    client: Client,
    config: Config,
}

impl Admission {
    pub fn new(client: Client, config: Config) -> Self {
        Self { client, config }
    }

    /// `/mutate`: on JitRequest CREATE, `spec.requestor` becomes the authenticated caller,
    /// and the revoke finalizer is added so the operator need not write it before granting.
    pub fn mutate(&self, request: &AdmissionRequest<DynamicObject>) -> Result<Decision, Error> {
        if !is(request, "jitrequests") || request.operation != Operation::Create {
            return Ok(Decision::Allow);
        }
        let finalizers = request
            .object
            .as_ref()
            .and_then(|o| o.metadata.finalizers.as_deref());
        Ok(Decision::Patch(stamp(
            requestor(&request.user_info),
            finalizers,
        )))
    }

    /// `/validate`: dispatches on the resource and operation the configurations route here.
    pub async fn validate(
        &self,
        request: &AdmissionRequest<DynamicObject>,
    ) -> Result<Decision, Error> {
        let resource = request.resource.resource.as_str();
        if request.resource.group != GROUP {
            return Ok(Decision::Allow);
        }
        match (resource, &request.operation) {
            ("jitrequests", Operation::Create) => {
                let jitr: JitRequest =
                    object(&request.object, "JitRequest")?.ok_or(Error::NoObject("JitRequest"))?;
                let problems = self.request_problems(request, &jitr).await?;
                Ok(Decision::from_problems("JitRequest refused", problems))
            }
            ("jitrequests", Operation::Update) => {
                let new: Option<JitRequest> = object(&request.object, "JitRequest")?;
                let old: Option<JitRequest> = object(&request.old_object, "JitRequest")?;
                let changed = matches!((old, new), (Some(old), Some(new)) if old.spec != new.spec);
                Ok(if changed {
                    Decision::Deny(
                        "JitRequest spec is immutable; create a new JitRequest instead".into(),
                    )
                } else {
                    Decision::Allow
                })
            }
            ("securityrules", Operation::Create | Operation::Update) => {
                let new: Option<SecurityRule> = object(&request.object, "SecurityRule")?;
                let old: Option<SecurityRule> = object(&request.old_object, "SecurityRule")?;
                let username = request.user_info.username.as_deref().unwrap_or_default();
                let is_operator = self.config.operator_usernames.iter().any(|u| u == username);
                Ok(match managed_rule_problem(old.as_ref(), new.as_ref()) {
                    Some(problem) if !is_operator => Decision::Deny(format!(
                        "{username} may not write SecurityRule {}: {problem}",
                        request.name
                    )),
                    _ => Decision::Allow,
                })
            }
            ("networksecuritygroups", Operation::Create | Operation::Update) => {
                let nsg: Option<NetworkSecurityGroup> =
                    object(&request.object, "NetworkSecurityGroup")?;
                let problems = nsg.map(|n| nsg_problems(&n.spec)).unwrap_or_default();
                Ok(Decision::from_problems(
                    "NetworkSecurityGroup refused",
                    problems,
                ))
            }
            ("jitpolicies", Operation::Create | Operation::Update) => {
                let policy: Option<JitPolicy> = object(&request.object, "JitPolicy")?;
                let problems = policy.map(|p| policy_problems(&p.spec)).unwrap_or_default();
                Ok(Decision::from_problems("JitPolicy refused", problems))
            }
            _ => Ok(Decision::Allow),
        }
    }

    /// Everything wrong with a new request: no (or someone else's) requestor, the requestor
    /// lacking `initiate` on the policy, and every policy violation. A policy that does not
    /// exist yet is no problem (GitOps applies in any order; the request waits as Pending),
    /// but the authorization check stands regardless.
    async fn request_problems(
        &self,
        request: &AdmissionRequest<DynamicObject>,
        jitr: &JitRequest,
    ) -> Result<Vec<String>, Error> {
        let namespace = request.namespace.as_deref().unwrap_or_default();
        let user = &request.user_info;
        let mut problems = Vec::new();
        let caller = user.username.as_deref().unwrap_or_default();
        match &jitr.spec.requestor {
            None => problems.push(Violation::RequestorMissing.to_string()),
            Some(_) if caller.is_empty() => problems.push(format!(
                "{} (the caller is anonymous)",
                Violation::RequestorMissing
            )),
            Some(r) if r.username != caller => problems.push(format!(
                "spec.requestor.username {:?} is not the caller {caller:?}",
                r.username
            )),
            Some(_) => {}
        }
        let policy_name = jitr.spec.policy_name.as_str();
        let policies = Api::<JitPolicy>::namespaced(self.client.clone(), namespace);
        let (authorized, policy) = tokio::join!(
            self.may_initiate(user, namespace, policy_name),
            policies.get_opt(policy_name),
        );
        problems.extend(authorized?);
        if let Some(policy) = policy?
            && let Err(violations) = access::validate(&policy.spec, &jitr.spec)
        {
            problems.extend(violations.iter().map(ToString::to_string));
        }
        Ok(problems)
    }

    /// Asks the apiserver whether `user` may `initiate` the policy (so RBAC, `resourceNames`
    /// included, and any other authorizer decide); returns the refusal, if any.
    async fn may_initiate(
        &self,
        user: &UserInfo,
        namespace: &str,
        policy: &str,
    ) -> Result<Option<String>, Error> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                uid: user.uid.clone(),
                groups: user.groups.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()),
                    verb: Some(INITIATE.to_owned()),
                    group: Some(GROUP.to_owned()),
                    resource: Some(JitPolicy::plural(&()).into_owned()),
                    name: Some(policy.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let reviewed = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = reviewed.status.unwrap_or_default();
        if status.allowed {
            return Ok(None);
        }
        let why = status
            .reason
            .filter(|r| !r.is_empty())
            .or(status.evaluation_error)
            .unwrap_or_else(|| {
                format!(
                    "no role grants verb {INITIATE:?} on jitpolicies {policy:?} \
                     (see ClusterRole portcullis-requester)"
                )
            });
        let who = user.username.as_deref().unwrap_or("system:anonymous");
        Ok(Some(format!(
            "{who} may not {INITIATE} jitpolicies/{policy} in namespace {namespace}: {why}"
        )))
    }
}

/// Whether the review is about `resource` of our API group.
fn is(request: &AdmissionRequest<DynamicObject>, resource: &str) -> bool {
    request.resource.group == GROUP && request.resource.resource == resource
}

/// The reviewed object as `K`, if the review has one.
fn object<K: Resource + DeserializeOwned>(
    object: &Option<DynamicObject>,
    kind: &'static str,
) -> Result<Option<K>, Error> {
    object
        .clone()
        .map(|o| o.try_parse::<K>())
        .transpose()
        .map_err(|source| Error::Object { kind, source })
}

/// Who the apiserver authenticated.
pub fn requestor(user: &UserInfo) -> Requestor {
    Requestor {
        username: user.username.clone().unwrap_or_default(),
        uid: user.uid.clone().filter(|u| !u.is_empty()),
        groups: user.groups.clone().unwrap_or_default(),
    }
}

/// The patch that sets `spec.requestor` and adds the revoke finalizer. JSON Patch `add` on
/// an existing member replaces it, so a forged requestor is overwritten and an absent one
/// created by the same operation; the finalizer is appended unless already there.
pub fn stamp(requestor: Requestor, finalizers: Option<&[String]>) -> json_patch::Patch {
    let value = serde_json::to_value(requestor).unwrap_or_default();
    let mut ops =
        vec![serde_json::json!({ "op": "add", "path": "/spec/requestor", "value": value })];
    match finalizers {
        None => ops.push(serde_json::json!(
            { "op": "add", "path": "/metadata/finalizers", "value": [REVOKE_FINALIZER] }
        )),
        Some(present) if !present.iter().any(|f| f == REVOKE_FINALIZER) => {
            ops.push(serde_json::json!(
                { "op": "add", "path": "/metadata/finalizers/-", "value": REVOKE_FINALIZER }
            ))
        }
        Some(_) => {}
    }
    serde_json::from_value(serde_json::Value::Array(ops))
        .unwrap_or_else(|_| json_patch::Patch(Vec::new()))
}

/// Why writing this SecurityRule is the operator's business alone, if it is: it carries
/// (or carried) the operator's `managed-by` label, and the write is a create or changes the
/// spec or the labels. Metadata-only updates (finalizers, owner references, annotations,
/// which the garbage collector and GitOps tools touch) pass.
pub fn managed_rule_problem(
    old: Option<&SecurityRule>,
    new: Option<&SecurityRule>,
) -> Option<String> {
    let managed = |rule: Option<&SecurityRule>| {
        rule.is_some_and(|r| {
            r.labels().get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
        })
    };
    if !managed(old) && !managed(new) {
        return None;
    }
    if let (Some(old), Some(new)) = (old, new)
        && old.spec == new.spec
        && old.labels() == new.labels()
    {
        return None;
    }
    Some(format!(
        "rules labelled {LABEL_MANAGED_BY}={MANAGED_BY} are written only by the Portcullis \
         operator; remove the label to write a rule of your own"
    ))
}

/// Inline rules sharing a priority in one direction (the CRD's CEL rule says the same;
/// this holds for objects stored before it, through the one conflict definition).
pub fn nsg_problems(spec: &NetworkSecurityGroupSpec) -> Vec<String> {
    let inline: Vec<rules::Rule> = spec
        .security_rules
        .iter()
        .filter_map(|r| convert::rule(&r.name, &r.fields, rules::Origin::Inline, false).ok())
        .collect();
    rules::conflicts(&inline)
        .into_iter()
        .map(|c| {
            format!(
                "securityRules: priority {} is used by more than one {} rule ({})",
                c.priority,
                c.direction,
                c.rules.join(", ")
            )
        })
        .collect()
}

/// Machine names listed twice in a policy (the list-map schema refuses them too).
pub fn policy_problems(spec: &JitPolicySpec) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut reported = HashSet::new();
    spec.virtual_machines
        .iter()
        .filter(|m| !seen.insert(m.name.as_str()) && reported.insert(m.name.as_str()))
        .map(|m| {
            format!(
                "virtualMachines: machine name {:?} is listed more than once",
                m.name
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn rule(labels: Value, priority: u32) -> SecurityRule {
        serde_json::from_value(json!({
            "apiVersion": "jit.portcullis.dev/v1alpha1",
            "kind": "SecurityRule",
            "metadata": { "name": "r", "labels": labels },
            "spec": {
                "networkSecurityGroupName": "nsg", "priority": priority,
                "direction": "Inbound", "access": "Allow", "protocol": "Tcp",
                "sourceAddressPrefix": "*", "sourcePortRange": "*",
                "destinationAddressPrefix": "*", "destinationPortRange": "22",
            },
        }))
        .unwrap()
    }

    #[test]
    fn stamp_overwrites_with_the_caller() {
        let user = UserInfo {
            username: Some("alice".into()),
            uid: Some("u-1".into()),
            groups: Some(vec!["team-web".into()]),
            extra: None,
        };
        let mut object =
            json!({ "metadata": {}, "spec": { "requestor": { "username": "mallory" } } });
        json_patch::patch(&mut object, &stamp(requestor(&user), None)).unwrap();
        assert_eq!(
            object["spec"]["requestor"],
            json!({ "username": "alice", "uid": "u-1", "groups": ["team-web"] })
        );
        assert_eq!(object["metadata"]["finalizers"], json!([REVOKE_FINALIZER]));
        let mut object = json!({ "metadata": { "finalizers": ["other"] }, "spec": {} });
        let present = vec!["other".to_owned()];
        json_patch::patch(&mut object, &stamp(requestor(&user), Some(&present))).unwrap();
        assert_eq!(object["spec"]["requestor"]["username"], "alice");
        assert_eq!(
            object["metadata"]["finalizers"],
            json!(["other", REVOKE_FINALIZER])
        );
        let ours = vec![REVOKE_FINALIZER.to_owned()];
        assert_eq!(
            stamp(requestor(&user), Some(&ours)).0.len(),
            1,
            "the finalizer is added once"
        );
    }

    #[test]
    fn managed_rules_are_the_operators_alone() {
        let managed = rule(json!({ LABEL_MANAGED_BY: MANAGED_BY }), 100);
        let mine = rule(json!({ "team": "web" }), 100);
        assert!(managed_rule_problem(None, Some(&managed)).is_some());
        assert!(managed_rule_problem(None, Some(&mine)).is_none());
        // Taking a rule over by dropping the label, or changing its spec, is refused...
        assert!(managed_rule_problem(Some(&managed), Some(&mine)).is_some());
        let moved = rule(json!({ LABEL_MANAGED_BY: MANAGED_BY }), 200);
        assert!(managed_rule_problem(Some(&managed), Some(&moved)).is_some());
        // ...metadata-only updates (finalizers, owner references) are not.
        let mut finalized = managed.clone();
        finalized.metadata.finalizers = Some(vec!["x".into()]);
        assert!(managed_rule_problem(Some(&managed), Some(&finalized)).is_none());
    }

    #[test]
    fn duplicate_priorities_and_machines_are_named() {
        let nsg: NetworkSecurityGroupSpec = serde_json::from_value(json!({
            "securityRules": [
                { "name": "a", "priority": 100, "direction": "Inbound", "access": "Allow",
                  "protocol": "Tcp", "sourceAddressPrefix": "*", "sourcePortRange": "*",
                  "destinationAddressPrefix": "*", "destinationPortRange": "22" },
                { "name": "b", "priority": 100, "direction": "Inbound", "access": "Deny",
                  "protocol": "Tcp", "sourceAddressPrefix": "*", "sourcePortRange": "*",
                  "destinationAddressPrefix": "*", "destinationPortRange": "22" },
                { "name": "c", "priority": 100, "direction": "Outbound", "access": "Deny",
                  "protocol": "Tcp", "sourceAddressPrefix": "*", "sourcePortRange": "*",
                  "destinationAddressPrefix": "*", "destinationPortRange": "22" },
            ],
        }))
        .unwrap();
        assert_eq!(
            nsg_problems(&nsg),
            ["securityRules: priority 100 is used by more than one Inbound rule (a, b)"]
        );
        let machine =
            json!({ "name": "m", "address": "10.0.0.1", "networkSecurityGroupName": "n" });
        let policy: JitPolicySpec = serde_json::from_value(json!({
            "virtualMachines": [machine.clone(), machine.clone(), machine],
        }))
        .unwrap();
        assert_eq!(
            policy_problems(&policy),
            ["virtualMachines: machine name \"m\" is listed more than once"]
        );
    }
}
