//! `JitApproval` (`jita`): one approver's decision on one `JitRequest` (beyond Azure, which
//! grants at once). The approver is stamped by admission from the authenticated caller, as
//! the requestor is; the operator counts the decision only if that approver may `approve`
//! the request's policy and is not its requestor, and says why in the status otherwise.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::jit_request::Requestor;

/// The custom verb on `jitpolicies` that lets a user approve or reject its requests.
pub const APPROVE: &str = "approve";

/// A decision on a request.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "jit.portcullis.dev",
    version = "v1alpha1",
    kind = "JitApproval",
    namespaced,
    shortname = "jita",
    category = "portcullis",
    status = "JitApprovalStatus",
    doc = "One approver's decision (Approve or Reject) on a JitRequest of the same namespace.",
    printcolumn(name = "Request", type_ = "string", json_path = ".spec.requestName"),
    printcolumn(
        name = "Approver",
        type_ = "string",
        json_path = ".spec.approver.username"
    ),
    printcolumn(name = "Decision", type_ = "string", json_path = ".spec.decision"),
    printcolumn(name = "Counted", type_ = "string", json_path = ".status.counted"),
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
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable; create a new JitApproval instead"))]
pub struct JitApprovalSpec {
    /// The `JitRequest` (same namespace) decided on.
    #[schemars(length(min = 1, max = 253))]
    pub request_name: String,
    pub decision: Decision,
    /// Why; shown on the request (a rejection's comment is in its Denied message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub comment: Option<String>,
    /// Who decided. Stamped by admission (`deploy/admission/approvals.yaml`) from the
    /// authenticated caller; a value a user writes is overwritten, never trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<Requestor>,
}

/// An approver's decision.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum Decision {
    Approve,
    Reject,
}

/// Whether the decision counts, and why not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JitApprovalStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Whether the request counts this decision.
    #[serde(default)]
    pub counted: bool,
    /// `Counted`, or why not: `SelfApproval`, `NotAuthorized`, `DuplicateApprover`,
    /// `RequestNotFound`, `RequestClosed`, `ApproverMissing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// One counted decision as the request records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRecord {
    pub approver: String,
    pub decision: Decision,
    /// When the decision was made (the JitApproval's creation).
    pub time: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}
