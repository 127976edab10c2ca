//! `AgentReport`: what one agent enforces on its machine, as an object of
//! its own.
//!
//! Each agent writes one, named by [`crate::access::materialize::report_name`] and owned by
//! the NSG it enforces (deleting the NSG removes its reports); the operator summarizes them
//! into the NSG's status. They used to be entries of the NSG's `status.enforcement`, each
//! under its agent's field manager: about 700 bytes apiece, so a few thousand agents on one
//! NSG filled the object to etcd's limit, and every agent's write contended for that one
//! object. One small object per agent, like a node's Lease, has neither limit.
//!
//! The report is the agent's observation, written whole by the agent alone, so it lives in
//! `spec` as a Lease's does: there is no desired state for a status to follow, and a status
//! subresource would only double every report's writes. Admission lets an identity write
//! reports only for an NSG on which it holds the custom verb `report`
//! (`deploy/admission/agentreports.yaml`).

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::nsg::EnforcementReport;

/// The field an AgentReport list or watch may be selected by: the NSG it reports on.
pub const NSG_FIELD: &str = "spec.networkSecurityGroupName";

/// One agent's report on the NSG named in `networkSecurityGroupName`.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "jit.portcullis.dev",
    version = "v1alpha1",
    kind = "AgentReport",
    namespaced,
    category = "portcullis",
    selectable = ".spec.networkSecurityGroupName",
    doc = "What one agent enforces for an NSG on its machine; the operator summarizes these into the NSG's status.",
    printcolumn(
        name = "NSG",
        type_ = "string",
        json_path = ".spec.networkSecurityGroupName"
    ),
    printcolumn(name = "Agent", type_ = "string", json_path = ".spec.agent"),
    printcolumn(
        name = "Generation",
        type_ = "integer",
        json_path = ".spec.observedGeneration"
    ),
    printcolumn(name = "Error", type_ = "string", json_path = ".spec.error"),
    printcolumn(name = "Applied", type_ = "date", json_path = ".spec.appliedAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentReportSpec {
    /// The NSG (same namespace) the agent enforces. Fixed once written: admission checks
    /// the writer's right to report on the NSG the report names.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("networkSecurityGroupName is immutable"))]
    pub network_security_group_name: String,
    #[serde(flatten)]
    pub report: EnforcementReport,
}
