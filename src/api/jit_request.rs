//! `JitRequest` (`jitr`): one person's ask for access, the analogue of Azure's `initiate`.
//! The spec is immutable once created; the lifecycle lives in status.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::jit_approval::ApprovalRecord;
use super::jit_policy::{GrantState, GrantStateReason, PolicyProtocol};
use super::validation::{
    DURATION_MESSAGE, DURATION_PATTERN, SOURCE_MESSAGE, SOURCE_RULE, SOURCES_RULE,
    TIMESTAMP_PATTERN, duration_rule, exactly_one,
};

/// The finalizer that revokes a granted request's rules before the request object goes.
/// Admission adds it at creation (saving the operator a write per grant); the operator adds
/// it itself where admission did not.
pub const REVOKE_FINALIZER: &str = "jit.portcullis.dev/revoke";

/// What is asked: which machines of which policy, which ports, from where, for how long.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "jit.portcullis.dev",
    version = "v1alpha1",
    kind = "JitRequest",
    namespaced,
    shortname = "jitr",
    category = "portcullis",
    status = "JitRequestStatus",
    doc = "A request for just-in-time access to ports of machines under a JitPolicy.",
    printcolumn(name = "Policy", type_ = "string", json_path = ".spec.policyName"),
    printcolumn(
        name = "Requestor",
        type_ = "string",
        json_path = ".spec.requestor.username"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Approvals",
        type_ = "string",
        json_path = ".status.approvalState"
    ),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.source"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable; create a new JitRequest instead"))]
pub struct JitRequestSpec {
    /// The `JitPolicy` (same namespace) the request is made under.
    #[schemars(length(min = 1, max = 253))]
    pub policy_name: String,
    /// Why access is needed; required when the policy says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub justification: Option<String>,
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub virtual_machines: Vec<RequestVirtualMachine>,
    /// Who asked. Stamped by admission (`deploy/admission/requestor.yaml`) from the
    /// authenticated caller; a value a user writes is overwritten, never trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requestor: Option<Requestor>,
    /// When access should begin (RFC 3339, at most 7 days after the request is made): a
    /// scheduled grant, `Pending` (reason `Scheduled`) until then; the durations count from
    /// it. Omitted: at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "start_time_schema")]
    pub start_time: Option<Time>,
}

/// `startTime` as an RFC 3339 timestamp every client can read (see `expiresAt` of
/// `SecurityRule` for why `date-time` alone is not enough).
fn start_time_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "format": "date-time",
        "pattern": TIMESTAMP_PATTERN,
    })
}

/// The ports asked for on one machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestVirtualMachine {
    /// A machine name of the policy.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[schemars(length(min = 1, max = 16))]
    pub ports: Vec<RequestPort>,
}

/// One port, from one source, for a while.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(exactly_one("allowedSourceAddressPrefix", "allowedSourceAddressPrefixes"))
    .message("exactly one of allowedSourceAddressPrefix or allowedSourceAddressPrefixes must be set"))]
pub struct RequestPort {
    #[schemars(range(min = 1, max = 65535))]
    pub number: u16,
    /// Omitted means the protocol the policy gives the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<PolicyProtocol>,
    /// How long, ISO 8601 (`PT1H`), at most the policy's `maxRequestAccessDuration`.
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new(duration_rule()).message(DURATION_MESSAGE))]
    pub duration: String,
    /// The requester's address (or prefix): the only source that gets in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 43))]
    #[x_kube(validation = Rule::new(SOURCE_RULE).message(SOURCE_MESSAGE))]
    pub allowed_source_address_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new(SOURCES_RULE).message(SOURCE_MESSAGE))]
    pub allowed_source_address_prefixes: Option<Vec<String>>,
}

/// The authenticated caller who created the request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Requestor {
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The authenticator's extra attributes (e.g. scopes), which authorizers may consult:
    /// the operator's SubjectAccessReview passes them on, so it decides for the same identity
    /// the apiserver admitted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Waiting for something that may still come (the policy, its NSG).
    Pending,
    /// Access is open until `expiresAt`.
    Granted,
    /// Refused; terminal. The message lists every violation.
    Denied,
    /// Access ran out; terminal.
    Expired,
    /// Access was withdrawn early (superseded, policy changed, deleted); terminal.
    Revoked,
}

impl Phase {
    /// A terminal request never grants again, whatever happens to it or the operator.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Denied | Phase::Expired | Phase::Revoked)
    }
}

/// The request's lifecycle as observed by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JitRequestStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The reason of the condition that set the phase, e.g. `Expired` or `PolicyNotFound`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Every reason the request was refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the last granted port closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// The granted source(s), comma-separated (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// One entry per machine and port granted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<GrantStatus>,
    /// Every counted decision of an approver, in the order they were made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<ApprovalRecord>,
    /// Counted approvals of those the policy requires, `1/2`, or `-` when it requires none
    /// (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_state: Option<String>,
}

/// One opened port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantStatus {
    pub virtual_machine: String,
    pub number: u16,
    pub protocol: PolicyProtocol,
    pub allowed_source_address_prefixes: Vec<String>,
    /// The allow `SecurityRule` that opened it.
    pub rule: String,
    pub end_time: Time,
    pub status: GrantState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<GrantStateReason>,
}
